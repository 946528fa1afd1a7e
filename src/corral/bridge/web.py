"""The approvals page: a human sees exactly what a pending request would run and decides it.

    router = web_router(bridge, token=token)   # mounted by http_api.create_app
    GET  /approvals?token=T         token ok: new session cookie, 303 to /approvals (token leaves
                                    the address bar and the history); else the login form, 401
    POST /approvals/login           the same from the login form (the token never enters a URL)
    GET  /approvals                 the pending requests, or the login form (401) without session
    POST /approvals/{id}/approve    session + CSRF token: bridge.decide(id, approve=True, by="web")
    POST /approvals/{id}/deny       the same with approve=False; both answer 303 to /approvals

Who can use it. `corral serve` listens on 127.0.0.1, where every local user can connect, so the
network gives no protection against other users of the machine. The page is useless without
the bearer token, which lives in a file only its owner (and root) can read (mode 0600, see
token.py): without a session every route answers the login form or 401, and a session is only
opened for the token, compared in constant time. Rules for each request:

1. Host must name the loopback (127.0.0.1, localhost, [::1], any port). A page of another site
   whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own name and is refused.
2. A POST whose Origin (or, without one, Referer) is present must be this server's origin.
   Browsers send Origin on every form POST; curl sends neither and still needs rules 3 and 4.
3. The session cookie (HttpOnly, SameSite=Strict, Path=/approvals) holds `sid.mac`: a random
   session id and its HMAC under a key made at start-up, never the token. Sessions live in this
   process only; they end after SESSION_LIFETIME_S, when the token is rotated, and with the
   server.
4. A decision needs the session's CSRF token (a synchronizer token: random, one per session,
   held server-side, sent in a hidden field, compared with hmac.compare_digest).
5. Every response forbids framing, caching, scripts and foreign form targets (SECURITY_HEADERS).
   The page runs no JavaScript at all: its CSP has no script-src, so an escaping bug could not
   run a script; everything shown is escaped anyway, and invisible or control characters of an
   argv element are shown as escapes (a right-to-left override could disguise an argument).

Limits, said plainly: cookies are not isolated by port (RFC 6265 section 8.5). Another local
user's server on another 127.0.0.1 port that this browser visits receives the session cookie
and could use it here until it expires. Visit only local ports you trust while a session lives.

Referrer-Policy is `same-origin`, not `no-referrer`: under `no-referrer` Chromium sends
`Origin: null` with form posts (Fetch standard, "append a request Origin header"), which would
defeat rule 2. `same-origin` still sends nothing to any other origin.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from corral.bridge import web_page
from corral.bridge.errors import BridgeError
from corral.bridge.web_page import PendingView

__all__ = ["SECURITY_HEADERS", "ApprovalDesk", "host_allowed", "origin_allowed", "web_router"]

# The token, or a function giving the current one (token.TokenFile.current): then a rotation
# takes effect at once, and None (the file gone or unsafe) refuses everything.
TokenSource = Callable[[], "str | None"]

PATH = "/approvals"
COOKIE_NAME = "corral_approvals"
# A working day: long enough to leave the page open, short enough that a leaked cookie (see the
# port limit above) dies the same day.
SESSION_LIFETIME_S = 8 * 3600
# Only token holders open sessions; the cap keeps a script that logs in in a loop from growing
# the table without end. The oldest session goes first.
MAX_SESSIONS = 32
# The decision form is a CSRF token, a reason and nothing else; anything larger is not ours.
MAX_FORM_BYTES = 8 * 1024
MAX_FORM_FIELDS = 8
MAX_REASON_CHARS = web_page.MAX_REASON_CHARS

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src '{web_page.STYLE_HASH}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

Decision = Literal["approve", "deny"]


class ApprovalDesk(Protocol):
    """What the page needs of `Bridge`; tests pass a fake with the same two methods."""

    def pending(self) -> Sequence[PendingView]: ...

    def decide(self, approval_id: str, *, approve: bool, by: str, reason: str = "") -> None: ...


def host_allowed(host: str) -> bool:
    """Whether a Host header names the loopback: 127.0.0.1, localhost or [::1], with any port."""
    if not host or any(c in host for c in "/?#@\\ \t"):
        return False
    try:
        parts = urlsplit(f"//{host}")
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        return False
    return parts.hostname in LOOPBACK_NAMES


def _origin_of(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def origin_allowed(*, origin: str | None, referer: str | None, own: str) -> bool:
    """Whether a POST comes from `own` (scheme://host[:port]): Origin decides when present
    (`null` included, and refused), else Referer; a request with neither is allowed here and
    left to the session and CSRF checks."""
    claimed = origin if origin is not None else referer
    if claimed is None:
        return True
    mine = _origin_of(own)
    return mine is not None and _origin_of(claimed) == mine


class _Session:
    __slots__ = ("csrf", "expires", "flash", "token_tag")

    def __init__(self, *, now: float, token_tag: str) -> None:
        self.token_tag = token_tag  # the token it was opened with: a rotation ends it
        self.csrf = secrets.token_urlsafe(32)
        self.expires = now + SESSION_LIFETIME_S
        self.flash = ""  # shown once by the next page view: the result of the last decision


class _Sessions:
    """The sessions of one router. The cookie is `sid.mac`; the MAC is checked before the table
    is looked at, so a forged cookie never reaches it. A session is valid only while the token
    it was opened with is still the current one."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._by_id: dict[str, _Session] = {}
        self._lock = threading.Lock()  # sync work runs on the thread pool

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def open(self, *, now: float, token: str) -> str:
        sid = secrets.token_urlsafe(32)
        tag = self._mac(f"token:{token}")
        with self._lock:
            for old in [s for s, session in self._by_id.items() if session.expires <= now]:
                del self._by_id[old]
            if len(self._by_id) >= MAX_SESSIONS:
                del self._by_id[next(iter(self._by_id))]  # dicts keep insertion order
            self._by_id[sid] = _Session(now=now, token_tag=tag)
        return f"{sid}.{self._mac(sid)}"

    def find(self, cookie: str | None, *, now: float, token: str | None) -> _Session | None:
        sid, _, mac = (cookie or "").partition(".")
        if token is None or not sid:
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(sid).encode()):
            return None
        tag = self._mac(f"token:{token}")
        with self._lock:
            session = self._by_id.get(sid)
            if session is None:
                return None
            if session.expires <= now or not hmac.compare_digest(session.token_tag, tag):
                del self._by_id[sid]
                return None
            return session


def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _html(body: str, *, status: int = 200) -> Response:
    return _secured(HTMLResponse(body, status_code=status))


def _refusal(status: int, code: str, message: str) -> Response:
    return _html(web_page.error_page(status, code, message), status=status)


def _see_approvals() -> Response:
    return _secured(RedirectResponse(PATH, status_code=303))


def _check_request(request: Request, *, post: bool) -> Response | None:
    """Rules 1 and 2 of the module docstring; a refusal page, or None to go on."""
    host = request.headers.get("host", "")
    if not host_allowed(host):
        return _refusal(403, "forbidden", "This page answers only to 127.0.0.1 or localhost.")
    own = f"{request.url.scheme}://{host}"
    headers = request.headers
    if post and not origin_allowed(
        origin=headers.get("origin"), referer=headers.get("referer"), own=own
    ):
        return _refusal(403, "forbidden", "The form was sent from another site.")
    return None


async def _read_form(request: Request) -> dict[str, str] | Response:
    """The urlencoded body as one value per name; parsed here (no multipart dependency), with
    a size cap checked while reading."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return _refusal(415, "malformed_request", "Expected an HTML form submission.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return _refusal(413, "request_too_large", "The form is larger than this page sends.")
    try:
        fields = parse_qs(
            body.decode(), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS, errors="strict"
        )
    except ValueError:  # UnicodeDecodeError included
        return _refusal(400, "malformed_request", "The form could not be read.")
    if any(len(values) != 1 for values in fields.values()):
        return _refusal(400, "malformed_request", "A form field was sent twice.")
    return {name: values[0] for name, values in fields.items()}


def _login(offered: str, *, token: str | None, sessions: _Sessions) -> Response:
    if token is None or not hmac.compare_digest(offered.encode(), token.encode()):
        return _html(web_page.login_page("That token was not accepted."), status=401)
    response = _see_approvals()
    response.set_cookie(
        COOKIE_NAME,
        sessions.open(now=time.time(), token=token),
        max_age=SESSION_LIFETIME_S,
        path=PATH,
        httponly=True,
        samesite="strict",
    )
    return response


def web_router(bridge: ApprovalDesk, *, token: str | TokenSource) -> APIRouter:
    """The approvals page for `bridge`, opened by `token` (the bearer token of `corral serve`,
    or a function returning the current one). Its routes stay out of the OpenAPI document:
    they serve HTML to a person, not an API."""
    if token == "":
        raise ValueError("the approvals page needs a non-empty token")
    current_token: TokenSource = token if callable(token) else functools.partial(str, token)
    sessions = _Sessions()

    def session_of(request: Request) -> _Session | None:
        cookie = request.cookies.get(COOKIE_NAME)
        return sessions.find(cookie, now=time.time(), token=current_token())

    router = APIRouter(include_in_schema=False)

    @router.get(PATH)
    async def show(request: Request) -> Response:
        refused = _check_request(request, post=False)
        if refused is not None:
            return refused
        offered = request.query_params.get("token")
        if offered is not None:
            return _login(offered, token=current_token(), sessions=sessions)
        session = session_of(request)
        if session is None:
            return _html(web_page.login_page(""), status=401)
        pending = await run_in_threadpool(bridge.pending)
        flash, session.flash = session.flash, ""
        page = web_page.approvals_page(pending, csrf=session.csrf, flash=flash, now=time.time())
        return _html(page)

    @router.post(f"{PATH}/login")
    async def login(request: Request) -> Response:
        refused = _check_request(request, post=True)
        if refused is not None:
            return refused
        form = await _read_form(request)
        if isinstance(form, Response):
            return form
        return _login(form.get("token", ""), token=current_token(), sessions=sessions)

    async def decide(request: Request, approval_id: str, decision: Decision) -> Response:
        refused = _check_request(request, post=True)
        if refused is not None:
            return refused
        session = session_of(request)
        if session is None:
            return _refusal(401, "unauthorized", "No session: open this page with your token.")
        form = await _read_form(request)
        if isinstance(form, Response):
            return form
        if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            return _refusal(403, "forbidden", "The form's CSRF token is missing or wrong.")
        reason = form.get("reason", "").strip()
        if len(reason) > MAX_REASON_CHARS:
            return _refusal(422, "invalid_parameter", "The reason is too long.")
        call = functools.partial(
            bridge.decide, approval_id, approve=decision == "approve", by="web", reason=reason
        )
        try:
            await run_in_threadpool(call)
        except BridgeError as exc:
            return _refusal(exc.status, exc.code, exc.message)
        session.flash = f"{'Approved' if decision == 'approve' else 'Denied'} {approval_id}."
        return _see_approvals()

    @router.post(f"{PATH}/{{approval_id}}/approve")
    async def approve(request: Request, approval_id: str) -> Response:
        return await decide(request, approval_id, "approve")

    @router.post(f"{PATH}/{{approval_id}}/deny")
    async def deny(request: Request, approval_id: str) -> Response:
        return await decide(request, approval_id, "deny")

    return router

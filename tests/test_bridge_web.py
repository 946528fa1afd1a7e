"""The approvals page over FastAPI's TestClient, with a fake bridge that records decisions.

Every refusal test checks the host-side evidence: the fake's list of decisions stays empty.
Each also has its control beside it (the same request, made right, does decide), so a test
fails if its block is removed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from corral.bridge import web
from corral.bridge.approvals import PendingApproval
from corral.bridge.errors import BridgeError
from corral.bridge.service import Bridge

if TYPE_CHECKING:
    import httpx2  # what starlette's TestClient returns

TOKEN = "t" * 43
BASE = "http://127.0.0.1:8765"
HOSTILE = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "a\u202egnp.exe",  # right-to-left override: would display as "exe.png"
    "line\nbreak",
    "",
    "$(rm -rf ~); `id` | tee &",
)


class Decision(NamedTuple):
    approval_id: str
    approve: bool
    by: str
    reason: str


class FakeBridge:
    """pending() and decide() as the real Bridge answers them, errors included."""

    def __init__(self, pending: list[PendingApproval]) -> None:
        self.waiting = {item.id: item for item in pending}
        self.decided: set[str] = set()
        self.decisions: list[Decision] = []
        self.listed = 0

    def pending(self) -> tuple[PendingApproval, ...]:
        self.listed += 1
        return tuple(self.waiting.values())

    def decide(self, approval_id: str, *, approve: bool, by: str, reason: str = "") -> None:
        if approval_id in self.decided:
            raise BridgeError("not_pending", f"approval {approval_id} was already decided")
        if approval_id not in self.waiting:
            raise BridgeError("unknown_approval", f"no approval {approval_id}")
        del self.waiting[approval_id]
        self.decided.add(approval_id)
        self.decisions.append(Decision(approval_id, approve, by, reason))


def pending_item(
    approval_id: str = "ap1", argv: tuple[str, ...] = ("make", "deploy")
) -> PendingApproval:
    return PendingApproval(
        id=approval_id,
        job_id=f"job-{approval_id}",
        command="deploy",
        argv=argv,
        cwd="/var/tmp/project",
        policy_summary="mode strict\nnetwork none\nwritable: (none)",
        reason="parameter env matched ^prod$",
        client="http:agent-1",
        created=1_700_000_000.0,
        expires=1_700_000_300.0,
    )


def make_client(
    bridge: web.ApprovalDesk, *, token: str | Callable[[], str | None] = TOKEN
) -> TestClient:
    app = FastAPI()
    app.include_router(web.web_router(bridge, token=token))
    return TestClient(app, base_url=BASE, follow_redirects=False)


@pytest.fixture
def bridge() -> FakeBridge:
    return FakeBridge([pending_item()])


@pytest.fixture
def client(bridge: FakeBridge) -> Iterator[TestClient]:
    with make_client(bridge) as c:
        yield c


def open_page(client: TestClient) -> str:
    """Open a session with the token in the URL; the list page it then shows."""
    assert client.get("/approvals", params={"token": TOKEN}).status_code == 303
    page = client.get("/approvals")
    assert page.status_code == 200
    return page.text


def log_in(client: TestClient) -> str:
    """Open a session; the CSRF token of the page's first form."""
    found = re.search(r'name="csrf" value="([^"]+)"', open_page(client))
    assert found is not None
    return found.group(1)


def post(
    client: TestClient,
    path: str,
    form: Mapping[str, str],
    headers: Mapping[str, str] | None = None,
) -> httpx2.Response:
    return client.post(path, data=dict(form), headers={"Origin": BASE, **(headers or {})})


# --- opening a session ---------------------------------------------------------------------


def test_token_in_url_sets_a_session_cookie_and_leaves_the_url(client: TestClient) -> None:
    response = client.get("/approvals", params={"token": TOKEN})
    assert response.status_code == 303
    assert response.headers["location"] == "/approvals"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{web.COOKIE_NAME}=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/approvals"):
        assert attribute.lower() in cookie.lower()
    value = cookie.split(";")[0].split("=", 1)[1]
    assert TOKEN not in value
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\.[0-9a-f]{64}", value)


def test_login_form_opens_a_session(client: TestClient, bridge: FakeBridge) -> None:
    form = client.get("/approvals")
    assert form.status_code == 401
    assert 'action="/approvals/login"' in form.text
    assert bridge.listed == 0  # nothing is listed to a visitor without a session
    response = post(client, "/approvals/login", {"token": TOKEN})
    assert response.status_code == 303
    page = client.get("/approvals")
    assert page.status_code == 200
    assert "make" in page.text


@pytest.mark.parametrize("how", ["url", "form"])
@pytest.mark.parametrize("offered", ["", "wrong", TOKEN + "x", TOKEN[:-1], "é" * 43])
def test_wrong_token_opens_no_session(client: TestClient, how: str, offered: str) -> None:
    if how == "url":
        response = client.get("/approvals", params={"token": offered})
    else:
        response = client.post("/approvals/login", data={"token": offered})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "not accepted" in response.text
    assert client.get("/approvals").status_code == 401


def test_token_source_rotation_ends_sessions(bridge: FakeBridge) -> None:
    current = [TOKEN]
    with make_client(bridge, token=lambda: current[0]) as client:
        csrf = log_in(client)
        current[0] = "r" * 43
        assert client.get("/approvals").status_code == 401
        refused = post(client, "/approvals/ap1/approve", {"csrf": csrf})
        assert refused.status_code == 401
        current[0] = None  # type: ignore[call-overload]
        assert client.get("/approvals", params={"token": TOKEN}).status_code == 401
    assert bridge.decisions == []


def test_expired_session_is_refused(bridge: FakeBridge, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web, "SESSION_LIFETIME_S", -1)
    with make_client(bridge) as client:
        assert client.get("/approvals", params={"token": TOKEN}).status_code == 303
        assert client.get("/approvals").status_code == 401


# --- deciding ------------------------------------------------------------------------------


@pytest.mark.parametrize(("verb", "approve"), [("approve", True), ("deny", False)])
def test_decision_reaches_the_bridge_and_is_flashed_once(
    client: TestClient, bridge: FakeBridge, verb: str, approve: bool
) -> None:
    csrf = log_in(client)
    response = post(client, f"/approvals/ap1/{verb}", {"csrf": csrf, "reason": " looks fine "})
    assert response.status_code == 303
    assert response.headers["location"] == "/approvals"
    assert bridge.decisions == [Decision("ap1", approve, "web", "looks fine")]
    page = client.get("/approvals").text
    assert f"{'Approved' if approve else 'Denied'} ap1." in page
    assert "Approved ap1." not in client.get("/approvals").text


def test_unknown_approval_is_a_404_page(client: TestClient, bridge: FakeBridge) -> None:
    csrf = log_in(client)
    response = post(client, "/approvals/nope/approve", {"csrf": csrf})
    assert response.status_code == 404
    assert "unknown_approval" in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert bridge.decisions == []


def test_deciding_twice_is_409_not_pending(client: TestClient, bridge: FakeBridge) -> None:
    csrf = log_in(client)
    assert post(client, "/approvals/ap1/approve", {"csrf": csrf}).status_code == 303
    again = post(client, "/approvals/ap1/deny", {"csrf": csrf})
    assert again.status_code == 409
    assert "not_pending" in again.text
    assert bridge.decisions == [Decision("ap1", True, "web", "")]


# --- every refusal of a decision -----------------------------------------------------------

FOREIGN = "http://evil.example"


class Attempt(NamedTuple):
    cookie: str | None  # "keep": the logged-in session's cookie; else this value (None: none)
    csrf: str | None  # "keep": the page's token; else this value (None: field left out)
    headers: Mapping[str, str]


KEEP = "keep"
REFUSALS = {
    "no cookie": (Attempt(None, KEEP, {}), 401, "unauthorized"),
    "forged cookie": (Attempt("a" * 43 + "." + "0" * 64, KEEP, {}), 401, "unauthorized"),
    "cookie without mac": (Attempt("a" * 43, KEEP, {}), 401, "unauthorized"),
    "missing csrf": (Attempt(KEEP, None, {}), 403, "forbidden"),
    "empty csrf": (Attempt(KEEP, "", {}), 403, "forbidden"),
    "wrong csrf": (Attempt(KEEP, "x" * 43, {}), 403, "forbidden"),
    "non-ascii csrf": (Attempt(KEEP, "é" * 43, {}), 403, "forbidden"),
    "foreign origin": (Attempt(KEEP, KEEP, {"Origin": FOREIGN}), 403, "forbidden"),
    "null origin": (Attempt(KEEP, KEEP, {"Origin": "null"}), 403, "forbidden"),
    "other port": (Attempt(KEEP, KEEP, {"Origin": "http://127.0.0.1:9999"}), 403, "forbidden"),
    "https origin": (Attempt(KEEP, KEEP, {"Origin": "https://127.0.0.1:8765"}), 403, "forbidden"),
    "foreign host": (Attempt(KEEP, KEEP, {"Host": "evil.example"}), 403, "forbidden"),
    "rebound host": (
        Attempt(KEEP, KEEP, {"Host": "evil.example:8765", "Origin": "http://evil.example:8765"}),
        403,
        "forbidden",
    ),
}


def attempt_decision(client: TestClient, attempt: Attempt, csrf: str) -> httpx2.Response:
    session = client.cookies.get(web.COOKIE_NAME)
    cookie = session if attempt.cookie == KEEP else attempt.cookie
    client.cookies.clear()
    headers = {"Origin": BASE, **attempt.headers}
    if cookie is not None:
        headers["Cookie"] = f"{web.COOKIE_NAME}={cookie}"
    form = {"reason": "r"}
    if attempt.csrf is not None:
        form["csrf"] = csrf if attempt.csrf == KEEP else attempt.csrf
    return client.post("/approvals/ap1/approve", data=form, headers=headers)


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refused_decisions_decide_nothing(
    client: TestClient, bridge: FakeBridge, name: str
) -> None:
    attempt, status, code = REFUSALS[name]
    response = attempt_decision(client, attempt, log_in(client))
    assert response.status_code == status
    assert code in response.text
    assert bridge.decisions == []
    assert "ap1" in bridge.waiting


def test_control_the_same_request_made_right_decides(
    client: TestClient, bridge: FakeBridge
) -> None:
    response = attempt_decision(client, Attempt(KEEP, KEEP, {}), log_in(client))
    assert response.status_code == 303
    assert bridge.decisions == [Decision("ap1", True, "web", "r")]


def test_csrf_token_of_another_session_is_refused(client: TestClient, bridge: FakeBridge) -> None:
    other_csrf = log_in(client)
    log_in(client)  # a new session replaces the cookie; its CSRF token differs
    response = post(client, "/approvals/ap1/approve", {"csrf": other_csrf})
    assert response.status_code == 403
    assert bridge.decisions == []


def test_session_of_another_server_is_refused(bridge: FakeBridge) -> None:
    with make_client(bridge) as first, make_client(bridge) as second:
        csrf = log_in(first)
        second.cookies.set(web.COOKIE_NAME, first.cookies[web.COOKIE_NAME], path="/approvals")
        assert second.get("/approvals").status_code == 401
        assert post(second, "/approvals/ap1/approve", {"csrf": csrf}).status_code == 401
    assert bridge.decisions == []


def test_no_origin_and_no_referer_is_left_to_session_and_csrf(
    client: TestClient, bridge: FakeBridge
) -> None:
    csrf = log_in(client)
    response = client.post("/approvals/ap1/deny", data={"csrf": csrf})  # as curl sends it
    assert response.status_code == 303
    assert bridge.decisions == [Decision("ap1", False, "web", "")]


@pytest.mark.parametrize(
    ("referer", "status"), [(f"{FOREIGN}/page", 403), (f"{BASE}/approvals", 303)]
)
def test_referer_decides_without_origin(
    client: TestClient, bridge: FakeBridge, referer: str, status: int
) -> None:
    csrf = log_in(client)
    response = client.post(
        "/approvals/ap1/approve", data={"csrf": csrf}, headers={"Referer": referer}
    )
    assert response.status_code == status
    assert len(bridge.decisions) == (1 if status == 303 else 0)


def test_page_refuses_a_foreign_host_even_with_a_session(
    client: TestClient, bridge: FakeBridge
) -> None:
    log_in(client)
    listed = bridge.listed
    response = client.get("/approvals", headers={"Host": "evil.example"})
    assert response.status_code == 403
    assert "make" not in response.text
    assert bridge.listed == listed


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("csrf=x&reason=" + "a" * (web.MAX_FORM_BYTES + 1), None, 413),
        ('{"csrf": "x"}', "application/json", 415),
        ("csrf=CSRF&csrf=CSRF", None, 400),
        ("csrf=CSRF&reason=%ff", None, 400),
        ("csrf=CSRF&reason=" + "a" * (web.MAX_REASON_CHARS + 1), None, 422),
    ],
)
def test_malformed_forms_are_refused(
    client: TestClient, bridge: FakeBridge, body: str, content_type: str | None, status: int
) -> None:
    csrf = log_in(client)
    kind = content_type or "application/x-www-form-urlencoded"
    response = client.post(
        "/approvals/ap1/approve",
        content=body.replace("CSRF", csrf).encode(),
        headers={"Content-Type": kind, "Origin": BASE},
    )
    assert response.status_code == status
    assert bridge.decisions == []


# --- what the page shows -------------------------------------------------------------------


def test_page_shows_exactly_what_would_run(client: TestClient) -> None:
    log_in(client)
    page = client.get("/approvals").text
    items = re.findall(r"<li><code>(.*?)</code></li>", page)
    assert items == ["make", "deploy"]
    for shown in (
        "/var/tmp/project",
        "mode strict",
        "network none",
        "parameter env matched ^prod$",
        "http:agent-1",
        "not through a shell",
        'action="/approvals/ap1/approve"',
        'formaction="/approvals/ap1/deny"',
        '<label for="req-1-reason">',
    ):
        assert shown in page
    assert '<meta http-equiv="refresh"' not in page  # a reload would wipe a reason being typed


def test_empty_list_reloads_itself() -> None:
    with make_client(FakeBridge([])) as client:
        page = open_page(client)
    assert "Nothing is waiting" in page
    assert '<meta http-equiv="refresh" content="5">' in page


def test_hostile_strings_are_escaped_and_made_visible(bridge: FakeBridge) -> None:
    evil = "<script>alert(1)</script>"
    item = pending_item('x"<b>', argv=HOSTILE)._replace(
        command=evil, cwd=evil, client=evil, reason=evil, policy_summary=evil
    )
    with make_client(FakeBridge([item])) as client:
        log_in(client)
        page = client.get("/approvals").text
    assert "<script" not in page
    assert "<img" not in page
    assert "<b>" not in page
    assert "\u202e" not in page  # shown as an escape instead
    items = re.findall(r"<li><code>(.*?)</code></li>", page, flags=re.S)
    assert len(items) == len(HOSTILE)  # one item per argv element, none merged or split
    assert items[0] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert items[1] == "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert "\\u202e" in items[2]
    assert "\\n" in items[3] and "\n" not in items[3]
    assert "(empty string)" in items[4]
    assert items[5] == "$(rm -rf ~); `id` | tee &amp;"
    assert 'action="/approvals/x%22%3Cb%3E/approve"' in page


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    responses = [
        client.get("/approvals"),  # login form
        client.get("/approvals", params={"token": "wrong"}),
        client.get("/approvals", headers={"Host": "evil.example"}),
        client.get("/approvals", params={"token": TOKEN}),  # redirect
        client.get("/approvals"),  # the list
        client.post("/approvals/ap1/approve", data={}),  # refusal page
    ]
    for response in responses:
        for name, value in web.SECURITY_HEADERS.items():
            assert response.headers[name] == value
    policy = web.SECURITY_HEADERS["Content-Security-Policy"]
    for directive in ("default-src 'none'", "form-action 'self'", "frame-ancestors 'none'"):
        assert directive in policy
    assert "script-src" not in policy and "unsafe" not in policy
    assert web.SECURITY_HEADERS["X-Frame-Options"] == "DENY"
    assert web.SECURITY_HEADERS["Cache-Control"] == "no-store"


def test_the_inline_style_matches_its_csp_hash(client: TestClient) -> None:
    log_in(client)
    style = re.search(r"<style>(.*?)</style>", client.get("/approvals").text, flags=re.S)
    assert style is not None
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    assert f"'sha256-{digest}'" in web.SECURITY_HEADERS["Content-Security-Policy"]


def test_pages_stay_out_of_the_openapi_document(client: TestClient) -> None:
    assert client.get("/openapi.json").json().get("paths", {}) == {}


def test_empty_token_is_refused_at_construction(bridge: FakeBridge) -> None:
    with pytest.raises(ValueError, match="token"):
        web.web_router(bridge, token="")


# --- the pure checks, accepted and refused halves ------------------------------------------

HOSTS_ACCEPTED = ["127.0.0.1", "127.0.0.1:8765", "localhost", "LOCALHOST:80", "[::1]", "[::1]:1"]
HOSTS_REFUSED = [
    "",
    "evil.example",
    "127.0.0.1.evil.example",
    "localhost.",
    "localhost.evil.example",
    "::1",
    "[::1",
    "127.0.0.1:99999",
    "127.0.0.1:x",
    "user@127.0.0.1",
    "127.0.0.1/x",
    "127.0.0.1 ",
    "127.1",
    "0.0.0.0",
    "[::ffff:127.0.0.1]",
]


@pytest.mark.parametrize("host", HOSTS_ACCEPTED)
def test_host_accepted(host: str) -> None:
    assert web.host_allowed(host)


@pytest.mark.parametrize("host", HOSTS_REFUSED)
def test_host_refused(host: str) -> None:
    assert not web.host_allowed(host)


OWN = "http://127.0.0.1:8765"
ORIGINS = [
    (OWN, None, True),
    ("http://127.0.0.1:8765/", None, True),
    (None, "http://127.0.0.1:8765/approvals?x=1", True),
    (None, None, True),
    ("HTTP://127.0.0.1:8765", None, True),
    ("null", None, False),
    ("", None, False),
    ("http://127.0.0.1", None, False),
    ("http://localhost:8765", None, False),
    ("https://127.0.0.1:8765", None, False),
    ("http://127.0.0.1:8765.evil.example", None, False),
    ("http://evil.example", OWN, False),  # Origin decides when present
    (None, "http://evil.example/approvals", False),
    (None, "about:blank", False),
]


@pytest.mark.parametrize(("origin", "referer", "allowed"), ORIGINS)
def test_origin(origin: str | None, referer: str | None, allowed: bool) -> None:
    assert web.origin_allowed(origin=origin, referer=referer, own=OWN) is allowed


def test_origin_with_default_port() -> None:
    assert web.origin_allowed(origin="http://localhost", referer=None, own="http://localhost:80")


# --- with the real Bridge (a denial runs nothing, so no sandbox is needed) -----------------

ASK_SETTINGS = {
    "bridge": {
        "commands": {
            "mark": {
                "description": "Leave a marker file in the workspace",
                "argv": ["touch", "{name}"],
                "params": {"name": {"type": "string", "pattern": "[a-z-]+[.]txt"}},
                "writable": True,
                "approval": "ask",
            }
        }
    }
}


def test_real_bridge_denial_through_the_page(tmp_path: Path) -> None:
    workspace, home = tmp_path / "project", tmp_path / "home"
    (workspace / ".corral").mkdir(parents=True)
    home.mkdir()
    (workspace / ".corral" / "settings.json").write_text(json.dumps(ASK_SETTINGS))
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    with Bridge.from_settings(str(workspace), state_dir=str(home / "state"), environ=env) as real:
        job = real.submit("mark", {"name": "never.txt"}, client="test:web")
        assert job.state == "awaiting_approval" and job.approval_id is not None
        with make_client(real) as client:
            items = re.findall(r"<li><code>(.*?)</code></li>", open_page(client))
            assert items == list(job.argv)
            csrf = log_in(client)
            assert post(client, "/approvals/nope/deny", {"csrf": csrf}).status_code == 404
            path = f"/approvals/{job.approval_id}/deny"
            assert post(client, path, {"csrf": csrf, "reason": "not now"}).status_code == 303
            assert post(client, path, {"csrf": csrf}).status_code == 409
        done = real.wait(job.id, timeout_s=30)
    assert done.state == "denied"
    assert "web" in done.reason and "not now" in done.reason
    assert not (workspace / "never.txt").exists()

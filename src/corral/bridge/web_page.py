"""The HTML of the approvals page (web.py serves it): plain server-rendered pages, no script.

Rules:
1. Every string that did not come from this module goes through `_visible` (or
   `_visible_lines`): HTML-escaped, and characters that print as nothing or as something else
   (controls, newlines inside an argument, bidi overrides, zero-width and non-breaking spaces)
   shown as red escapes such as `\\u202e`, so what the human reads is what would run.
2. argv is a numbered list, one element per item, said to be passed without a shell.
3. The style sheet is inline and allowed by its hash (STYLE_HASH, in the CSP); nothing else is
   allowed to load or run.
4. The list reloads itself (meta refresh) only while it is empty: once a request waits, a reload
   would wipe a reason being typed, and the page after each decision is fresh anyway.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from html import escape
from typing import Protocol
from urllib.parse import quote

MAX_REASON_CHARS = 500
REFRESH_SECONDS = 5

CSS = """\
body{font:16px/1.45 system-ui,sans-serif;margin:0 auto;max-width:62rem;padding:1rem;\
color:#111;background:#fff}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin:0 0 .5rem}
.request{border:1px solid #888;border-radius:6px;padding:1rem;margin:1rem 0}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem;margin:0 0 1rem}
dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}
code{font-family:ui-monospace,monospace;background:#f1f1f1;padding:0 .2rem;white-space:pre-wrap}
.argv{margin:0;padding-left:2.2rem}.argv li{margin:.1rem 0}
.note{margin:.3rem 0 0;font-size:.9rem;color:#444}
.esc{color:#b00000;font-weight:700}
.flash{background:#e7f4e7;border:1px solid #5a5;padding:.5rem}
.problem{background:#fbe9e9;border:1px solid #a55;padding:.5rem}
label{display:block;margin:.3rem 0}input[type=text],input[type=password]{width:100%;\
max-width:30rem;font-size:1rem;padding:.3rem}
button{font-size:1rem;padding:.4rem 1.2rem;margin:.6rem .6rem 0 0;border-radius:4px;\
border:1px solid #333;cursor:pointer}
.approve{background:#1d6b2c;color:#fff}.deny{background:#8c1c13;color:#fff}
"""
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()


class PendingView(Protocol):
    """The fields of `service.PendingApproval` the page shows (tests pass look-alikes)."""

    @property
    def id(self) -> str: ...
    @property
    def job_id(self) -> str: ...
    @property
    def command(self) -> str: ...
    @property
    def argv(self) -> tuple[str, ...]: ...
    @property
    def cwd(self) -> str: ...
    @property
    def policy_summary(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def created(self) -> float: ...
    @property
    def expires(self) -> float: ...


def _visible(text: str) -> str:
    """`text` escaped for HTML, with every non-printable character written as an escape."""
    if text == "":
        return '<span class="esc">(empty string)</span>'
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(escape(ch))
        else:
            shown = ch.encode("unicode_escape").decode("ascii")
            out.append(f'<span class="esc" title="invisible character">{escape(shown)}</span>')
    return "".join(out)


def _visible_lines(text: str) -> str:
    """Like `_visible` for prose that may have several lines (a policy summary)."""
    return "<br>".join(_visible(line) if line else "" for line in text.split("\n"))


def _duration(seconds: float) -> str:
    whole = round(abs(seconds))
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _when(stamp: float, *, now: float) -> str:
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
    delta = stamp - now
    relative = f"in {_duration(delta)}" if delta >= 0 else f"{_duration(delta)} ago"
    return f'<time datetime="{iso}">{local}</time> ({relative})'


def _document(title: str, body: str, *, refresh_s: int = 0) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">\n' if refresh_s else ""
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"{refresh}<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}</main>\n</body>\n</html>\n"
    )


def _argv(argv: Sequence[str]) -> str:
    items = "".join(f"<li><code>{_visible(arg)}</code></li>\n" for arg in argv)
    return (
        f'<ol class="argv" aria-label="Program and arguments, one per item">\n{items}</ol>\n'
        '<p class="note">Run directly, not through a shell: each item is one argument, passed '
        "exactly as written. No quoting, globbing, variables or redirections apply.</p>"
    )


def _request(index: int, item: PendingView, *, csrf: str, now: float) -> str:
    key = f"req-{index}"
    target = f"/approvals/{quote(item.id, safe='')}"
    facts = (
        ("Program and arguments", _argv(item.argv)),
        ("Working directory", f"<code>{_visible(item.cwd)}</code>"),
        ("Sandbox policy", _visible_lines(item.policy_summary)),
        ("Why it needs you", _visible_lines(item.reason)),
        ("Asked by", _visible(item.client)),
        ("Asked at", _when(item.created, now=now)),
        ("Expires", f"{_when(item.expires, now=now)}; then it is denied"),
        ("Request", f"approval <code>{_visible(item.id)}</code>, job "
                    f"<code>{_visible(item.job_id)}</code>"),
    )  # fmt: skip
    rows = "".join(f"<dt>{name}</dt>\n<dd>{value}</dd>\n" for name, value in facts)
    return (
        f'<article class="request" aria-labelledby="{key}-title">\n'
        f'<h2 id="{key}-title">Run <code>{_visible(item.command)}</code></h2>\n'
        f"<dl>\n{rows}</dl>\n"
        f'<form method="post" action="{escape(target)}/approve">\n'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">\n'
        f'<label for="{key}-reason">Reason (optional, kept in the audit log)</label>\n'
        f'<input type="text" id="{key}-reason" name="reason" maxlength="{MAX_REASON_CHARS}" '
        'autocomplete="off">\n'
        f'<button type="submit" class="approve" aria-describedby="{key}-title">Approve</button>'
        f'<button type="submit" class="deny" formaction="{escape(target)}/deny" '
        f'aria-describedby="{key}-title">Deny</button>\n'
        "</form>\n</article>\n"
    )


def approvals_page(pending: Sequence[PendingView], *, csrf: str, flash: str, now: float) -> str:
    """The list of pending requests, each with its Approve and Deny buttons."""
    parts = ["<h1>corral: requests waiting for your approval</h1>\n"]
    if flash:
        parts.append(f'<p class="flash" role="status">{_visible(flash)}</p>\n')
    if not pending:
        parts.append(
            f"<p>Nothing is waiting. This page reloads every {REFRESH_SECONDS} seconds.</p>\n"
        )
    else:
        count = f"{len(pending)} request{'s' if len(pending) != 1 else ''}"
        parts.append(
            f"<p>{count} waiting. New requests show after a decision or when you "
            '<a href="/approvals">reload</a>.</p>\n'
        )
    parts += [_request(i, item, csrf=csrf, now=now) for i, item in enumerate(pending, 1)]
    title = f"corral approvals ({len(pending)} waiting)"
    return _document(title, "".join(parts), refresh_s=0 if pending else REFRESH_SECONDS)


def login_page(problem: str) -> str:
    """The token form; `problem` says why the last attempt failed (empty on first view)."""
    shown = f'<p class="problem" role="alert">{_visible(problem)}</p>\n' if problem else ""
    return _document(
        "corral approvals: sign in",
        "<h1>corral approvals</h1>\n"
        f"{shown}"
        "<p>Enter the bridge token; <code>corral token</code> prints it.</p>\n"
        '<form method="post" action="/approvals/login">\n'
        '<label for="token">Bridge token</label>\n'
        '<input type="password" id="token" name="token" autocomplete="off" required>\n'
        '<button type="submit">Open</button>\n</form>\n',
    )


def error_page(status: int, code: str, message: str) -> str:
    """Why a request was refused, with its stable code and the way back."""
    return _document(
        f"corral approvals: {status}",
        f"<h1>Not done</h1>\n"
        f'<p class="problem" role="alert">{_visible(message)}</p>\n'
        f"<p>Status {status}, code <code>{_visible(code)}</code>.</p>\n"
        '<p><a href="/approvals">Back to the approvals</a></p>\n',
    )

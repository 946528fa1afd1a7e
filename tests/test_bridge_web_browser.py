"""The approvals flow end to end in a real browser: Debian's Chromium driven by Playwright,
the bridge's FastAPI app (`create_app`, with the page mounted) served by uvicorn on an ephemeral
127.0.0.1 port, and the real Bridge running a declared `ask` command in a corral sandbox.

The evidence is on the host: the marker file the approved request creates exists, the one of
the denied request does not, and the jobs end `succeeded` and `denied` (with the reason typed
in the page). A screenshot of the page with both requests waiting is kept as
`approvals-page.png` in $CORRAL_TEST_ARTIFACTS, else tests/artifacts/.

Without playwright or Chromium the test is skipped loudly, and fails under
CORRAL_REQUIRE_SANDBOX=1 (as the sandbox tests do, see conftest.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import uvicorn
from fastapi import FastAPI

from corral.bridge.http_api import create_app
from corral.bridge.service import Bridge
from tests.conftest import Layout

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # Chromium's own sandbox cannot start as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "browser-test-token-" + "x" * 32
# Bounds, not schedules: every wait below returns as soon as its condition holds.
JOB_DEADLINE_S = 60.0
PAGE_DEADLINE_MS = 15_000

SETTINGS = {
    "bridge": {
        "approvalTimeoutSeconds": 600,
        "commands": {
            "mark": {
                "description": "Leave a marker file in the workspace",
                "argv": ["touch", "{name}"],
                "params": {"name": {"type": "string", "pattern": "[a-z-]+[.]txt"}},
                "writable": True,
                "approval": "ask",
            }
        },
    }
}


def _browser_problem() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"playwright is not installed: {exc}"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser_available() -> None:
    problem = _browser_problem()
    if problem is None:
        return
    if os.environ.get("CORRAL_REQUIRE_SANDBOX"):
        pytest.fail(f"browser required but unavailable: {problem}")
    pytest.skip(f"BROWSER TESTS SKIPPED: {problem}")


@pytest.fixture
def browser(browser_available: None) -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class LiveServer:
    """uvicorn on a thread. The socket listens before uvicorn starts, so the browser's first
    connection waits in the backlog instead of racing the start-up."""

    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def artifacts_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    directory = os.environ.get("CORRAL_TEST_ARTIFACTS") or os.path.join(here, "artifacts")
    os.makedirs(directory, exist_ok=True)
    return directory


def attacker_app(target: str, csrf: str) -> FastAPI:
    """Another local server (same site, other port) whose page posts a decision to the bridge
    as soon as it loads, with the victim's real CSRF token, as if it had leaked."""
    from fastapi.responses import HTMLResponse

    app = FastAPI()

    @app.get("/")
    def page() -> HTMLResponse:
        return HTMLResponse(
            f'<form method="post" action="{target}"><input name="csrf" value="{csrf}"></form>'
            "<script>document.forms[0].submit()</script>"
        )

    return app


@pytest.mark.sandbox
def test_approve_and_deny_in_a_real_browser(
    sandbox_available: None, layout: Layout, browser: Browser
) -> None:
    from playwright.sync_api import expect

    os.makedirs(f"{layout.workspace}/.corral")
    with open(f"{layout.workspace}/.corral/settings.json", "w") as f:
        json.dump(SETTINGS, f)
    approved_marker = f"{layout.workspace}/approved.txt"
    denied_marker = f"{layout.workspace}/denied.txt"
    bridge = Bridge.from_settings(
        layout.workspace, state_dir=f"{layout.home}/.local/state/corral", environ=layout.env
    )
    with bridge, LiveServer(create_app(bridge, token=TOKEN)) as server:
        yes = bridge.submit("mark", {"name": "approved.txt"}, client="test:browser")
        no = bridge.submit("mark", {"name": "denied.txt"}, client="test:browser")
        assert yes.approval_id is not None and no.approval_id is not None
        assert (yes.state, no.state) == ("awaiting_approval", "awaiting_approval")

        context = browser.new_context()  # one user's browser: its tabs share the cookies
        context.set_default_timeout(PAGE_DEADLINE_MS)
        page = context.new_page()
        page.goto(f"{server.url}/approvals?token={TOKEN}")
        assert page.url == f"{server.url}/approvals"  # the token left the address bar
        cookies = context.cookies()
        assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
            ("corral_approvals", True, "Strict")
        ]
        assert TOKEN not in cookies[0]["value"]

        first = page.locator("article.request").filter(has_text=yes.approval_id)
        second = page.locator("article.request").filter(has_text=no.approval_id)
        assert first.locator("ol.argv li").all_inner_texts() == list(yes.argv)
        assert second.locator("ol.argv li").all_inner_texts() == list(no.argv)
        expect(first).to_contain_text("not through a shell")
        expect(first).to_contain_text(layout.workspace)
        expect(first).to_contain_text("test:browser")
        page.screenshot(path=os.path.join(artifacts_dir(), "approvals-page.png"), full_page=True)

        # A page on another local port, same site (the cookie goes along), with the right
        # CSRF token: refused by the Origin check alone. Nothing is decided.
        csrf = page.locator("input[name=csrf]").first.get_attribute("value")
        assert csrf
        target = f"{server.url}/approvals/{yes.approval_id}/approve"
        with LiveServer(attacker_app(target, csrf)) as attacker:
            attack = context.new_page()
            attack.goto(attacker.url)
            attack.wait_for_url(lambda url: url.startswith(server.url))
            assert attack.url == target  # not redirected to the list: refused
            expect(attack.get_by_role("alert")).to_contain_text("another site")
        assert {p.id for p in bridge.pending()} == {yes.approval_id, no.approval_id}

        first.get_by_role("button", name="Approve").click()
        expect(page.get_by_role("status")).to_have_text(f"Approved {yes.approval_id}.")
        done = bridge.wait(yes.id, timeout_s=JOB_DEADLINE_S)
        assert (done.state, done.exit_code) == ("succeeded", 0), done
        assert os.path.exists(approved_marker)

        second = page.locator("article.request").filter(has_text=no.approval_id)
        second.get_by_label("Reason").fill("not on a Friday")
        second.get_by_role("button", name="Deny").click()
        expect(page.get_by_role("status")).to_have_text(f"Denied {no.approval_id}.")
        refused = bridge.wait(no.id, timeout_s=JOB_DEADLINE_S)
        assert refused.state == "denied", refused
        assert "web" in refused.reason and "not on a Friday" in refused.reason
        expect(page.locator("main")).to_contain_text("Nothing is waiting")

    assert not os.path.exists(denied_marker)
    assert os.path.exists(approved_marker)

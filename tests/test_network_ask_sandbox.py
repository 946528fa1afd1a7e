"""The question for unknown hosts with real clients in real sandboxes: the answer decides what
the server sees and what the audit records, "always" holds for the next command and lands in
settings.local.json; and `corral run`, whose command shares the terminal, asks nothing, denies,
and says so once. Evidence is host-side: what the servers received."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from corral.ask import TerminalAsk
from corral.audit.events import MemorySink
from corral.sandbox import Sandbox
from tests.conftest import Layout
from tests.helpers_cli import Terminal, corral_run, run_cli, write_settings
from tests.test_network_ask import ScriptedTerminal
from tests.test_network_support import filtered_policy, resolve
from tests.test_proxy_support import ALLOWED_ADDRESS, LoopbackServer

pytestmark = pytest.mark.usefixtures("sandbox_available")

ASKED = "asked.test"


def resolve_asked(host: str) -> list[str]:
    """`asked.test` is in neither list and leads to the allowed server (whose address is
    allowed, so only the answer decides)."""
    return [ALLOWED_ADDRESS] if host == ASKED else resolve(host)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    made = LoopbackServer("allowed", ALLOWED_ADDRESS)
    yield made
    made.close()


def _curl(sandbox: Sandbox, layout: Layout, url: str) -> int:
    argv = ["curl", "-sS", "-f", "-m", "20", "-o", "/dev/null", url]
    return sandbox.run(argv, env=layout.env, capture_output=True, timeout=60).returncode


@pytest.mark.parametrize(("typed", "reached"), [("o", True), ("d", False), (None, False)])
def test_the_answer_decides(
    layout: Layout, server: LoopbackServer, typed: str | None, reached: bool
) -> None:
    terminal = ScriptedTerminal(typed)
    settings = f"{layout.workspace}/.corral/settings.local.json"
    ask = TerminalAsk(settings, open_terminal=lambda: terminal)
    sink = MemorySink()
    with Sandbox(filtered_policy(layout), sink=sink, resolver=resolve_asked, ask=ask) as sandbox:
        code = _curl(sandbox, layout, f"http://{ASKED}:{server.port}/asked")
    assert (code == 0) is reached
    assert (b"GET /asked HTTP/1.1" in server.requests) is reached
    events = [e.fields for e in sink.of_kind("network")]
    assert [(e["host"], e["rule"]) for e in events] == [
        (ASKED, "ask: once" if reached else "ask: deny")
    ]
    detail = {"o": "answered once", "d": "answered deny", None: "no answer within 60 s"}[typed]
    assert detail in str(events[0]["reason"])


@pytest.mark.parametrize("corral_directory", [True, False], ids=["with .corral", "without"])
def test_always_holds_for_the_next_command_and_is_saved(
    layout: Layout, server: LoopbackServer, corral_directory: bool
) -> None:
    settings = f"{layout.workspace}/.corral/settings.local.json"
    if corral_directory:
        os.makedirs(os.path.dirname(settings))
    terminal = ScriptedTerminal("a")  # one answer only: a second question would deny
    ask = TerminalAsk(settings, open_terminal=lambda: terminal)
    sink = MemorySink()
    with Sandbox(filtered_policy(layout), sink=sink, resolver=resolve_asked, ask=ask) as sandbox:
        codes = [_curl(sandbox, layout, f"http://{ASKED}:{server.port}/{n}") for n in (1, 2)]
    ask.close()  # as `corral run` does once its command has ended
    assert codes == [0, 0]
    assert server.requests == [b"GET /1 HTTP/1.1", b"GET /2 HTTP/1.1"]
    assert terminal.written.count("Allow it?") == 1
    assert [e.fields["rule"] for e in sink.of_kind("network")] == [
        "ask: always",
        "allowedDomains: asked.test",
    ]
    with open(settings) as f:
        assert json.load(f) == {"network": {"allowedDomains": [ASKED]}}


# --- corral run ------------------------------------------------------------------------------

CURL_BOTH = (
    "for h in listed.test unknown.test other-unknown.test; do curl -sS -m 20 http://$h/; done"
)
NOTE = b'corral: network.unknownDomains is "ask", but '


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    """corral's upstream proxy in these runs: every target corral lets through is CONNECTed
    here by name, so its requests are the list of what got out."""
    made = LoopbackServer("upstream", "127.0.0.1")
    yield made
    made.close()


def assert_only_listed_got_out(upstream: LoopbackServer) -> None:
    connects = [r for r in upstream.requests if r.startswith(b"CONNECT")]
    assert connects == [b"CONNECT listed.test:80 HTTP/1.1"]
    assert b"unknown" not in upstream.received


def _ask_settings(layout: Layout, upstream: LoopbackServer) -> None:
    network = {
        "access": "filtered",
        "unknownDomains": "ask",
        "allowedDomains": ["listed.test"],
        "upstreamProxy": f"http://127.0.0.1:{upstream.port}",
    }
    write_settings(layout, {"network": network})


def test_corral_run_sharing_the_terminal_denies_and_says_so_once(
    layout: Layout, upstream: LoopbackServer
) -> None:
    _ask_settings(layout, upstream)
    with Terminal(
        corral_run("--", "bash", "-c", CURL_BOTH), cwd=layout.workspace, env=layout.env
    ) as tty:
        tty.finish()
    assert_only_listed_got_out(upstream)
    assert tty.output.count(NOTE) == 1, tty.output
    assert b"the command shares this terminal and would read the answer" in tty.output
    assert b"Allow it?" not in tty.output
    assert b"blocked connection to unknown.test:80" in tty.output
    assert b"blocked connection to other-unknown.test:80" in tty.output


def test_corral_run_without_a_terminal_denies_and_says_so_once(
    layout: Layout, upstream: LoopbackServer
) -> None:
    _ask_settings(layout, upstream)
    done = run_cli(layout, "--", "bash", "-c", CURL_BOTH)
    assert_only_listed_got_out(upstream)
    assert done.stderr.count(NOTE) == 1, done.stderr
    assert b"there is no terminal to ask on" in done.stderr


def test_corral_run_asks_on_its_terminal_when_the_command_does_not_share_it(
    layout: Layout, upstream: LoopbackServer
) -> None:
    # An agent's tool call: corral belongs to a terminal, the command's stdin is not it.
    _ask_settings(layout, upstream)
    script = "curl -sS -m 20 http://unknown.test/ >/dev/null; echo done"
    command = " ".join(corral_run("--", "bash", "-c", f"'{script}'"))
    with Terminal(
        ["sh", "-c", f"exec {command} < /dev/null"], cwd=layout.workspace, env=layout.env
    ) as tty:
        tty.expect(b"Allow it?")
        tty.send(b"o\n")
        tty.expect(b"done")
        tty.finish()
    connects = [r for r in upstream.requests if r.startswith(b"CONNECT")]
    assert connects == [b"CONNECT unknown.test:80 HTTP/1.1"]

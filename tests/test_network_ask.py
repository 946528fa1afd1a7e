"""The terminal question for hosts in neither domain list (`corral.ask`): when it is put, how
answers are read, what "always" writes, and one question through a real pseudo-terminal.
Most tests answer through `ScriptedTerminal`, a fake that replays typed lines."""

from __future__ import annotations

import json
import os
import select
import stat
import threading
import time
from collections.abc import Iterator

import pytest

from corral.ask import (
    NotAsked,
    TerminalAsk,
    TtyTerminal,
    add_allowed_domain,
    ask_for_run,
    ask_mode,
    parse_answer,
)
from corral.errors import SettingsError
from corral.policy.model import NetworkPolicy
from corral.policy.presets import preset_policy
from corral.proxy.decision import Answer, Request, decision_from_answer
from corral.proxy.notice import denial_line
from tests.conftest import Layout

DEADLINE = 20.0  # a hang, not slowness, if any wait here reaches it


def request(host: str = "new.example", port: int = 443) -> Request:
    return Request(host, port, "connect", "sandbox-1")


class ScriptedTerminal:
    """Replays `lines` (None: no answer in time) and keeps everything written."""

    def __init__(self, *lines: str | None) -> None:
        self.lines = list(lines)
        self.written = ""
        self.calls: list[str] = []
        self.closed = False

    def write(self, text: str) -> None:
        self.written += text
        self.calls.append("write")

    def read_line(self, timeout: float) -> str | None:
        self.calls.append("read")
        return self.lines.pop(0) if self.lines else None

    def discard_input(self) -> None:
        self.calls.append("discard")

    def interrupt(self) -> None:
        self.calls.append("interrupt")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def settings_file(tmp_path: object) -> str:
    return f"{tmp_path}/ws/.corral/settings.local.json"


def asker(settings_file: str, terminal: ScriptedTerminal) -> TerminalAsk:
    return TerminalAsk(settings_file, open_terminal=lambda: terminal)


# --- when a question is put ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("has_terminal", "session", "mode"),
    [
        (True, "new", "prompt"),
        (True, "inherit", "shares-terminal"),
        (False, "new", "no-terminal"),
        (False, "inherit", "no-terminal"),
    ],
)
def test_ask_mode(has_terminal: bool, session: str, mode: str) -> None:
    assert ask_mode(has_terminal=has_terminal, session=session) == mode  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("unknown_domains", "has_terminal", "session", "expected"),
    [
        ("deny", True, "new", type(None)),
        ("ask", True, "new", TerminalAsk),
        ("ask", True, "inherit", NotAsked),
        ("ask", False, "new", NotAsked),
    ],
)
def test_ask_for_run(
    layout: Layout, unknown_domains: str, has_terminal: bool, session: str, expected: type
) -> None:
    policy = preset_policy("standard", layout.host())
    network = NetworkPolicy("filtered", unknown_domains=unknown_domains)  # type: ignore[arg-type]
    callback = ask_for_run(
        policy._replace(network=network),
        has_terminal=has_terminal,
        session=session,  # type: ignore[arg-type]
        quiet=True,
    )
    assert type(callback) is expected
    if isinstance(callback, TerminalAsk):
        assert callback.settings_file == f"{layout.workspace}/.corral/settings.local.json"


def test_not_asked_denies_and_says_why_once() -> None:
    said: list[str] = []
    callback = NotAsked("shares-terminal", notify=said.append)
    answers = [callback(request("a.example")), callback(request("b.example"))]
    assert [a.choice for a in answers] == ["deny", "deny"]
    why = "the command shares this terminal and would read the answer"
    assert answers[0].detail == f"not asked, as {why}"
    assert said == [
        'corral: network.unknownDomains is "ask", but the command shares this terminal and '
        "would read the answer: hosts network.allowedDomains does not list are denied"
    ]


# --- reading answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        ("", "deny"),
        ("o", "once"),
        (" Once \n", "once"),
        ("a", "always"),
        ("ALWAYS", "always"),
        ("d", "deny"),
        ("no", "deny"),
        ("yes", None),
        ("oa", None),
        ("allow", None),
        ("o\x1b[2J", None),
    ],
)
def test_parse_answer(line: str, answer: str | None) -> None:
    assert parse_answer(line) == answer


@pytest.mark.parametrize(
    ("lines", "choice", "detail"),
    [
        (["o"], "once", "answered once at the terminal"),
        (["d"], "deny", "answered deny at the terminal"),
        ([""], "deny", "answered deny at the terminal"),
        (["maybe", "o"], "once", "answered once at the terminal"),
        ([None], "deny", "no answer within 60 s"),
        (["maybe", None], "deny", "no answer within 60 s"),
    ],
)
def test_terminal_answers(
    settings_file: str, lines: list[str | None], choice: str, detail: str
) -> None:
    terminal = ScriptedTerminal(*lines)
    assert asker(settings_file, terminal)(request()) == Answer(choice, detail)
    assert terminal.calls[:2] == ["discard", "write"]  # typed-ahead input never answers
    assert "connect to new.example:443" in terminal.written
    assert not os.path.exists(settings_file)


def test_the_question_shows_the_host_as_allowed_domains_spells_it(settings_file: str) -> None:
    # Punycode: a look-alike from another script shows as what it is.
    terminal = ScriptedTerminal("d")
    asker(settings_file, terminal)(request("B\u00fccher.example.", 8443))
    assert "connect to xn--bcher-kva.example:8443," in terminal.written


def test_questions_are_asked_one_at_a_time(settings_file: str) -> None:
    inside = threading.Event()
    release = threading.Event()
    overlaps: list[int] = []
    active = [0]

    class Slow(ScriptedTerminal):
        def read_line(self, timeout: float) -> str | None:
            active[0] += 1
            overlaps.append(active[0])
            inside.set()
            release.wait(DEADLINE)
            active[0] -= 1
            return "o"

    callback = asker(settings_file, Slow())
    threads = [threading.Thread(target=callback, args=(request(f"h{i}.example"),)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    assert inside.wait(DEADLINE)
    release.set()
    for thread in threads:
        thread.join(DEADLINE)
    assert overlaps == [1, 1]


def test_after_close_nothing_is_asked(settings_file: str) -> None:
    terminal = ScriptedTerminal("o")
    callback = asker(settings_file, terminal)
    callback(request("first.example"))
    callback.close()
    assert callback(request("second.example")) == Answer("deny", "the run was ending")
    assert terminal.closed and "interrupt" in terminal.calls


def test_no_terminal_denies(settings_file: str) -> None:
    def no_tty() -> ScriptedTerminal:
        raise OSError(6, "No such device or address")

    answer = TerminalAsk(settings_file, open_terminal=no_tty)(request())
    assert answer == Answer("deny", "the terminal could not be used: No such device or address")


# --- "always" --------------------------------------------------------------------------------


def test_always_creates_the_settings_file(settings_file: str) -> None:
    os.makedirs(os.path.dirname(settings_file))
    terminal = ScriptedTerminal("a")
    answer = asker(settings_file, terminal)(request("New.Example."))
    where = f"network.allowedDomains in {settings_file}"
    assert answer == Answer("always", f"answered always; added to {where}")
    with open(settings_file) as f:
        assert json.load(f) == {"network": {"allowedDomains": ["new.example"]}}
    assert f"new.example is now in network.allowedDomains in {settings_file}" in terminal.written


def test_always_without_a_corral_directory_waits_for_the_command_to_end(
    settings_file: str,
) -> None:
    # While a command runs, a missing .corral is an empty placeholder file the sandbox sees
    # as /dev/null; the directory is made only once the command is gone.
    directory = os.path.dirname(settings_file)
    os.makedirs(os.path.dirname(directory))
    with open(directory, "w"):
        pass  # the placeholder
    terminal = ScriptedTerminal("a", "a")
    callback = asker(settings_file, terminal)
    answers = [callback(request("one.example")), callback(request("two.example"))]
    where = f"network.allowedDomains in {settings_file}"
    later = f"answered always; to be added to {where} when the command ends"
    assert answers == [Answer("always", later)] * 2
    assert os.path.isfile(directory) and os.path.getsize(directory) == 0  # left alone
    os.unlink(directory)  # the command ended: its placeholders are gone
    callback.close()
    with open(settings_file) as f:
        assert json.load(f) == {"network": {"allowedDomains": ["one.example", "two.example"]}}
    assert f"corral: added two.example to {settings_file}" in terminal.written


def test_always_keeps_every_other_key(settings_file: str) -> None:
    os.makedirs(os.path.dirname(settings_file))
    before = {
        "mode": "strict",
        "network": {"access": "filtered", "allowedDomains": ["a.example"], "hostPorts": [5432]},
        "filesystem": {"denyRead": ["~/secret"]},
    }
    with open(settings_file, "w") as f:
        json.dump(before, f)
    os.chmod(settings_file, 0o600)
    assert add_allowed_domain(settings_file, "b.example") is True
    assert add_allowed_domain(settings_file, "b.example") is False  # listed once only
    with open(settings_file) as f:
        after = json.load(f)
    before["network"]["allowedDomains"] = ["a.example", "b.example"]  # type: ignore[index]
    assert after == before
    assert stat.S_IMODE(os.stat(settings_file).st_mode) == 0o600
    assert os.listdir(os.path.dirname(settings_file)) == ["settings.local.json"]  # no temp left


@pytest.mark.parametrize(
    "content",
    ['{"network": {"allowedDomains": ["a.example"]', "[]", '{"network": {"allowedDomains": 3}}'],
    ids=["truncated", "not an object", "wrong type"],
)
def test_always_refuses_a_broken_file_and_denies(settings_file: str, content: str) -> None:
    os.makedirs(os.path.dirname(settings_file))
    with open(settings_file, "w") as f:
        f.write(content)
    terminal = ScriptedTerminal("a")
    answer = asker(settings_file, terminal)(request())
    assert answer.choice == "deny"
    assert answer.detail.startswith(f"answered always, but it could not be saved: {settings_file}")
    assert "corral: cannot save the answer: " in terminal.written
    with open(settings_file) as f:
        assert f.read() == content  # untouched


def test_always_refuses_a_symbolic_link(settings_file: str, tmp_path: object) -> None:
    target = f"{tmp_path}/elsewhere.json"
    with open(target, "w") as f:
        f.write('{"secret": "value"}')
    os.makedirs(os.path.dirname(settings_file))
    os.symlink(target, settings_file)
    with pytest.raises(SettingsError, match="symbolic link"):
        add_allowed_domain(settings_file, "new.example")
    with open(target) as f:
        assert f.read() == '{"secret": "value"}'


# --- the audit record and the terminal line ----------------------------------------------------


def test_the_answer_is_in_the_decision_and_the_denial_line() -> None:
    decision = decision_from_answer(request(), Answer("deny", "no answer within 60 s"))
    assert decision.rule == "ask: deny"
    assert decision.reason == "new.example was denied: no answer within 60 s"
    fields = {"host": "new.example", "port": 443, "decision": "deny", **decision._asdict()}
    line = denial_line(fields, settings_file="/ws/.corral/settings.local.json")
    assert line == (
        "corral: blocked connection to new.example:443 (new.example was denied: no answer "
        'within 60 s); to allow it add "network": {"allowedDomains": ["new.example"]} to '
        "/ws/.corral/settings.local.json"
    )
    allowed = decision_from_answer(request(), Answer("always", "added to x"))
    assert allowed == decision_from_answer(request(), "always")._replace(
        reason="new.example was allowed: added to x"
    )


# --- a real pseudo-terminal --------------------------------------------------------------------


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    os.close(master)


def _read_until(fd: int, marker: bytes) -> bytes:
    seen = b""
    end = time.monotonic() + DEADLINE
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(end - time.monotonic(), 0))
        if not ready:
            pytest.fail(f"no {marker!r} within {DEADLINE:g} s; got {seen!r}")
        seen += os.read(fd, 4096)
    return seen


def test_a_question_through_a_real_terminal(settings_file: str, pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    os.makedirs(os.path.dirname(settings_file))
    # Typed before the question: a complete line waits on the terminal (poll says so), and
    # must not answer it.
    os.write(master, b"o\n")
    assert select.select([slave], [], [], DEADLINE)[0] == [slave]
    callback = TerminalAsk(settings_file, open_terminal=lambda: TtyTerminal(slave))
    answers: list[Answer] = []
    thread = threading.Thread(target=lambda: answers.append(callback(request())))
    thread.start()
    shown = _read_until(master, b"(default: deny in 60 s): ")
    assert b"connect to new.example:443" in shown
    os.write(master, b"a\r")  # Enter sends CR; the terminal turns it into a newline
    _read_until(master, b"is now in network.allowedDomains")
    thread.join(DEADLINE)
    callback.close()  # closes the slave
    where = f"network.allowedDomains in {settings_file}"
    assert answers == [Answer("always", f"answered always; added to {where}")]
    with open(settings_file) as f:
        assert json.load(f)["network"]["allowedDomains"] == ["new.example"]


def test_close_ends_a_waiting_question(settings_file: str, pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    callback = TerminalAsk(settings_file, open_terminal=lambda: TtyTerminal(slave))
    answers: list[Answer] = []
    thread = threading.Thread(target=lambda: answers.append(callback(request())))
    thread.start()
    _read_until(master, b"(default: deny in 60 s): ")
    callback.close()
    thread.join(DEADLINE)
    assert answers == [Answer("deny", "the run ended before an answer")]

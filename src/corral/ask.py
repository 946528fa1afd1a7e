"""`network.unknownDomains: "ask"` in `corral run`: a host in neither domain list is put to the
person at the terminal.

    corral: the sandbox wants to connect to example.org:443, which network.allowedDomains
    does not list. Allow it? [o]nce, [a]lways, [d]eny (default: deny in 60 s):

(one line; folded here). Rules:
1. Asked only when a person can answer and the command cannot get in the way (`ask_mode`):
   corral has a controlling terminal (/dev/tty opens), and the command runs in a session of
   its own (its stdin is not the terminal, e.g. an agent's tool call run from a terminal
   session). With an inherited session the command is the terminal's foreground program and
   reads the very keystrokes meant for the question, so corral asks nothing, denies, and says
   so once. Without a terminal there is nobody to ask: the same.
2. The question can only be answered by keystrokes typed after it appeared: input waiting
   from before is discarded first. The command cannot type into the terminal (seccomp blocks
   TIOCSTI), so at worst it swallows the answer, and the question then ends as a denial.
3. Deny is the default: an empty line, end of input, an unreadable terminal, or no answer
   within `ASK_TIMEOUT` seconds. Anything else that is not an answer asks again.
4. One question at a time (the proxy also asks one at a time; the lock keeps it so for any
   caller). "always" holds for the rest of the run (the proxy adds the host to its rules) and
   is written to `<workspace>/.corral/settings.local.json` by `add_allowed_domain`: every
   other key kept, written atomically (a temporary file renamed over it). A file that is not
   valid settings is left alone, and the host is denied with the reason. Without a .corral
   directory the write waits until the command has ended (see `TerminalAsk._always`).
5. The host comes from inside the sandbox: it is escaped before it reaches the terminal, as
   the audit renderer escapes it, so it cannot forge a line or repaint the screen.
6. How each question ended goes into the audit event's reason (`Answer.detail`); its rule is
   "ask: once", "ask: always" or "ask: deny".

The terminal is a two-method seam (`Terminal`), so tests answer without a real one.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import termios
import threading
import time
from collections.abc import Callable
from typing import Literal, Protocol

from corral.audit.render import escape, host_port
from corral.backends.bubblewrap import Session
from corral.errors import SettingsError
from corral.network import Notify, write_to_stderr
from corral.policy.domains import normalize_host
from corral.policy.model import Policy
from corral.proxy.decision import Answer, AskAnswer, Request

ASK_TIMEOUT = 60.0
"""Seconds a question waits for its answer before it ends as a denial."""
MAX_HOST_SHOWN = 253  # the longest legal host name; anything longer is cut
MAX_LINE = 256  # an answer is a word; the rest of a longer line is dropped
TTY = "/dev/tty"
CLOSE_TIMEOUT = 5.0  # how long close() waits for an interrupted question to let go

AskMode = Literal["prompt", "shares-terminal", "no-terminal"]

ANSWERS: dict[str, AskAnswer] = {
    "": "deny",
    "o": "once",
    "once": "once",
    "a": "always",
    "always": "always",
    "d": "deny",
    "deny": "deny",
    "n": "deny",
    "no": "deny",
}


def ask_mode(*, has_terminal: bool, session: Session) -> AskMode:
    """Rule 1: whether a question can be put, and if not, why."""
    if not has_terminal:
        return "no-terminal"
    if session == "inherit":
        return "shares-terminal"
    return "prompt"


NOT_ASKED = {
    "no-terminal": "there is no terminal to ask on",
    "shares-terminal": "the command shares this terminal and would read the answer",
}


def parse_answer(line: str) -> AskAnswer | None:
    """The answer a line gives (rule 3), or None when it is none and the question stands."""
    return ANSWERS.get(line.strip().lower())


class Terminal(Protocol):
    def write(self, text: str) -> None: ...

    def read_line(self, timeout: float) -> str | None:
        """The next line typed, without its end; None when none came within `timeout`
        seconds or the terminal closed."""
        ...

    def discard_input(self) -> None:
        """Drop what was typed before now (rule 2)."""
        ...

    def interrupt(self) -> None:
        """Make a `read_line` waiting in another thread return None now."""
        ...

    def close(self) -> None: ...


class TtyTerminal:
    """A terminal device opened for reading and writing (normally /dev/tty)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # A pipe whose write end `interrupt` writes to: the one way to end a poll() at once.
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    @classmethod
    def open(cls, path: str = TTY) -> TtyTerminal:
        """OSError when there is no such terminal (no controlling terminal: ENXIO)."""
        return cls(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))

    def write(self, text: str) -> None:
        data = memoryview(text.encode(errors="replace"))
        while data:
            data = data[os.write(self.fd, data) :]

    def discard_input(self) -> None:
        with contextlib.suppress(termios.error):
            termios.tcflush(self.fd, termios.TCIFLUSH)

    def read_line(self, timeout: float) -> str | None:
        # A line ends at "\n", or at "\r" should the command have left the terminal raw.
        deadline = time.monotonic() + timeout
        line = b""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            ready = [fd for fd, _ in poller.poll(max(0.0, left) * 1000)] if left > 0 else []
            if not ready or self._wake_read in ready:
                return None
            try:
                chunk = os.read(self.fd, MAX_LINE)
            except OSError:
                return None  # EIO: the terminal hung up
            if not chunk:
                return None
            line += chunk
            for end in (b"\n", b"\r"):
                if end in line:
                    return line.split(end, 1)[0][:MAX_LINE].decode(errors="replace")

    def interrupt(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")

    def close(self) -> None:
        for fd in (self.fd, self._wake_read, self._wake_write):
            os.close(fd)


def question(request: Request, timeout: float) -> str:
    """The question for `request`. The host is shown as allowedDomains would store it: lower
    case and punycode, so a look-alike in another script shows as what it is."""
    host = normalize_host(request.host)  # rule 1 of `decision` ran it already: it is valid
    target = escape(host_port(host[:MAX_HOST_SHOWN], request.port))
    return (
        f"\ncorral: the sandbox wants to connect to {target}, which network.allowedDomains "
        f"does not list. Allow it? [o]nce, [a]lways, [d]eny (default: deny in {timeout:g} s): "
    )


class TerminalAsk:
    """The CLI's `Ask` callback: puts each question to the terminal (rules 2-6)."""

    def __init__(
        self,
        settings_file: str,
        *,
        open_terminal: Callable[[], Terminal] = TtyTerminal.open,
        timeout: float = ASK_TIMEOUT,
    ) -> None:
        """`open_terminal` is called at the first question (tests pass a fake)."""
        self.settings_file = settings_file
        self._open_terminal = open_terminal
        self._terminal: Terminal | None = None
        self.timeout = timeout
        self._lock = threading.Lock()
        self._closed = False
        self._pending: list[str] = []

    def __call__(self, request: Request) -> Answer:
        with self._lock:
            if self._closed:
                return Answer("deny", "the run was ending")
            try:
                if self._terminal is None:
                    self._terminal = self._open_terminal()
                return self._ask(self._terminal, request)
            except OSError as exc:
                return Answer("deny", f"the terminal could not be used: {exc.strerror or exc}")

    def _ask(self, terminal: Terminal, request: Request) -> Answer:
        terminal.discard_input()
        deadline = time.monotonic() + self.timeout
        terminal.write(question(request, self.timeout))
        while True:
            line = terminal.read_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                terminal.write("\ncorral: no answer: denied\n")
                if self._closed:
                    return Answer("deny", "the run ended before an answer")
                return Answer("deny", f"no answer within {self.timeout:g} s")
            choice = parse_answer(line)
            if choice is None:
                terminal.write("corral: answer o (once), a (always) or d (deny): ")
                continue
            if choice != "always":
                return Answer(choice, f"answered {choice} at the terminal")
            return self._always(terminal, request)

    def _always(self, terminal: Terminal, request: Request) -> Answer:
        host = normalize_host(request.host)  # rule 1 of `decision` ran it already: it is valid
        where = f"network.allowedDomains in {self.settings_file}"
        if not os.path.isdir(os.path.dirname(self.settings_file)):
            # No .corral directory: while a command runs, an empty placeholder file holds its
            # place (the sandbox sees /dev/null there), and replacing it would open the way
            # into it from inside. The directory can only be made once the command is gone.
            self._pending.append(host)
            terminal.write(f"corral: {escape(host)} goes into {where} when the command ends\n")
            later = f"answered always; to be added to {where} when the command ends"
            return Answer("always", later)
        try:
            added = add_allowed_domain(self.settings_file, host)
        except SettingsError as exc:
            terminal.write(f"corral: cannot save the answer: {exc.message}; denied\n")
            return Answer("deny", f"answered always, but it could not be saved: {exc.message}")
        terminal.write(f"corral: {escape(host)} is now in {where}\n")
        return Answer("always", f"answered always; {'added to' if added else 'already in'} {where}")

    def close(self) -> None:
        """Once the command has ended: end a question still waiting (it denies), save the
        "always" answers that had to wait, and close the terminal. Later questions deny
        without asking."""
        self._closed = True
        terminal = self._terminal
        if terminal is None:
            return
        terminal.interrupt()
        # The asking thread lets go of the lock as soon as its read is interrupted.
        if not self._lock.acquire(timeout=CLOSE_TIMEOUT):
            return
        try:
            self._save_pending(terminal)
            terminal.close()
            self._terminal = None
        finally:
            self._lock.release()

    def _save_pending(self, terminal: Terminal) -> None:
        for host in self._pending:
            try:
                add_allowed_domain(self.settings_file, host)
            except SettingsError as exc:
                terminal.write(f"corral: could not save {escape(host)}: {exc.message}\n")
            else:
                terminal.write(f"corral: added {escape(host)} to {self.settings_file}\n")
        self._pending.clear()


class NotAsked:
    """The `Ask` callback when no question can be put (rule 1): denies every host, and says
    why once (`notify`, None for --quiet)."""

    def __init__(self, mode: AskMode, *, notify: Notify | None = write_to_stderr) -> None:
        self.why = NOT_ASKED[mode]
        self._notify = notify
        self._said = False
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Answer:
        with self._lock:
            if not self._said and self._notify is not None:
                self._said = True
                with contextlib.suppress(Exception):  # a broken stderr must not break the proxy
                    self._notify(
                        'corral: network.unknownDomains is "ask", but '
                        f"{self.why}: hosts network.allowedDomains does not list are denied"
                    )
        return Answer("deny", f"not asked, as {self.why}")

    def close(self) -> None:
        pass


def ask_for_run(
    policy: Policy, *, has_terminal: bool, session: Session, quiet: bool
) -> TerminalAsk | NotAsked | None:
    """The `Ask` callback `corral run` gives its Sandbox: None unless the settings say "ask"."""
    if policy.network.unknown_domains != "ask":
        return None
    mode = ask_mode(has_terminal=has_terminal, session=session)
    if mode != "prompt":
        return NotAsked(mode, notify=None if quiet else write_to_stderr)
    return TerminalAsk(f"{policy.host.project_settings_dir}/settings.local.json")


def add_allowed_domain(settings_file: str, host: str) -> bool:
    """Append `host` to network.allowedDomains in `settings_file`, creating it (and its
    directory) when missing; False when it is listed already. SettingsError, and nothing
    written, when the file is not valid settings or is a symbolic link (the workspace is
    the sandbox's: what a link points at is not corral's to rewrite)."""
    from corral.policy.settings import read_settings

    directory = os.path.dirname(settings_file)
    for path in (directory, settings_file):
        if os.path.islink(path):
            raise SettingsError("is a symbolic link; not rewritten", file=path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise SettingsError(
            f"cannot create the directory: {exc.strerror}", file=directory
        ) from None
    data = read_settings(settings_file) or {}
    network = data.setdefault("network", {})
    assert isinstance(network, dict)  # read_settings validated the file
    allowed = network.setdefault("allowedDomains", [])
    assert isinstance(allowed, list)
    if host in allowed:
        return False
    allowed.append(host)
    _write_atomically(settings_file, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return True


def _write_atomically(path: str, text: str) -> None:
    """Write a temporary file beside `path`, then rename it over `path`: a reader sees the old
    file or the new one, never half of one. Keeps the old file's permission bits."""
    import tempfile

    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, temporary = tempfile.mkstemp(prefix=".settings.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise SettingsError(f"cannot write the file: {exc.strerror}", file=path) from None


def has_controlling_terminal() -> bool:
    """Whether /dev/tty opens: a person may be at a terminal that this process belongs to."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True

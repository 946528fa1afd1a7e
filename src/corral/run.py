"""`corral run` in a terminal: signals forwarded, the exit status passed through unchanged.

Signals: with a new session (stdin not a terminal) the command is not in the terminal's
foreground group, so Ctrl-C reaches only corral, which forwards SIGINT, SIGQUIT, SIGTERM and
SIGHUP to the sandboxed process group. With an inherited session (interactive TTY) the
terminal already delivers Ctrl-C and Ctrl-\\ to the command itself, so corral ignores those two
and forwards only SIGTERM and SIGHUP.

Refused attempts come from two sources, one per kind (corral.audit.violations, rule 4):
- the violation monitor (corral.monitor; monitor.violations "writes", the default, or "all")
  records each refused write, and with "all" each open of a hidden path too, with its pid and
  executable;
- breadcrumbs: when stderr is not a terminal (an agent reading a pipe), corral relays the
  command's stderr through itself and records each denial it names that the monitor does not
  cover (everything with the monitor off, reads of hidden paths with "writes", everything
  again if the kernel refuses the monitor's filter at launch).
At exit (unless --quiet) it prints one line per refused attempt, file or network, that
ignoreViolations does not cover; a refused connection is printed as it happens instead (the
command may be waiting on it), and not again at exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from functools import partial
from types import FrameType
from typing import IO, TYPE_CHECKING

from corral.audit.record import (
    children_usage,
    record_session_end,
    record_session_start,
    usage_since,
)
from corral.audit.spool import open_audit_sink
from corral.audit.violations import RunViolations
from corral.breadcrumbs import Breadcrumb, breadcrumbs_for_line
from corral.network import write_to_stderr
from corral.policy.model import MonitorViolations, Policy
from corral.process import SandboxProcess
from corral.sandbox import Sandbox

if TYPE_CHECKING:
    from corral.ask import NotAsked, TerminalAsk
    from corral.backends.bubblewrap import Session

TIMEOUT_STATUS = 124  # what coreutils' timeout(1) returns, so scripts can tell the two apart
MAX_BREADCRUMBS = 10
MAX_SCANNED_LINE = 4096  # longer lines are relayed but not scanned


def run_in_terminal(
    policy: Policy,
    argv: Sequence[str],
    *,
    timeout: float | None,
    quiet: bool,
    monitor: MonitorViolations | None = None,
) -> int:
    """`monitor`: what the violation monitor watches ("writes", "all", "off"); None: as the
    policy's monitor.violations says."""
    if timeout is None:
        timeout = policy.limits.timeout_seconds
    # Audit records go to an append-only spool on the launch path (cheap, nothing lost when
    # corral is killed); `corral log` moves them into the SQLite log when it reads. The
    # forwarders audit.syslog / audit.otlp name get every event too, at best effort.
    audit = open_audit_sink(policy, os.urandom(6).hex())
    violations = RunViolations(audit, policy, argv)
    session: Session = "inherit" if os.isatty(0) else "new"  # Sandbox.spawn's own default
    ask = _ask_for_run(policy, session=session, quiet=quiet)
    sandbox = Sandbox(
        policy, sink=violations, ask=ask, monitor=monitor,
        notify=None if quiet else partial(_say_now, violations),
    )  # fmt: skip
    # Not tied to --quiet: what was refused is recorded either way; --quiet only says nothing.
    # Also with the monitor on: breadcrumbs of what it covers are dropped (violations.py rule
    # 4), and they are what is left if the kernel refuses its filter at launch.
    watch = not os.isatty(2)
    before = children_usage()
    proc = sandbox.spawn(argv, stderr=subprocess.PIPE if watch else None, session=session)
    record_session_start(
        audit, proc.sandbox_id, policy=policy, argv=argv, cwd=os.getcwd(), backend=sandbox.backend
    )
    relay = _StderrRelay(proc, policy, violations) if watch else None

    def forward(signum: int, _frame: FrameType | None) -> None:
        proc.send_signal(signum)

    terminal_delivers = (signal.SIGINT, signal.SIGQUIT)
    for sig in (signal.SIGTERM, signal.SIGHUP, *terminal_delivers):
        if sig in terminal_delivers and proc.session == "inherit":
            signal.signal(sig, signal.SIG_IGN)
        else:
            signal.signal(sig, forward)
    try:
        status = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        if not quiet:
            print(f"corral: killed the sandbox after {timeout:g} s (--timeout)", file=sys.stderr)
        status = TIMEOUT_STATUS
    if ask is not None:
        ask.close()  # a question still waiting ends, denied: the command is gone
    if relay is not None:
        relay.join()
    if not quiet:
        for line in violations.summary(proc.sandbox_id):
            print(line, file=sys.stderr)
    record_session_end(audit, proc.sandbox_id, exit_code=status, resource_usage=usage_since(before))
    audit.close()
    sandbox.close()
    return status


def _say_now(violations: RunViolations, line: str) -> None:
    """A refused connection, printed as it happens (the command may be waiting on it), and
    then left out of the summary at exit."""
    violations.shown(line)
    write_to_stderr(line)


def _ask_for_run(policy: Policy, *, session: Session, quiet: bool) -> TerminalAsk | NotAsked | None:
    """Who decides hosts in neither domain list when the settings say "ask" (`corral.ask`,
    imported only then): the person at this terminal, or nobody, said once."""
    if policy.network.unknown_domains != "ask":
        return None
    from corral.ask import ask_for_run, has_controlling_terminal

    terminal = has_controlling_terminal()
    return ask_for_run(policy, has_terminal=terminal, session=session, quiet=quiet)


class _StderrRelay:
    """Copies the command's stderr to ours as it arrives, scanning lines for denials and
    recording each as it is seen (so the log has it at the time it happened)."""

    def __init__(self, proc: SandboxProcess, policy: Policy, violations: RunViolations) -> None:
        assert proc.stderr is not None
        self._source: IO[bytes] = proc.stderr
        self._proc = proc
        self._cwd = policy.workspace
        self._policy = policy
        self._violations = violations
        self.breadcrumbs: list[Breadcrumb] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = b""
        fd = self._source.fileno()
        while chunk := os.read(fd, 65536):
            view = memoryview(chunk)
            while view:
                view = view[os.write(2, view) :]
            pending = (pending + chunk)[-MAX_SCANNED_LINE:]
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._scan(line.decode(errors="replace"))
        self._scan(pending.decode(errors="replace"))

    def _scan(self, line: str) -> None:
        if len(self.breadcrumbs) >= MAX_BREADCRUMBS:
            return
        for crumb in breadcrumbs_for_line(
            line, cwd=self._cwd, plan=self._proc.plan, policy=self._policy
        ):
            if crumb not in self.breadcrumbs:
                self.breadcrumbs.append(crumb)
                self._violations.record_breadcrumbs(self._proc.sandbox_id, [crumb])

    def join(self) -> None:
        self._thread.join()
        self._source.close()

"""The refused attempts of one run: which ones `ignoreViolations` covers, and the lines `corral
run` prints about the others when the command exits.

A refused attempt is a filesystem violation (its target is a path) or a network denial (its
target is the host the proxy refused). Rules:
1. An ignore rule covers an attempt when its command is "*" or the first words of the
   sandboxed argv (argv[0] compared by its base name, unless the rule names a path, as
   `excludedCommands` does), and its pattern matches the target:
   - on a path, the pattern is an fnmatch glob on the whole path whose `*` crosses "/", and it
     also covers everything under what it matches: "/usr/bin", "/usr/bin/*" and "*.pyc" (any
     .pyc file) all work as one would guess; "~/" stands for the home directory;
   - on a host, the pattern is a glob on the name, case-insensitive, trailing dot dropped:
     "*.example.com" covers a.example.com and a.b.example.com but not example.com, as
     `allowedDomains` reads the same pattern.
2. An ignored attempt is still recorded, with ignored=True; only reports leave it out: the
   summary below and `corral violations` without --all or --ignored.
3. The command matched is the one corral was asked to run and, for attempts the violation
   monitor saw (corral.monitor), also the executable that made it: under `bash -c "npm test"`
   a rule for "bash" covers every attempt, a rule for "npm" those of the npm program (its
   executable's base name, or its whole path when the rule names one). The error output
   breadcrumbs come from cannot say which process it was, so only the command matches there.
4. One source per kind of attempt and run, so an attempt is never counted twice: when the
   monitor watches a run's writes (`attach_monitor`), its write breadcrumbs are dropped, and
   when it watches every open ("all"), its read breadcrumbs too. With "writes", a denied read
   is still found in the error output, without pid or executable.

Imported on the launch path by `corral run`: os and threading only at module level; fnmatch
(which pulls in `re`, ~10 ms) only once there is an attempt and a rule to match it against.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from corral.audit.events import Event, Sink, violation_event

if TYPE_CHECKING:
    from corral.breadcrumbs import Breadcrumb
    from corral.policy.model import IgnoreRule, MonitorViolations, Policy

# Lines of the end-of-run summary; past this, one more line says how many were left out and
# where to see them (a runaway loop must not bury the command's own last words).
MAX_SUMMARY_LINES = 10


class Attempt(NamedTuple):
    """One refused filesystem attempt, as the monitor or a breadcrumb found it."""

    pid: int
    """The host pid of the process that made it; 0 when unknown (breadcrumbs)."""
    executable: str
    """Its executable as the sandbox sees it; "" when unknown."""
    operation: str
    """"read", "write", "mkdir", "unlink", "rename", ... (breadcrumbs: "read" or "write")."""
    path: str
    because: str
    fix: str
    """The settings line that would allow it, or why none can."""

    def __str__(self) -> str:
        return f"{self.operation} {self.path}: {self.because}; {self.fix}"


def is_ignored(
    rules: Sequence[IgnoreRule],
    argv: Sequence[str],
    target: str,
    *,
    home: str | None = None,
    executable: str = "",
) -> IgnoreRule | None:
    """The first rule that covers an attempt on `target` (a path, or a host name) by the
    command `argv` (or by `executable`, rule 3), or None. `home` replaces a leading "~/" in
    path patterns."""
    if not rules:
        return None
    from fnmatch import fnmatchcase

    is_path = target.startswith("/")
    candidates = _path_and_parents(target) if is_path else [target.lower().rstrip(".")]
    for rule in rules:
        by_command = _command_matches(rule.command, argv)
        if not by_command and not _executable_matches(rule.command, executable):
            continue
        pattern = rule.pattern
        if is_path and home and pattern.startswith("~/"):
            pattern = home.rstrip("/") + pattern[1:]
        elif not is_path:
            pattern = pattern.lower().rstrip(".")
        if any(fnmatchcase(candidate, pattern) for candidate in candidates):
            return rule
    return None


def _command_matches(command: str, argv: Sequence[str]) -> bool:
    words = command.split()
    if words == ["*"]:
        return True
    if not words or len(argv) < len(words):
        return False
    head = argv[0] if "/" in words[0] else os.path.basename(argv[0])
    return [head, *argv[1 : len(words)]] == words


def _executable_matches(command: str, executable: str) -> bool:
    words = command.split()
    if len(words) != 1 or not executable:
        return False
    return words[0] == (executable if "/" in words[0] else os.path.basename(executable))


def _path_and_parents(path: str) -> list[str]:
    """/a/b/c -> [/a/b/c, /a/b, /a, /]: a pattern matching a directory covers what is in it."""
    found = [path]
    while path not in ("/", ""):
        path = os.path.dirname(path)
        found.append(path)
    return found


def _target_of(event: Event) -> str | None:
    """The path of a violation, the host of a network denial; None for anything else."""
    fields = event.fields
    if event.kind == "violation":
        return str(fields.get("path") or "") or None
    if event.kind == "network" and fields.get("decision") == "deny":
        return str(fields.get("host") or "") or None
    return None


class RunViolations:
    """A `Sink` in front of one run's sink (its spool): marks every refused attempt that an
    ignore rule covers and keeps one line for each other, distinct one, for `summary`.

    `argv` is the command the run was asked for (rule 3). Events of every kind pass through;
    `close` leaves the caller's sink open. Thread-safe: the proxy emits from its own thread.
    """

    def __init__(self, sink: Sink, policy: Policy, argv: Sequence[str]) -> None:
        self._sink = sink
        self._rules = policy.ignore_violations
        self._argv = tuple(argv)
        self._home = policy.host.home
        # Where the proxy's notices send the user (proxy/service.py), so both say the same.
        self._settings_file = f"{policy.host.project_settings_dir}/settings.local.json"
        self._lock = threading.Lock()
        self._lines: dict[tuple[object, ...], str] = {}
        self._shown: set[str] = set()
        """Lines already printed while the command ran (the proxy's notices)."""
        self._monitored: dict[str, frozenset[str]] = {}
        """Per run the monitor watches: the breadcrumb accesses it covers."""

    def emit(self, event: Event) -> None:
        target = _target_of(event)
        ignored = target is not None and self._ignored(target)
        if ignored:
            # In place, not on a copy: a sink in front of this one (the proxy's notices) then
            # sees the mark as well.
            event.fields["ignored"] = True
        self._sink.emit(event)
        if target is not None and not ignored:
            self._remember(event)

    def close(self) -> None:
        pass

    def attach_monitor(self, sandbox_id: str, *, opens: MonitorViolations) -> None:
        """The violation monitor watches this run: breadcrumbs of what it covers are dropped
        (rule 4). `opens` is what it watches, "writes" or "all"."""
        covered = frozenset({"read", "write"} if opens == "all" else {"write"})
        with self._lock:
            self._monitored[sandbox_id] = covered

    def detach_monitor(self, sandbox_id: str) -> None:
        """The monitor could not watch this run after all: its breadcrumbs count again."""
        with self._lock:
            self._monitored.pop(sandbox_id, None)

    def record_breadcrumbs(self, sandbox_id: str, crumbs: Iterable[Breadcrumb]) -> None:
        """Records each denial found in the command's error output as a violation. It has no
        pid or executable (pid 0): the error output does not say which process it was."""
        with self._lock:
            covered = self._monitored.get(sandbox_id, frozenset())
        for crumb in crumbs:
            if crumb.access in covered:
                continue
            attempt = Attempt(0, "", crumb.access, crumb.path, crumb.because, crumb.fix)
            self.record_attempt(sandbox_id, attempt)

    def record_attempt(self, sandbox_id: str, attempt: Attempt) -> None:
        """Records one refused filesystem attempt, marked when a rule covers it."""
        ignored = self._ignored(attempt.path, attempt.executable)
        self._sink.emit(attempt_event(sandbox_id, attempt, ignored=ignored))
        if not ignored:
            from corral.audit.render import escape  # the path comes from inside

            key = ("file", attempt.operation, attempt.path)
            self._add(key, f"corral: blocked {escape(str(attempt))}")

    def shown(self, line: str) -> None:
        """`line` was printed as it happened: the summary does not say it again."""
        with self._lock:
            self._shown.add(line)

    def summary(self, sandbox_id: str) -> list[str]:
        """One line per distinct attempt that was not ignored and not `shown` yet, each naming
        the setting that would allow it where there is one; at most MAX_SUMMARY_LINES and a
        last line."""
        with self._lock:
            lines = [line for line in self._lines.values() if line not in self._shown]
        if len(lines) <= MAX_SUMMARY_LINES:
            return lines
        left = len(lines) - MAX_SUMMARY_LINES
        return [
            *lines[:MAX_SUMMARY_LINES],
            f"corral: and {left} more blocked: corral violations --session {sandbox_id}",
        ]

    def _ignored(self, target: str, executable: str = "") -> bool:
        found = is_ignored(self._rules, self._argv, target, home=self._home, executable=executable)
        return found is not None

    def _remember(self, event: Event) -> None:
        fields = event.fields
        if event.kind == "network":
            from corral.proxy.notice import denial_line  # the proxy is running: no cost

            line = denial_line(fields, settings_file=self._settings_file)
            key: tuple[object, ...] = ("network", fields.get("host"), fields.get("port"))
        else:
            from corral.audit.render import escape

            access, path = str(fields.get("operation", "")), str(fields.get("path", ""))
            rule = str(fields.get("rule") or "refused")
            line = f"corral: blocked {escape(access)} {escape(path)}: {escape(rule)}"
            key = ("file", access, path)
        if line is not None:
            self._add(key, line)

    def _add(self, key: tuple[object, ...], line: str) -> None:
        with self._lock:
            self._lines.setdefault(key, line)


def attempt_event(sandbox_id: str, attempt: Attempt, *, ignored: bool = False) -> Event:
    """The audit record of an attempt: the setting that would allow it stays out of the log
    (it is for the end-of-run line), the reason is its rule."""
    return violation_event(
        sandbox_id,
        pid=attempt.pid,
        executable=attempt.executable,
        operation=attempt.operation,
        path=attempt.path,
        rule=attempt.because,
        ignored=ignored,
    )


def attempt_recorder(
    sink: Sink, sandbox_id: str, *, opens: MonitorViolations
) -> Callable[[Attempt], None]:
    """Where the violation monitor of one sandbox sends its attempts: a RunViolations marks
    and summarises them (and stops taking breadcrumbs of what the monitor covers, rule 4);
    any other sink gets the plain records."""
    if isinstance(sink, RunViolations):
        sink.attach_monitor(sandbox_id, opens=opens)
        return lambda attempt: sink.record_attempt(sandbox_id, attempt)
    return lambda attempt: sink.emit(attempt_event(sandbox_id, attempt))

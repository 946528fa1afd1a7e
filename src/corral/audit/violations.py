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
3. The command matched is the one corral was asked to run, not the process that tripped:
   under `bash -c "npm test"` it is "bash". The error output breadcrumbs come from cannot say
   which process it was; a kernel-side monitor could, and would match its executable too.

Imported on the launch path by `corral run`: os and threading only at module level; fnmatch
(which pulls in `re`, ~10 ms) only once there is an attempt and a rule to match it against.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from corral.audit.events import Event, Sink, violation_event

if TYPE_CHECKING:
    from corral.breadcrumbs import Breadcrumb
    from corral.policy.model import IgnoreRule, Policy

# Lines of the end-of-run summary; past this, one more line says how many were left out and
# where to see them (a runaway loop must not bury the command's own last words).
MAX_SUMMARY_LINES = 10


def is_ignored(
    rules: Sequence[IgnoreRule], argv: Sequence[str], target: str, *, home: str | None = None
) -> IgnoreRule | None:
    """The first rule that covers an attempt on `target` (a path, or a host name) by the
    command `argv`, or None. `home` replaces a leading "~/" in path patterns."""
    if not rules:
        return None
    from fnmatch import fnmatchcase

    is_path = target.startswith("/")
    candidates = _path_and_parents(target) if is_path else [target.lower().rstrip(".")]
    for rule in rules:
        if not _command_matches(rule.command, argv):
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

    def record_breadcrumbs(self, sandbox_id: str, crumbs: Iterable[Breadcrumb]) -> None:
        """Records each denial found in the command's error output as a violation. It has no
        pid or executable (pid 0): the error output does not say which process it was."""
        for crumb in crumbs:
            ignored = self._ignored(crumb.path)
            event = violation_event(
                sandbox_id,
                pid=0,
                executable="",
                operation=crumb.access,
                path=crumb.path,
                rule=crumb.because,
                ignored=ignored,
            )
            self._sink.emit(event)
            if not ignored:
                from corral.audit.render import escape  # the path comes from inside

                key = ("file", crumb.access, crumb.path)
                self._add(key, f"corral: blocked {escape(str(crumb))}")

    def summary(self, sandbox_id: str) -> list[str]:
        """One line per distinct attempt that was not ignored, each naming the setting that
        would allow it where there is one; at most MAX_SUMMARY_LINES and a last line."""
        with self._lock:
            lines = list(self._lines.values())
        if len(lines) <= MAX_SUMMARY_LINES:
            return lines
        left = len(lines) - MAX_SUMMARY_LINES
        return [
            *lines[:MAX_SUMMARY_LINES],
            f"corral: and {left} more blocked: corral violations --session {sandbox_id}",
        ]

    def _ignored(self, target: str) -> bool:
        return is_ignored(self._rules, self._argv, target, home=self._home) is not None

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

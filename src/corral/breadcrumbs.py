"""Breadcrumbs: when a command trips over the sandbox, say which rule and how to allow it.

This first mechanism reads the command's error output (only when corral already sits on a
pipe, so no terminal behaviour changes): a line that names a path together with "Read-only file
system", "Permission denied", "Operation not permitted" or "No such file or directory" (a hidden
directory looks empty) is checked against the filesystem plan. The audit issue adds kernel-side
violation records; this stays as the cheap fallback.
"""

from __future__ import annotations

import os
from typing import Literal, NamedTuple

from corral.backends.fsplan import FilesystemPlan, explain
from corral.policy.model import BUILT_IN, Policy, Rule
from corral.policy.paths import is_within

_ERRORS = (
    ("Read-only file system", "write"),
    ("Permission denied", "write"),
    ("Operation not permitted", "write"),
    ("No such file or directory", "read"),
)
_QUOTES = "'\"`‘’"


class Breadcrumb(NamedTuple):
    path: str
    access: Literal["read", "write"]
    because: str
    fix: str

    def __str__(self) -> str:
        return f"{self.access} {self.path}: {self.because}; {self.fix}"


def _candidates(line: str, cwd: str) -> list[str]:
    """Words of an error line that look like paths: with a slash, or a leading dot."""
    paths = []
    for word in line.replace(": ", " ").split():
        text = word.strip(_QUOTES).rstrip(":,;")
        if len(text) < 2 or not ("/" in text or text.startswith(".")) or text.startswith(".."):
            continue
        if text.startswith("~/"):
            text = os.path.expanduser(text)
        paths.append(os.path.normpath(os.path.join(cwd, text)))
    return paths


def _fix(rule: Rule, key: str) -> str:
    if rule.origin.source == BUILT_IN:
        return "built-in protection, not removable by settings"
    return f"remove {rule.value!r} from filesystem.{key} in {rule.origin.source}"


def _protected_by(real: str, policy: Policy) -> Rule | None:
    for rule in policy.filesystem.deny_write:
        if is_within(real, rule.value):
            return rule
    return None


def breadcrumbs_for_line(
    line: str, *, cwd: str, plan: FilesystemPlan, policy: Policy
) -> list[Breadcrumb]:
    access: Literal["read", "write"] | None = None
    for marker, kind in _ERRORS:
        if marker in line:
            access = kind  # type: ignore[assignment]
            break
    if access is None:
        return []
    found = []
    for path in _candidates(line, cwd):
        real = os.path.realpath(path)
        denied = explain(real, plan)
        if denied is not None:
            key = "denyRead" if denied.access == "read" else "denyWrite"
            because = (
                f"{'hidden' if denied.access == 'read' else 'read-only'} by {denied.rule.origin}"
            )
            found.append(Breadcrumb(real, denied.access, because, _fix(denied.rule, key)))
        elif access == "write" and (rule := _protected_by(real, policy)) is not None:
            because = f"read-only by {rule.origin}"
            found.append(Breadcrumb(real, "write", because, _fix(rule, "denyWrite")))
        elif access == "write" and not any(is_within(real, w) for w in plan.writable):
            local = f"{policy.host.project_settings_dir}/settings.local.json"
            parent = os.path.dirname(real)
            fix = f'add "filesystem": {{"allowWrite": ["{parent}"]}} to {local}'
            found.append(Breadcrumb(real, "write", "outside the writable paths", fix))
    return found

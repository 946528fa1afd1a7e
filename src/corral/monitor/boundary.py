"""Whether an observed access crosses the sandbox's boundary, and which setting would allow it.

The supervisor hands over each access as an intent ("read" or "write") and an absolute,
lexically normalised path, as the program named it. The rules, in order:
1. Paths under /dev and /proc are not judged: the kernel makes those file systems inside the
   sandbox, not the mount plan, and most writes there (/dev/null, /proc/self/...) are allowed.
2. A read is a violation when the path lies in a hidden path (denyRead). Where the read roots
   are not the whole file system (strict mode), a read outside them and the writable paths is
   one too, if the path exists on the host: otherwise nothing was kept from the program.
3. A write (open for writing, create, remove, rename, chmod, ...) is a violation when the path
   lies outside the writable paths, or in a hidden or read-only path (denyWrite, and the
   mandatory protections).
4. Symlinks. A candidate found by rules 2-3 is confirmed on the host's real path (corral
   mounts every path at its real location, so the host's view is the sandbox's): a link from a
   read-only place into a writable one is no violation. Inside the writable paths, where the
   program can plant links, the last component is also checked for a link (`ln -s ~/.ssh/id_rsa
   k; cat k`); a planted link in a parent directory is not (docs/monitoring.md).
Checks on the fast path are prefix tests of strings; the disk is read only for candidates and
for the link test of rule 4.

The wording of `because` and `fix` is the breadcrumbs' (corral.breadcrumbs), so a violation
reads the same whichever source found it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterable, Sequence
from typing import Literal, NamedTuple

from corral.backends.fsplan import Denied, FilesystemPlan, explain
from corral.breadcrumbs import _fix, _protected_by
from corral.policy.model import Policy, Rule
from corral.policy.paths import is_within

Intent = Literal["read", "write"]

# Rule 1: file systems the kernel makes inside the sandbox.
KERNEL_MADE = ("/dev", "/proc")
# A path the policy makes writable that the Landlock-only backend's grants leave out: directly
# in a directory holding a protected path (backends/landlock_nsfree.py, rule 4).
FROZEN = "in a directory Landlock freezes around a protected path"
FROZEN_FIX = "create it in a subdirectory (docs/landlock.md), or use a machine with user namespaces"
# Operations on a file's metadata, which Landlock does not restrict (docs/security-model.md).
METADATA_OPERATIONS = ("chmod", "chown", "utimes", "setxattr", "removexattr")


class Verdict(NamedTuple):
    path: str
    """The path the kernel acted on: the named one with symlinks resolved."""
    because: str
    fix: str


class _Prefixes(NamedTuple):
    exact: frozenset[str]
    below: tuple[str, ...]

    @classmethod
    def of(cls, paths: Iterable[str]) -> _Prefixes:
        roots = tuple(dict.fromkeys(paths))
        if "/" in roots:
            return cls(frozenset(), ("/",))
        return cls(frozenset(roots), tuple(root + "/" for root in roots))

    def holds(self, path: str) -> bool:
        """`path` is one of the roots or lies under one (str.startswith takes the tuple in C)."""
        return path in self.exact or path.startswith(self.below)


class Boundary:
    """The plan's boundary, prepared for the supervisor's per-call checks.

    `writable`: where the command may write (default: the plan's writable paths; the
    Landlock-only backend passes the paths its rules grant, its private /tmp included).
    `inside_only`: writable paths that exist only inside the sandbox (the private /tmp of the
    bubblewrap backend), which the host cannot look at for rule 4. `unrefused`: operations
    the backend lets through whatever the path (Landlock has no right for chmod, chown,
    utimes or xattrs), so they are no refused attempts and are not judged.
    """

    def __init__(
        self,
        plan: FilesystemPlan,
        policy: Policy,
        *,
        writable: Sequence[str] | None = None,
        inside_only: Sequence[str] = (),
        unrefused: Collection[str] = (),
    ) -> None:
        self.unrefused = frozenset(unrefused)
        self._plan = plan
        self._policy = policy
        self._local = f"{policy.host.project_settings_dir}/settings.local.json"
        self._planned_writable = _Prefixes.of(plan.writable)
        writable = tuple(plan.writable if writable is None else writable)
        hidden = [d.path for d in plan.denied if d.access == "read"]
        denied_write = [d.path for d in plan.denied] + [r.value for r in _deny_write(policy)]
        self._kernel_made = _Prefixes.of(KERNEL_MADE)
        self._writable = _Prefixes.of(writable)
        self._hidden = _Prefixes.of(hidden)
        self._not_writable = _Prefixes.of(denied_write)
        self._planted = _Prefixes.of(w for w in writable if w not in inside_only and w != "/")
        readable = (*plan.readable, *writable, *inside_only)
        self._readable = None if "/" in readable else _Prefixes.of(readable)
        self._inside_only = _Prefixes.of(inside_only)

    def judge(self, intent: Intent, path: str, *, follows: bool = True) -> Verdict | None:
        """The violation an access to `path` (absolute, normalised) is, or None. `follows`:
        the call follows a symlink in the last component (rule 4 checks it only then)."""
        if self.suspect(intent, path) or (follows and self.may_be_planted_link(path)):
            return self.verdict(intent, path)
        return None

    def suspect(self, intent: Intent, path: str) -> bool:
        """Rules 1-3 on the path as named: prefix tests only, no disk."""
        if self._kernel_made.holds(path):
            return False
        if intent == "read":
            return self._hidden.holds(path) or (
                self._readable is not None and not self._readable.holds(path)
            )
        return not self._writable.holds(path) or self._not_writable.holds(path)

    def may_be_planted_link(self, path: str) -> bool:
        """Rule 4's trigger: a link in the last component, where the program can make one."""
        return self._planted.holds(path) and _is_link(path)

    def in_planted_area(self, path: str) -> bool:
        return self._planted.holds(path)

    def verdict(self, intent: Intent, path: str) -> Verdict | None:
        """Rule 4: the verdict on the real path (reads the disk)."""
        if self._kernel_made.holds(path):
            return None
        real = path if self._inside_only.holds(path) else os.path.realpath(path)
        return self._read_verdict(real) if intent == "read" else self._write_verdict(real)

    def _read_verdict(self, real: str) -> Verdict | None:
        denied = _deepest(d for d in self._plan.denied if d.access == "read" and _holds(d, real))
        if denied is not None:
            return self._denied_verdict(real, denied)
        if self._readable is None or self._readable.holds(real) or not os.path.lexists(real):
            return None
        parent = os.path.dirname(real)
        entry = f'{{"path": "{parent}", "mode": "read"}}'
        fix = f'add "filesystem": {{"allowedPaths": [{entry}]}} to {self._local}'
        return Verdict(real, "outside the readable paths", fix)

    def _write_verdict(self, real: str) -> Verdict | None:
        denied = explain(real, self._plan)
        if denied is not None:
            return self._denied_verdict(real, denied)
        rule = _protected_by(real, self._policy)
        if rule is not None:
            return Verdict(real, f"read-only by {rule.origin}", _fix(rule, "denyWrite"))
        if self._writable.holds(real):
            return None
        if self._planned_writable.holds(real):
            # Writable by the policy, not by Landlock's expanded grants (Landlock-only backend).
            return Verdict(real, FROZEN, FROZEN_FIX)
        parent = os.path.dirname(real)
        fix = f'add "filesystem": {{"allowWrite": ["{parent}"]}} to {self._local}'
        return Verdict(real, "outside the writable paths", fix)

    @staticmethod
    def _denied_verdict(real: str, denied: Denied) -> Verdict:
        hidden = denied.access == "read"
        key = "denyRead" if hidden else "denyWrite"
        because = f"{'hidden' if hidden else 'read-only'} by {denied.rule.origin}"
        return Verdict(real, because, _fix(denied.rule, key))


def _deny_write(policy: Policy) -> tuple[Rule, ...]:
    return tuple(r for r in policy.filesystem.deny_write if r.value.startswith("/"))


def _holds(denied: Denied, path: str) -> bool:
    return is_within(path, denied.path)


def _deepest(found: Iterable[Denied]) -> Denied | None:
    best: Denied | None = None
    for denied in found:
        if best is None or denied.path.count("/") > best.path.count("/"):
            best = denied
    return best


def _is_link(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False

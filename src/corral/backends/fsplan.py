"""The filesystem plan: a policy plus disk facts become an ordered list of mounts.

Pure: reads nothing, so every symlink and missing-path case is a unit test with hand-written
facts. The bubblewrap builder renders the plan as argv; Landlock reads its readable and
writable lists.

The order is the security argument, because a later mount hides what an earlier one showed:
1. read roots, read-only (`/` in standard and permissive; system dirs and the workspace in strict)
2. `/dev` (minimal) and a fresh `/proc`, then the private `/tmp` if the policy has one
3. writable binds, parents before children
4. protected paths (deny-write), read-only over the writable binds
5. hidden paths (deny-read): an empty read-only tmpfs over a directory, an empty read-only
   regular file over a file
So deny beats allow: a hidden path stays hidden even inside a writable or protected one.

Every mount is made at the path's real location (symlinks resolved), so a link cannot smuggle a
denied path back: the link still points at the hidden real location.

A denied path that does not exist yet, inside a writable bind, would otherwise be creatable by
the sandboxed program (a new ~/.bashrc in permissive mode, a hook in a missing .git/hooks).
Such a path gets a placeholder: an empty file made on the host just before launch, with
/dev/null mounted over it inside, and removed after the run (see placeholders.py). Inside,
it is a character device, which git and most tools ignore.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, NamedTuple

from corral.backends.facts import DiskFacts, PathFact
from corral.policy.model import Origin, Policy, Rule
from corral.policy.paths import has_glob, is_within

MountKind = Literal[
    "ro-bind", "bind", "dev", "proc", "tmpfs", "hide-dir", "hide-file", "placeholder", "symlink"
]


class Mount(NamedTuple):
    kind: MountKind
    dest: str
    source: str = ""


class Denied(NamedTuple):
    """A path the plan hides or makes read-only, and the rule that did it (for breadcrumbs)."""

    path: str
    access: Literal["read", "write"]
    rule: Rule


class FilesystemPlan(NamedTuple):
    mounts: tuple[Mount, ...]
    placeholders: tuple[str, ...]
    """Empty files to create on the host before launch and remove afterwards."""
    readable: tuple[str, ...]
    writable: tuple[str, ...]
    denied: tuple[Denied, ...]
    notes: tuple[str, ...]
    """Rules that had nothing to do here (missing paths, deny beating allow), for `policy show`."""


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def _fact(facts: DiskFacts, path: str) -> PathFact:
    # Facts are gathered for every policy path; the fallback only covers git-remapped paths
    # of a layout the gatherer did not see, and is conservative (treated as missing).
    return facts.paths.get(path) or PathFact("missing", path, parent_exists=False)


def _expanded(rules: tuple[Rule, ...], facts: DiskFacts) -> Iterator[tuple[str, Rule]]:
    for rule in rules:
        if has_glob(rule.value):
            for match in facts.globs.get(rule.value, ()):
                yield match, rule
        else:
            yield rule.value, rule


def _git_remap(path: str, policy: Policy, facts: DiskFacts) -> str:
    """`<ws>/.git/hooks` of a worktree or submodule lives in the common git directory."""
    prefix = f"{policy.workspace}/.git/"
    if facts.git is None or not path.startswith(prefix):
        return path
    return f"{facts.git.common_dir}/{path[len(prefix) :]}"


class _Planner:
    def __init__(self, policy: Policy, facts: DiskFacts) -> None:
        self.policy = policy
        self.facts = facts
        self.mounts: list[Mount] = []
        self.placeholders: list[str] = []
        self.denied: list[Denied] = []
        self.notes: list[str] = []
        self.readable: list[str] = []
        self.writable: list[str] = []

    def covering(self, path: str) -> Mount | None:
        """The mount that decides what `path` is inside the sandbox (the deepest one above it)."""
        best: Mount | None = None
        for mount in self.mounts:
            if mount.kind in ("dev", "proc", "symlink"):
                continue
            deeper = best is None or _depth(mount.dest) >= _depth(best.dest)
            if deeper and is_within(path, mount.dest):
                best = mount
        return best

    def add_read_roots(self) -> None:
        roots = []
        for rule in self.policy.filesystem.read:
            fact = _fact(self.facts, rule.value)
            if fact.kind == "missing":
                self.notes.append(f"read path {rule.value} does not exist ({rule.origin})")
                continue
            roots.append((rule.value, fact))
        for path, fact in sorted(roots, key=lambda item: _depth(item[1].real)):
            if fact.is_link and path.count("/") == 1:
                # A top-level link such as /bin -> /usr/bin (merged /usr) in a sparse root.
                self.mounts.append(Mount("symlink", path, fact.real))
            if fact.real == "/" or not self.covering(fact.real):
                self.mounts.append(Mount("ro-bind", fact.real, fact.real))
            self.readable.append(fact.real)
        self.mounts += [Mount("dev", "/dev"), Mount("proc", "/proc")]
        if self.policy.filesystem.private_tmp:
            self.mounts.append(Mount("tmpfs", "/tmp"))
            self.writable.append("/tmp")

    def hidden_reals(self) -> list[str]:
        reals = []
        for path, _rule in _expanded(self.policy.filesystem.deny_read, self.facts):
            fact = _fact(self.facts, path)
            if fact.kind != "missing":
                reals.append(fact.real)
        return reals

    def add_writable(self) -> None:
        hidden = self.hidden_reals()
        binds: list[tuple[str, Rule]] = []
        for rule in self.policy.filesystem.write:
            fact = _fact(self.facts, rule.value)
            if fact.kind == "missing":
                self.notes.append(f"writable path {rule.value} does not exist ({rule.origin})")
            elif any(is_within(fact.real, h) for h in hidden):
                self.notes.append(f"writable path {rule.value} is inside a denied path: deny wins")
            else:
                binds.append((fact.real, rule))
        git = self.facts.git
        workspace_writable = any(is_within(self.policy.workspace, real) for real, _ in binds)
        if git is not None and workspace_writable:
            # A worktree's git directory lives outside the workspace; git must still commit.
            origin = Origin("built-in", "git directory of the workspace")
            for real in sorted({git.git_dir, git.common_dir}, key=_depth):
                if not any(is_within(real, bound) for bound, _ in binds):
                    binds.append((real, Rule(real, origin)))
        seen: set[str] = set()
        for real, _rule in sorted(binds, key=lambda item: _depth(item[0])):
            if real in seen:
                continue
            seen.add(real)
            self.mounts.append(Mount("bind", real, real))
            self.writable.append(real)

    def add_placeholder(self, fact: PathFact, rule: Rule, access: Literal["read", "write"]) -> None:
        if not fact.parent_exists:
            self.notes.append(f"{fact.real}: parent missing, not protected ({rule.origin})")
            return
        self.placeholders.append(fact.real)
        self.mounts.append(Mount("placeholder", fact.real))
        self.denied.append(Denied(fact.real, access, rule))

    def add_protected(self) -> None:
        for path, rule in _expanded(self.policy.filesystem.deny_write, self.facts):
            fact = _fact(self.facts, _git_remap(path, self.policy, self.facts))
            cover = self.covering(fact.real)
            if cover is None or cover.kind != "bind":
                continue  # already read-only, or not the host's file at all (private /tmp)
            if fact.kind == "missing":
                self.add_placeholder(fact, rule, "write")
            else:
                self.mounts.append(Mount("ro-bind", fact.real, fact.real))
                self.denied.append(Denied(fact.real, "write", rule))

    def add_hidden(self) -> None:
        for path, rule in _expanded(self.policy.filesystem.deny_read, self.facts):
            fact = _fact(self.facts, path)
            cover = self.covering(fact.real)
            if cover is None or cover.kind not in ("bind", "ro-bind"):
                continue  # not visible inside
            if fact.kind == "missing":
                if cover.kind == "bind":
                    self.add_placeholder(fact, rule, "read")
                continue
            kind: MountKind = "hide-dir" if fact.kind == "dir" else "hide-file"
            self.mounts.append(Mount(kind, fact.real))
            self.denied.append(Denied(fact.real, "read", rule))


def plan_filesystem(policy: Policy, facts: DiskFacts) -> FilesystemPlan:
    planner = _Planner(policy, facts)
    planner.add_read_roots()
    planner.add_writable()
    planner.add_protected()
    planner.add_hidden()
    return FilesystemPlan(
        mounts=tuple(planner.mounts),
        placeholders=tuple(dict.fromkeys(planner.placeholders)),
        readable=tuple(planner.readable),
        writable=tuple(planner.writable),
        denied=tuple(planner.denied),
        notes=tuple(planner.notes),
    )


def explain(real_path: str, plan: FilesystemPlan) -> Denied | None:
    """The rule that denies `real_path` (symlinks resolved) inside the sandbox, if any."""
    best: Denied | None = None
    for denied in plan.denied:
        deeper = best is None or _depth(denied.path) > _depth(best.path)
        if deeper and is_within(real_path, denied.path):
            best = denied
    return best

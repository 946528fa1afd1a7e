"""Disk facts gathered once before a launch, so that every planner and builder stays pure.

The planners (`fsplan.py`) and argv builders never touch the disk: what exists, what is a
symlink and where it points, which paths a glob matches and where the workspace's git
directory lives are all read here, in one place, and handed over as data. That is also what
lets the symlink and missing-path cases be unit-tested with hand-written facts.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from typing import Literal, NamedTuple

from corral.policy.model import Policy
from corral.policy.paths import has_glob

PathKind = Literal["missing", "file", "dir", "other"]


class PathFact(NamedTuple):
    kind: PathKind
    """What the path finally points at, after symlinks."""
    real: str
    """The path with every symlink resolved (for a missing path: its existing prefix resolved)."""
    is_link: bool = False
    parent_exists: bool = True


class GitLayout(NamedTuple):
    """Where the workspace repository's files live; differs from <ws>/.git for worktrees."""

    git_dir: str
    common_dir: str


class DiskFacts(NamedTuple):
    paths: dict[str, PathFact]
    globs: dict[str, tuple[str, ...]]
    git: GitLayout | None


class _Resolver:
    """`os.path.realpath` for the many paths of one gathering, each directory resolved once,
    and each path's lstat (and stat, for a link) read once: most paths share their parents.

    The policy's ~60 paths share most of their directories (the home, the workspace), and
    realpath walks every component of every path with an lstat: about 350 system calls a
    launch. Here a path's real location is its parent's real location plus its name, checked
    with one lstat; where that is a symlink, `os.path.realpath` resolves the whole path itself.
    Same answers as realpath (also for a parent inside a symlink loop, where realpath stops and
    appends the rest unchanged), as long as the disk does not change during the gathering,
    which realpath path by path does not guarantee either. A _Resolver lives for one gathering
    only: nothing read from the disk is kept from one launch to the next.
    """

    def __init__(self) -> None:
        self._real: dict[str, str] = {"/": "/"}
        self._lstat: dict[str, os.stat_result | None] = {}
        self._stat: dict[str, os.stat_result | None] = {}

    def stat(self, path: str) -> os.stat_result | None:
        """`os.stat` (symlinks followed), None where it fails. Where the path's lstat shows
        no symlink, stat would say the same (both follow the parents alike): no second call."""
        st = self.lstat(path)
        if st is None or not stat.S_ISLNK(st.st_mode):
            return st
        if path in self._stat:
            return self._stat[path]
        try:
            followed: os.stat_result | None = os.stat(path)
        except OSError:
            followed = None
        self._stat[path] = followed
        return followed

    def lstat(self, path: str) -> os.stat_result | None:
        if path in self._lstat:
            return self._lstat[path]
        try:
            st: os.stat_result | None = os.lstat(path)
        except OSError:
            st = None
        self._lstat[path] = st
        return st

    def is_link(self, path: str) -> bool:
        st = self.lstat(path)
        return st is not None and stat.S_ISLNK(st.st_mode)

    def realpath(self, path: str) -> str:
        real = self._real.get(path)
        if real is not None:
            return real
        parent, _, name = path.rpartition("/")
        if not path.startswith("/") or name in ("", ".", ".."):
            real = os.path.realpath(path)  # not a plain name: no shortcut
        else:
            base = self.realpath(parent or "/")
            candidate = f"/{name}" if base == "/" else f"{base}/{name}"
            real = os.path.realpath(path) if self.is_link(candidate) else candidate
        self._real[path] = real
        return real


def path_fact(path: str, resolver: _Resolver | None = None) -> PathFact:
    resolver = resolver or _Resolver()
    real = resolver.realpath(path)
    st = resolver.stat(real)
    if st is None:
        parent = resolver.stat(os.path.dirname(real))
        parent_exists = parent is not None and stat.S_ISDIR(parent.st_mode)
        return PathFact("missing", real, resolver.is_link(path), parent_exists)
    if stat.S_ISDIR(st.st_mode):
        kind: PathKind = "dir"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    else:
        kind = "other"
    return PathFact(kind, real, resolver.is_link(path))


def expand_glob(pattern: str) -> tuple[str, ...]:
    import glob  # only policies with globs pay for it

    return tuple(sorted(glob.glob(pattern, recursive=True, include_hidden=True)))


def find_git_layout(workspace: str) -> GitLayout | None:
    """Follow `<ws>/.git` whether it is a directory or a `gitdir:` file (worktree, submodule)."""
    dot_git = os.path.join(workspace, ".git")
    if os.path.isdir(dot_git):
        git_dir = os.path.realpath(dot_git)
    elif os.path.isfile(dot_git):
        try:
            with open(dot_git, encoding="utf-8") as f:
                first = f.readline().strip()
        except OSError:
            return None
        if not first.startswith("gitdir:"):
            return None
        target = first[len("gitdir:") :].strip()
        git_dir = os.path.realpath(os.path.join(workspace, target))
    else:
        return None
    common_dir = git_dir
    try:
        with open(os.path.join(git_dir, "commondir"), encoding="utf-8") as f:
            common_dir = os.path.realpath(os.path.join(git_dir, f.read().strip()))
    except OSError:
        pass
    return GitLayout(git_dir, common_dir)


def policy_paths(policy: Policy) -> Iterable[str]:
    fs = policy.filesystem
    for rules in (fs.read, fs.write, fs.deny_read, fs.deny_write):
        for rule in rules:
            yield rule.value


class FactQuery(NamedTuple):
    """The paths whose facts a launch needs, as the policy names them: each path with whether
    it is a glob. Depends on the policy only, so a Sandbox makes it once (`fact_query`); the
    disk is read by `gather_facts`, for every launch."""

    paths: tuple[tuple[str, bool], ...]
    workspace: str


def fact_query(policy: Policy, *, extra_paths: Iterable[str] = ()) -> FactQuery:
    paths = tuple((path, has_glob(path)) for path in (*policy_paths(policy), *extra_paths))
    return FactQuery(paths, policy.workspace)


def gather_disk_facts(policy: Policy, *, extra_paths: Iterable[str] = ()) -> DiskFacts:
    return gather_facts(fact_query(policy, extra_paths=extra_paths))


def gather_facts(query: FactQuery) -> DiskFacts:
    """What the disk says now about the paths of `query` (and of the workspace's git layout)."""
    git = find_git_layout(query.workspace)
    globs: dict[str, tuple[str, ...]] = {}
    wanted: list[str] = []
    for path, is_glob in query.paths:
        if is_glob:
            globs[path] = matches = expand_glob(path)
            wanted.extend(matches)
        else:
            wanted.append(path)
    if git is not None:
        for base in {git.git_dir, git.common_dir}:
            wanted += [base, f"{base}/hooks", f"{base}/config"]
    resolver = _Resolver()
    paths = {path: path_fact(path, resolver) for path in dict.fromkeys(wanted)}
    return DiskFacts(paths=paths, globs=globs, git=git)

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


def path_fact(path: str) -> PathFact:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        parent_exists = os.path.isdir(os.path.dirname(real))
        return PathFact("missing", real, os.path.islink(path), parent_exists)
    if stat.S_ISDIR(st.st_mode):
        kind: PathKind = "dir"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    else:
        kind = "other"
    return PathFact(kind, real, os.path.islink(path))


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


def gather_disk_facts(policy: Policy, *, extra_paths: Iterable[str] = ()) -> DiskFacts:
    git = find_git_layout(policy.workspace)
    globs: dict[str, tuple[str, ...]] = {}
    wanted: list[str] = []
    for path in (*policy_paths(policy), *extra_paths):
        if has_glob(path):
            globs[path] = matches = expand_glob(path)
            wanted.extend(matches)
        else:
            wanted.append(path)
    if git is not None:
        for base in {git.git_dir, git.common_dir}:
            wanted += [base, f"{base}/hooks", f"{base}/config"]
    paths = {path: path_fact(path) for path in dict.fromkeys(wanted)}
    return DiskFacts(paths=paths, globs=globs, git=git)

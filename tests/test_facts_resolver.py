"""The fact gatherer's shared-directory realpath gives os.path.realpath's answers.

`gather_disk_facts` resolves each directory once for all the policy's paths (facts._Resolver);
where a mount goes depends on that answer, so it must be exactly os.path.realpath's, for
links absolute, relative, chained, dangling, looping and pointing through `..`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from corral.backends.facts import PathFact, PathKind, _Resolver, path_fact

# (name, symlink target; None: a directory). Made in this order under a temporary root.
TREE = [
    ("dir", None),
    ("dir/sub", None),
    ("link_dir", "dir"),
    ("link_rel", "./dir/sub"),
    ("link_up", "../{root_name}/dir"),
    ("chain", "link_dir"),
    ("abs_link", "{root}/dir/sub"),
    ("file_link", "dir/file"),
    ("dir/sub/back", "../.."),
    ("loop_a", "loop_b"),
    ("loop_b", "loop_a"),
    ("self_loop", "self_loop/x"),
    ("dangling", "nowhere/deeper"),
    ("dangling_abs", "/nonexistent-corral-test/x"),
]
SUFFIXES = ["", "/sub", "/sub/file", "/file", "/missing", "/missing/deeper", "/sub/back/dir"]


def make_tree(root: Path) -> list[str]:
    for name, target in TREE:
        where = root / name
        if target is None:
            where.mkdir()
        else:
            where.symlink_to(target.format(root=root, root_name=root.name))
    (root / "dir" / "file").write_text("x")
    (root / "dir" / "sub" / "file").write_text("x")
    names = [*(name for name, _ in TREE), "absent"]
    return [f"{root}/{name}{suffix}" for name in names for suffix in SUFFIXES]


@pytest.fixture
def queries(tmp_path: Path) -> list[str]:
    return [*make_tree(tmp_path), "/", "/proc/self", "/proc/self/cwd", f"{tmp_path}/", "relative"]


def test_one_resolver_for_all_paths_agrees_with_realpath(queries: list[str]) -> None:
    resolver = _Resolver()
    got = {path: resolver.realpath(path) for path in queries}
    assert got == {path: os.path.realpath(path) for path in queries}


def reference_fact(path: str) -> PathFact:
    """The facts of one path read the plain way: realpath, stat, islink."""
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        parent_exists = os.path.isdir(os.path.dirname(real))
        return PathFact("missing", real, os.path.islink(path), parent_exists)
    kind: PathKind = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
    return PathFact(kind, real, os.path.islink(path))


def test_path_facts_agree_with_reading_each_path_the_plain_way(queries: list[str]) -> None:
    resolver = _Resolver()
    shared = [path_fact(path, resolver) for path in queries]
    assert shared == [reference_fact(path) for path in queries]


def test_a_link_is_seen_as_a_link(tmp_path: Path) -> None:
    make_tree(tmp_path)
    resolver = _Resolver()
    fact = path_fact(f"{tmp_path}/link_dir", resolver)
    assert (fact.kind, fact.real, fact.is_link) == ("dir", f"{tmp_path}/dir", True)
    missing = path_fact(f"{tmp_path}/dangling", resolver)
    assert (missing.kind, missing.is_link) == ("missing", True)

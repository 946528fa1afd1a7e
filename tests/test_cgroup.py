"""The per-sandbox cgroup v2, every file write checked against a fake cgroup directory.

This machine has cgroup v1 only, so nothing here writes to a real cgroup; the fake directory
stands in for the kernel's files, and `write` (the module's I/O seam) records each write.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from corral.backends.cgroup import (
    LEAF,
    cgroup_files,
    controllers_for,
    create_sandbox_cgroup,
    enable_controllers,
    join_cgroup,
    remove_cgroup,
    usable_cgroup_parent,
)
from corral.policy.model import Limits
from tests.test_limits import facts_of

LIMITS = Limits(processes=64, memory_bytes=256 << 20)


class FakeCgroupFs:
    """Records writes, keeps the last value in a regular file, and can refuse like the kernel."""

    def __init__(self, root: Path, *, busy: int = 0, missing: tuple[str, ...] = ()) -> None:
        self.root = root
        self.writes: list[tuple[str, str]] = []
        self.busy = busy  # how many subtree_control writes fail with EBUSY first
        self.missing = missing  # files the "kernel" does not offer

    def write(self, path: str, text: str) -> None:
        name = os.path.basename(path)
        if name in self.missing:
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        if name == "cgroup.subtree_control" and self.busy:
            self.busy -= 1
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        self.writes.append((os.path.relpath(path, self.root), text))
        Path(path).write_text(text)


def parent_dir(tmp_path: Path, *, controllers: str = "cpu memory pids", procs: str = "") -> str:
    parent = tmp_path / "user.slice" / "corral.scope"
    parent.mkdir(parents=True)
    (parent / "cgroup.controllers").write_text(controllers + "\n")
    (parent / "cgroup.subtree_control").write_text("\n")
    (parent / "cgroup.procs").write_text(procs)
    return str(parent)


@pytest.mark.parametrize(
    ("limits", "files"),
    [
        (Limits(), []),
        (Limits(processes=64), [("pids.max", "64")]),
        (
            Limits(memory_bytes=1024, open_files=5),
            [("memory.max", "1024"), ("memory.swap.max", "0")],
        ),
        (LIMITS, [("pids.max", "64"), ("memory.max", "268435456"), ("memory.swap.max", "0")]),
    ],
)
def test_cgroup_files(limits: Limits, files: list[tuple[str, str]]) -> None:
    assert cgroup_files(limits) == files


def test_controllers_for() -> None:
    assert controllers_for(LIMITS) == ["pids", "memory"]
    assert controllers_for(Limits(cpu_seconds=3)) == []


@pytest.mark.parametrize(
    ("controllers", "limits", "usable"),
    [
        ("cpu memory pids", LIMITS, True),
        ("cpu pids", LIMITS, False),  # memory not delegated
        ("cpu pids", Limits(processes=64), True),
        ("cpu memory pids", Limits(open_files=64), False),  # nothing for a cgroup to do
    ],
)
def test_usable_cgroup_parent(
    tmp_path: Path, controllers: str, limits: Limits, usable: bool
) -> None:
    parent = parent_dir(tmp_path, controllers=controllers)
    facts = facts_of(cgroup_v2_writable=parent)
    assert usable_cgroup_parent(facts, limits) == (parent if usable else None)


def test_no_writable_cgroup_means_no_parent() -> None:
    assert usable_cgroup_parent(facts_of(cgroup_v2_writable=None), LIMITS) is None


def test_create_enables_controllers_then_writes_the_limits(tmp_path: Path) -> None:
    parent = parent_dir(tmp_path)
    fs = FakeCgroupFs(tmp_path)
    path = create_sandbox_cgroup(parent, "7-8", LIMITS, own_pid=7, write=fs.write)
    assert path == f"{parent}/corral-7-8"
    assert os.path.isdir(path)
    scope = "user.slice/corral.scope"
    assert fs.writes == [
        (f"{scope}/cgroup.subtree_control", "+pids +memory"),
        (f"{scope}/corral-7-8/pids.max", "64"),
        (f"{scope}/corral-7-8/memory.max", "268435456"),
        (f"{scope}/corral-7-8/memory.swap.max", "0"),
    ]


def test_controllers_already_enabled_are_not_written_again(tmp_path: Path) -> None:
    parent = parent_dir(tmp_path)
    Path(parent, "cgroup.subtree_control").write_text("memory pids\n")
    fs = FakeCgroupFs(tmp_path)
    enable_controllers(parent, ["pids", "memory"], own_pid=7, write=fs.write)
    assert fs.writes == []


def test_busy_parent_with_only_corral_in_it_moves_corral_to_a_leaf(tmp_path: Path) -> None:
    parent = parent_dir(tmp_path, procs="7\n")
    fs = FakeCgroupFs(tmp_path, busy=1)
    enable_controllers(parent, ["pids"], own_pid=7, write=fs.write)
    scope = "user.slice/corral.scope"
    assert fs.writes == [
        (f"{scope}/{LEAF}/cgroup.procs", "7"),
        (f"{scope}/cgroup.subtree_control", "+pids"),
    ]


def test_busy_parent_shared_with_other_processes_is_left_alone(tmp_path: Path) -> None:
    parent = parent_dir(tmp_path, procs="7\n4242\n")  # the user's shell is in it too
    fs = FakeCgroupFs(tmp_path, busy=1)
    with pytest.raises(OSError) as info:
        enable_controllers(parent, ["pids"], own_pid=7, write=fs.write)
    assert info.value.errno == errno.EBUSY
    assert fs.writes == []
    assert not os.path.exists(f"{parent}/{LEAF}")


def test_missing_swap_file_is_skipped_but_a_missing_limit_is_an_error(tmp_path: Path) -> None:
    parent = parent_dir(tmp_path)
    fs = FakeCgroupFs(tmp_path, missing=("memory.swap.max",))
    path = create_sandbox_cgroup(parent, "1", LIMITS, own_pid=7, write=fs.write)
    assert [name for name, _ in fs.writes][-1].endswith("memory.max")
    fs = FakeCgroupFs(tmp_path, missing=("pids.max",))
    with pytest.raises(FileNotFoundError):
        create_sandbox_cgroup(parent, "2", LIMITS, own_pid=7, write=fs.write)
    assert not os.path.exists(f"{parent}/corral-2")  # removed again
    assert os.path.isdir(path)


def test_join_and_remove(tmp_path: Path) -> None:
    parent = parent_dir(tmp_path)
    fs = FakeCgroupFs(tmp_path)
    path = create_sandbox_cgroup(parent, "3", Limits(processes=2), own_pid=7, write=fs.write)
    join_cgroup(path, 12345, write=fs.write)
    assert fs.writes[-1] == ("user.slice/corral.scope/corral-3/cgroup.procs", "12345")
    for name in os.listdir(path):  # the kernel's files vanish with the directory
        os.unlink(f"{path}/{name}")
    remove_cgroup(path)
    remove_cgroup(path)  # already gone: fine
    assert not os.path.exists(path)

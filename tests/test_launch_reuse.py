"""What a Sandbox reuses from one launch to the next, and what it must not.

A Sandbox reuses its filesystem plan while the disk facts stay the same, but gathers the facts
afresh for every launch: a denied path that appears between two launches is hidden in the
second one.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import SECRET, Layout, run_script


def test_the_plan_is_reused_while_the_disk_is_unchanged(layout: Layout) -> None:
    box = layout.sandbox()
    assert box._plan() is box._plan()


def test_the_plan_is_remade_when_a_denied_path_appears(layout: Layout) -> None:
    box = layout.sandbox()
    before = box._plan()
    os.makedirs(f"{layout.home}/.aws")
    after = box._plan()
    assert after is not before
    assert f"{layout.home}/.aws" in [denied.path for denied in after.denied]


@pytest.mark.usefixtures("sandbox_available")
def test_a_secret_created_between_two_launches_is_hidden_in_the_second(layout: Layout) -> None:
    box = layout.sandbox()
    argv = ["cat", f"{layout.home}/.aws/credentials"]
    first = box.run(argv, env=layout.env, capture_output=True, timeout=60)
    assert first.returncode != 0  # not there yet
    os.makedirs(f"{layout.home}/.aws")
    with open(f"{layout.home}/.aws/credentials", "w") as f:
        f.write(SECRET)
    control = run_script(layout, " ".join(argv), sandboxed=False)
    assert SECRET.encode() in (control.stdout or b"")
    second = box.run(argv, env=layout.env, capture_output=True, timeout=60)
    assert second.returncode != 0
    assert SECRET.encode() not in (second.stdout or b"") + (second.stderr or b"")

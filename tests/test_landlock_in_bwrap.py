"""Landlock inside bubblewrap: the second wall holds where the mounts alone would not.

A directory fd passed into the sandbox (by a careless caller, or leaked by a bug) points
outside every mount; the mount namespace cannot stop `openat(fd, ...)`, Landlock can.
"""

from __future__ import annotations

import os

import pytest

from corral.probe import probe
from tests.conftest import Layout

pytestmark = pytest.mark.usefixtures("sandbox_available")

PLANT = (
    "import os, sys\n"
    "fd = os.open('loot', os.O_CREAT | os.O_WRONLY, dir_fd=int(sys.argv[1]))\n"
    "os.close(fd)\n"
)


@pytest.mark.parametrize("landlock", [False, True], ids=["mounts-only", "with-landlock"])
def test_directory_fd_from_outside_cannot_write_there(layout: Layout, landlock: bool) -> None:
    box = layout.sandbox()
    facts = probe(cache_dir=layout.host().machine_cache_dir)
    if landlock and facts.landlock_abi == 0:
        pytest.fail("this kernel has no Landlock; the test needs it to prove the layer")
    box._facts = facts if landlock else facts._replace(landlock_abi=0)
    outside = os.open(layout.outside, os.O_RDONLY | os.O_DIRECTORY)
    try:
        box.run(
            ["python3", "-c", PLANT, str(outside)],
            env=layout.env,
            pass_fds=(outside,),
            capture_output=True,
            timeout=60,
        )
    finally:
        os.close(outside)
    planted = os.path.exists(f"{layout.outside}/loot")
    assert planted != landlock

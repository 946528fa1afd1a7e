"""What a launch costs and leaves: bwrap runs once, caches are private and persistent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.policy.presets import package_cache_dir
from tests.conftest import Layout, run_script

pytestmark = pytest.mark.usefixtures("sandbox_available")


def test_bwrap_runs_once_per_command(layout: Layout) -> None:
    real = shutil.which("bwrap")
    assert real is not None
    shim_dir = f"{layout.root}/shim"
    os.makedirs(shim_dir)
    log = f"{layout.root}/bwrap-calls.log"
    with open(f"{shim_dir}/bwrap", "w") as f:
        f.write(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    os.chmod(f"{shim_dir}/bwrap", 0o755)
    env = {**layout.env, "PATH": f"{shim_dir}:{layout.env['PATH']}"}
    cli = [sys.executable, "-m", "corral", "run", "--", "true"]
    for _ in range(3):
        subprocess.run(cli, cwd=layout.workspace, env=env, check=True)
    with open(log) as f:
        calls = f.read().splitlines()
    # The first command of a boot probes `bwrap --version` once; after that, one bwrap each.
    sandboxes = [c for c in calls if "--version" not in c]
    assert len(sandboxes) == 3
    assert len(calls) <= 4


def test_package_caches_are_private_persistent_and_outside_the_workspace(layout: Layout) -> None:
    before = sorted(os.listdir(layout.workspace))
    script = 'mkdir -p "$PIP_CACHE_DIR" "$npm_config_cache" && echo cached > "$PIP_CACHE_DIR/x"'
    result = run_script(layout, script, sandboxed=True)
    assert result.returncode == 0, result.stderr
    cache = package_cache_dir(layout.host())
    with open(f"{cache}/pip/x") as f:
        assert f.read() == "cached\n"
    assert sorted(os.listdir(layout.workspace)) == before
    again = run_script(layout, 'cat "$PIP_CACHE_DIR/x"', sandboxed=True)
    assert (again.stdout or b"").decode() == "cached\n"


def test_each_workspace_gets_its_own_cache(layout: Layout) -> None:
    other = layout._replace(workspace=f"{layout.home}/other")
    os.makedirs(other.workspace)
    assert package_cache_dir(layout.host()) != package_cache_dir(other.host())


def test_first_launches_racing_for_the_empty_file_all_get_it(tmp_path: Path) -> None:
    # Several sandboxes starting at once on a fresh state directory (the bridge's workers)
    # all need the empty file that stands in for hidden ones; none may fail for the others.
    import threading

    from corral.launch import ensure_empty_file

    for round_ in range(50):
        path = str(tmp_path / f"empty{round_}")
        start = threading.Barrier(8)
        failures: list[BaseException] = []

        def make(
            path: str = path,
            start: threading.Barrier = start,
            failures: list[BaseException] = failures,
        ) -> None:
            start.wait()
            try:
                ensure_empty_file(path)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=make) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert os.stat(path).st_mode & 0o7777 == 0o444 and os.path.getsize(path) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(f"empty{n}" for n in range(50))

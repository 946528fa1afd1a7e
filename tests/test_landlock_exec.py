"""The native Landlock launcher, run on the host: it restricts, adds its inside rules, and
execs; its own failures have their own exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from corral.backends.landlock import compile_ruleset, handled_access_fs, make_rules
from corral.backends.landlock_exec import EXIT_LAUNCHER, EXIT_NOT_FOUND, launcher_image
from corral.backends.seccomp import host_arch
from corral.inner import prepare
from corral.probe import landlock_abi

ABI = landlock_abi(host_arch())
pytestmark = pytest.mark.skipif(
    host_arch() != "x86_64", reason="NATIVE LAUNCHER TESTS SKIPPED: only x86_64 has one"
)


def launch(command: list[str], *, writable: str, inside: tuple[str, ...] = ()) -> int:
    if ABI == 0:
        pytest.fail("this kernel has no Landlock; the launcher cannot be tested")
    system = ("/usr", "/etc", "/lib", "/lib64", "/bin", "/proc", "/dev")
    rules = make_rules(ABI, read=system, write=(writable,), connect_ports=None, bind_ports=None)
    prepared = prepare(compile_ruleset(rules))
    self_fd = os.memfd_create("test-launcher", os.MFD_CLOEXEC)
    image = launcher_image(
        "x86_64",
        rules_fd=prepared.ruleset_fd,
        self_fd=self_fd,
        reset_terminal_signals=False,
        inside_paths=inside,
        inside_access=handled_access_fs(ABI),
    )
    assert image is not None and image[:4] == b"\x7fELF"
    os.write(self_fd, image)
    try:
        done = subprocess.run(
            [f"/proc/self/fd/{self_fd}", *command], pass_fds=(self_fd, prepared.ruleset_fd)
        )
    finally:
        os.close(self_fd)
        prepared.close()
    return done.returncode


@pytest.fixture
def dirs() -> Iterator[tuple[str, str]]:
    writable = tempfile.mkdtemp(dir="/var/tmp")
    other = tempfile.mkdtemp(dir="/var/tmp")
    yield writable, other
    shutil.rmtree(writable)
    shutil.rmtree(other)


def test_writes_only_where_the_rules_say(dirs: tuple[str, str]) -> None:
    writable, other = dirs
    script = f"echo ok > {writable}/a; echo no > {other}/b; true"
    assert launch(["/bin/sh", "sh", "-c", script], writable=writable) == 0
    assert os.path.exists(f"{writable}/a")
    assert not os.path.exists(f"{other}/b")


def test_inside_rules_are_added_before_restricting(dirs: tuple[str, str]) -> None:
    writable, other = dirs
    script = f"echo yes > {other}/b"
    assert launch(["/bin/sh", "sh", "-c", script], writable=writable, inside=(other,)) == 0
    assert os.path.exists(f"{other}/b")


def test_exit_codes_of_its_own(dirs: tuple[str, str]) -> None:
    writable, _ = dirs
    assert launch(["/no/such/command", "x"], writable=writable) == EXIT_NOT_FOUND
    missing_inside = ("/no/such/dir",)
    assert launch(["/bin/true", "true"], writable=writable, inside=missing_inside) == EXIT_LAUNCHER

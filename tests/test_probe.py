"""The machine probe: deciders in yes/no pairs, the per-boot cache, and one real gather."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import corral.probe as probe_mod
from corral.probe import (
    MachineFacts,
    bwrap_verdict,
    can_use_namespaces,
    gather_facts,
    landlock_verdict,
    probe,
    tiocsti_verdict,
    userns_verdict,
)
from corral.probe_verdicts import kernel_version
from tests.machines import HEALTHY


def test_healthy_machine_passes_every_decider() -> None:
    for decide in (userns_verdict, bwrap_verdict, landlock_verdict, tiocsti_verdict):
        assert decide(HEALTHY).ok, decide
    assert can_use_namespaces(HEALTHY)


# --- user namespaces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "ok", "fix_has"),
    [
        ({"max_user_namespaces": 0}, False, "sudo sysctl -w user.max_user_namespaces="),
        ({"max_user_namespaces": 0, "is_root": True}, False, "user.max_user_namespaces"),
        ({"max_user_namespaces": 1}, True, ""),
        ({"max_user_namespaces": None}, True, ""),
        ({"unprivileged_userns_clone": 0}, False, "kernel.unprivileged_userns_clone=1"),
        ({"unprivileged_userns_clone": 0, "is_root": True}, True, ""),
        ({"unprivileged_userns_clone": None}, True, ""),
        ({"apparmor_restrict_userns": 1}, False, "/etc/apparmor.d/bwrap"),
        ({"apparmor_restrict_userns": 1, "is_root": True}, True, ""),
        ({"apparmor_restrict_userns": None}, True, ""),
    ],
)
def test_userns_verdict(changes: dict[str, Any], ok: bool, fix_has: str) -> None:
    verdict = userns_verdict(HEALTHY._replace(**changes))
    assert verdict.ok is ok
    assert fix_has in verdict.fix
    assert bool(verdict.fix) is not ok


def test_sysctl_fixes_say_how_to_persist() -> None:
    for facts in (
        HEALTHY._replace(max_user_namespaces=0),
        HEALTHY._replace(unprivileged_userns_clone=0),
    ):
        assert "/etc/sysctl.d/" in userns_verdict(facts).fix


def test_apparmor_fix_offers_a_profile_with_userns_and_the_sysctl() -> None:
    fix = userns_verdict(HEALTHY._replace(apparmor_restrict_userns=1)).fix
    assert "userns," in fix
    assert "profile bwrap /usr/bin/bwrap" in fix
    assert "apparmor_parser -r /etc/apparmor.d/bwrap" in fix
    assert "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0" in fix
    assert "/etc/sysctl.d/" in fix
    # The profile names the bwrap this machine has, not a guess.
    other = HEALTHY._replace(apparmor_restrict_userns=1, bwrap_path="/opt/bw/bin/bwrap")
    assert "profile bwrap /opt/bw/bin/bwrap" in userns_verdict(other).fix


# --- bubblewrap --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "ok", "fix_has"),
    [
        ({"bwrap_path": None, "bwrap_version": None}, False, "apt-get install bubblewrap"),
        ({"bwrap_version": None}, False, "reinstall"),
        ({"bwrap_version": (0, 3, 3)}, False, "upgrade"),
        ({"bwrap_version": (0, 4, 0)}, True, ""),
        ({"bwrap_version": (0, 11, 0)}, True, ""),
    ],
)
def test_bwrap_verdict(changes: dict[str, Any], ok: bool, fix_has: str) -> None:
    verdict = bwrap_verdict(HEALTHY._replace(**changes))
    assert verdict.ok is ok
    assert fix_has in verdict.fix


def test_missing_bwrap_names_each_package_manager() -> None:
    fix = bwrap_verdict(HEALTHY._replace(bwrap_path=None, bwrap_version=None)).fix
    for command in ("apt-get install", "dnf install", "pacman -S"):
        assert command in fix


def test_bwrap_verdict_reports_version_and_setuid() -> None:
    assert "0.9.0" in bwrap_verdict(HEALTHY).reason
    assert "setuid" not in bwrap_verdict(HEALTHY).reason
    assert "setuid" in bwrap_verdict(HEALTHY._replace(bwrap_setuid=True)).reason


# --- Landlock and TIOCSTI ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "ok", "fix_has"),
    [
        ({"landlock_abi": 0, "kernel": "5.10.0-28-amd64"}, False, "5.13"),
        ({"landlock_abi": 0, "kernel": "6.8.0-45-generic"}, False, "lsm="),
        ({"landlock_abi": 0, "container": "docker"}, False, "seccomp profile"),
        ({"landlock_abi": 1, "kernel": "5.13.0"}, True, ""),
    ],
)
def test_landlock_verdict(changes: dict[str, Any], ok: bool, fix_has: str) -> None:
    verdict = landlock_verdict(HEALTHY._replace(**changes))
    assert verdict.ok is ok
    assert fix_has in verdict.fix


@pytest.mark.parametrize(
    ("legacy_tiocsti", "seccomp", "ok", "fix_has"),
    [
        (1, False, False, "dev.tty.legacy_tiocsti=0"),
        (1, True, True, ""),
        (None, False, False, "6.2"),
        (None, True, True, ""),
        (0, False, True, ""),
        (0, True, True, ""),
    ],
)
def test_tiocsti_verdict(legacy_tiocsti: int | None, seccomp: bool, ok: bool, fix_has: str) -> None:
    verdict = tiocsti_verdict(HEALTHY._replace(legacy_tiocsti=legacy_tiocsti, seccomp=seccomp))
    assert verdict.ok is ok
    assert fix_has in verdict.fix


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"bwrap_path": None, "bwrap_version": None}, False),
        ({"bwrap_version": (0, 3, 0)}, False),
        ({"max_user_namespaces": 0}, False),
        ({"max_user_namespaces": 0, "bwrap_setuid": True}, True),
        ({"apparmor_restrict_userns": 1}, False),
        ({"apparmor_restrict_userns": 1, "is_root": True}, True),
    ],
)
def test_can_use_namespaces(changes: dict[str, Any], expected: bool) -> None:
    assert can_use_namespaces(HEALTHY._replace(**changes)) is expected


# --- parsers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bubblewrap 0.8.0\n", (0, 8, 0)),
        ("bubblewrap 0.11.0-rc1", (0, 11, 0)),
        ("bubblewrap 1.0", (1, 0, 0)),
        ("bubblewrap x.1", None),
        ("firejail 0.9.72", None),
        ("", None),
    ],
)
def test_parse_bwrap_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert probe_mod.parse_bwrap_version(text) == expected


@pytest.mark.parametrize(
    ("release", "expected"),
    [("6.8.0-45-generic", (6, 8)), ("5.13", (5, 13)), ("6.18.44-fc-v782", (6, 18)), ("x", (0, 0))],
)
def test_kernel_version(release: str, expected: tuple[int, int]) -> None:
    assert kernel_version(release) == expected


@pytest.mark.parametrize(
    ("dockerenv", "containerenv", "environ", "cgroup", "expected"),
    [
        (True, False, None, None, "docker"),
        (False, True, None, None, "podman"),
        (False, False, "HOME=/\0container=lxc\0", None, "lxc"),
        (False, False, "container=systemd-nspawn\0", None, "systemd-nspawn"),
        (False, False, None, "0::/docker/0123abcd\n", "docker"),
        (False, False, None, "0::/kubepods/burstable/pod1\n", "kubernetes"),
        (False, False, "HOME=/\0container=\0", "0::/init.scope\n", None),
        (False, False, None, "0::/\n", None),
    ],
)
def test_detect_container(
    dockerenv: bool, containerenv: bool, environ: str | None, cgroup: str | None, expected: str
) -> None:
    found = probe_mod.detect_container(
        dockerenv=dockerenv, containerenv=containerenv, pid1_environ=environ, pid1_cgroup=cgroup
    )
    assert found == expected


CGROUP2_MOUNT = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n"
HYBRID_MOUNT = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
NESTED_MOUNT = "50 40 0:30 /user.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
V1_ONLY = "33 31 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"


@pytest.mark.parametrize(
    ("mountinfo", "own", "expected"),
    [
        (CGROUP2_MOUNT, "0::/user.slice/u.service\n", "/sys/fs/cgroup/user.slice/u.service"),
        (CGROUP2_MOUNT, "0::/\n", "/sys/fs/cgroup"),
        (HYBRID_MOUNT, "4:memory:/x\n0::/\n", "/sys/fs/cgroup/unified"),
        (NESTED_MOUNT, "0::/user.slice/app\n", "/sys/fs/cgroup/app"),
        (NESTED_MOUNT, "0::/system.slice/app\n", None),
        (V1_ONLY, "0::/\n", None),
        (CGROUP2_MOUNT, "4:memory:/x\n", None),
    ],
)
def test_cgroup_v2_dir(mountinfo: str, own: str, expected: str | None) -> None:
    assert probe_mod.cgroup_v2_dir(mountinfo, own) == expected


def test_has_seccomp() -> None:
    assert probe_mod.has_seccomp("Name:\tx\nSeccomp:\t0\nSeccomp_filters:\t0\n")
    assert not probe_mod.has_seccomp("Name:\tx\nNoNewPrivs:\t0\n")
    assert not probe_mod.has_seccomp(None)


# --- the cache ---------------------------------------------------------------------------------


class Counter:
    """A gatherer that counts its calls and returns facts whose sysctls match this machine, so
    that only the cache rules under test decide between hit and miss."""

    def __init__(self, **changes: Any) -> None:
        self.calls = 0
        live: dict[str, Any] = dict(probe_mod.read_volatile())
        live["bwrap_path"] = probe_mod.find_executable("bwrap")
        self.facts = HEALTHY._replace(**live)._replace(**changes)

    def __call__(self) -> MachineFacts:
        self.calls += 1
        return self.facts


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake boot id and a fake bwrap on PATH; returns the cache directory."""
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("11111111-2222-3333-4444-555555555555\n")
    monkeypatch.setattr(probe_mod, "BOOT_ID_PATH", str(boot_id))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    write_fake_bwrap(bindir, "0.9.0")
    monkeypatch.setenv("PATH", str(bindir))
    return tmp_path / "cache"


def write_fake_bwrap(bindir: Path, version: str) -> None:
    bwrap = bindir / "bwrap"
    bwrap.write_text(f"#!/bin/sh\necho bubblewrap {version}\n")
    bwrap.chmod(0o755)


def test_cache_hit_does_not_gather_again(machine: Path) -> None:
    gather = Counter()
    first = probe(cache_dir=str(machine), gather=gather)
    second = probe(cache_dir=str(machine), gather=gather)
    assert gather.calls == 1
    assert first == second == gather.facts
    assert [p.name for p in machine.iterdir()] == ["probe-11111111-2222-3333-4444-555555555555.txt"]


def test_refresh_gathers_again(machine: Path) -> None:
    gather = Counter()
    probe(cache_dir=str(machine), gather=gather)
    probe(cache_dir=str(machine), gather=gather, refresh=True)
    assert gather.calls == 2


def test_new_boot_misses_and_drops_the_old_file(machine: Path, tmp_path: Path) -> None:
    gather = Counter()
    probe(cache_dir=str(machine), gather=gather)
    (tmp_path / "boot_id").write_text("99999999-2222-3333-4444-555555555555\n")
    probe(cache_dir=str(machine), gather=gather)
    assert gather.calls == 2
    assert [p.name for p in machine.iterdir()] == ["probe-99999999-2222-3333-4444-555555555555.txt"]


def test_changed_bwrap_misses(machine: Path, tmp_path: Path) -> None:
    gather = Counter()
    probe(cache_dir=str(machine), gather=gather)
    write_fake_bwrap(tmp_path / "bin", "0.10.0")  # another size, as after an upgrade
    probe(cache_dir=str(machine), gather=gather)
    probe(cache_dir=str(machine), gather=gather)
    assert gather.calls == 2


def test_bwrap_made_setuid_misses(machine: Path, tmp_path: Path) -> None:
    gather = Counter()
    probe(cache_dir=str(machine), gather=gather)
    (tmp_path / "bin" / "bwrap").chmod(0o4755)  # same size and mtime, other mode
    probe(cache_dir=str(machine), gather=gather)
    assert gather.calls == 2


def test_changed_sysctl_misses(machine: Path) -> None:
    # The cached facts claim user namespaces are off; the live sysctl says otherwise.
    gather = Counter(max_user_namespaces=0)
    assert probe_mod.read_volatile()["max_user_namespaces"] != 0
    probe(cache_dir=str(machine), gather=gather)
    probe(cache_dir=str(machine), gather=gather)
    assert gather.calls == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: "garbage\x00\n",
        lambda text: "",
        lambda text: text.replace("landlock_abi=4", "landlock_abi=four"),
        lambda text: text.replace("seccomp=1", "seccomp=yes"),
        lambda text: text.replace("bwrap_version=0.9.0", "bwrap_version=0.9"),
        lambda text: text.replace("format=1", "format=0"),
        lambda text: text + "unknown=1\n",
        lambda text: text + "kernel=again\n",
        lambda text: "\n".join(line for line in text.split("\n") if "arch=" not in line),
    ],
)
def test_corrupt_cache_is_ignored_and_rewritten(
    machine: Path, damage: Callable[[str], str]
) -> None:
    gather = Counter()
    probe(cache_dir=str(machine), gather=gather)
    [cache_file] = machine.iterdir()
    cache_file.write_text(damage(cache_file.read_text()))
    assert probe(cache_dir=str(machine), gather=gather) == gather.facts
    assert probe(cache_dir=str(machine), gather=gather) == gather.facts
    assert gather.calls == 2  # once at first, once for the damaged file, then a hit


def test_forged_bwrap_path_misses(machine: Path) -> None:
    # A cache naming another program as bwrap, with a stamp that matches the real one.
    gather = Counter(bwrap_path="/home/user/.cache/not-bwrap")
    probe(cache_dir=str(machine), gather=gather)
    probe(cache_dir=str(machine), gather=gather)
    assert gather.calls == 2


def test_cache_round_trips_none_and_odd_paths(
    machine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = tmp_path / "a=b c"
    odd.mkdir()
    write_fake_bwrap(odd, "0.9.0")
    monkeypatch.setenv("PATH", str(odd))
    gather = Counter(
        bwrap_version=None,
        container=None,
        cgroup_v2_writable="/sys/fs/cgroup/user.slice/a:b=c",
        is_root=True,
    )
    assert gather.facts.bwrap_path == str(odd / "bwrap")
    probe(cache_dir=str(machine), gather=gather)
    assert probe(cache_dir=str(machine), gather=gather) == gather.facts
    assert gather.calls == 1


def test_value_with_newline_is_not_cached(machine: Path) -> None:
    gather = Counter(kernel="6.8\nlandlock_abi=0")
    assert probe(cache_dir=str(machine), gather=gather) == gather.facts
    assert probe(cache_dir=str(machine), gather=gather) == gather.facts
    assert gather.calls == 2
    assert not machine.exists() or not list(machine.iterdir())


def test_unwritable_cache_dir_is_not_an_error(machine: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    gather = Counter()
    assert probe(cache_dir=str(blocker / "cache"), gather=gather) == gather.facts


def test_no_boot_id_gathers_every_time(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_mod, "BOOT_ID_PATH", str(machine / "missing"))
    gather = Counter()
    probe(cache_dir=str(machine), gather=gather)
    probe(cache_dir=str(machine), gather=gather)
    assert gather.calls == 2
    assert not machine.exists()


# --- this machine ------------------------------------------------------------------------------


def test_gather_facts_on_this_machine() -> None:
    facts = gather_facts()
    assert facts.kernel == os.uname().release
    assert facts.arch == os.uname().machine
    assert facts.is_root is (os.geteuid() == 0)
    assert facts.bwrap_path is not None  # bubblewrap is installed here
    assert facts.bwrap_version is not None
    assert facts.bwrap_version >= (0, 4, 0)
    assert facts.landlock_abi >= 1
    assert facts.seccomp
    assert facts.max_user_namespaces is not None
    assert bwrap_verdict(facts).ok


def test_cache_hit_imports_neither_subprocess_nor_ctypes(tmp_path: Path) -> None:
    # The first probe (here) fills the cache; a fresh interpreter must then be served from it.
    cache_dir = str(tmp_path / "cache")
    probe(cache_dir=cache_dir)
    script = (
        "import sys\n"
        "from corral.probe import probe\n"
        f"probe(cache_dir={cache_dir!r})\n"
        "print(sorted(m for m in ('subprocess', 'ctypes', 'json', 'shutil') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"

"""`corral doctor`: checks from hand-built facts and fake live tries, formatting, one real run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from corral.doctor import (
    REQUIRED_FOR_DEFAULT_MODE,
    Check,
    default_mode_can_run,
    default_try_sandbox,
    explain_sandbox_failure,
    format_checks,
    run_checks,
)
from corral.probe import gather_facts
from tests.machines import HEALTHY


class FakeTry:
    """A live try that returns a fixed bwrap message and remembers whether it was asked."""

    def __init__(self, error: str | None) -> None:
        self.error = error
        self.calls = 0

    def __call__(self) -> str | None:
        self.calls += 1
        return self.error


def checks_for(error: str | None = None, **changes: Any) -> dict[str, Check]:
    checks = run_checks(HEALTHY._replace(**changes), try_sandbox=FakeTry(error))
    return {check.name: check for check in checks}


def test_healthy_machine_is_all_ok() -> None:
    checks = run_checks(HEALTHY, try_sandbox=FakeTry(None))
    assert [check.status for check in checks] == ["ok"] * len(checks)
    assert {check.name for check in checks} >= set(REQUIRED_FOR_DEFAULT_MODE)
    assert default_mode_can_run(checks)


# --- the live try: each cause of failure and its fix, against a working try ------------------

UID_MAP = "bwrap: setting up uid map: Permission denied"
NO_PERMS = (
    "bwrap: No permissions to creating new namespace, likely because the kernel does not "
    "allow non-privileged user namespaces."
)
NOT_PERMITTED = "bwrap: Creating new namespace failed: Operation not permitted"
NO_SPACE = "bwrap: Creating new namespace failed: No space left on device"
OTHER_NS = "bwrap: Creating new namespace failed: Invalid argument"
PROC = "bwrap: Can't mount proc on /newroot/proc: Operation not permitted"


@pytest.mark.parametrize(
    ("error", "changes", "cause_has", "fix_has"),
    [
        (UID_MAP, {"apparmor_restrict_userns": 1}, "uid map", "userns,"),
        (UID_MAP, {}, "uid map", "apparmor_restrict_unprivileged_userns=0"),
        (UID_MAP, {"container": "docker"}, "uid map", "seccomp=unconfined"),
        (NO_PERMS, {"unprivileged_userns_clone": 0}, "unprivileged", "unprivileged_userns_clone=1"),
        (NO_PERMS, {"unprivileged_userns_clone": None}, "unprivileged", "max_user_namespaces="),
        (NOT_PERMITTED, {"container": "docker"}, "seccomp", "--security-opt seccomp=unconfined"),
        (NOT_PERMITTED, {"container": "docker"}, "seccomp", "Landlock-only backend"),
        (NOT_PERMITTED, {"apparmor_restrict_userns": 1}, "security module", "userns,"),
        (NOT_PERMITTED, {}, "security module", "dmesg"),
        (NO_SPACE, {}, "max_user_namespaces", "sudo sysctl -w user.max_user_namespaces="),
        (OTHER_NS, {}, "refused a new namespace", "sysctl user"),
        (OTHER_NS, {"container": "lxc"}, "refused a new namespace", "security.nesting"),
        (PROC, {"container": "docker"}, "/proc", "systempaths=unconfined"),
        ("bwrap: something new", {}, "bwrap failed", "bwrap --unshare-all"),
    ],
)
def test_failed_try_names_cause_and_fix(
    error: str, changes: dict[str, Any], cause_has: str, fix_has: str
) -> None:
    failed = checks_for(error, **changes)
    assert failed["sandbox"].status == "fail"
    assert cause_has in failed["sandbox"].detail
    assert error.splitlines()[-1] in failed["sandbox"].detail
    fix = failed["sandbox"].fix
    if fix == "see the fix for user namespaces above":
        fix = failed["user namespaces"].fix
    assert fix_has in fix
    assert not default_mode_can_run(list(failed.values()))
    # The same machine with a working try: no failure, no fix.
    working = checks_for(None, **changes)
    assert working["sandbox"].status == "ok"
    assert working["sandbox"].fix == ""


@pytest.mark.parametrize(
    ("error", "not_cause"),
    [
        # Proc mount errors also say "Operation not permitted": the specific rule must win.
        (PROC, "forbids the namespaces"),
        # "No space left" is a namespace failure with a known fix, not the generic one.
        (NO_SPACE, "refused a new namespace"),
        (NO_PERMS, "refused a new namespace"),
    ],
)
def test_specific_causes_win_over_generic_ones(error: str, not_cause: str) -> None:
    cause, _ = explain_sandbox_failure(error, HEALTHY)
    assert not_cause not in cause


def test_missing_bwrap_fails_without_trying() -> None:
    fake = FakeTry(None)
    checks = run_checks(HEALTHY._replace(bwrap_path=None, bwrap_version=None), try_sandbox=fake)
    by_name = {check.name: check for check in checks}
    assert fake.calls == 0
    assert by_name["bubblewrap"].status == "fail"
    assert "apt-get install bubblewrap" in by_name["bubblewrap"].fix
    assert by_name["sandbox"].status == "fail"
    assert not default_mode_can_run(checks)


def test_sandbox_fix_refers_to_an_identical_userns_fix() -> None:
    checks = checks_for(UID_MAP, apparmor_restrict_userns=1)
    assert checks["user namespaces"].status == "fail"
    assert "userns," in checks["user namespaces"].fix
    assert checks["sandbox"].fix == "see the fix for user namespaces above"
    # A different fix is kept: the container's, when userns sysctls are fine.
    docker = checks_for(NOT_PERMITTED, container="docker")
    assert "seccomp=unconfined" in docker["sandbox"].fix


def test_present_bwrap_is_tried_once() -> None:
    fake = FakeTry(None)
    run_checks(HEALTHY, try_sandbox=fake)
    assert fake.calls == 1


# --- the other checks, in pairs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "changes", "name", "status"),
    [
        (NO_PERMS, {"max_user_namespaces": 0}, "user namespaces", "fail"),
        (None, {"max_user_namespaces": 0, "bwrap_setuid": True}, "user namespaces", "warn"),
        (None, {"max_user_namespaces": 0}, "user namespaces", "warn"),  # the try has the last word
        (None, {"max_user_namespaces": 1}, "user namespaces", "ok"),
        (NOT_PERMITTED, {"container": "docker"}, "container", "warn"),
        (None, {"container": "docker"}, "container", "ok"),
        (None, {"is_root": True}, "user", "warn"),
        (None, {"is_root": False}, "user", "ok"),
        (None, {"landlock_abi": 0}, "landlock", "warn"),
        (None, {"landlock_abi": 1}, "landlock", "ok"),
        (None, {"seccomp": False}, "seccomp", "fail"),
        (None, {"seccomp": True}, "seccomp", "ok"),
        (None, {"seccomp": False, "legacy_tiocsti": 1}, "tiocsti", "warn"),
        (None, {"seccomp": False, "legacy_tiocsti": 0}, "tiocsti", "ok"),
        (None, {"bwrap_version": (0, 3, 0)}, "bubblewrap", "fail"),
        (None, {"bwrap_version": (0, 4, 0)}, "bubblewrap", "ok"),
    ],
)
def test_check_status(error: str | None, changes: dict[str, Any], name: str, status: str) -> None:
    check = checks_for(error, **changes)[name]
    assert check.status == status
    assert (check.fix != "") is (status != "ok")


def test_docker_warning_explains_options_and_fallback() -> None:
    check = checks_for(NOT_PERMITTED, container="docker")["container"]
    assert "--security-opt seccomp=unconfined" in check.fix
    assert "Landlock-only backend" in check.fix


@pytest.mark.parametrize(
    ("changes", "can_run"),
    [
        ({"is_root": True, "landlock_abi": 0, "container": "docker"}, True),  # warnings only
        ({"seccomp": False}, False),
        ({"max_user_namespaces": 0, "bwrap_setuid": True}, True),
    ],
)
def test_default_mode_can_run(changes: dict[str, Any], can_run: bool) -> None:
    assert default_mode_can_run(list(checks_for(None, **changes).values())) is can_run


def test_default_mode_fails_closed_when_a_required_check_is_missing() -> None:
    checks = run_checks(HEALTHY, try_sandbox=FakeTry(None))
    assert default_mode_can_run(checks)
    assert not default_mode_can_run([c for c in checks if c.name != "sandbox"])
    assert not default_mode_can_run([])


# --- formatting --------------------------------------------------------------------------------

SAMPLE = [
    Check("kernel", "ok", "Linux 6.8 x86_64"),
    Check("landlock", "warn", "Landlock is not enabled", "add landlock to lsm=\nthen reboot"),
    Check("sandbox", "fail", "bwrap failed", "run it by hand"),
    Check("user", "ok", "normal user", "never shown"),
]


def test_format_plain() -> None:
    assert format_checks(SAMPLE, color=False).split("\n") == [
        "[ ok ] kernel: Linux 6.8 x86_64",
        "[warn] landlock: Landlock is not enabled",
        "       add landlock to lsm=",
        "       then reboot",
        "[FAIL] sandbox: bwrap failed",
        "       run it by hand",
        "[ ok ] user: normal user",
    ]


def test_format_color_marks_status_only() -> None:
    text = format_checks(SAMPLE, color=True)
    assert "[\x1b[32m ok \x1b[0m] kernel: Linux 6.8 x86_64" in text
    assert "\x1b[33mwarn\x1b[0m" in text
    assert "\x1b[31mFAIL\x1b[0m" in text
    assert "\x1b" not in format_checks(SAMPLE, color=False)


def test_format_one_line_per_check_when_all_ok() -> None:
    checks = run_checks(HEALTHY, try_sandbox=FakeTry(None))
    assert len(format_checks(checks, color=False).splitlines()) == len(checks)


# --- the real try ------------------------------------------------------------------------------


def test_default_try_sandbox_reports_bwrap_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert default_try_sandbox() == "bwrap: setting up uid map: Permission denied"


def test_default_try_sandbox_without_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    error = default_try_sandbox()
    assert error is not None
    assert "cannot run bwrap" in error


def test_real_run_on_this_machine() -> None:
    facts = gather_facts()
    checks = {check.name: check for check in run_checks(facts, try_sandbox=default_try_sandbox)}
    assert checks["bubblewrap"].status == "ok", checks["bubblewrap"]
    assert checks["sandbox"].status == "ok", checks["sandbox"]
    assert checks["landlock"].status == "ok", checks["landlock"]
    assert default_mode_can_run(list(checks.values()))

"""`corral doctor`: what this machine can enforce, and the exact fix for what it cannot.

Each check turns probe facts (and one live try of bwrap) into a line: ok, warn or fail.

Rules:
1. "fail" means the default mode (bwrap namespaces plus a seccomp filter) cannot run here;
   anything that only weakens a layer or a fallback is a "warn". `default_mode_can_run` is
   True only when no check failed and every check in `REQUIRED_FOR_DEFAULT_MODE` was made.
2. The live try has the last word over the sysctls: a container's seccomp profile forbids
   namespaces that no sysctl shows, and a setuid bwrap needs no user namespaces at all.
3. A failed try is explained from bwrap's own message (`explain_sandbox_failure`), first
   matching rule wins, so the more specific messages come first in `SANDBOX_FAILURES`.

Off the launch path: imports what it needs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Literal, NamedTuple

from corral.probe import (
    MachineFacts,
    bwrap_verdict,
    landlock_verdict,
    tiocsti_verdict,
    userns_verdict,
)
from corral.probe_verdicts import apparmor_userns_fix, sysctl_fix

Status = Literal["ok", "warn", "fail"]


class Check(NamedTuple):
    name: str
    status: Status
    detail: str
    fix: str = ""


REQUIRED_FOR_DEFAULT_MODE = ("bubblewrap", "user namespaces", "sandbox", "seccomp")

# The smallest sandbox that needs every namespace corral uses.
TRY_SANDBOX_ARGV = (
    "bwrap",
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/",
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "true",
)
# bwrap starts in milliseconds; this only keeps a wedged machine from hanging the doctor.
TRY_SANDBOX_TIMEOUT = 30


def default_try_sandbox() -> str | None:
    """Start the smallest real sandbox; None when it worked, else what went wrong."""
    try:
        done = subprocess.run(
            TRY_SANDBOX_ARGV,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TRY_SANDBOX_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"bwrap did not finish within {TRY_SANDBOX_TIMEOUT} seconds"
    except OSError as error:
        return f"cannot run bwrap: {error.strerror or error}"
    if done.returncode == 0:
        return None
    stderr = done.stderr.decode(errors="replace").strip()
    return stderr or f"bwrap exited with status {done.returncode}"


# ---------------------------------------------------------------------------------------------
# Why a live try failed


def container_fix(container: str) -> str:
    if container in ("docker", "podman"):
        fix = (
            f"start the container with: {container} run --security-opt seccomp=unconfined "
            "--security-opt apparmor=unconfined ...\n"
            "(or a seccomp profile that allows clone/unshare with namespace flags, mount and "
            "pivot_root), and allow unprivileged user namespaces on the host"
        )
    else:
        fix = f"let the {container} container nest namespaces (LXD: security.nesting=true)"
    return (
        fix + "\nwithout namespaces only the Landlock-only backend is left, which is weaker: "
        "no private /tmp, no separate network namespace"
    )


def proc_mount_fix(facts: MachineFacts) -> str:
    # Container runtimes mask parts of /proc, and the kernel then refuses a fresh proc mount.
    if facts.container is None:
        return "check `dmesg` for AppArmor or SELinux denials of bwrap's proc mount"
    return (
        "start the container with --security-opt systempaths=unconfined (podman: "
        "--security-opt unmask=ALL) so that a nested /proc can be mounted"
    )


def not_permitted_fix(facts: MachineFacts) -> str:
    if facts.container is not None:
        return container_fix(facts.container)
    if facts.apparmor_restrict_userns == 1:
        return apparmor_userns_fix(facts.bwrap_path)
    return "check `dmesg` (or `journalctl -k`) for AppArmor, SELinux or seccomp denials of bwrap"


def uid_map_fix(facts: MachineFacts) -> str:
    fix = apparmor_userns_fix(facts.bwrap_path)
    return fix if facts.container is None else fix + "\n" + container_fix(facts.container)


def userns_disabled_fix(facts: MachineFacts) -> str:
    if facts.unprivileged_userns_clone is not None:
        return sysctl_fix("kernel.unprivileged_userns_clone", "1")
    return sysctl_fix("user.max_user_namespaces", "15000")


def namespace_fix(facts: MachineFacts) -> str:
    fix = "check the user.max_*_namespaces sysctls: `sysctl user`"
    return fix if facts.container is None else fix + "\n" + container_fix(facts.container)


# (text in bwrap's message, the cause, the fix for these facts). First match wins.
SANDBOX_FAILURES: tuple[tuple[str, str, Callable[[MachineFacts], str]], ...] = (
    (
        "setting up uid map: Permission denied",
        "the kernel refused bwrap's uid map (AppArmor's user namespace restriction, "
        "or a container)",
        uid_map_fix,
    ),
    (
        "No permissions to creating new namespace",
        "the kernel does not allow unprivileged user namespaces",
        userns_disabled_fix,
    ),
    (
        "Creating new namespace failed: No space left on device",
        "no user namespaces left (user.max_user_namespaces is 0 or used up)",
        lambda facts: sysctl_fix("user.max_user_namespaces", "15000"),
    ),
    ("Can't mount proc", "a fresh /proc cannot be mounted here", proc_mount_fix),
    (
        "Operation not permitted",
        "a seccomp filter or security module forbids the namespaces bwrap needs",
        not_permitted_fix,
    ),
    ("Creating new namespace failed", "the kernel refused a new namespace", namespace_fix),
)


def explain_sandbox_failure(error: str, facts: MachineFacts) -> tuple[str, str]:
    """(cause, fix) for the message a failed `bwrap` printed."""
    for needle, cause, fix in SANDBOX_FAILURES:
        if needle in error:
            return cause, fix(facts)
    return "bwrap failed", "run it by hand to see the whole message: " + " ".join(TRY_SANDBOX_ARGV)


# ---------------------------------------------------------------------------------------------
# The checks


def run_checks(facts: MachineFacts, *, try_sandbox: Callable[[], str | None]) -> list[Check]:
    bwrap = check_bubblewrap(facts)
    tried = bwrap.status == "ok"
    error = try_sandbox() if tried else None
    userns = check_userns(facts, sandbox_works=tried and error is None)
    sandbox = check_sandbox(facts, tried=tried, error=error)
    if sandbox.fix and sandbox.fix == userns.fix:
        sandbox = sandbox._replace(fix="see the fix for user namespaces above")
    return [
        Check("kernel", "ok", f"Linux {facts.kernel} {facts.arch}"),
        bwrap,
        userns,
        sandbox,
        check_landlock(facts),
        check_seccomp(facts),
        check_container(facts, sandbox_works=tried and error is None),
        check_root(facts),
        check_tiocsti(facts),
    ]


def check_bubblewrap(facts: MachineFacts) -> Check:
    verdict = bwrap_verdict(facts)
    return Check("bubblewrap", "ok" if verdict.ok else "fail", verdict.reason, verdict.fix)


def check_userns(facts: MachineFacts, *, sandbox_works: bool) -> Check:
    verdict = userns_verdict(facts)
    if verdict.ok:
        return Check("user namespaces", "ok", verdict.reason)
    if facts.bwrap_setuid or sandbox_works:
        why = "bwrap is setuid" if facts.bwrap_setuid else "the live try worked"
        return Check("user namespaces", "warn", f"{verdict.reason}; {why}", verdict.fix)
    return Check("user namespaces", "fail", verdict.reason, verdict.fix)


def check_sandbox(facts: MachineFacts, *, tried: bool, error: str | None) -> Check:
    if not tried:
        return Check("sandbox", "fail", "not tried: bubblewrap is missing or unusable")
    if error is None:
        return Check("sandbox", "ok", "bwrap --unshare-all started and ran `true`")
    cause, fix = explain_sandbox_failure(error, facts)
    last_line = error.strip().splitlines()[-1] if error.strip() else error
    return Check("sandbox", "fail", f"{cause}: {last_line}", fix)


def check_landlock(facts: MachineFacts) -> Check:
    verdict = landlock_verdict(facts)
    if verdict.ok:
        return Check("landlock", "ok", verdict.reason)
    # bwrap's mount namespace still enforces the filesystem rules; Landlock is a second layer
    # and the fallback backend, so its absence weakens corral but does not stop it.
    detail = f"{verdict.reason}: no second filesystem layer, no Landlock-only fallback"
    return Check("landlock", "warn", detail, verdict.fix)


def check_seccomp(facts: MachineFacts) -> Check:
    if facts.seccomp:
        return Check("seccomp", "ok", "seccomp filters are available")
    return Check(
        "seccomp",
        "fail",
        "the kernel has no seccomp: corral cannot filter system calls",
        "use a kernel built with CONFIG_SECCOMP_FILTER (every major distribution's kernel is)",
    )


def check_container(facts: MachineFacts, *, sandbox_works: bool) -> Check:
    if facts.container is None:
        return Check("container", "ok", "not running in a container")
    if sandbox_works:
        return Check("container", "ok", f"running in a {facts.container} container; bwrap works")
    detail = (
        f"running in a {facts.container} container, whose seccomp profile or security "
        "module may forbid the namespaces bwrap needs"
    )
    return Check("container", "warn", detail, container_fix(facts.container))


def check_root(facts: MachineFacts) -> Check:
    if not facts.is_root:
        return Check("user", "ok", "running as a normal user")
    return Check(
        "user",
        "warn",
        "running as root: corral's defaults and tests assume a normal user "
        "(the sandbox still drops every capability)",
        "run corral as your normal user",
    )


def check_tiocsti(facts: MachineFacts) -> Check:
    verdict = tiocsti_verdict(facts)
    return Check("tiocsti", "ok" if verdict.ok else "warn", verdict.reason, verdict.fix)


def default_mode_can_run(checks: list[Check]) -> bool:
    """`corral doctor` exits 0 only when this is True (fails closed on a missing check)."""
    made = {check.name for check in checks}
    return all(name in made for name in REQUIRED_FOR_DEFAULT_MODE) and all(
        check.status != "fail" for check in checks
    )


# ---------------------------------------------------------------------------------------------
# Output

TAGS: dict[Status, tuple[str, str]] = {
    "ok": ("ok", "32"),  # green
    "warn": ("warn", "33"),  # yellow
    "fail": ("FAIL", "31"),  # red
}
FIX_INDENT = " " * len("[warn] ")


def format_checks(checks: list[Check], *, color: bool) -> str:
    """One line per check; the fix of a warning or failure indented under it."""
    lines = []
    for check in checks:
        tag, code = TAGS[check.status]
        tag = f"{tag:^4}"
        if color:
            tag = f"\x1b[{code}m{tag}\x1b[0m"
        lines.append(f"[{tag}] {check.name}: {check.detail}")
        if check.status != "ok" and check.fix:
            lines += [FIX_INDENT + line for line in check.fix.splitlines()]
    return "\n".join(lines)

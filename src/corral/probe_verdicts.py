"""Decisions about what this machine can do, as small pure functions of `MachineFacts`.

Each decider returns a `Verdict`: whether the feature is usable, why, and the exact fix (the
commands to run, a few lines at most). They read no files, so each rule is tested in yes/no
pairs with hand-built facts. `corral.probe` re-exports them; `corral doctor` turns them into
checks and the backends use them to choose what to enforce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from corral.probe import MachineFacts

# 0.3.3 fixed CVE-2019-12439; 0.4 is the oldest release corral's argv builder supports.
MIN_BWRAP_VERSION = (0, 4, 0)


class Verdict(NamedTuple):
    ok: bool
    reason: str
    fix: str = ""


INSTALL_BWRAP = (
    "sudo apt-get install bubblewrap   # Debian, Ubuntu\n"
    "sudo dnf install bubblewrap       # Fedora, RHEL\n"
    "sudo pacman -S bubblewrap         # Arch"
)


def sysctl_fix(name: str, value: str) -> str:
    conf = f"/etc/sysctl.d/90-corral-{name.rsplit('.', 1)[-1]}.conf"
    return (
        f"sudo sysctl -w {name}={value}\n"
        f"to keep it after a reboot: echo '{name} = {value}' | sudo tee {conf}"
    )


def apparmor_userns_fix(bwrap_path: str | None) -> str:
    # A profile for bwrap alone keeps the restriction for every other program; lifting the
    # sysctl is the blunt alternative.
    path = bwrap_path or "/usr/bin/bwrap"
    return (
        "allow user namespaces for bwrap only: create /etc/apparmor.d/bwrap containing\n"
        "  abi <abi/4.0>,\n"
        "  include <tunables/global>\n"
        f"  profile bwrap {path} flags=(unconfined) {{\n"
        "    userns,\n"
        "  }\n"
        "then run: sudo apparmor_parser -r /etc/apparmor.d/bwrap\n"
        "or lift the restriction for all programs: "
        + sysctl_fix("kernel.apparmor_restrict_unprivileged_userns", "0")
    )


def userns_verdict(facts: MachineFacts) -> Verdict:
    """Whether the kernel lets this user create user namespaces, going by the sysctls."""
    if facts.max_user_namespaces == 0:
        return Verdict(
            ok=False,
            reason="user namespaces are disabled (user.max_user_namespaces = 0)",
            fix=sysctl_fix("user.max_user_namespaces", "15000"),
        )
    # The two knobs below only restrict processes without CAP_SYS_ADMIN.
    if not facts.is_root and facts.unprivileged_userns_clone == 0:
        return Verdict(
            ok=False,
            reason="unprivileged user namespaces are disabled "
            "(kernel.unprivileged_userns_clone = 0)",
            fix=sysctl_fix("kernel.unprivileged_userns_clone", "1"),
        )
    if not facts.is_root and facts.apparmor_restrict_userns == 1:
        return Verdict(
            ok=False,
            reason="AppArmor restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns = 1)",
            fix=apparmor_userns_fix(facts.bwrap_path),
        )
    return Verdict(ok=True, reason="user namespaces are allowed")


def bwrap_verdict(facts: MachineFacts) -> Verdict:
    if facts.bwrap_path is None:
        return Verdict(ok=False, reason="bubblewrap (bwrap) is not installed", fix=INSTALL_BWRAP)
    if facts.bwrap_version is None:
        return Verdict(
            ok=False,
            reason=f"{facts.bwrap_path} does not answer `--version` like bubblewrap",
            fix="reinstall bubblewrap:\n" + INSTALL_BWRAP,
        )
    version = ".".join(str(part) for part in facts.bwrap_version)
    if facts.bwrap_version < MIN_BWRAP_VERSION:
        minimum = ".".join(str(part) for part in MIN_BWRAP_VERSION)
        return Verdict(
            ok=False,
            reason=f"bubblewrap {version} is older than {minimum}",
            fix="upgrade bubblewrap with your package manager:\n" + INSTALL_BWRAP,
        )
    setuid = " (setuid)" if facts.bwrap_setuid else ""
    return Verdict(ok=True, reason=f"bubblewrap {version} at {facts.bwrap_path}{setuid}")


def leading_int(text: str) -> int | None:
    """`45-generic` -> 45, `rc1` -> None: version parts often carry suffixes."""
    digits = ""
    for char in text:
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else None


def kernel_version(release: str) -> tuple[int, int]:
    """`6.8.0-45-generic` -> (6, 8); unreadable parts count as 0."""
    parts = [*release.split(".")[:2], "", ""]
    return leading_int(parts[0]) or 0, leading_int(parts[1]) or 0


def landlock_verdict(facts: MachineFacts) -> Verdict:
    if facts.landlock_abi >= 1:
        return Verdict(ok=True, reason=f"Landlock ABI {facts.landlock_abi}")
    if kernel_version(facts.kernel) < (5, 13):
        return Verdict(
            ok=False,
            reason=f"Linux {facts.kernel} predates Landlock (5.13)",
            fix="upgrade the kernel to 5.13 or later (6.7 or later for network rules)",
        )
    fix = (
        "add landlock to the lsm= boot parameter, keeping the modules listed in "
        "/sys/kernel/security/lsm (e.g. lsm=landlock,lockdown,yama,integrity,apparmor,bpf)\n"
        "in GRUB_CMDLINE_LINUX of /etc/default/grub, then: sudo update-grub "
        "(Fedora: sudo grub2-mkconfig -o /boot/grub2/grub.cfg), and reboot"
    )
    if facts.container is not None:
        fix = f"the {facts.container} container's seccomp profile may hide Landlock; or\n" + fix
    return Verdict(ok=False, reason=f"Landlock is not enabled in Linux {facts.kernel}", fix=fix)


def tiocsti_verdict(facts: MachineFacts) -> Verdict:
    """TIOCSTI lets a program type into its terminal (CVE-2017-5226): seccomp must block it."""
    if facts.legacy_tiocsti == 0:
        return Verdict(ok=True, reason="TIOCSTI is disabled (dev.tty.legacy_tiocsti = 0)")
    if facts.seccomp:
        return Verdict(ok=True, reason="TIOCSTI is enabled; corral's seccomp filter blocks it")
    if facts.legacy_tiocsti is None:
        fix = "use a kernel with seccomp, or Linux 6.2+ with dev.tty.legacy_tiocsti = 0"
    else:
        fix = sysctl_fix("dev.tty.legacy_tiocsti", "0")
    return Verdict(
        ok=False,
        reason="TIOCSTI is enabled and seccomp is unavailable: "
        "a sandboxed program could type commands into your terminal",
        fix=fix,
    )


def can_use_namespaces(facts: MachineFacts) -> bool:
    """Whether bwrap should be able to create its namespaces. A failed launch has the last
    word: a container's seccomp profile, for one, forbids namespaces no sysctl shows."""
    # A setuid bwrap creates its namespaces with privileges and needs no user namespace.
    return bwrap_verdict(facts).ok and (userns_verdict(facts).ok or facts.bwrap_setuid)

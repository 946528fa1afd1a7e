"""Hand-built machine facts for tests of the deciders, doctor and the layers report."""

from __future__ import annotations

from corral.probe import MachineFacts

# A healthy desktop: every decider says yes. Tests change one or two fields with _replace.
HEALTHY = MachineFacts(
    kernel="6.8.0-45-generic",
    arch="x86_64",
    is_root=False,
    bwrap_path="/usr/bin/bwrap",
    bwrap_version=(0, 9, 0),
    bwrap_setuid=False,
    max_user_namespaces=63000,
    unprivileged_userns_clone=1,
    apparmor_restrict_userns=0,
    landlock_abi=4,
    seccomp=True,
    container=None,
    legacy_tiocsti=1,
    cgroup_v2_writable=None,
)

"""Launching a command with the Landlock-only backend: no bubblewrap, no namespaces.

For machines where unprivileged user namespaces are unavailable (inside Docker, Ubuntu with
restricted user namespaces). The command runs on the host's filesystem under Landlock (the
plan's rules expanded into an allow-list), the seccomp filter, dropped capabilities and the
rlimits, all applied between fork and exec. What this protects and what it does not, next to
the bubblewrap mode: docs/security-model.md and docs/landlock.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import IO

from corral.backends.bubblewrap import Session
from corral.backends.facts import gather_disk_facts
from corral.backends.fsplan import plan_filesystem
from corral.backends.landlock import enforcement
from corral.backends.landlock_nsfree import nsfree_rules, prepare_nsfree
from corral.backends.limits import launch_rlimits, make_preexec
from corral.errors import LaunchError, SandboxUnavailable
from corral.network import needs_proxy
from corral.policy.model import Policy
from corral.probe import MachineFacts
from corral.process import SandboxProcess

File = int | IO[bytes] | IO[str] | None


def _terminals() -> list[str]:
    names = []
    for fd in (0, 1, 2):
        if os.isatty(fd):
            names.append(os.ttyname(fd))
    return names


def spawn_nsfree(
    policy: Policy,
    facts: MachineFacts,
    argv: Sequence[str],
    *,
    seccomp_program: bytes,
    env: dict[str, str],
    workdir: str,
    stdin: File,
    stdout: File,
    stderr: File,
    pass_fds: Sequence[int],
    session: Session,
    sandbox_id: str,
) -> SandboxProcess:
    """Start `argv` under the Landlock-only backend. `env` is already the sandbox's."""
    if facts.landlock_abi == 0:
        raise SandboxUnavailable(
            "the Landlock-only backend needs Landlock, and this kernel has none",
            hint="`corral doctor` explains; Linux 5.13 or newer with lsm=landlock",
        )
    if needs_proxy(policy):
        raise SandboxUnavailable(
            "the Landlock-only backend cannot reach the filtering proxy yet",
            hint='use "network": {"access": "none"} or "local" here, or a machine with '
            "user namespaces",
        )
    plan = plan_filesystem(policy, gather_disk_facts(policy))
    tmp_dir = tempfile.mkdtemp(prefix="corral-tmp-")
    rules = nsfree_rules(
        plan, abi=facts.landlock_abi, network=policy.network, tmp_dir=tmp_dir,
        terminals=_terminals(),
    )  # fmt: skip
    if enforcement(rules) == "none":
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise SandboxUnavailable("Landlock cannot enforce these rules on this kernel")
    env = {**env, "TMPDIR": tmp_dir}
    limit = make_preexec(launch_rlimits(policy.limits, facts))
    try:
        with prepare_nsfree(rules, seccomp_program=seccomp_program) as launcher:

            def restrict() -> None:
                limit()
                launcher()

            popen = subprocess.Popen(
                list(argv),
                cwd=workdir,
                env=env,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=tuple(pass_fds),
                close_fds=True,
                preexec_fn=restrict,
                process_group=0 if session == "new" else None,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise LaunchError(f"could not start {argv[0]} under Landlock: {exc}") from exc
    cleanup: Callable[[], None] = lambda: shutil.rmtree(tmp_dir, ignore_errors=True)  # noqa: E731
    return SandboxProcess(
        popen,
        status_fd=None,
        session=session,
        journal=None,
        plan=plan,
        sandbox_id=sandbox_id,
        cleanup=cleanup,
    )

"""Launching a command with the Landlock-only backend: no bubblewrap, no namespaces.

For machines where unprivileged user namespaces are unavailable (inside Docker, Ubuntu with
restricted user namespaces). The command runs on the host's filesystem under Landlock (the
plan's rules expanded into an allow-list), the seccomp filter, dropped capabilities and the
rlimits, all applied between fork and exec. What this protects and what it does not, next to
the bubblewrap mode: docs/security-model.md and docs/landlock.md.

Network. With no network namespace the command shares the host's network stack. When the
policy needs the proxy, corral listens on two ephemeral ports of the host's 127.0.0.1 for this
command alone (HTTP proxy, SOCKS5; `corral.proxy.host_listener`), points the proxy variables
at them, and Landlock (ABI >= 4) lets the command connect by TCP to those two ports only and
bind nowhere unless `allowLocalBinding`. The listeners close when the command ends.
What this backend cannot prevent, unlike the bubblewrap mode:
- any other local process can connect to those loopback ports while the command runs, and is
  served with the command's network rights (the proxy still filters what it reaches);
- Landlock restricts ports, not addresses: the two ports are allowed on every host;
- UDP, MPTCP and SCTP streams, and TCP Fast Open's implicit connect are not restricted by
  Landlock at all (the seccomp filter refuses inet sockets only with "none");
- a program that ignores the proxy variables still shares the host's network namespace, so
  abstract-namespace and other non-TCP paths depend on Landlock's scoping (ABI >= 6).
`network.hostPorts` and `network.publishPorts` are refused here for now (SandboxUnavailable):
a host port would have to be allowed to Landlock on every address, and publishing needs a
listener the command owns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING

from corral.backends.bubblewrap import Session
from corral.backends.facts import gather_disk_facts
from corral.backends.fsplan import FilesystemPlan, plan_filesystem
from corral.backends.landlock import enforcement
from corral.backends.landlock_nsfree import nsfree_rules, prepare_nsfree
from corral.backends.limits import launch_rlimits, make_preexec
from corral.errors import LaunchError, SandboxUnavailable
from corral.network import HostCommandNetwork, NetworkService, add_network_environment, needs_proxy
from corral.policy.model import Policy
from corral.probe import MachineFacts
from corral.process import SandboxProcess

if TYPE_CHECKING:
    from corral.monitor import MonitorLaunch

File = int | IO[bytes] | IO[str] | None
NetworkSource = Callable[[], NetworkService | None]
"""The Sandbox's proxy, started on first use (`Sandbox.network`)."""
MonitorSource = Callable[[FilesystemPlan, Sequence[str]], "MonitorLaunch | None"]
"""The violation monitor's launch for a plan and the paths Landlock grants for writing."""
# Landlock restricts TCP connect and bind from this ABI on (Linux 6.7).
LANDLOCK_NET_ABI = 4


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
    network: NetworkSource | None = None,
    monitor: MonitorSource | None = None,
) -> SandboxProcess:
    """Start `argv` under the Landlock-only backend. `env` is already the sandbox's.
    `network` gives the proxy when the policy needs one (without it such a policy is refused).
    `monitor` gives the violation monitor's launch for the plan and the writable paths.
    """
    check_nsfree_network(policy, facts, have_proxy=network is not None)
    plan = plan_filesystem(policy, gather_disk_facts(policy))
    tmp_dir = tempfile.mkdtemp(prefix="corral-tmp-")
    try:
        host_net = _host_network(network, sandbox_id) if needs_proxy(policy) else None
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    def cleanup_command() -> None:
        if host_net is not None:
            host_net.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)

    cleanup = cleanup_command

    rules = nsfree_rules(
        plan, abi=facts.landlock_abi, network=policy.network, tmp_dir=tmp_dir,
        terminals=_terminals(), proxy_ports=host_net.ports if host_net else (),
    )  # fmt: skip
    if enforcement(rules) == "none":
        cleanup()
        raise SandboxUnavailable("Landlock cannot enforce these rules on this kernel")
    env = {**env, "TMPDIR": tmp_dir}
    if host_net is not None:
        add_network_environment(env, host_net.env)
    limit = make_preexec(launch_rlimits(policy.limits, facts))
    watch = monitor(plan, rules.write_paths) if monitor is not None else None
    try:
        with prepare_nsfree(rules, seccomp_program=seccomp_program) as launcher:

            def restrict() -> None:
                limit()
                launcher()

            def start() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
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

            if watch is None:
                popen = start()
            else:
                popen, running = watch.spawn(start)
                if running is not None:
                    cleanup = _stop_first(running.stop, cleanup)
    except BaseException as exc:
        cleanup()
        if isinstance(exc, (OSError, subprocess.SubprocessError)):
            raise LaunchError(f"could not start {argv[0]} under Landlock: {exc}") from exc
        raise
    return SandboxProcess(
        popen,
        status_fd=None,
        session=session,
        journal=None,
        plan=plan,
        sandbox_id=sandbox_id,
        cleanup=cleanup,
    )


def _stop_first(stop: Callable[[], object], then: Callable[[], None]) -> Callable[[], None]:
    """The monitor reports everything it saw before the command's own cleanup runs."""

    def both() -> None:
        stop()
        then()

    return both


def check_nsfree_network(policy: Policy, facts: MachineFacts, *, have_proxy: bool) -> None:
    """SandboxUnavailable when this backend cannot keep the policy's network promise."""
    if facts.landlock_abi == 0:
        raise SandboxUnavailable(
            "the Landlock-only backend needs Landlock, and this kernel has none",
            hint="`corral doctor` explains; Linux 5.13 or newer with lsm=landlock",
        )
    if not needs_proxy(policy):
        return
    network = policy.network
    if network.host_ports or network.publish_ports:
        key = "hostPorts" if network.host_ports else "publishPorts"
        raise SandboxUnavailable(
            f"the Landlock-only backend does not support network.{key} yet",
            hint=f"remove network.{key}, or use a machine with user namespaces",
        )
    if facts.landlock_abi < LANDLOCK_NET_ABI:
        # Without Landlock's TCP rules a program that ignores the proxy variables would
        # reach the whole network: refuse rather than run unfiltered.
        raise SandboxUnavailable(
            f"the Landlock-only backend needs Landlock ABI {LANDLOCK_NET_ABI} (Linux 6.7) to "
            f"keep the command to the proxy, and this kernel has ABI {facts.landlock_abi}",
            hint='use "network": {"access": "none"} here, or a machine with user namespaces',
        )
    if not have_proxy:
        raise SandboxUnavailable(
            "the Landlock-only backend was given no proxy for this filtered network",
            hint='use "network": {"access": "none"} or "local" here',
        )


def _host_network(network: NetworkSource | None, sandbox_id: str) -> HostCommandNetwork | None:
    service = network() if network is not None else None
    if service is None:
        return None
    try:
        return service.for_host_command(sandbox_id)
    except OSError as exc:
        raise LaunchError(f"could not listen on the host for the proxy: {exc}") from exc

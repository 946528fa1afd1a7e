"""Starting one command in a new bubblewrap sandbox (the bwrap backend of `Sandbox.spawn`).

`start_in_bwrap` takes a filesystem plan already made and does the rest of a launch:
1. the resource-limit gate (bwrap waits at --block-fd while corral sets the rlimits on the
   sandbox's pid 1, see backends/limits.py) and, where one is delegated, a cgroup,
2. the status pipe, the seccomp program's memfd and the Landlock layer's launcher and fds,
3. the bwrap argv (pure) and the command's environment,
4. placeholder files for denied paths that do not exist yet (journalled),
5. bwrap itself, started once, with only fds 0-2, the caller's `pass_fds` and the fds above
   inherited; under the violation monitor when one watches.
If any step fails, what the earlier ones made is undone before the error is raised.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, NamedTuple

from corral.backends.bubblewrap import BwrapOptions, Session, bwrap_argv
from corral.backends.cgroup import create_sandbox_cgroup, remove_cgroup, usable_cgroup_parent
from corral.backends.fsplan import FilesystemPlan
from corral.backends.landlock import (
    compile_ruleset,
    handled_access_fs,
    host_side_rules_for_plan,
    inside_paths_for_plan,
    memfd_with,
    open_rules_fd,
    rules_for_plan,
)
from corral.backends.landlock_exec import launcher_image
from corral.backends.limits import RLimit, apply_point, launch_rlimits
from corral.backends.placeholders import create_placeholders, remove_placeholders
from corral.backends.seccomp import host_arch, open_program_fd
from corral.errors import LaunchError
from corral.inner import Prepared, script_argv
from corral.inner import prepare as prepare_ruleset
from corral.launch import (
    ScrubbedNames,
    child_path,
    limit_then_release,
    memfd_exec_allowed,
    preexec_for,
    resolve_command,
    sandbox_environment,
    terminal_shim,
)
from corral.network import CommandNetwork, NetworkService, add_network_environment
from corral.policy.model import Policy
from corral.probe import MachineFacts
from corral.process import SandboxProcess

if TYPE_CHECKING:
    from corral.monitor import Monitor, MonitorLaunch

File = int | IO[bytes] | IO[str] | None


class LaunchRequest(NamedTuple):
    """One command to start, as `Sandbox.spawn` was asked, its defaults already chosen."""

    argv: Sequence[str]
    workdir: str
    env: Mapping[str, str] | None
    """The caller's environment for the command (None: corral's own); scrubbed here."""
    stdin: File
    stdout: File
    stderr: File
    pass_fds: Sequence[int]
    session: Session
    sandbox_id: str


class BwrapContext(NamedTuple):
    """What a start needs from its Sandbox: the policy, the machine and what is built once."""

    policy: Policy
    facts: MachineFacts
    bwrap: str
    """The bwrap executable to run."""
    seccomp_program: bytes
    network: NetworkService | None
    empty_file: str
    """The empty read-only file shown in place of hidden files."""
    monitor_launch: Callable[[FilesystemPlan, str], MonitorLaunch | None]
    """The violation monitor's launch for (plan, sandbox id); None: unwatched."""
    stop_monitor: Callable[[Monitor], None]
    inner_code: Callable[[], bytes]
    """corral.inner's bytecode, for the Landlock layer where the native launcher is unusable."""
    env_names: ScrubbedNames | None = None
    """What the Sandbox knows already of which variable names the policy removes."""


class _Fds:
    """The fds and rulesets of one start, by who keeps them once bwrap runs."""

    def __init__(self) -> None:
        self.child_side: list[int] = []  # the parent's copies, closed once the child has them
        self.inherited: list[int] = []  # inherited too, but closed by their owner in `prepared`
        self.prepared: list[Prepared] = []  # host-built rulesets, closed after the spawn
        self.parent_side: list[int] = []  # kept by the parent, closed only if the start fails

    def close_after_spawn(self) -> None:
        for fd in self.child_side:
            os.close(fd)
        for prepared in self.prepared:
            prepared.close()

    def close_parent_side(self) -> None:
        for fd in self.parent_side:
            os.close(fd)


def start_in_bwrap(
    ctx: BwrapContext, plan: FilesystemPlan, request: LaunchRequest
) -> SandboxProcess:
    """Start `request` under `plan` in a new bwrap sandbox (the steps in the module docstring)."""
    rlimits = launch_rlimits(ctx.policy.limits, ctx.facts)
    # Limits go on the sandbox's pid 1 while bwrap waits at --block-fd: set there, the
    # process limit counts the sandbox's own user namespace only (Linux >= 5.14).
    held = apply_point(ctx.facts) == "sandbox-init"
    fds = _Fds()
    command_net: CommandNetwork | None = None
    journal: str | None = None
    cgroup = _make_cgroup(ctx.policy, ctx.facts, request.sandbox_id) if held else None
    watch = ctx.monitor_launch(plan, request.sandbox_id)
    monitor: Monitor | None = None
    try:
        argv = request.argv
        if ctx.network is not None:
            command_net = ctx.network.for_command(request.sandbox_id)
            argv = [*command_net.argv_prefix, *argv]
        status_r, gate_w, options = _open_channels(ctx, request, fds, held=held)
        inner_argv = _inner_argv(ctx, plan, argv, request, fds)
        command = bwrap_argv(plan, options, inner_argv, bwrap=ctx.bwrap)
        child_env = sandbox_environment(
            ctx.policy, os.environ if request.env is None else request.env, names=ctx.env_names
        )
        if command_net is not None:
            add_network_environment(child_env, command_net.env)
        journal = create_placeholders(
            plan.placeholders, journal_dir=f"{ctx.policy.host.state_dir}/placeholders"
        )
        popen, monitor = _popen(
            command,
            request,
            child_env,
            [*fds.child_side, *fds.inherited, *(command_net.pass_fds if command_net else ())],
            child_rlimits=None if held else rlimits,
            watch=watch,
        )
    except BaseException as exc:
        fds.close_parent_side()
        if journal is not None:
            remove_placeholders(journal)
        if cgroup is not None:
            remove_cgroup(cgroup)
        if isinstance(exc, OSError):
            raise LaunchError(f"could not start the sandbox: {exc}") from exc
        raise
    finally:
        fds.close_after_spawn()
        if ctx.network is not None and command_net is not None:
            ctx.network.after_spawn(command_net)
    proc = _sandbox_process(ctx, plan, request, popen, status_r, journal, monitor, cgroup)
    if gate_w is not None:
        limit_then_release(proc, rlimits, gate_w, cgroup)
    return proc


def _sandbox_process(
    ctx: BwrapContext,
    plan: FilesystemPlan,
    request: LaunchRequest,
    popen: subprocess.Popen[bytes],
    status_r: int,
    journal: str | None,
    monitor: Monitor | None,
    cgroup: str | None,
) -> SandboxProcess:
    """The running bwrap as a SandboxProcess that stops the monitor and removes the cgroup
    (in that order) once it has ended."""
    cleanups: list[Callable[[], None]] = []
    if monitor is not None:
        cleanups.append(lambda: ctx.stop_monitor(monitor))
    if cgroup is not None:
        cleanups.append(lambda: remove_cgroup(cgroup))
    return SandboxProcess(
        popen,
        status_fd=status_r,
        session=request.session,
        journal=journal,
        plan=plan,
        sandbox_id=request.sandbox_id,
        cleanup=_in_order(cleanups),
    )


def _open_channels(
    ctx: BwrapContext, request: LaunchRequest, fds: _Fds, *, held: bool
) -> tuple[int, int | None, BwrapOptions]:
    """The status pipe, the gate pipe (when the limits are set on a held sandbox) and the
    seccomp memfd; returns the status pipe's read end, the gate's write end and the options
    naming their other ends."""
    status_r, status_w = os.pipe()
    fds.parent_side.append(status_r)
    fds.child_side.append(status_w)
    gate_r, gate_w = os.pipe() if held else (None, None)
    if gate_r is not None and gate_w is not None:
        fds.child_side.append(gate_r)
        fds.parent_side.append(gate_w)
    seccomp_fd = open_program_fd(ctx.seccomp_program)
    fds.child_side.append(seccomp_fd)
    options = BwrapOptions(
        cwd=request.workdir,
        uid=os.getuid(),
        gid=os.getgid(),
        session=request.session,
        bwrap_version=ctx.facts.bwrap_version or (0, 0, 0),
        seccomp_fd=seccomp_fd,
        status_fd=status_w,
        block_fd=gate_r,
        empty_file=ctx.empty_file,
    )
    return status_r, gate_w, options


def _inner_argv(
    ctx: BwrapContext,
    plan: FilesystemPlan,
    argv: Sequence[str],
    request: LaunchRequest,
    fds: _Fds,
) -> list[str]:
    """What bwrap runs: the command behind the Landlock layer's launcher, native or
    corral.inner, or behind the terminal shim (an inherited session), or the command alone."""
    inherit = request.session == "inherit"
    abi = ctx.facts.landlock_abi
    native = None
    if abi > 0:
        native = _native_landlock(ctx, plan, argv, child_path(request.env), inherit)
    if native is not None:
        # The second wall, applied by a tiny native launcher just before exec.
        inner_argv, native_fds, prepared = native
        fds.child_side.append(native_fds[0])  # the launcher's memfd
        fds.inherited = native_fds[1:]  # the ruleset: closed by `prepared`
        fds.prepared.append(prepared)
        return inner_argv
    if abi > 0:
        # The same, by corral.inner (no native launcher for this machine or command).
        rules = rules_for_plan(plan, abi=abi, network=ctx.policy.network.access)
        script_fd = memfd_with("corral-inner", ctx.inner_code())
        rules_fd = open_rules_fd(rules)
        fds.child_side += [script_fd, rules_fd]
        return script_argv(
            os.path.realpath(sys.executable),
            script_fd=script_fd,
            rules_fd=rules_fd,
            command=list(argv),
            reset_terminal_signals=inherit,
        )
    return [*terminal_shim(), *argv] if inherit else list(argv)


def _native_landlock(
    ctx: BwrapContext,
    plan: FilesystemPlan,
    argv: Sequence[str],
    path: str,
    inherit: bool,
) -> tuple[list[str], list[int], Prepared] | None:
    """The native launcher's argv, its fds and the host-built ruleset; None where it
    cannot be used (another architecture, memfds not executable, command not found)."""
    if not memfd_exec_allowed():
        return None
    command = resolve_command(argv[0], path, plan)
    if command is None:
        return None
    abi = ctx.facts.landlock_abi
    rules = host_side_rules_for_plan(plan, abi=abi, network=ctx.policy.network.access)
    prepared = prepare_ruleset(compile_ruleset(rules))
    self_fd = os.memfd_create("corral-landlock-exec", os.MFD_CLOEXEC)
    image = launcher_image(
        host_arch(),
        rules_fd=prepared.ruleset_fd,
        self_fd=self_fd,
        reset_terminal_signals=inherit,
        inside_paths=inside_paths_for_plan(plan),
        inside_access=handled_access_fs(abi),
    )
    if image is None:
        os.close(self_fd)
        prepared.close()
        return None
    os.write(self_fd, image)
    launcher = f"/proc/self/fd/{self_fd}"
    return [launcher, command, *argv], [self_fd, prepared.ruleset_fd], prepared


def _popen(
    command: list[str],
    request: LaunchRequest,
    env: dict[str, str],
    own_fds: list[int],
    *,
    child_rlimits: list[RLimit] | None,
    watch: MonitorLaunch | None,
) -> tuple[subprocess.Popen[bytes], Monitor | None]:
    """Start bwrap with `own_fds` (corral's channels to it) and the caller's `pass_fds`
    inherited, under the violation monitor when `watch` is given."""
    inherit = request.session == "inherit"
    preexec = preexec_for(inherit=inherit, rlimits=child_rlimits)
    if preexec is None and watch is not None and not watch.vfork_safe:
        preexec = _without_vfork
    pass_fds = [*own_fds, *request.pass_fds]  # subprocess sorts them; the order is moot

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            command,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            env=env,
            pass_fds=pass_fds,
            close_fds=True,
            preexec_fn=preexec,
            process_group=None if inherit else 0,
        )

    if watch is None:
        return start(), None
    return watch.spawn(start)


def _make_cgroup(policy: Policy, facts: MachineFacts, sandbox_id: str) -> str | None:
    """A cgroup v2 sub-tree for the sandbox where one is delegated to this user (memory,
    pids for the whole sandbox); None otherwise, and the rlimits carry the limits."""
    limits = policy.limits
    parent = usable_cgroup_parent(facts, limits)
    if parent is None:
        return None
    try:
        return create_sandbox_cgroup(parent, sandbox_id, limits, own_pid=os.getpid())
    except OSError:
        return None


def _without_vfork() -> None:
    """A preexec_fn that does nothing: having one makes subprocess fork instead of vfork,
    which the violation monitor needs where vfork would deadlock (MonitorLaunch.vfork_safe)."""


def _in_order(steps: Sequence[Callable[[], None]]) -> Callable[[], None] | None:
    """One cleanup running `steps` in order (None when there are none)."""
    if not steps:
        return None

    def run_all() -> None:
        for step in steps:
            step()

    return run_all

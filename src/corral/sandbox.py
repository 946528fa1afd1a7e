"""The Python API: `Sandbox(policy).run(argv)` and the streaming `Sandbox(policy).spawn(argv)`.

One launch, step by step (all in `Sandbox._launch`):
1. gather disk facts for the policy's paths (the only disk reads of the launch),
2. plan the mounts (pure) and render the bwrap argv (pure),
3. create placeholder files for denied paths that do not exist yet (journalled),
4. start bwrap with only stdin, stdout, stderr and the caller's `pass_fds` inherited;
   bwrap runs exactly once per command.
After the command ends, the placeholders are removed and the exit status is reported like a
shell reports it: the command's own code, or 128 + N when signal N killed it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from corral.audit.events import Sink
    from corral.monitor import Monitor, MonitorLaunch

from corral.backends.bubblewrap import BwrapOptions, Session, bwrap_argv
from corral.backends.cgroup import (
    create_sandbox_cgroup,
    remove_cgroup,
    usable_cgroup_parent,
)
from corral.backends.facts import gather_disk_facts
from corral.backends.fsplan import FilesystemPlan, plan_filesystem
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
from corral.backends.limits import (
    apply_point,
    launch_rlimits,
)
from corral.backends.placeholders import create_placeholders, remove_placeholders, sweep_stale
from corral.backends.seccomp import SeccompOptions, build_filter, host_arch, open_program_fd
from corral.errors import LaunchError, SandboxUnavailable, UsageError
from corral.inner import Prepared, compiled_script, script_argv
from corral.inner import prepare as prepare_ruleset
from corral.launch import (
    child_path,
    choose_backend,
    ensure_empty_file,
    limit_then_release,
    memfd_exec_allowed,
    preexec_for,
    resolve_command,
    sandbox_environment,
    terminal_shim,
)
from corral.network import (
    Ask,
    NetworkService,
    Notify,
    Resolver,
    add_network_environment,
    start_network,
    write_to_stderr,
)
from corral.policy.model import MonitorViolations, Policy
from corral.policy.paths import is_within
from corral.probe import MachineFacts, probe
from corral.process import SandboxProcess, capture_bounded, communicate

File = int | IO[bytes] | IO[str] | None


class RunResult(NamedTuple):
    returncode: int
    """The command's exit code; 128 + N when signal N killed it (as a shell reports it)."""
    stdout: bytes | None
    stderr: bytes | None
    timed_out: bool
    sandbox_id: str
    truncated: bool = False
    """Captured output went past the policy's outputBytes: the rest was read and dropped."""


class Sandbox:
    """Runs commands under one policy. Cheap to create; each command is its own sandbox."""

    def __init__(
        self,
        policy: Policy,
        *,
        bwrap: str | None = None,
        sink: Sink | None = None,
        resolver: Resolver | None = None,
        ask: Ask | None = None,
        monitor: MonitorViolations | None = None,
        notify: Notify | None = write_to_stderr,
    ) -> None:
        """`sink` receives audit events (sessions, network decisions, the violations the
        monitor sees); `resolver` maps a host name to addresses for the proxy (tests map test
        names to loopback servers); `ask` decides hosts in neither domain list ("once",
        "always" or "deny"); `monitor` chooses what the violation monitor watches, "all",
        "writes" or "off" (None: as the policy's monitor.violations says); `notify` hears one
        line per refused connection as it happens (None: none; the sink has them all)."""
        self.policy = policy
        if sink is None:
            from corral.audit.events import MemorySink

            sink = MemorySink()
        self.sink: Sink = sink
        self._bwrap = bwrap
        self._resolver = resolver
        self._ask = ask
        self._notify = notify
        self._facts: MachineFacts | None = None
        self._seccomp_program: bytes | None = None
        self._inner_code: bytes | None = None
        self._network: NetworkService | None = None
        self._network_started = False
        self._backend: Literal["bwrap", "landlock"] | None = None
        self._monitor = monitor
        self._notify_program: bytes | None = None
        self.monitored_calls = 0
        """System calls the violation monitor was notified of, over this Sandbox's finished
        commands (for the benchmark and tests: the monitor's cost is per call)."""
        self.monitor_held_seconds = 0.0
        """How long the monitor held those calls before letting them go on, all together."""

    @property
    def backend(self) -> str:
        """ "bwrap" or "landlock" once a command has been started; "" before."""
        return self._backend or ""

    def network(self) -> NetworkService | None:
        """The proxy shared by this Sandbox's commands, started on first use (None: no proxy)."""
        if not self._network_started:
            self._network = start_network(
                self.policy, sink=self.sink, resolver=self._resolver, ask=self._ask,
                notify=self._notify,
            )  # fmt: skip
            self._network_started = True
        return self._network

    def close(self) -> None:
        """Stop the proxy, if one was started. Commands still running lose their network."""
        if self._network is not None:
            self._network.close()
            self._network = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def seccomp_program(self) -> bytes:
        """The seccomp filter for this policy (built once per Sandbox; it is pure)."""
        if self._seccomp_program is None:
            network = self.policy.network
            options = SeccompOptions(
                network=network.access, allow_unix_sockets=bool(network.allow_unix_sockets)
            )
            self._seccomp_program = build_filter(options, arch=host_arch())
        return self._seccomp_program

    @property
    def monitoring(self) -> MonitorViolations:
        """What the violation monitor watches in this Sandbox's commands: the `monitor`
        argument, else the policy's monitor.violations; "off" where it cannot run here."""
        wanted = self._monitor or self.policy.monitor_violations
        if wanted == "off":
            return "off"
        from corral.monitor import monitor_unavailable

        facts = self._machine()
        unavailable = monitor_unavailable(facts.kernel, bwrap_setuid=facts.bwrap_setuid)
        return wanted if unavailable is None else "off"

    def _monitor_launch(
        self,
        plan: FilesystemPlan,
        sandbox_id: str,
        *,
        writable: Sequence[str] | None = None,
    ) -> MonitorLaunch | None:
        """The violation monitor's launch for one command (corral.monitor), or None when it
        runs unwatched. Reports go to the sink. With bwrap, its own calls (its mount set-up)
        are not reports; with the Landlock-only backend (`writable` given), chmod and the like
        are not either, as Landlock lets them through."""
        opens = self.monitoring
        if opens == "off":
            return None
        from corral.audit.violations import attempt_recorder
        from corral.backends.seccomp_notify import build_notify_filter
        from corral.monitor import METADATA_OPERATIONS, Boundary, MonitorLaunch

        if self._notify_program is None:
            self._notify_program = build_notify_filter(arch=host_arch(), opens=opens)
        if writable is None:
            bwrap = self._bwrap or self._machine().bwrap_path or "bwrap"
            private_tmp = ("/tmp",) if self.policy.filesystem.private_tmp else ()
            boundary = Boundary(plan, self.policy, inside_only=private_tmp)
            launchers = [os.path.realpath(bwrap)]
        else:
            boundary = Boundary(plan, self.policy, writable=writable, unrefused=METADATA_OPERATIONS)
            launchers = []
        return MonitorLaunch(
            self._notify_program,
            boundary,
            attempt_recorder(self.sink, sandbox_id, opens=opens),
            kernel=self._machine().kernel,
            opens=opens,
            launchers=launchers,
        )

    def _stop_monitor(self, monitor: Monitor) -> None:
        monitor.stop()
        self.monitored_calls += monitor.notifications
        self.monitor_held_seconds += monitor.held

    @classmethod
    def from_settings(
        cls,
        workspace: str | None = None,
        *,
        mode: str | None = None,
        allow_domains: Sequence[str] = (),
    ) -> Sandbox:
        """The policy from the settings files of `workspace` (default: the current directory)."""
        from corral.hostpaths import host_paths
        from corral.policy.settings import load_policy

        host = host_paths(workspace or os.getcwd(), os.environ)
        return cls(load_policy(host, mode=mode, allow_domains=allow_domains))  # type: ignore[arg-type]

    def _machine(self) -> MachineFacts:
        if self._facts is None:
            facts = probe(cache_dir=self.policy.host.machine_cache_dir)
            if facts.bwrap_path is None and self._bwrap is None:
                raise SandboxUnavailable(
                    "bubblewrap (bwrap) is not installed",
                    hint="install it (Debian/Ubuntu: apt-get install bubblewrap); `corral doctor`",
                )
            self._facts = facts
        return self._facts

    def _check_cwd(self, cwd: str) -> str:
        cwd = os.path.abspath(cwd)
        fs = self.policy.filesystem
        visible = any(is_within(cwd, rule.value) for rule in (*fs.read, *fs.write))
        if not visible:
            raise UsageError(
                f"working directory {cwd} is outside what the sandbox can see",
                hint=f"run from inside the workspace {self.policy.workspace}",
            )
        return cwd

    def _make_cgroup(self, facts: MachineFacts, sandbox_id: str) -> str | None:
        """A cgroup v2 sub-tree for the sandbox where one is delegated to this user (memory,
        pids for the whole sandbox); None otherwise, and the rlimits carry the limits."""
        limits = self.policy.limits
        parent = usable_cgroup_parent(facts, limits)
        if parent is None:
            return None
        try:
            return create_sandbox_cgroup(parent, sandbox_id, limits, own_pid=os.getpid())
        except OSError:
            return None

    def _native_landlock(
        self,
        plan: FilesystemPlan,
        facts: MachineFacts,
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
        rules = host_side_rules_for_plan(
            plan, abi=facts.landlock_abi, network=self.policy.network.access
        )
        prepared = prepare_ruleset(compile_ruleset(rules))
        self_fd = os.memfd_create("corral-landlock-exec", os.MFD_CLOEXEC)
        image = launcher_image(
            host_arch(),
            rules_fd=prepared.ruleset_fd,
            self_fd=self_fd,
            reset_terminal_signals=inherit,
            inside_paths=inside_paths_for_plan(plan),
            inside_access=handled_access_fs(facts.landlock_abi),
        )
        if image is None:
            os.close(self_fd)
            prepared.close()
            return None
        os.write(self_fd, image)
        launcher = f"/proc/self/fd/{self_fd}"
        return [launcher, command, *argv], [self_fd, prepared.ruleset_fd], prepared

    def _landlock_fds(self, plan: FilesystemPlan, abi: int) -> tuple[int, int]:
        """memfds holding corral.inner's bytecode (built once) and this plan's ruleset."""
        if self._inner_code is None:
            self._inner_code = compiled_script()
        rules = rules_for_plan(plan, abi=abi, network=self.policy.network.access)
        return memfd_with("corral-inner", self._inner_code), open_rules_fd(rules)

    def _prepare_host(self) -> str:
        """Create what the plan needs on the host; return the empty file for hidden files."""
        policy = self.policy
        if policy.package_cache is not None:
            os.makedirs(policy.package_cache, mode=0o700, exist_ok=True)
        # corral's own directories exist before the plan is made, so that they are protected
        # as directories rather than by placeholders.
        for own in (policy.host.machine_cache_dir, policy.host.state_dir):
            os.makedirs(own, mode=0o700, exist_ok=True)
        sweep_stale(f"{policy.host.state_dir}/placeholders")
        return ensure_empty_file(f"{policy.host.state_dir}/empty")

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: File = None,
        stdout: File = None,
        stderr: File = None,
        pass_fds: Sequence[int] = (),
        session: Session | None = None,
    ) -> SandboxProcess:
        """Start `argv` in a new sandbox. Only fds 0-2 and `pass_fds` are inherited.

        `session` defaults to "inherit" when stdin is a terminal (an interactive program keeps
        its terminal) and "new" otherwise.
        """
        if not argv:
            raise UsageError("no command given")
        policy = self.policy
        facts = self._machine()
        if self._backend is None:
            self._backend = choose_backend(policy, facts)
        workdir = self._check_cwd(cwd or policy.workspace)
        if session is None:
            stdin_fd = stdin if isinstance(stdin, int) else 0 if stdin is None else None
            interactive = stdin_fd is not None and stdin_fd >= 0 and os.isatty(stdin_fd)
            session = "inherit" if interactive else "new"
        inherit = session == "inherit"
        sandbox_id = os.urandom(6).hex()
        if self._backend == "landlock":
            from corral.nsfree import spawn_nsfree

            self._prepare_host()
            return spawn_nsfree(
                policy,
                facts,
                argv,
                seccomp_program=self.seccomp_program(),
                env=sandbox_environment(policy, os.environ if env is None else env),
                workdir=workdir,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=pass_fds,
                session=session,
                sandbox_id=sandbox_id,
                network=self.network,
                monitor=lambda plan, writable: self._monitor_launch(
                    plan, sandbox_id, writable=writable
                ),
            )
        network = self.network()
        empty_file = self._prepare_host()
        plan = plan_filesystem(policy, gather_disk_facts(policy))
        rlimits = launch_rlimits(policy.limits, facts)
        # Limits go on the sandbox's pid 1 while bwrap waits at --block-fd: set there, the
        # process limit counts the sandbox's own user namespace only (Linux >= 5.14).
        held = apply_point(facts) == "sandbox-init"
        child_side: list[int] = []  # the parent's copies, closed once the child has them
        parent_side_objects: list[Prepared] = []  # host-built rulesets, closed after the spawn
        parent_side: list[int] = []  # kept by the parent, closed only if the launch fails
        command_net = None
        journal = None
        cgroup = self._make_cgroup(facts, sandbox_id) if held else None
        watch = self._monitor_launch(plan, sandbox_id)
        monitor: Monitor | None = None
        try:
            if network is not None:
                command_net = network.for_command(sandbox_id)
                argv = [*command_net.argv_prefix, *argv]
            status_r, status_w = os.pipe()
            parent_side.append(status_r)
            child_side.append(status_w)
            gate_r, gate_w = os.pipe() if held else (None, None)
            if gate_r is not None and gate_w is not None:
                child_side.append(gate_r)
                parent_side.append(gate_w)
            seccomp_fd = open_program_fd(self.seccomp_program())
            child_side.append(seccomp_fd)
            options = BwrapOptions(
                cwd=workdir,
                uid=os.getuid(),
                gid=os.getgid(),
                session=session,
                bwrap_version=facts.bwrap_version or (0, 0, 0),
                seccomp_fd=seccomp_fd,
                status_fd=status_w,
                block_fd=gate_r,
                empty_file=empty_file,
            )
            native = None
            inherited_too: list[int] = []
            if facts.landlock_abi > 0:
                native = self._native_landlock(plan, facts, argv, child_path(env), inherit)
            if native is not None:
                # The second wall, applied by a tiny native launcher just before exec.
                inner_argv, native_fds, prepared = native
                child_side.append(native_fds[0])  # the launcher's memfd
                inherited_too = native_fds[1:]  # the ruleset: closed by `prepared` below
                parent_side_objects.append(prepared)
            elif facts.landlock_abi > 0:
                # The same, by corral.inner (no native launcher for this machine or command).
                script_fd, rules_fd = self._landlock_fds(plan, facts.landlock_abi)
                child_side += [script_fd, rules_fd]
                inner_argv = script_argv(
                    os.path.realpath(sys.executable),
                    script_fd=script_fd,
                    rules_fd=rules_fd,
                    command=list(argv),
                    reset_terminal_signals=inherit,
                )
            else:
                inner_argv = [*terminal_shim(), *argv] if inherit else list(argv)
            command = bwrap_argv(
                plan, options, inner_argv, bwrap=self._bwrap or facts.bwrap_path or "bwrap"
            )
            child_env = sandbox_environment(policy, os.environ if env is None else env)
            if command_net is not None:
                add_network_environment(child_env, command_net.env)
            journal = create_placeholders(
                plan.placeholders, journal_dir=f"{policy.host.state_dir}/placeholders"
            )
            preexec = preexec_for(inherit=inherit, rlimits=None if held else rlimits)
            if preexec is None and watch is not None and not watch.vfork_safe:
                preexec = _without_vfork
            fds = [
                *child_side,
                *inherited_too,
                *pass_fds,
                *(command_net.pass_fds if command_net else ()),
            ]

            def start() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    command,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    env=child_env,
                    pass_fds=fds,
                    close_fds=True,
                    preexec_fn=preexec,
                    process_group=None if inherit else 0,
                )

            if watch is None:
                popen = start()
            else:
                popen, monitor = watch.spawn(start)
        except BaseException as exc:
            for fd in parent_side:
                os.close(fd)
            if journal is not None:
                remove_placeholders(journal)
            if cgroup is not None:
                remove_cgroup(cgroup)
            if isinstance(exc, OSError):
                raise LaunchError(f"could not start the sandbox: {exc}") from exc
            raise
        finally:
            for fd in child_side:
                os.close(fd)
            for prepared in parent_side_objects:
                prepared.close()
            if network is not None and command_net is not None:
                network.after_spawn(command_net)
        cleanups: list[Callable[[], None]] = []
        if monitor is not None:
            cleanups.append(lambda: self._stop_monitor(monitor))
        if cgroup is not None:
            cleanups.append(lambda: remove_cgroup(cgroup))
        proc = SandboxProcess(
            popen,
            status_fd=status_r,
            session=session,
            journal=journal,
            plan=plan,
            sandbox_id=sandbox_id,
            cleanup=_in_order(cleanups),
        )
        if gate_w is not None:
            limit_then_release(proc, rlimits, gate_w, cgroup)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        stdin: File = None,
        capture_output: bool = False,
        timeout: float | None = None,
        pass_fds: Sequence[int] = (),
    ) -> RunResult:
        """Run `argv` to completion. On timeout (the argument, else the policy's) the whole
        sandbox is killed: nothing started inside survives it."""
        if timeout is None:
            timeout = self.policy.limits.timeout_seconds
        pipe = subprocess.PIPE if capture_output else None
        proc = self.spawn(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if input is not None else stdin,
            stdout=pipe,
            stderr=pipe,
            pass_fds=pass_fds,
        )
        limit = self.policy.limits.output_bytes if capture_output else None
        if limit is None:
            out, err, timed_out = communicate(proc, input, timeout)
            truncated = False
        else:
            out, err, timed_out, truncated = capture_bounded(proc, input, timeout, limit)
        returncode = proc.returncode if proc.returncode is not None else -1
        return RunResult(returncode, out, err, timed_out, proc.sandbox_id, truncated)


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

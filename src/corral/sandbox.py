"""The Python API: `Sandbox(policy).run(argv)` and the streaming `Sandbox(policy).spawn(argv)`.

One launch, step by step (`Sandbox.spawn`, then `bwrap_launch.start_in_bwrap`):
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
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from corral.audit.events import Sink
    from corral.monitor import Monitor, MonitorLaunch

from corral.backends.bubblewrap import Session
from corral.backends.facts import DiskFacts, FactQuery, fact_query, gather_facts
from corral.backends.fsplan import FilesystemPlan, plan_filesystem
from corral.backends.placeholders import ensure_private_dir, sweep_stale
from corral.backends.seccomp import SeccompOptions, build_filter, host_arch
from corral.bwrap_launch import BwrapContext, File, LaunchRequest, start_in_bwrap
from corral.errors import SandboxUnavailable, UsageError
from corral.inner import compiled_script
from corral.launch import ScrubbedNames, choose_backend, ensure_empty_file, sandbox_environment
from corral.network import (
    Ask,
    NetworkService,
    Notify,
    Resolver,
    start_network,
    write_to_stderr,
)
from corral.policy.model import MonitorViolations, Policy
from corral.policy.paths import is_within
from corral.probe import MachineFacts, probe
from corral.process import SandboxProcess, capture_bounded, communicate


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
        self._monitor_refused: str | None = None
        """Why the kernel would not install the monitor's filter for a command (then off)."""
        self._notify_program: bytes | None = None
        self._last_plan: tuple[Policy, DiskFacts, FilesystemPlan] | None = None
        self._fact_query: tuple[Policy, FactQuery] | None = None
        self._env_names: ScrubbedNames | None = None
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
        if wanted == "off" or self._monitor_refused is not None:
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
            refused=lambda why: self._monitor_refused_for(sandbox_id, why),
        )

    def _monitor_refused_for(self, sandbox_id: str, why: str) -> None:
        """The command runs unwatched: its refused attempts come from the breadcrumbs again,
        and so do those of the next commands, which do not try the filter again."""
        from corral.audit.violations import RunViolations

        first = self._monitor_refused is None
        self._monitor_refused = why
        if isinstance(self.sink, RunViolations):
            self.sink.detach_monitor(sandbox_id)
        if first and self._notify is not None:
            self._notify(
                f"corral: the violation monitor cannot run here ({why}); refused file "
                "accesses are recorded from the command's error output only"
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

    def _inner_script(self) -> bytes:
        """corral.inner's bytecode (compiled once per Sandbox; it depends on nothing else)."""
        if self._inner_code is None:
            self._inner_code = compiled_script()
        return self._inner_code

    def _prepare_host(self) -> str:
        """Create what the plan needs on the host; return the empty file for hidden files."""
        policy = self.policy
        if policy.package_cache is not None:
            ensure_private_dir(policy.package_cache)
        # corral's own directories exist before the plan is made, so that they are protected
        # as directories rather than by placeholders.
        for own in (policy.host.machine_cache_dir, policy.host.state_dir):
            ensure_private_dir(own)
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
        facts = self._machine()
        if self._backend is None:
            self._backend = choose_backend(self.policy, facts)
        workdir = self._check_cwd(cwd or self.policy.workspace)
        if session is None:
            stdin_fd = stdin if isinstance(stdin, int) else 0 if stdin is None else None
            interactive = stdin_fd is not None and stdin_fd >= 0 and os.isatty(stdin_fd)
            session = "inherit" if interactive else "new"
        sandbox_id = os.urandom(6).hex()
        request = LaunchRequest(
            argv, workdir, env, stdin, stdout, stderr, pass_fds, session, sandbox_id
        )
        if self._backend == "landlock":
            return self._spawn_without_namespaces(facts, request)
        return self._spawn_in_bwrap(facts, request)

    def _spawn_in_bwrap(self, facts: MachineFacts, request: LaunchRequest) -> SandboxProcess:
        network = self.network()
        context = BwrapContext(
            policy=self.policy,
            facts=facts,
            bwrap=self._bwrap or facts.bwrap_path or "bwrap",
            seccomp_program=self.seccomp_program(),
            network=network,
            empty_file=self._prepare_host(),
            monitor_launch=self._monitor_launch,
            stop_monitor=self._stop_monitor,
            inner_code=self._inner_script,
            env_names=self._scrubbed_names(),
        )
        return start_in_bwrap(context, self._plan(), request)

    def _scrubbed_names(self) -> ScrubbedNames:
        """Which variable names this policy's env rules remove, as learnt so far."""
        if self._env_names is None or self._env_names.rules is not self.policy.env:
            self._env_names = ScrubbedNames(self.policy.env)
        return self._env_names

    def _plan(self) -> FilesystemPlan:
        """This launch's filesystem plan, from disk facts gathered now.

        The facts (what exists, what is a link and where it points) are read afresh for every
        launch: they are the state of the disk, and a stale one would leave a new denied path
        unprotected. Only the planning is reused: `plan_filesystem` is a pure function of the
        policy and the facts, so when both equal the last launch's, so does the plan (all
        tuples, never changed once made). Saves the planning, about 0.8 ms a launch.
        """
        policy = self.policy
        if self._fact_query is None or self._fact_query[0] is not policy:
            # Which paths to look at depends on the policy alone; what they are, on the disk.
            self._fact_query = (policy, fact_query(policy))
        facts = gather_facts(self._fact_query[1])
        last = self._last_plan
        if last is not None and last[0] is policy and last[1] == facts:
            return last[2]
        plan = plan_filesystem(policy, facts)
        self._last_plan = (policy, facts, plan)
        return plan

    def _spawn_without_namespaces(
        self, facts: MachineFacts, request: LaunchRequest
    ) -> SandboxProcess:
        """The Landlock-only backend (corral.nsfree)."""
        from corral.nsfree import spawn_nsfree

        policy = self.policy
        self._prepare_host()
        return spawn_nsfree(
            policy,
            facts,
            request.argv,
            seccomp_program=self.seccomp_program(),
            env=sandbox_environment(
                policy,
                os.environ if request.env is None else request.env,
                names=self._scrubbed_names(),
            ),
            workdir=request.workdir,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            pass_fds=request.pass_fds,
            session=request.session,
            sandbox_id=request.sandbox_id,
            network=self.network,
            monitor=lambda plan, writable: self._monitor_launch(
                plan, request.sandbox_id, writable=writable
            ),
        )

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

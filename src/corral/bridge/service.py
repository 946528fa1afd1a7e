"""`Bridge`: the one facade every front end (HTTP, spool, MCP, CLI) calls.

    bridge = Bridge.from_settings(workspace, audit=sink)
    view = bridge.submit("test", {"target": "tests/unit"}, client="http:token-1")
    view = bridge.wait(view.id, timeout_s=30)

A request goes: rate limit (per client) -> binding (BridgeError at once on bad input) ->
admission (queued + awaiting approval <= max_queued_jobs, else too_many_jobs) -> the
declaration's approval rule:
    deny  the job is denied at once, and says why
    ask   a pending approval is written to the shared store; the job waits until a human
          decides (any process: `corral approve`, the web page) or the timeout denies it
    auto  queued for a worker
Audit (bridge events on `audit`): every decision (allow / deny, by "policy", a human such as
"cli:alice", "timeout" or "shutdown"), an "ask" when a request starts waiting, and for each
run its session start and end (argv, cwd, mode, exit code) as `corral run` records them.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from corral.policy.settings import MANAGED_SETTINGS

from .approvals import ApprovalStore, Decision, PendingApproval, new_id
from .binding import bind, command_policy, describe_policy
from .declarations import BridgeSettings, Command, Param, load_declarations
from .errors import BridgeError
from .jobs import Job, JobTable, JobView, WorkerPool, execute
from .waiter import ApprovalWaiter

if TYPE_CHECKING:
    from corral.audit.events import BridgeDecision, Sink
    from corral.policy.model import HostPaths, Policy
    from corral.sandbox import Sandbox

__all__ = [
    "Bridge",
    "BridgeError",
    "BridgeLimits",
    "Command",
    "JobView",
    "Param",
    "PendingApproval",
]

# What a sandboxed command gets of the bridge's environment: enough to find programs and
# speak the user's language. The rest (tokens, agent variables) stays out.
PASSED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_TRACKED_CLIENTS = 10_000  # rate windows kept; idle ones are dropped beyond this


class BridgeLimits(NamedTuple):
    max_concurrent_jobs: int = 4
    max_queued_jobs: int = 32
    """Jobs queued or awaiting approval; one more is refused with too_many_jobs (503)."""
    max_body_bytes: int = 65536
    """For the front ends: a request body larger than this is request_too_large (413)."""
    requests_per_minute: int = 120
    """Per client (`submit`'s `client`); above it rate_limited (429)."""
    max_output_bytes: int = 1 << 20
    """Captured stdout (and stderr) per job; a declaration may ask for less, never more."""
    keep_finished_jobs: int = 1000


class Bridge:
    """Declared commands, run on request in sandboxes. Thread-safe; close() when done."""

    def __init__(
        self,
        host: HostPaths,
        settings: BridgeSettings,
        *,
        state_dir: str | None = None,
        audit: Sink | None = None,
        limits: BridgeLimits | None = None,
        managed_path: str = MANAGED_SETTINGS,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        from corral.audit.events import MemorySink

        self.host = host
        self.commands: tuple[Command, ...] = settings.commands
        self.approval_timeout_s = settings.approval_timeout_s
        self.limits = limits or BridgeLimits()
        self.audit: Sink = audit if audit is not None else MemorySink()
        self.store = ApprovalStore.in_state_dir(state_dir or host.state_dir)
        self._policies: dict[str, Policy] = {
            command.name: command_policy(command, host, managed_path=managed_path)
            for command in self.commands
        }
        _refuse_writable_store(self.store.directory, self._policies)
        self._sandboxes: dict[str, Sandbox] = {}
        self._env = _command_environment(os.environ if environ is None else environ)
        self._table = JobTable(keep_finished=self.limits.keep_finished_jobs)
        self._pool = WorkerPool(self._run, workers=self.limits.max_concurrent_jobs)
        self._lock = threading.Lock()  # admission, rate windows, sandboxes
        self._rates: dict[str, deque[float]] = {}
        self._waiter = ApprovalWaiter[Job](self.store, self._decided)
        self._closed = False

    @classmethod
    def from_settings(
        cls,
        workspace: str,
        *,
        state_dir: str | None = None,
        audit: Sink | None = None,
        limits: BridgeLimits | None = None,
        managed_path: str = MANAGED_SETTINGS,
        environ: Mapping[str, str] | None = None,
    ) -> Bridge:
        """The commands declared in the settings files of `workspace` (SettingsError when one
        of them is wrong). `environ` (default os.environ) gives HOME and the XDG directories."""
        from corral.hostpaths import host_paths

        env = os.environ if environ is None else environ
        host = host_paths(workspace, env)
        settings = load_declarations(host, managed_path=managed_path)
        return cls(
            host,
            settings,
            state_dir=state_dir,
            audit=audit,
            limits=limits,
            managed_path=managed_path,
            environ=env,
        )

    # -- requests --------------------------------------------------------------------------

    def command(self, name: str) -> Command:
        for command in self.commands:
            if command.name == name:
                return command
        raise BridgeError(
            "unknown_command",
            f"no command {name!r} is declared",
            hint="declared: " + (", ".join(c.name for c in self.commands) or "none"),
            detail={"command": name},
        )

    def policy(self, name: str) -> Policy:
        """The policy the command runs under (for display)."""
        return self._policies[self.command(name).name]

    def submit(self, name: str, args: Mapping[str, object], *, client: str) -> JobView:
        """Check and queue a request (see the module docstring). Raises BridgeError for a
        request that is refused outright; a denial by rule or by a human is a job state."""
        command = self.command(name)
        self._count_request(client)
        invocation = bind(
            command,
            args,
            workspace=self.host.workspace,
            policy=self._policies[command.name],
            output_limit=self.limits.max_output_bytes,
        )
        job = Job(new_id(12), invocation, client=client)
        with self._lock:
            if self._closed:
                raise BridgeError("internal", "the bridge is shutting down", status=503)
            if invocation.approval == "deny":
                job.state = "denied"
                job.reason = (
                    f"denied by rule: {invocation.approval_reason}. A human must change the "
                    "bridge settings to allow it; do not retry"
                )
                job.finished = time.time()
                self._table.add(job)
                self._audit_decision(job, approve=False, by="policy")
                return job.view()
            self._admit()
            if invocation.approval == "ask":
                self._ask(job)  # before the table has it: a failure leaves nothing behind
                self._table.add(job)
            else:
                self._table.add(job)
                self._audit_decision(job, approve=True, by="policy")
                self._pool.put(job)
        return self._table.view(job.id)

    def _count_request(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            window = self._rates.setdefault(client, deque())
            while window and now - window[0] >= 60.0:
                window.popleft()
            if len(window) >= self.limits.requests_per_minute:
                retry = 60.0 - (now - window[0])
                raise BridgeError(
                    "rate_limited",
                    f"more than {self.limits.requests_per_minute} requests a minute",
                    hint=f"retry in {retry:.0f} s",
                    detail={"retry_after_s": round(retry, 3)},
                )
            window.append(now)
            if len(self._rates) > MAX_TRACKED_CLIENTS:  # forget clients idle for a minute
                for name in [n for n, w in self._rates.items() if now - w[-1] >= 60.0]:
                    del self._rates[name]

    def _admit(self) -> None:
        waiting = self._table.count("queued", "awaiting_approval")
        if waiting >= self.limits.max_queued_jobs:
            raise BridgeError(
                "too_many_jobs",
                f"{waiting} jobs are already waiting (the limit is {self.limits.max_queued_jobs})",
                hint="wait for a running job to finish, then retry",
            )

    # -- jobs ------------------------------------------------------------------------------

    def job(self, job_id: str) -> JobView:
        return self._table.view(job_id)

    def wait(self, job_id: str, *, timeout_s: float | None) -> JobView:
        """The job once finished, or as it is when `timeout_s` has passed."""
        return self._table.wait(job_id, timeout_s)

    def when_finished(
        self, job_id: str, callback: Callable[[JobView], None]
    ) -> Callable[[], JobView]:
        """Call `callback(view)` once when the job finishes (see `JobTable.watch`: quick, from
        the finishing thread); returns `unwatch`, which stops it and gives the job as it is."""
        return self._table.watch(job_id, callback)

    def output(self, job_id: str, *, offset: int = 0) -> tuple[bytes, bool]:
        """stdout from byte `offset` on, and whether the job has finished (nothing more will
        come)."""
        return self._table.output(job_id, offset)

    def _sandbox(self, command: str) -> Sandbox:
        from corral.sandbox import Sandbox

        with self._lock:
            sandbox = self._sandboxes.get(command)
            if sandbox is None:
                sandbox = Sandbox(self._policies[command], sink=self.audit)
                sandbox.network()  # start a proxy (if any) once, not in racing workers
                self._sandboxes[command] = sandbox
            return sandbox

    def _run(self, job: Job) -> None:
        sandbox = self._sandbox(job.invocation.command.name)
        execute(job, sandbox, self._table, env=self._env, sink=self.audit)

    # -- approvals -------------------------------------------------------------------------

    def pending(self) -> tuple[PendingApproval, ...]:
        """Every request waiting for a human, of this bridge and of others sharing the state
        directory, oldest first."""
        return self.store.pending()

    def decide(self, approval_id: str, *, approve: bool, by: str, reason: str = "") -> None:
        """A human's decision (`by`: "cli:alice", "web", "mcp"...). BridgeError
        unknown_approval or not_pending."""
        self.store.decide(approval_id, approve=approve, by=by, reason=reason)
        self._waiter.wake()

    def _ask(self, job: Job) -> None:
        inv = job.invocation
        now = time.time()
        approval = PendingApproval(
            id=new_id(),
            job_id=job.id,
            command=inv.command.name,
            argv=inv.argv,
            cwd=inv.cwd,
            policy_summary=describe_policy(inv.policy),
            reason=inv.approval_reason or "",
            client=job.client,
            created=now,
            expires=now + self.approval_timeout_s,
        )
        job.approval_id = approval.id
        job.reason = (
            f"waiting for a human to approve it ({approval.reason}): ask the user to run "
            f"`corral approve {approval.id}` or to approve it on the bridge's approvals page; "
            f"it is denied if nobody decides within {self.approval_timeout_s:g} s"
        )
        try:
            self.store.create(approval)
        except OSError as exc:
            raise BridgeError(
                "internal", f"could not record the approval request: {exc.strerror}"
            ) from exc
        job.state = "awaiting_approval"
        self._audit_event(job, decision="ask", by="policy")
        self._waiter.add(approval.id, job, expires=approval.expires)

    def _decided(self, job: Job, decision: Decision) -> None:
        """The waiter's call, once per approval: queue the job or deny it, and record who."""
        self._audit_decision(job, approve=decision.approve, by=decision.by)
        if not decision.approve:
            reason = denial_reason(decision, self.approval_timeout_s)
            self._table.move(job, "denied", reason=reason)
        elif self._table.move(job, "queued", reason=""):
            try:
                self._pool.put(job)
            except BridgeError as exc:  # shut down in the meantime
                self._table.move(job, "failed", reason=exc.message)

    # -- audit -----------------------------------------------------------------------------

    def _audit_decision(self, job: Job, *, approve: bool, by: str) -> None:
        from corral.audit.events import bridge_event

        self.audit.emit(
            bridge_event(
                job.id,
                request_id=job.id,
                command=job.invocation.command.name,
                params=job.invocation.values,
                decision="allow" if approve else "deny",
                decided_by=by,
            )
        )

    def _audit_event(self, job: Job, *, decision: BridgeDecision, by: str) -> None:
        from corral.audit.events import bridge_event

        self.audit.emit(
            bridge_event(
                job.id,
                request_id=job.id,
                command=job.invocation.command.name,
                params=dict(job.invocation.values),
                decision=decision,
                decided_by=by,
            )
        )

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: waiting approvals become denials, queued jobs fail, running ones are killed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._waiter.close()
        for job in self._table.jobs():
            with self._table.changed:
                job.cancelled = True
                process = job.process
            if process is not None:
                process.kill()
        for job in self._pool.close():
            self._table.move(job, "failed", reason="the bridge shut down before it ran")
        with self._lock:
            for sandbox in self._sandboxes.values():
                sandbox.close()
            self._sandboxes.clear()

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def denial_reason(decision: Decision, timeout_s: float) -> str:
    """What a denied agent is told: why, and how a human can make it happen after all."""
    if decision.by == "timeout":
        return (
            f"approval_timeout: nobody approved it within {timeout_s:g} s. Ask the user to "
            "watch for the request (`corral approvals`, or the approvals page), then submit "
            "it once more; do not retry in a loop"
        )
    if decision.by == "shutdown":
        return "the bridge shut down before a human decided; submit it again once it is back"
    why = f": {decision.reason}" if decision.reason else ""
    return (
        f"a human ({decision.by}) denied it{why}. Ask them why, or what to do instead; do not "
        "retry in a loop. If they change their mind, they approve your next request"
    )


def _refuse_writable_store(directory: str, policies: Mapping[str, Policy]) -> None:
    """A command that could write the approvals directory could approve its own requests."""
    from corral.errors import UsageError
    from corral.policy.paths import is_within

    for name, policy in policies.items():
        fs = policy.filesystem
        writable = any(is_within(directory, rule.value) for rule in fs.write)
        protected = any(is_within(directory, rule.value) for rule in fs.deny_write)
        if writable and not protected:
            raise UsageError(
                f"the approvals directory {directory} is writable inside the sandbox of "
                f"command {name}: it could approve its own requests",
                hint="keep the state directory out of the workspace and writable paths",
            )


def _command_environment(environ: Mapping[str, str]) -> dict[str, str]:
    env = {name: environ[name] for name in PASSED_ENVIRONMENT if name in environ}
    env.setdefault("PATH", DEFAULT_PATH)
    return env

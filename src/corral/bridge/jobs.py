"""Jobs: one request's life, and the worker threads that run invocations in sandboxes.

States and their legal transitions (everything else is a bug):

    awaiting_approval -> queued | denied        a human (or the timeout) decided
    queued            -> running | failed       a worker took it / the bridge shut down
    running           -> succeeded | failed | timed_out
    (submit)          -> awaiting_approval | queued | denied

Finished states: succeeded, failed, denied, timed_out. Output: stdout and stderr are read as
they come (so `Bridge.output` can stream), up to the invocation's output limit each; the rest
is read and dropped, and `truncated` says so. A timeout kills the whole sandbox.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal, NamedTuple

from corral.errors import CorralError

from .binding import Invocation
from .errors import BridgeError

if TYPE_CHECKING:
    from corral.audit.events import Sink
    from corral.process import SandboxProcess
    from corral.sandbox import Sandbox

JobState = Literal[
    "awaiting_approval", "queued", "running", "succeeded", "failed", "denied", "timed_out"
]
FINISHED: frozenset[str] = frozenset(["succeeded", "failed", "denied", "timed_out"])
TRANSITIONS: dict[str, frozenset[str]] = {
    "awaiting_approval": frozenset(["queued", "denied"]),
    "queued": frozenset(["running", "failed"]),
    "running": frozenset(["succeeded", "failed", "timed_out"]),
}
READ_CHUNK = 65536


class JobView(NamedTuple):
    """A job as the front ends see it (a snapshot; stdout/stderr decoded, invalid UTF-8
    replaced)."""

    id: str
    command: str
    argv: tuple[str, ...]
    cwd: str
    state: JobState
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    reason: str
    """For denied, failed or waiting jobs: why, and what the agent should do next."""
    approval_id: str | None
    created: float
    finished: float | None

    def as_json(self) -> dict[str, object]:
        record: dict[str, object] = dict(self._asdict())
        record["argv"] = list(self.argv)
        return record


class Job:
    """The mutable record behind a JobView. Changed only under its JobTable's lock."""

    def __init__(self, job_id: str, invocation: Invocation, *, client: str) -> None:
        self.id = job_id
        self.invocation = invocation
        self.client = client
        self.state: JobState = "queued"
        self.exit_code: int | None = None
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.truncated = False
        self.reason = ""
        self.approval_id: str | None = None
        self.created = time.time()
        self.finished: float | None = None
        self.process: SandboxProcess | None = None
        self.cancelled = False
        self.watchers: list[Callable[[JobView], None]] = []  # see JobTable.watch

    def view(self) -> JobView:
        return JobView(
            id=self.id,
            command=self.invocation.command.name,
            argv=self.invocation.argv,
            cwd=self.invocation.cwd,
            state=self.state,
            exit_code=self.exit_code,
            stdout=self.stdout.decode(errors="replace"),
            stderr=self.stderr.decode(errors="replace"),
            truncated=self.truncated,
            reason=self.reason,
            approval_id=self.approval_id,
            created=self.created,
            finished=self.finished,
        )


class JobTable:
    """Every job of one Bridge, by id; finished ones beyond `keep_finished` are forgotten,
    oldest first, so a long-running server's memory stays bounded."""

    def __init__(self, *, keep_finished: int = 1000) -> None:
        self.changed = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._finished: deque[str] = deque()
        self._keep = keep_finished

    def add(self, job: Job) -> None:
        with self.changed:
            self._jobs[job.id] = job

    def get(self, job_id: str) -> Job:
        with self.changed:
            job = self._jobs.get(job_id)
        if job is None:
            raise BridgeError(
                "unknown_job",
                f"no job {job_id!r}",
                hint="job ids come from the answer to a run request; old results are dropped",
            )
        return job

    def count(self, *states: str) -> int:
        with self.changed:
            return sum(1 for job in self._jobs.values() if job.state in states)

    def jobs(self) -> list[Job]:
        with self.changed:
            return list(self._jobs.values())

    def move(self, job: Job, state: JobState, *, reason: str | None = None) -> bool:
        """Move `job` to `state` if the table of transitions allows it; False otherwise (it was
        moved already, e.g. finished by a shutdown)."""
        with self.changed:
            if state not in TRANSITIONS.get(job.state, frozenset()):
                return False
            job.state = state
            if reason is not None:
                job.reason = reason
            if state in FINISHED:
                job.finished = time.time()
                self._finished.append(job.id)
                while len(self._finished) > self._keep:
                    self._jobs.pop(self._finished.popleft(), None)
                # Only `wait` sleeps on `changed`, and only for a finish: waking it for any
                # other move (or for output) costs a thread switch per job for nothing.
                self.changed.notify_all()
                self._tell_watchers(job)
            return True

    def watch(self, job_id: str, callback: Callable[[JobView], None]) -> Callable[[], JobView]:
        """Call `callback(view)` once, when the job finishes: from the thread that finishes
        it, under the table's lock (so it must be quick and must not block), or at once from
        this thread if it has finished. Returns `unwatch`: stop watching and get the job as it
        is now. Lets a caller wait without a thread of its own (the HTTP edge's event loop)."""
        job = self.get(job_id)
        with self.changed:
            if job.state in FINISHED:
                view = job.view()
            else:
                job.watchers.append(callback)
                return lambda: self._unwatch(job, callback)
        callback(view)
        return lambda: view

    def _unwatch(self, job: Job, callback: Callable[[JobView], None]) -> JobView:
        with self.changed:
            if callback in job.watchers:
                job.watchers.remove(callback)
            return job.view()

    def _tell_watchers(self, job: Job) -> None:
        watchers, job.watchers = job.watchers, []
        if watchers:
            view = job.view()
            for callback in watchers:
                # A watcher's failure must not undo the finish this method is part of.
                with contextlib.suppress(Exception):
                    callback(view)

    def wait(self, job_id: str, timeout_s: float | None) -> JobView:
        job = self.get(job_id)
        with self.changed:
            self.changed.wait_for(lambda: job.state in FINISHED, timeout=timeout_s)
            return job.view()

    def view(self, job_id: str) -> JobView:
        job = self.get(job_id)
        with self.changed:
            return job.view()

    def output(self, job_id: str, offset: int) -> tuple[bytes, bool]:
        job = self.get(job_id)
        with self.changed:
            return bytes(job.stdout[max(offset, 0) :]), job.state in FINISHED


class WorkerPool:
    """At most `workers` threads, started as jobs arrive, each running one job at a time.
    Admission (how many may wait) is the Bridge's: the queue here holds what was admitted."""

    def __init__(self, run: Callable[[Job], None], *, workers: int) -> None:
        self._run = run
        self._workers = workers
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise BridgeError("internal", "the bridge is shutting down", status=503)
            self._queue.append(job)
            if self._idle == 0 and len(self._threads) < self._workers:
                thread = threading.Thread(target=self._loop, name="corral-bridge-job", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                self._cond.wait_for(lambda: self._queue or self._closed)
                self._idle -= 1
                if not self._queue:
                    return
                job = self._queue.popleft()
            self._run(job)

    def close(self, *, timeout_s: float = 10.0) -> list[Job]:
        """Stop taking jobs; return the ones still queued (never started)."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return left


def execute(
    job: Job,
    sandbox: Sandbox,
    table: JobTable,
    *,
    env: Mapping[str, str],
    sink: Sink,
) -> None:
    """Run the job's invocation in `sandbox` to the end, recording the session in `sink`.
    Never raises: whatever goes wrong ends the job as failed, with the reason."""
    if not table.move(job, "running"):
        return
    try:
        _run_to_end(job, sandbox, table, env=env, sink=sink)
    except CorralError as exc:
        table.move(job, "failed", reason=f"the sandbox could not run it: {exc.message}")
    except Exception as exc:  # a worker must survive anything; the job says what happened
        table.move(job, "failed", reason=f"internal error: {type(exc).__name__}: {exc}")


def _run_to_end(
    job: Job, sandbox: Sandbox, table: JobTable, *, env: Mapping[str, str], sink: Sink
) -> None:
    from corral.audit.record import record_session_end, record_session_start

    inv = job.invocation
    proc = sandbox.spawn(
        inv.argv,
        cwd=inv.cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        session="new",
    )
    with table.changed:
        job.process = proc
        cancelled = job.cancelled
    if cancelled:  # the bridge closed while this one was starting
        proc.kill()
    record_session_start(
        sink,
        proc.sandbox_id,
        policy=inv.policy,
        argv=inv.argv,
        cwd=inv.cwd,
        backend=sandbox.backend,
    )
    timed_out = _wait_with_output(job, proc, table)
    code = proc.returncode
    record_session_end(sink, proc.sandbox_id, exit_code=code)
    with table.changed:
        job.exit_code = code
        job.process = None
    if job.cancelled:
        table.move(job, "failed", reason="the bridge shut down while the command ran")
    elif timed_out:
        reason = f"killed after {inv.timeout_s:g} s (the declared timeoutSeconds)"
        table.move(job, "timed_out", reason=reason)
    elif code == 0:
        table.move(job, "succeeded")
    else:
        table.move(job, "failed", reason=f"the command exited with status {code}")


def _wait_with_output(job: Job, proc: SandboxProcess, table: JobTable) -> bool:
    """Copy the output into the job while waiting; kill at the timeout. True if it timed out.

    One selector loop on this worker's thread rather than a reader thread per stream: two
    thread starts per job are a measurable share of a trivial command's round trip."""
    import selectors

    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + job.invocation.timeout_s
    timed_out = False
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout.fileno(), selectors.EVENT_READ, job.stdout)
    selector.register(proc.stderr.fileno(), selectors.EVENT_READ, job.stderr)
    try:
        while selector.get_map():
            left = None if timed_out else deadline - time.monotonic()
            if left is not None and left <= 0:
                timed_out = True
                proc.kill()  # the whole sandbox: the pipes reach EOF once it is gone
                continue
            for key, _events in selector.select(left):
                chunk = os.read(key.fd, READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                _keep(job, key.data, chunk, table)
        if not timed_out:
            try:
                # Both streams closed; the command may still run (it closed them itself).
                proc.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()
        proc.wait()
    finally:
        selector.close()
        if proc.returncode is None:  # wait raised: leave nothing running behind
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    return timed_out


def _keep(job: Job, into: bytearray, chunk: bytes, table: JobTable) -> None:
    """Append what fits under the output limit; the rest is dropped and `truncated` set."""
    with table.changed:
        room = max(job.invocation.output_limit - len(into), 0)
        into += chunk[:room]
        if len(chunk) > room:
            job.truncated = True

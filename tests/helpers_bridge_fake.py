"""A stand-in for `corral.bridge.service.Bridge` with the seam's methods, for front-end tests
that are about the front end (files, protocol) rather than about running commands.

Its one command, `echo`, "runs" by returning its `text` argument as stdout, on a thread of
its own. `capacity` makes `submit` refuse with too_many_jobs while that many jobs are
unfinished, and holds every job until the first refusal, so that a flood is sure to fill the
bridge at least once. Commands named in `ask` wait for `decide`. Real sandboxed runs are tested with
the real Bridge elsewhere in the same test files.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from typing import NamedTuple

from corral.bridge.errors import BridgeError
from corral.bridge.jobs import JobView

FINAL = ("succeeded", "failed", "denied", "timed_out")


class FakePending(NamedTuple):
    id: str
    job_id: str
    command: str

    def as_json(self) -> dict[str, object]:
        return dict(self._asdict())


class FakeBridge:
    commands: tuple[object, ...] = ()

    def __init__(self, *, capacity: int | None = None, ask: tuple[str, ...] = ()) -> None:
        self.capacity = capacity
        self.ask = ask
        self.submitted: list[tuple[str, dict[str, object]]] = []
        self.refused_for_capacity = 0
        self._jobs: dict[str, JobView] = {}
        self._ids = itertools.count(1)
        self._changed = threading.Condition()

    def submit(self, name: str, args: Mapping[str, object], *, client: str) -> JobView:
        if name not in ("echo", *self.ask):
            raise BridgeError("unknown_command", f"no command named {name!r}", hint="see tools")
        text = args.get("text", "")
        if not isinstance(text, str) or set(args) - {"text"}:
            raise BridgeError(
                "invalid_parameter", "text must be a string", detail={"param": "text"}
            )
        with self._changed:
            unfinished = sum(job.state not in FINAL for job in self._jobs.values())
            if self.capacity is not None and unfinished >= self.capacity:
                self.refused_for_capacity += 1
                self._changed.notify_all()
                raise BridgeError("too_many_jobs", "the bridge is busy")
            self.submitted.append((name, dict(args)))
            number = next(self._ids)
            job = JobView(
                f"job{number}", name, ("echo", text), "/w", "queued", None, "", "", False, "",
                None, time.time(), None,
            )  # fmt: skip
            if name in self.ask:
                job = job._replace(state="awaiting_approval", approval_id=f"ap{number}")
            self._jobs[job.id] = job
        if name not in self.ask:
            threading.Thread(target=self._run, args=(job.id,)).start()
        return job

    def _run(self, job_id: str) -> None:
        with self._changed:
            if self.capacity is not None:
                self._changed.wait_for(lambda: self.refused_for_capacity > 0)
            job = self._jobs[job_id]
            self._jobs[job_id] = job._replace(
                state="succeeded", exit_code=0, stdout=job.argv[1], finished=time.time()
            )
            self._changed.notify_all()

    def wait(self, job_id: str, *, timeout_s: float | None) -> JobView:
        with self._changed:
            self._changed.wait_for(lambda: self._jobs[job_id].state in FINAL, timeout_s)
            return self._jobs[job_id]

    def job(self, job_id: str) -> JobView:
        return self._jobs[job_id]

    def pending(self) -> tuple[FakePending, ...]:
        with self._changed:
            return tuple(
                FakePending(job.approval_id or "", job.id, job.command)
                for job in self._jobs.values()
                if job.state == "awaiting_approval"
            )

    def expire(self, approval_id: str, *, reason: str) -> None:
        """What the bridge does when nobody decides in time."""
        with self._changed:
            job = next(j for j in self._jobs.values() if j.approval_id == approval_id)
            self._jobs[job.id] = job._replace(state="denied", reason=reason, finished=time.time())
            self._changed.notify_all()

    def decide(self, approval_id: str, *, approve: bool, by: str, reason: str = "") -> None:
        with self._changed:
            job = next(j for j in self._jobs.values() if j.approval_id == approval_id)
            if not approve:
                why = f"denied by {by}: {reason}; a human can re-trigger it by asking again"
                self._jobs[job.id] = job._replace(state="denied", reason=why, finished=time.time())
                self._changed.notify_all()
                return
            self._jobs[job.id] = job._replace(state="queued")
            self._changed.notify_all()
        self._run(job.id)

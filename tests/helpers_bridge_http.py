"""A scripted stand-in for `Bridge`, for tests of the HTTP edge itself (mapping, limits, auth).

Everything the edge asks is recorded in `calls`, so a test of a refusal can show the Bridge was
never reached (the host-side evidence for a block at the edge). `fail` makes the next calls of a
method raise; `outputs` scripts the chunks `output` reveals, one more per call.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from corral.bridge.approvals import PendingApproval
from corral.bridge.declarations import Command, parse_command
from corral.bridge.errors import BridgeError
from corral.bridge.jobs import FINISHED, JobState, JobView
from corral.bridge.service import BridgeLimits
from tests.conftest import Layout

TOKEN = "t" * 43


def demo_commands() -> tuple[Command, ...]:
    return (
        parse_command(
            "echo",
            {
                "description": "Print a word",
                "argv": ["echo", "{word}"],
                "params": {"word": {"type": "string", "maxLength": 20}},
            },
            file="test",
        ),
        parse_command(
            "deploy",
            {
                "argv": ["make", "ENV={env}"],
                "params": {"env": {"type": "string", "enum": ["staging", "prod"]}},
                "approval": {"ask": {"env": "^prod$"}},
            },
            file="test",
        ),
    )


class FakeBridge:
    def __init__(
        self,
        *,
        finish: bool = True,
        limits: BridgeLimits | None = None,
        outputs: tuple[bytes, ...] = (),
    ) -> None:
        self.commands = demo_commands()
        self.limits = limits or BridgeLimits()
        self.finish = finish  # submit() answers a finished job, else a running one
        self.calls: list[tuple[str, Any]] = []
        self.fail: dict[str, BaseException] = {}
        self.outputs = outputs
        self.approvals: list[PendingApproval] = []
        self._jobs: dict[str, JobView] = {}
        self._reads: dict[str, int] = {}
        self._lock = threading.Lock()

    def _record(self, method: str, detail: Any) -> None:
        with self._lock:
            self.calls.append((method, detail))
        error = self.fail.get(method)
        if error is not None:
            raise error

    def submit(self, name: str, args: Mapping[str, object], *, client: str) -> JobView:
        self._record("submit", (name, dict(args), client))
        if name not in {c.name for c in self.commands}:
            raise BridgeError("unknown_command", f"no command {name!r} is declared", hint="x")
        state: JobState = "succeeded" if self.finish else "running"
        job = JobView(
            id=f"job{len(self._jobs) + 1}",
            command=name,
            argv=("echo", str(args.get("word", ""))),
            cwd="/w",
            state=state,
            exit_code=0 if self.finish else None,
            stdout=str(args.get("word", "")) + "\n" if self.finish else "",
            stderr="",
            truncated=False,
            reason="",
            approval_id=None,
            created=time.time(),
            finished=time.time() if self.finish else None,
        )
        self._jobs[job.id] = job
        return job

    def wait(self, job_id: str, *, timeout_s: float | None) -> JobView:
        self._record("wait", (job_id, timeout_s))
        return self.job(job_id)

    def job(self, job_id: str) -> JobView:
        if job_id not in self._jobs:
            raise BridgeError("unknown_job", f"no job {job_id!r}", hint="ids come from run")
        return self._jobs[job_id]

    def output(self, job_id: str, *, offset: int = 0) -> tuple[bytes, bool]:
        self._record("output", (job_id, offset))
        self.job(job_id)
        shown = self._reads.get(job_id, 0) + 1
        self._reads[job_id] = shown
        data = b"".join(self.outputs[:shown])
        return data[offset:], shown >= len(self.outputs)

    def pending(self) -> tuple[PendingApproval, ...]:
        self._record("pending", None)
        return tuple(self.approvals)

    def decide(self, approval_id: str, *, approve: bool, by: str, reason: str = "") -> None:
        self._record("decide", (approval_id, approve, by, reason))
        if approval_id not in {a.id for a in self.approvals}:
            raise BridgeError("unknown_approval", f"no approval {approval_id!r}")

    def finished(self, job_id: str) -> bool:
        return self._jobs[job_id].state in FINISHED


def pending_approval(approval_id: str = "ap1") -> PendingApproval:
    now = time.time()
    return PendingApproval(
        id=approval_id,
        job_id="job9",
        command="deploy",
        argv=("make", "ENV=prod"),
        cwd="/w",
        policy_summary="strict; no network; workspace read-only",
        reason="env matched /^prod$/",
        client="http",
        created=now,
        expires=now + 300,
    )


# -- declarations for the real Bridge, in the workspace's .corral/settings.json ----------------

REAL_COMMANDS: dict[str, object] = {
    "echo": {
        "description": "Print a word",
        "argv": ["echo", "{word}"],
        "params": {"word": {"type": "string", "maxLength": 200}},
        "writable": True,  # so that an injection, were it ever run by a shell, leaves its canary
    },
    "count": {
        "argv": ["seq", "{n}"],
        "params": {"n": {"type": "integer", "minimum": 1, "maximum": 5}},
    },
    "touch": {
        "argv": ["touch", "{p}"],
        "params": {"p": {"type": "path"}},
        "writable": True,
        "approval": "ask",
    },
    "touch_auto": {"argv": ["touch", "{p}"], "params": {"p": {"type": "path"}}, "writable": True},
}


def write_declarations(layout: Layout, commands: dict[str, object] = REAL_COMMANDS) -> None:
    os.makedirs(f"{layout.workspace}/.corral", exist_ok=True)
    with open(f"{layout.workspace}/.corral/settings.json", "w") as f:
        json.dump({"bridge": {"approvalTimeoutSeconds": 120, "commands": commands}}, f)

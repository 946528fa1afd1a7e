"""The HTTP API's hot path (issue 8: the bridge adds < 3 ms to a launch) keeps its behaviour.

A run that waits is submitted and waited for on one waiter thread (one hop, not two), but only
while a waiter is free: a full waiter pool must delay the wait, never the submission, and a
request cancelled mid-wait gives its waiter back once the wait ends. Job bodies are serialised
by the route itself, so their shape, status and Location are checked here against the model
the document declares.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from corral.bridge.http_api import HttpLimits
from corral.bridge.http_models import Job
from corral.bridge.http_waits import Waits
from corral.bridge.jobs import JobView
from tests.helpers_bridge_http import FakeBridge
from tests.test_bridge_http import AUTH, make_client

WAITER_PREFIX = "bridge-wait"  # create_app's waiter threads are named so
BOUND_S = 30  # only so that a broken server fails instead of hanging


class ThreadedBridge(FakeBridge):
    """Records the thread of each submit and wait; `hold` makes every wait block until
    `release` is set."""

    def __init__(self, *, finish: bool = False, hold: bool = False) -> None:
        super().__init__(finish=finish)
        self.threads: list[tuple[str, str]] = []
        self.hold = hold
        self.waiting = threading.Event()
        self.release = threading.Event()
        self.submitted = threading.Semaphore(0)

    def submit(self, name: str, args: Mapping[str, object], *, client: str) -> JobView:
        self.threads.append(("submit", threading.current_thread().name))
        try:
            return super().submit(name, args, client=client)
        finally:
            self.submitted.release()

    def wait(self, job_id: str, *, timeout_s: float | None) -> JobView:
        self.threads.append(("wait", threading.current_thread().name))
        if self.hold:
            self.waiting.set()
            self.release.wait(BOUND_S)
        return super().wait(job_id, timeout_s=timeout_s)


@pytest.mark.parametrize(
    ("finish", "body", "status"),
    [(True, {}, 200), (False, {}, 202), (False, {"wait": False}, 202)],
)
def test_job_bodies_are_the_documented_model_with_status_and_location(
    finish: bool, body: dict[str, object], status: int
) -> None:
    client, _ = make_client(FakeBridge(finish=finish))
    for response in (
        client.post("/v1/commands/echo/run", json={"args": {"word": "hé"}, **body}, headers=AUTH),
        client.get("/v1/jobs/job1", headers=AUTH),
    ):
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        job = response.json()
        assert list(job) == list(Job.model_fields)  # every field, in the model's order
        assert Job.model_validate(job).model_dump(mode="json") == job
        assert job["argv"] == ["echo", "hé"]
        if status == 202:
            assert response.headers["Location"] == "/v1/jobs/job1"
        else:
            assert "Location" not in response.headers


def test_a_run_that_waits_submits_and_waits_on_one_waiter_thread() -> None:
    bridge = ThreadedBridge()
    client, _ = make_client(bridge)
    assert client.post("/v1/commands/echo/run", json={}, headers=AUTH).status_code == 202
    (submit, wait) = bridge.threads
    assert submit[0] == "submit" and wait[0] == "wait"
    assert submit[1] == wait[1] and submit[1].startswith(WAITER_PREFIX)


def test_a_full_waiter_pool_delays_the_wait_but_not_the_submission() -> None:
    bridge = ThreadedBridge(hold=True)
    client, _ = make_client(bridge, http=HttpLimits(max_waiters=1))
    answers: list[int] = []

    def run() -> None:
        answers.append(client.post("/v1/commands/echo/run", json={}, headers=AUTH).status_code)

    first = threading.Thread(target=run)
    first.start()
    assert bridge.waiting.wait(BOUND_S)  # the only waiter is taken
    second = threading.Thread(target=run)
    second.start()
    assert bridge.submitted.acquire(timeout=BOUND_S)  # the first submit
    assert bridge.submitted.acquire(timeout=BOUND_S)  # the second, while the first still waits
    assert not bridge.release.is_set()
    assert [step for step, _ in bridge.threads] == ["submit", "wait", "submit"]
    assert not bridge.threads[2][1].startswith(WAITER_PREFIX)  # submitted off the waiter pool
    bridge.release.set()
    first.join(BOUND_S)
    second.join(BOUND_S)
    assert answers == [202, 202]
    assert [step for step, _ in bridge.threads] == ["submit", "wait", "submit", "wait"]


def test_a_cancelled_request_gives_its_waiter_back_when_the_wait_ends() -> None:
    bridge = ThreadedBridge(hold=True)
    waiters = ThreadPoolExecutor(max_workers=1, thread_name_prefix=WAITER_PREFIX)
    context = Waits(bridge, HttpLimits(max_waiters=1), waiters)

    async def scenario() -> Any:
        first = asyncio.ensure_future(context.run("echo", {}, wait_s=5.0))
        assert await asyncio.to_thread(bridge.waiting.wait, BOUND_S)
        first.cancel()  # the client went away; its thread still waits
        with pytest.raises(asyncio.CancelledError):
            await first
        bridge.release.set()
        # Queued behind the cancelled call on the only waiter: once it runs, that call is done.
        await asyncio.wrap_future(waiters.submit(lambda: None))
        return await context.run("echo", {}, wait_s=5.0)

    try:
        view = asyncio.run(scenario())
    finally:
        waiters.shutdown(wait=True)
    assert view.id == "job2"
    # The second run got the one-hop path again: its submit ran on the (freed) waiter.
    assert bridge.threads[2] == ("submit", bridge.threads[3][1])
    assert bridge.threads[2][1].startswith(WAITER_PREFIX)

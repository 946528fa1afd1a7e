"""Waiting for a job without a thread: `JobTable.watch` / `Bridge.when_finished`, and the HTTP
edge that uses them for a run that waits (the real Bridge has them; a run's answer must be the
same as with a thread that waits: 200 once finished, 202 with the job as it is on timeout)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from corral.bridge.binding import bind
from corral.bridge.declarations import parse_command
from corral.bridge.jobs import Job, JobTable, JobView
from corral.bridge.service import Bridge
from corral.hostpaths import host_paths
from corral.policy.presets import preset_policy
from tests.conftest import Layout
from tests.test_bridge_http import AUTH
from tests.test_bridge_http_e2e import real  # noqa: F401 - the fixture, shared


def _table_with_job() -> tuple[JobTable, Job]:
    command = parse_command("c", {"argv": ["true"]}, file="f")
    host = host_paths("/", {"HOME": "/nonexistent"})
    invocation = bind(command, {}, workspace="/", policy=preset_policy("strict", host))
    table = JobTable()
    job = Job("j1", invocation, client="t")
    table.add(job)
    return table, job


def test_a_watcher_is_told_once_when_the_job_finishes() -> None:
    table, job = _table_with_job()
    seen: list[JobView] = []
    table.watch("j1", seen.append)
    table.move(job, "running")
    assert seen == []  # not finished yet
    table.move(job, "succeeded")
    assert [v.state for v in seen] == ["succeeded"]
    table.move(job, "failed")  # refused: finished is final, and nobody is told twice
    assert len(seen) == 1 and job.watchers == []


def test_watching_a_finished_job_answers_at_once() -> None:
    table, job = _table_with_job()
    table.move(job, "running")
    table.move(job, "failed", reason="x")
    seen: list[JobView] = []
    unwatch = table.watch("j1", seen.append)
    assert [v.state for v in seen] == ["failed"]
    assert unwatch().state == "failed"


def test_unwatch_stops_the_call_and_gives_the_job_as_it_is() -> None:
    table, job = _table_with_job()
    seen: list[JobView] = []
    unwatch = table.watch("j1", seen.append)
    table.move(job, "running")
    assert unwatch().state == "running"
    table.move(job, "succeeded")
    assert seen == [] and job.watchers == []


def test_a_failing_watcher_does_not_undo_the_finish() -> None:
    table, job = _table_with_job()
    seen: list[JobView] = []

    def broken(view: JobView) -> None:
        raise RuntimeError("the loop is gone")

    table.watch("j1", broken)
    table.watch("j1", seen.append)
    table.move(job, "running")
    assert table.move(job, "succeeded")
    assert table.view("j1").state == "succeeded" and len(seen) == 1


def test_a_run_that_waits_past_its_timeout_answers_202_with_the_job_as_it_is(
    layout: Layout,
    real: tuple[TestClient, Bridge],  # noqa: F811 - the fixture, imported from the e2e tests
) -> None:
    client, bridge = real
    body = {"args": {"p": "x.txt"}, "wait": True, "timeout_s": 0.2}
    response = client.post("/v1/commands/touch/run", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "awaiting_approval" and job["approval_id"]
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    # Nobody watches it any more: the edge stopped when it answered.
    assert bridge._table.get(job["id"]).watchers == []


@pytest.mark.usefixtures("sandbox_available")
def test_runs_that_wait_answer_200_one_after_another(
    real: tuple[TestClient, Bridge],  # noqa: F811
) -> None:
    # Each TestClient request runs on an event loop of its own that is closed afterwards: a
    # watch must resolve on the loop that is waiting, never on an old one.
    client, _ = real
    for n in (1, 2, 3):
        response = client.post("/v1/commands/count/run", json={"args": {"n": n}}, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["stdout"] == "".join(f"{i}\n" for i in range(1, n + 1))

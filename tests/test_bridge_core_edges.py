"""Edges of the bridge core: racing deciders, orphaned and half-written approval files, the
state directory kept out of the sandbox's reach, shutdown, and job bookkeeping."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from corral.bridge.approvals import MAX_REASON, ApprovalStore, PendingApproval, new_id
from corral.bridge.binding import bind
from corral.bridge.declarations import merge_layers, parse_command
from corral.bridge.errors import BridgeError
from corral.bridge.jobs import Job, JobTable
from corral.bridge.service import Bridge
from corral.errors import UsageError
from corral.hostpaths import host_paths
from corral.policy.model import HostPaths
from corral.policy.presets import preset_policy
from tests.conftest import Layout


def _pending(approval_id: str, *, expires_in: float = 60.0) -> PendingApproval:
    now = time.time()
    return PendingApproval(
        id=approval_id,
        job_id="job",
        command="c",
        argv=("true",),
        cwd="/",
        policy_summary="mode strict",
        reason="ask",
        client="t",
        created=now,
        expires=now + expires_in,
    )


@pytest.fixture
def store(layout: Layout) -> ApprovalStore:
    return ApprovalStore.in_state_dir(layout.host().state_dir)


def test_of_many_racing_deciders_exactly_one_wins(store: ApprovalStore) -> None:
    approval_id = new_id()
    store.create(_pending(approval_id))
    outcomes: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def decide(n: int) -> None:
        barrier.wait()
        try:
            store.decide(approval_id, approve=n % 2 == 0, by=f"cli:{n}")
            result = f"won:{n}"
        except BridgeError as exc:
            result = exc.code
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=decide, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o.startswith("won:")]
    assert len(winners) == 1
    assert sorted(set(outcomes) - set(winners)) == ["not_pending"]
    decision = store.decision(approval_id)
    assert decision is not None and f"won:{decision.by[4:]}" == winners[0]


def test_expired_requests_cannot_be_approved(store: ApprovalStore) -> None:
    approval_id = new_id()
    store.create(_pending(approval_id, expires_in=-1))
    assert store.pending() == ()
    with pytest.raises(BridgeError) as caught:
        store.decide(approval_id, approve=True, by="web")
    assert caught.value.code == "not_pending" and "expired" in caught.value.message


def test_requests_of_a_dead_bridge_are_not_pending(store: ApprovalStore) -> None:
    approval_id = new_id()
    store.create(_pending(approval_id))
    path = f"{store.directory}/{approval_id}.request.json"
    with open(path) as f:
        record = json.load(f)
    gone = subprocess.Popen(["true"])
    gone.wait()
    record["pid"] = gone.pid
    with open(path, "w") as f:
        json.dump(record, f)
    assert store.pending() == ()
    with pytest.raises(BridgeError) as caught:
        store.decide(approval_id, approve=True, by="web")
    assert caught.value.code in ("not_pending", "unknown_approval")
    assert store.decision(approval_id) is None


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("half", '{"id": "'),
        ("list", "[1, 2]"),
        ("fields", '{"id": "x"}'),
        ("tmp", None),
    ],
)
def test_broken_files_are_never_pending(
    store: ApprovalStore, name: str, content: str | None
) -> None:
    good = new_id()
    store.create(_pending(good))
    if content is None:
        path = f"{store.directory}/.{new_id()}.tmp"
        content = json.dumps(_pending(new_id()).as_json())
    else:
        path = f"{store.directory}/{new_id()}.request.json"
    with open(path, "w") as f:
        f.write(content)
    assert [p.id for p in store.pending()] == [good]


@pytest.mark.parametrize("approval_id", ["../x" * 5, "a" * 15, "a" * 65, "a/b" * 8, ""])
def test_ids_that_are_not_ours_name_no_file(store: ApprovalStore, approval_id: str) -> None:
    with pytest.raises(BridgeError) as caught:
        store.decide(approval_id, approve=True, by="web")
    assert caught.value.code == "unknown_approval"


def test_a_long_reason_is_cut(store: ApprovalStore) -> None:
    approval_id = new_id()
    store.create(_pending(approval_id))
    decision = store.decide(approval_id, approve=False, by="web", reason="x" * 100_000)
    assert len(decision.reason) == MAX_REASON
    stored = store.decision(approval_id)
    assert stored is not None and len(stored.reason) == MAX_REASON


SETTINGS = {
    "commands": {
        "w": {"argv": ["touch", "{p}"], "params": {"p": {"type": "path"}}, "writable": True},
        "slow": {"argv": ["sleep", "60"], "timeoutSeconds": 120},
        "missing": {"argv": ["no-such-program-corral-test"]},
        "stream": {
            "argv": ["python3", "-c", "import time; print('first', flush=True); time.sleep(60)"],
            "timeoutSeconds": 120,
        },
    }
}


def _bridge(layout: Layout, **kwargs: object) -> Bridge:
    settings = merge_layers([("test.json", False, SETTINGS)])
    return Bridge(
        layout.host(),
        settings,
        managed_path=f"{layout.root}/none.json",
        environ=layout.env,
        **kwargs,  # type: ignore[arg-type]
    )


def test_the_approvals_directory_must_not_be_writable_by_a_command(layout: Layout) -> None:
    with pytest.raises(UsageError, match="could approve its own requests"):
        _bridge(layout, state_dir=f"{layout.workspace}/state")


def test_submit_after_close(layout: Layout) -> None:
    bridge = _bridge(layout)
    bridge.close()
    with pytest.raises(BridgeError) as caught:
        bridge.submit("w", {"p": "x"}, client="t")
    assert caught.value.status == 503
    assert not os.path.exists(f"{layout.workspace}/x")


@pytest.mark.usefixtures("sandbox_available")
def test_a_missing_program_fails_with_its_message(layout: Layout) -> None:
    with _bridge(layout) as bridge:
        done = bridge.wait(bridge.submit("missing", {}, client="t").id, timeout_s=60)
    assert done.state == "failed"
    assert "no-such-program-corral-test" in done.stderr + done.reason


@pytest.mark.usefixtures("sandbox_available")
def test_close_kills_a_running_command(layout: Layout) -> None:
    bridge = _bridge(layout)
    view = bridge.submit("slow", {}, client="t")
    deadline = time.monotonic() + 60
    while bridge.job(view.id).state == "queued" and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    bridge.close()
    done = bridge.wait(view.id, timeout_s=60)
    assert done.state == "failed" and "shut down" in done.reason
    assert time.monotonic() - started < 30  # not the 60 s the command would have slept
    sessions = bridge.audit.of_kind("session")  # type: ignore[attr-defined]
    assert [e.fields["phase"] for e in sessions] == ["start", "end"]


def test_illegal_moves_are_refused() -> None:
    command = parse_command("c", {"argv": ["true"]}, file="f")
    invocation = bind(command, {}, workspace="/", policy=preset_policy("strict", _host()))
    table = JobTable(keep_finished=2)
    jobs = [Job(f"j{n}", invocation, client="t") for n in range(4)]
    for job in jobs:
        table.add(job)
    assert not table.move(jobs[0], "succeeded")  # queued -> succeeded skips running
    assert table.move(jobs[0], "running") and table.move(jobs[0], "succeeded")
    assert not table.move(jobs[0], "failed")  # finished is final
    for job in jobs[1:]:
        table.move(job, "failed", reason="x")
    # Only the two newest finished jobs are kept.
    with pytest.raises(BridgeError):
        table.view("j0")
    assert table.view("j3").state == "failed"


def _host() -> HostPaths:
    return host_paths("/", {"HOME": "/nonexistent"})


def test_ids_never_look_like_options() -> None:
    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert not any(i.startswith("-") for i in ids)


@pytest.mark.usefixtures("sandbox_available")
def test_output_streams_while_the_command_runs(layout: Layout) -> None:
    bridge = _bridge(layout)
    view = bridge.submit("stream", {}, client="t")
    deadline = time.monotonic() + 60
    out, finished = b"", False
    while b"first" not in out and time.monotonic() < deadline:
        out, finished = bridge.output(view.id)
        time.sleep(0.01)
    assert out == b"first\n" and not finished
    assert bridge.job(view.id).state == "running"
    bridge.close()
    assert bridge.output(view.id) == (b"first\n", True)

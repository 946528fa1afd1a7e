"""The Bridge end to end: real sandboxes, approvals decided by other threads and processes,
and host-side evidence for everything that must not happen."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from corral.audit.events import MemorySink
from corral.bridge.approvals import ApprovalStore
from corral.bridge.declarations import merge_layers
from corral.bridge.errors import BridgeError
from corral.bridge.service import Bridge, BridgeLimits
from tests.conftest import Layout

pytestmark = pytest.mark.usefixtures("sandbox_available")

PRINT_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"
COMMANDS: dict[str, object] = {
    "argv": {
        "argv": ["python3", "-c", PRINT_ARGV, "{v}", "x{v}y"],
        "params": {"v": {"type": "string"}},
        "writable": True,  # so that an injection, were it run, could leave its canary
    },
    "touch": {
        "argv": ["touch", "{p}"],
        "params": {"p": {"type": "path"}},
        "writable": True,
        "approval": "ask",
    },
    "touch_ro": {"argv": ["touch", "{p}"], "params": {"p": {"type": "path"}}},
    "touch_denied": {
        "argv": ["touch", "{p}"],
        "params": {"p": {"type": "path"}},
        "writable": True,
        "approval": "deny",
    },
    "sleep": {
        "argv": ["sleep", "{s}"],
        "params": {"s": {"type": "integer"}},
        "timeoutSeconds": 0.5,
    },
    "yes": {"argv": ["head", "-c", "100000", "/dev/zero"], "outputLimitBytes": 1000},
    "fail": {"argv": ["false"]},
}


def make_bridge(
    layout: Layout,
    *,
    timeout_s: float = 60,
    limits: BridgeLimits | None = None,
    commands: dict[str, object] | None = None,
) -> Bridge:
    section = {"approvalTimeoutSeconds": timeout_s, "commands": commands or COMMANDS}
    settings = merge_layers([("test.json", False, section)])
    return Bridge(
        layout.host(),
        settings,
        audit=MemorySink(),
        limits=limits,
        managed_path=f"{layout.root}/no-managed.json",
        environ=layout.env,
    )


@pytest.fixture
def bridge(layout: Layout) -> Iterator[Bridge]:
    with make_bridge(layout) as b:
        yield b


def _marker(layout: Layout) -> str:
    return f"marker-{secrets.token_hex(4)}"


INJECTIONS = ["; touch {canary}", "$(touch {canary})", "`touch {canary}`", "| touch {canary}"]


@pytest.mark.parametrize("template", INJECTIONS)
def test_shell_metacharacters_arrive_as_literal_argv(
    layout: Layout, bridge: Bridge, template: str
) -> None:
    canary = f"{layout.workspace}/canary-{secrets.token_hex(4)}"
    value = template.format(canary=canary)
    # Control: the same text given to a shell does create the canary.
    subprocess.run(["sh", "-c", f"echo {value}"], check=False, capture_output=True)
    assert os.path.exists(canary)
    os.unlink(canary)

    view = bridge.wait(bridge.submit("argv", {"v": value}, client="t").id, timeout_s=60)
    assert view.state == "succeeded", view
    assert json.loads(view.stdout) == [value, f"x{value}y"]
    assert not os.path.exists(canary)


def test_an_auto_command_runs_and_is_audited(layout: Layout, bridge: Bridge) -> None:
    view = bridge.submit("argv", {"v": "hello"}, client="agent-1")
    assert view.state in ("queued", "running", "succeeded")
    done = bridge.wait(view.id, timeout_s=60)
    assert done.exit_code == 0 and done.finished is not None
    assert bridge.output(view.id) == (done.stdout.encode(), True)
    assert bridge.output(view.id, offset=3) == (done.stdout.encode()[3:], True)
    assert isinstance(bridge.audit, MemorySink)
    [decision] = bridge.audit.of_kind("bridge")
    assert decision.fields["decision"] == "allow"
    assert decision.fields["decided_by"] == "policy"
    assert decision.fields["params"] == {"v": "hello"}
    sessions = bridge.audit.of_kind("session")
    assert [e.fields["phase"] for e in sessions] == ["start", "end"]
    assert sessions[1].fields["exit_code"] == 0


def test_read_only_workspace_by_default(layout: Layout, bridge: Bridge) -> None:
    view = bridge.wait(bridge.submit("touch_ro", {"p": "new"}, client="t").id, timeout_s=60)
    assert view.state == "failed" and view.exit_code != 0
    assert "Read-only" in view.stderr or "read-only" in view.stderr.lower()
    assert not os.path.exists(f"{layout.workspace}/new")


def _decide_in_thread(layout: Layout, approval_id: str, *, approve: bool) -> None:
    """Another party deciding through the shared files, as `corral approve` does."""
    store = ApprovalStore.in_state_dir(layout.host().state_dir)

    def decide() -> None:
        store.decide(approval_id, approve=approve, by="cli:tester", reason="checked")

    thread = threading.Thread(target=decide)
    thread.start()
    thread.join()


def test_approval_then_run(layout: Layout, bridge: Bridge) -> None:
    marker = _marker(layout)
    view = bridge.submit("touch", {"p": marker}, client="t")
    assert view.state == "awaiting_approval"
    assert view.approval_id is not None
    assert f"corral approve {view.approval_id}" in view.reason
    [pending] = bridge.pending()
    assert pending.id == view.approval_id and pending.job_id == view.id
    assert pending.argv == ("touch", f"{layout.workspace}/{marker}")
    assert "mode strict" in pending.policy_summary and "writable" in pending.policy_summary
    assert not os.path.exists(f"{layout.workspace}/{marker}")

    _decide_in_thread(layout, view.approval_id, approve=True)
    done = bridge.wait(view.id, timeout_s=60)
    assert done.state == "succeeded", done
    assert os.path.exists(f"{layout.workspace}/{marker}")
    assert bridge.pending() == ()
    assert isinstance(bridge.audit, MemorySink)
    decisions = [
        (e.fields["decision"], e.fields["decided_by"]) for e in bridge.audit.of_kind("bridge")
    ]
    assert decisions == [("ask", "policy"), ("allow", "cli:tester")]


def test_approval_from_another_process(layout: Layout, bridge: Bridge) -> None:
    marker = _marker(layout)
    view = bridge.submit("touch", {"p": marker}, client="t")
    code = (
        "import sys; from corral.bridge.approvals import ApprovalStore as S; "
        "S.in_state_dir(sys.argv[1]).decide(sys.argv[2], approve=True, by='cli:other')"
    )
    state_dir = layout.host().state_dir
    subprocess.run([sys.executable, "-c", code, state_dir, str(view.approval_id)], check=True)
    assert bridge.wait(view.id, timeout_s=60).state == "succeeded"
    assert os.path.exists(f"{layout.workspace}/{marker}")


def test_denial_tells_the_agent_and_nothing_runs(layout: Layout, bridge: Bridge) -> None:
    marker = _marker(layout)
    view = bridge.submit("touch", {"p": marker}, client="t")
    assert view.approval_id is not None
    _decide_in_thread(layout, view.approval_id, approve=False)
    done = bridge.wait(view.id, timeout_s=60)
    assert done.state == "denied"
    assert "cli:tester" in done.reason and "checked" in done.reason
    assert "do not retry in a loop" in done.reason
    assert not os.path.exists(f"{layout.workspace}/{marker}")
    with pytest.raises(BridgeError) as caught:
        bridge.decide(view.approval_id, approve=True, by="web")
    assert caught.value.code == "not_pending" and caught.value.status == 409


def test_approval_timeout_is_a_denial(layout: Layout) -> None:
    marker = _marker(layout)
    with make_bridge(layout, timeout_s=0.3) as bridge:
        view = bridge.submit("touch", {"p": marker}, client="t")
        done = bridge.wait(view.id, timeout_s=60)
        assert done.state == "denied"
        assert done.reason.startswith("approval_timeout")
        assert view.approval_id is not None
        with pytest.raises(BridgeError) as caught:
            bridge.decide(view.approval_id, approve=True, by="web")
        assert caught.value.code == "not_pending"
        assert isinstance(bridge.audit, MemorySink)
        last = bridge.audit.of_kind("bridge")[-1]
        assert (last.fields["decision"], last.fields["decided_by"]) == ("deny", "timeout")
    assert not os.path.exists(f"{layout.workspace}/{marker}")


def test_a_deny_rule_denies_at_once(layout: Layout, bridge: Bridge) -> None:
    marker = _marker(layout)
    view = bridge.submit("touch_denied", {"p": marker}, client="t")
    assert view.state == "denied" and "approval: deny" in view.reason
    assert bridge.pending() == ()
    assert not os.path.exists(f"{layout.workspace}/{marker}")


def test_close_denies_waiting_approvals(layout: Layout) -> None:
    marker = _marker(layout)
    bridge = make_bridge(layout)
    view = bridge.submit("touch", {"p": marker}, client="t")
    bridge.close()
    done = bridge.job(view.id)
    assert done.state == "denied" and "shut down" in done.reason
    assert bridge.pending() == ()
    assert not os.path.exists(f"{layout.workspace}/{marker}")


def test_timeout_kills_the_command(bridge: Bridge) -> None:
    done = bridge.wait(bridge.submit("sleep", {"s": 60}, client="t").id, timeout_s=60)
    assert done.state == "timed_out"
    assert "0.5 s" in done.reason


def test_output_is_limited(bridge: Bridge) -> None:
    done = bridge.wait(bridge.submit("yes", {}, client="t").id, timeout_s=60)
    assert done.state == "succeeded"
    assert done.truncated
    assert len(done.stdout) == 1000


def test_a_failing_command(bridge: Bridge) -> None:
    done = bridge.wait(bridge.submit("fail", {}, client="t").id, timeout_s=60)
    assert (done.state, done.exit_code) == ("failed", 1)
    assert "status 1" in done.reason


def test_wait_with_a_timeout_returns_the_job_as_it_is(bridge: Bridge) -> None:
    view = bridge.submit("touch", {"p": "x"}, client="t")
    assert bridge.wait(view.id, timeout_s=0).state == "awaiting_approval"


def test_a_full_queue_is_refused(layout: Layout) -> None:
    with make_bridge(layout, limits=BridgeLimits(max_queued_jobs=2)) as bridge:
        for name in ("a", "b"):
            bridge.submit("touch", {"p": name}, client="t")
        with pytest.raises(BridgeError) as caught:
            bridge.submit("touch", {"p": "c"}, client="t")
        assert (caught.value.code, caught.value.status) == ("too_many_jobs", 503)


def test_rate_limit_per_client(layout: Layout) -> None:
    with make_bridge(layout, limits=BridgeLimits(requests_per_minute=2)) as bridge:
        for _ in range(2):
            bridge.submit("touch_denied", {"p": "x"}, client="a")
        with pytest.raises(BridgeError) as caught:
            bridge.submit("touch_denied", {"p": "x"}, client="a")
        assert (caught.value.code, caught.value.status) == ("rate_limited", 429)
        bridge.submit("touch_denied", {"p": "x"}, client="b")  # another client's own window


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda b: b.submit("nope", {}, client="t"), "unknown_command"),
        (lambda b: b.command("nope"), "unknown_command"),
        (lambda b: b.job("nope"), "unknown_job"),
        (lambda b: b.output("nope"), "unknown_job"),
        (lambda b: b.wait("nope", timeout_s=0), "unknown_job"),
        (lambda b: b.decide("A" * 22, approve=True, by="t"), "unknown_approval"),
        (lambda b: b.decide("../../etc/passwd", approve=True, by="t"), "unknown_approval"),
        (lambda b: b.submit("argv", {}, client="t"), "missing_parameter"),
    ],
    ids=["submit", "command", "job", "output", "wait", "decide", "decide-traversal", "missing"],
)
def test_unknown_things(bridge: Bridge, call: object, code: str) -> None:
    with pytest.raises(BridgeError) as caught:
        call(bridge)  # type: ignore[operator]
    assert caught.value.code == code
    assert caught.value.as_json()["error"]["code"] == code  # type: ignore[index]


def test_views_serialise(bridge: Bridge) -> None:
    view = bridge.submit("touch", {"p": "x"}, client="t")
    record = json.loads(json.dumps(view.as_json()))
    assert record["state"] == "awaiting_approval" and record["argv"][0] == "touch"
    [pending] = bridge.pending()
    assert json.loads(json.dumps(pending.as_json()))["job_id"] == view.id


def test_approvals_directory_is_private(layout: Layout, bridge: Bridge) -> None:
    bridge.submit("touch", {"p": "x"}, client="t")
    directory = bridge.store.directory
    assert os.stat(directory).st_mode & 0o777 == 0o700
    for name in os.listdir(directory):
        assert os.stat(f"{directory}/{name}").st_mode & 0o077 == 0

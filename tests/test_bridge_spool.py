"""The spool channel (`corral serve --spool DIR`): request files in, result files out.

Most tests drive `SpoolServer.poll_once` by hand against a fake bridge, so "two polls" means
two calls, not a guess about time; answers are written on worker threads, and every wait for
one has a deadline far above need. The end-to-end tests at the bottom use the real Bridge and
real sandboxes.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.bridge.service import Bridge, BridgeLimits
from corral.bridge.spool import SpoolServer
from corral.bridge.spool_files import MAX_REQUEST_BYTES, sanitized, write_json_atomically
from corral.errors import UsageError
from tests.conftest import SECRET, Layout
from tests.helpers_bridge_fake import FakeBridge

DEADLINE = 20.0


def quiet(message: str) -> None:
    pass


def spool(bridge: Any, directory: Path, **options: Any) -> SpoolServer:
    return SpoolServer(bridge, str(directory), log=quiet, **options)


def wait_for(path: Path) -> dict[str, Any]:
    """The parsed file once it exists (results are atomic: existing means complete)."""
    end = time.monotonic() + DEADLINE
    while not path.exists():
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear; results/: {os.listdir(path.parent)}")
        time.sleep(0.01)
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def put(directory: Path, rid: str, document: object) -> None:
    """The recommended way: a temporary name, then an atomic rename."""
    temp = directory / "requests" / f"{rid}.json.tmp"
    temp.write_text(json.dumps(document))
    temp.rename(directory / "requests" / f"{rid}.json")


def polls(server: SpoolServer, count: int = 2) -> None:
    for _ in range(count):
        server.poll_once()


@pytest.fixture
def bridge() -> FakeBridge:
    return FakeBridge()


@pytest.fixture
def server(bridge: FakeBridge, tmp_path: Path) -> Iterator[SpoolServer]:
    served = spool(bridge, tmp_path / "spool", grace_s=0.0)
    yield served
    served.close()


def test_a_good_request_runs_once_and_leaves_one_result(
    server: SpoolServer, bridge: FakeBridge, tmp_path: Path
) -> None:
    root = tmp_path / "spool"
    put(root, "r1", {"command": "echo", "args": {"text": "hello"}})
    polls(server)
    result = wait_for(root / "results" / "r1.json")
    assert result["id"] == "r1" and result["ok"] is True
    assert result["job"]["stdout"] == "hello" and result["job"]["exit_code"] == 0
    assert bridge.submitted == [("echo", {"text": "hello"})]
    server.close()
    assert os.listdir(root / "requests") == [] and os.listdir(root / "processing") == []
    assert sorted(os.listdir(root / "results")) == ["r1.json"]


def test_directories_are_created_private(server: SpoolServer, tmp_path: Path) -> None:
    for name in ("", "requests", "processing", "results"):
        assert stat.S_IMODE((tmp_path / "spool" / name).stat().st_mode) == 0o700


def test_a_half_written_file_is_taken_once_when_complete(
    bridge: FakeBridge, tmp_path: Path
) -> None:
    root = tmp_path / "spool"
    server = spool(bridge, root, grace_s=3600.0)
    text = json.dumps({"command": "echo", "args": {"text": "whole"}})
    path = root / "requests" / "half.json"
    with path.open("w") as writer:
        writer.write(text[:15])
        writer.flush()
        polls(server, 3)  # stable but incomplete: left alone
        assert path.exists() and bridge.submitted == []
        writer.write(text[15:])
        writer.flush()
        server.poll_once()  # changed since the last poll: not yet
        assert path.exists() and bridge.submitted == []
        server.poll_once()
    result = wait_for(root / "results" / "half.json")
    polls(server, 3)
    server.close()
    assert result["job"]["stdout"] == "whole"
    assert bridge.submitted == [("echo", {"text": "whole"})]
    assert not (root / "results" / "half.error.json").exists()


BAD_REQUESTS = [
    ("garbage", b"{this is not json", "malformed_request"),
    ("truncated", b'{"command": "echo", "args": {"te', "malformed_request"),
    ("not-utf8", b'{"command": "\xff"}', "malformed_request"),
    ("array", b'["echo"]', "malformed_request"),
    ("no-command", b'{"args": {}}', "malformed_request"),
    ("args-list", b'{"command": "echo", "args": ["x"]}', "malformed_request"),
    ("extra-key", b'{"command": "echo", "args": {}, "shell": "rm -rf /"}', "malformed_request"),
    ("twice", b'{"command": "echo", "command": "deploy"}', "malformed_request"),
    ("nan", b'{"command": "echo", "args": {"text": NaN}}', "malformed_request"),
    ("too-big", b'{"command": "echo", "args": {"text": "' + b"x" * MAX_REQUEST_BYTES + b'"}}',
     "request_too_large"),
    ("unknown", b'{"command": "deploy"}', "unknown_command"),
    ("bad-arg", b'{"command": "echo", "args": {"text": 3}}', "invalid_parameter"),
]  # fmt: skip


@pytest.mark.parametrize(("rid", "content", "code"), BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_a_bad_request_gets_an_error_file(
    server: SpoolServer, bridge: FakeBridge, tmp_path: Path, rid: str, content: bytes, code: str
) -> None:
    root = tmp_path / "spool"
    (root / "requests" / f"{rid}.json").write_bytes(content)
    polls(server)
    error = wait_for(root / "results" / f"{rid}.error.json")
    assert error["id"] == rid and error["error"]["code"] == code
    assert error["error"]["message"]
    assert bridge.submitted == []
    assert not (root / "results" / f"{rid}.json").exists()
    assert os.listdir(root / "requests") == []


BAD_NAMES = [b"bad name.json", b"x" * 65 + b".json", b"noext", b"up.json.x", b"caf\xe9.json"]


@pytest.mark.parametrize("raw", BAD_NAMES)
def test_an_unusable_name_gets_an_error_file_under_a_sanitized_name(
    server: SpoolServer, bridge: FakeBridge, tmp_path: Path, raw: bytes
) -> None:
    root = tmp_path / "spool"
    name = os.fsdecode(raw)
    (root / "requests" / name).write_text('{"command": "echo", "args": {"text": "no"}}')
    polls(server)
    error = wait_for(root / "results" / f"{sanitized(name)}.error.json")
    assert error["id"] is None and error["file"] == name
    assert error["error"]["code"] == "malformed_request"
    assert bridge.submitted == []


def test_the_sanitized_name_keeps_safe_characters_and_a_hash() -> None:
    assert sanitized("bad name!.json").startswith("bad_name__json-")
    assert sanitized("a.json") != sanitized("a_json")
    assert len(sanitized("y" * 300)) == 40 + 1 + 8


def test_a_symlinked_request_is_refused_without_reading_its_target(
    server: SpoolServer, bridge: FakeBridge, tmp_path: Path
) -> None:
    """The target holds a valid request: following the link would run it and echo the secret."""
    root = tmp_path / "spool"
    target = tmp_path / "host-file.json"
    planted = json.dumps({"command": "echo", "args": {"text": "SECRET-4711"}})
    target.write_text(planted)
    before = target.stat()
    (root / "requests" / "link.json").symlink_to(target)
    polls(server, 3)
    error = wait_for(root / "results" / "link.error.json")
    assert error["error"]["code"] == "malformed_request" and "symlink" in error["error"]["message"]
    assert bridge.submitted == []
    assert target.read_text() == planted and target.stat().st_mtime_ns == before.st_mtime_ns
    assert not os.path.lexists(root / "requests" / "link.json")
    for name in os.listdir(root / "results"):
        assert "SECRET-4711" not in (root / "results" / name).read_text()


def test_a_fifo_request_is_refused_without_blocking(
    server: SpoolServer, bridge: FakeBridge, tmp_path: Path
) -> None:
    root = tmp_path / "spool"
    os.mkfifo(root / "requests" / "pipe.json")
    polls(server)
    assert wait_for(root / "results" / "pipe.error.json")["error"]["code"] == "malformed_request"
    assert bridge.submitted == []


def test_temporary_and_dot_files_are_left_alone(
    server: SpoolServer, bridge: FakeBridge, tmp_path: Path
) -> None:
    root = tmp_path / "spool"
    for name in ("r.json.tmp", ".r.json", ".swp"):
        (root / "requests" / name).write_text("{")
    polls(server, 3)
    assert sorted(os.listdir(root / "requests")) == [".r.json", ".swp", "r.json.tmp"]
    assert os.listdir(root / "results") == [] and bridge.submitted == []


def test_approval_shows_a_pending_file_then_the_denial(tmp_path: Path) -> None:
    bridge = FakeBridge(ask=("deploy",))
    root = tmp_path / "spool"
    server = spool(bridge, root)
    put(root, "d1", {"command": "deploy", "args": {"text": "prod"}})
    polls(server)
    pending = wait_for(root / "results" / "d1.pending.json")
    assert pending["state"] == "awaiting_approval"
    assert "corral approve ap1" in pending["how_to_approve"]
    assert pending["approval"]["job_id"] == pending["job"]["id"]
    bridge.decide("ap1", approve=False, by="alice", reason="not today")
    result = wait_for(root / "results" / "d1.json")
    server.close()
    assert result["ok"] is False and result["error"]["code"] == "denied"
    assert "not today" in result["error"]["message"] and "again" in result["error"]["hint"]
    assert not (root / "results" / "d1.pending.json").exists()


def test_an_approved_request_runs(tmp_path: Path) -> None:
    bridge = FakeBridge(ask=("deploy",))
    root = tmp_path / "spool"
    server = spool(bridge, root)
    put(root, "d2", {"command": "deploy", "args": {"text": "staging"}})
    polls(server)
    wait_for(root / "results" / "d2.pending.json")
    bridge.decide("ap1", approve=True, by="alice")
    result = wait_for(root / "results" / "d2.json")
    server.close()
    assert result["ok"] is True and result["job"]["stdout"] == "staging"
    assert not (root / "results" / "d2.pending.json").exists()


def test_a_flood_waits_on_disk_and_every_result_is_whole(tmp_path: Path) -> None:
    """200 requests against a bridge that takes 4 at a time: none refused, none lost, and a
    reader hammering results/ meanwhile never sees a partial file."""
    bridge = FakeBridge(capacity=4)
    root = tmp_path / "spool"
    server = spool(bridge, root, poll_s=0.01, max_in_flight=16)
    count = 200
    for number in range(count):
        put(root, f"f{number:03d}", {"command": "echo", "args": {"text": f"n{number}"}})
    stop = threading.Event()
    broken: list[str] = []
    reads = 0

    def hammer() -> None:
        nonlocal reads
        while not stop.is_set():
            for name in os.listdir(root / "results"):
                if name.startswith("."):
                    continue
                try:
                    json.loads((root / "results" / name).read_bytes())
                    reads += 1
                except FileNotFoundError:
                    pass
                except ValueError as exc:
                    broken.append(f"{name}: {exc}")

    reader = threading.Thread(target=hammer)
    serving = threading.Thread(target=server.serve, args=(stop,))
    reader.start()
    serving.start()
    try:
        end = time.monotonic() + 60
        while len([n for n in os.listdir(root / "results") if not n.startswith(".")]) < count:
            assert time.monotonic() < end, "the flood was not served"
            time.sleep(0.05)
    finally:
        stop.set()
        serving.join()
        reader.join()
    assert broken == []
    assert reads > 0
    outputs = {json.loads((root / "results" / f"f{n:03d}.json").read_text())["job"]["stdout"]
               for n in range(count)}  # fmt: skip
    assert outputs == {f"n{n}" for n in range(count)}
    assert len(bridge.submitted) == count
    assert bridge.refused_for_capacity > 0  # the bridge was full, and the spool waited
    assert os.listdir(root / "requests") == [] and os.listdir(root / "processing") == []


def test_requests_are_taken_in_order_of_arrival(tmp_path: Path) -> None:
    bridge = FakeBridge()
    root = tmp_path / "spool"
    server = spool(bridge, root)
    for number, rid in enumerate(["zeta", "alpha", "mid"]):
        put(root, rid, {"command": "echo", "args": {"text": rid}})
        os.utime(root / "requests" / f"{rid}.json", ns=(number * 10**9, number * 10**9))
    polls(server)
    for rid in ("zeta", "alpha", "mid"):
        wait_for(root / "results" / f"{rid}.json")
    server.close()
    assert [args["text"] for _, args in bridge.submitted] == ["zeta", "alpha", "mid"]


def test_results_are_written_whole_and_private(tmp_path: Path) -> None:
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_json_atomically(directory, "a.json", {"k": "v" * 100_000}, mode=0o600)
        write_json_atomically(directory, "a.json", {"k": "w"}, mode=0o600)
    finally:
        os.close(directory)
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left behind
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": "w"}
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o600


def test_a_result_is_never_written_through_a_planted_symlink(
    server: SpoolServer, tmp_path: Path
) -> None:
    root = tmp_path / "spool"
    target = tmp_path / "victim"
    target.write_text("keep")
    (root / "results" / "v1.json").symlink_to(target)
    put(root, "v1", {"command": "echo", "args": {"text": "x"}})
    polls(server)
    assert wait_for(root / "results" / "v1.json")["ok"] is True
    assert target.read_text() == "keep"


def test_a_spool_writable_by_others_is_refused_unless_shared(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(UsageError, match="writable by other users") as caught:
        spool(FakeBridge(), root)
    assert "--spool-access shared" in caught.value.hint
    assert os.listdir(root) == []  # refused before creating anything
    server = spool(FakeBridge(), root, access="shared")
    server.close()
    assert stat.S_IMODE((root / "requests").stat().st_mode) == 0o777


def test_a_symlinked_subdirectory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir(mode=0o700)
    (tmp_path / "elsewhere").mkdir()
    (root / "results").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="results: it is a symlink"):
        spool(FakeBridge(), root)


def test_two_servers_cannot_serve_one_spool(server: SpoolServer, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="already serving"):
        spool(FakeBridge(), tmp_path / "spool")


def test_a_dead_servers_leftovers_are_answered(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool(FakeBridge(), root).close()
    (root / "processing" / "lost.json").write_text('{"command": "echo"}')
    (root / "results" / ".lost.json.1234.tmp").write_text('{"half')
    bridge = FakeBridge()
    server = spool(bridge, root)
    server.close()
    error = json.loads((root / "results" / "lost.error.json").read_text())
    assert "may or may not have run" in error["error"]["message"]
    assert os.listdir(root / "processing") == [] and bridge.submitted == []
    assert sorted(os.listdir(root / "results")) == ["lost.error.json"]


def test_a_reused_id_replaces_the_old_answer(server: SpoolServer, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    (root / "requests" / "again.json").write_text("{broken")
    polls(server)
    wait_for(root / "results" / "again.error.json")
    put(root, "again", {"command": "echo", "args": {"text": "fixed"}})
    polls(server)
    assert wait_for(root / "results" / "again.json")["job"]["stdout"] == "fixed"
    assert not (root / "results" / "again.error.json").exists()


def test_an_approval_timeout_is_answered_with_its_code(tmp_path: Path) -> None:
    bridge = FakeBridge(ask=("deploy",))
    root = tmp_path / "spool"
    server = spool(bridge, root)
    put(root, "t1", {"command": "deploy", "args": {"text": "prod"}})
    polls(server)
    wait_for(root / "results" / "t1.pending.json")
    bridge.expire("ap1", reason="approval_timeout: nobody approved it within 60 s")
    result = wait_for(root / "results" / "t1.json")
    server.close()
    assert result["error"]["code"] == "approval_timeout"


def test_stopping_answers_a_request_still_waiting_for_a_human(tmp_path: Path) -> None:
    bridge = FakeBridge(ask=("deploy",))
    root = tmp_path / "spool"
    server = spool(bridge, root)
    put(root, "w1", {"command": "deploy", "args": {"text": "prod"}})
    polls(server)
    wait_for(root / "results" / "w1.pending.json")
    server.close(drain_s=DEADLINE)  # returns long before the deadline: nobody would decide
    error = json.loads((root / "results" / "w1.error.json").read_text())
    assert "awaiting_approval" in error["error"]["message"]
    assert sorted(os.listdir(root / "results")) == ["w1.error.json"]


# -- end to end: the real Bridge, real sandboxes ---------------------------------------------

SETTINGS = {
    "bridge": {
        "approvalTimeoutSeconds": 60,
        "commands": {
            "greet": {
                "argv": ["echo", "hello", "{name}"],
                "params": {"name": {"type": "string", "pattern": "[a-z0-9]+"}},
            },
            "show": {"argv": ["cat", "{file}"], "params": {"file": {"type": "path"}}},
            "mark": {"argv": ["touch", "marker"]},
            "deploy": {
                "argv": ["echo", "deploying", "{env}"],
                "params": {"env": {"type": "string", "enum": ["staging", "prod"]}},
                "approval": {"ask": {"env": "^prod$"}},
            },
        },
    }
}


@pytest.fixture
def served(layout: Layout, sandbox_available: None) -> Iterator[tuple[Path, Bridge]]:
    """A real Bridge for the layout's workspace, its spool served on a thread."""
    os.makedirs(f"{layout.workspace}/.corral")
    Path(f"{layout.workspace}/.corral/settings.json").write_text(json.dumps(SETTINGS))
    Path(f"{layout.workspace}/notes.txt").write_text("workspace notes\n")
    limits = BridgeLimits(requests_per_minute=100_000)
    root = Path(layout.root) / "spool"
    stop = threading.Event()
    with Bridge.from_settings(layout.workspace, environ=layout.env, limits=limits) as bridge:
        server = spool(bridge, root, poll_s=0.02)
        thread = threading.Thread(target=server.serve, args=(stop,))
        thread.start()
        try:
            yield root, bridge
        finally:
            stop.set()
            thread.join()


def test_real_requests_run_in_the_sandbox(served: tuple[Path, Bridge], layout: Layout) -> None:
    root, _ = served
    put(root, "g", {"command": "greet", "args": {"name": "bob"}})
    put(root, "s", {"command": "show", "args": {"file": "notes.txt"}})
    put(root, "m", {"command": "mark"})
    greeted = wait_for(root / "results" / "g.json")
    assert greeted["ok"] is True and greeted["job"]["stdout"] == "hello bob\n"
    assert wait_for(root / "results" / "s.json")["job"]["stdout"] == "workspace notes\n"
    marked = wait_for(root / "results" / "m.json")  # strict mode: the workspace is read-only
    assert marked["ok"] is False and marked["job"]["exit_code"] != 0
    assert not os.path.exists(f"{layout.workspace}/marker")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"file": "../../.ssh/id_rsa"}, "path_outside_workspace"),
        ({"file": "notes.txt", "more": "x"}, "unexpected_parameter"),
        ({}, "missing_parameter"),
    ],
)
def test_real_validation_errors_become_error_files(
    served: tuple[Path, Bridge], layout: Layout, args: dict[str, object], code: str
) -> None:
    root, _ = served
    put(root, "bad", {"command": "show", "args": args})
    error = wait_for(root / "results" / "bad.error.json")
    assert error["error"]["code"] == code
    assert SECRET not in json.dumps(error)


def test_a_real_approval_through_the_spool(served: tuple[Path, Bridge]) -> None:
    root, bridge = served
    put(root, "dep", {"command": "deploy", "args": {"env": "prod"}})
    pending = wait_for(root / "results" / "dep.pending.json")
    approval_id = pending["approval"]["id"]
    assert pending["approval"]["argv"] == ["echo", "deploying", "prod"]
    assert f"corral approve {approval_id}" in pending["how_to_approve"]
    assert not (root / "results" / "dep.json").exists()
    bridge.decide(approval_id, approve=True, by="cli:tester")
    result = wait_for(root / "results" / "dep.json")
    assert result["ok"] is True and result["job"]["stdout"] == "deploying prod\n"
    assert not (root / "results" / "dep.pending.json").exists()


def test_a_real_flood_is_served_whole(served: tuple[Path, Bridge]) -> None:
    root, _ = served
    count = 200
    for number in range(count):
        put(root, f"n{number}", {"command": "greet", "args": {"name": f"n{number}"}})
    for number in range(count):
        result = wait_for(root / "results" / f"n{number}.json")
        assert result["job"]["stdout"] == f"hello n{number}\n"
    assert os.listdir(root / "requests") == []

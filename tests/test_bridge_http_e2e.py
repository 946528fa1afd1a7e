"""The HTTP API over the real Bridge: declarations in the workspace's .corral/settings.json,
argument rejections with host-side evidence that nothing ran, metacharacters as plain text,
streamed output, and the approval flow decided through the API."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from corral.audit.events import MemorySink
from corral.bridge.http_api import create_app
from corral.bridge.service import Bridge
from tests.conftest import Layout
from tests.helpers_bridge_http import TOKEN, write_declarations
from tests.test_bridge_http import AUTH, BASE, assert_error


@pytest.fixture
def real(layout: Layout) -> Iterator[tuple[TestClient, Bridge]]:
    write_declarations(layout)
    bridge = Bridge.from_settings(
        layout.workspace,
        audit=MemorySink(),
        managed_path=f"{layout.root}/no-managed.json",
        environ=layout.env,
    )
    with bridge:
        app = create_app(bridge, token=TOKEN)
        yield TestClient(app, base_url=BASE, raise_server_exceptions=False), bridge


def test_real_bridge_commands_come_from_the_workspace_settings(
    real: tuple[TestClient, Bridge],
) -> None:
    client, _ = real
    commands = client.get("/v1/commands", headers=AUTH).json()["commands"]
    assert [c["name"] for c in commands] == ["echo", "count", "touch", "touch_auto"]
    count = commands[1]["parameters"]["properties"]["n"]
    assert (count["type"], count["minimum"], count["maximum"]) == ("integer", 1, 5)


@pytest.mark.parametrize(
    ("name", "args", "status", "code"),
    [
        ("nope", {}, 404, "unknown_command"),
        ("count", {}, 422, "missing_parameter"),
        ("count", {"n": 2, "extra": 1}, 422, "unexpected_parameter"),
        ("count", {"n": "2"}, 422, "invalid_parameter"),
        ("count", {"n": 2.5}, 422, "invalid_parameter"),
        ("count", {"n": True}, 422, "invalid_parameter"),
        ("count", {"n": 9}, 422, "invalid_parameter"),
        ("echo", {"word": 5}, 422, "invalid_parameter"),
        ("echo", {"word": "x" * 201}, 422, "invalid_parameter"),
        ("echo", {"word": ["a", "b"]}, 422, "invalid_parameter"),
        ("touch_auto", {"p": "../outside/escaped"}, 422, "path_outside_workspace"),
        ("touch_auto", {"p": "/var/tmp/escaped-abs"}, 422, "path_outside_workspace"),
        ("touch_auto", {"p": "link/escaped"}, 422, "path_outside_workspace"),
    ],
)
def test_real_bridge_rejections_keep_their_codes_and_nothing_runs(
    layout: Layout,
    real: tuple[TestClient, Bridge],
    name: str,
    args: dict[str, object],
    status: int,
    code: str,
) -> None:
    client, bridge = real
    os.symlink(layout.outside, f"{layout.workspace}/link")
    before = layout.listing()
    response = client.post(f"/v1/commands/{name}/run", json={"args": args}, headers=AUTH)
    assert_error(response, status, code)
    assert layout.listing() == before  # nothing created, inside or outside the workspace
    assert not os.path.exists(f"{layout.outside}/escaped")
    assert bridge.pending() == ()


@pytest.mark.usefixtures("sandbox_available")
@pytest.mark.parametrize(
    "template", ["; touch {c}", "$(touch {c})", "`touch {c}`", "| touch {c}", "&& touch {c}"]
)
def test_real_bridge_shell_metacharacters_are_plain_text(
    layout: Layout, real: tuple[TestClient, Bridge], template: str
) -> None:
    client, _ = real
    canary = f"{layout.workspace}/canary"
    word = template.format(c=canary)
    response = client.post("/v1/commands/echo/run", json={"args": {"word": word}}, headers=AUTH)
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["state"], job["stdout"], job["argv"]) == ("succeeded", word + "\n", ["echo", word])
    assert not os.path.exists(canary)


@pytest.mark.usefixtures("sandbox_available")
def test_real_bridge_output_is_streamed(real: tuple[TestClient, Bridge]) -> None:
    client, _ = real
    job = client.post("/v1/commands/count/run", json={"args": {"n": 3}}, headers=AUTH).json()
    assert job["state"] == "succeeded"
    output = client.get(f"/v1/jobs/{job['id']}/output", headers=AUTH)
    assert output.content == b"1\n2\n3\n"
    assert client.get(f"/v1/jobs/{job['id']}/output?offset=2", headers=AUTH).content == b"2\n3\n"


@pytest.mark.usefixtures("sandbox_available")
@pytest.mark.parametrize(("decision", "outcome"), [("approve", "approved"), ("deny", "denied")])
def test_real_bridge_approval_flow_through_the_api(
    layout: Layout, real: tuple[TestClient, Bridge], decision: str, outcome: str
) -> None:
    client, _ = real
    target = f"{layout.workspace}/{outcome}.txt"
    body = {"args": {"p": f"{outcome}.txt"}, "wait": False}
    submitted = client.post("/v1/commands/touch/run", json=body, headers=AUTH)
    assert submitted.status_code == 202
    job = submitted.json()
    assert job["state"] == "awaiting_approval" and job["approval_id"]
    assert f"corral approve {job['approval_id']}" in job["reason"]
    (pending,) = client.get("/v1/approvals", headers=AUTH).json()["approvals"]
    assert pending["id"] == job["approval_id"] and pending["job_id"] == job["id"]
    assert pending["argv"] == ["touch", target] and pending["cwd"] == layout.workspace
    assert not os.path.exists(target)  # nothing runs before a human decides

    decided = client.post(
        f"/v1/approvals/{job['approval_id']}/{decision}", json={"reason": "by test"}, headers=AUTH
    )
    assert decided.json() == {"id": job["approval_id"], "decision": outcome}
    final = client.get(f"/v1/jobs/{job['id']}?wait_s=60", headers=AUTH)
    assert final.status_code == 200
    if decision == "approve":
        assert final.json()["state"] == "succeeded"
        assert os.path.exists(target)
    else:
        assert final.json()["state"] == "denied"
        assert "api" in final.json()["reason"] and "by test" in final.json()["reason"]
        assert not os.path.exists(target)
    assert client.get("/v1/approvals", headers=AUTH).json()["approvals"] == []
    again = client.post(f"/v1/approvals/{job['approval_id']}/approve", headers=AUTH)
    assert again.status_code in (404, 409)  # decided once; never twice

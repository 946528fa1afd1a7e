"""The HTTP edge of the bridge: every rejection path, the error shape, limits and the routes.

These tests run the app in process against a scripted Bridge (helpers_bridge_http.FakeBridge):
what is refused at the edge must never reach the Bridge, and `bridge.calls` is the evidence.
The checks of arguments themselves live in the core Bridge; here only their mapping to HTTP is
tested. End-to-end runs with the real Bridge are in test_bridge_serve.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.bridge.errors import CODES, BridgeError
from corral.bridge.http_api import HttpLimits, create_app
from corral.bridge.http_gate import Gate, GateLimits, Message, Receive, Scope, Send, host_allowed
from corral.bridge.http_models import ErrorBody
from corral.bridge.service import BridgeLimits
from tests.helpers_bridge_http import TOKEN, FakeBridge, pending_approval

BASE = "http://127.0.0.1:8787"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_client(
    bridge: FakeBridge | None = None,
    *,
    http: HttpLimits | None = None,
    limits: BridgeLimits | None = None,
    token: Any = TOKEN,
) -> tuple[TestClient, FakeBridge]:
    bridge = bridge or FakeBridge()
    app = create_app(bridge, token=token, limits=limits, http=http)
    return TestClient(app, base_url=BASE, raise_server_exceptions=False), bridge


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    ErrorBody.model_validate(body)
    assert set(body) == {"error"}
    assert (
        {"code", "message", "hint"} <= set(body["error"]) <= {"code", "message", "hint", "detail"}
    )
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


# -- what needs no token ------------------------------------------------------------------------


def test_healthz_and_the_openapi_document_need_no_token() -> None:
    client, bridge = make_client()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/openapi.json").status_code == 200
    assert bridge.calls == []


def test_openapi_document_describes_every_route_body_and_error() -> None:
    client, _ = make_client()
    document = client.get("/openapi.json").json()
    assert set(document["paths"]) == {
        "/healthz",
        "/v1/commands",
        "/v1/commands/{name}/run",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/output",
        "/v1/approvals",
        "/v1/approvals/{approval_id}/approve",
        "/v1/approvals/{approval_id}/deny",
    }
    schemas = document["components"]["schemas"]
    assert {"ErrorBody", "RunRequest", "Job", "Approval", "CommandList", "Decision"} <= set(schemas)
    assert "HTTPValidationError" not in schemas  # FastAPI's own error shape is never served
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if not path.startswith("/v1/"):
                continue
            assert operation["security"] == [{"HTTPBearer": []}]
            for status in ("400", "401", "404", "413", "422", "429", "500", "503"):
                ref = operation["responses"][status]["content"]["application/json"]["schema"]
                assert ref == {"$ref": "#/components/schemas/ErrorBody"}
    run = document["paths"]["/v1/commands/{name}/run"]["post"]
    assert set(run["responses"]) >= {"200", "202"}


# -- refused at the gate: the Bridge never hears of it ------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "code", "challenge"),
    [
        ({}, 401, "unauthorized", 'Bearer realm="corral"'),
        ({"Authorization": "Bearer "}, 401, "unauthorized", 'Bearer realm="corral"'),
        ({"Authorization": f"Basic {TOKEN}"}, 401, "unauthorized", 'Bearer realm="corral"'),
        ({"Authorization": "Bearer wrong"}, 401, "unauthorized", "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, 401, "unauthorized", "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 401, "unauthorized", "invalid_token"),
        ({**AUTH, "Host": "evil.example"}, 403, "forbidden", None),
        ({**AUTH, "Host": "evil.example:8787"}, 403, "forbidden", None),
        ({**AUTH, "Host": "127.0.0.1.evil.example"}, 403, "forbidden", None),
        ({**AUTH, "Host": "localhost.evil.example:80"}, 403, "forbidden", None),
        ({**AUTH, "Host": "127.0.0.2"}, 403, "forbidden", None),
        ({**AUTH, "Host": ""}, 403, "forbidden", None),
    ],
)
def test_requests_refused_at_the_gate_never_reach_the_bridge(
    headers: dict[str, str], status: int, code: str, challenge: str | None
) -> None:
    client, bridge = make_client()
    response = client.post("/v1/commands/echo/run", json={"args": {"word": "hi"}}, headers=headers)
    assert_error(response, status, code)
    if challenge is not None:
        assert challenge in response.headers["WWW-Authenticate"]
    assert bridge.calls == []


@pytest.mark.parametrize(
    "host",
    [b"127.0.0.1", b"127.0.0.1:8787", b"localhost", b"LOCALHOST:1", b"[::1]", b"[::1]:80"],
)
def test_loopback_hosts_are_allowed(host: bytes) -> None:
    assert host_allowed(host)


@pytest.mark.parametrize(
    "host",
    [
        None,
        b"",
        b"evil.example",
        b"127.0.0.1:",
        b"127.0.0.1:80:80",
        b"127.0.0.1:http",
        b"127.0.0.1:123456",
        b"[::1]x",
        b"[::1",
        b"[::1]:",
        b"[::2]",
        b"localhost.",
        b"0.0.0.0",
        b"127.1",
    ],
)
def test_other_hosts_are_refused(host: bytes | None) -> None:
    assert not host_allowed(host)


def test_web_page_gets_the_host_check_too() -> None:
    client, bridge = make_client()
    response = client.get("/approvals", headers={"Host": "evil.example"})
    assert_error(response, 403, "forbidden")
    assert bridge.calls == []


def test_a_token_source_follows_rotation_and_none_refuses_everyone() -> None:
    current: list[str | None] = [TOKEN]
    client, bridge = make_client(token=lambda: current[0])
    assert client.get("/v1/approvals", headers=AUTH).status_code == 200
    current[0] = "n" * 43
    assert_error(client.get("/v1/approvals", headers=AUTH), 401, "unauthorized")
    assert client.get("/v1/approvals", headers={"Authorization": f"Bearer {'n' * 43}"}).is_success
    current[0] = None
    error = assert_error(client.get("/v1/approvals", headers=AUTH), 401, "unauthorized")
    assert "corral token" in error["hint"]
    assert len(bridge.calls) == 2


# -- body size ----------------------------------------------------------------------------------

SMALL = BridgeLimits(max_body_bytes=1024)


def _body_of(size: int) -> bytes:
    prefix, suffix = b'{"args": {"word": "', b'"}}'
    return prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix


def test_oversized_body_with_content_length_is_refused() -> None:
    client, bridge = make_client(limits=SMALL)
    body = _body_of(1025)
    headers = {**AUTH, "Content-Type": "application/json"}
    assert_error(
        client.post("/v1/commands/echo/run", content=body, headers=headers),
        413,
        "request_too_large",
    )
    assert bridge.calls == []


def test_oversized_chunked_body_is_refused() -> None:
    client, bridge = make_client(limits=SMALL)
    body = _body_of(4096)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    headers = {**AUTH, "Content-Type": "application/json"}
    response = client.post("/v1/commands/echo/run", content=chunks(), headers=headers)
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.request.headers
    assert_error(response, 413, "request_too_large")
    assert bridge.calls == []


def test_a_body_at_the_limit_is_accepted() -> None:
    client, bridge = make_client(limits=SMALL)
    headers = {**AUTH, "Content-Type": "application/json"}
    response = client.post("/v1/commands/echo/run", content=_body_of(1024), headers=headers)
    assert response.status_code == 200  # the fake does not check lengths: that is the core's job
    assert [c[0] for c in bridge.calls] == ["submit"]


def test_the_gate_stops_reading_a_streamed_body_at_the_limit() -> None:
    """Plain ASGI: the gate must stop pulling chunks once the count passes the limit."""
    pulled = 0
    sent: list[Message] = []
    app_called = False

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal app_called
        app_called = True

    async def receive() -> Message:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}  # endless

    async def send(message: Message) -> None:
        sent.append(message)

    gate = Gate(app, token=lambda: TOKEN, limits=GateLimits(1000, 10.0, 10))
    scope = {"type": "http", "path": "/other", "headers": [(b"host", b"127.0.0.1")]}
    asyncio.run(gate(scope, receive, send))
    assert not app_called
    assert pulled == 11  # 1,100 bytes is the first count over 1,000
    assert sent[0]["status"] == 413


# -- rate ---------------------------------------------------------------------------------------

# 0.001 tokens a second: no refill can happen during a test, so the counts are exact.
SLOW = HttpLimits(rate_per_s=0.001, burst=3)


def test_requests_past_the_burst_get_429_with_retry_after() -> None:
    client, bridge = make_client(http=SLOW)
    for _ in range(3):
        assert client.get("/v1/approvals", headers=AUTH).status_code == 200
    response = client.get("/v1/approvals", headers=AUTH)
    assert_error(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    assert len(bridge.calls) == 3


def test_failed_logins_have_their_own_bucket() -> None:
    client, bridge = make_client(http=SLOW)
    wrong = {"Authorization": "Bearer wrong"}
    for _ in range(3):
        assert_error(client.get("/v1/approvals", headers=wrong), 401, "unauthorized")
    assert_error(client.get("/v1/approvals", headers=wrong), 429, "rate_limited")
    assert_error(client.get("/v1/approvals"), 429, "rate_limited")
    assert client.get("/v1/approvals", headers=AUTH).status_code == 200  # the owner still gets in
    assert len(bridge.calls) == 1


# -- errors from the Bridge, mapped 1:1 ---------------------------------------------------------


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_bridge_error_code_keeps_its_status_and_code(code: str) -> None:
    client, bridge = make_client()
    bridge.fail["submit"] = BridgeError(
        code, f"{code} happened", hint="do x", detail={"param": "p"}
    )
    response = client.post("/v1/commands/echo/run", json={"args": {"word": 1}}, headers=AUTH)
    body = assert_error(response, CODES[code], code)
    assert body["hint"] == "do x" and body["detail"] == {"param": "p"}


@pytest.mark.parametrize(
    ("code", "status", "detail", "retry_after"),
    [
        ("too_many_jobs", 503, {}, "1"),
        ("too_many_jobs", 503, {"retry_after_s": 4.2}, "5"),
        ("rate_limited", 429, {"retry_after_s": 30}, "30"),
    ],
)
def test_full_queue_and_bridge_rate_limit_say_when_to_retry(
    code: str, status: int, detail: dict[str, object], retry_after: str
) -> None:
    client, bridge = make_client()
    bridge.fail["submit"] = BridgeError(code, "busy", detail=detail)
    response = client.post("/v1/commands/echo/run", json={}, headers=AUTH)
    assert_error(response, status, code)
    assert response.headers["Retry-After"] == retry_after


def test_unknown_command_is_404() -> None:
    client, _ = make_client()
    response = client.post("/v1/commands/nope/run", json={}, headers=AUTH)
    assert_error(response, 404, "unknown_command")


def test_arguments_pass_through_untouched_for_the_core_to_check() -> None:
    client, bridge = make_client()
    args = {"word": "a; rm -rf ~ $(id) `x` | y", "extra": [1, {"n": None}], "n": 1.5}
    client.post("/v1/commands/echo/run", json={"args": args}, headers=AUTH)
    assert bridge.calls[0] == ("submit", ("echo", args, "http"))


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"{", "application/json", 400, "malformed_request"),
        (b"", "application/json", 400, "malformed_request"),
        (b"[1]", "application/json", 400, "malformed_request"),
        (b'"args"', "application/json", 400, "malformed_request"),
        (b'{"args": {}}', "text/plain", 400, "malformed_request"),
        (b'{"args": []}', "application/json", 400, "malformed_request"),
        (b'{"args": {}, "extra": 1}', "application/json", 400, "malformed_request"),
        (b'{"wait": "yes"}', "application/json", 400, "malformed_request"),
        (b'{"timeout_s": "5"}', "application/json", 400, "malformed_request"),
        (b'{"timeout_s": 0}', "application/json", 422, "invalid_parameter"),
        (b'{"timeout_s": 1e9}', "application/json", 422, "invalid_parameter"),
        (b"\xff\xfe", "application/json", 400, "malformed_request"),
    ],
)
def test_malformed_envelopes_are_refused_with_a_stable_code(
    content: bytes, content_type: str, status: int, code: str
) -> None:
    client, bridge = make_client()
    headers = {**AUTH, "Content-Type": content_type}
    response = client.post("/v1/commands/echo/run", content=content, headers=headers)
    assert_error(response, status, code)
    assert bridge.calls == []


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("GET", "/v1/nowhere", 404, "not_found"),
        ("GET", "/v1/commands/echo", 404, "not_found"),
        ("DELETE", "/v1/commands", 405, "method_not_allowed"),
        ("GET", "/v1/commands/echo/run", 405, "method_not_allowed"),
        ("PUT", "/v1/approvals/ap1/approve", 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
        ("GET", "/v1/jobs/job1?wait_s=abc", 422, "invalid_parameter"),
        ("GET", "/v1/jobs/job1?wait_s=-1", 422, "invalid_parameter"),
        ("GET", "/v1/jobs/job1/output?offset=-1", 422, "invalid_parameter"),
        ("GET", "/v1/jobs/" + "j" * 201, 422, "invalid_parameter"),
    ],
)
def test_unknown_routes_wrong_methods_and_bad_query_values(
    method: str, path: str, status: int, code: str
) -> None:
    client, bridge = make_client()
    assert_error(client.request(method, path, headers=AUTH), status, code)
    assert bridge.calls == []


def test_wrong_method_says_which_are_allowed() -> None:
    client, _ = make_client()
    response = client.delete("/v1/commands", headers=AUTH)
    assert response.headers["Allow"] == "GET"


def test_unknown_routes_under_v1_need_the_token_first() -> None:
    client, _ = make_client()
    assert_error(client.get("/v1/nowhere"), 401, "unauthorized")


def test_an_unexpected_failure_is_a_json_500_without_details() -> None:
    client, bridge = make_client()
    bridge.fail["pending"] = RuntimeError("secret detail /home/user/.ssh")
    response = client.get("/v1/approvals", headers=AUTH)
    assert_error(response, 500, "internal")
    assert "secret" not in response.text and "Traceback" not in response.text


# -- the routes ---------------------------------------------------------------------------------


def test_run_and_wait_answers_200_with_the_finished_job() -> None:
    client, bridge = make_client()
    response = client.post("/v1/commands/echo/run", json={"args": {"word": "hi"}}, headers=AUTH)
    assert response.status_code == 200
    job = response.json()
    assert (job["state"], job["stdout"], job["argv"]) == ("succeeded", "hi\n", ["echo", "hi"])
    assert [c[0] for c in bridge.calls] == ["submit"]  # finished at once: no wait needed


def test_run_that_does_not_finish_in_time_answers_202_with_the_job_so_far() -> None:
    client, bridge = make_client(FakeBridge(finish=False), http=HttpLimits(sync_wait_s=7.0))
    response = client.post("/v1/commands/echo/run", json={"timeout_s": 600}, headers=AUTH)
    assert response.status_code == 202
    assert response.json()["state"] == "running"
    assert response.headers["Location"] == "/v1/jobs/job1"
    method, (job_id, timeout) = bridge.calls[1]
    assert method == "wait" and job_id == "job1" and 0 < timeout <= 7.0  # the server's cap


def test_a_shorter_requested_wait_wins() -> None:
    client, bridge = make_client(FakeBridge(finish=False))
    client.post("/v1/commands/echo/run", json={"timeout_s": 0.5}, headers=AUTH)
    _, (_, timeout) = bridge.calls[1]
    assert 0 < timeout <= 0.5


def test_run_without_waiting_answers_202_at_once() -> None:
    client, bridge = make_client(FakeBridge(finish=False))
    response = client.post("/v1/commands/echo/run", json={"wait": False}, headers=AUTH)
    assert response.status_code == 202
    assert [c[0] for c in bridge.calls] == ["submit"]


def test_get_job() -> None:
    client, bridge = make_client(FakeBridge(finish=False))
    client.post("/v1/commands/echo/run", json={"wait": False}, headers=AUTH)
    response = client.get("/v1/jobs/job1", headers=AUTH)
    assert response.status_code == 202 and response.json()["id"] == "job1"
    client.get("/v1/jobs/job1?wait_s=2", headers=AUTH)
    assert bridge.calls[-1][0] == "wait"
    assert_error(client.get("/v1/jobs/nope", headers=AUTH), 404, "unknown_job")


def test_output_is_streamed_until_the_job_finishes() -> None:
    bridge = FakeBridge(outputs=(b"one\n", b"two\n", b"three\n"))
    client, _ = make_client(bridge, http=HttpLimits(output_poll_s=0.001))
    client.post("/v1/commands/echo/run", json={}, headers=AUTH)
    with client.stream("GET", "/v1/jobs/job1/output", headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream"
        assert "content-length" not in response.headers  # streamed: the server chunks it
        assert b"".join(response.iter_bytes()) == b"one\ntwo\nthree\n"
    offsets = [detail[1] for method, detail in bridge.calls if method == "output"]
    assert offsets == [0, 4, 8]


def test_output_of_an_unknown_job_is_a_json_404() -> None:
    client, _ = make_client()
    assert_error(client.get("/v1/jobs/nope/output", headers=AUTH), 404, "unknown_job")


def test_approvals_are_listed_and_decided_by_the_api() -> None:
    bridge = FakeBridge()
    bridge.approvals = [pending_approval("ap1")]
    client, _ = make_client(bridge)
    listed = client.get("/v1/approvals", headers=AUTH).json()["approvals"]
    assert [(a["id"], a["argv"], a["reason"]) for a in listed] == [
        ("ap1", ["make", "ENV=prod"], "env matched /^prod$/")
    ]
    approve = client.post("/v1/approvals/ap1/approve", json={"reason": "ok"}, headers=AUTH)
    assert approve.json() == {"id": "ap1", "decision": "approved"}
    deny = client.post("/v1/approvals/ap1/deny", headers=AUTH)
    assert deny.json() == {"id": "ap1", "decision": "denied"}
    decisions = [detail for method, detail in bridge.calls if method == "decide"]
    assert decisions == [("ap1", True, "api", "ok"), ("ap1", False, "api", "")]
    assert_error(client.post("/v1/approvals/zz/approve", headers=AUTH), 404, "unknown_approval")
    bridge.fail["decide"] = BridgeError("not_pending", "already decided")
    assert_error(client.post("/v1/approvals/ap1/deny", headers=AUTH), 409, "not_pending")


def test_a_waiting_request_does_not_block_the_others() -> None:
    """A run that waits for its job holds a waiter thread, not the event loop: a decision
    (which is what would end the wait) still gets through."""
    bridge = FakeBridge(finish=False)
    release = threading.Event()
    waiting = threading.Event()
    original_wait = bridge.wait

    def blocking_wait(job_id: str, *, timeout_s: float | None) -> Any:
        waiting.set()
        release.wait(30)  # bounded only so that a broken server fails instead of hanging
        return original_wait(job_id, timeout_s=timeout_s)

    bridge.wait = blocking_wait  # type: ignore[method-assign]
    client, _ = make_client(bridge)
    answers: list[int] = []
    runner = threading.Thread(
        target=lambda: answers.append(
            client.post("/v1/commands/echo/run", json={}, headers=AUTH).status_code
        )
    )
    runner.start()
    assert waiting.wait(30)
    assert client.get("/v1/approvals", headers=AUTH).status_code == 200
    assert not release.is_set()  # the wait was still in progress while that was served
    release.set()
    runner.join(30)
    assert answers == [202]


def test_the_approvals_page_is_mounted_when_present() -> None:
    client, bridge = make_client()
    response = client.get("/approvals")
    assert response.status_code == 401  # the page's own login form, not a JSON 404
    assert response.headers["content-type"].startswith("text/html")
    assert bridge.calls == []


def test_commands_are_listed_with_their_parameter_schemas() -> None:
    client, _ = make_client()
    commands = client.get("/v1/commands", headers=AUTH).json()["commands"]
    assert [c["name"] for c in commands] == ["echo", "deploy"]
    echo, deploy = commands
    assert echo["description"] == "Print a word" and echo["approval"] == "auto"
    assert echo["parameters"]["type"] == "object"
    assert echo["parameters"]["properties"]["word"]["maxLength"] == 20
    assert echo["parameters"]["required"] == ["word"]
    assert deploy["parameters"]["properties"]["env"]["enum"] == ["staging", "prod"]
    assert deploy["approval"] == "ask when env matches /^prod$/"

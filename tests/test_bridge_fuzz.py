"""Fuzz the HTTP API from its own OpenAPI document with schemathesis: whatever arrives, the
answer is never a 5xx and nothing crashes.

Each operation gets generated requests (valid and invalid bodies, paths, queries) with the
token and a loopback Host supplied, so they get past the gate and reach the routes and the
real Bridge (declarations in a workspace's .corral/settings.json; valid runs start real
sandboxes). The examples are derandomized and bounded: the run is the same every time and
stays well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from corral.audit.events import MemorySink
from corral.bridge.declarations import merge_layers
from corral.bridge.http_api import HttpLimits, create_app
from corral.bridge.service import Bridge, BridgeLimits
from corral.bridge.tools import input_schema
from tests.conftest import Layout
from tests.helpers_bridge_http import TOKEN, FakeBridge, write_declarations

pytestmark = pytest.mark.usefixtures("sandbox_available")

HEADERS = {"Authorization": f"Bearer {TOKEN}"}
BASE_URL = "http://127.0.0.1:8787"  # the Host the gate accepts
EXAMPLES = 40  # per operation; 8 operations

# Fuzzing harmless commands only: no `ask` (a pending approval per example would fill the
# queue) and nothing writable.
FUZZ_COMMANDS: dict[str, object] = {
    "echo": {
        "description": "Print a word",
        "argv": ["echo", "{word}"],
        "params": {"word": {"type": "string", "maxLength": 64, "default": "x"}},
    },
    "count": {
        "argv": ["seq", "{n}"],
        "params": {"n": {"type": "integer", "minimum": 1, "maximum": 3}},
    },
    "show": {"argv": ["ls", "-d", "{p}"], "params": {"p": {"type": "path", "default": "."}}},
}


def focused_document() -> dict[str, Any]:
    """The app's own document (it does not depend on the Bridge behind it, so a fake gives it),
    with the run operation narrowed to the declared commands and their argument schemas: most
    generated runs then pass validation and start real sandboxes. Negative generation still
    sends everything else (other names, other bodies)."""
    document = create_app(FakeBridge(), token=TOKEN).openapi()
    run = document["paths"]["/v1/commands/{name}/run"]["post"]
    (name,) = [p for p in run["parameters"] if p["name"] == "name"]
    name["schema"] = {"type": "string", "enum": [*FUZZ_COMMANDS, "nope"]}
    commands = merge_layers([("fuzz", False, {"commands": FUZZ_COMMANDS})]).commands
    run_request = document["components"]["schemas"]["RunRequest"]
    run_request["properties"]["args"] = {
        "anyOf": [input_schema(command, strict=False) for command in commands]
    }
    return document


schema = schemathesis.openapi.from_dict(focused_document())


@pytest.fixture
def app(layout: Layout) -> Iterator[FastAPI]:
    write_declarations(layout, FUZZ_COMMANDS)
    # Limits high enough that the fuzzer reaches the routes rather than 429/503 every time;
    # those answers are tested in test_bridge_http.py.
    limits = BridgeLimits(max_queued_jobs=10_000, requests_per_minute=1_000_000)
    bridge = Bridge.from_settings(
        layout.workspace,
        audit=MemorySink(),
        limits=limits,
        managed_path=f"{layout.root}/no-managed.json",
        environ=layout.env,
    )
    with bridge:
        yield create_app(
            bridge, token=TOKEN, http=HttpLimits(rate_per_s=1e6, burst=1_000_000, sync_wait_s=5)
        )


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_server_error(case: schemathesis.Case[Any], app: FastAPI) -> None:
    case.call_and_validate(app=app, base_url=BASE_URL, headers=HEADERS, checks=[not_a_server_error])

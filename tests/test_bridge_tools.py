"""Tool export: each format checked against that API's tool schema, and the parameter schemas
against the bridge's own checks (what the schema accepts, the bridge accepts, and the reverse
for every rejection the schema can express)."""

from __future__ import annotations

import os
from pathlib import Path

import jsonschema
import pytest

from corral.bridge.binding import bind
from corral.bridge.declarations import Command, merge_layers
from corral.bridge.errors import BridgeError
from corral.bridge.tools import FORMATS, Format, export_tools
from corral.hostpaths import host_paths
from corral.policy.presets import preset_policy

# Tool names, as the Anthropic and OpenAI API references give them.
TOOL_NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
# A JSON Schema object at the top of a tool's input, as all three APIs require.
OBJECT_SCHEMA = {
    "type": "object",
    "required": ["type", "properties"],
    "properties": {
        "type": {"const": "object"},
        "properties": {"type": "object"},
        "required": {"type": "array", "items": {"type": "string"}},
        "additionalProperties": {"type": "boolean"},
    },
}

# Anthropic Messages API, `tools[]` (custom tool): name, description, input_schema.
ANTHROPIC_TOOL = {
    "type": "object",
    "required": ["name", "input_schema"],
    "properties": {
        "type": {"const": "custom"},
        "name": TOOL_NAME,
        "description": {"type": "string"},
        "input_schema": OBJECT_SCHEMA,
        "cache_control": {"type": ["object", "null"]},
    },
    "additionalProperties": False,
}

# OpenAI Chat Completions `tools[]`: {"type": "function", "function": FunctionDefinition}.
OPENAI_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": TOOL_NAME,
                "description": {"type": "string"},
                "parameters": OBJECT_SCHEMA,
                "strict": {"type": ["boolean", "null"]},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
# Structured Outputs (strict: true): every property required, no extra properties, and none
# of the keywords it does not support.
OPENAI_STRICT_PARAMETERS = {
    "type": "object",
    "required": ["type", "properties", "required", "additionalProperties"],
    "properties": {
        "additionalProperties": {"const": False},
        "properties": {
            "type": "object",
            "additionalProperties": {
                "not": {
                    "anyOf": [
                        {"required": ["default"]},
                        {"required": ["minLength"]},
                        {"required": ["maxLength"]},
                    ]
                }
            },
        },
    },
}

# MCP `Tool` (specification 2025-06-18, schema.ts): name, title?, description?, inputSchema,
# outputSchema?, annotations?, _meta?.
MCP_TOOL = {
    "type": "object",
    "required": ["name", "inputSchema"],
    "properties": {
        "name": {"type": "string"},
        "title": {"type": "string"},
        "description": {"type": "string"},
        "inputSchema": OBJECT_SCHEMA,
        "outputSchema": OBJECT_SCHEMA,
        "annotations": {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "readOnlyHint": {"type": "boolean"},
                "destructiveHint": {"type": "boolean"},
                "idempotentHint": {"type": "boolean"},
                "openWorldHint": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
        "_meta": {"type": "object"},
    },
    "additionalProperties": False,
}

FORMAT_SCHEMAS: dict[str, dict[str, object]] = {
    "anthropic": ANTHROPIC_TOOL,
    "openai": OPENAI_TOOL,
    "mcp": MCP_TOOL,
}

COMMANDS = merge_layers(
    [
        (
            "test.json",
            False,
            {
                "commands": {
                    "test": {
                        "description": "Run the test suite",
                        "argv": ["pytest", "-q", "{target}", "-k", "{k}", "-n", "{n}", "{x}"],
                        "params": {
                            "target": {"type": "path", "description": "where", "default": "."},
                            "k": {"type": "string", "pattern": "[a-z_]+", "maxLength": 20},
                            "n": {"type": "integer", "minimum": 1, "maximum": 8, "default": 2},
                            "x": {"type": "boolean", "flag": "-x", "default": False},
                        },
                    },
                    "deploy": {
                        "argv": ["make", "deploy", "ENV={env}"],
                        "params": {"env": {"type": "string", "enum": ["staging", "prod"]}},
                        "approval": {"ask": {"env": "^prod$"}},
                        "writable": True,
                    },
                    "lint": {"argv": ["ruff", "check"], "approval": "ask"},
                }
            },
        )
    ]
).commands


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_the_format(fmt: Format) -> None:
    tools = export_tools(COMMANDS, fmt)
    assert len(tools) == len(COMMANDS)
    for tool in tools:
        jsonschema.validate(tool, FORMAT_SCHEMAS[fmt])
        jsonschema.Draft202012Validator.check_schema(_parameters(tool, fmt))


def test_openai_tools_are_strict() -> None:
    for tool in export_tools(COMMANDS, "openai"):
        parameters = _parameters(tool, "openai")
        jsonschema.validate(parameters, OPENAI_STRICT_PARAMETERS)
        assert sorted(parameters["required"]) == sorted(parameters["properties"])  # type: ignore[call-overload]


def test_mcp_tools_load_into_the_sdk_model() -> None:
    from mcp.types import Tool

    for tool in export_tools(COMMANDS, "mcp"):
        loaded = Tool.model_validate(tool)
        assert loaded.name == tool["name"]


def test_the_format_schemas_can_fail() -> None:
    """The schemas above are not vacuous: a misnamed key or a bad name is caught."""
    [tool] = export_tools(COMMANDS[:1], "anthropic")
    for broken in ({**tool, "inputSchema": {}}, {**tool, "name": "has space"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, ANTHROPIC_TOOL)
    [tool] = export_tools(COMMANDS[:1], "openai")
    loose = {**tool["function"], "parameters": {"type": "object", "properties": {}}}  # type: ignore[dict-item]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(loose["parameters"], OPENAI_STRICT_PARAMETERS)


def test_descriptions_say_what_an_agent_must_know() -> None:
    tools = {t["name"]: t for t in export_tools(COMMANDS, "anthropic")}
    assert str(tools["test"]["description"]).startswith("Run the test suite")
    assert "read-only" in str(tools["test"]["description"])
    assert "env need a human" in str(tools["deploy"]["description"])
    assert "must approve" in str(tools["lint"]["description"])


def _parameters(tool: dict[str, object], fmt: Format) -> dict[str, object]:
    if fmt == "openai":
        function = tool["function"]
        assert isinstance(function, dict)
        return function["parameters"]  # type: ignore[no-any-return]
    key = "input_schema" if fmt == "anthropic" else "inputSchema"
    return tool[key]  # type: ignore[return-value]


ARGUMENTS: list[tuple[dict[str, object], bool]] = [
    ({"k": "abc"}, True),
    ({"k": "abc", "n": 8, "x": True, "target": "sub"}, True),
    ({}, False),  # missing k
    ({"k": "ABC"}, False),  # pattern
    ({"k": "abc", "n": 9}, False),  # maximum
    ({"k": "abc", "n": True}, False),  # boolean is not an integer
    ({"k": "abc", "n": 2.5}, False),
    ({"k": "a" * 21}, False),  # maxLength
    ({"k": "abc", "extra": 1}, False),
    ({"k": "abc", "x": "yes"}, False),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("args", "ok"), ARGUMENTS, ids=[repr(a[0])[:40] for a in ARGUMENTS])
def test_schema_and_bridge_agree(
    tmp_path: Path, fmt: Format, args: dict[str, object], ok: bool
) -> None:
    command = COMMANDS[0]
    tool = export_tools([command], fmt)[0]
    schema = _parameters(tool, fmt)
    if fmt == "openai":  # strict: every property present, null for the default
        args = {p.name: args.get(p.name) for p in command.params} | args
    schema_ok = jsonschema.Draft202012Validator(schema).is_valid(args)
    # Strict mode cannot say maxLength (it is in the description): only the bridge refuses.
    too_long = len(str(args.get("k") or "")) > 20
    assert schema_ok == (ok or (fmt == "openai" and too_long))
    assert _bridge_accepts(command, args, str(tmp_path)) == ok


def _bridge_accepts(command: Command, args: dict[str, object], workspace: str) -> bool:
    os.makedirs(f"{workspace}/sub", exist_ok=True)
    policy = preset_policy("strict", host_paths(workspace, {"HOME": workspace}))
    try:
        bind(command, args, workspace=workspace, policy=policy)
    except BridgeError:
        return False
    return True


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown tool format"):
        export_tools(COMMANDS, "gemini")  # type: ignore[arg-type]

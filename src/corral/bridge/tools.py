"""The declared commands as tool definitions for the Anthropic, OpenAI and MCP APIs.

One source: an agent's tool list and the bridge's allow-list both come from `bridge.commands`,
so a tool the agent sees is a command the bridge accepts, with the same parameters.

    anthropic  {"name", "description", "input_schema"}
    openai     {"type": "function", "function": {"name", "description", "parameters", "strict"}}
    mcp        {"name", "description", "inputSchema", "annotations"}

Parameter schemas carry the declarations' constraints (enum, pattern, minimum/maximum,
maxLength), `required` for parameters without a default, and `additionalProperties: false`.
The bridge checks every request again whatever the schema said: the schema helps the model,
it is not the check.

OpenAI's strict mode wants every property required and no `default`; a parameter with a
default is therefore also allowed to be null there, and the bridge reads null as "use the
default". Constraints strict mode does not take (maxLength, default) go into the description.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Literal

from .declarations import MAX_VALUE_LENGTH, Command, Param

Format = Literal["anthropic", "openai", "mcp"]
FORMATS: tuple[Format, ...] = ("anthropic", "openai", "mcp")


def export_tools(commands: Iterable[Command], fmt: Format) -> list[dict[str, object]]:
    """Tool definitions of `commands`, in declaration order, for the API `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown tool format {fmt!r}; expected one of {', '.join(FORMATS)}")
    tools: list[dict[str, object]] = []
    for command in commands:
        description = tool_description(command)
        if fmt == "anthropic":
            schema = input_schema(command, strict=False)
            tools.append({"name": command.name, "description": description, "input_schema": schema})
        elif fmt == "openai":
            function = {
                "name": command.name,
                "description": description,
                "parameters": input_schema(command, strict=True),
                "strict": True,
            }
            tools.append({"type": "function", "function": function})
        else:
            tools.append(
                {
                    "name": command.name,
                    "description": description,
                    "inputSchema": input_schema(command, strict=False),
                    "annotations": {
                        "readOnlyHint": not command.writable,
                        "destructiveHint": command.writable,
                        "openWorldHint": command.mode != "strict",
                    },
                }
            )
    return tools


def tool_description(command: Command) -> str:
    """The command's description, and what the agent should know before calling it."""
    text = command.description or f"Runs `{' '.join(command.argv)}`."
    notes = [f"Runs in a corral sandbox ({command.mode} mode"]
    notes[0] += ", may write the workspace)." if command.writable else ", workspace read-only)."
    if command.approval.kind == "ask":
        notes.append("A human must approve each call; it may wait.")
    elif command.approval.ask_when:
        names = ", ".join(name for name, _ in command.approval.ask_when)
        notes.append(f"Some values of {names} need a human's approval; the call may wait.")
    elif command.approval.kind == "deny":
        notes.append("Currently denied by the bridge's settings.")
    return " ".join([text, *notes])


def input_schema(command: Command, *, strict: bool) -> dict[str, object]:
    """The JSON Schema (an object) of the command's parameters."""
    properties = {param.name: param_schema(param, strict=strict) for param in command.params}
    required = [p.name for p in command.params if strict or p.required]
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_JSON_TYPES = {"string": "string", "integer": "integer", "boolean": "boolean", "path": "string"}


def param_schema(param: Param, *, strict: bool) -> dict[str, object]:
    schema: dict[str, object] = {"type": _JSON_TYPES[param.type]}
    notes = [param.description] if param.description else []
    if param.type == "path":
        notes.append("A path inside the workspace, relative to it.")
    if param.enum is not None:
        schema["enum"] = list(param.enum)
    if param.pattern is not None:
        # JSON Schema patterns search; the declaration's must match the whole value.
        schema["pattern"] = f"^(?:{param.pattern.pattern})$"
    if param.minimum is not None:
        schema["minimum"] = param.minimum
    if param.maximum is not None:
        schema["maximum"] = param.maximum
    if param.type in ("string", "path"):
        length = min(param.max_length or MAX_VALUE_LENGTH, MAX_VALUE_LENGTH)
        if strict:
            notes.append(f"At most {length} characters.")
        else:
            schema["maxLength"] = length
        if param.type == "path":
            schema["minLength"] = 1
    if not param.required:
        if strict:
            notes.append(f"null for the default, {json.dumps(param.default)}.")
            schema["type"] = [schema["type"], "null"]
            if "enum" in schema:
                schema["enum"] = [*(param.enum or ()), None]
        else:
            schema["default"] = param.default
    if strict:
        schema.pop("minLength", None)
    if notes:
        schema["description"] = " ".join(notes)
    return schema

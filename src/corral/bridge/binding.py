"""A request's arguments checked against a declaration and turned into the argv that will run.

Rules:
1. Every argument must be declared, every required one present, each of its declared type
   (JSON true/false are not integers, 3.0 is not an integer, "3" is not an integer). null
   stands for the default (OpenAI's strict tools must send every property).
2. A value is data, never syntax: it becomes (part of) one argv element, and argv is never
   given to a shell, so `; rm -rf ~`, `$(...)` and backticks arrive as literal text.
3. A string that fills a whole element and starts with `-` is refused unless its enum or
   pattern allows it: otherwise an agent could turn an operand into an option
   (`--output=/x`, `--upload-pack=...`).
4. A path is taken relative to the workspace and must stay inside it after `..` and symlinks
   are resolved; argv gets the resolved absolute path, so what was checked is what runs.
5. No value holds a NUL byte (the kernel would cut the argument there).

The policy a command runs under is its mode's preset with the settings merged in (the same
`load_policy` as `corral run --mode`), with the workspace read-only unless it is declared
`writable` (`command_policy`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from corral.policy.model import HostPaths, Origin, Policy, Rule
from corral.policy.paths import is_within
from corral.policy.settings import MANAGED_SETTINGS

from .declarations import MAX_VALUE_LENGTH, ApprovalKind, Command, Param
from .errors import BridgeError
from .templates import render


class Invocation(NamedTuple):
    """What will run, exactly: shown to the human who approves it, then executed."""

    command: Command
    argv: tuple[str, ...]
    cwd: str
    policy: Policy
    timeout_s: float
    output_limit: int
    approval_reason: str | None
    """Why a human must decide (None: no approval needed)."""
    approval: ApprovalKind = "auto"
    """auto: run at once; ask: wait for a human; deny: never run (the declaration says so)."""
    values: dict[str, object] = {}  # noqa: RUF012 - a NamedTuple default, never mutated
    """The checked arguments, defaults included (for the audit log)."""


def check_value(param: Param, value: object) -> str | None:
    """What is wrong with `value` for `param`, as the end of a sentence; None when it fits.

    Path containment is checked by `bind`, which knows the workspace."""
    if param.type == "boolean":
        return None if isinstance(value, bool) else f"must be true or false, not {_kind(value)}"
    if param.type == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, not {_kind(value)}"
        if param.minimum is not None and value < param.minimum:
            return f"must be at least {param.minimum}"
        if param.maximum is not None and value > param.maximum:
            return f"must be at most {param.maximum}"
        return None
    if not isinstance(value, str):
        return f"must be a string, not {_kind(value)}"
    if "\0" in value:
        return "contains a NUL byte"
    limit = min(param.max_length or MAX_VALUE_LENGTH, MAX_VALUE_LENGTH)
    if len(value) > limit:
        return f"is longer than {limit} characters"
    if param.type == "path" and not value:
        return "must not be empty"
    if param.enum is not None and value not in param.enum:
        return f"must be one of {', '.join(map(repr, param.enum))}"
    if param.pattern is not None and not param.pattern.fullmatch(value):
        return f"must match {param.pattern.pattern!r} (the whole value)"
    return None


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction" if not value.is_integer() else "a float"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return "an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else "?"


def bind(
    command: Command,
    args: Mapping[str, object],
    *,
    workspace: str,
    policy: Policy | None = None,
    output_limit: int | None = None,
) -> Invocation:
    """Check `args` against `command` and build its Invocation, or raise BridgeError.

    `policy`: the command's policy when the caller has it already (the Bridge builds it once
    per command); otherwise it is loaded from the settings files. `output_limit`: the bridge's
    ceiling for captured output (the declaration may ask for less, never more).
    """
    if not isinstance(args, Mapping):
        raise BridgeError("malformed_request", "the arguments must be a JSON object")
    workspace = os.path.realpath(workspace)
    _refuse_unexpected(command, args)
    values: dict[str, object] = {}
    texts: dict[str, str] = {}
    for param in command.params:
        value = args.get(param.name)
        if value is None:  # absent, or null (OpenAI's strict tools send null for "default")
            value = param.default
        if value is None:
            raise BridgeError(
                "missing_parameter",
                f"{command.name}: the parameter {param.name!r} is required",
                hint=f"pass {param.name} ({param.type}){_described(param)}",
                detail={"parameter": param.name},
            )
        problem = check_value(param, value)
        if problem is None and param.type == "string" and isinstance(value, str):
            problem = _option_like(command, param, value)
        if problem is not None:
            raise BridgeError(
                "invalid_parameter",
                f"{command.name}: {param.name} {problem}",
                hint=f"{param.name} is {_expected(param)}",
                detail={"parameter": param.name, "reason": problem},
            )
        values[param.name] = value
        texts[param.name] = _text(param, value, workspace)
    argv = _render(command, texts)
    if policy is None:
        from corral.hostpaths import host_paths

        policy = command_policy(command, host_paths(workspace, os.environ))
    limit = command.output_limit or output_limit or DEFAULT_OUTPUT_LIMIT
    if output_limit is not None:
        limit = min(limit, output_limit)
    kind, reason = _approval(command, texts)
    return Invocation(
        command=command,
        argv=argv,
        cwd=workspace,
        policy=policy,
        timeout_s=command.timeout_s,
        output_limit=limit,
        approval_reason=reason,
        approval=kind,
        values=values,
    )


DEFAULT_OUTPUT_LIMIT = 1 << 20


def _refuse_unexpected(command: Command, args: Mapping[str, object]) -> None:
    declared = {param.name for param in command.params}
    unexpected = sorted(str(name) for name in args if name not in declared)
    if unexpected:
        raise BridgeError(
            "unexpected_parameter",
            f"{command.name}: no parameter named {', '.join(map(repr, unexpected))}",
            hint="declared: " + (", ".join(sorted(declared)) or "none"),
            detail={"parameters": unexpected},
        )


def _option_like(command: Command, param: Param, value: str) -> str | None:
    """Rule 3: a value alone in its element that an option parser would take for an option."""
    if not value.startswith("-") or param.enum is not None or param.pattern is not None:
        return None
    alone = any(
        len(el) == 1 and el[0].kind == "param" and el[0].value == param.name
        for el in command.template
    )
    if alone:
        return "starts with '-' and would be read as an option (declare a pattern to allow it)"
    return None


def _text(param: Param, value: object, workspace: str) -> str:
    if param.type == "boolean":
        if param.flag is not None:
            return param.flag if value else ""
        return "true" if value else "false"
    if param.type == "integer":
        return str(value)
    assert isinstance(value, str)
    if param.type == "path":
        return _resolve_inside(param, value, workspace)
    return value


def _resolve_inside(param: Param, value: str, workspace: str) -> str:
    joined = os.path.normpath(os.path.join(workspace, value))
    how = "through .." if not is_within(joined, workspace) else "through a symlink"
    real = os.path.realpath(joined)
    if not is_within(joined, workspace) or not is_within(real, workspace):
        raise BridgeError(
            "path_outside_workspace",
            f"{param.name}: {value!r} leads outside the workspace ({how})",
            hint=f"give a path inside {workspace}",
            detail={"parameter": param.name},
        )
    return real


def _render(command: Command, texts: Mapping[str, str]) -> tuple[str, ...]:
    argv = []
    for element in command.template:
        # A boolean with a flag, false: its element is dropped (rule of declarations.py).
        if len(element) == 1 and element[0].kind == "param":
            param = command.param(element[0].value)
            if param is not None and param.flag is not None and not texts[param.name]:
                continue
        argv.append(render(element, texts))
    return tuple(argv)


def _approval(command: Command, texts: Mapping[str, str]) -> tuple[ApprovalKind, str | None]:
    rule = command.approval
    where = str(command.origin)
    if rule.kind == "deny":
        return "deny", f"the declaration of {command.name} says approval: deny ({where})"
    if rule.kind == "ask":
        return "ask", f"the declaration of {command.name} says approval: ask ({where})"
    for name, pattern in rule.ask_when:
        if pattern.search(texts[name]):
            return "ask", f"parameter {name} matched /{pattern.pattern}/ ({where})"
    return "auto", None


def _described(param: Param) -> str:
    return f": {param.description}" if param.description else ""


def _expected(param: Param) -> str:
    parts = [f"a {param.type}"]
    if param.enum is not None:
        parts.append("one of " + ", ".join(map(repr, param.enum)))
    if param.pattern is not None:
        parts.append(f"matching {param.pattern.pattern!r}")
    if param.max_length is not None:
        parts.append(f"at most {param.max_length} characters")
    if param.minimum is not None:
        parts.append(f">= {param.minimum}")
    if param.maximum is not None:
        parts.append(f"<= {param.maximum}")
    if param.type == "path":
        parts.append("inside the workspace")
    return ", ".join(parts)


def command_policy(
    command: Command, host: HostPaths, *, managed_path: str = MANAGED_SETTINGS
) -> Policy:
    """The policy `command` runs under: its mode with the settings files, read-only workspace
    unless declared writable. The managed file's mode, as for `corral run`, wins."""
    from corral.policy.settings import load_policy

    policy = load_policy(host, mode=command.mode, managed_path=managed_path)
    if not command.writable:
        policy = read_only_workspace(policy, Origin(command.origin.source, "writable: false"))
    return policy


def read_only_workspace(policy: Policy, origin: Origin) -> Policy:
    """The workspace and everything in it read-only. Writable rules inside it are dropped and
    the workspace is protected (deny-write beats any writable parent, e.g. home in permissive
    mode); the mandatory protections and the rest of the policy stay as they are."""
    ws = policy.workspace
    fs = policy.filesystem
    write = tuple(rule for rule in fs.write if not is_within(rule.value, ws))
    deny_write = (*fs.deny_write, Rule(ws, origin))
    return policy._replace(filesystem=fs._replace(write=write, deny_write=deny_write))


def workspace_writable(policy: Policy) -> bool:
    ws = policy.workspace
    fs = policy.filesystem
    protected = any(is_within(ws, rule.value) for rule in fs.deny_write)
    return not protected and any(is_within(ws, rule.value) for rule in fs.write)


def describe_policy(policy: Policy) -> str:
    """One line for a human deciding: mode, network, what is writable."""
    ws = policy.workspace
    writable = [rule.value for rule in policy.filesystem.write] or ["nothing"]
    state = "writable" if workspace_writable(policy) else "read-only"
    tmp = ", private /tmp" if policy.filesystem.private_tmp else ""
    return (
        f"mode {policy.mode}; network {policy.network.access}; workspace {ws} {state}; "
        f"writable: {', '.join(writable)}{tmp}"
    )

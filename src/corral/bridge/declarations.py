"""`bridge` in the settings files, checked in full and read into `Command` / `Param` records.

The files are the policy's (`corral.policy.settings.settings_sources`), lowest first: user <
project < local < managed. Rules:
1. A command declared in a later file replaces the one of the same name from an earlier file,
   whole (a project cannot half-change a user's command).
2. In the managed file, a command entry without `argv` overrides only the keys it names
   (`approval`, `mode`, `writable`, `timeoutSeconds`, `outputLimitBytes`, `description`) of
   the command declared below it, e.g. `{"deploy": {"approval": "deny"}}`; when no lower file
   declares the command it has no effect. With `argv` it is a full declaration, as elsewhere.
3. `approvalTimeoutSeconds`: the last file that sets it wins.
4. Everything is checked at load time: unknown keys, types, that every placeholder names a
   declared parameter and every parameter is used, defaults that pass their own constraints,
   regular expressions that compile, and templates that would need a shell (templates.py).
   Errors are SettingsError naming the file, the key path and the reason.

Constraints, by parameter type:
    string   enum, pattern (a full match), maxLength
    integer  minimum, maximum (JSON true/false are not integers)
    boolean  flag: when set, `{name}` must be a whole element; true puts the flag there,
             false drops the element. Without a flag the value is "true" or "false".
    path     resolved against the workspace; after symlinks it must stay inside it
A parameter with a `default` is optional; one without is required.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

from corral.errors import SettingsError
from corral.policy.model import MODES, HostPaths, Mode, Origin
from corral.policy.settings import MANAGED_SETTINGS, read_settings, settings_sources

from .readers import (
    read_argv,
    read_bool,
    read_element,
    read_enum,
    read_int,
    read_object,
    read_regex,
    read_seconds,
    read_text,
    refuse_unknown,
)
from .templates import Element, TemplateError, check_template, placeholders

ParamType = Literal["string", "integer", "boolean", "path"]
PARAM_TYPES: tuple[ParamType, ...] = ("string", "integer", "boolean", "path")
ApprovalKind = Literal["auto", "ask", "deny"]
APPROVAL_KINDS: tuple[ApprovalKind, ...] = ("auto", "ask", "deny")

# Tool names of the Anthropic and OpenAI APIs allow exactly these (and MCP clients copy them).
COMMAND_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_APPROVAL_TIMEOUT_S = 300.0
# Any string argument, whatever the declaration says: argv elements are bounded by the kernel
# (MAX_ARG_STRLEN, 128 KiB) anyway, and an agent has no reason to send more than this.
MAX_VALUE_LENGTH = 4096

_COMMAND_KEYS = frozenset(
    [
        "description",
        "argv",
        "params",
        "mode",
        "writable",
        "timeoutSeconds",
        "outputLimitBytes",
        "approval",
    ]
)
_OVERRIDE_KEYS = frozenset(
    ["description", "mode", "writable", "timeoutSeconds", "outputLimitBytes", "approval"]
)
_PARAM_KEYS: dict[str, frozenset[str]] = {
    "string": frozenset(["type", "description", "default", "enum", "pattern", "maxLength"]),
    "integer": frozenset(["type", "description", "default", "minimum", "maximum"]),
    "boolean": frozenset(["type", "description", "default", "flag"]),
    "path": frozenset(["type", "description", "default"]),
}


class Param(NamedTuple):
    name: str
    type: ParamType
    description: str = ""
    default: str | int | bool | None = None
    """None: the parameter is required."""
    enum: tuple[str, ...] | None = None
    pattern: re.Pattern[str] | None = None
    """Compiled; a value must match it whole (fullmatch)."""
    max_length: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    flag: str | None = None

    @property
    def required(self) -> bool:
        return self.default is None


class Approval(NamedTuple):
    """`kind` for every request; `ask_when`: (parameter, regex) pairs that turn an `auto`
    request into an `ask` one when the parameter's value contains a match (re.search)."""

    kind: ApprovalKind
    ask_when: tuple[tuple[str, re.Pattern[str]], ...] = ()


class Command(NamedTuple):
    name: str
    description: str
    argv: tuple[str, ...]
    """The template as written (for display); `template` is what binding uses."""
    template: tuple[Element, ...]
    params: tuple[Param, ...]
    mode: Mode = "strict"
    writable: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    output_limit: int | None = None
    """Bytes of stdout (and of stderr) kept; None: the bridge's own limit."""
    approval: Approval = Approval("auto")
    origin: Origin = Origin("")

    def param(self, name: str) -> Param | None:
        for param in self.params:
            if param.name == name:
                return param
        return None


class BridgeSettings(NamedTuple):
    commands: tuple[Command, ...]
    approval_timeout_s: float = DEFAULT_APPROVAL_TIMEOUT_S


def load_declarations(host: HostPaths, *, managed_path: str = MANAGED_SETTINGS) -> BridgeSettings:
    """The bridge's commands from every settings file of `host` (see the module rules)."""
    layers = []
    for source in settings_sources(host, managed_path=managed_path):
        data = read_settings(source.path)
        if data is not None and "bridge" in data:
            layers.append((source.path, source.kind == "managed", data["bridge"]))
    return merge_layers(layers)


def merge_layers(layers: Iterable[tuple[str, bool, object]]) -> BridgeSettings:
    """(file, is_managed, the `bridge` value) of each file, lowest first -> the merged result."""
    commands: dict[str, Command] = {}
    timeout = DEFAULT_APPROVAL_TIMEOUT_S
    for file, managed, section in layers:
        table = read_object(section, file, "bridge")
        refuse_unknown(table, frozenset(["commands", "approvalTimeoutSeconds"]), file, "bridge")
        if "approvalTimeoutSeconds" in table:
            key = "bridge.approvalTimeoutSeconds"
            timeout = read_seconds(table["approvalTimeoutSeconds"], file, key)
        declared = read_object(table.get("commands", {}), file, "bridge.commands")
        for name, entry in declared.items():
            key = f"bridge.commands.{name}"
            if not COMMAND_NAME.fullmatch(name):
                raise SettingsError(
                    "a command name is 1 to 64 letters, digits, _ or - (tool names of the "
                    "agent APIs allow nothing else)",
                    file=file,
                    key=key,
                )
            body = read_object(entry, file, key)
            if managed and "argv" not in body:
                if name in commands:
                    commands[name] = _override(commands[name], body, file, key)
                else:
                    refuse_unknown(body, _OVERRIDE_KEYS, file, key)
                continue
            commands[name] = parse_command(name, body, file=file)
    return BridgeSettings(tuple(commands.values()), timeout)


def parse_command(name: str, body: Mapping[str, object], *, file: str) -> Command:
    """One declaration, checked in full (SettingsError otherwise)."""
    key = f"bridge.commands.{name}"
    refuse_unknown(body, _COMMAND_KEYS, file, key)
    if "argv" not in body:
        raise SettingsError("argv is required: the program and its arguments", file=file, key=key)
    argv = read_argv(body["argv"], file, f"{key}.argv")
    template = tuple(read_element(text, file, f"{key}.argv[{i}]") for i, text in enumerate(argv))
    try:
        check_template(template)
    except TemplateError as exc:
        where = f"{key}.argv" if exc.index is None else f"{key}.argv[{exc.index}]"
        raise SettingsError(exc.reason, file=file, key=where) from None
    raw_params = read_object(body.get("params", {}), file, f"{key}.params")
    params = tuple(
        parse_param(pname, value, file=file, key=f"{key}.params.{pname}")
        for pname, value in raw_params.items()
    )
    _check_placeholders(template, params, file, key)
    command = Command(
        name=name,
        description=read_text(body.get("description", ""), file, f"{key}.description", empty=True),
        argv=argv,
        template=template,
        params=params,
        origin=Origin(file, key),
    )
    return _apply_scalars(command, body, file, key)


def _override(command: Command, body: Mapping[str, object], file: str, key: str) -> Command:
    refuse_unknown(body, _OVERRIDE_KEYS, file, key)
    return _apply_scalars(command._replace(origin=Origin(file, key)), body, file, key)


def _apply_scalars(command: Command, body: Mapping[str, object], file: str, key: str) -> Command:
    if "description" in body:
        text = read_text(body["description"], file, f"{key}.description", empty=True)
        command = command._replace(description=text)
    if "mode" in body:
        mode = body["mode"]
        if mode not in MODES:
            raise SettingsError(f"expected one of {', '.join(MODES)}", file=file, key=f"{key}.mode")
        command = command._replace(mode=mode)
    if "writable" in body:
        command = command._replace(writable=read_bool(body["writable"], file, f"{key}.writable"))
    if "timeoutSeconds" in body:
        timeout = read_seconds(body["timeoutSeconds"], file, f"{key}.timeoutSeconds")
        command = command._replace(timeout_s=timeout)
    if "outputLimitBytes" in body:
        limit = read_int(body["outputLimitBytes"], file, f"{key}.outputLimitBytes", minimum=1)
        command = command._replace(output_limit=limit)
    if "approval" in body:
        approval = _approval(body["approval"], command.params, file, f"{key}.approval")
        command = command._replace(approval=approval)
    return command


def parse_param(name: str, body: object, *, file: str, key: str) -> Param:
    from .binding import check_value  # the same checks as requests get

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
        reason = "a parameter name is a letter or _ then letters, digits or _ (64 at most)"
        raise SettingsError(reason, file=file, key=key)
    table = read_object(body, file, key)
    kind = table.get("type")
    if kind not in PARAM_TYPES:
        reason = f"type: expected one of {', '.join(PARAM_TYPES)}, found {kind!r}"
        raise SettingsError(reason, file=file, key=f"{key}.type")
    refuse_unknown(table, _PARAM_KEYS[kind], file, key)
    param = Param(
        name=name,
        type=kind,
        description=read_text(table.get("description", ""), file, f"{key}.description", empty=True),
    )
    if "enum" in table:
        param = param._replace(enum=read_enum(table["enum"], file, f"{key}.enum"))
    if "pattern" in table:
        param = param._replace(pattern=read_regex(table["pattern"], file, f"{key}.pattern"))
    if "maxLength" in table:
        length = read_int(table["maxLength"], file, f"{key}.maxLength", minimum=1)
        param = param._replace(max_length=length)
    if "minimum" in table:
        param = param._replace(minimum=read_int(table["minimum"], file, f"{key}.minimum"))
    if "maximum" in table:
        param = param._replace(maximum=read_int(table["maximum"], file, f"{key}.maximum"))
    if param.minimum is not None and param.maximum is not None and param.minimum > param.maximum:
        raise SettingsError("minimum is above maximum", file=file, key=f"{key}.minimum")
    if "flag" in table:
        flag = read_text(table["flag"], file, f"{key}.flag")
        if not flag.startswith("-") or "{" in flag or "}" in flag:
            reason = "a flag is a fixed option such as --verbose (no placeholders)"
            raise SettingsError(reason, file=file, key=f"{key}.flag")
        param = param._replace(flag=flag)
    if "default" in table:
        default = table["default"]
        problem = check_value(param, default)
        if problem is not None:
            raise SettingsError(f"the default {problem}", file=file, key=f"{key}.default")
        assert isinstance(default, str | int | bool)
        param = param._replace(default=default)
    return param


def _check_placeholders(
    template: tuple[Element, ...], params: tuple[Param, ...], file: str, key: str
) -> None:
    declared = {param.name: param for param in params}
    used: set[str] = set()
    for index, element in enumerate(template):
        for name in placeholders(element):
            param = declared.get(name)
            if param is None:
                reason = f"{{{name}}} names no declared parameter (declared: "
                reason += ", ".join(sorted(declared)) + ")" if declared else "none declared)"
                raise SettingsError(reason, file=file, key=f"{key}.argv[{index}]")
            if param.flag is not None and len(element) != 1:
                reason = f"{{{name}}} has a flag, so it must be a whole argv element"
                raise SettingsError(reason, file=file, key=f"{key}.argv[{index}]")
            used.add(name)
    for name in declared:
        if name not in used:
            reason = "declared but never used in argv: the agent's value would change nothing"
            raise SettingsError(reason, file=file, key=f"{key}.params.{name}")


def _approval(value: object, params: tuple[Param, ...], file: str, key: str) -> Approval:
    if value in APPROVAL_KINDS:
        assert isinstance(value, str)
        return Approval(value)
    if not isinstance(value, dict) or list(value) != ["ask"]:
        reason = 'expected "auto", "ask", "deny" or {"ask": {"<parameter>": "<regex>"}}'
        raise SettingsError(reason, file=file, key=key)
    table = read_object(value["ask"], file, f"{key}.ask")
    if not table:
        raise SettingsError("name at least one parameter", file=file, key=f"{key}.ask")
    names = {param.name for param in params}
    rules = []
    for name, pattern in table.items():
        if name not in names:
            reason = "names no declared parameter of this command"
            raise SettingsError(reason, file=file, key=f"{key}.ask.{name}")
        rules.append((name, read_regex(pattern, file, f"{key}.ask.{name}")))
    return Approval("auto", tuple(rules))

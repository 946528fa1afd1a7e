"""The settings file format as a JSON Schema (draft 2020-12), and a validator for it.

The keys are camelCase and named as in Anthropic's sandbox-runtime `.srt-settings.json` and
Claude Code's `sandbox` settings, so that users can copy theirs.

`validate` implements exactly the keywords `SETTINGS_SCHEMA` uses (type, enum, minimum,
exclusiveMinimum, maximum, minLength, pattern, properties, required, additionalProperties:
false, items, anyOf)
instead of importing the `jsonschema` library, which costs about 100 ms on every `corral run`.
The tests check that `jsonschema` and this validator agree. Two liberties keep it cheap:
- `pattern` is not a regular expression engine (`re` costs 10 ms to import): the validator
  knows the meaning of the one pattern the schema uses, and refuses any other.
- `anyOf` branches must have distinct `type`s; the branch whose type fits the value is
  checked, so its error is the one reported ("expected a string", not "matched no branch").
Beyond the schema, domain entries must parse with `domains.parse_pattern`, and the `audit`
section's addresses, endpoint and headers must pass `audit.check_audit_section`.
"""

from __future__ import annotations

from typing import NamedTuple

from corral.errors import SettingsError

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# A NUL byte cannot be in a path or an environment name; the kernel would cut the string there.
NO_NUL_PATTERN = "^[^\\u0000]*$"
_PATTERNS = {NO_NUL_PATTERN: lambda text: "\0" not in text}

_TEXT: dict[str, object] = {"type": "string", "minLength": 1, "pattern": NO_NUL_PATTERN}
_PORT: dict[str, object] = {"type": "integer", "minimum": 1, "maximum": 65535}


def _list(items: dict[str, object], description: str) -> dict[str, object]:
    return {"type": "array", "items": items, "description": description}


def _section(properties: dict[str, object], description: str) -> dict[str, object]:
    return {
        "type": "object",
        "description": description,
        "properties": properties,
        "additionalProperties": False,
    }


_ALLOWED_PATH: dict[str, object] = {
    "anyOf": [
        {**_TEXT, "description": "A writable path."},
        {
            "type": "object",
            "properties": {"path": _TEXT, "mode": {"enum": ["read", "write"]}},
            "required": ["path", "mode"],
            "additionalProperties": False,
        },
    ]
}

_DOMAIN: dict[str, object] = {
    "type": "string",
    "minLength": 1,
    "description": "example.com, *.example.com (sub-domains only), 127.0.0.1, ::1 or 10.0.0.0/8",
}

_FILESYSTEM = _section(
    {
        "denyRead": _list(_TEXT, "Hidden paths (globs allowed); `~` is home."),
        "allowWrite": _list(_TEXT, "Writable paths; relative ones are taken from the workspace."),
        "denyWrite": _list(_TEXT, "Read-only paths, even inside writable ones."),
        "allowedPaths": _list(_ALLOWED_PATH, "Paths to add, writable or read-only."),
    },
    "What the sandboxed command may read and write. Deny beats allow.",
)

_NETWORK = _section(
    {
        "access": {"enum": ["none", "local", "filtered"]},
        "allowedDomains": _list(_DOMAIN, "Hosts the proxy lets through."),
        "deniedDomains": _list(_DOMAIN, "Hosts the proxy refuses, even when allowed."),
        "allowUnixSockets": _list(_TEXT, "Unix socket paths the sandbox may connect to."),
        "allowLocalBinding": {"type": "boolean"},
        "hostPorts": _list(_PORT, "Host loopback ports reachable from the sandbox."),
        "publishPorts": _list(_PORT, "Sandbox ports reachable from the host."),
        "upstreamProxy": {"type": "string", "minLength": 1},
        "httpProxyPort": _PORT,
        "socksProxyPort": _PORT,
        "unknownDomains": {
            "enum": ["deny", "ask"],
            "description": "Hosts in neither list: refused (deny), or asked about on the"
            " terminal by `corral run` (ask; the Python API's ask callback decides there).",
        },
    },
    "Network access: none, the sandbox's own loopback, or filtered through the proxy.",
)

_ENV = _section(
    {
        "deny": _list(_TEXT, "Variable names (shell globs) to remove."),
        "allow": _list(_TEXT, "Variable names (shell globs) to keep even when denied."),
    },
    "Environment variables passed to the sandboxed command.",
)

# The largest integer every JSON implementation reads exactly (doubles); also far above any
# limit a machine has.
MAX_LIMIT = 2**53
# A week. subprocess waits with poll(), whose millisecond timeout overflows after 24.8 days,
# and a command meant to run for weeks should have no timeout at all.
MAX_TIMEOUT_SECONDS = 604800


def _count(minimum: int, description: str) -> dict[str, object]:
    return {"type": "integer", "minimum": minimum, "maximum": MAX_LIMIT, "description": description}


_LIMITS = _section(
    {
        "timeoutSeconds": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": MAX_TIMEOUT_SECONDS,
            "description": "Wall-clock seconds, after which the whole sandbox is killed.",
        },
        "cpuSeconds": _count(1, "CPU seconds of each process."),
        "memoryBytes": _count(1, "Private writable memory of each process, in bytes."),
        # The sandbox's pid 1 counts, so one process could not even start the command.
        "processes": _count(2, "Processes and threads in the sandbox."),
        "openFiles": _count(1, "Open file descriptors of each process."),
        "fileSizeBytes": _count(1, "The largest file a process may write, in bytes."),
        "outputBytes": _count(1, "Captured stdout and stderr each, in bytes."),
    },
    "Resource limits. The managed file's limits can only be tightened by other files.",
)

_AUDIT = _section(
    {
        "database": {
            **_TEXT,
            "description": "This project's SQLite audit log (absolute or ~/; user, local or"
            " managed file only). Default: $XDG_STATE_HOME/corral/audit.db.",
        },
        "syslog": {
            "type": "object",
            "description": "Also send every event to syslog (user or managed file only).",
            "properties": {
                "address": {
                    **_TEXT,
                    "description": "/dev/log (a unix socket path) or host:port (UDP)",
                },
                "facility": {"enum": ["user", "auth", "daemon", *(f"local{n}" for n in range(8))]},
            },
            "required": ["address"],
            "additionalProperties": False,
        },
        "otlp": {
            "type": "object",
            "description": "Also send every event to an OpenTelemetry collector's OTLP/HTTP"
            " logs receiver (user or managed file only).",
            "properties": {
                "endpoint": {**_TEXT, "description": "http(s)://host:port[/path]"},
                "headers": {
                    "type": "object",
                    "additionalProperties": _TEXT,
                    "description": "HTTP headers sent with every request (a collector token).",
                },
            },
            "required": ["endpoint"],
            "additionalProperties": False,
        },
    },
    "Where the audit log lives and where its records are forwarded (docs/audit.md).",
)

SETTINGS_SCHEMA: dict[str, object] = {
    "$schema": SCHEMA_DIALECT,
    "title": "corral settings",
    "type": "object",
    "properties": {
        "$schema": {"type": "string"},
        "mode": {"enum": ["strict", "standard", "permissive"]},
        "filesystem": _FILESYSTEM,
        "network": _NETWORK,
        "env": _ENV,
        "limits": _LIMITS,
        "audit": _AUDIT,
        "allowUnsandboxedCommands": {"type": "boolean"},
        "ignoreViolations": {
            "type": "object",
            "additionalProperties": _list(_TEXT, "Paths or domains (globs) not to report."),
            "description": "Known-harmless violations, by command ('*' for every command):"
            " still counted in the audit log, not shown.",
        },
        "backend": {
            "enum": ["auto", "bwrap", "landlock"],
            "description": "auto: bubblewrap where user namespaces work, else Landlock-only"
            " (with a notice); bwrap or landlock: that backend or an error",
        },
        "excludedCommands": _list(_TEXT, "Commands run outside the sandbox."),
        "monitor": _section(
            {
                "violations": {
                    "enum": ["off", "writes", "all"],
                    "description": "Record each file access the sandbox refuses, with the"
                    " process and the setting that would allow it: writes (the default: attempts to"
                    " write), all (opens of hidden paths too), off (the error output's"
                    " breadcrumbs only). Costs time on file-heavy work: docs/monitoring.md.",
                },
            },
            "What corral watches inside the sandbox; watching never changes what is allowed.",
        ),
        # Read by `corral serve` and `corral mcp` only (corral.bridge.declarations checks it
        # in full there): `corral run` should not pay for checking what it never uses.
        "bridge": {
            "type": "object",
            "description": "Commands that agents may request through the bridge"
            " (checked by corral serve / corral mcp).",
        },
    },
    "additionalProperties": False,
}

DOMAIN_KEYS = ("allowedDomains", "deniedDomains")


class _Invalid(Exception):
    def __init__(self, reason: str, key: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


class _Where(NamedTuple):
    key: str

    def child(self, name: str) -> _Where:
        return _Where(f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> _Where:
        return _Where(f"{self.key}[{index}]")


def _type_of(value: object) -> str:
    """The JSON type name of a parsed value; 8080.0 counts as an integer, as in JSON Schema."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _show(value: object) -> str:
    """`value` as the user wrote it, shortened, for "found ..." in messages."""
    kind = _type_of(value)
    if kind in ("array", "object"):
        return f"an {kind}"
    if kind == "null":
        return "null"
    if kind == "boolean":
        return "true" if value else "false"
    if kind == "string":
        text = str(value)
        shown = text if len(text) <= 40 else text[:37] + "..."
        return f'the string "{shown}"'
    return f"the number {value}"


_ARTICLE = {"array": "an array", "object": "an object", "integer": "an integer"}


def _expected_type(name: object) -> str:
    return _ARTICLE.get(str(name), f"a {name}")


def _check_type(value: object, schema: dict[str, object], where: _Where) -> None:
    expected = schema["type"]
    actual = _type_of(value)
    if actual != expected and not (expected == "number" and actual == "integer"):
        raise _Invalid(f"expected {_expected_type(expected)}, found {_show(value)}", where.key)


def _check_range(value: float, low: int, high: int, where: _Where) -> None:
    if not low <= value <= high:
        reason = f"expected an integer from {low} to {high}, found {_show(value)}"
        raise _Invalid(reason, where.key)


def _check_above(value: float, low: int, high: int, where: _Where) -> None:
    if not low < value <= high:
        reason = f"expected a number above {low} and at most {high}, found {_show(value)}"
        raise _Invalid(reason, where.key)


def _check_scalar(value: object, schema: dict[str, object], where: _Where) -> None:
    if "enum" in schema:
        options = schema["enum"]
        assert isinstance(options, list)
        if not any(value == option and type(value) is type(option) for option in options):
            shown = ", ".join(f'"{option}"' for option in options)
            raise _Invalid(f"expected one of {shown}; found {_show(value)}", where.key)
    low, high = schema.get("minimum"), schema.get("maximum")
    if isinstance(value, int | float) and isinstance(low, int) and isinstance(high, int):
        _check_range(value, low, high, where)
    above = schema.get("exclusiveMinimum")
    if isinstance(value, int | float) and isinstance(above, int) and isinstance(high, int):
        _check_above(value, above, high, where)
    if isinstance(value, str):
        if len(value) < int(str(schema.get("minLength", 0))):
            raise _Invalid("expected a non-empty string, found an empty one", where.key)
        pattern = schema.get("pattern")
        if pattern is not None and not _PATTERNS[str(pattern)](value):
            raise _Invalid("expected text without NUL characters, found a NUL", where.key)


def _check_object(value: dict[str, object], schema: dict[str, object], where: _Where) -> None:
    properties = schema.get("properties", {})
    assert isinstance(properties, dict)
    unknown = sorted(set(value) - set(properties))
    if unknown and schema.get("additionalProperties") is False:
        expected = ", ".join(sorted(properties))
        reason = f"unknown keys: {', '.join(unknown)}; expected one of: {expected}"
        if len(unknown) == 1:
            reason = reason.replace("unknown keys:", "unknown key:", 1)
        raise _Invalid(reason, where.key)
    required = schema.get("required", [])
    assert isinstance(required, list)
    missing = [name for name in required if name not in value]
    if missing:
        raise _Invalid(f"missing required key: {', '.join(missing)}", where.key)
    extra = schema.get("additionalProperties")
    for name, item in value.items():
        if name in properties:
            _check(item, properties[name], where.child(name))
        elif isinstance(extra, dict):
            _check(item, extra, where.child(name))


def _check_any_of(value: object, branches: list[dict[str, object]], where: _Where) -> None:
    actual = _type_of(value)
    for branch in branches:
        if branch["type"] == actual:
            _check(value, branch, where)
            return
    names = " or ".join(_expected_type(branch["type"]) for branch in branches)
    raise _Invalid(f"expected {names}, found {_show(value)}", where.key)


def _check(value: object, schema: object, where: _Where) -> None:
    assert isinstance(schema, dict)
    if "anyOf" in schema:
        _check_any_of(value, schema["anyOf"], where)
        return
    if "type" in schema:
        _check_type(value, schema, where)
    _check_scalar(value, schema, where)
    if isinstance(value, dict):
        _check_object(value, schema, where)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _check(item, schema["items"], where.item(index))


def _check_domains(data: dict[str, object]) -> None:
    from corral.policy.domains import parse_pattern

    network = data.get("network")
    if not isinstance(network, dict):
        return
    for name in DOMAIN_KEYS:
        for index, entry in enumerate(network.get(name, ())):
            try:
                parse_pattern(entry)
            except ValueError as exc:
                raise _Invalid(str(exc), f"network.{name}[{index}]") from None


def _check_audit(data: dict[str, object]) -> None:
    if "audit" not in data:
        return
    from corral.policy.audit import InvalidAuditSetting, check_audit_section

    try:
        check_audit_section(data["audit"])
    except InvalidAuditSetting as exc:
        raise _Invalid(exc.reason, exc.key) from None


def validate(data: object, *, file: str) -> None:
    """Raise SettingsError naming `file`, the key path, what was expected and what was found."""
    try:
        _check(data, SETTINGS_SCHEMA, _Where(""))
        assert isinstance(data, dict)
        _check_domains(data)
        _check_audit(data)
    except _Invalid as invalid:
        raise SettingsError(invalid.reason, file=file, key=invalid.key) from None


def schema_json() -> str:
    """The schema as indented JSON, for `corral policy schema` and editors."""
    import json

    return json.dumps(SETTINGS_SCHEMA, indent=2) + "\n"

"""The settings schema: a valid 2020-12 schema, and a validator that agrees with jsonschema."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest

from corral.errors import SettingsError
from corral.policy.schema import _PATTERNS, SETTINGS_SCHEMA, schema_json, validate

FULL = {
    "$schema": "./corral-settings.schema.json",
    "mode": "standard",
    "filesystem": {
        "denyRead": ["~/.ssh", "secrets/*.pem"],
        "allowWrite": [".", "/tmp/build"],
        "denyWrite": [".env"],
        "allowedPaths": ["~/.cache/pip", {"path": "/opt/sdk", "mode": "read"}],
    },
    "network": {
        "access": "filtered",
        "allowedDomains": ["example.com", "*.example.org", "10.0.0.0/8", "::1"],
        "deniedDomains": ["evil.example.com"],
        "allowUnixSockets": ["/run/user/1000/bus"],
        "allowLocalBinding": True,
        "hostPorts": [5432],
        "publishPorts": [8000, 65535],
        "upstreamProxy": "http://127.0.0.1:3128",
        "httpProxyPort": 8080,
        "socksProxyPort": 1,
    },
    "env": {"deny": ["*TOKEN*"], "allow": ["GITHUB_TOKEN"]},
    "allowUnsandboxedCommands": False,
    "excludedCommands": ["docker"],
}

GOOD: list[object] = [
    {},
    FULL,
    {"mode": "strict"},
    {"network": {}},
    {"network": {"httpProxyPort": 8080.0}},  # JSON Schema counts 8080.0 as an integer
    {"filesystem": {"allowedPaths": []}},
    {"env": {"deny": ["a\nb"]}},
    {
        "limits": {
            "timeoutSeconds": 0.5,
            "cpuSeconds": 60,
            "memoryBytes": 268435456,
            "processes": 2,
            "openFiles": 64,
            "fileSizeBytes": 1,
            "outputBytes": 1048576,
        }
    },
    {"limits": {"timeoutSeconds": 604800, "processes": 64.0, "memoryBytes": 2**53}},
]

# (data, key path, the start of the reason)
BAD: list[tuple[object, str, str]] = [
    ([], "", "expected an object, found an array"),
    ("x", "", 'expected an object, found the string "x"'),
    (None, "", "expected an object, found null"),
    ({"mode": "fast"}, "mode", 'expected one of "strict", "standard", "permissive"; found'),
    ({"mode": 1}, "mode", "expected one of"),
    ({"zeta": 1, "alpha": 2}, "", "unknown keys: alpha, zeta; expected one of: $schema,"),
    ({"filesystem": {"denyread": []}}, "filesystem", "unknown key: denyread; expected one of:"),
    ({"filesystem": []}, "filesystem", "expected an object, found an array"),
    ({"filesystem": {"denyRead": "~/.ssh"}}, "filesystem.denyRead", "expected an array, found"),
    ({"filesystem": {"allowWrite": [".", 3]}}, "filesystem.allowWrite[1]", "expected a string"),
    ({"filesystem": {"allowWrite": [""]}}, "filesystem.allowWrite[0]", "expected a non-empty"),
    ({"filesystem": {"denyWrite": ["a\0b"]}}, "filesystem.denyWrite[0]", "expected text without"),
    (
        {"filesystem": {"allowedPaths": [True]}},
        "filesystem.allowedPaths[0]",
        "expected a string or an object, found true",
    ),
    (
        {"filesystem": {"allowedPaths": ["a", {"path": "b"}]}},
        "filesystem.allowedPaths[1]",
        "missing required key: mode",
    ),
    (
        {"filesystem": {"allowedPaths": [{"path": "b", "mode": "rw"}]}},
        "filesystem.allowedPaths[0].mode",
        'expected one of "read", "write"; found the string "rw"',
    ),
    (
        {"filesystem": {"allowedPaths": [{"path": "b", "mode": "read", "x": 1}]}},
        "filesystem.allowedPaths[0]",
        "unknown key: x",
    ),
    ({"network": {"access": "full"}}, "network.access", 'expected one of "none", "local"'),
    ({"network": {"allowLocalBinding": "yes"}}, "network.allowLocalBinding", "expected a boolean"),
    ({"network": {"allowLocalBinding": 1}}, "network.allowLocalBinding", "expected a boolean"),
    (
        {"network": {"hostPorts": [0]}},
        "network.hostPorts[0]",
        "expected an integer from 1 to 65535",
    ),
    ({"network": {"publishPorts": [65536]}}, "network.publishPorts[0]", "expected an integer from"),
    (
        {"network": {"httpProxyPort": True}},
        "network.httpProxyPort",
        "expected an integer, found true",
    ),
    ({"network": {"socksProxyPort": 1.5}}, "network.socksProxyPort", "expected an integer, found"),
    ({"network": {"socksProxyPort": "1080"}}, "network.socksProxyPort", "expected an integer"),
    ({"network": {"upstreamProxy": ""}}, "network.upstreamProxy", "expected a non-empty string"),
    ({"network": {"allowedDomains": [""]}}, "network.allowedDomains[0]", "expected a non-empty"),
    ({"network": {"deniedDomains": [1]}}, "network.deniedDomains[0]", "expected a string"),
    ({"env": {"deny": "X"}}, "env.deny", "expected an array"),
    ({"env": {"keep": []}}, "env", "unknown key: keep; expected one of: allow, deny"),
    ({"allowUnsandboxedCommands": "false"}, "allowUnsandboxedCommands", "expected a boolean"),
    ({"excludedCommands": [None]}, "excludedCommands[0]", "expected a string, found null"),
    ({"$schema": 3}, "$schema", "expected a string"),
    (
        {"limits": {"timeoutSeconds": 0}},
        "limits.timeoutSeconds",
        "expected a number above 0 and at most 604800, found the number 0",
    ),
    ({"limits": {"timeoutSeconds": -1.5}}, "limits.timeoutSeconds", "expected a number above 0"),
    ({"limits": {"timeoutSeconds": 1e9}}, "limits.timeoutSeconds", "expected a number above 0"),
    ({"limits": {"timeoutSeconds": "10"}}, "limits.timeoutSeconds", "expected a number, found"),
    ({"limits": {"processes": 1}}, "limits.processes", "expected an integer from 2 to"),
    ({"limits": {"cpuSeconds": 0}}, "limits.cpuSeconds", "expected an integer from 1 to"),
    ({"limits": {"memoryBytes": 2**53 + 1}}, "limits.memoryBytes", "expected an integer from"),
    ({"limits": {"memoryBytes": 1.5}}, "limits.memoryBytes", "expected an integer, found"),
    ({"limits": {"openFiles": "64"}}, "limits.openFiles", "expected an integer, found the"),
    ({"limits": {"fileSizeBytes": True}}, "limits.fileSizeBytes", "expected an integer, found t"),
    ({"limits": {"memory": 1}}, "limits", "unknown key: memory; expected one of: cpuSeconds,"),
    ({"limits": []}, "limits", "expected an object, found an array"),
]

# Domain entries are checked beyond the schema, so jsonschema accepts these.
BAD_DOMAINS: list[tuple[object, str, str]] = [
    ({"network": {"allowedDomains": ["a.com", "*"]}}, "network.allowedDomains[1]", "a lone '*'"),
    ({"network": {"allowedDomains": ["https://a.com"]}}, "network.allowedDomains[0]", "scheme"),
    ({"network": {"deniedDomains": ["a.*.com"]}}, "network.deniedDomains[0]", "first label"),
    ({"network": {"deniedDomains": ["a.com:443"]}}, "network.deniedDomains[0]", "port"),
]


def test_schema_is_a_valid_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SETTINGS_SCHEMA)
    assert SETTINGS_SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_json_round_trips() -> None:
    assert json.loads(schema_json()) == SETTINGS_SCHEMA
    assert schema_json().startswith('{\n  "$schema"')


def _subschemas(schema: object) -> Iterator[dict[str, object]]:
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _subschemas(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _subschemas(value)


def test_schema_uses_only_what_the_validator_implements() -> None:
    known = {"$schema", "title", "description", "type", "enum", "minimum", "maximum"}
    known |= {"minLength", "pattern", "properties", "required", "additionalProperties", "items"}
    known |= {"anyOf", "exclusiveMinimum"}
    for sub in _subschemas(SETTINGS_SCHEMA):
        if "type" in sub or "anyOf" in sub or "enum" in sub:
            assert set(sub) <= known, sorted(set(sub) - known)
        if "pattern" in sub:
            assert sub["pattern"] in _PATTERNS
        if "anyOf" in sub:
            branches = sub["anyOf"]
            assert isinstance(branches, list)
            types = [branch["type"] for branch in branches]
            assert len(set(types)) == len(types), "anyOf branches need distinct types"


@pytest.mark.parametrize("data", GOOD)
def test_good_files_pass_both_validators(data: object) -> None:
    jsonschema.validate(data, SETTINGS_SCHEMA)
    validate(data, file="settings.json")


@pytest.mark.parametrize(("data", "key", "reason"), BAD)
def test_bad_files_fail_both_validators(data: object, key: str, reason: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, SETTINGS_SCHEMA)
    with pytest.raises(SettingsError) as info:
        validate(data, file="settings.json")
    assert info.value.file == "settings.json"
    assert info.value.key == key
    assert info.value.reason.startswith(reason), info.value.reason


@pytest.mark.parametrize(("data", "key", "reason"), BAD_DOMAINS)
def test_bad_domains_are_refused_beyond_the_schema(data: object, key: str, reason: str) -> None:
    jsonschema.validate(data, SETTINGS_SCHEMA)
    with pytest.raises(SettingsError) as info:
        validate(data, file="settings.json")
    assert info.value.key == key
    assert reason in info.value.reason


def test_message_names_file_key_expected_and_found() -> None:
    with pytest.raises(SettingsError) as info:
        validate({"network": {"hostPorts": [22, 70000]}}, file="/w/.corral/settings.json")
    assert str(info.value) == (
        "/w/.corral/settings.json: network.hostPorts[1]: "
        "expected an integer from 1 to 65535, found the number 70000"
    )


def test_long_strings_are_shortened_in_messages() -> None:
    with pytest.raises(SettingsError) as info:
        validate({"mode": "x" * 100}, file="s.json")
    assert '"' + "x" * 37 + '..."' in info.value.reason

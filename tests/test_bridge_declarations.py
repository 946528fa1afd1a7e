"""bridge.commands in the settings: accepted and refused declarations, and the merge of files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corral.bridge.declarations import load_declarations, merge_layers, parse_command
from corral.bridge.templates import parse_element
from corral.errors import SettingsError
from corral.hostpaths import host_paths

FILE = "/etc/corral/test.json"


def _one(body: dict[str, object], name: str = "cmd") -> object:
    return merge_layers([(FILE, False, {"commands": {name: body}})]).commands[0]


ACCEPTED = [
    ("plain", {"argv": ["pytest", "-q"]}),
    (
        "string with constraints",
        {
            "argv": ["make", "deploy", "ENV={env}"],
            "params": {"env": {"type": "string", "enum": ["staging", "prod"]}},
            "approval": {"ask": {"env": "^prod$"}},
        },
    ),
    (
        "path with default",
        {"argv": ["pytest", "{target}"], "params": {"target": {"type": "path", "default": "t"}}},
    ),
    (
        "integer range",
        {
            "argv": ["seq", "{n}"],
            "params": {"n": {"type": "integer", "minimum": 1, "maximum": 9, "default": 3}},
        },
    ),
    (
        "boolean flag",
        {"argv": ["ls", "{all}"], "params": {"all": {"type": "boolean", "flag": "-a"}}},
    ),
    ("escaped braces", {"argv": ["find", ".", "-exec", "ls", "{{}}", ";"]}),
    ("find's plus", {"argv": ["find", ".", "-exec", "ls", "{{}}", "+"]}),
    ("python with a fixed -c", {"argv": ["python3", "-c", "import sys; print(sys.argv)", "x"]}),
    (
        "python code takes the value as an argument",
        {
            "argv": ["python3", "-c", "import sys; print(sys.argv[1])", "{v}"],
            "params": {"v": {"type": "string"}},
        },
    ),
    ("a script run by a shell", {"argv": ["bash", "scripts/check.sh", "-x"]}),
    ("grep alternation", {"argv": ["grep", "-E", "a|b", "f"]}),
    (
        "every key",
        {
            "description": "d",
            "argv": ["true"],
            "mode": "standard",
            "writable": True,
            "timeoutSeconds": 1.5,
            "outputLimitBytes": 100,
            "approval": "ask",
        },
    ),
]


@pytest.mark.parametrize(("name", "body"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted(name: str, body: dict[str, object]) -> None:
    _one(body)


# (id, body, key path expected in the error, words expected in the reason)
REFUSED: list[tuple[str, dict[str, object], str, str]] = [
    ("unknown key", {"argv": ["x"], "shell": True}, "bridge.commands.cmd", "unknown key shell"),
    ("no argv", {"description": "x"}, "bridge.commands.cmd", "argv is required"),
    ("empty argv", {"argv": []}, "bridge.commands.cmd.argv", "non-empty list"),
    ("argv not strings", {"argv": ["ls", 3]}, "bridge.commands.cmd.argv[1]", "string"),
    ("bad mode", {"argv": ["x"], "mode": "yolo"}, "bridge.commands.cmd.mode", "strict"),
    ("writable not bool", {"argv": ["x"], "writable": "yes"}, "cmd.writable", "true or false"),
    ("zero timeout", {"argv": ["x"], "timeoutSeconds": 0}, "cmd.timeoutSeconds", "above 0"),
    ("bool timeout", {"argv": ["x"], "timeoutSeconds": True}, "cmd.timeoutSeconds", "seconds"),
    ("output limit", {"argv": ["x"], "outputLimitBytes": 0}, "cmd.outputLimitBytes", "at least"),
    ("approval word", {"argv": ["x"], "approval": "maybe"}, "cmd.approval", '"auto"'),
    (
        "approval unknown param",
        {"argv": ["x"], "approval": {"ask": {"nope": "x"}}},
        "cmd.approval.ask.nope",
        "no declared parameter",
    ),
    (
        "approval bad regex",
        {
            "argv": ["x", "{a}"],
            "params": {"a": {"type": "string"}},
            "approval": {"ask": {"a": "("}},
        },
        "cmd.approval.ask.a",
        "regular expression",
    ),
    (
        "unknown placeholder",
        {"argv": ["echo", "{who}"]},
        "cmd.argv[1]",
        "{who} names no declared parameter",
    ),
    (
        "unused param",
        {"argv": ["echo"], "params": {"x": {"type": "string"}}},
        "cmd.params.x",
        "never used",
    ),
    ("lone brace", {"argv": ["echo", "a{b"]}, "cmd.argv[1]", "bad placeholder"),
    ("lone closing brace", {"argv": ["echo", "a}b"]}, "cmd.argv[1]", "lone }"),
    (
        "param type",
        {"argv": ["e", "{x}"], "params": {"x": {"type": "float"}}},
        "bridge.commands.cmd.params.x.type",
        "expected one of",
    ),
    (
        "param key of another type",
        {"argv": ["e", "{x}"], "params": {"x": {"type": "integer", "pattern": "a"}}},
        "cmd.params.x",
        "unknown key pattern",
    ),
    (
        "bad pattern",
        {"argv": ["e", "{x}"], "params": {"x": {"type": "string", "pattern": "[a-"}}},
        "cmd.params.x.pattern",
        "regular expression",
    ),
    (
        "min above max",
        {"argv": ["e", "{x}"], "params": {"x": {"type": "integer", "minimum": 5, "maximum": 1}}},
        "cmd.params.x.minimum",
        "above maximum",
    ),
    (
        "default off enum",
        {"argv": ["e", "{x}"], "params": {"x": {"type": "string", "enum": ["a"], "default": "b"}}},
        "cmd.params.x.default",
        "must be one of",
    ),
    (
        "bool default of an integer",
        {"argv": ["e", "{x}"], "params": {"x": {"type": "integer", "default": True}}},
        "cmd.params.x.default",
        "must be an integer",
    ),
    (
        "flag inside an element",
        {"argv": ["e", "--x={x}"], "params": {"x": {"type": "boolean", "flag": "-x"}}},
        "cmd.argv[1]",
        "whole argv element",
    ),
    ("bad command name", {"argv": ["x"]}, "bridge.commands.a b", "1 to 64"),
    ("NUL in argv", {"argv": ["echo", "a\0b"]}, "cmd.argv[1]", "NUL"),
]


@pytest.mark.parametrize(("case", "body", "key", "words"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused(case: str, body: dict[str, object], key: str, words: str) -> None:
    name = "a b" if case == "bad command name" else "cmd"
    with pytest.raises(SettingsError) as caught:
        _one(body, name)
    assert caught.value.file == FILE
    assert key in caught.value.key
    assert words in caught.value.reason


NEEDS_A_SHELL: list[tuple[str, list[str], str]] = [
    ("sh -c", ["sh", "-c", "make && make install"], "shell code"),
    ("bash -c", ["/bin/bash", "-c", "ls"], "shell code"),
    ("bash -ec", ["bash", "-ec", "ls"], "shell code"),
    ("bash -lc after -o", ["bash", "-o", "pipefail", "-lc", "ls"], "shell code"),
    ("dash", ["dash", "-c", "ls"], "shell code"),
    ("zsh", ["zsh", "-c", "ls"], "shell code"),
    ("fish --command", ["fish", "--command", "ls"], "shell code"),
    ("ksh", ["ksh", "-c", "ls"], "shell code"),
    ("busybox sh", ["busybox", "sh", "-c", "ls"], "shell code"),
    ("env sh", ["env", "FOO=1", "sh", "-c", "ls"], "shell code"),
    ("env -S", ["env", "-S", "ls -l"], "splits a string"),
    ("xargs sh", ["xargs", "sh", "-c", "ls"], "shell code"),
    ("find -exec sh", ["find", ".", "-exec", "sh", "-c", "ls {{}}", ";"], "shell code"),
    ("pipe", ["ls", "|", "wc"], "shell syntax"),
    ("and", ["make", "&&", "make", "install"], "shell syntax"),
    ("semicolon", ["make", ";", "ls"], "shell syntax"),
    ("background", ["make", "&"], "shell syntax"),
    ("redirect", ["ls", ">", "out.txt"], "redirection"),
    ("redirect attached", ["ls", ">out.txt"], "redirection"),
    ("stderr to stdout", ["make", "2>&1"], "redirection"),
    ("input", ["wc", "<", "f"], "redirection"),
    ("command substitution", ["echo", "$(date)"], "expects a shell"),
    ("backticks", ["echo", "`date`"], "expects a shell"),
    ("variable", ["ls", "$HOME/x"], "expects a shell"),
    ("braced variable", ["ls", "${HOME}"], "expects a shell"),
    ("joined commands", ["echo", "a && b"], "expects a shell"),
    ("tilde", ["ls", "~/x"], "no shell expands ~"),
    ("python -c with a value", ["python3", "-c", "print('{v}')"], "code injection"),
    ("perl -e with a value", ["perl", "-e", "print '{v}'"], "code injection"),
    ("node -e with a value", ["node", "-e", "{v}"], "code injection"),
    ("awk program with a value", ["awk", "/{v}/"], "awk's program"),
    ("sed -e with a value", ["sed", "-e", "s/{v}/x/", "f"], "sed's program"),
    ("program is a parameter", ["{v}"], "argv[0] must be a fixed program"),
    ("env runs a parameter", ["env", "A=1", "{v}"], "must be fixed"),
    ("shell options from a parameter", ["bash", "-{v}", "x.sh"], "options cannot come"),
]


@pytest.mark.parametrize(
    ("case", "argv", "words"), NEEDS_A_SHELL, ids=[n[0] for n in NEEDS_A_SHELL]
)
def test_templates_that_need_a_shell_are_refused(case: str, argv: list[str], words: str) -> None:
    params = {"v": {"type": "string"}} if any("{v}" in a for a in argv) else {}
    with pytest.raises(SettingsError) as caught:
        parse_command("cmd", {"argv": argv, "params": params}, file=FILE)
    assert words in caught.value.reason
    assert caught.value.key.startswith("bridge.commands.cmd.argv")


def test_parse_element_pieces() -> None:
    parts = parse_element("ENV={env}:{{x}}")
    assert [(p.kind, p.value) for p in parts] == [
        ("text", "ENV="),
        ("param", "env"),
        ("text", ":{x}"),
    ]


def test_unknown_top_level_key() -> None:
    with pytest.raises(SettingsError) as caught:
        merge_layers([(FILE, False, {"commandz": {}})])
    assert caught.value.key == "bridge"
    assert "commandz" in caught.value.reason


def _write(path: str, data: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def test_files_merge_later_replaces_and_managed_overrides(tmp_path: Path) -> None:
    home = tmp_path / "home"
    workspace = home / "project"
    workspace.mkdir(parents=True)
    host = host_paths(str(workspace), {"HOME": str(home)})
    managed = str(tmp_path / "managed.json")
    echo = {"argv": ["echo", "user"], "description": "from user"}
    _write(host.user_settings_file, {"bridge": {"commands": {"echo": echo, "keep": echo}}})
    project = {
        "bridge": {
            "approvalTimeoutSeconds": 10,
            "commands": {
                "echo": {"argv": ["echo", "project"]},
                "deploy": {
                    "argv": ["make", "ENV={env}"],
                    "params": {"env": {"type": "string", "enum": ["a", "prod"]}},
                },
            },
        }
    }
    _write(f"{host.project_settings_dir}/settings.json", project)
    _write(
        managed,
        {
            "bridge": {
                "approvalTimeoutSeconds": 60,
                "commands": {
                    "deploy": {"approval": "deny"},
                    "absent": {"approval": "deny"},
                },
            }
        },
    )
    settings = load_declarations(host, managed_path=managed)
    by_name = {c.name: c for c in settings.commands}
    assert sorted(by_name) == ["deploy", "echo", "keep"]
    assert by_name["echo"].argv == ("echo", "project")
    assert by_name["echo"].description == ""  # replaced whole, not merged
    assert by_name["keep"].description == "from user"
    assert by_name["deploy"].approval.kind == "deny"
    assert by_name["deploy"].origin.source == managed
    assert settings.approval_timeout_s == 60


def test_a_broken_file_names_itself(tmp_path: Path) -> None:
    home = tmp_path / "home"
    workspace = home / "project"
    workspace.mkdir(parents=True)
    host = host_paths(str(workspace), {"HOME": str(home)})
    local = f"{host.project_settings_dir}/settings.local.json"
    _write(local, {"bridge": {"commands": {"t": {"argv": ["x"], "params": {"p": 1}}}}})
    with pytest.raises(SettingsError) as caught:
        load_declarations(host, managed_path=str(tmp_path / "none.json"))
    assert caught.value.file == local
    assert caught.value.key == "bridge.commands.t.params.p"
    assert local in str(caught.value)


def test_managed_override_cannot_carry_unknown_keys() -> None:
    layers = [
        ("/u.json", False, {"commands": {"t": {"argv": ["true"]}}}),
        ("/m.json", True, {"commands": {"t": {"approval": "deny", "params": {}}}}),
    ]
    with pytest.raises(SettingsError) as caught:
        merge_layers(layers)
    assert caught.value.file == "/m.json"
    assert "unknown key params" in caught.value.reason

"""The public API and the docs: __all__ is what it says, every command is documented."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import corral
from corral.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_names_resolve() -> None:
    for name in corral.__all__:
        assert getattr(corral, name) is not None, name


def test_all_is_sorted_and_matches_the_lazy_table() -> None:
    assert corral.__all__ == sorted(corral.__all__)
    assert set(corral.__all__) == set(corral._WHERE)


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError):
        _ = corral.NoSuchThing


def _commands() -> list[str]:
    parser = build_parser()
    names = []
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():  # type: ignore[union-attr]
            names.append(name)
            for sub_action in sub._actions:
                if sub_action.choices and isinstance(sub_action.choices, dict):
                    names += [f"{name} {child}" for child in sub_action.choices]
    return names


def test_every_command_is_in_the_readme_and_has_help() -> None:
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for command in _commands():
        assert f"corral {command}" in readme, f"README does not mention `corral {command}`"
        done = subprocess.run(
            [sys.executable, "-m", "corral", *command.split(), "--help"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and "usage:" in done.stdout, command


def test_import_corral_stays_lean() -> None:
    code = "import sys, corral; print(sorted(m for m in sys.modules if m.startswith('corral')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['corral']"


def test_the_run_parser_imports_nothing_of_the_bridge() -> None:
    code = (
        "import sys; from corral.cli import build_parser; build_parser(only='run');"
        "print([m for m in sys.modules if m.startswith(('corral.bridge', 'fastapi', 'mcp'))])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

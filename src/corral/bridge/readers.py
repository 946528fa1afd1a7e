"""Typed readers of settings values for the bridge's declarations: each names the file and
the key path in its SettingsError, and says what was expected and what was found."""

from __future__ import annotations

import re
from collections.abc import Mapping

from corral.errors import SettingsError

from .templates import Element, parse_element

MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: anything longer is a typo, not a build


def describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return repr(value)


def read_object(value: object, file: str, key: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise SettingsError(f"expected an object, found {describe(value)}", file=file, key=key)
    return value


def refuse_unknown(table: Mapping[str, object], known: frozenset[str], file: str, key: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise SettingsError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
            f" (known: {', '.join(sorted(known))})",
            file=file,
            key=key,
        )


def read_text(value: object, file: str, key: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        expected = "a string" if empty else "a non-empty string"
        raise SettingsError(f"expected {expected}, found {describe(value)}", file=file, key=key)
    if "\0" in value:
        raise SettingsError("contains a NUL byte", file=file, key=key)
    return value


def read_bool(value: object, file: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"expected true or false, found {describe(value)}", file=file, key=key)
    return value


def read_int(value: object, file: str, key: str, *, minimum: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON 64.0
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingsError(f"expected an integer, found {describe(value)}", file=file, key=key)
    if minimum is not None and value < minimum:
        raise SettingsError(f"must be at least {minimum}", file=file, key=key)
    return value


def read_seconds(value: object, file: str, key: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SettingsError(f"expected seconds, found {describe(value)}", file=file, key=key)
    if not 0 < value <= MAX_TIMEOUT_S:
        raise SettingsError(f"must be above 0 and at most {MAX_TIMEOUT_S:g}", file=file, key=key)
    return float(value)


def read_argv(value: object, file: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        reason = f"expected a non-empty list of strings, found {describe(value)}"
        raise SettingsError(reason, file=file, key=key)
    return tuple(read_text(item, file, f"{key}[{i}]", empty=True) for i, item in enumerate(value))


def read_element(text: str, file: str, key: str) -> Element:
    try:
        return parse_element(text)
    except ValueError as exc:
        raise SettingsError(str(exc), file=file, key=key) from None


def read_enum(value: object, file: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        reason = f"expected a non-empty list of strings, found {describe(value)}"
        raise SettingsError(reason, file=file, key=key)
    items = tuple(read_text(item, file, f"{key}[{i}]", empty=True) for i, item in enumerate(value))
    if len(set(items)) != len(items):
        raise SettingsError("lists a value twice", file=file, key=key)
    return items


def read_regex(value: object, file: str, key: str) -> re.Pattern[str]:
    text = read_text(value, file, key)
    try:
        return re.compile(text)
    except re.error as exc:
        raise SettingsError(f"not a valid regular expression: {exc}", file=file, key=key) from None

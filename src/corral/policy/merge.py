"""Merging settings layers into a policy: the lists, the scalars, the mode and the limits.

corral.policy.settings reads the files and calls these in `load_policy`; the merge rules
(numbered there) are implemented here. Pure: no file is read here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from corral.errors import SettingsError, UsageError
from corral.policy.model import (
    CLI,
    LIMIT_KEYS,
    MODES,
    HostPaths,
    IgnoreRule,
    Limits,
    Mode,
    Origin,
    Policy,
    Rule,
)
from corral.policy.paths import normalize

if TYPE_CHECKING:
    from corral.policy.settings import SettingsSource

DEFAULT_MODE: Mode = "standard"


class Layer(NamedTuple):
    """One settings file that exists: where it is, and its validated contents."""

    source: SettingsSource
    data: dict[str, object]


# Settings key -> (policy list, how entries are read). Order is the order of `policy show`.
_LISTS: dict[str, tuple[str, Literal["path", "domain", "text", "port"]]] = {
    "filesystem.denyRead": ("deny_read", "path"),
    "filesystem.allowWrite": ("write", "path"),
    "filesystem.denyWrite": ("deny_write", "path"),
    "network.allowedDomains": ("allowed_domains", "domain"),
    "network.deniedDomains": ("denied_domains", "domain"),
    "network.allowUnixSockets": ("allow_unix_sockets", "path"),
    "network.hostPorts": ("host_ports", "port"),
    "network.publishPorts": ("publish_ports", "port"),
    "env.deny": ("env_deny", "text"),
    "env.allow": ("env_allow", "text"),
    "excludedCommands": ("excluded_commands", "text"),
}
ALLOWED_PATHS = "filesystem.allowedPaths"

# Settings keys whose managed value is the whole allow-list -> the policy lists it replaces.
MANAGED_ALLOW_LISTS: dict[str, tuple[str, ...]] = {
    "filesystem.allowWrite": ("write", "read"),
    ALLOWED_PATHS: ("write", "read"),
    "network.allowedDomains": ("allowed_domains",),
    "network.allowUnixSockets": ("allow_unix_sockets",),
    "network.hostPorts": ("host_ports",),
    "network.publishPorts": ("publish_ports",),
    "env.allow": ("env_allow",),
    "excludedCommands": ("excluded_commands",),
}

# Settings key -> (policy section, field). A section of "" is the Policy itself.
_SCALARS: dict[str, tuple[str, str]] = {
    "network.access": ("network", "access"),
    "network.allowLocalBinding": ("network", "allow_local_binding"),
    "network.upstreamProxy": ("network", "upstream_proxy"),
    "network.unknownDomains": ("network", "unknown_domains"),
    "network.httpProxyPort": ("network", "http_proxy_port"),
    "network.socksProxyPort": ("network", "socks_proxy_port"),
    "allowUnsandboxedCommands": ("", "allow_unsandboxed_commands"),
    "backend": ("", "backend"),
    "monitor.violations": ("", "monitor_violations"),
}

Lists = dict[str, list[Rule]]
# Scalar values by policy section. Any, because their types were checked against the schema.
Changes = dict[str, dict[str, Any]]


def _get(data: dict[str, object], key: str) -> object:
    """The value at dotted `key`, or None when it is not set (null is not valid anywhere)."""
    value: object = data
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _path(text: str, host: HostPaths, origin: Origin) -> str:
    if text.startswith("~") and text != "~" and not text.startswith("~/"):
        reason = f'"{text}": only ~ and ~/ are expanded; write the full path'
        raise SettingsError(reason, file=origin.source, key=origin.key)
    return normalize(text, home=host.home, base=host.workspace)


def _entry(text: object, kind: str, host: HostPaths, origin: Origin) -> Rule:
    from corral.policy.domains import parse_pattern

    if kind == "path":
        return Rule(_path(str(text), host, origin), origin)
    if kind == "domain":
        return Rule(str(parse_pattern(str(text))), origin)  # validated already
    if kind == "port" and isinstance(text, int | float):
        return Rule(str(int(text)), origin)  # JSON Schema lets 8080.0 through as an integer
    return Rule(str(text), origin)


def _layer_lists(layer: Layer, host: HostPaths) -> Lists:
    """The list entries one settings file contributes, keyed by policy list."""
    lists: Lists = {}
    for key, (target, kind) in _LISTS.items():
        values = _get(layer.data, key)
        for index, value in enumerate(values if isinstance(values, list) else ()):
            origin = Origin(layer.source.path, f"{key}[{index}]")
            lists.setdefault(target, []).append(_entry(value, kind, host, origin))
    paths = _get(layer.data, ALLOWED_PATHS)
    for index, value in enumerate(paths if isinstance(paths, list) else ()):
        origin = Origin(layer.source.path, f"{ALLOWED_PATHS}[{index}]")
        text, mode = (value["path"], value["mode"]) if isinstance(value, dict) else (value, "write")
        target = "read" if mode == "read" else "write"
        lists.setdefault(target, []).append(Rule(_path(str(text), host, origin), origin))
    return lists


def merge_lists(layers: Sequence[Layer], cli_domains: Sequence[str], host: HostPaths) -> Lists:
    from corral.policy.domains import parse_pattern

    merged: Lists = {}
    managed: Lists = {}
    for layer in layers:
        target = managed if layer.source.kind == "managed" else merged
        for name, rules in _layer_lists(layer, host).items():
            target.setdefault(name, []).extend(rules)
    for text in cli_domains:
        try:
            pattern = parse_pattern(text)
        except ValueError as exc:
            raise UsageError(f'allowed domain "{text}": {exc}') from None
        merged.setdefault("allowed_domains", []).append(Rule(str(pattern), Origin(CLI)))
    for layer in layers:
        if layer.source.kind != "managed":
            continue
        for key, names in MANAGED_ALLOW_LISTS.items():
            if _get(layer.data, key) is not None:
                for name in names:
                    merged.pop(name, None)  # rule 4: the managed list is the whole allow-list
    for name, rules in managed.items():
        merged.setdefault(name, []).extend(rules)
    return merged


def choose_mode(
    layers: Sequence[Layer], cli_mode: Mode | None
) -> tuple[Mode, list[tuple[str, Origin]]]:
    """Rule 1: the mode and the origins of every setting of it, in order of application."""

    def setting(layer: Layer) -> tuple[object, Origin]:
        return layer.data.get("mode"), Origin(layer.source.path, "mode")

    lower = [setting(layer) for layer in layers if layer.source.kind != "managed"]
    managed = [setting(layer) for layer in layers if layer.source.kind == "managed"]
    chosen: Mode = DEFAULT_MODE
    origins: list[tuple[str, Origin]] = []
    for value, origin in [*lower, (cli_mode, Origin(CLI)), *managed]:
        for name in MODES:
            if value == name:
                chosen = name
                origins.append(("mode", origin))
    return chosen, origins


def scalar_changes(
    layers: Sequence[Layer],
) -> tuple[Changes, list[tuple[str, Origin]]]:
    """Rule 2 and 4: scalar values by policy section (managed applied last), and their origins."""
    changes: Changes = {"network": {}, "": {}}
    origins: list[tuple[str, Origin]] = []
    ordered = sorted(layers, key=lambda layer: layer.source.kind == "managed")  # stable
    for layer in ordered:
        for key, (section, field) in _SCALARS.items():
            value = _get(layer.data, key)
            if value is None:
                continue
            if isinstance(value, float):
                value = int(value)  # a port written as 8080.0
            changes[section][field] = value
            origins.append((key, Origin(layer.source.path, key)))
    return changes, origins


def _limit_value(value: object, field: str) -> float | int:
    assert isinstance(value, int | float)
    # JSON Schema lets 64.0 through as an integer; only the timeout is a real number.
    return float(value) if field == "timeout_seconds" else int(value)


def merge_limits(base: Limits, layers: Sequence[Layer]) -> tuple[Limits, list[tuple[str, Origin]]]:
    """Rule 9: the limits, and the origin of each value a file set that is in force."""
    values: dict[str, Any] = base._asdict()
    origins: list[tuple[str, Origin]] = []
    for key, field in LIMIT_KEYS:
        path = f"limits.{key}"
        lower: tuple[float | int, Origin] | None = None
        managed: tuple[float | int, Origin] | None = None
        for layer in layers:
            value = _get(layer.data, path)
            if value is None:
                continue
            found = (_limit_value(value, field), Origin(layer.source.path, path))
            if layer.source.kind == "managed":
                managed = found
            else:
                lower = found
                origins.append((path, found[1]))
        if managed is not None and (lower is None or managed[0] <= lower[0]):
            lower = managed
            origins.append((path, managed[1]))
        if lower is not None:
            values[field] = lower[0]
    return Limits(**values), origins


def _rules(lists: Lists, name: str) -> tuple[Rule, ...]:
    return tuple(lists.get(name, ()))


def build_policy(base: Policy, lists: Lists, changes: Changes) -> Policy:
    fs = base.filesystem
    filesystem = fs._replace(
        read=fs.read + _rules(lists, "read"),
        write=fs.write + _rules(lists, "write"),
        deny_read=fs.deny_read + _rules(lists, "deny_read"),
        deny_write=fs.deny_write + _rules(lists, "deny_write"),
    )
    net = base.network
    network = net._replace(
        allowed_domains=net.allowed_domains + _rules(lists, "allowed_domains"),
        denied_domains=net.denied_domains + _rules(lists, "denied_domains"),
        allow_unix_sockets=net.allow_unix_sockets + _rules(lists, "allow_unix_sockets"),
        host_ports=net.host_ports + tuple(int(r.value) for r in _rules(lists, "host_ports")),
        publish_ports=net.publish_ports
        + tuple(int(r.value) for r in _rules(lists, "publish_ports")),
        **changes["network"],
    )
    env = base.env._replace(
        deny=base.env.deny + _rules(lists, "env_deny"),
        allow=base.env.allow + _rules(lists, "env_allow"),
    )
    return base._replace(
        filesystem=filesystem,
        network=network,
        env=env,
        excluded_commands=base.excluded_commands + _rules(lists, "excluded_commands"),
        **changes[""],
    )


def port_origins(lists: Lists) -> list[tuple[str, Origin]]:
    # Ports are plain ints in the model, so their origins go with the scalars'.
    return [
        (f"network.{key}", rule.origin)
        for name, key in (("host_ports", "hostPorts"), ("publish_ports", "publishPorts"))
        for rule in lists.get(name, ())
    ]


def ignore_rules(layers: Sequence[Layer]) -> tuple[IgnoreRule, ...]:
    """ignoreViolations entries of every file, combined (they only ever quiet reports)."""
    rules = []
    for layer in layers:
        table = layer.data.get("ignoreViolations")
        if not isinstance(table, dict):
            continue
        for command, patterns in table.items():
            for index, pattern in enumerate(patterns if isinstance(patterns, list) else ()):
                origin = Origin(layer.source.path, f"ignoreViolations.{command}[{index}]")
                rules.append(IgnoreRule(str(command), str(pattern), origin))
    return tuple(rules)

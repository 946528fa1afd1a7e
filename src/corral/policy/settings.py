"""Settings files, read and merged into one `Policy`.

Files, lowest first (`settings_sources`):
    user     $XDG_CONFIG_HOME/corral/settings.json
    project  <workspace>/.corral/settings.json
    local    <workspace>/.corral/settings.local.json    (not meant to be committed)
    managed  /etc/corral/managed-settings.json           (the administrator's)

Merge rules:
1. The mode is the last one set by: user < project < local < the CLI's `--mode` < managed.
   Its preset (`presets.preset_policy`) is the starting point.
2. Scalars: a later file replaces an earlier one, and `network.access` replaces the preset's.
   `Policy.origins` records (key, Origin) for every scalar a file sets, in order of application,
   so `Policy.origin_of` names the winner.
3. Lists combine; every entry keeps `Origin(file, "filesystem.denyRead[3]")`. Deny and allow
   lists are both kept: deny beats allow, and the backends enforce that.
4. The managed file cannot be loosened. Its scalars (and its mode) win over everything,
   including the CLI. When it defines an allow-list, the entries that the lower files and the
   CLI gave that list are dropped: the managed list is the complete allow-list on top of the
   preset. `allowWrite` and `allowedPaths` count as one list (both grant access, so dropping
   only one would leave a way round). `hostPorts` and `publishPorts` count as allow-lists too.
   Its deny lists add to the others'.
5. CLI `allow_domains` add to `allowedDomains` with `Origin(CLI)`.
6. Paths: `~` and `~/x` expand to the home directory, relative paths are taken from the
   workspace, `..` collapses (`paths.normalize`). `allowedPaths` strings are writable,
   `{"mode": "read"}` entries are added to the readable roots.
7. Domains are stored normalised (`domains.parse_pattern`), so `policy show` and the proxy see
   the one spelling that is matched.
8. Nothing can be removed from the preset: no key removes, so the mandatory deny-write list stays.
9. Limits (`limits.*`) are scalars too, later file wins over the preset, but the managed file
   can only be tightened: a lower file's value stands only where it is below the managed one.
   (The managed file itself may loosen a preset's limit; it is the administrator's.)
10. `audit.*` has rules of its own (who may set which key, where the log may be): audit.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

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
from corral.policy.presets import preset_policy
from corral.policy.schema import validate

SourceKind = Literal["user", "project", "local", "managed"]
MANAGED_SETTINGS = "/etc/corral/managed-settings.json"
DEFAULT_MODE: Mode = "standard"


class SettingsSource(NamedTuple):
    kind: SourceKind
    path: str


class _Layer(NamedTuple):
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

_Lists = dict[str, list[Rule]]
# Scalar values by policy section. Any, because their types were checked against the schema.
_Changes = dict[str, dict[str, Any]]


def settings_sources(
    host: HostPaths, *, managed_path: str = MANAGED_SETTINGS
) -> tuple[SettingsSource, ...]:
    """The settings files in merge order, lowest first, whether they exist or not."""
    return (
        SettingsSource("user", host.user_settings_file),
        SettingsSource("project", f"{host.project_settings_dir}/settings.json"),
        SettingsSource("local", f"{host.project_settings_dir}/settings.local.json"),
        SettingsSource("managed", managed_path),
    )


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json keeps the last of two equal keys silently; in a security policy that hides a rule.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_json(text: str, path: str) -> object:
    import json  # 10 ms; only paid when a settings file exists

    try:
        return json.loads(
            text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
        )
    except json.JSONDecodeError as exc:
        reason = f"invalid JSON: {exc.msg}"
        raise SettingsError(reason, file=path, line=exc.lineno, column=exc.colno) from None
    except _DuplicateKey as exc:
        raise SettingsError(f'duplicate key "{exc.args[0]}"', file=path) from None
    except ValueError as exc:
        raise SettingsError(f"invalid JSON: {exc}", file=path) from None


def read_settings(path: str) -> dict[str, object] | None:
    """The validated contents of one settings file; None when there is no such file."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"not UTF-8 text ({exc.reason})", file=path) from None
    except OSError as exc:
        raise SettingsError(f"cannot read the file: {exc.strerror}", file=path) from None
    data = _parse_json(text, path)
    validate(data, file=path)  # refuses a top level that is not an object, too
    assert isinstance(data, dict)
    return data


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


def _layer_lists(layer: _Layer, host: HostPaths) -> _Lists:
    """The list entries one settings file contributes, keyed by policy list."""
    lists: _Lists = {}
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


def _merge_lists(layers: Sequence[_Layer], cli_domains: Sequence[str], host: HostPaths) -> _Lists:
    from corral.policy.domains import parse_pattern

    merged: _Lists = {}
    managed: _Lists = {}
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


def _choose_mode(
    layers: Sequence[_Layer], cli_mode: Mode | None
) -> tuple[Mode, list[tuple[str, Origin]]]:
    """Rule 1: the mode and the origins of every setting of it, in order of application."""

    def setting(layer: _Layer) -> tuple[object, Origin]:
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


def _scalar_changes(
    layers: Sequence[_Layer],
) -> tuple[_Changes, list[tuple[str, Origin]]]:
    """Rule 2 and 4: scalar values by policy section (managed applied last), and their origins."""
    changes: _Changes = {"network": {}, "": {}}
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


def _merge_limits(
    base: Limits, layers: Sequence[_Layer]
) -> tuple[Limits, list[tuple[str, Origin]]]:
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


def _rules(lists: _Lists, name: str) -> tuple[Rule, ...]:
    return tuple(lists.get(name, ()))


def _build(base: Policy, lists: _Lists, changes: _Changes) -> Policy:
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


def _port_origins(lists: _Lists) -> list[tuple[str, Origin]]:
    # Ports are plain ints in the model, so their origins go with the scalars'.
    return [
        (f"network.{key}", rule.origin)
        for name, key in (("host_ports", "hostPorts"), ("publish_ports", "publishPorts"))
        for rule in lists.get(name, ())
    ]


# Keys that let commands run outside the sandbox. A repository is untrusted input: a cloned
# project must not be able to ship a settings file that turns the sandbox off.
USER_ONLY_KEYS = ("allowUnsandboxedCommands", "excludedCommands")


def _refuse_escape_hatches(source: SettingsSource, data: dict[str, object]) -> None:
    if source.kind not in ("project", "local"):
        return
    for key in USER_ONLY_KEYS:
        if key in data:
            raise SettingsError(
                "only your user settings or the managed settings may let commands run "
                "outside the sandbox; a project file cannot",
                file=source.path,
                key=key,
                hint="move it to ~/.config/corral/settings.json if you mean it",
            )


def load_policy(
    host: HostPaths,
    *,
    mode: Mode | None = None,
    allow_domains: Sequence[str] = (),
    managed_path: str = MANAGED_SETTINGS,
) -> Policy:
    """The policy for `host`: the preset of the chosen mode with every settings file merged in.

    `mode` and `allow_domains` come from the command line. Raises SettingsError for a broken
    file and UsageError for a domain on the command line that does not parse.
    """
    layers = []
    for source in settings_sources(host, managed_path=managed_path):
        data = read_settings(source.path)
        if data is not None:
            _refuse_escape_hatches(source, data)
            layers.append(_Layer(source, data))
    chosen, mode_origins = _choose_mode(layers, mode)
    base = preset_policy(chosen, host)
    lists = _merge_lists(layers, allow_domains, host)
    changes, scalar_origins = _scalar_changes(layers)
    limits, limit_origins = _merge_limits(base.limits, layers)
    policy = _build(base, lists, changes)
    origins = (*base.origins, *mode_origins, *scalar_origins, *_port_origins(lists))
    policy = policy._replace(
        origins=(*origins, *limit_origins),
        limits=limits,
        ignore_violations=_ignore_rules(layers),
    )
    audited = any("audit" in layer.data for layer in layers)
    return _with_audit(policy, layers) if audited else policy


def _with_audit(policy: Policy, layers: Sequence[_Layer]) -> Policy:
    """Rule 10. policy/audit.py is imported only when a file has an `audit` section, which
    most runs do not have."""
    from corral.policy.audit import (
        check_audit_database,
        hidden_audit_paths,
        merge_audit,
        refuse_misplaced_audit_keys,
    )

    for layer in layers:
        refuse_misplaced_audit_keys(layer.source, layer.data)
    audit, origins = merge_audit(layers, policy.host)
    policy = policy._replace(origins=(*policy.origins, *origins), audit=audit)
    check_audit_database(policy)
    fs = policy.filesystem
    return policy._replace(
        filesystem=fs._replace(deny_read=fs.deny_read + hidden_audit_paths(policy))
    )


def _ignore_rules(layers: Sequence[_Layer]) -> tuple[IgnoreRule, ...]:
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

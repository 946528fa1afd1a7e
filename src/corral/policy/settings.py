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
from typing import Literal, NamedTuple

from corral.errors import SettingsError
from corral.policy.merge import (
    Layer,
    build_policy,
    choose_mode,
    ignore_rules,
    merge_limits,
    merge_lists,
    port_origins,
    scalar_changes,
)
from corral.policy.model import HostPaths, Mode, Policy
from corral.policy.presets import preset_policy
from corral.policy.schema import validate

SourceKind = Literal["user", "project", "local", "managed"]
MANAGED_SETTINGS = "/etc/corral/managed-settings.json"


class SettingsSource(NamedTuple):
    kind: SourceKind
    path: str


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
            layers.append(Layer(source, data))
    chosen, mode_origins = choose_mode(layers, mode)
    base = preset_policy(chosen, host)
    lists = merge_lists(layers, allow_domains, host)
    changes, scalar_origins = scalar_changes(layers)
    limits, limit_origins = merge_limits(base.limits, layers)
    policy = build_policy(base, lists, changes)
    origins = (*base.origins, *mode_origins, *scalar_origins, *port_origins(lists))
    policy = policy._replace(
        origins=(*origins, *limit_origins),
        limits=limits,
        ignore_violations=ignore_rules(layers),
    )
    audited = any("audit" in layer.data for layer in layers)
    return _with_audit(policy, layers) if audited else policy


def _with_audit(policy: Policy, layers: Sequence[Layer]) -> Policy:
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

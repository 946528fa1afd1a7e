"""The `audit` settings section: where this project's log lives and where records are forwarded.

    "audit": {
      "database": "~/.local/state/corral/projects/web.db",
      "syslog": {"address": "/dev/log", "facility": "local3"},
      "otlp": {"endpoint": "https://collector.example:4318", "headers": {"Authorization": "..."}}
    }

Rules:
1. Who may set what (`refuse_misplaced_audit_keys`). A repository is untrusted input:
   - `audit.syslog` and `audit.otlp` only in the user or managed file: a cloned project must
     not send your audit trail to a host it names;
   - `audit.database` in the user, local (this checkout's `.corral/settings.local.json`, the
     per-project override) or managed file, never in the shared project file, which would
     choose where your records of its commands go.
2. Later file wins, managed last; a syslog or otlp object replaces an earlier one whole (a
   facility from one file with the address of another would be nobody's choice).
3. The database is absolute after `~/` expands. Neither it nor its spool may lie inside a path
   the sandbox can write (`check_audit_database`), or the sandbox could rewrite its own audit
   log; corral's state directory, always read-only inside, is the exception. Like the default
   log, a configured one is hidden from the sandbox (`hidden_audit_paths`).

Pure: nothing here touches the disk or the network. corral.audit.sinks opens the sinks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from corral.errors import SettingsError
from corral.policy.model import (
    SYSLOG_FACILITIES,
    AuditSettings,
    HostPaths,
    Origin,
    OtlpTarget,
    Policy,
    Rule,
    SyslogTarget,
)
from corral.policy.paths import is_within, normalize

if TYPE_CHECKING:
    from corral.policy.merge import Layer
    from corral.policy.settings import SettingsSource

# Settings key -> the kinds of settings file that may set it (rule 1).
WHO_MAY_SET: dict[str, tuple[str, ...]] = {
    "audit.database": ("user", "local", "managed"),
    "audit.syslog": ("user", "managed"),
    "audit.otlp": ("user", "managed"),
}
_WHY_NOT = {
    "audit.database": "the shared project file cannot choose where your audit log lives; "
    "set it for this checkout in .corral/settings.local.json or in your user settings",
    "audit.syslog": "only your user settings or the managed settings may forward the audit "
    "trail; a cloned project must not send it to a host it names",
    "audit.otlp": "only your user settings or the managed settings may forward the audit "
    "trail; a cloned project must not send it to a host it names",
}
USER_SETTINGS_HINT = "move it to ~/.config/corral/settings.json if you mean it"
# What SQLite keeps beside a database, hidden from the sandbox with it.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
# RFC 9110 token characters: what a header name may hold.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


# -- checks beyond the schema (schema.validate calls check_audit_section) ------------------


class InvalidAuditSetting(ValueError):
    """What the schema cannot say: `key` is the settings key path of the bad value."""

    def __init__(self, reason: str, key: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


def parse_syslog_address(text: str) -> str | tuple[str, int]:
    """A unix socket path, or (host, port) for UDP. IPv6 hosts are written in brackets."""
    if text.startswith("/"):
        return text
    host, port = _host_port(
        text, what="an absolute path (a unix socket such as /dev/log) or host:port"
    )
    if port is None:
        raise ValueError(
            f'"{text}": expected host:port (syslog over UDP needs the port, often 514)'
        )
    return host, port


def _host_port(text: str, *, what: str) -> tuple[str, int | None]:
    """host[:port] or [v6]:port. Never split at just any colon: IPv6 addresses hold them."""
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        if end < 0 or ":" not in host:
            raise ValueError(f'"{text}": brackets hold an IPv6 address, as in [::1]:514')
        if rest and not rest.startswith(":"):
            raise ValueError(f'expected {what}, found "{text}"')
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = text.partition(":")
        if ":" in port_text:
            raise ValueError(f'"{text}": write an IPv6 address in brackets, as in [::1]:514')
        port = port_text if colon else None
    if not host or any(c.isspace() or c in "/@[]\\" for c in host):
        raise ValueError(f'expected {what}, found "{text}"')
    if port is None:
        return host, None
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f'"{text}": the port must be a number from 1 to 65535')
    return host, int(port)


def check_endpoint(text: str) -> None:
    """An OTLP/HTTP base URL: http(s)://host[:port][/path], nothing else."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError(f'expected an http:// or https:// URL, found "{text}"')
    if any(c.isspace() or c in "?#" for c in text):
        raise ValueError(f'"{text}": no spaces, query or fragment (OTLP appends /v1/logs)')
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        raise ValueError(f'"{text}": put credentials in audit.otlp.headers, not in the URL')
    _host_port(authority, what="http(s)://host:port[/path]")


def check_header(name: str, value: str) -> None:
    if not name or not set(name) <= _TOKEN:
        raise ValueError(f'"{name}" is not an HTTP header name')
    if any(c in value for c in "\r\n"):
        raise ValueError("a header value cannot hold a line break")


def check_audit_section(section: object) -> None:
    """Raise InvalidAuditSetting for what the schema cannot say about an `audit` section."""
    if not isinstance(section, dict):
        return
    syslog, otlp = section.get("syslog"), section.get("otlp")
    if isinstance(syslog, dict) and isinstance(syslog.get("address"), str):
        _checked(parse_syslog_address, syslog["address"], key="audit.syslog.address")
    if not isinstance(otlp, dict):
        return
    if isinstance(otlp.get("endpoint"), str):
        _checked(check_endpoint, otlp["endpoint"], key="audit.otlp.endpoint")
    headers = otlp.get("headers")
    for name, value in (headers if isinstance(headers, dict) else {}).items():
        _checked(check_header, name, str(value), key=f"audit.otlp.headers.{name}")


def _checked(check: Callable[..., object], *args: str, key: str) -> None:
    try:
        check(*args)
    except ValueError as exc:
        raise InvalidAuditSetting(str(exc), key) from None


# -- merging ---------------------------------------------------------------------------------


def refuse_misplaced_audit_keys(source: SettingsSource, data: dict[str, object]) -> None:
    """Rule 1: a SettingsError naming the file and key when this kind of file may not set it."""
    section = data.get("audit")
    if not isinstance(section, dict):
        return
    for key, kinds in WHO_MAY_SET.items():
        if key.split(".", 1)[1] in section and source.kind not in kinds:
            raise SettingsError(_WHY_NOT[key], file=source.path, key=key, hint=USER_SETTINGS_HINT)


def merge_audit(
    layers: Sequence[Layer], host: HostPaths
) -> tuple[AuditSettings, list[tuple[str, Origin]]]:
    """Rule 2: the audit settings (layers come lowest first, managed last) and their origins."""
    audit = AuditSettings()
    origins: list[tuple[str, Origin]] = []
    for layer in layers:
        section: Any = layer.data.get("audit")  # checked against the schema already
        if not isinstance(section, dict):
            continue
        file = layer.source.path
        if "database" in section:
            origin = Origin(file, "audit.database")
            audit = audit._replace(database=database_path(section["database"], host, origin))
            origins.append(("audit.database", origin))
        if "syslog" in section:
            syslog = section["syslog"]
            facility = syslog.get("facility", "user")
            assert facility in SYSLOG_FACILITIES  # the schema's enum
            audit = audit._replace(syslog=SyslogTarget(syslog["address"], facility))
            origins.append(("audit.syslog", Origin(file, "audit.syslog")))
        if "otlp" in section:
            otlp = section["otlp"]
            headers = tuple(otlp.get("headers", {}).items())
            audit = audit._replace(otlp=OtlpTarget(otlp["endpoint"], headers))
            origins.append(("audit.otlp", Origin(file, "audit.otlp")))
    return audit, origins


def database_path(text: str, host: HostPaths, origin: Origin) -> str:
    """Rule 3: `~/` expands; anything else must already be absolute."""
    if text.startswith("~") and text != "~" and not text.startswith("~/"):
        reason = f'"{text}": only ~/ is expanded; write the full path'
        raise SettingsError(reason, file=origin.source, key=origin.key)
    if not (text.startswith("/") or text.startswith("~/")):
        reason = f'"{text}": expected an absolute path (or one starting with ~/)'
        raise SettingsError(reason, file=origin.source, key=origin.key)
    return normalize(text, home=host.home, base="/")


def check_audit_database(policy: Policy) -> None:
    """Rule 3: refuse a configured database (or its spool) the sandbox could write."""
    database, spool = policy.audit.database, policy.audit.spool_directory
    origin = policy.origin_of("audit.database")
    if database is None or spool is None or origin is None:
        return
    if is_within(database, policy.host.state_dir):
        return  # read-only and hidden inside every sandbox (presets.mandatory_deny_write)
    for rule in policy.filesystem.write:
        if is_within(database, rule.value) or is_within(spool, rule.value):
            raise SettingsError(
                f"{database} is inside the writable path {rule.value} ({rule.origin}): "
                "the sandbox could rewrite its own audit log",
                file=origin.source,
                key=origin.key,
                hint="choose a path outside every writable path, e.g. under "
                f"{policy.host.state_dir}/",
            )


def hidden_audit_paths(policy: Policy) -> tuple[Rule, ...]:
    """A configured database, its SQLite side files and its spool, for `deny_read`: past
    commands are nobody else's business, as the default log's are (presets.py)."""
    database, spool = policy.audit.database, policy.audit.spool_directory
    origin = policy.origin_of("audit.database")
    if database is None or spool is None or origin is None:
        return ()
    paths = (database, *(database + side for side in SQLITE_SIDE_FILES), spool)
    return tuple(Rule(path, origin) for path in paths)

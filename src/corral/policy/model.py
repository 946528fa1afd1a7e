"""The policy as immutable data.

A `Policy` says what a sandboxed command may read, write and reach. It is built once (from a
preset and the settings files, see `presets.py` and `settings.py`) and never changed; backends
translate it into what the kernel needs. Every rule carries its `Origin` so that
`corral policy show` can say where it came from.

Rules of the model:
1. Paths are absolute and normalised (no `~`, no `..`), but not resolved: symlinks are the
   backends' business, because resolving them reads the disk.
2. Deny beats allow. A path in `deny_read` is hidden even inside a writable path; a path in
   `deny_write` is read-only even inside a writable path.
3. Lists only ever grow when settings merge; scalars are replaced by later files.

The types are NamedTuples rather than dataclasses on purpose: `corral run` imports this
module on every launch and dataclasses pull in `inspect`, which costs more start-up time than
the rest of the policy work together.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Mode = Literal["strict", "standard", "permissive"]
MODES: tuple[Mode, ...] = ("strict", "standard", "permissive")

# none: an empty network namespace and no sockets at all; local: the sandbox's own loopback;
# filtered: loopback plus the filtering proxy.
NetworkAccess = Literal["none", "local", "filtered"]
NETWORK_ACCESSES: tuple[NetworkAccess, ...] = ("none", "local", "filtered")

BUILT_IN = "built-in"
CLI = "command line"


class Origin(NamedTuple):
    """Where a rule came from: a settings file (and key path), a preset, the CLI or built-in."""

    source: str
    key: str = ""

    def __str__(self) -> str:
        return f"{self.source} ({self.key})" if self.key else self.source


class Rule(NamedTuple):
    """One entry of a list in the policy: a path, a domain pattern, an env-name pattern..."""

    value: str
    origin: Origin


class FilesystemPolicy(NamedTuple):
    read: tuple[Rule, ...]
    """Readable roots. `/` in standard and permissive; the workspace and system dirs in strict."""
    write: tuple[Rule, ...]
    """Writable paths (each also readable)."""
    deny_read: tuple[Rule, ...]
    """Hidden paths: empty directories or empty files inside the sandbox. May hold globs."""
    deny_write: tuple[Rule, ...]
    """Read-only even inside a writable path. Includes the mandatory protected files."""
    private_tmp: bool
    """A fresh, empty, writable /tmp that vanishes with the sandbox."""


UnknownDomains = Literal["deny", "ask"]


class IgnoreRule(NamedTuple):
    """A known-harmless violation: by `command` ("*" for any), a path or domain glob."""

    command: str
    pattern: str
    origin: Origin


class NetworkPolicy(NamedTuple):
    access: NetworkAccess
    allowed_domains: tuple[Rule, ...] = ()
    denied_domains: tuple[Rule, ...] = ()
    allow_unix_sockets: tuple[Rule, ...] = ()
    allow_local_binding: bool = False
    host_ports: tuple[int, ...] = ()
    publish_ports: tuple[int, ...] = ()
    upstream_proxy: str | None = None
    http_proxy_port: int | None = None
    socks_proxy_port: int | None = None
    unknown_domains: UnknownDomains = "deny"
    """Hosts in neither list: refused, or asked about (CLI prompt / the API's ask callback)."""


class EnvPolicy(NamedTuple):
    """Environment variables: names matching `deny` are removed unless they match `allow`."""

    deny: tuple[Rule, ...]
    allow: tuple[Rule, ...] = ()


class HostPaths(NamedTuple):
    """The host locations a policy is built against, read from the environment at the edge."""

    workspace: str
    home: str
    config_home: str
    """$XDG_CONFIG_HOME or ~/.config"""
    cache_home: str
    """$XDG_CACHE_HOME or ~/.cache"""
    state_home: str
    """$XDG_STATE_HOME or ~/.local/state"""

    @property
    def user_settings_file(self) -> str:
        return f"{self.config_home}/corral/settings.json"

    @property
    def project_settings_dir(self) -> str:
        return f"{self.workspace}/.corral"

    @property
    def machine_cache_dir(self) -> str:
        """Where the per-boot machine probe is cached (protected from the sandbox)."""
        return f"{self.cache_home}/corral/machine"

    @property
    def state_dir(self) -> str:
        """corral's own records: placeholder journals, the audit log (protected)."""
        return f"{self.state_home}/corral"


class Limits(NamedTuple):
    """Resource limits of one sandbox. None: no limit of that kind.

    Most are per process (what rlimits can express): a program that forks gets the same
    allowance again in each child, and `processes` bounds how many children there can be.
    Where a delegated cgroup v2 is used, `processes` and `memory_bytes` also bound the
    sandbox as a whole. `backends/limits.py` says which mechanism enforces which limit.
    """

    timeout_seconds: float | None = None
    """Wall-clock time, after which the whole sandbox is killed."""
    cpu_seconds: int | None = None
    """CPU time of each process."""
    memory_bytes: int | None = None
    """Private writable memory (heap, anonymous mappings) of each process."""
    processes: int | None = None
    """Processes and threads in the sandbox, counting its pid 1."""
    open_files: int | None = None
    """Open file descriptors of each process."""
    file_size_bytes: int | None = None
    """The largest file a process may write."""
    output_bytes: int | None = None
    """Captured stdout and stderr each, when the caller captures them."""


# Settings key under "limits" -> Limits field, in the order `policy show` lists them.
LIMIT_KEYS: tuple[tuple[str, str], ...] = (
    ("timeoutSeconds", "timeout_seconds"),
    ("cpuSeconds", "cpu_seconds"),
    ("memoryBytes", "memory_bytes"),
    ("processes", "processes"),
    ("openFiles", "open_files"),
    ("fileSizeBytes", "file_size_bytes"),
    ("outputBytes", "output_bytes"),
)


# auto: bubblewrap where user namespaces work, else the Landlock-only backend, with a notice.
Backend = Literal["auto", "bwrap", "landlock"]

# What the violation monitor (corral.monitor) watches: every call that may write ("writes",
# the default), those and every open too ("all": reads of hidden paths are seen), or nothing
# ("off"). Each watched call costs a round trip through corral: about 3% on unpacking a
# project and running its tests, 10-25% where files are created by the thousand, and "all"
# pays for every import too (docs/monitoring.md). It only observes; the blocks are the same.
MonitorViolations = Literal["all", "writes", "off"]
MONITOR_VIOLATIONS: tuple[MonitorViolations, ...] = ("all", "writes", "off")


# Where audit records may be sent besides the SQLite log (corral.audit.sinks opens them).
SyslogFacility = Literal[
    "user", "auth", "daemon", "local0", "local1", "local2", "local3", "local4", "local5",
    "local6", "local7",
]  # fmt: skip
SYSLOG_FACILITIES: tuple[SyslogFacility, ...] = (
    "user", "auth", "daemon", "local0", "local1", "local2", "local3", "local4", "local5",
    "local6", "local7",
)  # fmt: skip
# Beside a configured database D, its spool is D + this: `corral log` in one project then
# ingests only what that project's runs spooled.
AUDIT_SPOOL_SUFFIX = ".spool"


class SyslogTarget(NamedTuple):
    address: str
    """An absolute path: a unix socket such as /dev/log; or host:port over UDP ([::1]:514)."""
    facility: SyslogFacility = "user"


class OtlpTarget(NamedTuple):
    endpoint: str
    """An OTLP/HTTP collector's base URL, http(s)://host:port[/path]."""
    headers: tuple[tuple[str, str], ...] = ()
    """Sent with every request (a collector's token): `policy show` lists the names only."""


class AuditSettings(NamedTuple):
    """The `audit` section: where this project's log lives and where records are forwarded."""

    database: str | None = None
    """The SQLite log (absolute, normalised); None: <state dir>/audit.db."""
    syslog: SyslogTarget | None = None
    otlp: OtlpTarget | None = None

    @property
    def spool_directory(self) -> str | None:
        """The spool beside a configured database; None for the default log's."""
        return None if self.database is None else self.database + AUDIT_SPOOL_SUFFIX


class Policy(NamedTuple):
    mode: Mode
    host: HostPaths
    filesystem: FilesystemPolicy
    network: NetworkPolicy
    env: EnvPolicy
    allow_unsandboxed_commands: bool = False
    excluded_commands: tuple[Rule, ...] = ()
    package_cache: str | None = None
    """A private per-workspace directory for pip, uv, npm and cargo caches (None: no cache)."""
    origins: tuple[tuple[str, Origin], ...] = ()
    """Where each scalar setting came from, as (key path, origin) pairs."""
    backend: Backend = "auto"
    ignore_violations: tuple[IgnoreRule, ...] = ()
    monitor_violations: MonitorViolations = "writes"
    """Which filesystem calls the violation monitor watches for attempts the sandbox refuses."""
    limits: Limits = Limits()
    """Resource limits; the presets set them (see presets.py), settings may change them."""
    audit: AuditSettings = AuditSettings()
    """The audit log's place and its forwarding sinks (settings only; see policy/audit.py)."""

    @property
    def workspace(self) -> str:
        return self.host.workspace

    def origin_of(self, key: str) -> Origin | None:
        """The origin of a scalar setting such as `mode` or `network.access`."""
        for name, origin in reversed(self.origins):
            if name == key:
                return origin
        return None

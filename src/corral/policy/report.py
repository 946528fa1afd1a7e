"""The policy for people: `corral policy show [--json]` and the risky-rule check `policy check`.

Pure functions of a `Policy`; the CLI prints what they return. Keys are the settings file's
camelCase names, so that a rule shown here can be found in (or copied into) a settings file.

`check_policy` levels: "error" for a rule that hands the command a way out of the sandbox
(a writable directory on $PATH, the Docker socket, a wildcard over a public suffix); "warning"
for a rule that weakens it in a way the user may well have meant (a writable home directory,
a site that can carry data out, commands that run unsandboxed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

from corral.policy.domains import DomainPattern, matches, parse_pattern
from corral.policy.model import BUILT_IN, Origin, Policy, Rule
from corral.policy.paths import is_within, normalize

Level = Literal["warning", "error"]


class Finding(NamedTuple):
    level: Level
    key: str
    """The settings key the rule belongs to, such as `network.allowedDomains`."""
    message: str
    origin: str
    """Where the rule came from (`str(Origin)`)."""


def _rules(rules: Sequence[Rule]) -> list[dict[str, object]]:
    return [{"value": rule.value, "origin": str(rule.origin)} for rule in rules]


_BUILT_IN = Origin(BUILT_IN)


def _scalar(
    policy: Policy, key: str, value: object, default: Origin = _BUILT_IN
) -> dict[str, object]:
    return {"value": value, "origin": str(policy.origin_of(key) or default)}


def _ports(policy: Policy, key: str, ports: Sequence[int]) -> list[dict[str, object]]:
    # Ports are plain ints in the model; settings.py records one origin per port, in order.
    origins = [origin for name, origin in policy.origins if name == key]
    if len(origins) != len(ports):
        origins = [_BUILT_IN] * len(ports)
    pairs = zip(ports, origins, strict=True)
    return [{"value": port, "origin": str(origin)} for port, origin in pairs]


def policy_as_json(policy: Policy) -> dict[str, object]:
    """Every rule of `policy` with its origin, shaped like a settings file."""
    fs, net = policy.filesystem, policy.network
    preset = Origin(f"preset {policy.mode}")
    return {
        "workspace": policy.workspace,
        "mode": _scalar(policy, "mode", policy.mode, preset),
        "filesystem": {
            "read": _rules(fs.read),
            "write": _rules(fs.write),
            "denyRead": _rules(fs.deny_read),
            "denyWrite": _rules(fs.deny_write),
            "privateTmp": {"value": fs.private_tmp, "origin": str(preset)},
        },
        "network": {
            "access": _scalar(policy, "network.access", net.access, preset),
            "allowedDomains": _rules(net.allowed_domains),
            "deniedDomains": _rules(net.denied_domains),
            "allowUnixSockets": _rules(net.allow_unix_sockets),
            "allowLocalBinding": _scalar(
                policy, "network.allowLocalBinding", net.allow_local_binding
            ),
            "hostPorts": _ports(policy, "network.hostPorts", net.host_ports),
            "publishPorts": _ports(policy, "network.publishPorts", net.publish_ports),
            "upstreamProxy": _scalar(policy, "network.upstreamProxy", net.upstream_proxy),
            "httpProxyPort": _scalar(policy, "network.httpProxyPort", net.http_proxy_port),
            "socksProxyPort": _scalar(policy, "network.socksProxyPort", net.socks_proxy_port),
        },
        "env": {"deny": _rules(policy.env.deny), "allow": _rules(policy.env.allow)},
        "allowUnsandboxedCommands": _scalar(
            policy, "allowUnsandboxedCommands", policy.allow_unsandboxed_commands
        ),
        "excludedCommands": _rules(policy.excluded_commands),
        "packageCache": {
            "value": policy.package_cache,
            "origin": str(Origin(BUILT_IN, "package caches")),
        },
        "monitor": {
            "violations": _scalar(policy, "monitor.violations", policy.monitor_violations),
        },
        "audit": _audit(policy),
    }


def _audit(policy: Policy) -> dict[str, object]:
    audit = policy.audit
    database = audit.database or f"{policy.host.state_dir}/audit.db"  # audit/spool.py's default
    syslog = audit.syslog and {"address": audit.syslog.address, "facility": audit.syslog.facility}
    # Header values are left out: they are usually a collector's token, and this output is
    # what people paste into bug reports.
    otlp = audit.otlp and {
        "endpoint": audit.otlp.endpoint,
        "headers": [name for name, _value in audit.otlp.headers],
    }
    return {
        "database": _scalar(policy, "audit.database", database),
        "syslog": _scalar(policy, "audit.syslog", syslog),
        "otlp": _scalar(policy, "audit.otlp", otlp),
    }


def _show(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):  # a setting that is an object, such as audit.syslog
        return " ".join(f"{key}={_show(item)}" for key, item in value.items() if item)
    if isinstance(value, list):
        return ",".join(map(_show, value))
    return str(value)


def _table_rows(section: str, entries: dict[str, object]) -> list[tuple[str, str, str]]:
    rows = []
    for name, entry in entries.items():
        if isinstance(entry, list):
            rows += [(section, f"{name} {_show(e['value'])}", str(e["origin"])) for e in entry]
        elif isinstance(entry, dict) and "value" in entry:
            rows.append((section, f"{name} = {_show(entry['value'])}", str(entry["origin"])))
        elif isinstance(entry, dict):
            rows += _table_rows(name, entry)
    return rows


def format_policy(policy: Policy) -> str:
    """A table of section, rule and origin, one line a rule, for `corral policy show`."""
    data = policy_as_json(policy)
    workspace = data.pop("workspace")
    rows = [("SECTION", "RULE", "ORIGIN"), *_table_rows("general", data)]
    width_section = max(len(row[0]) for row in rows)
    width_rule = max(len(row[1]) for row in rows)
    lines = [f"workspace: {workspace}", ""]
    for section, rule, origin in rows:
        lines.append(f"{section:<{width_section}}  {rule:<{width_rule}}  {origin}".rstrip())
    return "\n".join(lines) + "\n"


# Hosts that take uploads from anyone: a policy that lets one of them through lets the command
# carry files out (to the attacker's own account or paste). Matched against allowed patterns,
# so `github.com`, `*.github.com` and `*.s3.amazonaws.com` are all caught.
EXFILTRATION_HOSTS: dict[str, str] = {
    "github.com": "a code-hosting site",
    "gist.github.com": "a paste site",
    "raw.githubusercontent.com": "a code-hosting site",
    "gist.githubusercontent.com": "a paste site",
    "gitlab.com": "a code-hosting site",
    "bitbucket.org": "a code-hosting site",
    "pastebin.com": "a paste site",
    "paste.ee": "a paste site",
    "hastebin.com": "a paste site",
    "dpaste.org": "a paste site",
    "transfer.sh": "a file-sharing site",
    "file.io": "a file-sharing site",
    "0x0.st": "a file-sharing site",
    "wetransfer.com": "a file-sharing site",
    "dropbox.com": "a file-sharing site",
    "content.dropboxapi.com": "a file-sharing site",
    "drive.google.com": "a file-sharing site",
    "any-bucket.s3.amazonaws.com": "a file-sharing site (S3 buckets)",
    "s3.amazonaws.com": "a file-sharing site (S3)",
    "storage.googleapis.com": "a file-sharing site (cloud storage)",
    "any-account.blob.core.windows.net": "a file-sharing site (cloud storage)",
    "webhook.site": "a request-capturing site",
    "any-tunnel.ngrok.io": "a tunnel to anyone's machine",
    "any-tunnel.ngrok-free.app": "a tunnel to anyone's machine",
    "any-tunnel.ngrok.app": "a tunnel to anyone's machine",
    "any-tunnel.trycloudflare.com": "a tunnel to anyone's machine",
}

# Suffixes under which anyone can register a name (a small part of the Public Suffix List:
# the ones that turn up in allow-lists). Any single label (`com`, `io`) is a suffix as well.
PUBLIC_SUFFIXES = frozenset(
    {
        "co.uk",
        "org.uk",
        "com.au",
        "co.jp",
        "com.br",
        "com.cn",
        "co.in",
        "github.io",
        "gitlab.io",
        "herokuapp.com",
        "appspot.com",
        "blogspot.com",
        "cloudfront.net",
        "azurewebsites.net",
        "netlify.app",
        "vercel.app",
        "pages.dev",
        "workers.dev",
        "web.app",
        "firebaseapp.com",
        "ngrok.io",
        "ngrok-free.app",
        "trycloudflare.com",
    }
)

# Sockets that hand out root on the host (start a privileged container mounting /).
ROOT_SOCKETS = frozenset({"docker.sock", "podman.sock", "containerd.sock", "crio.sock"})


def _path_findings(policy: Policy, path_dirs: Sequence[str]) -> list[Finding]:
    findings = []
    host = policy.host
    dirs = [normalize(d or ".", home=host.home, base=host.workspace) for d in path_dirs]
    protected = [rule.value for rule in policy.filesystem.deny_write]
    for rule in policy.filesystem.write:
        for path_dir in dict.fromkeys(dirs):
            if not (is_within(path_dir, rule.value) or is_within(rule.value, path_dir)):
                continue
            if any(is_within(path_dir, deny) for deny in protected):
                continue
            message = (
                f"{rule.value} is writable and {path_dir} is on $PATH: the command can plant "
                "a program that you run later outside the sandbox"
            )
            findings.append(Finding("error", "filesystem.allowWrite", message, str(rule.origin)))
        if is_within(host.home, rule.value):
            message = (
                f"{rule.value} is writable and holds your home directory: the command can "
                "change other projects and your tools' configuration"
            )
            findings.append(Finding("warning", "filesystem.allowWrite", message, str(rule.origin)))
    return findings


def _socket_findings(policy: Policy) -> list[Finding]:
    findings = []
    for rule in policy.network.allow_unix_sockets:
        if rule.value.rsplit("/", 1)[-1] in ROOT_SOCKETS:
            level: Level = "error"
            message = f"{rule.value} is allowed: a container engine's socket is root on the host"
        else:
            level = "warning"
            message = f"{rule.value} is allowed: the service behind it acts outside the sandbox"
        findings.append(Finding(level, "network.allowUnixSockets", message, str(rule.origin)))
    return findings


def _domain_finding(rule: Rule, pattern: DomainPattern) -> Finding | None:
    key, origin = "network.allowedDomains", str(rule.origin)
    if pattern.kind == "wildcard" and (
        "." not in pattern.value or pattern.value in PUBLIC_SUFFIXES
    ):
        message = f"{pattern} covers a public suffix: anyone can register a name under it"
        return Finding("error", key, message, origin)
    for host, site in EXFILTRATION_HOSTS.items():
        if matches(pattern, host):
            message = f"{pattern} allows {host}, {site}: the command can carry data out there"
            return Finding("warning", key, message, origin)
    return None


def _network_findings(policy: Policy) -> list[Finding]:
    net = policy.network
    findings = []
    for rule in net.allowed_domains:
        finding = _domain_finding(rule, parse_pattern(rule.value))
        if finding is not None:
            findings.append(finding)
    if net.access == "filtered" and not net.allowed_domains:
        message = "network access is filtered but no domain is allowed, so every request fails"
        origin = str(policy.origin_of("network.access") or _BUILT_IN)
        findings.append(Finding("warning", "network.allowedDomains", message, origin))
    return findings


def _command_findings(policy: Policy) -> list[Finding]:
    findings = []
    if policy.allow_unsandboxed_commands:
        origin = str(policy.origin_of("allowUnsandboxedCommands") or _BUILT_IN)
        message = "commands may be run outside the sandbox on request"
        findings.append(Finding("warning", "allowUnsandboxedCommands", message, origin))
    for rule in policy.excluded_commands:
        message = f"{rule.value} always runs outside the sandbox"
        findings.append(Finding("warning", "excludedCommands", message, str(rule.origin)))
    return findings


def check_policy(policy: Policy, *, path_dirs: Sequence[str]) -> list[Finding]:
    """Risky rules in `policy`, errors first. `path_dirs` is the host's $PATH, split on ':'.

    Paths are compared as written (the check does not read the disk), so a writable directory
    reached through a symlink on $PATH is not caught here.
    """
    findings = [
        *_path_findings(policy, path_dirs),
        *_socket_findings(policy),
        *_network_findings(policy),
        *_command_findings(policy),
    ]
    return sorted(findings, key=lambda finding: finding.level != "error")  # stable

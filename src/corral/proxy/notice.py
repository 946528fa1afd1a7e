"""One line on the user's terminal for each refused connection, saying how to allow it.

    corral: blocked connection to evil.example:443 (not in network.allowedDomains); to allow
    it add "network": {"allowedDomains": ["evil.example"]} to <ws>/.corral/settings.local.json

(one line; folded here). `DenialNotices` wraps the audit sink: every event still goes to the
sink, and each network denial naming a host also becomes a line for `notify`. A program that
retries prints its line once: repeats of the same (sandbox, host, port, rule) are dropped.

Hosts and reasons come from inside the sandbox, so the line is escaped as the audit log's
renderer escapes them: a newline or an escape sequence in a requested host name must not forge
a line or repaint the terminal.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping

from corral.audit.events import Event, Sink
from corral.audit.render import escape, host_port
from corral.network import Notify
from corral.policy.domains import normalize_host

# Distinct denials remembered for de-duplication; past this, lines may repeat.
MAX_REMEMBERED = 4096
MAX_HOST_SHOWN = 253  # the longest legal host name; anything longer is cut


def denial_line(fields: Mapping[str, object], *, settings_file: str) -> str | None:
    """The line for a network event, or None when it is no denial of a named target, or one
    the settings' ignoreViolations silence (still recorded, not shown)."""
    host = str(fields.get("host") or "")
    if fields.get("decision") != "deny" or not host or fields.get("ignored"):
        return None
    port = fields.get("port")
    rule, reason = str(fields.get("rule", "")), str(fields.get("reason", ""))
    target = host_port(host[:MAX_HOST_SHOWN], port if isinstance(port, int) else None)
    head = f"corral: blocked connection to {escape(target)}"
    if rule == "default-deny":
        add: tuple[str, object] = ("allowedDomains", _spelled(host))
        why = "not in network.allowedDomains"
    elif rule == "ask: deny":
        add = ("allowedDomains", _spelled(host))
        why = escape(reason)
    elif rule == "ip-literal":
        add = ("allowedDomains", _spelled(host))
        why = "an IP address that network.allowedDomains does not list"
    elif rule == "hostPorts" and isinstance(port, int):
        add = ("hostPorts", port)
        why = "not in network.hostPorts"
    else:
        return f"{head} ({escape(reason)})"
    key, value = add
    setting = json.dumps({"network": {key: [value]}})
    return f"{head} ({why}); to allow it add {escape(setting[1:-1])} to {settings_file}"


def _spelled(host: str) -> str:
    """The host as allowedDomains stores it (lower case, punycode), so the advice matches."""
    try:
        return normalize_host(host)
    except ValueError:
        return host


class DenialNotices:
    """A sink in front of the caller's: passes every event on, and tells `notify` of each
    distinct denial. The caller's sink stays the caller's: `close` leaves it open."""

    def __init__(self, sink: Sink, notify: Notify, *, settings_file: str) -> None:
        self._sink = sink
        self._notify = notify
        self._settings_file = settings_file
        self._seen: set[tuple[object, ...]] = set()

    def emit(self, event: Event) -> None:
        self._sink.emit(event)
        if event.kind != "network":
            return
        line = denial_line(event.fields, settings_file=self._settings_file)
        if line is None:
            return
        fields = event.fields
        key = (event.sandbox_id, fields.get("host"), fields.get("port"), fields.get("rule"))
        if key in self._seen:
            return
        if len(self._seen) < MAX_REMEMBERED:
            self._seen.add(key)
        with contextlib.suppress(Exception):  # a broken terminal must not break the proxy
            self._notify(line)

    def close(self) -> None:
        pass

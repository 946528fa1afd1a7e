"""Forwarding audit events to the sinks the settings name (`audit.syslog`, `audit.otlp`).

Producers (`corral run`, `corral serve`, `corral mcp`) call `spool.open_audit_sink`, which
imports this module only when something is to be forwarded:

    sink = open_audit_sink(policy, name)   # the spool, then BestEffort(syslog), BestEffort(otlp)
    ... sink.emit(event) ...
    sink.close()

Rules:
1. The spool is the record of truth. It comes first in the fan-out, and its errors are
   errors, as they were before forwarding existed.
2. A forwarder is best effort (`BestEffort`): one that cannot be reached at start, fails to
   take an event, or reports lost events when it closes prints one warning line on stderr
   and changes nothing else: not the command's exit status, not the spool's records.
   (What a collector missed, `corral log --json` still has.)
3. export.py (logging) and otlp.py (urllib) are imported only when the settings name them,
   so `corral run` without forwarding pays nothing for them at start-up.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from corral.audit.events import FanOutSink

if TYPE_CHECKING:
    from corral.audit.events import Event, Sink
    from corral.policy.model import AuditSettings, OtlpTarget, SyslogTarget

Warn = Callable[[str], None]
LOCAL_LOG_KEEPS_THEM = "the local audit log keeps every event (corral log)"


def warn_on_stderr(message: str) -> None:
    print(f"corral: warning: {message}", file=sys.stderr, flush=True)


def forward(spool: Sink, audit: AuditSettings, *, warn: Warn | None = None) -> Sink:
    """`spool` first, then every forwarder of `audit` that could be opened (rule 1, 2)."""
    forwarders = open_forwarders(audit, warn=warn or warn_on_stderr)
    return FanOutSink(spool, *forwarders) if forwarders else spool


def open_forwarders(audit: AuditSettings, *, warn: Warn = warn_on_stderr) -> list[BestEffort]:
    """The syslog and OTLP sinks `audit` names, each behind `BestEffort`; those that cannot
    be opened are left out, with a warning."""
    from corral.errors import CorralError

    openers: list[Callable[[], Sink]] = []
    if audit.syslog is not None:
        openers.append(partial(_open_syslog, audit.syslog))
    if audit.otlp is not None:
        openers.append(partial(_open_otlp, audit.otlp))
    forwarders = []
    for opener in openers:
        try:
            forwarders.append(BestEffort(opener(), warn=warn))
        except CorralError as exc:
            warn(f"{exc.message}; {LOCAL_LOG_KEEPS_THEM}")
    return forwarders


def _open_syslog(target: SyslogTarget) -> Sink:
    from logging.handlers import SysLogHandler

    from corral.audit.export import SyslogSink
    from corral.policy.audit import parse_syslog_address

    address = parse_syslog_address(target.address)  # checked when the settings were read
    return SyslogSink(address=address, facility=SysLogHandler.facility_names[target.facility])


def _open_otlp(target: OtlpTarget) -> Sink:
    from corral.audit.otlp import OtlpLogsSink

    return OtlpLogsSink(target.endpoint, headers=dict(target.headers))


class BestEffort:
    """A forwarding `Sink` that never raises: what goes wrong becomes one warning at close."""

    def __init__(self, sink: Sink, *, warn: Warn) -> None:
        self._sink = sink
        self._warn = warn
        self._failed = 0
        self._error = ""

    def emit(self, event: Event) -> None:
        try:
            self._sink.emit(event)
        except Exception as exc:  # rule 2: a forwarder never fails its producer
            self._failed += 1
            self._error = getattr(exc, "message", None) or str(exc)

    def close(self) -> None:
        problem = ""
        try:
            self._sink.close()
        except Exception as exc:  # reported below, once
            problem = getattr(exc, "message", None) or str(exc)
        if self._failed:
            lost = f"{self._failed} audit events could not be forwarded: {self._error}"
            problem = f"{lost}; {problem}" if problem else lost
            self._failed = 0
        if problem:
            self._warn(f"{problem}; {LOCAL_LOG_KEEPS_THEM}")

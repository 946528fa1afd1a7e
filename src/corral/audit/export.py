"""Getting audit records out of corral: JSON Lines of any query, and a syslog sink.

The syslog sink is a `Sink` like the SQLite log: combine them with `events.FanOutSink`. It
sends one datagram per event through `logging.handlers.SysLogHandler`, to the local daemon
("/dev/log") or to a collector at (host, port) over UDP. Denials and violations go out at
WARNING, everything else at INFO. A send that fails is counted and reported by `close()`
(a CorralError), since an audit trail that drops records quietly is worse than none.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
from collections.abc import Iterable
from typing import TextIO

from corral.audit.events import Event
from corral.audit.rows import AnyRow
from corral.errors import CorralError

SyslogAddress = str | tuple[str, int]
# A daemon that stops reading must not stall the command being audited (the violation monitor
# records while the sandboxed call waits): a send that blocks this long is counted as failed.
SEND_TIMEOUT_S = 1.0


def write_jsonl(rows: Iterable[AnyRow], out: TextIO) -> int:
    """One JSON object per row per line (with a "kind" key); returns the number of rows."""
    count = 0
    for row in rows:
        out.write(json.dumps(row.as_dict(), sort_keys=True, default=str) + "\n")
        count += 1
    return count


def export_jsonl(rows: Iterable[AnyRow], path: str) -> int:
    """Writes the rows to a new file at `path` (an existing file is replaced)."""
    try:
        with open(path, "w", encoding="utf-8") as out:
            return write_jsonl(rows, out)
    except OSError as exc:
        raise CorralError(f"cannot write {path}: {exc.strerror}") from exc


class _CountingHandler(logging.handlers.SysLogHandler):
    """SysLogHandler reports failed sends to stderr through logging; count them instead."""

    failures = 0
    last_error: BaseException | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        import sys

        self.failures += 1
        self.last_error = sys.exc_info()[1]


class SyslogSink:
    """Sends every audit event to syslog as `corral[PID]: {json}`."""

    def __init__(
        self,
        *,
        address: SyslogAddress = "/dev/log",
        facility: int = logging.handlers.SysLogHandler.LOG_USER,
    ) -> None:
        self.address = address
        try:
            self._handler = _CountingHandler(address=address, facility=facility)
        except OSError as exc:
            raise _unreachable(address, exc.strerror or str(exc)) from exc
        # The stdlib tolerates a missing local daemon (as openlog(3) does) and drops what is
        # sent until one appears; an audit trail that was asked for says so at once instead.
        sock = getattr(self._handler, "socket", None)
        if sock is None or sock.fileno() < 0:
            self._handler.close()
            raise _unreachable(address, "nothing is listening")
        sock.settimeout(SEND_TIMEOUT_S)
        self._handler.ident = f"corral[{os.getpid()}]: "

    def emit(self, event: Event) -> None:
        self._handler.handle(_record(event))

    def close(self) -> None:
        self._handler.close()
        if self._handler.failures:
            failures, self._handler.failures = self._handler.failures, 0
            raise CorralError(
                f"{failures} audit events could not be sent to syslog at {self.address}: "
                f"{self._handler.last_error}"
            )


def _unreachable(address: SyslogAddress, why: str) -> CorralError:
    return CorralError(
        f"cannot reach syslog at {address}: {why}", hint="is a syslog daemon listening there?"
    )


def _record(event: Event) -> logging.LogRecord:
    warn = event.kind == "violation" or event.fields.get("decision") == "deny"
    return logging.LogRecord(
        name="corral.audit",
        level=logging.WARNING if warn else logging.INFO,
        pathname="",
        lineno=0,
        msg=event.as_json(),
        args=None,
        exc_info=None,
    )

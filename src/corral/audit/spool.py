"""The audit spool: how `corral run` records events without opening the database.

Why: importing the SQLite writer and opening the log costs 15-20 ms, and every `corral run`
would pay it. So the run path appends each event as one JSON line to a spool file, and the
readers (`corral log`, `corral violations`) move spooled lines into the log before they read
it (audit/ingest.py).

Rules:
1. Each writer appends to `<directory>/<name>.jsonl` (mode 0600, directory 0700). The spool
   lives in corral's state directory, read-only inside every sandbox: the sandboxed command
   can neither forge records nor erase them. A project with its own `audit.database` has its
   spool beside that file (`audit_locations`), which the settings keep out of every writable
   path (policy/audit.py).
2. An event is one write(2) of one whole line to an O_APPEND descriptor: once `emit` returns,
   the line is in the kernel and survives the writer being killed. (Like the log's
   synchronous=NORMAL: a power loss may lose the last lines; nothing else does.)
3. Every line carries an id of its own: 64 random bits per writer, then a sequence number. The
   log stores each id once (migration 3), so ingesting a line twice adds nothing.
4. A writer holds a shared flock(2) on its file while it is open; the kernel drops the lock
   when the process dies, however it dies. Ingest takes an exclusive lock without waiting:
   - granted: no writer is left, the file is complete: it is ingested whole, then deleted;
   - refused: a writer is alive: the complete lines are ingested, the file stays, and a last
     line still being written is left for next time.
5. A file is deleted only after the transaction holding its events has committed, so a crash
   at any point loses nothing; at worst lines are ingested again, which rule 3 makes harmless.
6. A writer whose file was taken by ingest between its open(2) and its lock opens a new one.

Line format, version 1 (`FORMAT_VERSION`):
    {"v": 1, "id": "9f2c...-1", "kind": "network", "sandbox_id": "...", "time": 1.7e9,
     "fields": {...}}
It is written by the small encoder below, not by `json`: importing json costs ~2 ms, more than
everything else this module does on the launch path. Ingest reads it with json.

This module imports os, fcntl and _thread only (all three already loaded by `corral run`).
"""

from __future__ import annotations

import _thread
import fcntl
import os
from typing import TYPE_CHECKING

from corral.errors import CorralError

if TYPE_CHECKING:
    from collections.abc import Callable

    from corral.audit.events import Event, Sink
    from corral.policy.model import HostPaths, Policy

FORMAT_VERSION = 1
SUFFIX = ".jsonl"
# Opening retries only when ingest deletes the file between our open and our lock (rule 6);
# that needs a name that is already in the spool, so a second retry means something is wrong.
OPEN_ATTEMPTS = 3


def spool_directory(host: HostPaths) -> str:
    """<state dir>/spool: beside the audit log, and read-only inside every sandbox."""
    return f"{host.state_dir}/spool"


def default_audit_path(host: HostPaths) -> str:
    """$XDG_STATE_HOME/corral/audit.db: the log when the settings name no audit.database."""
    return f"{host.state_dir}/audit.db"


def audit_locations(policy: Policy) -> tuple[str, str]:
    """(the SQLite log, its spool directory) for `policy`; every writer and reader asks here.

    The default log with <state dir>/spool, or a configured `audit.database` D with its own
    spool beside it (D + ".spool"), so that `corral log` in one project never ingests what
    another project's runs spooled. (`corral log` lets $CORRAL_AUDIT_DB replace the log.)
    """
    database, spool = policy.audit.database, policy.audit.spool_directory
    if database is None or spool is None:
        return default_audit_path(policy.host), spool_directory(policy.host)
    return database, spool


def open_audit_sink(
    policy: Policy, name: str, *, warn: Callable[[str], None] | None = None
) -> Sink:
    """What a producer writes to: a SpoolSink (file `name`) in the spool of `policy`'s log,
    then the forwarders its `audit.syslog` / `audit.otlp` name, at best effort (sinks.py;
    `warn` hears of their trouble, default a line on stderr). Raises CorralError when the
    spool cannot be opened."""
    spool = SpoolSink(audit_locations(policy)[1], name)
    if policy.audit.syslog is None and policy.audit.otlp is None:
        return spool
    from corral.audit.sinks import forward  # logging or urllib: only when asked for

    return forward(spool, policy.audit, warn=warn)


class SpoolSink:
    """A `Sink` appending one JSON line per event to `<directory>/<sandbox_id>.jsonl`.

    `sandbox_id` names the file; each line carries its event's own sandbox id, so a sink
    opened before the id is known may use any name unique to it. Thread-safe.
    """

    def __init__(self, directory: str, sandbox_id: str) -> None:
        if not sandbox_id or "/" in sandbox_id or sandbox_id.startswith("."):
            raise CorralError(f"not a spool file name: {sandbox_id!r}")
        self.path = f"{directory}/{sandbox_id}{SUFFIX}"
        self._id_prefix = os.urandom(8).hex() + "-"
        self._sequence = 0
        self._lock = _thread.allocate_lock()
        try:
            self._fd: int | None = _open_locked(self.path, directory)
        except OSError as exc:
            raise _spool_error(self.path, "opening", exc) from exc

    def emit(self, event: Event) -> None:
        with self._lock:
            if self._fd is None:
                raise CorralError(f"audit spool {self.path} is closed")
            self._sequence += 1
            line = encode_line(f"{self._id_prefix}{self._sequence}", event)
            data = line.encode()  # cannot fail: the encoder escapes lone surrogates
            try:
                # One write(2) almost always; a short write (disk nearly full) is finished off.
                while data:
                    data = data[os.write(self._fd, data) :]
            except OSError as exc:
                raise _spool_error(self.path, "writing", exc) from exc

    def close(self) -> None:
        """Closes the file, releasing the lock: ingest may then take the file. Idempotent."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _open_locked(path: str, directory: str) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(OPEN_ATTEMPTS):
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:  # the first run on this machine: no spool directory yet
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            # Shared: writers never exclude each other; only ingest's exclusive lock waits.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                return fd
        except FileNotFoundError:
            pass  # ingest deleted the file we opened: open the name again (rule 6)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(f"the file kept being removed while it was opened ({OPEN_ATTEMPTS} times)")


def _spool_error(path: str, action: str, exc: OSError) -> CorralError:
    return CorralError(
        f"audit spool {path}: {action} failed: {exc.strerror or exc}",
        hint="corral's state directory must be writable (and its disk not full)",
    )


# -- the line encoder ------------------------------------------------------------------------


def encode_line(event_id: str, event: Event) -> str:
    """One spool line (with its newline) for `event`. Values json cannot hold become strings,
    as json.dumps(default=str) would make them; NaN and infinities become null."""
    return (
        f'{{"v":{FORMAT_VERSION},"id":{_string(event_id)},"kind":{_string(event.kind)},'
        f'"sandbox_id":{_string(event.sandbox_id)},"time":{_value(event.time)},'
        f'"fields":{_value(event.fields)}}}\n'
    )


def _value(value: object) -> str:
    if isinstance(value, str):
        return _string(value)
    if value is None or value is True or value is False:
        return "null" if value is None else "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)  # an IntEnum's repr is not a number
    if isinstance(value, float):
        # repr of a finite float is valid JSON; x - x is NaN exactly for NaN and infinities.
        return float.__repr__(value) if value - value == 0 else "null"
    if isinstance(value, dict):
        items = (f"{_string(str(k))}:{_value(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return _string(str(value))


def _string(text: str) -> str:
    # Printable text needs escaping only for the quote and the backslash (the common case, in
    # C). Anything else unprintable in the BMP (control characters, U+2028, lone surrogates
    # from undecodable file names) becomes \\uXXXX, so a line is one line of valid UTF-8.
    if text.isprintable():
        if '"' not in text and "\\" not in text:
            return f'"{text}"'
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return '"' + "".join(map(_char, text)) + '"'


def _char(c: str) -> str:
    if c == '"' or c == "\\":
        return "\\" + c
    if c.isprintable() or ord(c) > 0xFFFF:
        return c
    return f"\\u{ord(c):04x}"

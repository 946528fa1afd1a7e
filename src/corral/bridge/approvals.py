"""Approvals as files, so that every process (serve, mcp, the CLI) sees and decides the same ones.

Layout, in `<state dir>/bridge/approvals` (mode 0700: other local users see nothing):
    <id>.request.json    a pending request, written by the bridge that waits for it
    <id>.decision.json   the decision, written once by whoever decides first

Rules:
1. Every file appears whole: it is written under a temporary name and then renamed (requests)
   or hard-linked (decisions) into place, so a reader never sees half a file.
2. A decision is made once. It is linked into place, and link() fails when the name exists,
   so of two people deciding at the same moment exactly one wins; the other gets not_pending.
3. Expiry is a decision too: the waiting bridge links a denial by "timeout" when the time is
   up, so an approval that arrives a moment too late loses cleanly instead of half-running.
4. A request whose bridge process has gone (pid and start time no longer match) is not
   pending any more: nobody would run it.
5. Ids come from `secrets.token_urlsafe`: unguessable, and only [A-Za-z0-9_-], which is also
   what keeps an id from naming a file outside the directory.

The bridge that waits polls for its decisions (`DECISION_POLL_S`); `Bridge.decide` in the
same process wakes it at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Mapping
from typing import NamedTuple

from .errors import BridgeError

DECISION_POLL_S = 0.05  # a human's click becomes a running job within this; a stat() per wait
KEEP_DECISIONS_S = 3600.0  # decided files stay an hour, so a late `corral approve` says why
MAX_REASON = 1000
MAX_BY = 100
_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


class PendingApproval(NamedTuple):
    id: str
    job_id: str
    command: str
    argv: tuple[str, ...]
    cwd: str
    policy_summary: str
    """Mode, network, what is writable: exactly what would run and where."""
    reason: str
    """Why approval is needed (the declaration says ask, or a parameter matched /.../)."""
    client: str
    created: float
    expires: float

    def as_json(self) -> dict[str, object]:
        record: dict[str, object] = dict(self._asdict())
        record["argv"] = list(self.argv)
        return record


class Decision(NamedTuple):
    approve: bool
    by: str
    """Who decided: "cli:alice", "web", "mcp", or "timeout" / "shutdown" for the bridge."""
    reason: str
    time: float


def new_id(nbytes: int = 16) -> str:
    """An unguessable id that does not start with "-", so `corral approve ID` never takes it
    for an option."""
    while True:
        token = secrets.token_urlsafe(nbytes)
        if not token.startswith("-"):
            return token


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


class ApprovalStore:
    """The approvals directory. Thread-safe and process-safe through the file rules above."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # also when it existed: decisions must be the user's alone
        self._pid = os.getpid()
        self._start = _process_start(self._pid) or ""

    @classmethod
    def in_state_dir(cls, state_dir: str) -> ApprovalStore:
        return cls(os.path.join(state_dir, "bridge", "approvals"))

    def _path(self, approval_id: str, kind: str) -> str:
        if not _ID.fullmatch(approval_id):
            raise BridgeError(
                "unknown_approval",
                f"no approval {approval_id!r}",
                hint="`corral approvals` lists the pending ones",
            )
        return os.path.join(self.directory, f"{approval_id}.{kind}.json")

    def _write_new(self, path: str, record: Mapping[str, object], *, replace: bool) -> bool:
        """Rule 1 (and 2 unless `replace`): False when `path` existed already."""
        tmp = os.path.join(self.directory, f".{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(record, file)
            if replace:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _read(self, path: str) -> dict[str, object] | None:
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except (FileNotFoundError, ValueError):
            return None  # gone, or not ours to parse: not pending
        return data if isinstance(data, dict) else None

    def create(self, approval: PendingApproval) -> None:
        """Record a pending request, owned by this process."""
        record = approval.as_json()
        record.update(pid=self._pid, pid_start=self._start)
        self._write_new(self._path(approval.id, "request"), record, replace=True)

    def request(self, approval_id: str) -> PendingApproval | None:
        data = self._read(self._path(approval_id, "request"))
        return None if data is None else _pending_from(data)

    def decision(self, approval_id: str) -> Decision | None:
        data = self._read(self._path(approval_id, "decision"))
        if data is None:
            return None
        return Decision(
            approve=data.get("approve") is True,
            by=str(data.get("by", "")),
            reason=str(data.get("reason", "")),
            time=float(data.get("time", 0.0)),  # type: ignore[arg-type]
        )

    def decide(self, approval_id: str, *, approve: bool, by: str, reason: str = "") -> Decision:
        """A human's decision. BridgeError unknown_approval, or not_pending when it was decided
        already, has expired, or its bridge is gone."""
        path = self._path(approval_id, "request")
        data = self._read(path)
        if data is None or _pending_from(data) is None:
            if self.decision(approval_id) is not None:
                raise _not_pending(approval_id, "it was decided already")
            raise BridgeError(
                "unknown_approval",
                f"no approval {approval_id!r}",
                hint="`corral approvals` lists the pending ones",
            )
        pending = _pending_from(data)
        assert pending is not None
        now = time.time()
        if now >= pending.expires:
            raise _not_pending(approval_id, "it has expired (a timeout denies it)")
        if not _owner_alive(data):
            raise _not_pending(approval_id, "the bridge that asked is no longer running")
        # Shown to an agent and kept in the log: bounded, whatever a web form sent.
        decision = Decision(approve, by[:MAX_BY], reason[:MAX_REASON], now)
        if not self._record(approval_id, decision):
            existing = self.decision(approval_id)
            winner = existing.by if existing is not None else "someone else"
            raise _not_pending(approval_id, f"it was decided already (by {winner})")
        return decision

    def settle(
        self,
        approval_id: str,
        *,
        approve: bool,
        by: str,
        reason: str = "",
        now: float | None = None,
    ) -> Decision:
        """Record this decision unless one exists (rule 2); return the decision in force."""
        decision = Decision(approve, by, reason, time.time() if now is None else now)
        if self._record(approval_id, decision):
            return decision
        existing = self.decision(approval_id)
        assert existing is not None
        return existing

    def _record(self, approval_id: str, decision: Decision) -> bool:
        path = self._path(approval_id, "decision")
        return self._write_new(path, decision._asdict(), replace=False)

    def remove(self, approval_id: str) -> None:
        """The waiting bridge is done with the request (its decision file stays a while)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(approval_id, "request"))

    def pending(self) -> tuple[PendingApproval, ...]:
        """Every request still waiting for a human, oldest first (expired and orphaned ones
        are left out, and old files swept)."""
        now = time.time()
        found = []
        for name in os.listdir(self.directory):
            approval_id, _, kind = name.partition(".")
            if not _ID.fullmatch(approval_id):
                continue
            path = os.path.join(self.directory, name)
            if kind == "decision.json":
                self._sweep(path, now)
                continue
            if kind != "request.json":
                continue
            data = self._read(path)
            pending = None if data is None else _pending_from(data)
            if data is None or pending is None or not _owner_alive(data):
                self._sweep(path, now)
                continue
            if pending.expires <= now:
                continue
            if os.path.exists(self._path(approval_id, "decision")):
                continue
            found.append(pending)
        return tuple(sorted(found, key=lambda p: p.created))

    def _sweep(self, path: str, now: float) -> None:
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime > KEEP_DECISIONS_S:
                os.unlink(path)


def _not_pending(approval_id: str, why: str) -> BridgeError:
    return BridgeError(
        "not_pending",
        f"approval {approval_id} is not pending: {why}",
        hint="`corral approvals` lists the pending ones",
    )


def _owner_alive(data: Mapping[str, object]) -> bool:
    pid = data.get("pid")
    if not isinstance(pid, int):
        return False
    return _process_start(pid) == data.get("pid_start")


def _pending_from(data: Mapping[str, object]) -> PendingApproval | None:
    try:
        argv = data["argv"]
        assert isinstance(argv, list)
        return PendingApproval(
            id=str(data["id"]),
            job_id=str(data["job_id"]),
            command=str(data["command"]),
            argv=tuple(str(a) for a in argv),
            cwd=str(data["cwd"]),
            policy_summary=str(data["policy_summary"]),
            reason=str(data["reason"]),
            client=str(data["client"]),
            created=float(data["created"]),  # type: ignore[arg-type]
            expires=float(data["expires"]),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError, AssertionError):
        return None

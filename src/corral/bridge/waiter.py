"""One thread per Bridge that waits for the decisions on its own pending approvals.

It polls the store (`approvals.DECISION_POLL_S`) only while something waits, settles an
expired request as a denial by "timeout" (a human's decision made a moment earlier wins, see
rule 3 of approvals.py), and hands each decision to the Bridge exactly once, even when
`close` settles the rest as "shutdown" at the same moment.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from .approvals import DECISION_POLL_S, ApprovalStore, Decision

T = TypeVar("T")


class ApprovalWaiter(Generic[T]):
    """Waits for decisions on approvals added with `add`; calls `on_decision(item, decision)`
    once per approval, from the waiter's thread (or from `close`'s caller)."""

    def __init__(self, store: ApprovalStore, on_decision: Callable[[T, Decision], None]) -> None:
        self._store = store
        self._on_decision = on_decision
        self._waiting: dict[str, tuple[T, float]] = {}  # approval id -> (item, expiry)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, approval_id: str, item: T, *, expires: float) -> None:
        with self._wake:
            self._waiting[approval_id] = (item, expires)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="corral-bridge-approvals", daemon=True
                )
                self._thread.start()
            self._wake.notify_all()

    def wake(self) -> None:
        """A decision was just written in this process: look now rather than at the next poll."""
        with self._wake:
            self._wake.notify_all()

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self._waiting) or self._closed)
                if self._closed:
                    return
                waiting = list(self._waiting.items())
            for approval_id, (item, expires) in waiting:
                # A file being swept or a full disk: look again at the next poll.
                with contextlib.suppress(OSError):
                    self._check(approval_id, item, expires)
            with self._wake:
                if self._waiting and not self._closed:
                    self._wake.wait(DECISION_POLL_S)

    def _check(self, approval_id: str, item: T, expires: float) -> None:
        decision = self._store.decision(approval_id)
        if decision is None and time.time() >= expires:
            decision = self._store.settle(
                approval_id, approve=False, by="timeout", reason="nobody decided in time"
            )
        if decision is not None:
            self._deliver(approval_id, decision)

    def _deliver(self, approval_id: str, decision: Decision) -> None:
        with self._wake:
            entry = self._waiting.pop(approval_id, None)
        if entry is None:
            return  # delivered already (by the loop or by close)
        self._store.remove(approval_id)
        self._on_decision(entry[0], decision)

    def close(self) -> None:
        """Every approval still waiting is denied by "shutdown"; an approval that won the race
        does not count either: nothing is left to run it."""
        with self._wake:
            self._closed = True
            waiting = list(self._waiting)
            self._wake.notify_all()
        for approval_id in waiting:
            shutdown = Decision(False, "shutdown", "the bridge shut down", time.time())
            self._store.settle(approval_id, approve=False, by=shutdown.by, reason=shutdown.reason)
            self._deliver(approval_id, shutdown)
        if self._thread is not None:
            self._thread.join(5)

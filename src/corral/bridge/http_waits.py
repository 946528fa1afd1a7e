"""How the HTTP API runs a request that waits for a job (http_api.py rule 3), per app.

A run that waits is watched from the event loop when the Bridge offers `when_finished`: the
submit makes one trip to a thread, and the thread that finishes the job hands it to the loop,
so a waiting request holds no thread at all. A Bridge without it (a test's fake) is waited for
on the app's waiter pool, submit and wait on one thread while a waiter is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from corral.bridge.http_models import FINISHED_STATES

if TYPE_CHECKING:
    from corral.bridge.http_api import BridgeApi, HttpLimits
    from corral.bridge.service import JobView

CLIENT = "http"  # the `client` the Bridge counts this front end's submissions under
# Bridge.when_finished(job_id, callback) -> unwatch (returns the job as it is)
Watch = Callable[[str, Callable[["JobView"], None]], Callable[[], "JobView"]]


class Waits:
    """One app's Bridge, limits and waiter pool (`create_app` makes one).

    A run that waits is watched from the loop when the Bridge offers `when_finished` (see
    `_run_watched`). Otherwise waiting happens on `waiters`, and a run that waits is submitted
    on the same waiter thread (one hop instead of two) only while a waiter is free: with all of
    them busy, the submit goes through Starlette's pool first, as for any quick call, so a full
    waiter pool delays the wait but never the submission (validation, the approval request,
    the queue)."""

    def __init__(self, bridge: BridgeApi, http: HttpLimits, waiters: ThreadPoolExecutor) -> None:
        self.bridge = bridge
        self.http = http
        self.waiters = waiters
        self._lock = threading.Lock()
        self._in_flight = 0  # calls given to `waiters`, queued or running, not yet done

    async def run(self, name: str, args: Mapping[str, object], *, wait_s: float | None) -> JobView:
        """Submit; then, unless `wait_s` is None, wait up to `wait_s` for the job to finish."""
        submit = functools.partial(self.bridge.submit, name, args, client=CLIENT)
        watch = getattr(self.bridge, "when_finished", None)  # the real Bridge has it
        if wait_s is not None and watch is not None:
            return await self._run_watched(submit, watch, wait_s)
        if wait_s is not None and self._take_free_waiter():

            def submit_and_wait() -> JobView:
                view = submit()
                if view.state in FINISHED_STATES:
                    return view
                return self.bridge.wait(view.id, timeout_s=wait_s)

            return await self._on_waiter(submit_and_wait)
        view = await run_in_threadpool(submit)
        if wait_s is None or view.state in FINISHED_STATES:
            return view
        return await self.wait_for(view.id, wait_s)

    async def _run_watched(
        self, submit: Callable[[], JobView], watch: Watch, wait_s: float
    ) -> JobView:
        """Submit on a thread, then wait on this loop: the thread that finishes the job hands
        the result straight to the loop, so no thread sits waiting (one hop, one wake-up)."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[JobView] = loop.create_future()

        def deliver(view: JobView) -> None:  # on the thread that finished the job
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits now
                loop.call_soon_threadsafe(_settle, finished, view)

        def submit_and_watch() -> tuple[JobView, Callable[[], JobView] | None]:
            view = submit()
            if view.state in FINISHED_STATES:
                return view, None
            return view, watch(view.id, deliver)

        view, unwatch = await run_in_threadpool(submit_and_watch)
        if unwatch is None:
            return view
        try:
            return await asyncio.wait_for(finished, wait_s)
        except TimeoutError:
            return await run_in_threadpool(unwatch)  # the job as it is now, as `wait` gives
        except BaseException:  # cancelled: stop watching, without waiting for it
            with contextlib.suppress(RuntimeError):
                self.waiters.submit(unwatch)
            raise

    async def wait_for(self, job_id: str, seconds: float) -> JobView:
        deadline = time.monotonic() + seconds

        def wait() -> JobView:
            # Measured when a waiter thread is free, so time spent queueing counts.
            return self.bridge.wait(job_id, timeout_s=max(0.0, deadline - time.monotonic()))

        with self._lock:
            self._in_flight += 1
        return await self._on_waiter(wait)

    def _take_free_waiter(self) -> bool:
        with self._lock:
            if self._in_flight >= self.http.max_waiters:
                return False
            self._in_flight += 1
            return True

    async def _on_waiter(self, call: Callable[[], JobView]) -> JobView:
        """Run `call` on a waiter thread; the caller has counted it in `_in_flight`."""
        try:
            future = self.waiters.submit(call)
        except BaseException:
            self._done()
            raise
        # Counted down when the call ends (or is cancelled before it starts), not when this
        # request stops waiting for it: a cancelled request leaves its thread busy until then.
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def _done(self, _: object = None) -> None:
        with self._lock:
            self._in_flight -= 1


def _settle(future: asyncio.Future[JobView], view: JobView) -> None:
    if not future.done():  # not timed out or cancelled meanwhile
        future.set_result(view)

"""`corral serve --spool DIR`: the bridge for agents that can only share a folder with the host.

An agent in a VM or a container often cannot reach a host socket, but it can write into a
folder the host shares with it. This front end turns that folder into a request queue: the
agent drops request files, corral validates and runs them exactly as the HTTP API would
(`Bridge.submit`, same declarations, same approvals, same audit log) and writes result files.

The agent's contract (DIR is the spool directory):

1. A request is `DIR/requests/<id>.json`, a JSON object `{"command": NAME, "args": {...}}`
   ("args" may be left out; no other keys). `<id>` matches `[A-Za-z0-9_-]{1,64}`; use a fresh
   one per request (a UUID is best). At most 64 KiB; UTF-8; strict JSON (no NaN, no key twice).
2. Write it as `requests/<id>.json.tmp` (or any name starting with `.` or ending in `.tmp`,
   which corral never touches), then rename it to `<id>.json`: the rename is atomic. A file
   written in place also works: corral takes it only once it parses as complete JSON and its
   size and mtime were the same at two polls in a row. A file that still does not parse
   `grace_s` seconds (default 5) after its last change gets an error result.
3. Exactly one answer appears per request, always written atomically (a temporary dot file in
   results/, fsync, rename): a reader sees the whole file or none. Ignore dot files.
   - `results/<id>.json`: the request ran (or a human refused it):
     `{"id", "ok": bool, "job": {... "state", "exit_code", "stdout", "stderr", "truncated",
     "reason" ...}}`, plus `"error": {"code": "denied", "message", "hint"}` when refused.
   - `results/<id>.error.json`: the request was refused before anything ran:
     `{"id", "error": {"code", "message", "hint"}}` with the bridge's stable codes
     (`unknown_command`, `invalid_parameter`, ... and `malformed_request`,
     `request_too_large` for the file itself).
   - A file whose name is not `<id>.json` (nor a temporary name) gets
     `results/<sanitized>.error.json` with `"id": null` and `"file"`: its name with characters
     outside `[A-Za-z0-9_-]` turned into `_`, cut to 40, then `-` and the first 8 hex digits of
     the SHA-256 of the UTF-8 name.
   - While a human has to approve it, `results/<id>.pending.json` says so and how they do it
     (`corral approve ID`, `corral deny ID`, or the page of `corral serve`). It goes away once
     decided; keep waiting for `<id>.json`, do not send the request again.
4. Taking a request moves it to `DIR/processing/` (a rename: no request is taken twice); it is
   deleted once its answer is written, and earlier answers for the same id are deleted when it
   is taken. Symlinks, FIFOs and other non-regular files are refused without being opened, and
   removed (removing a symlink leaves its target alone); a directory is reported once.
5. Requests are taken in order of arrival. At most `max_in_flight` are in progress (waiting for
   approval, queued or running); the rest wait in requests/. When the bridge answers
   `too_many_jobs` or `rate_limited`, the request waits on disk and is retried: the spool is
   the queue, so a flood is slowed down, never refused.

Who may write the folder: whoever can write requests can ask for every declared command, so by
default (`access="private"`) the directory must belong to the user running corral and be
writable by nobody else; it is created 0700 when absent. `access="shared"`
(`--spool-access shared`) accepts a folder other users can write: the user states that this is
the folder they share with the agent (a VM's shared directory, a container's volume), and its
permissions are theirs to get right. Subdirectories corral creates there take the folder's
mode, and result files are 0644 so an agent under another uid can read them.

Not defended: an agent that can write the folder can fill it (requests wait on disk) and can
read every result in it; keep one spool per agent. Do not put the spool inside the workspace
of a writable command, or the command could write requests (still validated and approved).

One server per spool (a flock on `DIR/.corral-spool.lock`): requests a dead server left in
processing/ get an error saying they were interrupted and may or may not have run.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, NamedTuple

from corral.bridge.errors import BridgeError
from corral.bridge.spool_files import (
    MAX_REQUEST_BYTES,
    TEMP_SUFFIX,
    Access,
    Request,
    RequestProblem,
    error_json,
    exists,
    interrupted_json,
    is_ignored,
    open_spool,
    parse_json,
    parse_request,
    problem_json,
    read_request,
    remove_quietly,
    request_id,
    result_json,
    sanitized,
    write_json_atomically,
)

if TYPE_CHECKING:
    from corral.bridge.service import Bridge, JobView

FINAL_STATES = frozenset({"succeeded", "failed", "denied", "timed_out"})
# The bridge is full: leave the request on disk and try again shortly.
CAPACITY_CODES = frozenset({"too_many_jobs", "rate_limited"})
CAPACITY_BACKOFF_S = 0.25
# A rate limit says when to come back; look again at least this often all the same.
MAX_BACKOFF_S = 5.0
# How long one `Bridge.wait` blocks before the waiter looks at the job's state again (to
# write or remove the pending file, or to give up when the server stops).
WAIT_SLICE_S = 0.5
DEFAULT_GRACE_S = 5.0
DEFAULT_MAX_IN_FLIGHT = 32
DEFAULT_DRAIN_S = 30.0


class _Seen(NamedTuple):
    """What the last poll saw of one request file."""

    key: tuple[int, int, int]  # inode, size, mtime in ns
    seq: int  # order of arrival
    changed: float  # monotonic time of the last change seen
    stable: bool  # unchanged since the poll before


def _stderr_log(message: str) -> None:
    print(f"corral spool: {message}", file=sys.stderr, flush=True)


class SpoolServer:
    """Serves one spool directory for one `Bridge`. `poll_once` is one round (tests drive it);
    `serve` loops until `stop` is set, then lets jobs in progress finish for up to `drain_s`
    (those waiting for a human are answered at once: the bridge goes away with the server).
    Raises UsageError at construction when the directory cannot be used."""

    def __init__(
        self,
        bridge: Bridge,
        directory: str,
        *,
        access: Access = "private",
        poll_s: float = 0.1,
        grace_s: float = DEFAULT_GRACE_S,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        client: str = "spool",
        log: Callable[[str], None] = _stderr_log,
    ) -> None:
        self.bridge = bridge
        self.dirs = open_spool(directory, access=access)
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.max_in_flight = max_in_flight
        self.client = client
        self.log = log
        self.polls = 0
        self._seen: dict[str, _Seen] = {}
        self._next_seq = 0
        self._reported: set[tuple[str, int]] = set()  # directories named like requests
        self._retry: deque[tuple[str, Request]] = deque()  # taken, refused for capacity
        self._backoff_until = 0.0
        self._busy: set[str] = set()  # ids taken and not yet answered
        self._busy_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="corral-spool")
        self._waiters: list[Future[None]] = []  # touched by the serving thread only
        self._stopping = threading.Event()  # close() began: no human will decide in time
        self._abandon = threading.Event()  # the drain is over: answer what is left
        self._closed = False
        self._recover()

    # -- the loop ------------------------------------------------------------------------

    def serve(self, stop: threading.Event, *, drain_s: float = DEFAULT_DRAIN_S) -> None:
        self.log(f"serving {self.dirs.path} (requests/ -> results/)")
        try:
            while not stop.is_set():
                try:
                    self.poll_once()
                except OSError as exc:  # the folder itself failed us; the next poll retries
                    self.log(f"poll failed: {exc}")
                stop.wait(self.poll_s)
        finally:
            self.close(drain_s=drain_s)

    def poll_once(self) -> None:
        ready = self._scan(time.monotonic())
        self._dispatch(ready)
        self.polls += 1

    def close(self, *, drain_s: float = 0.0) -> None:
        """Stop: jobs in progress get `drain_s` to finish, then an error saying they were
        interrupted; requests taken but not yet accepted by the bridge go back to requests/."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        wait_futures(self._waiters, timeout=drain_s)
        self._abandon.set()
        self._pool.shutdown(wait=True)
        while self._retry:
            rid, _ = self._retry.popleft()
            name = f"{rid}.json"
            try:
                if not exists(self.dirs.requests, name):
                    move = {"src_dir_fd": self.dirs.processing, "dst_dir_fd": self.dirs.requests}
                    os.rename(name, name, **move)
            except OSError as exc:  # the next start answers it as interrupted
                self.log(f"{rid}: cannot put it back in requests/: {exc}")
        self.dirs.close()

    # -- seeing requests -----------------------------------------------------------------

    def _scan(self, now: float) -> list[str]:
        """Update what is known of requests/ and refuse what can be refused at sight.
        Returns the names ready to be taken, in order of arrival."""
        fresh: list[tuple[int, str, tuple[int, int, int]]] = []
        present: set[str] = set()
        for name in os.listdir(self.dirs.requests):
            if is_ignored(name):
                continue
            try:
                info = os.stat(name, dir_fd=self.dirs.requests, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if self._refused_at_sight(name, info):
                continue
            present.add(name)
            key = (info.st_ino, info.st_size, info.st_mtime_ns)
            old = self._seen.get(name)
            if old is None or old.key[0] != info.st_ino:
                fresh.append((info.st_mtime_ns, name, key))
            elif old.key != key:
                self._seen[name] = old._replace(key=key, changed=now, stable=False)
            else:
                self._seen[name] = old._replace(stable=True)
        for name in set(self._seen) - present:
            del self._seen[name]
        for _, name, key in sorted(fresh):
            self._seen[name] = _Seen(key, self._next_seq, now, stable=False)
            self._next_seq += 1
        waiting = sorted((seen.seq, name) for name, seen in self._seen.items() if seen.stable)
        return [name for _, name in waiting if self._is_complete(name, now)]

    def _refused_at_sight(self, name: str, info: os.stat_result) -> bool:
        rid = request_id(name)
        problem = None
        if rid is None:
            problem = RequestProblem(
                "malformed_request",
                "a request file must be named ID.json, ID of 1 to 64 of A-Z a-z 0-9 _ -",
                hint="write to a name ending in .tmp, then rename it to ID.json",
            )
        elif stat.S_ISLNK(info.st_mode):
            problem = RequestProblem(
                "malformed_request",
                "the request file is a symlink; corral does not follow links in the spool",
                hint="write the request as a regular file",
            )
        elif stat.S_ISDIR(info.st_mode):
            if (name, info.st_ino) not in self._reported:
                self._reported.add((name, info.st_ino))
                self._answer_error(
                    rid, RequestProblem("malformed_request", "not a file"), file=name
                )
            return True
        elif not stat.S_ISREG(info.st_mode):
            problem = RequestProblem("malformed_request", "the request is not a regular file")
        elif info.st_size > MAX_REQUEST_BYTES:
            problem = RequestProblem(
                "request_too_large", f"the request file has more than {MAX_REQUEST_BYTES} bytes"
            )
        if problem is None:
            return False
        if rid is None or rid not in self._busy:
            self._answer_error(rid, problem, file=name)
            remove_quietly(self.dirs.requests, name)
        return True

    def _is_complete(self, name: str, now: float) -> bool:
        """Whether a stable file parses; one that has not for `grace_s` is refused."""
        try:
            parse_json(read_request(self.dirs.requests, name))
        except FileNotFoundError:
            return False
        except RequestProblem:
            return True  # taking it answers with the same problem
        except ValueError:
            return now - self._seen[name].changed >= self.grace_s
        return True

    # -- taking and submitting -----------------------------------------------------------

    def _dispatch(self, ready: list[str]) -> None:
        if time.monotonic() < self._backoff_until:
            return
        while self._retry:
            if not self._submit(*self._retry[0]):
                return
            self._retry.popleft()
        for name in ready:
            if len(self._busy) >= self.max_in_flight:
                return
            rid = request_id(name)
            if rid is None or rid in self._busy:
                continue  # the same id is still in progress: this one waits its turn
            taken = self._take(rid, name)
            if taken is not None and not self._submit(rid, taken):
                self._retry.append((rid, taken))
                return

    def _take(self, rid: str, name: str) -> Request | None:
        """Move the request into processing/ and read it there; None when answered already."""
        try:
            os.rename(name, name, src_dir_fd=self.dirs.requests, dst_dir_fd=self.dirs.processing)
        except FileNotFoundError:
            return None  # the agent took it back
        del self._seen[name]
        with self._busy_lock:
            self._busy.add(rid)
        self._clear_answers(rid)
        try:
            return parse_request(read_request(self.dirs.processing, name))
        except RequestProblem as problem:
            self._finish(rid, f"{rid}.error.json", {"id": rid, **problem_json(problem)})
        except OSError as exc:
            self._finish(rid, f"{rid}.error.json", {"id": rid, **error_json("internal", str(exc))})
        return None

    def _submit(self, rid: str, request: Request) -> bool:
        """Hand the request to the bridge. False: the bridge is full, try again later."""
        try:
            job = self.bridge.submit(request.command, request.args, client=self.client)
        except BridgeError as exc:
            if exc.code in CAPACITY_CODES:
                wait = exc.detail.get("retry_after_s")
                wait = min(wait, MAX_BACKOFF_S) if isinstance(wait, int | float) else 0.0
                self._backoff_until = time.monotonic() + max(wait, CAPACITY_BACKOFF_S)
                return False
            self._finish(rid, f"{rid}.error.json", {"id": rid, **exc.as_json()})
            return True
        except Exception as exc:  # a bug in the bridge must not take the spool down
            self.log(f"{rid}: the bridge failed: {exc!r}")
            self._finish(rid, f"{rid}.error.json", {"id": rid, **error_json("internal", repr(exc))})
            return True
        self.log(f"{rid}: {request.command} is job {job.id} ({job.state})")
        self._waiters = [waiter for waiter in self._waiters if not waiter.done()]
        self._waiters.append(self._pool.submit(self._await, rid, job))
        return True

    # -- waiting and answering -----------------------------------------------------------

    def _await(self, rid: str, job: JobView) -> None:
        """On a worker thread: follow the job to its end and write its answer."""
        pending_shown = False
        try:
            while job.state not in FINAL_STATES:
                awaiting = job.state == "awaiting_approval"
                if self._abandon.is_set() or (awaiting and self._stopping.is_set()):
                    self._finish(rid, f"{rid}.error.json", interrupted_json(rid, job.state))
                    return
                if awaiting != pending_shown:
                    self._show_pending(rid, job, shown=awaiting)
                    pending_shown = awaiting
                job = self.bridge.wait(job.id, timeout_s=WAIT_SLICE_S)
            self._finish(rid, f"{rid}.json", result_json(rid, job))
        except Exception as exc:
            self.log(f"{rid}: waiting for job {job.id} failed: {exc!r}")
            self._finish(rid, f"{rid}.error.json", {"id": rid, **error_json("internal", repr(exc))})

    def _show_pending(self, rid: str, job: JobView, *, shown: bool) -> None:
        """Write or remove results/<id>.pending.json; a failure here is logged, not fatal."""
        name = f"{rid}.pending.json"
        try:
            if shown:
                self._write_pending(rid, job, name)
            else:
                remove_quietly(self.dirs.results, name)
        except Exception as exc:
            self.log(f"{rid}: cannot update {name}: {exc!r}")

    def _write_pending(self, rid: str, job: JobView, name: str) -> None:
        approval = next((p for p in self.bridge.pending() if p.id == job.approval_id), None)
        aid = job.approval_id or "ID"
        document = {
            "id": rid,
            "state": "awaiting_approval",
            "job": job.as_json(),
            "approval": approval.as_json() if approval else {"id": job.approval_id},
            "message": "This request waits for a human's approval. Keep waiting for "
            f"results/{rid}.json; do not send it again.",
            "how_to_approve": f"A human runs `corral approve {aid}` (or `corral deny {aid}`), "
            "or decides on the approvals page of `corral serve`.",
        }
        self.log(f"{rid}: job {job.id} awaits approval: corral approve {aid}")
        write_json_atomically(self.dirs.results, name, document, mode=self.dirs.file_mode)

    def _answer_error(self, rid: str | None, problem: RequestProblem, *, file: str = "") -> None:
        """An error file for a request that was never taken (refused at sight)."""
        document: dict[str, object] = {"id": rid, **problem_json(problem)}
        if rid is None:
            document["file"] = file
        else:
            self._clear_answers(rid)
        name = f"{rid if rid is not None else sanitized(file)}.error.json"
        self.log(f"refused {file or rid!r}: {problem.message}")
        write_json_atomically(self.dirs.results, name, document, mode=self.dirs.file_mode)

    def _finish(self, rid: str, name: str, document: dict[str, object]) -> None:
        """Write the one answer, then forget the request. The pending note goes first, so an
        agent that sees the answer never sees it still pending (for a moment it sees neither,
        and the note said to keep waiting for the answer). Answer before forgetting: if corral
        dies in between, the request is still in processing/ and gets answered at the next
        start."""
        try:
            remove_quietly(self.dirs.results, f"{rid}.pending.json")
            write_json_atomically(self.dirs.results, name, document, mode=self.dirs.file_mode)
            remove_quietly(self.dirs.processing, f"{rid}.json")
        except OSError as exc:
            self.log(f"{rid}: cannot write {name}: {exc}")
        finally:
            with self._busy_lock:
                self._busy.discard(rid)

    def _clear_answers(self, rid: str) -> None:
        """Answers left from an earlier request with the same id must not pass for this one's."""
        for old in (f"{rid}.json", f"{rid}.error.json", f"{rid}.pending.json"):
            remove_quietly(self.dirs.results, old)

    def _recover(self) -> None:
        """Answer what a dead server left in processing/, and drop its temporary files."""
        for name in os.listdir(self.dirs.results):
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                remove_quietly(self.dirs.results, name)
        for name in os.listdir(self.dirs.processing):
            rid = request_id(name)
            answered = rid is None or any(
                exists(self.dirs.results, f"{rid}{suffix}") for suffix in (".json", ".error.json")
            )
            if rid is not None and not answered:
                self._finish(rid, f"{rid}.error.json", interrupted_json(rid, "unknown"))
            remove_quietly(self.dirs.processing, name)


def serve_spool(
    bridge: Bridge,
    directory: str,
    *,
    stop: threading.Event | None = None,
    poll_s: float = 0.1,
    access: Access = "private",
    grace_s: float = DEFAULT_GRACE_S,
    drain_s: float = DEFAULT_DRAIN_S,
    log: Callable[[str], None] = _stderr_log,
) -> None:
    """Serve DIR until `stop` is set (or forever); see the module docstring for the protocol."""
    server = SpoolServer(bridge, directory, access=access, poll_s=poll_s, grace_s=grace_s, log=log)
    server.serve(stop or threading.Event(), drain_s=drain_s)

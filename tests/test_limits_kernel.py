"""Resource limits in real sandboxes, each limit hit and judged from the host.

These tests apply the limits the way the runner does (bwrap waits on --block-fd,
corral sets the rlimits on the sandbox's pid 1, then lets it go) and judge from the host:
process counts in /proc, file sizes on disk, exit statuses. Each workload is bounded and is
first run without the limit, to show that it would go past it.

The kernel exempts root from RLIMIT_NPROC, so when the tests run as root the launcher drops
to an otherwise unused uid (TEST_UID) in a forked child, as corral would run for a user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from typing import IO, NamedTuple

import pytest

from corral.backends.bubblewrap import BwrapOptions, bwrap_argv
from corral.backends.facts import gather_disk_facts
from corral.backends.fsplan import plan_filesystem
from corral.backends.limits import (
    NOT_ENFORCED,
    apply_rlimits,
    launch_rlimits,
    limits_in_force,
    make_preexec,
    release_gate,
)
from corral.backends.seccomp import open_program_fd
from corral.policy.model import Limits, Policy
from corral.policy.presets import preset_policy
from corral.probe import MachineFacts, gather_facts, run_bwrap_version
from corral.sandbox import Sandbox
from tests.conftest import Layout
from tests.test_limits import NPROC, MiB, mechanism_of

TEST_UID = 64923  # used by nothing else on the test machine; checked before each run
MARKER = "CORRAL_LIMITS_TEST"
SAFETY_NET = 400  # tasks the test user may have in all, whatever the code under test does


class Outcome(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def machine() -> MachineFacts:
    return gather_facts()


def _run_uid() -> int:
    return TEST_UID if os.geteuid() == 0 else os.getuid()


def _marked_tasks(token: str) -> int:
    """Tasks on the host whose environment carries the test's token (bwrap itself included)."""
    needle = f"{MARKER}={token}".encode()
    total = 0
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/status", "rb") as f:
                threads = [line for line in f.read().splitlines() if line.startswith(b"Threads:")]
            total += int(threads[0].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total


def _live_tasks_of(uid: int) -> int:
    """Tasks of `uid` that are not zombies. bwrap exits as soon as it has the command's status,
    so the sandbox's pid 1 is reaped by the host's init, which here takes up to two seconds;
    by then it is a zombie, and a zombie pid 1 means its namespace is already empty."""
    total = 0
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f.read().splitlines())
        except (OSError, ValueError):
            continue
        live = not fields.get(b"State", b"").strip().startswith(b"Z")
        if live and int(fields.get(b"Uid", b"-1").split()[0]) == uid:
            total += int(fields.get(b"Threads", b"1"))
    return total


def _policy(layout: Layout, limits: Limits) -> Policy:
    """Standard mode, writable workspace, no deny lists: these tests are about limits, and
    without denied paths the plan needs no placeholder files."""
    policy = preset_policy("standard", layout.host())
    fs = policy.filesystem
    ws = tuple(rule for rule in fs.write if rule.value == layout.workspace)
    fs = fs._replace(write=ws, deny_read=(), deny_write=())
    return policy._replace(filesystem=fs, package_cache=None, limits=limits)


def _launch(policy: Policy, argv: list[str], env: dict[str, str], facts: MachineFacts) -> Launched:
    """Start bwrap held at --block-fd, apply the limits to its pid 1, release it."""
    plan = plan_filesystem(policy, gather_disk_facts(policy))
    assert plan.placeholders == ()
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    status_r, status_w = os.pipe()
    gate_r, gate_w = os.pipe()
    seccomp_fd = open_program_fd(Sandbox(policy).seccomp_program())
    options = BwrapOptions(
        cwd=policy.workspace,
        uid=os.getuid(),
        gid=os.getgid(),
        bwrap_version=run_bwrap_version(bwrap) or (0, 0, 0),
        seccomp_fd=seccomp_fd,
        status_fd=status_w,
    )
    command = bwrap_argv(plan, options, argv, bwrap=bwrap)
    at = command.index("--")
    command[at:at] = ["--block-fd", str(gate_r)]
    popen = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(status_w, seccomp_fd, gate_r),
        # The safety net: whatever happens below, this user has at most SAFETY_NET tasks.
        preexec_fn=make_preexec([(NPROC, SAFETY_NET, SAFETY_NET)]),
    )
    for fd in (status_w, seccomp_fd, gate_r):
        os.close(fd)
    status = os.fdopen(status_r, "rb")
    init = json.loads(status.readline())["child-pid"]
    try:
        apply_rlimits(init, launch_rlimits(policy.limits, facts))
    except OSError:
        popen.kill()  # fail closed: the command never starts
        raise
    release_gate(gate_w)
    return Launched(popen, status)


class Launched(NamedTuple):
    popen: subprocess.Popen[bytes]
    status: IO[bytes]

    def finish(self, *, kill: bool = False) -> Outcome:
        """Wait for the sandbox; the command's exit status as a shell reports it."""
        if kill:
            self.popen.kill()
        out, err = self.popen.communicate(timeout=120)
        lines = self.status.read().splitlines()
        self.status.close()
        codes = [json.loads(line)["exit-code"] for line in lines if b'"exit-code"' in line]
        code = codes[0] if codes else 128 - self.popen.returncode
        return Outcome(code, out.decode(errors="replace"), err.decode(errors="replace"))


def _become_run_user(layout: Layout) -> None:
    if os.geteuid() != 0:
        return
    os.setgroups([])
    os.setgid(TEST_UID)
    os.setuid(TEST_UID)
    assert os.getuid() == TEST_UID


def run_limited(
    layout: Layout,
    argv: list[str],
    limits: Limits,
    facts: MachineFacts,
    *,
    during: Callable[[str], None] | None = None,
) -> Outcome:
    """Run `argv` in a sandbox with `limits`, launched by a forked child as the run user.

    With `during`, it is called with the run's marker token while the sandbox runs, and the
    sandbox is killed afterwards (as Sandbox.kill does: bwrap, then its pid namespace).
    """
    uid = _run_uid()
    if uid == TEST_UID:
        assert _live_tasks_of(TEST_UID) == 0, f"uid {TEST_UID} is in use"
        for dirpath, dirnames, filenames in os.walk(layout.root):
            for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
                os.lchown(name, TEST_UID, TEST_UID)
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**layout.env, MARKER: token}
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.close(report_r)
        os.close(go_w)
        code = 0
        try:
            _become_run_user(layout)
            launched = _launch(_policy(layout, limits), argv, env, facts)
            if during is not None:
                os.write(report_w, b"running\n")
                os.read(go_r, 1)
            result = list(launched.finish(kill=during is not None))
        except BaseException:
            result = [-1000, "", traceback.format_exc()]
            code = 1
        os.write(report_w, (json.dumps(result) + "\n").encode())
        os._exit(code)
    os.close(report_w)
    os.close(go_r)
    with os.fdopen(report_r, "rb") as report:
        if during is not None:
            line = report.readline()
            try:
                if line == b"running\n":
                    during(token)
            finally:
                os.close(go_w)
        else:
            os.close(go_w)
        last = report.readlines()[-1]
    os.waitpid(child, 0)
    returncode, stdout, stderr = json.loads(last)
    assert returncode != -1000, stderr
    return Outcome(returncode, stdout, stderr)


@pytest.fixture
def sandbox_layout(sandbox_available: None, layout: Layout) -> Iterator[Layout]:
    yield layout


# A bounded stand-in for a fork bomb: up to 200 children that wait together, then all exit.
FORKER = """
import os, sys
r, w = os.pipe()
count, error = 0, ""
for _ in range(200):
    try:
        pid = os.fork()
    except OSError as exc:
        error = exc.strerror
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    count += 1
os.close(w)
print(count, error)
"""

HOG = """
chunks = []
try:
    while len(chunks) < 32:
        chunks.append(bytearray(16 << 20))
except MemoryError:
    print("MemoryError at", 16 * len(chunks), "MiB")
    raise SystemExit(3)
print("allocated", 16 * len(chunks), "MiB")
"""

OPENER = """
files = []
try:
    while len(files) < 200:
        files.append(open("/dev/null"))
except OSError as exc:
    print(len(files), exc.strerror)
else:
    print(len(files), "")
"""

SPINNER = """
import time
while time.process_time() < 2:
    pass
print("spun 2 s")
"""


def _forked(outcome: Outcome) -> tuple[int, str]:
    count, _, error = outcome.stdout.strip().partition(" ")
    return int(count), error


@pytest.mark.parametrize("limit", [None, 64])
def test_processes(sandbox_layout: Layout, machine: MachineFacts, limit: int | None) -> None:
    outcome = run_limited(
        sandbox_layout, ["python3", "-c", FORKER], Limits(processes=limit), machine
    )
    count, error = _forked(outcome)
    if limit is None:
        assert (count, error) == (200, "")
    else:
        # pid 1, python, and the children: never more than the limit in the sandbox.
        assert count <= limit - 2
        assert error == "Resource temporarily unavailable"


def test_fork_bomb_is_held_and_the_user_can_still_fork(
    sandbox_layout: Layout, machine: MachineFacts
) -> None:
    bomb = "exec 2>/dev/null; :(){ :|:& };:; exec sleep 600"
    seen: list[int] = []
    tokens: list[str] = []

    def watch(token: str) -> None:
        tokens.append(token)
        deadline = time.monotonic() + 60
        while _marked_tasks(token) < 56 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(40):
            seen.append(_marked_tasks(token))
            time.sleep(0.025)
        # The user's own work outside is not starved while the bomb sits at its limit.
        assert subprocess.run(["true"], user=_run_uid(), check=False).returncode == 0

    run_limited(sandbox_layout, ["bash", "-c", bomb], Limits(processes=64), machine, during=watch)
    assert max(seen) >= 56, seen  # the bomb did reach its limit...
    assert max(seen) <= 64 + 1, seen  # ...and never passed it (+1: bwrap, outside)
    assert _eventually_none_left(tokens[0])
    assert subprocess.run(["true"], user=_run_uid(), check=False).returncode == 0


def _eventually_none_left(token: str) -> bool:
    def none_left() -> bool:
        left = _marked_tasks(token)
        if _run_uid() == TEST_UID:
            left += _live_tasks_of(TEST_UID)
        return left == 0

    return _eventually(none_left)


def _eventually(condition: Callable[[], bool]) -> bool:
    """Whether `condition` holds within a minute (the kernel empties a dead pid namespace
    at once; the deadline only guards against a hang)."""
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("limit", [None, 256 * MiB])
def test_memory(sandbox_layout: Layout, machine: MachineFacts, limit: int | None) -> None:
    outcome = run_limited(
        sandbox_layout, ["python3", "-c", HOG], Limits(memory_bytes=limit), machine
    )
    if limit is None:
        assert (outcome.returncode, outcome.stdout) == (0, "allocated 512 MiB\n")
    else:
        # An allocation error the program handled (exit 3), not the OOM killer's SIGKILL.
        assert outcome.returncode == 3, outcome
        words = outcome.stdout.split()
        assert words[0] == "MemoryError"
        assert int(words[2]) < 256


@pytest.mark.parametrize("limit", [None, MiB])
def test_file_size(sandbox_layout: Layout, machine: MachineFacts, limit: int | None) -> None:
    target = f"{sandbox_layout.workspace}/big.bin"
    write = "head -c 2097152 /dev/zero > big.bin"
    outcome = run_limited(
        sandbox_layout, ["bash", "-c", write], Limits(file_size_bytes=limit), machine
    )
    size = os.path.getsize(target)
    if limit is None:
        assert (outcome.returncode, size) == (0, 2 * MiB)
    else:
        assert size <= limit
        assert outcome.returncode == 128 + 25  # SIGXFSZ


@pytest.mark.parametrize("limit", [None, 64])
def test_open_files(sandbox_layout: Layout, machine: MachineFacts, limit: int | None) -> None:
    outcome = run_limited(
        sandbox_layout, ["python3", "-c", OPENER], Limits(open_files=limit), machine
    )
    count, error = _forked(outcome)
    if limit is None:
        assert (count, error) == (200, "")
    else:
        assert count <= limit - 3  # stdin, stdout and stderr count too
        assert error == "Too many open files"


@pytest.mark.parametrize("limit", [None, 1])
def test_cpu_time(sandbox_layout: Layout, machine: MachineFacts, limit: int | None) -> None:
    outcome = run_limited(
        sandbox_layout, ["python3", "-c", SPINNER], Limits(cpu_seconds=limit), machine
    )
    if limit is None:
        assert (outcome.returncode, outcome.stdout) == (0, "spun 2 s\n")
    else:
        assert outcome.returncode == 128 + 24  # SIGXCPU at the soft limit
        assert outcome.stdout == ""


def test_root_is_exempt_from_the_process_limit_as_limits_in_force_says(
    sandbox_layout: Layout, machine: MachineFacts
) -> None:
    """The same bounded forker, launched as whoever runs the tests (root here): what the
    kernel does must match what `limits_in_force` tells the user."""
    limits = Limits(processes=64)
    mechanism = mechanism_of(limits_in_force(limits, machine), "processes")
    policy = _policy(sandbox_layout, limits)
    env = {**sandbox_layout.env, MARKER: "as-self"}
    count, _ = _forked(_launch(policy, ["python3", "-c", FORKER], env, machine).finish())
    enforced = not mechanism.startswith(NOT_ENFORCED)
    assert enforced == (count < 64), (mechanism, count)
    assert enforced == (os.geteuid() != 0)

"""`corral run` is transparent: exit codes, signals, stdin and output pass through, and nothing
else does (no leaked fds, no survivors after --timeout, no command when the settings are
broken). Each claim is checked from the host side; where it makes sense, the same thing is first
done without corral and seen to behave the other way, so the check can fail.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.conftest import Layout
from tests.helpers_cli import (
    Proc,
    corral_run,
    descendants,
    fd_listing,
    open_leaky_fd,
    read_proc,
    run_cli,
    still_alive,
    wait_for_line,
    write_settings,
)

pytestmark = pytest.mark.usefixtures("sandbox_available")

# --- exit status -------------------------------------------------------------------------------

EXIT_CODES = pytest.mark.parametrize("code", [0, 1, 42, 255])


@EXIT_CODES
def test_exit_code_passes_through_the_cli(layout: Layout, code: int) -> None:
    done = run_cli(layout, "--", "bash", "-c", f"exit {code}")
    assert done.returncode == code, done.stderr


@EXIT_CODES
def test_exit_code_passes_through_the_api(layout: Layout, code: int) -> None:
    result = layout.sandbox().run(["bash", "-c", f"exit {code}"], env=layout.env)
    assert result.returncode == code


SIGNAL_DEATHS = pytest.mark.parametrize(
    ("signal_name", "status"), [("TERM", 128 + 15), ("KILL", 128 + 9)]
)


@SIGNAL_DEATHS
def test_death_by_signal_is_reported_as_a_shell_would(
    layout: Layout, signal_name: str, status: int
) -> None:
    script = f"kill -{signal_name} $$"
    done = run_cli(layout, "--", "bash", "-c", script)
    assert done.returncode == status, done.stderr
    assert layout.sandbox().run(["bash", "-c", script], env=layout.env).returncode == status


# --- signals sent to corral --------------------------------------------------------------------


def trap_script(signal_name: str) -> str:
    """Says "ready" once its trap is set; the trap leaves a marker file and exits 7."""
    return (
        f"trap 'echo {signal_name} > trapped; exit 7' {signal_name}; "
        "sleep 1000 >/dev/null 2>&1 & echo ready; wait"
    )


def start_trap(layout: Layout, signal_name: str) -> subprocess.Popen[bytes]:
    # stdin is not a terminal, so corral runs the command in a session of its own. A session of
    # its own for corral too, so that signalling corral's group never reaches pytest.
    return subprocess.Popen(
        corral_run("--", "bash", "-c", trap_script(signal_name)),
        cwd=layout.workspace,
        env=layout.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


SIGNALS = pytest.mark.parametrize(
    ("sig", "signal_name"), [(signal.SIGTERM, "TERM"), (signal.SIGINT, "INT")], ids=["TERM", "INT"]
)


@SIGNALS
def test_signal_to_corral_is_forwarded(layout: Layout, sig: int, signal_name: str) -> None:
    proc = start_trap(layout, signal_name)
    try:
        wait_for_line(proc.stdout, b"ready", what="the trap is set")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert layout.read("home/project/trapped") == f"{signal_name}\n"
    assert proc.returncode == 7, err


@SIGNALS
def test_signal_to_corrals_process_group_is_forwarded(
    layout: Layout, sig: int, signal_name: str
) -> None:
    # Ctrl-C in a terminal signals the whole foreground process group, not just corral.
    proc = start_trap(layout, signal_name)
    try:
        wait_for_line(proc.stdout, b"ready", what="the trap is set")
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 7, err
    assert layout.read("home/project/trapped") == f"{signal_name}\n"


# --- --timeout ---------------------------------------------------------------------------------

TIMEOUT = 4  # seconds: the script needs well under one to say "ready", even on a slow machine

# A daemon in a session of its own and an orphaned grandchild writing a heartbeat: neither is
# in the command's process group, so killing the group alone would leave both behind.
DAEMONS = (
    "( (while :; do echo beat >> heartbeat; sleep 0.2; done) >/dev/null 2>&1 & "
    "echo $! > heartbeat.pid ); "
    "setsid sleep 1000 >/dev/null 2>&1 & echo $! > sleep.pid; "
    "echo ready; wait"
)


@pytest.mark.parametrize("runner", ["timeout(1)", "corral"])
def test_timeout_kills_the_whole_tree(layout: Layout, runner: str) -> None:
    if runner == "corral":
        argv = corral_run("--timeout", str(TIMEOUT), "--", "bash", "-c", DAEMONS)
    else:
        argv = ["timeout", str(TIMEOUT), "bash", "-c", DAEMONS]
    proc = subprocess.Popen(
        argv,
        cwd=layout.workspace,
        env=layout.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watched: list[Proc] = []
    try:
        wait_for_line(proc.stdout, b"ready", what="the daemons are started")
        watched = descendants(proc.pid)
        daemons = [find_daemon(layout, name, watched, runner) for name in ("sleep", "heartbeat")]
        watched += daemons
        _, err = proc.communicate(timeout=60)
        survivors = still_alive(watched)
    finally:
        proc.kill()
        for leftover in still_alive(watched):
            os.kill(leftover.pid, signal.SIGKILL)
    assert proc.returncode == 124, err
    assert bool(survivors) == (runner != "corral"), survivors


def find_daemon(layout: Layout, name: str, tree: list[Proc], runner: str) -> Proc:
    """The process whose pid the script wrote to NAME.pid. That pid is the one the script sees:
    inside corral, its pid namespace's (the last NSpid); under timeout(1), the host's."""
    pid = int(layout.read(f"home/project/{name}.pid"))
    found = [p for p in tree if p.ns_pids[-1] == pid]
    if runner != "corral" and not found:
        # An orphan is re-parented to the host's init, out of the tree; the pid is a host pid.
        found = [p for p in [read_proc(pid)] if p is not None]
    assert found, f"{name} (pid {pid}) is not running before the timeout: {tree}"
    return found[0]


# --- stdin, stdout, stderr ---------------------------------------------------------------------


def test_stdin_passes_through(layout: Layout) -> None:
    upper = "import sys; print(sys.stdin.read().upper())"
    done = run_cli(layout, "--", "python3", "-c", upper, input=b"abc")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"ABC\n"


def test_stdout_and_stderr_stay_separate(layout: Layout) -> None:
    done = run_cli(layout, "--quiet", "--", "bash", "-c", "echo to-out; echo to-err >&2")
    assert (done.stdout, done.stderr) == (b"to-out\n", b"to-err\n")


# --- file descriptors --------------------------------------------------------------------------

LS_AND_WRITE = "ls -l /proc/self/fd; echo written-through-fd >&{fd}"


@pytest.mark.parametrize("runner", ["direct", "cli", "api"])
def test_leaked_fd_does_not_reach_the_sandbox(layout: Layout, runner: str) -> None:
    log = f"{layout.outside}/leaked.log"
    fd = open_leaky_fd(log)
    argv = ["bash", "-c", LS_AND_WRITE.format(fd=fd)]
    try:
        if runner == "direct":
            out = subprocess.run(
                argv, cwd=layout.workspace, env=layout.env, capture_output=True, close_fds=False
            ).stdout
        elif runner == "cli":
            out = run_cli(layout, "--", *argv, pass_fds=(fd,)).stdout
        else:
            out = layout.sandbox().run(argv, env=layout.env, capture_output=True).stdout or b""
    finally:
        os.close(fd)
    fds = fd_listing(out)
    written = layout.read("outside/leaked.log") == "written-through-fd\n"
    leaked = fd in fds
    assert (leaked, written) == ((True, True) if runner == "direct" else (False, False)), out
    assert {0, 1, 2} <= set(fds), out  # ls did run
    if runner != "direct":
        # 0-2 and the directory ls is reading; nothing else.
        assert set(fds) <= {0, 1, 2, 3}, fds
        assert "leaked.log" not in out.decode()


def test_spawn_passes_an_explicit_fd(layout: Layout) -> None:
    fd = open_leaky_fd(f"{layout.outside}/passed.log")
    try:
        proc = layout.sandbox().spawn(
            ["bash", "-c", LS_AND_WRITE.format(fd=fd)],
            env=layout.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            pass_fds=(fd,),
        )
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == 0
    assert fd in fd_listing(out or b"")
    assert layout.read("outside/passed.log") == "written-through-fd\n"


# --- settings ----------------------------------------------------------------------------------

BROKEN_JSON = '{\n  "mode": "strict",\n  oops\n}\n'


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{}", None),  # the control: a valid file lets the command run
        (BROKEN_JSON, [":3:3:", "invalid JSON"]),
        ('{"filesystem": {"denyReed": ["~/x"]}}', ["filesystem", "denyReed", "unknown key"]),
        ('{"sandboxx": true}', ["sandboxx", "unknown key"]),
        ('{"network": {"allowedDomains": "example.com"}}', ["network.allowedDomains", "array"]),
        ('{"allowUnsandboxedCommands": "yes"}', ["allowUnsandboxedCommands", "boolean"]),
    ],
    ids=["valid", "broken-json", "unknown-nested-key", "unknown-key", "list-type", "bool-type"],
)
def test_bad_settings_stop_the_command(
    layout: Layout, content: str, expected: list[str] | None
) -> None:
    path = write_settings(layout, content)
    done = run_cli(layout, "--", "touch", "made-it")
    ran = os.path.exists(f"{layout.workspace}/made-it")
    if expected is None:
        assert (done.returncode, ran) == (0, True), done.stderr
        return
    err = done.stderr.decode()
    assert (done.returncode, ran) == (2, False), err
    assert err.startswith(f"corral: {path}"), err
    for text in expected:
        assert text in err
    assert "Traceback" not in err


# --- running outside the sandbox ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "allowed"),
    [
        (None, False),
        ({"allowUnsandboxedCommands": False}, False),
        ({"allowUnsandboxedCommands": True}, True),
    ],
    ids=["no-settings", "false", "true"],
)
def test_unsandboxed_needs_the_setting(
    layout: Layout, settings: dict[str, object] | None, allowed: bool
) -> None:
    if settings is not None:
        write_settings(layout, settings, where="user")
    target = f"{layout.outside}/made-it"
    done = run_cli(layout, "--unsandboxed", "--", "touch", target)
    # Writing outside the workspace proves the command ran, and ran unsandboxed.
    assert os.path.exists(target) == allowed, done.stderr
    assert done.returncode == (0 if allowed else 2), done.stderr
    if not allowed:
        assert b"allowUnsandboxedCommands" in done.stderr


@pytest.mark.parametrize(
    ("excluded", "escapes"),
    [(None, False), (["git status"], False), (["touch"], True)],
    ids=["none", "other-command", "touch"],
)
def test_excluded_commands_run_unsandboxed(
    layout: Layout, excluded: list[str] | None, escapes: bool
) -> None:
    if excluded is not None:
        write_settings(layout, {"excludedCommands": excluded}, where="user")
    target = f"{layout.outside}/made-it"
    done = run_cli(layout, "--", "touch", target)
    assert os.path.exists(target) == escapes, done.stderr
    assert (done.returncode == 0) == escapes


@pytest.mark.parametrize("key", ["allowUnsandboxedCommands", "excludedCommands"])
def test_a_project_file_cannot_turn_the_sandbox_off(layout: Layout, key: str) -> None:
    # A cloned repository is untrusted: its settings may tighten, never open an escape hatch.
    value: object = True if key == "allowUnsandboxedCommands" else ["touch"]
    write_settings(layout, {key: value})
    target = f"{layout.outside}/made-it"
    for extra in (["--unsandboxed"], []):
        done = run_cli(layout, *extra, "--", "touch", target)
        assert done.returncode == 2, done.stderr
        assert key.encode() in done.stderr
        assert not os.path.exists(target)


def test_no_command_line_flag_excludes_a_command(layout: Layout) -> None:
    help_text = subprocess.run(corral_run("--help"), capture_output=True, check=True).stdout
    assert b"exclud" not in help_text.lower()
    target = f"{layout.outside}/made-it"
    for flag in ("--excluded-command", "--excludedCommands", "--exclude"):
        done = run_cli(layout, flag, "touch", "--", "touch", target)
        assert done.returncode == 2, (flag, done.stderr)
        assert not os.path.exists(target), flag

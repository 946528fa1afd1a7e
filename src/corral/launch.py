"""The pieces of a launch that need no Sandbox: the command's environment, the launchers
that run before it, which backend runs it, and the resource-limit gate. `sandbox.py` puts them
together."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Literal

from corral.backends.cgroup import join_cgroup
from corral.backends.fsplan import FilesystemPlan
from corral.backends.limits import RLimit, apply_rlimits, make_preexec, release_gate
from corral.errors import LaunchError, SandboxUnavailable
from corral.policy.environment import scrub_environment
from corral.policy.model import EnvPolicy, Policy
from corral.policy.paths import is_within
from corral.probe import MachineFacts, can_use_namespaces
from corral.process import SandboxProcess


class ScrubbedNames:
    """Which variable names a policy's env rules remove, learnt name by name.

    `scrub_environment` decides on the name alone against the rules (never the value), so the
    decision for a name holds as long as the rules do; a Sandbox keeps one of these and asks
    scrub_environment only about names it has not seen, instead of matching every variable
    against every pattern on every launch (about 0.4 ms with a typical environment). The
    values always come from the environment given now.
    """

    def __init__(self, rules: EnvPolicy) -> None:
        self.rules = rules
        self._removed: dict[str, bool] = {}

    def scrub(self, environ: Mapping[str, str]) -> dict[str, str]:
        """`scrub_environment(environ, self.rules)`'s variables that pass, in the same order."""
        variables = list(environ.items())  # once: os.environ may change meanwhile
        known = self._removed
        unseen = [name for name, _value in variables if name not in known]
        if unseen:
            _kept, removed = scrub_environment(dict.fromkeys(unseen, ""), self.rules)
            gone = set(removed)
            for name in unseen:
                known[name] = name in gone
        return {name: value for name, value in variables if not known[name]}


def sandbox_environment(
    policy: Policy, environ: Mapping[str, str], *, names: ScrubbedNames | None = None
) -> dict[str, str]:
    """The command's environment: secrets removed, caches and temp dirs pointed inside.
    `names`: what is known of the policy's env rules already (must be for `policy.env`)."""
    if names is not None and names.rules is policy.env:
        env = names.scrub(environ)
    else:
        env, _removed = scrub_environment(environ, policy.env)
    if policy.filesystem.private_tmp:
        env["TMPDIR"] = "/tmp"
    else:
        env.pop("TMPDIR", None)
    cache = policy.package_cache
    if cache is not None:
        # Each tool gets a private, persistent cache per workspace instead of failing on, or
        # poisoning, the user's real caches.
        env.update(
            XDG_CACHE_HOME=f"{cache}/xdg",
            PIP_CACHE_DIR=f"{cache}/pip",
            UV_CACHE_DIR=f"{cache}/uv",
            npm_config_cache=f"{cache}/npm",
            CARGO_HOME=f"{cache}/cargo",
            GOMODCACHE=f"{cache}/go/mod",
            GOCACHE=f"{cache}/go/build",
        )
        env.setdefault("RUSTUP_HOME", f"{policy.host.home}/.rustup")
    env["CORRAL_SANDBOX"] = "1"
    env["CORRAL_MODE"] = policy.mode
    return env


# Process groups and terminal signals. bwrap has no SIGINT handler: a Ctrl-C that reached it
# would kill it, and with it the whole sandbox. So bwrap never receives the terminal's signals:
# - session "new": bwrap gets a process group of its own; the terminal's Ctrl-C reaches only
#   corral, which forwards it to the sandboxed process group (see SandboxProcess.send_signal).
# - session "inherit": the command must stay in the terminal's foreground group, so bwrap is
#   started with SIGINT and SIGQUIT ignored, and a one-line shim restores them to the default
#   just before exec'ing the command (an ignored signal would otherwise be inherited).
# The launcher for a command that shares the user's terminal when there is no Landlock
# launcher to do it: SIGINT and SIGQUIT back to their defaults (bwrap starts with them
# ignored), and SIGPIPE and SIGXFSZ too, which Python ignores for itself and an exec'd command
# would otherwise inherit (`yes | head` would see EPIPE instead of dying).
_RESET_TERMINAL_SIGNALS = (
    "import _signal, os, sys\n"
    "for n in (2, 3, 13, 25): _signal.signal(n, _signal.SIG_DFL)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def terminal_shim() -> list[str]:
    # The interpreter's real path lies under /usr in a Debian-style install, which every mode
    # can read; -I -S keeps its start-up to the minimum.
    return [os.path.realpath(sys.executable), "-I", "-S", "-c", _RESET_TERMINAL_SIGNALS]


def ignore_terminal_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


def memfd_exec_allowed() -> bool:
    """vm.memfd_noexec (Linux 6.3+) above 0 forbids executing memfds."""
    try:
        with open("/proc/sys/vm/memfd_noexec", "rb") as f:
            return f.read().strip() in (b"", b"0")
    except OSError:
        return True


def child_path(env: Mapping[str, str] | None) -> str:
    source = os.environ if env is None else env
    return source.get("PATH", os.defpath)


def resolve_command(name: str, path: str, plan: FilesystemPlan) -> str | None:
    """Where execvp would find `name`, among the PATH directories the sandbox can see."""
    if "/" in name:
        return name
    visible = (*plan.readable, *plan.writable)
    for directory in path.split(":"):
        if not directory.startswith("/") or not any(is_within(directory, r) for r in visible):
            continue
        candidate = f"{directory}/{name}"
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def choose_backend(policy: Policy, facts: MachineFacts) -> Literal["bwrap", "landlock"]:
    """bubblewrap where user namespaces work; the Landlock-only backend where the settings ask
    for it, or (with "auto") where namespaces are unavailable, never silently."""
    if policy.backend == "landlock":
        return "landlock"
    if can_use_namespaces(facts):
        return "bwrap"
    if policy.backend == "bwrap" or facts.landlock_abi == 0:
        raise SandboxUnavailable(
            "unprivileged user namespaces are unavailable here, so bubblewrap cannot sandbox",
            hint="`corral doctor` shows the fix for this machine",
        )
    print(
        "corral: user namespaces are unavailable here; using the Landlock-only backend, "
        'which is weaker (docs/security-model.md); "backend": "bwrap" makes this an error',
        file=sys.stderr,
    )
    return "landlock"


def preexec_for(*, inherit: bool, rlimits: list[RLimit] | None) -> Callable[[], None] | None:
    """What bwrap's child does before exec: ignore terminal signals (inherited session), and
    take the rlimits itself where they cannot be set on the sandbox later (setuid bwrap)."""
    limit = make_preexec(rlimits) if rlimits else None
    if not inherit:
        return limit

    def both() -> None:
        ignore_terminal_signals()
        if limit is not None:
            limit()

    return both


def limit_then_release(
    proc: SandboxProcess, rlimits: list[RLimit], gate_w: int, cgroup: str | None
) -> None:
    """Set the rlimits on the held sandbox's pid 1 (and move it into its cgroup, where one
    was made), then let bwrap start the command."""
    try:
        init = proc.init_pid()
        if init is None:
            raise OSError("bubblewrap exited before the sandbox started")
        apply_rlimits(init, rlimits)
        if cgroup is not None:
            with contextlib.suppress(OSError):  # the rlimits hold without it
                join_cgroup(cgroup, init)
    except OSError as exc:
        # Kill first: closing the gate would let bwrap run the command without limits.
        proc.kill()
        os.close(gate_w)
        proc.wait()
        raise LaunchError(f"could not apply resource limits: {exc}") from exc
    release_gate(gate_w)


def ensure_empty_file(path: str) -> str:
    """The empty read-only file shown in place of hidden files (re-made if it is not empty)."""
    try:
        st = os.lstat(path)
        if st.st_size == 0 and (st.st_mode & 0o170777) == 0o100444:
            return path
    except FileNotFoundError:
        pass
    # Made aside and renamed into place: several first launches may race here, and rename
    # replaces whatever another one put there, where O_EXCL on `path` would fail.
    staging = f"{path}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o444)
    os.fchmod(fd, 0o444)
    os.close(fd)
    os.replace(staging, path)
    return path

"""The Python API: `Sandbox(policy).run(argv)` and the streaming `Sandbox(policy).spawn(argv)`.

One launch, step by step (all in `Sandbox._launch`):
1. gather disk facts for the policy's paths (the only disk reads of the launch),
2. plan the mounts (pure) and render the bwrap argv (pure),
3. create placeholder files for denied paths that do not exist yet (journalled),
4. start bwrap with only stdin, stdout, stderr and the caller's `pass_fds` inherited;
   bwrap runs exactly once per command.
After the command ends, the placeholders are removed and the exit status is reported like a
shell reports it: the command's own code, or 128 + N when signal N killed it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO, NamedTuple

from corral.backends.bubblewrap import BwrapOptions, Session, bwrap_argv
from corral.backends.facts import gather_disk_facts
from corral.backends.fsplan import FilesystemPlan, plan_filesystem
from corral.backends.placeholders import create_placeholders, remove_placeholders, sweep_stale
from corral.backends.seccomp import SeccompOptions, build_filter, host_arch, open_program_fd
from corral.errors import LaunchError, SandboxUnavailable, UsageError
from corral.policy.environment import scrub_environment
from corral.policy.model import Policy
from corral.policy.paths import is_within

File = int | IO[bytes] | IO[str] | None


class RunResult(NamedTuple):
    returncode: int
    """The command's exit code; 128 + N when signal N killed it (as a shell reports it)."""
    stdout: bytes | None
    stderr: bytes | None
    timed_out: bool
    sandbox_id: str


def shell_status(returncode: int) -> int:
    """subprocess's -N (killed by signal N) becomes the shell's 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def sandbox_environment(policy: Policy, environ: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: secrets removed, caches and temp dirs pointed inside."""
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


class SandboxProcess:
    """A running sandboxed command, shaped like `subprocess.Popen`."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        status_fd: int,
        session: Session,
        journal: str | None,
        plan: FilesystemPlan,
        sandbox_id: str,
    ) -> None:
        self._popen = popen
        self._status = os.fdopen(status_fd, "rb")
        self._status_text = b""
        self.session = session
        self._journal = journal
        self.plan = plan
        self.sandbox_id = sandbox_id
        self.pid = popen.pid
        self.stdin = popen.stdin
        self.stdout = popen.stdout
        self.stderr = popen.stderr
        self.returncode: int | None = None

    def _read_status_line(self) -> bytes:
        line = self._status.readline()
        self._status_text += line
        return line

    def _init_pid(self) -> int | None:
        """Host pid of the sandbox's pid 1, from bwrap's --json-status-fd (read on demand)."""
        if b"child-pid" not in self._status_text:
            self._read_status_line()
        return _json_int(self._status_text, b"child-pid")

    def send_signal(self, sig: int) -> None:
        """Deliver `sig` to the sandboxed command (bwrap's pid 1 would ignore it)."""
        if self.returncode is not None:
            return
        init = self._init_pid()
        if init is None:
            return
        try:
            if self.session == "new":
                # bwrap's --new-session made pid 1 a session and group leader; the command
                # and its children share that group.
                os.killpg(init, sig)
            else:
                for child in _children(init):
                    os.kill(child, sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the whole sandbox: bwrap dies, its pid 1 follows, and the kernel empties the pid
        namespace, so no daemon started inside survives."""
        if self.returncode is None:
            self._popen.kill()

    def poll(self) -> int | None:
        if self.returncode is None and self._popen.poll() is not None:
            self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._popen.wait(timeout)
            self._finish()
        assert self.returncode is not None
        return self.returncode

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes | None, bytes | None]:
        out, err = self._popen.communicate(input, timeout)
        self._finish()
        return out, err

    def _finish(self) -> None:
        if self.returncode is not None:
            return
        rest = self._status.read()
        self._status_text += rest
        self._status.close()
        if self._journal is not None:
            remove_placeholders(self._journal)
            self._journal = None
        code = _json_int(self._status_text, b"exit-code")
        bwrap_code = self._popen.returncode
        if code is None and _json_int(self._status_text, b"child-pid") is None and bwrap_code > 0:
            self.returncode = shell_status(bwrap_code)
            raise LaunchError(
                f"bubblewrap could not start the sandbox (exit {bwrap_code})",
                hint="its message is above; `corral doctor` checks this machine",
            )
        self.returncode = code if code is not None else shell_status(bwrap_code)

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.returncode is None:
            self.kill()
            self.wait()


def _json_int(text: bytes, key: bytes) -> int | None:
    """Read `"key": N` from bwrap's status lines without importing json on the launch path."""
    at = text.find(b'"' + key + b'"')
    if at < 0:
        return None
    digits = text[text.index(b":", at) + 1 :].lstrip().split(b",")[0].split(b"}")[0].strip()
    return int(digits) if digits.lstrip(b"-").isdigit() else None


# Process groups and terminal signals. bwrap has no SIGINT handler: a Ctrl-C that reached it
# would kill it, and with it the whole sandbox. So bwrap never receives the terminal's signals:
# - session "new": bwrap gets a process group of its own; the terminal's Ctrl-C reaches only
#   corral, which forwards it to the sandboxed process group (see SandboxProcess.send_signal).
# - session "inherit": the command must stay in the terminal's foreground group, so bwrap is
#   started with SIGINT and SIGQUIT ignored, and a one-line shim restores them to the default
#   just before exec'ing the command (an ignored signal would otherwise be inherited).
_RESET_TERMINAL_SIGNALS = (
    "import os, signal, sys; signal.signal(2, signal.SIG_DFL); signal.signal(3, signal.SIG_DFL);"
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def terminal_shim() -> list[str]:
    # The interpreter's real path lies under /usr in a Debian-style install, which every mode
    # can read; -I -S keeps its start-up to the minimum.
    return [os.path.realpath(sys.executable), "-I", "-S", "-c", _RESET_TERMINAL_SIGNALS]


def _ignore_terminal_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


def _ensure_empty_file(path: str) -> str:
    """The empty read-only file shown in place of hidden files (re-made if it is not empty)."""
    try:
        st = os.lstat(path)
        if st.st_size == 0 and (st.st_mode & 0o170777) == 0o100444:
            return path
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o444)
    os.fchmod(fd, 0o444)
    os.close(fd)
    return path


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Sandbox:
    """Runs commands under one policy. Cheap to create; each command is its own sandbox."""

    def __init__(self, policy: Policy, *, bwrap: str | None = None) -> None:
        self.policy = policy
        self._bwrap = bwrap
        self._bwrap_version: tuple[int, int, int] | None = None
        self._seccomp_program: bytes | None = None

    def seccomp_program(self) -> bytes:
        """The seccomp filter for this policy (built once per Sandbox; it is pure)."""
        if self._seccomp_program is None:
            network = self.policy.network
            options = SeccompOptions(
                network=network.access, allow_unix_sockets=bool(network.allow_unix_sockets)
            )
            self._seccomp_program = build_filter(options, arch=host_arch())
        return self._seccomp_program

    @classmethod
    def from_settings(
        cls,
        workspace: str | None = None,
        *,
        mode: str | None = None,
        allow_domains: Sequence[str] = (),
    ) -> Sandbox:
        """The policy from the settings files of `workspace` (default: the current directory)."""
        from corral.hostpaths import host_paths
        from corral.policy.settings import load_policy

        host = host_paths(workspace or os.getcwd(), os.environ)
        return cls(load_policy(host, mode=mode, allow_domains=allow_domains))  # type: ignore[arg-type]

    def _resolve_bwrap(self) -> tuple[str, tuple[int, int, int]]:
        if self._bwrap is None or self._bwrap_version is None:
            from corral.probe import probe

            facts = probe(cache_dir=self.policy.host.machine_cache_dir)
            if facts.bwrap_path is None:
                raise SandboxUnavailable(
                    "bubblewrap (bwrap) is not installed",
                    hint="install it (Debian/Ubuntu: apt-get install bubblewrap); `corral doctor`",
                )
            self._bwrap = self._bwrap or facts.bwrap_path
            self._bwrap_version = facts.bwrap_version or (0, 0, 0)
        return self._bwrap, self._bwrap_version

    def _check_cwd(self, cwd: str) -> str:
        cwd = os.path.abspath(cwd)
        fs = self.policy.filesystem
        visible = any(is_within(cwd, rule.value) for rule in (*fs.read, *fs.write))
        if not visible:
            raise UsageError(
                f"working directory {cwd} is outside what the sandbox can see",
                hint=f"run from inside the workspace {self.policy.workspace}",
            )
        return cwd

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: File = None,
        stdout: File = None,
        stderr: File = None,
        pass_fds: Sequence[int] = (),
        session: Session | None = None,
    ) -> SandboxProcess:
        """Start `argv` in a new sandbox. Only fds 0-2 and `pass_fds` are inherited.

        `session` defaults to "inherit" when stdin is a terminal (an interactive program keeps
        its terminal) and "new" otherwise.
        """
        if not argv:
            raise UsageError("no command given")
        policy = self.policy
        bwrap, version = self._resolve_bwrap()
        workdir = self._check_cwd(cwd or policy.workspace)
        if session is None:
            stdin_fd = stdin if isinstance(stdin, int) else 0 if stdin is None else None
            interactive = stdin_fd is not None and stdin_fd >= 0 and os.isatty(stdin_fd)
            session = "inherit" if interactive else "new"
        if policy.package_cache is not None:
            os.makedirs(policy.package_cache, mode=0o700, exist_ok=True)
        # corral's own directories exist before the plan is made, so that they are protected
        # as directories rather than by placeholders.
        for own in (policy.host.machine_cache_dir, policy.host.state_dir):
            os.makedirs(own, mode=0o700, exist_ok=True)
        empty_file = _ensure_empty_file(f"{policy.host.state_dir}/empty")
        plan = plan_filesystem(policy, gather_disk_facts(policy))
        journal_dir = f"{policy.host.state_dir}/placeholders"
        sweep_stale(journal_dir)
        status_r, status_w = os.pipe()
        seccomp_fd = open_program_fd(self.seccomp_program())
        options = BwrapOptions(
            cwd=workdir,
            uid=os.getuid(),
            gid=os.getgid(),
            session=session,
            bwrap_version=version,
            seccomp_fd=seccomp_fd,
            status_fd=status_w,
            empty_file=empty_file,
        )
        inherit = session == "inherit"
        command = bwrap_argv(
            plan, options, [*terminal_shim(), *argv] if inherit else argv, bwrap=bwrap
        )
        journal = create_placeholders(plan.placeholders, journal_dir=journal_dir)
        try:
            popen = subprocess.Popen(
                command,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=sandbox_environment(policy, os.environ if env is None else env),
                pass_fds=(status_w, seccomp_fd, *pass_fds),
                close_fds=True,
                preexec_fn=_ignore_terminal_signals if inherit else None,
                process_group=None if inherit else 0,
            )
        except OSError as exc:
            os.close(status_r)
            if journal is not None:
                remove_placeholders(journal)
            raise LaunchError(f"could not start {bwrap}: {exc.strerror}") from exc
        finally:
            os.close(status_w)
            os.close(seccomp_fd)
        return SandboxProcess(
            popen,
            status_fd=status_r,
            session=session,
            journal=journal,
            plan=plan,
            sandbox_id=f"{os.getpid()}-{popen.pid}",
        )

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        stdin: File = None,
        capture_output: bool = False,
        timeout: float | None = None,
        pass_fds: Sequence[int] = (),
    ) -> RunResult:
        """Run `argv` to completion. On timeout the whole sandbox is killed (nothing survives)."""
        pipe = subprocess.PIPE if capture_output else None
        proc = self.spawn(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if input is not None else stdin,
            stdout=pipe,
            stderr=pipe,
            pass_fds=pass_fds,
        )
        timed_out = False
        try:
            out, err = proc.communicate(input, timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, err = proc.communicate()
        returncode = proc.returncode if proc.returncode is not None else -1
        return RunResult(returncode, out, err, timed_out, proc.sandbox_id)

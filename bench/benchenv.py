"""The scratch world a benchmark runs in, built once under /var/tmp and removed afterwards.

What it holds and why:
- two empty workspaces, one per side of each comparison. bwrap creates the mount points of
  missing denied files on the host and leaves them there, while corral makes (and removes)
  its own placeholder files on every launch; sharing one workspace would let the first
  bare-bwrap run hand corral pre-made placeholders and hide that cost. So corral launches in
  `ws_corral` and bare bwrap in `ws_bwrap`, whose placeholders are made once beforehand.
- private XDG config, cache and state directories, so no user settings file changes the policy
  under test (`corral run` then uses the standard preset, exactly as the API side does) and the
  probe cache and placeholder journals stay inside the scratch root.
- two copies of the corral package: one compiled to bytecode (what a wheel install gets, since
  installers compile at install time) and one without any .pyc (an editable install under
  PYTHONDONTWRITEBYTECODE=1 recompiles every module on every start). `corral run` is pointed
  at either copy with PYTHONPATH; the checkout's src/ is never written to.
"""

from __future__ import annotations

import compileall
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal, NamedTuple

import corral
from corral.backends.bubblewrap import BwrapOptions, bwrap_argv
from corral.backends.facts import gather_disk_facts
from corral.backends.fsplan import FilesystemPlan, plan_filesystem
from corral.hostpaths import host_paths
from corral.policy.model import Policy
from corral.policy.presets import preset_policy
from corral.probe import probe
from corral.sandbox import Sandbox

Bytecode = Literal["compiled", "source"]

# /var/tmp rather than /tmp: the standard preset gives the sandbox a private /tmp, and a
# workspace under it would be hidden by that tmpfs.
SCRATCH_PARENT = "/var/tmp"


def standard_policy(workspace: str, env: Mapping[str, str]) -> Policy:
    return preset_policy("standard", host_paths(workspace, env))


def plan_for(policy: Policy) -> FilesystemPlan:
    return plan_filesystem(policy, gather_disk_facts(policy))


class BenchEnv(NamedTuple):
    root: str
    ws_corral: str
    ws_bwrap: str
    env: dict[str, str]
    """The environment of every launch: os.environ with the private XDG directories."""
    python: str
    """The interpreter named in the corral console script's shebang."""
    corral_script: str
    package_copies: dict[Bytecode, str]
    """A sys.path entry holding a copy of the corral package in each bytecode state."""
    bwrap: str
    bwrap_version: tuple[int, int, int]
    bwrap_plan: FilesystemPlan
    """The plan for `ws_bwrap`, made before its placeholders existed, as corral's own is."""
    seccomp: bytes
    """The seccomp program corral gives bwrap for the standard preset."""

    def policy(self, workspace: str) -> Policy:
        return standard_policy(workspace, self.env)

    def env_for(self, bytecode: Bytecode) -> dict[str, str]:
        return {**self.env, "PYTHONPATH": self.package_copies[bytecode]}

    def render(
        self,
        plan: FilesystemPlan,
        workspace: str,
        command: list[str],
        *,
        seccomp_fd: int | None = None,
    ) -> list[str]:
        options = BwrapOptions(
            cwd=workspace,
            uid=os.getuid(),
            gid=os.getgid(),
            session="new",  # every launch here has stdin on /dev/null, so corral picks "new"
            bwrap_version=self.bwrap_version,
            seccomp_fd=seccomp_fd,
        )
        return bwrap_argv(plan, options, command, bwrap=self.bwrap)

    def bare_bwrap_argv(self, command: list[str], *, seccomp_fd: int | None) -> list[str]:
        """The argv corral would give bwrap for `command` in `ws_bwrap`, minus --json-status-fd
        (corral's own bookkeeping). With `seccomp_fd`, bwrap loads `seccomp` from that fd."""
        return self.render(self.bwrap_plan, self.ws_bwrap, command, seccomp_fd=seccomp_fd)


def shebang_interpreter(script: str) -> str:
    with open(script, encoding="utf-8") as f:
        first = f.readline()
    if not first.startswith("#!"):
        raise SystemExit(f"{script} has no #! line; cannot tell which Python runs corral")
    return first[2:].split()[0]


def console_script() -> str:
    script = os.path.join(os.path.dirname(sys.executable), "corral")
    if not os.path.exists(script):
        raise SystemExit(f"no corral console script at {script}; run scripts/setup first")
    return script


def copy_package(dest_parent: str, bytecode: Bytecode) -> str:
    source = os.path.dirname(corral.__file__)
    dest = os.path.join(dest_parent, "corral")
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if bytecode == "compiled" and not compileall.compile_dir(dest, quiet=1):
        raise SystemExit(f"compileall failed in {dest}")
    return dest_parent


def check_imports_from(python: str, env: Mapping[str, str], expected_parent: str) -> None:
    """Fail loudly if PYTHONPATH did not win over the editable install."""
    done = subprocess.run(
        [python, "-c", "import corral; print(corral.__file__)"],
        env=dict(env),
        capture_output=True,
        text=True,
        check=True,
    )
    if not done.stdout.strip().startswith(expected_parent + os.sep):
        raise SystemExit(f"corral imported from {done.stdout.strip()}, not {expected_parent}")


def check_equivalent(bench: BenchEnv, corral_plan: FilesystemPlan) -> None:
    """The bare-bwrap argv must be the one corral renders for its workspace, but for paths."""

    def normalised(plan: FilesystemPlan, workspace: str) -> list[str]:
        cache = bench.policy(workspace).package_cache or workspace
        argv = bench.render(plan, workspace, ["true"])
        return [arg.replace(cache, "CACHE").replace(workspace, "WS") for arg in argv]

    if normalised(bench.bwrap_plan, bench.ws_bwrap) != normalised(corral_plan, bench.ws_corral):
        raise SystemExit("the bare bwrap argv differs from corral's; the floor would be wrong")


def make_placeholders(paths: Iterable[str]) -> None:
    """The empty files corral creates before each launch, made once for bare bwrap."""
    for path in paths:
        with open(path, "x", encoding="utf-8"):
            pass


def _build(root: str) -> BenchEnv:
    dirs = {name: os.path.join(root, name) for name in ("ws-corral", "ws-bwrap", "config")}
    dirs.update(cache=os.path.join(root, "cache"), state=os.path.join(root, "state"))
    for path in dirs.values():
        os.mkdir(path)
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": dirs["config"],
        "XDG_CACHE_HOME": dirs["cache"],
        "XDG_STATE_HOME": dirs["state"],
    }
    env.pop("PYTHONPATH", None)
    script = console_script()
    python = shebang_interpreter(script)
    copies: dict[Bytecode, str] = {}
    for bytecode in ("compiled", "source"):
        copies[bytecode] = copy_package(os.path.join(root, f"pkg-{bytecode}"), bytecode)
        check_imports_from(python, {**env, "PYTHONPATH": copies[bytecode]}, copies[bytecode])
    facts = probe(cache_dir=os.path.join(dirs["cache"], "corral"))
    if facts.bwrap_path is None:
        raise SystemExit("bubblewrap (bwrap) is not installed; nothing to benchmark")
    ws_corral, ws_bwrap = (os.path.realpath(dirs[n]) for n in ("ws-corral", "ws-bwrap"))
    policies = [standard_policy(ws, env) for ws in (ws_corral, ws_bwrap)]
    for policy in policies:
        if policy.package_cache is not None:
            # corral makes it on each launch; the bare-bwrap argv needs it to exist already
            os.makedirs(policy.package_cache, mode=0o700, exist_ok=True)
    corral_plan, bwrap_plan = (plan_for(policy) for policy in policies)
    bench = BenchEnv(
        root=root,
        ws_corral=ws_corral,
        ws_bwrap=ws_bwrap,
        env=env,
        python=python,
        corral_script=script,
        package_copies=copies,
        bwrap=facts.bwrap_path,
        bwrap_version=facts.bwrap_version or (0, 0, 0),
        bwrap_plan=bwrap_plan,
        seccomp=Sandbox(policies[0]).seccomp_program(),
    )
    check_equivalent(bench, corral_plan)
    make_placeholders(bwrap_plan.placeholders)
    return bench


@contextmanager
def bench_env() -> Iterator[BenchEnv]:
    """A fresh scratch world; everything in it, placeholders included, is removed on exit."""
    root = tempfile.mkdtemp(prefix="corral-bench-", dir=SCRATCH_PARENT)
    try:
        yield _build(root)
    finally:
        shutil.rmtree(root)


def installed_bytecode_state() -> tuple[int, int]:
    """(modules with an up-to-date .pyc, modules) in the installed corral package."""
    import importlib.util

    fresh = total = 0
    for folder, _dirs, files in os.walk(os.path.dirname(corral.__file__)):
        for name in files:
            if not name.endswith(".py"):
                continue
            total += 1
            source = os.path.join(folder, name)
            cached = importlib.util.cache_from_source(source)
            fresh += _pyc_matches(cached, os.stat(source))
    return fresh, total


def _pyc_matches(cached: str, source: os.stat_result) -> bool:
    # The 16-byte header of a timestamp-based .pyc: magic, flags, source mtime, source size.
    import importlib.util

    try:
        with open(cached, "rb") as f:
            header = f.read(16)
    except OSError:
        return False
    mtime = int.from_bytes(header[8:12], "little")
    size = int.from_bytes(header[12:16], "little")
    return (
        header[:4] == importlib.util.MAGIC_NUMBER
        and header[4:8] == b"\0\0\0\0"
        and mtime == int(source.st_mtime) & 0xFFFFFFFF
        and size == source.st_size & 0xFFFFFFFF
    )

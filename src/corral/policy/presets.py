"""The three modes as policies, and the built-in lists every mode starts from.

| mode       | write                              | read                         | network  |
|------------|------------------------------------|------------------------------|----------|
| strict     | workspace only                     | workspace + system dirs      | none     |
| standard   | workspace + a private /tmp         | everything but the deny list | local    |
| permissive | home (minus deny lists) + /tmp     | everything but the deny list | filtered |

The deny lists apply in every mode. `MANDATORY_DENY_WRITE` cannot be removed by settings:
these files run code on the host the next time the user opens a shell, enters the directory
or runs git, so a sandboxed program that could write them would escape on the next occasion.
"""

from __future__ import annotations

import os.path
import zlib

from corral.policy.model import (
    BUILT_IN,
    LIMIT_KEYS,
    EnvPolicy,
    FilesystemPolicy,
    HostPaths,
    Limits,
    Mode,
    NetworkAccess,
    NetworkPolicy,
    Origin,
    Policy,
    Rule,
)

# Credential stores: unreadable by default in every mode. `~` is the user's home.
DEFAULT_DENY_READ = (
    "~/.ssh",
    "~/.aws",
    "~/.gnupg",
    "~/.config/gcloud",
    "~/.azure",
    "~/.kube",
    "~/.docker/config.json",
    "~/.netrc",
    "~/.git-credentials",
    "~/.npmrc",
    "~/.pypirc",
    "~/.config/gh",
    "~/.config/hub",
    "~/.cargo/credentials.toml",
    "~/.cargo/credentials",
    "~/.password-store",
    "~/.local/share/keyrings",
    "~/.vault-token",
    "~/.terraform.d/credentials.tfrc.json",
    "~/.config/op",
)

SHELL_STARTUP_FILES = (
    ".bashrc",
    ".zshrc",
    ".profile",
    ".bash_profile",
    ".zprofile",
    ".bash_login",
    ".bash_logout",
    ".zshenv",
    ".zlogin",
)

# Relative to the home directory: other places that run code on the host later (the user's
# next login, git command or desktop session), writable in permissive mode otherwise.
HOME_PROTECTED = (
    ".gitconfig",
    ".config/git",
    ".local/bin",
    "bin",
    ".config/systemd",
    ".config/autostart",
    ".config/environment.d",
    ".config/fish",
    ".pam_environment",
    ".xprofile",
    ".xsessionrc",
    ".ssh",
)

# Relative to the workspace. `.git/*` is resolved through a `.git` file for worktrees and
# submodules by the backends; git itself keeps working because only these two are read-only.
WORKSPACE_PROTECTED = (".envrc", ".git/hooks", ".git/config", ".corral")

# Read roots in strict mode. Missing ones are skipped; symlinked ones (merged /usr) kept as links.
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")

# Secret-looking environment variable names, matched case-insensitively as shell globs.
DEFAULT_ENV_DENY = (
    "*TOKEN*",
    "*SECRET*",
    "*PASSWORD*",
    "*PASSWD*",
    "*_KEY",
    "*CREDENTIAL*",
    "AWS_*",
    "*_PAT",
    "SSH_AUTH_SOCK",
)


MiB = 1 << 20
GiB = 1 << 30

# Resource limits of each mode. The aim is that a fork bomb or a runaway allocation cannot
# take the machine down, while builds, test suites and language servers never notice:
# - processes (processes and threads together, as the kernel counts them): 2048 in standard
#   covers a parallel build on a large machine (make -j64 with compiler subprocesses, a JVM
#   build daemon with hundreds of threads), yet stays far below pid_max (32768 by default),
#   so a fork bomb neither exhausts pids nor the memory of thousands of shells.
# - memory (per process, private writable memory): 8 GiB in standard, fixed rather than a
#   fraction of RAM, so that the policy is the same data on every machine and `corral policy
#   show` prints what is enforced. A runaway allocation fails with ENOMEM at 8 GiB, which a
#   developer machine survives; a smaller machine should lower limits.memoryBytes.
# - open files: the hard limit only (the soft limit a program starts with is kept as
#   inherited, usually 1024); 65536 is what file watchers and large builds ask for.
# - file size: 16 GiB stops a runaway log from filling the disk in one file, and leaves
#   room for model shards and disk images.
# - output: 64 MiB of captured stdout (and of stderr), held in the caller's memory.
# - no timeout and, outside strict, no CPU-time limit: an interactive shell, a dev server or
#   a long test run are legitimate, and only the caller knows how long its command may take.
# strict is tighter everywhere; permissive looser, but never unlimited.
LIMITS_OF_MODE: dict[Mode, Limits] = {
    "strict": Limits(
        cpu_seconds=3600,
        memory_bytes=2 * GiB,
        processes=512,
        open_files=4096,
        file_size_bytes=1 * GiB,
        output_bytes=16 * MiB,
    ),
    "standard": Limits(
        memory_bytes=8 * GiB,
        processes=2048,
        open_files=65536,
        file_size_bytes=16 * GiB,
        output_bytes=64 * MiB,
    ),
    "permissive": Limits(
        memory_bytes=32 * GiB,
        processes=8192,
        open_files=524288,
        file_size_bytes=256 * GiB,
        output_bytes=256 * MiB,
    ),
}


NETWORK_OF_MODE: dict[Mode, NetworkAccess] = {
    "strict": "none",
    "standard": "local",
    "permissive": "filtered",
}


def _expand(path: str, home: str) -> str:
    return home + path[1:] if path.startswith("~") else path


def mandatory_deny_write(host: HostPaths) -> tuple[Rule, ...]:
    origin = Origin(BUILT_IN, "mandatory")
    home_rc = [f"{host.home}/{name}" for name in (*SHELL_STARTUP_FILES, *HOME_PROTECTED)]
    ws_rc = [f"{host.workspace}/{name}" for name in SHELL_STARTUP_FILES]
    ws_protected = [f"{host.workspace}/{name}" for name in WORKSPACE_PROTECTED]
    # corral's own files: settings, the machine probe it trusts, its journals and audit log.
    own = [f"{host.config_home}/corral", "/etc/corral", host.machine_cache_dir, host.state_dir]
    paths = dict.fromkeys([*home_rc, *ws_rc, *ws_protected, *own])  # ordered, unique
    return tuple(Rule(path, origin) for path in paths)


def package_cache_dir(host: HostPaths) -> str:
    """A private cache per workspace, outside it, so that nothing is left in the workspace.

    Named by the workspace's base name and a CRC of its full path: readable in `ls`, and
    cheaper at start-up than hashlib, whose OpenSSL import costs milliseconds per launch.
    """
    name = os.path.basename(host.workspace) or "root"
    return f"{host.cache_home}/corral/workspaces/{name}-{zlib.crc32(host.workspace.encode()):08x}"


def preset_policy(mode: Mode, host: HostPaths) -> Policy:
    """The policy of `mode` before any settings file is applied."""
    origin = Origin(f"preset {mode}")
    ws = Rule(host.workspace, origin)
    cache = package_cache_dir(host)
    if mode == "strict":
        read = (ws, *(Rule(d, origin) for d in SYSTEM_DIRS))
        write: tuple[Rule, ...] = (ws,)
        private_tmp = False
        package_cache = None
    elif mode == "standard":
        read = (Rule("/", origin),)
        write = (ws, Rule(cache, Origin(BUILT_IN, "package caches")))
        private_tmp = True
        package_cache = cache
    else:
        read = (Rule("/", origin),)
        write = (Rule(host.home, origin), ws, Rule(cache, Origin(BUILT_IN, "package caches")))
        private_tmp = True
        package_cache = cache
    deny_origin = Origin(BUILT_IN, "credential stores")
    # corral's own records (the audit log and its spool) hold past commands and are nobody
    # else's business: hidden, as credential stores are.
    own_records = Rule(host.state_dir, Origin(BUILT_IN, "corral's records"))
    filesystem = FilesystemPolicy(
        read=read,
        write=write,
        deny_read=(
            *(Rule(_expand(p, host.home), deny_origin) for p in DEFAULT_DENY_READ),
            own_records,
        ),
        deny_write=mandatory_deny_write(host),
        private_tmp=private_tmp,
    )
    network = NetworkPolicy(access=NETWORK_OF_MODE[mode])
    env = EnvPolicy(deny=tuple(Rule(p, Origin(BUILT_IN, "secret names")) for p in DEFAULT_ENV_DENY))
    return Policy(
        mode=mode,
        host=host,
        filesystem=filesystem,
        network=network,
        env=env,
        package_cache=package_cache,
        origins=(("mode", origin), ("network.access", origin), *_limit_origins(mode, origin)),
        limits=LIMITS_OF_MODE[mode],
    )


def _limit_origins(mode: Mode, origin: Origin) -> list[tuple[str, Origin]]:
    limits = LIMITS_OF_MODE[mode]
    return [
        (f"limits.{key}", origin) for key, field in LIMIT_KEYS if getattr(limits, field) is not None
    ]

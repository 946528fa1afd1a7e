"""The namespace-free mode: the command runs on the host's filesystem under Landlock and the
seccomp filter, with no bubblewrap and no namespaces (Docker, Ubuntu's restricted userns).

Landlock only allows, so "read everything but the deny list" becomes an allow-list:
1. A root with nothing denied beneath it gets one rule.
2. A root with a denied path beneath it gets no rule itself; each of its entries is taken as a
   root in turn (rule 1 or 2), and the denied path is left out. So along the way from the
   root to a denied path only the siblings are granted, never a directory that holds it.
3. Reads: the roots are the plan's readable and writable roots, minus the hidden paths; the
   host's /dev (other terminals of the user are there) and, with a private /tmp, the host's
   /tmp are left out of the readable roots. Writes: the writable roots, minus the hidden AND
   the protected paths; the private /tmp is a fresh directory made by the caller.
4. What that costs, by design of Landlock (a rule covers everything beneath it):
   - a directory on the way to a denied path cannot be listed (`ls ~` when ~/.ssh is
     hidden), and, inside a writable root, nothing can be created, removed or renamed
     directly in it (the workspace root and `.git` when `.git/hooks` is protected). Creating,
     removing and renaming there is exactly what replacing a protected file or directory
     takes (rename it away, make a new one), so no weaker grant is safe;
   - entries the host creates there after launch are not granted at all, and a granted file
     the host replaces by a rename is a new inode without the rule.
   What is allowed inside a granted sibling is unaffected.
5. Missing denied paths need no placeholders: their parent is never granted, so they cannot
   be created.

Network (see docs/landlock.md): TCP connect only to the given ports (the proxy's, any host
ports the policy lists), bind only if the policy allows local binding. Ports, not addresses:
an allowed port is allowed on every host. Not restricted by Landlock (reproduced on 6.18):
UDP, MPTCP/SCTP streams (not TCP to Landlock since 6.14), TCP Fast Open's implicit connect
(sendto with MSG_FASTOPEN), and listen() without bind() on an ephemeral port. seccomp refuses
all inet sockets only in "none".

Also unrestricted by Landlock: chmod, utimes and xattrs of any file the user owns, hidden or
protected ones included (it has no right for them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from corral.backends.fsplan import FilesystemPlan
from corral.backends.landlock import (
    DEV_READ_WRITE,
    Enforcement,
    LandlockRules,
    compile_ruleset,
    enforcement,
    make_rules,
)
from corral.policy.model import NetworkPolicy
from corral.policy.paths import is_within

ListDir = Callable[[str], Iterable[str]]


def listdir_or_nothing(path: str) -> list[str]:
    """os.listdir, but a directory that cannot be listed has no entries (nothing granted)."""
    try:
        return os.listdir(path)
    except OSError:
        return []


def expand_allowlist(
    roots: Iterable[str], excluded: Iterable[str], *, listdir: ListDir
) -> tuple[str, ...]:
    """The paths to grant so that everything beneath `roots` but `excluded` is covered.

    Paths are absolute, normalised and resolved (the plan's real paths). Names returned by
    `listdir` may be symlinks; the runner skips those (see corral.inner._open_beneath).
    """
    denied = tuple(dict.fromkeys(excluded))
    granted: list[str] = []
    for root in roots:
        granted += _expand(root, denied, listdir)
    return tuple(dict.fromkeys(granted))


def _expand(root: str, excluded: tuple[str, ...], listdir: ListDir) -> list[str]:
    if any(is_within(root, path) for path in excluded):
        return []
    below = tuple(path for path in excluded if is_within(path, root))
    if not below:
        return [root]
    granted: list[str] = []
    for name in sorted(listdir(root)):
        granted += _expand(os.path.join(root, name), below, listdir)
    return granted


def expand_read_allowlist(
    read_roots: Iterable[str], hidden: Iterable[str], *, listdir: ListDir
) -> tuple[str, ...]:
    """Read rules for "everything beneath `read_roots` but `hidden`" (rule 2 of the module)."""
    return expand_allowlist(read_roots, hidden, listdir=listdir)


def nsfree_ports(
    network: NetworkPolicy, *, proxy_ports: Sequence[int] = ()
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(connect ports, bind ports) on the host's own network stack.

    There is no private loopback here: "local" and "filtered" both reach only the proxy's
    ports and the host ports the policy names; "none" reaches nothing.
    """
    if network.access == "none":
        return (), ()
    connect = (*proxy_ports, *network.host_ports)
    return connect, (None if network.allow_local_binding else ())


def nsfree_rules(
    plan: FilesystemPlan,
    *,
    abi: int,
    network: NetworkPolicy,
    proxy_ports: Sequence[int] = (),
    tmp_dir: str | None = None,
    terminals: Sequence[str] = (),
    listdir: ListDir = listdir_or_nothing,
) -> LandlockRules:
    """The rules of the namespace-free mode for `plan` (see the module docstring).

    `tmp_dir`: a fresh directory made by the caller, standing for the plan's private /tmp
    (point TMPDIR at it); without it a plan with a private /tmp makes no /tmp writable.
    `terminals`: the command's own terminal devices (os.ttyname of fds 0-2), writable.
    """
    hidden = [d.path for d in plan.denied if d.access == "read"]
    protected = [d.path for d in plan.denied if d.access == "write"]
    private_tmp = "/tmp" in plan.writable
    writable = [path for path in plan.writable if path != "/tmp"]
    if private_tmp and tmp_dir is not None:
        writable.append(tmp_dir)
    host_only = ["/dev", *(["/tmp"] if private_tmp else [])]
    read = expand_allowlist(plan.readable, [*hidden, *host_only], listdir=listdir)
    read += expand_allowlist(writable, hidden, listdir=listdir)
    write = expand_allowlist(writable, [*hidden, *protected], listdir=listdir)
    connect, bind = nsfree_ports(network, proxy_ports=proxy_ports)
    return make_rules(
        abi,
        read=(*read, "/proc"),
        write=(*write, *DEV_READ_WRITE, *terminals),
        connect_ports=connect,
        bind_ports=bind,
    )


class NsfreeLauncher:
    """Applies the rules in a child between fork and exec: `preexec_fn=launcher`.

    Everything that reads the disk or builds the ruleset ran in `prepare_nsfree`; calling the
    launcher makes only system calls: prctl, landlock_restrict_self, the capability drop
    (prctl, capset), seccomp. Close it
    in the parent once the child has started (it holds the ruleset fd, close-on-exec).
    Capabilities are dropped too (as bubblewrap's --cap-drop ALL does): corral often runs as
    root in a container, and root's capabilities reach around Landlock (see inner.py).
    """

    def __init__(self, rules: LandlockRules, seccomp_program: bytes | None) -> None:
        from corral import inner
        from corral.backends.seccomp import install  # imported here, never in the child

        if seccomp_program is not None:
            # install() imports ctypes when called; in the child that would cost each launch
            # about 9 ms. Imported here it is a lookup there.
            import ctypes  # noqa: F401

        self.rules = rules
        self.enforcement: Enforcement = enforcement(rules)
        self._seccomp = seccomp_program
        self._install_seccomp = install
        self._prepared = None
        self._drop_capabilities = inner.CapabilityDrop()
        if self.enforcement != "none":
            self._prepared = inner.prepare(compile_ruleset(rules))
        self.skipped: tuple[str, ...] = self._prepared.skipped if self._prepared else ()

    def __call__(self) -> None:
        if self._prepared is not None:
            self._prepared.restrict()
        self._drop_capabilities()
        if self._seccomp is not None:
            self._install_seccomp(self._seccomp)

    def close(self) -> None:
        if self._prepared is not None:
            self._prepared.close()

    def __enter__(self) -> NsfreeLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare_nsfree(rules: LandlockRules, *, seccomp_program: bytes | None) -> NsfreeLauncher:
    """Build the ruleset now, in the parent; the returned launcher applies it in the child.

    `seccomp_program`: the filter from Sandbox.seccomp_program(), installed after Landlock
    (None only in tests of Landlock alone). Raises OSError when the kernel refuses the ruleset.
    """
    return NsfreeLauncher(rules, seccomp_program)

"""`corral serve`: the bridge's HTTP API (and, with --spool, its file channel) for one workspace.

    corral serve [--port N | --socket PATH] [--workspace DIR] [--spool DIR [--spool-access A]]

Where it listens:
- `--port N` (default DEFAULT_PORT; 0 picks a free port): 127.0.0.1 only. There is no option
  for another address: the bridge is a local connector, and anything remote reaches it through
  a tunnel the user sets up (ssh -L), which keeps the token off the network.
- `--socket PATH`: a unix socket, created 0600 (bound under umask 0177, so it is never looser
  even for a moment) in a directory that must be the user's own and 0700 (created so if
  absent). A stale socket left by a dead server is replaced; a live one is refused.
- `--spool DIR` alone serves only the spool (bridge/spool.py); with --port or --socket, both.

It prints where it listens and how to get the token (`corral token`), never the token.

Running it with least privilege. The server needs no root and no capability: it reads the
workspace (writes it only for commands declared `"writable": true`), keeps its token, approvals
and audit log in its own state directory, and starts bubblewrap sandboxes, which need
unprivileged user namespaces. Run it as a dedicated user, so that a flaw in the server or in a
declaration reaches that user's files only, not yours:

    sudo useradd --system --create-home --home-dir /var/lib/corral-bridge \\
        --shell /usr/sbin/nologin corral-bridge
    sudo setfacl -R -m u:corral-bridge:rX /srv/project   # rwX if a command is writable
    sudo -u corral-bridge corral token                   # the token, for the agent's config
    sudo -u corral-bridge corral serve --port 8787 --workspace /srv/project

or as a systemd service (`systemctl edit --full --force corral-bridge.service`):

    [Service]
    User=corral-bridge
    ExecStart=/usr/local/bin/corral serve --port 8787 --workspace /srv/project
    UMask=0077
    NoNewPrivileges=yes          # bubblewrap is not setuid here; it needs no new privileges
    CapabilityBoundingSet=
    ProtectSystem=strict
    ProtectHome=yes
    ReadWritePaths=/var/lib/corral-bridge /srv/project
    PrivateTmp=yes
    RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
    IPAddressDeny=any            # drop these two if a declared command needs the network
    IPAddressAllow=localhost
    # Do not set RestrictNamespaces or PrivateUsers: the sandboxes need user namespaces.

The settings the server reads are that user's and the workspace's (.corral/settings.json);
make them writable only by whoever decides what agents may run. The unix socket is 0600, so
only the server's own user can connect to it: for clients running as another user, use --port,
where the token is what keeps other local users out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, UsageError

if TYPE_CHECKING:
    import uvicorn

    from corral.bridge.service import Bridge
    from corral.bridge.spool import SpoolServer

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_PORT = 8787
LOOPBACK = "127.0.0.1"  # the only address `corral serve` binds
BACKLOG = 128
SHUTDOWN_GRACE_S = 5.0  # requests in flight get this long when the server is stopped


def add_serve_command(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve the declared bridge commands over HTTP on 127.0.0.1 (or a unix socket)",
        description="Agents run the commands declared under bridge.commands in the settings, "
        "each in a corral sandbox, through an HTTP JSON API (OpenAPI at /openapi.json) "
        "authenticated by the token `corral token` prints. Risky requests wait for a human: "
        "`corral approve ID`, or the page at /approvals. With --spool DIR alone, only the "
        "file channel is served. Run it as a dedicated user: see the module "
        "corral.bridge.serve for a recipe.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--port",
        type=_port,
        metavar="N",
        help=f"listen on 127.0.0.1:N (default {DEFAULT_PORT}; 0 picks a free port)",
    )
    where.add_argument(
        "--socket",
        metavar="PATH",
        help="listen on a unix socket instead (0600, in a directory of yours with mode 0700)",
    )
    parser.add_argument(
        "--workspace", metavar="DIR", help="the project whose commands to serve (default: current)"
    )
    parser.add_argument(
        "--spool",
        metavar="DIR",
        help="serve requests dropped as files in DIR (alone: only these; with --port or "
        "--socket: both)",
    )
    parser.add_argument(
        "--spool-access",
        choices=("private", "shared"),
        default="private",
        help="private (default): DIR must be yours and closed to others; shared: a folder "
        "you share with the agent on purpose (a VM's shared directory)",
    )
    parser.set_defaults(handler=cmd_serve)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return port


def cmd_serve(args: argparse.Namespace) -> int:
    workspace = os.path.abspath(args.workspace or os.getcwd())
    if not os.path.isdir(workspace):
        raise UsageError(f"{workspace}: not a directory", hint="--workspace names the project")
    http = args.spool is None or args.port is not None or args.socket is not None
    if http:
        _require_http_stack()
    if os.geteuid() == 0:
        print(
            "corral: warning: serving as root; the bridge needs no privileges: run it as a "
            "dedicated user (`corral serve --help` says where the recipe is)",
            file=sys.stderr,
        )
    with _bridge_for(workspace) as (bridge, state_dir):
        spool = _open_spool(bridge, args.spool, args.spool_access) if args.spool else None
        if spool is not None and not http:
            _serve_spool_in_foreground(spool)
            return 0
        with _listening(args) as (listener, where), _spool_thread(spool):
            _serve_http(bridge, listener, where=where, workspace=workspace, state_dir=state_dir)
    return 0


@contextlib.contextmanager
def _bridge_for(workspace: str) -> Iterator[tuple[Bridge, str]]:
    """The Bridge of `workspace`, auditing to the spool of the workspace's audit log (`corral
    log` shows its records) and to the forwarders its settings name; closed on the way out,
    which turns approvals still pending into denials."""
    from corral.audit.spool import open_audit_sink
    from corral.bridge.service import Bridge
    from corral.hostpaths import host_paths
    from corral.policy.settings import load_policy

    host = host_paths(workspace, os.environ)
    name = f"bridge-{os.getpid()}-{os.urandom(4).hex()}"
    audit = open_audit_sink(load_policy(host), name)
    try:
        with Bridge.from_settings(workspace, state_dir=host.state_dir, audit=audit) as bridge:
            yield bridge, host.state_dir
    finally:
        audit.close()


# -- HTTP ------------------------------------------------------------------------------------


def _require_http_stack() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CorralError(
            f"corral serve needs {exc.name}, which is not installed",
            hint="install corral with its bridge extra: pip install 'corral[bridge]'",
        ) from None


@contextlib.contextmanager
def _listening(args: argparse.Namespace) -> Iterator[tuple[socket.socket, str]]:
    if args.socket is None:
        port = DEFAULT_PORT if args.port is None else args.port
        with bind_loopback(port) as sock:
            yield sock, f"http://{LOOPBACK}:{sock.getsockname()[1]}"
        return
    path = os.path.abspath(args.socket)
    with bind_unix_socket(path) as sock:
        identity = os.stat(path).st_ino
        try:
            yield sock, f"unix:{path}"
        finally:
            # Ours to remove, unless another server has replaced it meanwhile.
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == identity:
                    os.unlink(path)


def bind_loopback(port: int) -> socket.socket:
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only when it does,
    # and without it Nagle's algorithm and delayed ACKs add ~40 ms to every response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {LOOPBACK}:{port}: {exc.strerror}",
            hint="choose another --port (0 picks a free one)",
        ) from None
    return sock


def bind_unix_socket(path: str) -> socket.socket:
    """A listening unix socket at `path`: 0600, in a 0700 directory of ours."""
    _ensure_private_socket_dir(os.path.dirname(path))
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is born 0600: no window where it is looser
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    return sock


def _ensure_private_socket_dir(directory: str) -> None:
    hint = "choose a socket path in a directory only you can enter (mode 0700), or let corral "
    hint += "create one: a path whose directory does not exist yet"
    if not os.path.lexists(directory):
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)  # makedirs applies the umask
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{directory}: not a directory (a symlink or a file?)", hint=hint)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        found = f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
        raise UsageError(f"{directory}: must be yours with mode 0700 ({found})", hint=hint)


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path}: exists and is not a socket", hint="choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a dead server's leftover
        return
    finally:
        probe.close()
    raise UsageError(f"{path}: another server is listening on it", hint="stop it first")


def _serve_http(
    bridge: Bridge, listener: socket.socket, *, where: str, workspace: str, state_dir: str
) -> None:
    import uvicorn

    from corral.bridge.http_api import HttpLimits, create_app
    from corral.bridge.token import TokenFile, load_or_create

    load_or_create(state_dir)  # the first start creates it, so `corral token` has one to print
    app = create_app(bridge, token=TokenFile(state_dir).current, http=HttpLimits())
    server = uvicorn.Server(uvicorn_config(app))
    _announce(where, workspace)
    # uvicorn handles SIGTERM itself (a graceful shutdown), then raises it again with the
    # handler it found. The default one would kill the process before `bridge.close()` turns
    # pending approvals into denials; this one ends `corral serve` through its finally blocks.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        server.run(sockets=[listener])
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def uvicorn_config(app: Any) -> uvicorn.Config:
    """How `corral serve` runs uvicorn (bench/bridge.py measures the same server)."""
    import uvicorn

    return uvicorn.Config(
        app,
        http="h11",
        ws="none",
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,  # nothing sits in front of it: never trust X-Forwarded-*
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers
    )


class _Terminated(BaseException):  # not an error: the way out on SIGTERM
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _announce(where: str, workspace: str) -> None:
    auth = '-H "Authorization: Bearer $(corral token)"'
    if where.startswith("unix:"):
        example = f"curl --unix-socket {where.removeprefix('unix:')} {auth} http://localhost"
        page = ""  # a browser cannot open a unix socket
    else:
        example = f"curl {auth} {where}"
        page = f"{where}/approvals (log in with the token), "
    lines = (
        f"serving the bridge commands of {workspace}",
        f"listening on {where}",
        "clients send `Authorization: Bearer TOKEN`; `corral token` prints it",
        f"try: {example}/v1/commands",
        f"approvals: {page}`corral approvals`, `corral approve ID`",
    )
    for line in lines:
        print(f"corral: {line}", flush=True)


# -- spool -----------------------------------------------------------------------------------


def _open_spool(bridge: Bridge, directory: str, access: str) -> SpoolServer:
    try:
        from corral.bridge.spool import SpoolServer
    except ImportError as exc:
        raise CorralError(
            f"--spool is not available in this corral ({exc})",
            hint="serve over HTTP without --spool",
        ) from None
    return SpoolServer(bridge, os.path.abspath(directory), access=access)  # type: ignore[arg-type]


def _serve_spool_in_foreground(spool: SpoolServer) -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"corral: serving the spool {spool.dirs.path}", flush=True)
    try:
        spool.serve(stop)
    except KeyboardInterrupt:
        pass  # serve() closed the spool on its way out
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _spool_thread(spool: SpoolServer | None) -> Iterator[None]:
    """Next to the HTTP server: the spool polls on a thread and stops when the server does."""
    if spool is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=spool.serve, args=(stop,), name="corral-spool", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def main(argv: list[str] | None = None) -> int:
    """`python -m corral.bridge.serve ...`, the same as `corral serve ...`."""
    from corral.cli import main as corral_main

    return corral_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

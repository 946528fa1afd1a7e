"""The sandbox's end of the proxy: open the proxy ports, leave a forwarder behind, run the command.

    python3 -I -S /proc/self/fd/N --channel FD --listen h:3128 --listen s:1080 -- CMD ARGS...

Run inside the sandbox just before the command, from a memfd holding this file compiled
(`compiled_launcher`), like `corral.inner`: corral need not be importable inside, and nothing
is compiled per launch. FD is one end of a SOCK_SEQPACKET socketpair whose other end the host
proxy holds (the channel); the sandbox cannot open unix sockets by path, but it can use one it
was given.

Steps, in this order:
1. Bind and listen on 127.0.0.1 for every `--listen KIND:PORT` before anything else, so the
   command can connect the moment it starts: there is no readiness race.
2. Fork twice. The grandchild is the forwarder: reparented to the sandbox's init, so a shell's
   `wait` never waits for it, and in a session of its own (setsid), so signals meant for the
   command's process group (Ctrl-C, `kill -- -PGID`) do not take the network away.
3. Close the listeners, the channel and the script's memfd, restore SIGPIPE and SIGXFSZ to
   their defaults (Python ignores both, and an ignored signal survives exec: `yes | head`
   would print EPIPE errors), and exec the command.

The forwarder never touches the bytes of a connection. It accepts each TCP connection and
sends the socket itself to the host with SCM_RIGHTS, where the proxy serves it like any
client; it also answers the host's requests to connect to a published port inside. It exits
when the channel closes (the host stopped); the pid namespace kills it when the command ends.

Wire format: one message per SEQPACKET datagram, the first byte its kind, ports as 2 bytes
and ids as 4 bytes, big-endian.
    sandbox -> host   KIND PORT        + 1 fd   a connection accepted on listener KIND:PORT
                                                (KIND: h HTTP proxy, s SOCKS5, p host port)
                      c ID ERRNO       [+ 1 fd] the answer to request ID: a socket whose
                                                connect to the published port was started
                                                (ERRNO 0), or no socket and why
    host -> sandbox   C ID PORT                 connect to 127.0.0.1:PORT inside
Nothing the sandbox sends is trusted by the host: it checks each socket and each port.

Without `-- CMD` (tests and benches on the host), it prints `ready PORT...` (the ports as
bound, so port 0 works) and forwards in the foreground.

Only built-in modules are imported (os, sys, errno, select, _socket, _signal): `socket` and
`signal` import `enum`, which costs more than everything else here together.
Exit statuses of the launcher itself, never the command's: 125 when it cannot set up (the
command is not run: it would have no network and no way to say why), 126 when CMD cannot be
executed, 127 when CMD is not found (as a shell says).
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import sys

EXIT_LAUNCHER = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

LISTEN_HOST = "127.0.0.1"
BACKLOG = 1024
KINDS = (b"h", b"s", b"p")
"""Listener kinds: HTTP proxy, SOCKS5 proxy, host port."""
CONNECT_REQUEST = b"C"
CONNECT_REPLY = b"c"
ACCEPTED_SIZE = 3
REQUEST_SIZE = 7
REPLY_SIZE = 7
_FD_BYTES = 4  # an int in SCM_RIGHTS data


def encode_accepted(kind: bytes, port: int) -> bytes:
    return kind + port.to_bytes(2, "big")


def encode_request(ident: int, port: int) -> bytes:
    return CONNECT_REQUEST + ident.to_bytes(4, "big") + port.to_bytes(2, "big")


def encode_reply(ident: int, error: int) -> bytes:
    return CONNECT_REPLY + ident.to_bytes(4, "big") + error.to_bytes(2, "big")


def fd_rights(fd: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes `fd` (SCM_RIGHTS)."""
    return [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(_FD_BYTES, sys.byteorder))]


def parse_args(argv: list[str]) -> tuple[int, list[tuple[bytes, int]], list[str] | None]:
    """(channel fd, [(kind, port)], command or None without `--`); ValueError otherwise."""
    channel = -1
    listens: list[tuple[bytes, int]] = []
    at = 0
    while at < len(argv) and argv[at] != "--":
        flag, value = argv[at], argv[at + 1] if at + 1 < len(argv) else ""
        if flag == "--channel" and value.isdigit():
            channel = int(value)
        elif flag == "--listen" and value[1:2] == ":" and value[2:].isdigit():
            kind, port = value[:1].encode(), int(value[2:])
            if kind not in KINDS or port > 65535:
                raise ValueError(f"bad --listen {value!r}")
            listens.append((kind, port))
        else:
            raise ValueError(f"unexpected {flag!r}")
        at += 2
    if channel < 0 or not listens:
        raise ValueError("--channel FD and at least one --listen KIND:PORT are needed")
    if at == len(argv):
        return channel, listens, None
    if at + 1 == len(argv):
        raise ValueError("no command after --")
    return channel, listens, argv[at + 1 :]


def listen(port: int) -> _socket.socket:
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        sock.bind((LISTEN_HOST, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Forwarder:
    def __init__(self, channel: _socket.socket, listeners: list[tuple[bytes, _socket.socket]]):
        self.channel = channel
        self.listeners = {
            sock.fileno(): (encode_accepted(kind, sock.getsockname()[1]), sock)
            for kind, sock in listeners
        }

    def run(self) -> None:
        """Until the channel closes or fails (the host is gone)."""
        poller = select.poll()
        for fd in self.listeners:
            poller.register(fd, select.POLLIN)
        poller.register(self.channel.fileno(), select.POLLIN)
        while True:
            for fd, _events in poller.poll():
                if fd in self.listeners:
                    self.hand_over(*self.listeners[fd])
                elif not self.answer():
                    return

    def hand_over(self, message: bytes, listener: _socket.socket) -> None:
        """Send every waiting connection to the host; OSError when the channel fails."""
        while True:
            try:
                fd, _address = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                return  # out of descriptors: the backlog keeps the client waiting
            try:
                self.channel.sendmsg([message], fd_rights(fd))
            finally:
                os.close(fd)

    def answer(self) -> bool:
        """Serve one request from the host; False when the channel has closed."""
        try:
            data = self.channel.recv(64)
        except OSError:
            return False
        if not data:
            return False
        if len(data) == REQUEST_SIZE and data[:1] == CONNECT_REQUEST:
            self.connect_inside(int.from_bytes(data[1:5], "big"), int.from_bytes(data[5:], "big"))
        return True

    def connect_inside(self, ident: int, port: int) -> None:
        """Start connecting to the published port and send the socket; the host waits for
        the connection to complete, so this never blocks."""
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            error = sock.connect_ex((LISTEN_HOST, port))
            if error in (0, errno.EINPROGRESS):
                self.channel.sendmsg([encode_reply(ident, 0)], fd_rights(sock.fileno()))
            else:
                self.channel.sendmsg([encode_reply(ident, error)])
        finally:
            sock.close()


def start_forwarder(forwarder: Forwarder, keep: tuple[int, ...]) -> None:
    """Fork the forwarder off as a grandchild in its own session; OSError if it cannot be."""
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.setsid()
            if os.fork() == 0:
                run_detached(forwarder, keep)
            status = 0
        finally:
            os._exit(status)
    _pid, status = os.waitpid(child, 0)
    if status != 0:
        raise OSError(errno.EAGAIN, "fork failed")


def run_detached(forwarder: Forwarder, keep: tuple[int, ...]) -> None:
    """The forwarder's life: no stdin or stdout of the command's (a caller reading the
    command's output to its end must not wait for us), stderr kept for one last word."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        for fd in keep:
            os.close(fd)
        forwarder.run()
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            sys.stderr.write(f"corral: the proxy forwarder stopped: {exc}\n")
    finally:
        os._exit(0)


def exec_command(command: list[str]) -> int:
    import _signal  # type: ignore[import-not-found]  # signal.py would import enum

    for number in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(number, _signal.SIG_DFL)
    try:
        os.execvp(command[0], command)  # noqa: S606 - running the command is the point
    except FileNotFoundError:
        sys.stderr.write(f"corral: {command[0]}: command not found\n")
        return EXIT_NOT_FOUND
    except OSError as failure:
        sys.stderr.write(f"corral: {command[0]}: {failure.strerror}\n")
        return EXIT_CANNOT_EXECUTE


def main(argv: list[str], *, script_fd: int | None) -> int:
    try:
        channel_fd, listens, command = parse_args(argv)
        channel = _socket.socket(fileno=channel_fd)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"corral: proxy launcher: {exc}\n")
        return EXIT_LAUNCHER
    listeners: list[tuple[bytes, _socket.socket]] = []
    try:
        for kind, port in listens:
            listeners.append((kind, listen(port)))
    except OSError as exc:
        why = exc.strerror
        if exc.errno == errno.EACCES and port < 1024:
            why = f"{why} (ports below 1024 need a privilege no sandbox has)"
        sys.stderr.write(f"corral: cannot listen on {LISTEN_HOST}:{port}: {why}\n")
        return EXIT_LAUNCHER
    forwarder = Forwarder(channel, listeners)
    if command is None:
        ports = " ".join(str(sock.getsockname()[1]) for _, sock in listeners)
        sys.stdout.write(f"ready {ports}\n")
        sys.stdout.flush()
        forwarder.run()
        return 0
    try:
        start_forwarder(forwarder, () if script_fd is None else (script_fd,))
    except OSError as exc:
        sys.stderr.write(f"corral: cannot start the proxy forwarder: {exc.strerror}\n")
        return EXIT_LAUNCHER
    for _, sock in listeners:
        sock.close()
    channel.close()
    if script_fd is not None:
        os.close(script_fd)
    return exec_command(command)


def script_fd_of(argv0: str) -> int | None:
    """The memfd this launcher was run from (`/proc/self/fd/N`), which the command must not
    inherit."""
    prefix = "/proc/self/fd/"
    if argv0.startswith(prefix) and argv0[len(prefix) :].isdigit():
        return int(argv0[len(prefix) :])
    return None


def compiled_launcher() -> bytes:
    """This file as a .pyc image, for `python3 -I -S /proc/self/fd/N` (see `launcher_argv`).
    Compiled once per process: compiling it on every launch would cost more than running it."""
    import marshal
    from _frozen_importlib_external import MAGIC_NUMBER  # loaded at startup: costs nothing

    with open(__file__, encoding="utf-8") as f:
        code = compile(f.read(), "<corral.proxy.launcher>", "exec", dont_inherit=True, optimize=2)
    return MAGIC_NUMBER + bytes(12) + marshal.dumps(code)


def launcher_argv(
    python: str, *, script_fd: int, channel_fd: int, listens: list[tuple[str, int]]
) -> list[str]:
    """The launcher's part of the command line; the command follows it. `python` must be
    visible inside the sandbox: os.path.realpath(sys.executable), not a venv's link."""
    argv = [python, "-I", "-S", f"/proc/self/fd/{script_fd}", "--channel", str(channel_fd)]
    for kind, port in listens:
        argv += ["--listen", f"{kind}:{port}"]
    return [*argv, "--"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], script_fd=script_fd_of(sys.argv[0])))

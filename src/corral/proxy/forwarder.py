"""The sandbox's side of the proxy: TCP on 127.0.0.1 in, the host proxy's unix sockets out.

    python -m corral.proxy.forwarder 3128=/run/corral/http.sock 1080=/run/corral/socks.sock

Inside the sandbox's network namespace, programs find proxies at 127.0.0.1:3128 (HTTP) and
127.0.0.1:1080 (SOCKS5); this process relays each connection, unchanged, to the unix socket
bind-mounted from the host, where the proxy decides. It knows nothing of policy: a sandboxed
program that talks to the unix socket directly meets the same proxy.

Once every port listens it prints one line, `ready PORT...` (the ports as bound, so port 0 can
be used in tests), to stdout or to the file descriptor given by `--ready-fd N`, then relays
until killed. Start-up matters (it runs in every filtered sandbox), so it imports only os,
socket, selectors and the relay, never asyncio.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
from typing import TYPE_CHECKING

from corral.proxy.relay import PipePool, Tunnel

if TYPE_CHECKING:
    from collections.abc import Callable

USAGE = "usage: python -m corral.proxy.forwarder [--ready-fd N] PORT=SOCKET_PATH..."
LISTEN_HOST = "127.0.0.1"
BACKLOG = 1024


class SelectorReactor:
    """asyncio's add_reader/add_writer on top of selectors, the least the relay needs."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}

    def _update(self, fd: int) -> None:
        mask = (selectors.EVENT_READ if fd in self._readers else 0) | (
            selectors.EVENT_WRITE if fd in self._writers else 0
        )
        registered = fd in self._selector.get_map()
        if not mask:
            if registered:
                self._selector.unregister(fd)
        elif registered:
            self._selector.modify(fd, mask)
        else:
            self._selector.register(fd, mask)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> bool:
        found = self._readers.pop(fd, None) is not None
        self._update(fd)
        return found

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> bool:
        found = self._writers.pop(fd, None) is not None
        self._update(fd)
        return found

    def run_forever(self) -> None:
        while True:
            for key, mask in self._selector.select():
                fd = key.fd
                # A callback may close the other fd of this batch; look each one up afresh.
                if mask & selectors.EVENT_READ and fd in self._readers:
                    self._readers[fd]()
                if mask & selectors.EVENT_WRITE and fd in self._writers:
                    self._writers[fd]()


class Forwarder:
    def __init__(self, routes: list[tuple[int, str]]) -> None:
        self.reactor = SelectorReactor()
        self.pool = PipePool()
        self.listeners: list[tuple[socket.socket, str]] = []
        for port, path in routes:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((LISTEN_HOST, port))
            listener.listen(BACKLOG)
            listener.setblocking(False)
            self.listeners.append((listener, path))

    @property
    def ports(self) -> list[int]:
        return [listener.getsockname()[1] for listener, _ in self.listeners]

    def serve_forever(self) -> None:
        for listener, path in self.listeners:
            self.reactor.add_reader(listener.fileno(), self._acceptor(listener, path))
        self.reactor.run_forever()

    def _acceptor(self, listener: socket.socket, path: str) -> Callable[[], None]:
        return lambda: self._accept(listener, path)

    def _accept(self, listener: socket.socket, path: str) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError:
                return  # out of descriptors: the backlog keeps the client waiting
            proxy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                proxy.connect(path)
            except OSError as exc:
                print(f"corral forwarder: cannot reach {path}: {exc.strerror}", file=sys.stderr)
                proxy.close()
                client.close()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Tunnel(self.reactor, client, proxy, pool=self.pool).start()


def parse_routes(args: list[str]) -> list[tuple[int, str]]:
    routes = []
    for arg in args:
        port, sep, path = arg.partition("=")
        if not sep or not port.isdigit() or not path or int(port) > 65535:
            raise ValueError(f"{arg!r} is not PORT=SOCKET_PATH")
        routes.append((int(port), path))
    if not routes:
        raise ValueError("no PORT=SOCKET_PATH given")
    return routes


def main(argv: list[str]) -> int:
    ready_fd = 1
    if argv[:1] == ["--ready-fd"] and len(argv) > 1 and argv[1].isdigit():
        ready_fd, argv = int(argv[1]), argv[2:]
    try:
        forwarder = Forwarder(parse_routes(argv))
    except ValueError as exc:
        print(f"corral forwarder: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"corral forwarder: cannot listen: {exc.strerror}", file=sys.stderr)
        return 3
    os.write(ready_fd, ("ready " + " ".join(map(str, forwarder.ports)) + "\n").encode())
    if ready_fd != 1:
        os.close(ready_fd)
    try:
        forwarder.serve_forever()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

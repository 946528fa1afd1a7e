"""The proxy ports on the host's loopback, for a command that has no network namespace.

The Landlock-only backend (`corral.nsfree`) runs the command on the host's own network stack,
so there is no "inside" for `launcher` to listen in. Instead corral itself listens on two
ephemeral ports of 127.0.0.1 (HTTP proxy, SOCKS5) for that one command, and hands each
connection accepted there over a channel to the proxy, exactly as the in-sandbox forwarder
does: it IS `launcher.Forwarder`, run on a thread of corral's instead of in a forked
grandchild, with the same wire format. The proxy's `channel.Channel` serves both alike.

Rules:
1. The listeners live only as long as the command: `close()` (the command's cleanup) shuts
   the channel down, which ends the forwarder's loop; its thread then closes the listeners.
2. Nothing here decides anything: every connection goes to the proxy, which checks it and
   records it under the command's sandbox id.
3. What this cannot prevent: any other local process can connect to these loopback ports too
   and is then served with the command's network rights, while the command runs. Landlock
   limits what the command can reach; it cannot make a listener the command's alone.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
import threading

from corral.proxy.launcher import Forwarder, listen

# How long close() waits for the forwarder's thread to see the channel shut down.
JOIN_TIMEOUT = 10.0


class HostListener:
    """Two host listeners and the forwarder thread that hands their connections over."""

    def __init__(self, channel: socket.socket) -> None:
        """Listen now (OSError when the host cannot) and start forwarding over `channel`, the
        far end of `ProxyServer.attach`. The listener owns `channel` from here on."""
        listeners: list[tuple[bytes, socket.socket]] = []
        try:
            for kind in (b"h", b"s"):
                listeners.append((kind, socket.socket(fileno=listen(0).detach())))
        except OSError:
            for _, sock in listeners:
                sock.close()
            channel.close()
            raise
        self._channel = channel
        self._listeners = [sock for _, sock in listeners]
        self.http_port: int = self._listeners[0].getsockname()[1]
        self.socks_port: int = self._listeners[1].getsockname()[1]
        self._thread = threading.Thread(
            target=self._forward,
            args=(Forwarder(channel, list(listeners)),),
            name="corral-host-listener",
            daemon=True,
        )
        self._thread.start()

    def _forward(self, forwarder: Forwarder) -> None:
        try:
            forwarder.run()
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                sys.stderr.write(f"corral: the proxy listener stopped: {exc}\n")
        finally:
            # Closed here, on the thread that polls them, never under its feet.
            for sock in self._listeners:
                sock.close()
            self._channel.close()

    def close(self) -> None:
        """Stop listening. Connections already handed over keep being served. Safe twice."""
        # Wakes the forwarder's poll (the channel reads as ended) and tells the proxy.
        # OSError: closed already (the proxy stopped first, or close() ran before).
        with contextlib.suppress(OSError):
            self._channel.shutdown(socket.SHUT_RDWR)
        self._thread.join(JOIN_TIMEOUT)

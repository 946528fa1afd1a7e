"""The sandbox's one way out: the host-side proxy and its in-sandbox end, per Sandbox.

`start_network(policy, ...)` returns None when the policy needs no proxy (no network, or only
the sandbox's own loopback); otherwise a running `NetworkService`, shared by every command of
one `Sandbox`, which hands each command its `CommandNetwork`: the launcher to put before the
command inside the sandbox, the environment variables that point clients at the proxy, and
the file descriptors that must reach the sandbox.

How a connection leaves (see `corral.proxy.launcher` and `corral.proxy.channel`): inside, a
forwarder listens on 127.0.0.1:3128 (HTTP proxy) and 127.0.0.1:1080 (SOCKS5); each connection
it accepts is passed, as a file descriptor, over a socketpair to the proxy on the host, which
decides, connects and relays. The sandbox's network namespace has nothing but its loopback,
so a program that ignores the proxy variables reaches nothing at all.

With no network namespace (the Landlock-only backend, `corral.nsfree`), the command shares
the host's loopback instead: corral listens there itself, on two ephemeral ports for that one
command (`NetworkService.for_host_command`), hands each connection over the same channel, and
Landlock lets the command connect to those two ports and no other.

This module is on the launch path (`corral.sandbox` imports it): the proxy itself, asyncio
and the rest are imported only by `start_network`, when a policy needs them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from corral.audit.events import Sink
    from corral.policy.model import Policy
    from corral.proxy.decision import Answer, Request

Resolver = Callable[[str], list[str]]
"""A host name to its addresses (tests map test names to loopback servers)."""
Ask = Callable[["Request"], "str | Answer"]
"""Decides a host in neither domain list: "once", "always" or "deny" (anything else denies), or
an `Answer` naming one of those and how it was reached, for the audit record. Called on the
proxy's worker thread, one question at a time."""
Notify = Callable[[str], None]
"""Receives the one-line message for each refused connection."""


class CommandNetwork(NamedTuple):
    argv_prefix: tuple[str, ...]
    env: dict[str, str]
    pass_fds: tuple[int, ...]
    channel_fd: int = -1
    """The channel's far end among `pass_fds`: `after_spawn` closes it in corral."""


class HostCommandNetwork(NamedTuple):
    """The proxy for a command on the host's own network stack (the Landlock-only backend)."""

    env: dict[str, str]
    ports: tuple[int, int]
    """(HTTP proxy, SOCKS5) on the host's 127.0.0.1, listening for this command only."""
    close: Callable[[], None]
    """Stop listening on `ports`: when the command has ended, or failed to start."""


class NetworkService:
    def for_command(self, sandbox_id: str) -> CommandNetwork:
        raise NotImplementedError

    def for_host_command(self, sandbox_id: str) -> HostCommandNetwork:
        raise NotImplementedError

    def after_spawn(self, network: CommandNetwork) -> None:
        """Close the parent's copies of the fds handed to the sandbox."""

    def close(self) -> None:
        pass


def needs_proxy(policy: Policy) -> bool:
    """A proxy runs for "filtered", and for "local" when something must cross the namespace:
    allowed domains, host ports or published ports. "none" has no sockets at all."""
    network = policy.network
    return network.access == "filtered" or (
        network.access == "local"
        and bool(network.allowed_domains or network.host_ports or network.publish_ports)
    )


def add_network_environment(env: dict[str, str], network_env: dict[str, str]) -> None:
    """Add a command's network variables to `env`. git config entries passed in the
    environment (GIT_CONFIG_COUNT, GIT_CONFIG_KEY_n, GIT_CONFIG_VALUE_n) are numbered after
    the caller's own, not over them: the caller's stay, and for a key both set, git takes
    the later one, the proxy's."""
    extra = dict(network_env)
    theirs = env.get("GIT_CONFIG_COUNT", "")
    ours = extra.pop("GIT_CONFIG_COUNT", "")
    if ours and theirs.isdigit() and int(theirs) > 0:
        start = int(theirs)
        for index in range(int(ours)):
            for part in ("KEY", "VALUE"):
                extra[f"GIT_CONFIG_{part}_{start + index}"] = extra.pop(
                    f"GIT_CONFIG_{part}_{index}"
                )
        ours = str(start + int(ours))
    if ours:
        extra["GIT_CONFIG_COUNT"] = ours
    env.update(extra)


def write_to_stderr(line: str) -> None:
    """The default `Notify`: corral's stderr, which is the sandboxed command's terminal."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def start_network(
    policy: Policy,
    *,
    sink: Sink,
    resolver: Resolver | None = None,
    ask: Ask | None = None,
    notify: Notify | None = write_to_stderr,
) -> NetworkService | None:
    """The running proxy for `policy`, or None when it needs none. `notify` hears one line per
    refused connection (None: the audit sink only). UsageError when a published port is
    taken or two ports collide; SettingsError for a bad domain pattern."""
    if not needs_proxy(policy):
        return None
    from corral.proxy.service import ProxyNetwork

    return ProxyNetwork(policy, sink=sink, resolver=resolver, ask=ask, notify=notify)

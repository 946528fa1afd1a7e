"""The sandbox's one way out: the host-side proxy and its in-sandbox end, per Sandbox.

`start_network(policy, ...)` returns None when the policy needs no proxy (no network, or only
the sandbox's own loopback); otherwise a running `NetworkService`, shared by every command of
one `Sandbox`, which hands each command its `CommandNetwork`: the launcher to put before the
command inside the sandbox, the environment variables that point clients at the proxy, and
the file descriptors that must reach the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from corral.audit.events import Sink
from corral.policy.model import Policy

Resolver = Callable[[str], list[str]]
Ask = Callable[..., str]


class CommandNetwork(NamedTuple):
    argv_prefix: tuple[str, ...]
    env: dict[str, str]
    pass_fds: tuple[int, ...]


class NetworkService:
    def for_command(self, sandbox_id: str) -> CommandNetwork:
        raise NotImplementedError

    def after_spawn(self, network: CommandNetwork) -> None:
        """Close the parent's copies of the fds handed to the sandbox."""

    def close(self) -> None:
        pass


def needs_proxy(policy: Policy) -> bool:
    network = policy.network
    return network.access == "filtered" or (
        network.access == "local" and bool(network.allowed_domains)
    )


def start_network(
    policy: Policy,
    *,
    sink: Sink,
    resolver: Resolver | None = None,
    ask: Ask | None = None,
) -> NetworkService | None:
    # Until the proxy is wired in, a policy that wants one fails closed: the sandbox keeps
    # its own loopback only, which is stricter than what was asked.
    del policy, sink, resolver, ask
    return None

"""The network of one `Sandbox`: the proxy server, and what each command needs to reach it.

`corral.network.start_network` builds a `ProxyNetwork` when the policy needs a proxy. Per
command (`for_command`) it opens a channel to the proxy and returns:
- `argv_prefix`: the launcher (`launcher`) run from a sealed memfd by the host's interpreter,
  which listens on the proxy ports inside, leaves its forwarder behind and execs the command;
- `env`: the variables that point HTTP clients, git, npm, pip, uv and Node at those ports
  (`proxy_environment`);
- `pass_fds`: the channel's far end and the launcher's memfd.

A command with no network namespace (the Landlock-only backend) gets `for_host_command`
instead: the same channel, with its far end kept by corral and fed by a `HostListener` on two
ephemeral ports of the host's 127.0.0.1, and the same variables pointing at those ports.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
from collections.abc import Mapping

from corral.audit.events import Sink
from corral.errors import UsageError
from corral.network import (
    Ask,
    CommandNetwork,
    HostCommandNetwork,
    NetworkService,
    Notify,
    Resolver,
)
from corral.policy.model import Policy
from corral.proxy.host_listener import HostListener
from corral.proxy.launcher import compiled_launcher, launcher_argv
from corral.proxy.notice import DenialNotices
from corral.proxy.server import ProxyServer

# The proxy ports inside, fixed: `httpProxyPort`/`socksProxyPort` point at the user's own proxy
# on the host instead (sandbox-runtime's meaning), they never move these.
HTTP_PROXY_PORT = 3128
SOCKS_PROXY_PORT = 1080
# Inside the sandbox, its own loopback is direct: a test server or a published dev server.
NO_PROXY = "localhost,127.0.0.1,::1"

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def proxy_environment(http_port: int, socks_port: int) -> dict[str, str]:
    """The variables that send each common client through the proxy inside the sandbox.

    Both spellings of the standard variables: curl reads only lower-case `http_proxy` (the
    upper-case one is ignored since "httpoxy"), most others read either. The tool-specific
    ones override a user's own proxy in files the sandbox reads (~/.gitconfig, ~/.npmrc),
    which would otherwise win over the environment and lead nowhere.
    """
    http = f"http://127.0.0.1:{http_port}"
    socks = f"socks5h://127.0.0.1:{socks_port}"  # "h": the proxy resolves names, not the client
    env = {
        "HTTP_PROXY": http,
        "HTTPS_PROXY": http,
        "ALL_PROXY": socks,
        "NO_PROXY": NO_PROXY,
        # git: a command-line-level config entry, above every config file.
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.proxy",
        "GIT_CONFIG_VALUE_0": http,
        # npm's own settings (they beat .npmrc); Node >= 24 reads HTTP(S)_PROXY with this.
        "npm_config_proxy": http,
        "npm_config_https_proxy": http,
        "npm_config_noproxy": NO_PROXY,
        "NODE_USE_ENV_PROXY": "1",
        # pip: beats a proxy in pip.conf; uv, cargo and Go read the standard variables.
        "PIP_PROXY": http,
    }
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        env[name.lower()] = env[name]
    return env


def listen_plan(policy: Policy) -> list[tuple[str, int]]:
    """The launcher's listeners: (kind, port) for the HTTP proxy, SOCKS5 and each host port.
    The proxy ports inside are always 3128 and 1080: `httpProxyPort`/`socksProxyPort` name
    the user's own proxy on the host, not a port inside (see `corral.proxy.ports`).
    UsageError when two would share a port inside, a published port included (the command
    could not listen on a port the forwarder holds), or when the user's proxy is on a port
    corral publishes on the host (its connections would come back into the sandbox)."""
    network = policy.network
    plan = [
        ("h", HTTP_PROXY_PORT),
        ("s", SOCKS_PROXY_PORT),
        *(("p", port) for port in dict.fromkeys(network.host_ports)),
    ]
    names = {
        "h": "the HTTP proxy's port inside",
        "s": "the SOCKS5 proxy's port inside",
        "p": "in network.hostPorts",
        "o": "in network.publishPorts",
    }
    published = dict.fromkeys(network.publish_ports)
    seen: dict[int, str] = {}
    for kind, port in [*plan, *(("o", port) for port in published)]:
        if port in seen:
            raise UsageError(
                f"port {port} is {seen[port]} and also {names[kind]}",
                hint="give each its own port (the proxy ports inside are 3128 and 1080)",
            )
        seen[port] = names[kind]
    for key, user_port in (
        ("httpProxyPort", network.http_proxy_port),
        ("socksProxyPort", network.socks_proxy_port),
    ):
        if user_port and user_port in published:
            raise UsageError(
                f"port {user_port} is both network.{key} (your proxy on the host) and "
                "network.publishPorts",
                hint="give each its own port",
            )
    return plan


def _sealed_memfd(name: str, data: bytes) -> int:
    """A read-only memfd holding `data`: sealed, so nothing can change it between commands."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd


@functools.cache
def _launcher_image() -> bytes:
    """Compiled once per process."""
    return compiled_launcher()


class ProxyNetwork(NetworkService):
    def __init__(
        self,
        policy: Policy,
        *,
        sink: Sink,
        resolver: Resolver | None,
        ask: Ask | None,
        notify: Notify | None,
    ) -> None:
        """Start the proxy (UsageError: a published port is taken, ports collide)."""
        self._listens = listen_plan(policy)
        settings_file = f"{policy.host.project_settings_dir}/settings.local.json"
        audit = sink if notify is None else DenialNotices(sink, notify, settings_file=settings_file)
        self._env = proxy_environment(self._listens[0][1], self._listens[1][1])
        self._python = os.path.realpath(sys.executable)
        self._server = ProxyServer(
            policy=policy.network,
            sink=audit,
            resolver=resolver,
            ask=ask,
            upstream_proxy=upstream_proxy_for(policy, os.environ),
        )
        self._script_fd = _sealed_memfd("corral-proxy-launcher", _launcher_image())
        try:
            self._server.start()
        except BaseException:
            os.close(self._script_fd)
            raise

    @property
    def server(self) -> ProxyServer:
        return self._server

    def for_command(self, sandbox_id: str) -> CommandNetwork:
        channel_fd = self._server.attach(sandbox_id).detach()
        argv = launcher_argv(
            self._python, script_fd=self._script_fd, channel_fd=channel_fd, listens=self._listens
        )
        return CommandNetwork(
            tuple(argv), dict(self._env), (channel_fd, self._script_fd), channel_fd=channel_fd
        )

    def for_host_command(self, sandbox_id: str) -> HostCommandNetwork:
        """Listen on the host's loopback for one command that shares the host's network
        (OSError when it cannot listen); `close` ends the listening."""
        listener = HostListener(self._server.attach(sandbox_id))
        ports = (listener.http_port, listener.socks_port)
        return HostCommandNetwork(proxy_environment(*ports), ports, listener.close)

    def after_spawn(self, network: CommandNetwork) -> None:
        """The sandbox has its copy of the channel now (or failed to start: then closing
        ours lets the proxy see the channel end)."""
        if network.channel_fd >= 0:
            os.close(network.channel_fd)

    def close(self) -> None:
        self._server.stop()
        if self._script_fd >= 0:
            os.close(self._script_fd)
            self._script_fd = -1


def upstream_proxy_for(policy: Policy, environ: Mapping[str, str]) -> str | None:
    """The proxy corral chains to: `network.upstreamProxy`, else the host's own HTTPS_PROXY
    (a corporate proxy keeps its inspection). Only http:// proxies can be chained; another
    scheme in the environment is ignored rather than breaking every command."""
    configured = policy.network.upstream_proxy
    if configured:
        return configured
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        value = environ.get(name, "")
        if value.lower().startswith("http://"):
            return value
    return None

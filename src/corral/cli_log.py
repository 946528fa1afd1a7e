"""`corral log`, `corral log show` and `corral violations`: the audit log from the command line.

`corral violations` lists every refused attempt, filesystem violations and network denials
merged in time order; those an `ignoreViolations` rule covers are recorded but left out unless
--all (everything) or --ignored (only those) asks for them (audit/violations.py).

Each command first moves what `corral run` spooled into the log (audit/ingest.py), so what it
shows is complete, then reads the log (audit/query.py) and renders it (audit/render.py): a
table on a terminal, aligned plain columns in a pipe, JSON Lines with --json. With no log yet
(nothing has run), the commands show empty results and create nothing.

Where (`audit_locations`): the commands read the settings of the project in the current
directory, as `corral run` there does. Its log is the `audit.database` they name (a per-project
log, spooled to apart: D.spool beside it), else <state dir>/audit.db with <state dir>/spool;
audit/spool.py's `audit_locations` decides for every writer and reader. $CORRAL_AUDIT_DB, when
set, replaces the log (not the spool). docs/audit.md tells users.

cli.py imports this module for every command, `corral run` included, so at module level it
uses argparse, os and sys only; the handlers import the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from corral.audit.ingest import IngestReport
    from corral.audit.query import AuditReader, EventFilter, IgnoredFilter
    from corral.audit.render import Style
    from corral.audit.rows import BlockedRow, EventRow, SessionRow, SessionStory
    from corral.errors import UsageError

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

AUDIT_DB_ENV = "CORRAL_AUDIT_DB"
DEFAULT_LIMIT = 50
# query.EVENT_KINDS, spelled out so that building the parser imports nothing of the audit log.
EVENT_KINDS = ("network", "violation", "bridge")
Scope = Literal["events", "violations"]


# -- parsers ---------------------------------------------------------------------------------


def add_log_commands(commands: Subparsers) -> None:
    """Registers `log` (with `log show`) and `violations` on the top-level subparsers."""
    add_log_command(commands)
    add_violations_command(commands)


def add_log_command(commands: Subparsers) -> None:
    log = commands.add_parser(
        "log",
        help="recent sessions and their events, from the audit log",
        description="Without filters: the recent sessions, then their recent events. With "
        "filters: the matching events. `corral log show SESSION`: one session's whole story.",
    )
    _add_filters(log, scope="events")
    log.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="then keep printing new events as they are recorded, until Ctrl-C",
    )
    log.add_argument("--json", action="store_true", help="JSON Lines, one object per row")
    actions = log.add_subparsers(dest="log_command", metavar="ACTION", prog="corral log")
    show = actions.add_parser(
        "show", help="one session's whole story: command, policy, exit, usage and every event"
    )
    show.add_argument("story_of", metavar="SESSION", help="a session id, or a prefix of one")
    show.add_argument("--json", dest="show_json", action="store_true", help="JSON Lines")


def add_violations_command(commands: Subparsers) -> None:
    violations = commands.add_parser(
        "violations",
        help="what the sandbox refused: filesystem accesses and network connections",
        description="Filesystem violations and network denials in time order, each with its "
        "kind, target and the rule that refused it. Those an ignoreViolations setting covers "
        "are recorded but only shown with --all or --ignored.",
    )
    _add_filters(violations, scope="violations")
    shown = violations.add_mutually_exclusive_group()
    shown.add_argument(
        "--all",
        dest="ignored",
        action="store_const",
        const="include",
        default="exclude",
        help="also those an ignoreViolations setting covers",
    )
    shown.add_argument(
        "--ignored",
        dest="ignored",
        action="store_const",
        const="only",
        help="only those an ignoreViolations setting covers",
    )
    violations.add_argument("--json", action="store_true", help="JSON Lines, one object per row")


def _add_filters(parser: argparse.ArgumentParser, *, scope: Scope) -> None:
    parser.add_argument("--session", metavar="ID", help="one session (an id or a prefix of one)")
    if scope == "events":
        parser.add_argument(
            "--kind", action="append", choices=EVENT_KINDS, help="only this kind (repeatable)"
        )
        parser.add_argument("--decision", choices=("allow", "deny"), help="only these decisions")
    parser.add_argument("--domain", help="network events to this host or its subdomains")
    parser.add_argument("--path", help="violations on this path or anything under it")
    when = 'a duration ago ("90s", "10m", "2h", "3d", "1w") or a local time ("2025-01-31T14:00")'
    parser.add_argument("--since", metavar="WHEN", help=f"from this time on: {when}")
    parser.add_argument("--until", metavar="WHEN", help="before this time (same forms)")
    parser.add_argument(
        "--limit",
        type=_count,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"the newest N rows of each table (default {DEFAULT_LIMIT}; 0 for all)",
    )


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a count: {text!r}")
    return int(text)


# -- handlers --------------------------------------------------------------------------------


def cmd_log(args: argparse.Namespace) -> int:
    if args.log_command == "show":
        return _closed_pipe_ends_quietly(_show, args)
    if args.follow:
        return _closed_pipe_ends_quietly(_follow, args)
    return _closed_pipe_ends_quietly(_overview, args)


def cmd_violations(args: argparse.Namespace) -> int:
    return _closed_pipe_ends_quietly(_violations, args)


def audit_locations(environ: Mapping[str, str]) -> tuple[str, str]:
    """(the log's path, the spool directory) for the project in the current directory."""
    from corral.audit.spool import audit_locations as locations_of
    from corral.errors import SettingsError
    from corral.hostpaths import host_paths
    from corral.policy.settings import load_policy

    host = host_paths(os.getcwd(), environ)
    try:
        policy = load_policy(host)
    except SettingsError as exc:
        # Say why a log command reads settings at all: the log's place is one of them.
        raise SettingsError(
            exc.reason,
            file=exc.file,
            key=exc.key,
            line=exc.line,
            column=exc.column,
            hint=exc.hint
            or "the log commands read this project's settings to find its audit log; fix "
            "the file (or run them from another directory)",
        ) from None
    database, spool = locations_of(policy)
    return environ.get(AUDIT_DB_ENV) or database, spool


def _violations(args: argparse.Namespace) -> int:
    from corral.audit.render import render_blocked

    times = _times(args)
    rows: list[BlockedRow] = []
    reader = _open_reader(audit_locations(os.environ))
    if reader is not None:
        with reader:
            rows = reader.blocked(_event_filter(args, reader, times))
    elif args.session:
        raise _no_session(args.session)
    render_blocked(rows, sys.stdout, style=_style(args.json))
    return 0


def _overview(args: argparse.Namespace) -> int:
    """Without filters: recent sessions, then recent events. With any: the matching events."""
    from corral.audit.render import render_events, render_sessions

    times = _times(args)
    overview = not _filtered(args)
    sessions: list[SessionRow] = []
    events: list[EventRow] = []
    reader = _open_reader(audit_locations(os.environ))
    if reader is None:
        if args.session:
            raise _no_session(args.session)
    else:
        with reader:
            flt = _event_filter(args, reader, times)
            if overview:
                sessions = reader.recent_sessions(limit=args.limit or -1)  # -1: no LIMIT
            events = reader.events(flt)
    style = _style(args.json)
    if overview:
        render_sessions(sessions, sys.stdout, style=style)
        if style != "json":
            sys.stdout.write("\n")
    render_events(events, sys.stdout, style=style)
    return 0


def _show(args: argparse.Namespace) -> int:
    from corral.audit.render import render_story
    from corral.errors import UsageError

    if _filtered(args) or args.follow:
        raise UsageError(
            "`corral log show` takes no filters", hint="corral log show SESSION [--json]"
        )
    reader = _open_reader(audit_locations(os.environ))
    if reader is None:
        raise _no_session(args.story_of)
    story: SessionStory
    with reader:
        story = reader.story(args.story_of)
    render_story(story, sys.stdout, style=_style(args.json or args.show_json))
    return 0


def _follow(args: argparse.Namespace) -> int:
    import time
    from itertools import chain

    from corral.audit.ingest import SpoolIngester
    from corral.audit.query import AuditReader
    from corral.audit.render import stream_events
    from corral.audit.store import AuditLog

    times = _times(args)
    log_path, spool = audit_locations(os.environ)
    # Following waits for runs to come, so it creates the log. The writer stays open: each
    # idle poll moves what running sessions have spooled since into the log.
    with AuditLog(log_path) as log, AuditReader(log_path) as reader:
        ingester = SpoolIngester(spool, log)
        _warn_damaged(ingester.ingest(), spool)
        flt = _event_filter(args, reader, times)
        after = reader.cursor()
        # Rows committed between these two queries are left to follow(): none shows twice.
        recent = [row for row in reader.events(flt) if row.rowid <= getattr(after, row.kind)]

        def idle(seconds: float) -> None:
            time.sleep(seconds)
            _warn_damaged(ingester.ingest(), spool)

        new = reader.follow(flt._replace(limit=None), after=after, sleep=idle)
        stream_events(chain(recent, new), sys.stdout, style=_style(args.json))
    return 0


# -- helpers ---------------------------------------------------------------------------------


def _open_reader(locations: tuple[str, str]) -> AuditReader | None:
    """A reader on the log once the spool is in it; None when there is no log at all."""
    from corral.audit.ingest import catch_up
    from corral.audit.query import AuditReader

    log_path, spool = locations
    _warn_damaged(catch_up(log_path, spool), spool)
    if not os.path.exists(log_path):
        return None
    return AuditReader(log_path)


def _filtered(args: argparse.Namespace) -> bool:
    names = ("session", "kind", "domain", "decision", "path", "since", "until")
    return any(getattr(args, name, None) for name in names)


def _times(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """--since and --until, checked before anything is opened (a typo costs no I/O)."""
    import time

    from corral.audit.query import parse_time

    now = time.time()
    since = parse_time(args.since, now=now) if args.since else None
    until = parse_time(args.until, now=now) if args.until else None
    return since, until


def _event_filter(
    args: argparse.Namespace, reader: AuditReader, times: tuple[float | None, float | None]
) -> EventFilter:
    from corral.audit.query import EventFilter

    ignored: IgnoredFilter = getattr(args, "ignored", "include")  # `corral log` shows all
    return EventFilter(
        session=reader.session(args.session).id if args.session else None,
        kinds=tuple(dict.fromkeys(getattr(args, "kind", None) or ())),
        domain=getattr(args, "domain", None),
        path=args.path,
        since=times[0],
        until=times[1],
        decision=getattr(args, "decision", None),
        ignored=ignored,
        limit=args.limit or None,
    )


def _style(json: bool) -> Style:
    return "json" if json else "auto"


def _no_session(session: str) -> UsageError:
    from corral.errors import UsageError

    return UsageError(f"no session {session!r}: nothing has been recorded yet")


def _warn_damaged(report: IngestReport, spool: str) -> None:
    if report.damaged:
        print(
            f"corral: warning: skipped {report.damaged} unreadable lines in the audit spool "
            f"{spool} (a writer killed in the middle of a line leaves one)",
            file=sys.stderr,
        )


def _closed_pipe_ends_quietly(
    handler: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """`corral log | head`: when the reader goes away, stop without a traceback."""
    try:
        return handler(args)
    except BrokenPipeError:
        # Python flushes stdout again at exit and would complain: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0

"""The bridge's CLI commands: `corral tools export`, `corral approve`, `corral deny`,
`corral approvals`.

Each `add_*_command(commands)` adds its parser to corral's sub-commands and sets
`handler=<callable(args) -> int>`; corral.cli wires them. Approvals are decided through the
shared files of `approvals.py`, so these work whichever process (serve, mcp) is waiting;
the waiting bridge records the decision, with `by` = "cli:<login name>", in the audit log.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING

from .tools import FORMATS

if TYPE_CHECKING:
    from .approvals import ApprovalStore, PendingApproval

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_tools_command(commands: Subparsers) -> None:
    tools = commands.add_parser("tools", help="the bridge's declared commands as tool schemas")
    actions = tools.add_subparsers(dest="tools_action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export", help="print the declared commands as tool definitions (JSON)"
    )
    export.add_argument("--format", required=True, choices=FORMATS, help="the API to export for")
    export.add_argument(
        "--workspace", metavar="DIR", help="whose settings to read (default: current directory)"
    )
    export.set_defaults(handler=cmd_tools_export)


def add_approve_command(commands: Subparsers) -> None:
    approve = commands.add_parser("approve", help="approve a pending bridge request")
    approve.add_argument("id", metavar="ID", help="the approval id (`corral approvals` lists them)")
    approve.add_argument("--reason", default="", help="recorded with the decision")
    approve.set_defaults(handler=cmd_approve)


def add_deny_command(commands: Subparsers) -> None:
    deny = commands.add_parser("deny", help="deny a pending bridge request")
    deny.add_argument("id", metavar="ID", help="the approval id (`corral approvals` lists them)")
    deny.add_argument("--reason", default="", help="told to the agent, and recorded")
    deny.set_defaults(handler=cmd_deny)


def add_approvals_command(commands: Subparsers) -> None:
    approvals = commands.add_parser("approvals", help="list bridge requests waiting for a human")
    approvals.add_argument("--json", action="store_true", help="print JSON instead of text")
    approvals.set_defaults(handler=cmd_approvals)


def cmd_tools_export(args: argparse.Namespace) -> int:
    from corral.hostpaths import host_paths

    from .declarations import load_declarations
    from .tools import export_tools

    host = host_paths(args.workspace or os.getcwd(), os.environ)
    settings = load_declarations(host)
    json.dump(export_tools(settings.commands, args.format), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, approve=True)


def cmd_deny(args: argparse.Namespace) -> int:
    return _decide(args, approve=False)


def cmd_approvals(args: argparse.Namespace) -> int:
    pending = _store().pending()
    if args.json:
        json.dump([p.as_json() for p in pending], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not pending:
        print("no bridge request is waiting for approval")
        return 0
    now = time.time()
    for approval in pending:
        print(_describe(approval, now))
    return 0


def login_name() -> str:
    """Who is deciding: the account this process runs as (not $USER, which anyone can set)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _store() -> ApprovalStore:
    from corral.hostpaths import host_paths

    from .approvals import ApprovalStore

    # The state directory depends on HOME / XDG_STATE_HOME only, not on the workspace.
    return ApprovalStore.in_state_dir(host_paths(os.getcwd(), os.environ).state_dir)


def _decide(args: argparse.Namespace, *, approve: bool) -> int:
    store = _store()
    pending = store.request(args.id)
    store.decide(args.id, approve=approve, by=f"cli:{login_name()}", reason=args.reason)
    word = "approved" if approve else "denied"
    if pending is not None:
        print(f"{word} {args.id}: {shlex.join(pending.argv)}  (in {pending.cwd})")
    else:
        print(f"{word} {args.id}")
    return 0


def _describe(approval: PendingApproval, now: float) -> str:
    left = max(approval.expires - now, 0)
    return "\n".join(
        [
            f"{approval.id}  {approval.command}  (from {approval.client}, {left:.0f} s left)",
            f"    run:    {shlex.join(approval.argv)}",
            f"    in:     {approval.cwd}",
            f"    policy: {approval.policy_summary}",
            f"    why:    {approval.reason}",
            f"    corral approve {approval.id}   /   corral deny {approval.id} --reason ...",
        ]
    )

"""The `corral` command: parses arguments and calls the library; nothing else lives here.

corral's own failures print one line (`corral: ...`) and a hint, and exit 2 (the user's input)
or 3 (this machine); see errors.py. Otherwise `corral run` exits with the command's status,
128 + N when signal N killed it, exactly as a shell would report it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from corral.errors import CorralError, UnsandboxedRefused
from corral.policy.model import MODES, MonitorViolations, Policy

if TYPE_CHECKING:
    from corral.probe import MachineFacts

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _add_policy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, help="strict, standard (default) or permissive")
    parser.add_argument(
        "--allow-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="also allow this domain through the proxy (repeatable)",
    )
    parser.add_argument(
        "--workspace", metavar="DIR", help="the writable project directory (default: current)"
    )


class _Formatter(argparse.HelpFormatter):
    """argparse builds a formatter for every argument it adds; the stock one imports shutil
    to measure the terminal, which costs every `corral run` a few milliseconds."""

    def __init__(self, prog: str) -> None:
        width = int(os.environ.get("COLUMNS", "") or 0) or 100
        super().__init__(prog, width=width - 2)


def _add_run(commands: Subparsers) -> None:
    run = commands.add_parser("run", help="run a command (and all it starts) inside the sandbox")
    _add_policy_args(run)
    run.add_argument(
        "--unsandboxed",
        action="store_true",
        help="run outside the sandbox; refused unless settings set allowUnsandboxedCommands",
    )
    run.add_argument("--quiet", action="store_true", help="no notes from corral on stderr")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="kill the sandbox after this")
    run.add_argument(
        "--monitor",
        choices=("off", "writes", "all"),
        help="record refused file accesses with their process: off, writes, or all (reads of "
        "hidden paths too); default: the settings' monitor.violations. docs/monitoring.md",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")


def _add_doctor(commands: Subparsers) -> None:
    doctor = commands.add_parser(
        "doctor", help="say what works on this machine and how to fix the rest"
    )
    _add_policy_args(doctor)


def _add_policy(commands: Subparsers) -> None:
    policy = commands.add_parser("policy", help="show, check or describe the effective policy")
    policy_commands = policy.add_subparsers(
        dest="policy_command", required=True, metavar="ACTION", prog="corral policy"
    )
    show = policy_commands.add_parser("show", help="the effective policy and each rule's origin")
    _add_policy_args(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    check = policy_commands.add_parser("check", help="validate settings, warn about risky rules")
    _add_policy_args(check)
    policy_commands.add_parser("schema", help="print the JSON Schema of the settings files")


def _add_demo(commands: Subparsers) -> None:
    commands.add_parser("demo", help="show four blocked attempts next to an allowed write")


def _add_log(commands: Subparsers) -> None:
    from corral.cli_log import add_log_command

    add_log_command(commands)


def _add_violations(commands: Subparsers) -> None:
    from corral.cli_log import add_violations_command

    add_violations_command(commands)


def _bridge(module: str, adder: str) -> Callable[[Subparsers], None]:
    """A bridge command: its module (FastAPI, the MCP SDK...) is imported only to build its
    parser, and the parser sets `handler`, so nothing here knows the bridge."""

    def add(commands: Subparsers) -> None:
        import importlib

        getattr(importlib.import_module(f"corral.bridge.{module}"), adder)(commands)

    return add


# Each command adds its own parser, so that `corral run` builds only the parser it needs:
# argparse costs about a millisecond per argument on the launch path.
COMMANDS: dict[str, Callable[[Subparsers], None]] = {
    "run": _add_run,
    "doctor": _add_doctor,
    "policy": _add_policy,
    "demo": _add_demo,
    "log": _add_log,
    "violations": _add_violations,
    "serve": _bridge("serve", "add_serve_command"),
    "mcp": _bridge("mcp_server", "add_mcp_command"),
    "token": _bridge("token", "add_token_command"),
    "tools": _bridge("cli", "add_tools_command"),
    "approvals": _bridge("cli", "add_approvals_command"),
    "approve": _bridge("cli", "add_approve_command"),
    "deny": _bridge("cli", "add_deny_command"),
}


def build_parser(*, only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (`only`) the top level with just that command's parser."""
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Run commands inside a sandbox you draw once.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version="corral 0.1.0")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", prog="corral"
    )
    for name, add in COMMANDS.items():
        if only is None or name == only:
            add(commands)
    return parser


def _load_policy(args: argparse.Namespace) -> Policy:
    from corral.hostpaths import host_paths
    from corral.policy.settings import load_policy

    host = host_paths(args.workspace or os.getcwd(), os.environ)
    return load_policy(host, mode=args.mode, allow_domains=args.allow_domain)


def _excluded_by(policy: Policy, argv: Sequence[str]) -> str | None:
    """The excludedCommands entry that matches argv (its words are a prefix of the command)."""
    words = [os.path.basename(argv[0]), *argv[1:]]
    for rule in policy.excluded_commands:
        entry = rule.value.split()
        if entry and words[: len(entry)] == entry:
            return f"{rule.value!r} ({rule.origin})"
    return None


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"corral: {message}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CorralError("no command given", hint="corral run -- COMMAND [ARG...]")
    policy = _load_policy(args)
    excluded = _excluded_by(policy, argv)
    if args.unsandboxed or excluded:
        if args.unsandboxed and not policy.allow_unsandboxed_commands:
            raise UnsandboxedRefused(
                "--unsandboxed is not allowed by the settings",
                hint='set "allowUnsandboxedCommands": true in a settings file to permit it',
            )
        _note(args, f"running {argv[0]} unsandboxed ({excluded or '--unsandboxed'})")
        os.execvp(argv[0], argv)  # noqa: S606 - the user asked for exactly this command

    from corral.run import run_in_terminal

    monitor = monitor_for_run(policy, args.monitor, note=lambda text: _note(args, text))
    return run_in_terminal(policy, argv, timeout=args.timeout, quiet=args.quiet, monitor=monitor)


def monitor_for_run(
    policy: Policy, asked: MonitorViolations | None, *, note: Callable[[str], None]
) -> MonitorViolations | None:
    """`--monitor` wins over the user's and the project's settings, as `--mode` does, but not
    over the managed file: an administrator who asks for the records gets them."""
    from corral.policy.settings import MANAGED_SETTINGS

    origin = policy.origin_of("monitor.violations")
    if asked is None or origin is None or origin.source != MANAGED_SETTINGS:
        return asked
    if asked != policy.monitor_violations:
        note(f"--monitor {asked} ignored: {origin} sets {policy.monitor_violations!r}")
    return None


def cmd_doctor(args: argparse.Namespace) -> int:
    from corral.doctor import default_mode_can_run, default_try_sandbox, format_checks, run_checks
    from corral.hostpaths import host_paths
    from corral.probe import probe

    host = host_paths(os.getcwd(), os.environ)
    facts = probe(cache_dir=host.machine_cache_dir, refresh=True)
    checks = run_checks(facts, try_sandbox=default_try_sandbox)
    print(format_checks(checks, color=sys.stdout.isatty()))
    _print_layers(_load_policy(args), facts)
    return 0 if default_mode_can_run(checks) else 1


def _print_layers(policy: Policy, facts: MachineFacts) -> None:
    from corral.layers import format_layers, layers_in_force

    print(f"\nlayers in force for the {policy.mode} mode here:")
    print(format_layers(layers_in_force(policy, facts)))


def cmd_policy(args: argparse.Namespace) -> int:
    if args.policy_command == "schema":
        from corral.policy.schema import schema_json

        print(schema_json())
        return 0
    policy = _load_policy(args)
    if args.policy_command == "show":
        from corral.layers import layers_in_force
        from corral.policy.report import format_policy, policy_as_json
        from corral.probe import probe

        facts = probe(cache_dir=policy.host.machine_cache_dir)
        layers = layers_in_force(policy, facts)
        if args.json:
            import json

            document = policy_as_json(policy)
            document["layers"] = [{"layer": name, "enforced_by": how} for name, how in layers]
            print(json.dumps(document, indent=2))
        else:
            print(format_policy(policy))
            _print_layers(policy, facts)
        return 0
    from corral.policy.report import check_policy

    findings = check_policy(policy, path_dirs=os.environ.get("PATH", "").split(os.pathsep))
    for finding in findings:
        print(f"{finding.level}: {finding.key}: {finding.message} ({finding.origin})")
    if not findings:
        print("settings are valid; no risky rules found")
    return 1 if any(f.level == "error" for f in findings) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from corral.demo import main as demo_main

    return demo_main()


def cmd_log(args: argparse.Namespace) -> int:
    from corral.cli_log import cmd_log as log

    return log(args)


def cmd_violations(args: argparse.Namespace) -> int:
    from corral.cli_log import cmd_violations as violations

    return violations(args)


HANDLERS = {
    "run": cmd_run,
    "doctor": cmd_doctor,
    "policy": cmd_policy,
    "demo": cmd_demo,
    "log": cmd_log,
    "violations": cmd_violations,
}


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    only = words[0] if words and words[0] in COMMANDS else None
    args = build_parser(only=only).parse_args(words)
    handler: Callable[[argparse.Namespace], int] = (
        getattr(args, "handler", None) or HANDLERS[args.command]
    )
    try:
        return handler(args)
    except CorralError as exc:
        print(f"corral: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"corral: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

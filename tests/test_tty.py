"""`corral run` on a terminal: an interactive program keeps its terminal, reads what is typed
there, and its exit status comes back. Each test talks through a fresh pseudo-terminal with one
overall deadline (helpers_cli.Terminal), so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import pytest

from tests.conftest import Layout
from tests.helpers_cli import Terminal, corral_run, run_cli

pytestmark = pytest.mark.usefixtures("sandbox_available")

PROMPT = "corral-prompt> "


def terminal(layout: Layout, *argv: str) -> Terminal:
    env = {**layout.env, "TERM": "dumb", "PS1": PROMPT}
    return Terminal(corral_run("--", *argv), cwd=layout.workspace, env=env)


def test_interactive_shell_is_usable(layout: Layout) -> None:
    with terminal(layout, "bash", "--norc", "-i") as tty:
        tty.expect(PROMPT.encode())
        tty.send(b"echo $((6*7))\n")
        tty.expect(b"\r\n42\r\n")  # the answer, not the echo of what was typed
        tty.expect(PROMPT.encode())
        tty.send(b"exit 7\n")
        assert tty.finish() == 7, tty.output


def test_program_reads_from_the_terminal(layout: Layout) -> None:
    with terminal(layout, "python3", "-c", 'print(input("name? ").upper())') as tty:
        tty.expect(b"name? ")
        tty.send(b"corral\n")
        tty.expect(b"CORRAL")
        assert tty.finish() == 0, tty.output


TTY_CHECK = "for fd in 0 1 2; do test -t $fd && echo tty-$fd || echo no-tty-$fd; done"


def test_program_has_its_terminal(layout: Layout) -> None:
    with terminal(layout, "bash", "-c", TTY_CHECK) as tty:
        assert tty.finish() == 0, tty.output
    assert tty.output.split() == [b"tty-0", b"tty-1", b"tty-2"]


def test_without_a_terminal_there_is_none(layout: Layout) -> None:
    # The control for the test above: the same check sees no terminal when there is none.
    done = run_cli(layout, "--", "bash", "-c", TTY_CHECK)
    assert done.stdout.split() == [b"no-tty-0", b"no-tty-1", b"no-tty-2"]


def test_ctrl_c_reaches_a_shells_foreground_job(layout: Layout) -> None:
    # An interactive shell puts its job in a process group of its own, so Ctrl-C stops the job
    # and the shell lives on. The job says "fg-2" once it runs, and by then it is the terminal's
    # foreground group (bash hands the terminal over before exec); the typed line says fg-$((1+1)).
    with terminal(layout, "bash", "--norc", "-i") as tty:
        tty.expect(PROMPT.encode())
        tty.send(b"sh -c 'echo fg-$((1+1)); exec sleep 1000'\n")
        tty.expect(b"fg-2")
        tty.send(b"\x03")
        tty.expect(PROMPT.encode())
        tty.send(b"exit 7\n")
        assert tty.finish() == 7, tty.output


# SIGINT is blocked before "ready" and taken with sigwait, so a Ctrl-C typed at any moment after
# "ready" is caught: no window between printing and waiting.
CATCH_CTRL_C = (
    "import signal\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
    "print('ready', flush=True)\n"
    "signal.sigwait({signal.SIGINT})\n"
    "print('caught')\n"
    "raise SystemExit(5)\n"
)


def test_ctrl_c_reaches_a_program_that_handles_it(layout: Layout) -> None:
    # Ctrl-C goes to the terminal's whole foreground group; only the program may see it, or
    # the sandbox dies with bwrap and the status is 130 instead of the program's own.
    with terminal(layout, "python3", "-c", CATCH_CTRL_C) as tty:
        tty.expect(b"ready\r\n")
        tty.send(b"\x03")
        tty.expect(b"caught\r\n")
        assert tty.finish() == 5, tty.output

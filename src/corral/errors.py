"""Every error corral raises on purpose, under one root.

    CorralError                    exit code 1 unless a subclass says otherwise
    ├── SettingsError              a settings file is broken (exit 2; names file, key path, reason)
    ├── UsageError                 the caller asked for something impossible (exit 2)
    ├── UnsandboxedRefused         --unsandboxed without allowUnsandboxedCommands (exit 2)
    └── SandboxUnavailable         this machine cannot enforce the policy (exit 3; doctor helps)
        └── LaunchError            the sandbox could not be started (exit 3)

Whose fault it is decides the exit code: 2 for the user's input, 3 for the machine.
None of these is the sandboxed command's own exit status; the CLI keeps them apart.
"""

from __future__ import annotations


class CorralError(Exception):
    """Root of corral's errors. `hint` is one line telling the user what to do next."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class SettingsError(CorralError):
    """A settings file cannot be used. Carries where: the file, the key path, line and column."""

    exit_code = 2

    def __init__(
        self,
        reason: str,
        *,
        file: str,
        key: str = "",
        line: int | None = None,
        column: int | None = None,
        hint: str = "",
    ) -> None:
        where = file
        if line is not None:
            where += f":{line}:{column or 1}"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {reason}", hint=hint)
        self.file = file
        self.key = key
        self.reason = reason
        self.line = line
        self.column = column


class UsageError(CorralError):
    """The request itself is wrong: a bad flag combination, a path outside the workspace."""

    exit_code = 2


class UnsandboxedRefused(UsageError):
    """Running outside the sandbox was asked for but the settings do not allow it."""


class SandboxUnavailable(CorralError):
    """The machine lacks what the policy needs (no bubblewrap, no user namespaces...)."""

    exit_code = 3


class LaunchError(SandboxUnavailable):
    """bubblewrap (or the chosen backend) failed before the command could start."""

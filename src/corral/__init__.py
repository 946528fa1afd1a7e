"""corral: run a command, and everything it starts, inside a sandbox the user drew once.

    from corral import Sandbox
    result = Sandbox.from_settings("path/to/project").run(["make", "test"], capture_output=True)

The public names below load on first use, so `import corral` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "CorralError",
    "LaunchError",
    "Policy",
    "RunResult",
    "Sandbox",
    "SandboxProcess",
    "SandboxUnavailable",
    "SettingsError",
    "UsageError",
    "host_paths",
    "load_policy",
    "preset_policy",
]

_WHERE = {
    "CorralError": "corral.errors",
    "LaunchError": "corral.errors",
    "SandboxUnavailable": "corral.errors",
    "SettingsError": "corral.errors",
    "UsageError": "corral.errors",
    "Policy": "corral.policy.model",
    "RunResult": "corral.sandbox",
    "Sandbox": "corral.sandbox",
    "SandboxProcess": "corral.process",
    "host_paths": "corral.hostpaths",
    "load_policy": "corral.policy.settings",
    "preset_policy": "corral.policy.presets",
}

if TYPE_CHECKING:
    from corral.errors import (
        CorralError,
        LaunchError,
        SandboxUnavailable,
        SettingsError,
        UsageError,
    )
    from corral.hostpaths import host_paths
    from corral.policy.model import Policy
    from corral.policy.presets import preset_policy
    from corral.policy.settings import load_policy
    from corral.process import SandboxProcess
    from corral.sandbox import RunResult, Sandbox


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

"""The host locations a policy is built against, read once from the environment at the edge."""

from __future__ import annotations

import os
from collections.abc import Mapping

from corral.policy.model import HostPaths


def host_paths(workspace: str, environ: Mapping[str, str]) -> HostPaths:
    """XDG base directories are respected; the workspace is taken with its symlinks resolved."""
    home = environ.get("HOME") or os.path.expanduser("~")
    home = os.path.normpath(home)

    def xdg(name: str, default: str) -> str:
        value = environ.get(name, "")
        return os.path.normpath(value) if value.startswith("/") else f"{home}/{default}"

    return HostPaths(
        workspace=os.path.realpath(workspace),
        home=home,
        config_home=xdg("XDG_CONFIG_HOME", ".config"),
        cache_home=xdg("XDG_CACHE_HOME", ".cache"),
        state_home=xdg("XDG_STATE_HOME", ".local/state"),
    )

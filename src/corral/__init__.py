"""corral: run a command, and everything it starts, inside a sandbox the user drew once."""

from __future__ import annotations

__version__ = "0.1.0"

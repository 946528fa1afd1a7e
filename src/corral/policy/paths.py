"""Pure path helpers: normalising what users write, and asking whether one path holds another.

No function here touches the disk; symlinks are resolved by the backends' fact gathering.
"""

from __future__ import annotations

import os.path

GLOB_CHARS = frozenset("*?[")


def normalize(path: str, *, home: str, base: str) -> str:
    """`~` and `~/x` expand to `home`; relative paths are taken from `base`; `..` collapses."""
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    elif not path.startswith("/"):
        path = os.path.join(base, path)
    return os.path.normpath(path)


def has_glob(path: str) -> bool:
    return any(ch in GLOB_CHARS for ch in path)


def is_within(path: str, root: str) -> bool:
    """True when `path` is `root` or lies under it (both normalised, absolute)."""
    if root == "/":
        return True
    return path == root or path.startswith(root + "/")

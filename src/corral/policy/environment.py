"""Which environment variables reach the sandbox: everything but secret-looking names.

Names are matched case-insensitively against shell-style patterns (`*TOKEN*`, `AWS_*`);
`env.allow` wins over `env.deny`, so a user can let one named variable through.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase

from corral.policy.model import EnvPolicy


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    upper = name.upper()
    return any(fnmatchcase(upper, pattern.upper()) for pattern in patterns)


def scrub_environment(
    environ: Mapping[str, str], policy: EnvPolicy
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Return (the variables that pass, the names removed)."""
    deny = tuple(rule.value for rule in policy.deny)
    allow = tuple(rule.value for rule in policy.allow)
    kept: dict[str, str] = {}
    removed: list[str] = []
    for name, value in environ.items():
        if _matches(name, deny) and not _matches(name, allow):
            removed.append(name)
        else:
            kept[name] = value
    return kept, tuple(removed)

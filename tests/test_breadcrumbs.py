"""Breadcrumbs: error lines mapped to the rule that denied the path, with a way to allow it."""

from __future__ import annotations

import pytest

from corral.backends.fsplan import Denied, FilesystemPlan
from corral.breadcrumbs import breadcrumbs_for_line
from corral.policy.model import HostPaths, Origin, Rule
from corral.policy.presets import preset_policy

HOST = HostPaths("/w", "/h", "/h/.config", "/h/.cache", "/h/.local/state")
POLICY = preset_policy("standard", HOST)
USER_RULE = Rule("/w/secret", Origin("/h/.config/corral/settings.json", "filesystem.denyRead[0]"))
PLAN = FilesystemPlan(
    mounts=(),
    placeholders=(),
    readable=("/",),
    writable=("/tmp", "/w"),
    denied=(
        Denied("/h/.ssh", "read", Rule("/h/.ssh", Origin("built-in", "credential stores"))),
        Denied("/w/secret", "read", USER_RULE),
    ),
    notes=(),
)


@pytest.mark.parametrize(
    ("line", "path", "fix_has"),
    [
        ("cat: /h/.ssh/id_rsa: No such file or directory", "/h/.ssh/id_rsa", "built-in"),
        ("cat: secret/x: No such file or directory", "/w/secret/x", "remove '/w/secret'"),
        ("sh: 1: cannot create .envrc: Permission denied", "/w/.envrc", "built-in"),
        ("touch: cannot touch '/etc/foo': Read-only file system", "/etc/foo", "allowWrite"),
        ("OSError: [Errno 30] Read-only file system: '/opt/x'", "/opt/x", '"/opt"'),
    ],
)
def test_denials_are_explained(line: str, path: str, fix_has: str) -> None:
    crumbs = breadcrumbs_for_line(line, cwd="/w", plan=PLAN, policy=POLICY)
    assert [c.path for c in crumbs] == [path]
    assert fix_has in crumbs[0].fix


@pytest.mark.parametrize(
    "line",
    [
        "everything is fine",
        "cat: /w/missing.txt: No such file or directory",  # not denied: a plain missing file
        "wrote /w/out.txt",
    ],
)
def test_ordinary_lines_leave_no_breadcrumb(line: str) -> None:
    assert breadcrumbs_for_line(line, cwd="/w", plan=PLAN, policy=POLICY) == []

"""The mount plan from hand-written disk facts: order, symlinks, missing paths, deny over allow."""

from __future__ import annotations

from corral.backends.facts import DiskFacts, GitLayout, PathFact
from corral.backends.fsplan import Mount, explain, plan_filesystem
from corral.policy.model import HostPaths, Origin, Rule
from corral.policy.presets import preset_policy

HOST = HostPaths(
    workspace="/home/u/proj",
    home="/home/u",
    config_home="/home/u/.config",
    cache_home="/home/u/.cache",
    state_home="/home/u/.local/state",
)


def facts(
    existing: dict[str, str], *, links: dict[str, str] | None = None, git: GitLayout | None = None
) -> DiskFacts:
    """`existing` maps path -> "dir"/"file"; `links` maps a link path -> its real target."""
    links = links or {}

    def fact(path: str) -> PathFact:
        real = links.get(path, path)
        kind = existing.get(real, "missing")
        parent = real.rsplit("/", 1)[0] or "/"
        return PathFact(kind, real, path in links, parent in existing or parent == "/")  # type: ignore[arg-type]

    class AllPaths(dict[str, PathFact]):
        def get(self, key: str, default: PathFact | None = None) -> PathFact:  # type: ignore[override]
            return fact(key)

    return DiskFacts(paths=AllPaths(), globs={}, git=git)


BASE = {
    "/": "dir",
    "/home": "dir",
    "/home/u": "dir",
    "/home/u/proj": "dir",
    "/home/u/.cache/corral/workspaces/x": "dir",
}


def test_standard_order_is_root_dev_proc_tmp_then_binds_then_protect_then_hide() -> None:
    policy = preset_policy("standard", HOST)
    plan = plan_filesystem(
        policy, facts({**BASE, "/home/u/.ssh": "dir", "/home/u/.bashrc": "file"})
    )
    kinds = [m.kind for m in plan.mounts]
    assert kinds[:4] == ["ro-bind", "dev", "proc", "tmpfs"]
    assert plan.mounts[0] == Mount("ro-bind", "/", "/")
    assert Mount("bind", "/home/u/proj", "/home/u/proj") in plan.mounts
    first_hide = kinds.index("hide-dir")
    last_bind = max(i for i, k in enumerate(kinds) if k == "bind")
    assert last_bind < first_hide
    assert Mount("hide-dir", "/home/u/.ssh") in plan.mounts
    # ~/.bashrc is outside every writable path in standard mode: already read-only, no mount.
    assert all(m.dest != "/home/u/.bashrc" for m in plan.mounts)


def test_missing_protected_file_in_workspace_gets_a_placeholder() -> None:
    plan = plan_filesystem(preset_policy("standard", HOST), facts(BASE))
    assert "/home/u/proj/.envrc" in plan.placeholders
    assert Mount("placeholder", "/home/u/proj/.envrc") in plan.mounts
    # Missing and not creatable inside (home is read-only in standard): nothing to do.
    assert "/home/u/.bashrc" not in plan.placeholders


def test_permissive_home_protects_existing_and_missing_startup_files() -> None:
    existing = {**BASE, "/home/u/.bashrc": "file", "/home/u/.ssh": "dir"}
    plan = plan_filesystem(preset_policy("permissive", HOST), facts(existing))
    assert Mount("ro-bind", "/home/u/.bashrc", "/home/u/.bashrc") in plan.mounts
    assert "/home/u/.zshrc" in plan.placeholders  # would run at the user's next zsh start
    assert "/home/u/.aws" in plan.placeholders  # ~/.aws/credentials must not be plantable
    assert Mount("hide-dir", "/home/u/.ssh") in plan.mounts


def test_symlinked_secret_is_hidden_at_its_real_location() -> None:
    existing = {**BASE, "/data": "dir", "/data/keys": "dir"}
    plan = plan_filesystem(
        preset_policy("standard", HOST), facts(existing, links={"/home/u/.ssh": "/data/keys"})
    )
    assert Mount("hide-dir", "/data/keys") in plan.mounts


def test_writable_path_inside_a_denied_one_loses() -> None:
    policy = preset_policy("standard", HOST)
    fs = policy.filesystem
    extra = Rule("/home/u/.ssh/sub", Origin("test"))
    policy = policy._replace(filesystem=fs._replace(write=(*fs.write, extra)))
    existing = {**BASE, "/home/u/.ssh": "dir", "/home/u/.ssh/sub": "dir"}
    plan = plan_filesystem(policy, facts(existing))
    assert all(m.dest != "/home/u/.ssh/sub" for m in plan.mounts)
    assert any("deny wins" in note for note in plan.notes)


def test_worktree_hooks_are_protected_in_the_common_git_dir() -> None:
    git = GitLayout(git_dir="/repo/.git/worktrees/proj", common_dir="/repo/.git")
    existing = {
        **BASE,
        "/repo": "dir",
        "/repo/.git": "dir",
        "/repo/.git/hooks": "dir",
        "/repo/.git/config": "file",
        "/repo/.git/worktrees": "dir",
        "/repo/.git/worktrees/proj": "dir",
    }
    plan = plan_filesystem(preset_policy("standard", HOST), facts(existing, git=git))
    # git in the worktree must write its index and objects, so the git dirs are writable ...
    assert Mount("bind", "/repo/.git", "/repo/.git") in plan.mounts
    assert (
        Mount("bind", "/repo/.git/worktrees/proj", "/repo/.git/worktrees/proj") not in plan.mounts
    )
    # ... but the hooks and config are not.
    assert Mount("ro-bind", "/repo/.git/hooks", "/repo/.git/hooks") in plan.mounts
    assert Mount("ro-bind", "/repo/.git/config", "/repo/.git/config") in plan.mounts


def test_strict_reads_system_dirs_and_workspace_only() -> None:
    existing = {**BASE, "/usr": "dir", "/etc": "dir", "/usr/bin": "dir"}
    plan = plan_filesystem(
        preset_policy("strict", HOST), facts(existing, links={"/bin": "/usr/bin"})
    )
    assert Mount("ro-bind", "/", "/") not in plan.mounts
    assert Mount("ro-bind", "/usr", "/usr") in plan.mounts
    assert Mount("symlink", "/bin", "/usr/bin") in plan.mounts
    assert Mount("tmpfs", "/tmp") not in plan.mounts
    assert plan.writable == ("/home/u/proj",)


def test_explain_names_the_deepest_rule() -> None:
    plan = plan_filesystem(preset_policy("standard", HOST), facts({**BASE, "/home/u/.ssh": "dir"}))
    denied = explain("/home/u/.ssh/id_rsa", plan)
    assert denied is not None
    assert denied.access == "read"
    assert denied.rule.value == "/home/u/.ssh"
    assert explain("/home/u/proj/main.py", plan) is None

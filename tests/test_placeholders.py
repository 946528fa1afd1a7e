"""Placeholder files: journalled before they are made, removed after the run, never a file of
the user's."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from corral.backends.placeholders import (
    create_placeholders,
    ensure_private_dir,
    remove_placeholders,
    sweep_stale,
)


def test_only_missing_paths_are_made_and_journalled(tmp_path: Path) -> None:
    (tmp_path / "exists").write_text("user data")
    wanted = [str(tmp_path / "a"), str(tmp_path / "exists"), str(tmp_path / "b")]
    journal = create_placeholders(wanted, journal_dir=str(tmp_path / "journals"))
    assert journal is not None
    assert Path(journal).read_text(encoding="utf-8") == f"{tmp_path}/a\n{tmp_path}/b\n"
    for name in ("a", "b"):
        st = os.lstat(tmp_path / name)
        assert (stat.S_ISREG(st.st_mode), st.st_size) == (True, 0)
    assert (tmp_path / "exists").read_text() == "user data"


def test_nothing_missing_means_no_journal(tmp_path: Path) -> None:
    (tmp_path / "exists").write_text("")
    assert create_placeholders([str(tmp_path / "exists")], journal_dir=str(tmp_path / "j")) is None
    assert not (tmp_path / "j").exists()


def test_removal_spares_a_placeholder_written_to_meanwhile(tmp_path: Path) -> None:
    wanted = [str(tmp_path / "empty"), str(tmp_path / "written")]
    journal = create_placeholders(wanted, journal_dir=str(tmp_path / "journals"))
    assert journal is not None
    os.chmod(tmp_path / "written", 0o644)
    (tmp_path / "written").write_text("kept")
    remove_placeholders(journal)
    assert not (tmp_path / "empty").exists()
    assert (tmp_path / "written").read_text() == "kept"
    assert not os.path.exists(journal)


def test_a_dead_process_journal_is_swept(tmp_path: Path) -> None:
    journals = tmp_path / "journals"
    journals.mkdir()
    (tmp_path / "left").write_text("")
    dead_pid = 2**22 + 1  # above pid_max's largest value: never a live process
    (journals / f"{dead_pid}-00000000.txt").write_text(f"{tmp_path}/left\n")
    sweep_stale(str(journals))
    assert not (tmp_path / "left").exists()
    assert os.listdir(journals) == []


def test_private_dir_is_made_once_and_left_alone_after(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    ensure_private_dir(str(target))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700 & ~_umask()
    os.chmod(target, 0o750)
    ensure_private_dir(str(target))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o750


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

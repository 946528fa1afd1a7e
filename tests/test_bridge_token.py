"""The bridge token file: created once, private, atomic, rotated, refused when unsafe."""

from __future__ import annotations

import argparse
import os
import stat
import threading

import pytest

from corral.bridge import token as tokens
from corral.bridge.ratelimit import RateLimiter, retry_after_header
from corral.errors import CorralError


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_first_use_creates_a_private_file_in_a_private_dir(tmp_path: object) -> None:
    state = f"{tmp_path}/state/corral"
    old_umask = os.umask(0)  # the most permissive umask must not leak into the modes
    try:
        token = tokens.load_or_create(state)
    finally:
        os.umask(old_umask)
    path = tokens.token_path(state)
    assert _mode(os.path.dirname(path)) == 0o700
    assert _mode(path) == 0o600
    with open(path) as f:
        assert f.read() == token + "\n"
    assert len(token) >= 43  # 32 random bytes, URL-safe base64
    assert os.listdir(os.path.dirname(path)) == ["token"]  # no temporary left behind


def test_load_returns_the_same_token_and_rotate_replaces_it(tmp_path: object) -> None:
    state = str(tmp_path)
    first = tokens.load_or_create(state)
    assert tokens.load_or_create(state) == first
    second = tokens.rotate(state)
    assert second != first
    assert tokens.load_or_create(state) == second
    assert _mode(tokens.token_path(state)) == 0o600
    assert os.listdir(tokens.token_dir(state)) == ["token"]


def test_concurrent_first_use_agrees_on_one_token(tmp_path: object) -> None:
    state = str(tmp_path)
    found: list[str] = []
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        found.append(tokens.load_or_create(state))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 8 and len(set(found)) == 1
    assert os.listdir(tokens.token_dir(state)) == ["token"]


def test_a_loose_directory_of_ours_is_tightened(tmp_path: object) -> None:
    state = str(tmp_path)
    os.makedirs(tokens.token_dir(state), mode=0o755)
    os.chmod(tokens.token_dir(state), 0o755)
    tokens.load_or_create(state)
    assert _mode(tokens.token_dir(state)) == 0o700


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: os.chmod(p, 0o644), "readable by others"),
        (lambda p: os.chmod(p, 0o640), "readable by others"),
        (lambda p: _overwrite(p, "short\n"), "damaged"),
        (lambda p: _overwrite(p, "x" * 40 + " y\n"), "damaged"),
        (lambda p: _replace_with_symlink(p), "cannot open"),
    ],
)
def test_unsafe_or_damaged_token_files_are_refused(
    tmp_path: object, damage: object, message: str
) -> None:
    state = str(tmp_path)
    tokens.load_or_create(state)
    path = tokens.token_path(state)
    damage(path)  # type: ignore[operator]
    with pytest.raises(CorralError, match=message) as caught:
        tokens.load_or_create(state)
    assert "corral token --rotate" in caught.value.hint
    tokens.rotate(state)  # the hint works: rotation writes a fresh private file
    assert _mode(path) == 0o600 and not os.path.islink(path)


def test_a_symlinked_token_dir_is_refused(tmp_path: object) -> None:
    state = f"{tmp_path}/state"
    os.makedirs(f"{tmp_path}/elsewhere")
    os.makedirs(state)
    os.symlink(f"{tmp_path}/elsewhere", tokens.token_dir(state))
    with pytest.raises(CorralError, match="not a directory"):
        tokens.load_or_create(state)
    assert os.listdir(f"{tmp_path}/elsewhere") == []  # nothing was written through the link


def _overwrite(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _replace_with_symlink(path: str) -> None:
    target = path + ".real"
    os.rename(path, target)
    os.symlink(target, path)


def test_token_matches_is_exact() -> None:
    assert tokens.token_matches(b"abc", "abc")
    for other in (b"abd", b"ab", b"abcd", b"", "ábc".encode()):
        assert not tokens.token_matches(other, "abc")


def test_token_file_follows_rotation_and_fails_closed(tmp_path: object) -> None:
    state = str(tmp_path)
    first = tokens.load_or_create(state)
    source = tokens.TokenFile(state)
    assert source.current() == first
    second = tokens.rotate(state)
    assert source.current() == second
    os.chmod(tokens.token_path(state), 0o644)
    assert source.current() is None and "readable by others" in source.problem
    os.unlink(tokens.token_path(state))
    assert source.current() is None
    third = tokens.load_or_create(state)
    assert source.current() == third


def _run_token_command(argv: list[str], state_home: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("XDG_STATE_HOME", state_home)
    parser = argparse.ArgumentParser()
    tokens.add_token_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result


def test_corral_token_prints_and_rotates(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state_home = str(tmp_path)
    assert _run_token_command(["token"], state_home, monkeypatch) == 0
    first = capsys.readouterr().out.strip()
    assert first == tokens.load_or_create(f"{state_home}/corral")
    assert _run_token_command(["token"], state_home, monkeypatch) == 0
    assert capsys.readouterr().out.strip() == first
    assert _run_token_command(["token", "--rotate"], state_home, monkeypatch) == 0
    out = capsys.readouterr()
    assert out.out.strip() != first
    assert out.out.strip() == tokens.load_or_create(f"{state_home}/corral")
    assert "no longer works" in out.err


# -- the rate limiter ---------------------------------------------------------------------------


def test_bucket_allows_the_burst_then_refuses_until_refilled() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("a", now=10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", now=10.0) == pytest.approx(0.5)
    assert limiter.take("b", now=10.0) == 0.0  # another key has its own bucket
    assert limiter.take("a", now=10.5) == 0.0  # one token back after 1/rate seconds
    assert limiter.take("a", now=10.5) > 0
    assert limiter.take("a", now=5.0) > 0  # a clock going backwards refills nothing
    assert [limiter.take("a", now=100.0) for _ in range(4)][-1] > 0  # refill caps at burst


@pytest.mark.parametrize(("seconds", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (7.9, "8")])
def test_retry_after_rounds_up_to_whole_seconds(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header

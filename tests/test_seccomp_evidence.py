"""The seccomp rules seen from the host: what a refused call would have done does not happen.

Each test makes something the sandboxed child would reach (a listener, a key in the user's
keyring, a terminal), runs the attempt with the filter, checks the host saw nothing, then runs
it without the filter and checks the host saw it: the evidence is real and the test can fail.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import termios
import tty
import uuid
from collections.abc import Callable, Iterator
from functools import partial

import pytest

from corral.backends.seccomp import build_filter
from tests.conftest import accepted
from tests.helpers_seccomp import (
    ARCH,
    HIGH,
    LOCAL,
    NONE,
    NR,
    OPEN,
    Outcome,
    in_child,
    libc,
    syscall,
)


def connect_to(family: socket.AddressFamily, address: str | tuple[str, int]) -> Callable[[], int]:
    def attempt() -> int:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.connect(address)
        except OSError as failure:
            return failure.errno or -1
        return 0

    return attempt


@pytest.fixture
def unix_listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[socket.socket]:
    path = str(tmp_path_factory.mktemp("seccomp") / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)
        yield listener


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        yield listener


def test_unix_socket_refused_and_the_host_listener_sees_nothing(
    unix_listener: socket.socket,
) -> None:
    attempt = connect_to(socket.AF_UNIX, unix_listener.getsockname())
    program = build_filter(OPEN._replace(allow_unix_sockets=False), arch=ARCH)
    assert in_child(attempt, program=program) == Outcome(errno.EPERM)
    assert not accepted(unix_listener)
    assert in_child(attempt, program=None) == Outcome(0)
    assert accepted(unix_listener)


def test_unix_socket_allowed_when_asked(unix_listener: socket.socket) -> None:
    attempt = connect_to(socket.AF_UNIX, unix_listener.getsockname())
    assert in_child(attempt, program=build_filter(OPEN, arch=ARCH)) == Outcome(0)
    assert accepted(unix_listener)


def test_network_none_refuses_inet_and_the_host_listener_sees_nothing(
    tcp_listener: socket.socket,
) -> None:
    attempt = connect_to(socket.AF_INET, tcp_listener.getsockname())
    assert in_child(attempt, program=build_filter(NONE, arch=ARCH)) == Outcome(errno.EACCES)
    assert not accepted(tcp_listener)
    assert in_child(attempt, program=build_filter(LOCAL, arch=ARCH)) == Outcome(0)
    assert accepted(tcp_listener)


@pytest.fixture
def terminal() -> Iterator[int]:
    """A pty's slave end in raw mode, so one injected byte is readable at once."""
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    yield slave
    os.close(master)
    os.close(slave)


def push_into(slave: int, request: int) -> Callable[[], int]:
    """Make `slave` our controlling terminal (so TIOCSTI is legal unfiltered), push one byte."""

    def attempt() -> int:
        os.setsid()
        ioctl = NR["ioctl"]
        return syscall(ioctl, slave, termios.TIOCSCTTY, 0) or syscall(ioctl, slave, request, b"!")

    return attempt


def pending_input(slave: int) -> bytes:
    os.set_blocking(slave, False)
    try:
        return os.read(slave, 16)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize("request_", [0x5412, HIGH | 0x5412], ids=["TIOCSTI", "high-bits"])
def test_tiocsti_refused_and_nothing_reaches_the_terminal(terminal: int, request_: int) -> None:
    attempt = push_into(terminal, request_)
    assert in_child(attempt, program=build_filter(OPEN, arch=ARCH)) == Outcome(errno.EPERM)
    assert pending_input(terminal) == b""
    unfiltered = in_child(attempt, program=None)
    if unfiltered.error == errno.EIO:
        pytest.skip("this kernel refuses TIOCSTI itself (dev.tty.legacy_tiocsti = 0)")
    assert unfiltered == Outcome(0)
    assert pending_input(terminal) == b"!"


KEY_SPEC_USER_KEYRING = -4
KEYCTL_UPDATE = 2
KEYCTL_READ = 11
KEYCTL_INVALIDATE = 21


@pytest.fixture
def user_key() -> Iterator[int]:
    """A key in the test user's keyring, shared with every process of the user."""
    description = f"corral-test-{uuid.uuid4().hex}".encode()
    key = libc.syscall(
        ctypes.c_long(NR["add_key"]),
        b"user",
        description,
        b"before",
        ctypes.c_long(6),
        ctypes.c_long(KEY_SPEC_USER_KEYRING),
    )
    assert key > 0, os.strerror(ctypes.get_errno())
    yield key
    syscall(NR["keyctl"], KEYCTL_INVALIDATE, key)


def key_payload(key: int) -> bytes:
    buffer = ctypes.create_string_buffer(64)
    size = libc.syscall(
        ctypes.c_long(NR["keyctl"]), ctypes.c_long(KEYCTL_READ), ctypes.c_long(key), buffer, 64
    )
    return buffer.raw[:size]


def test_keyctl_refused_and_the_host_key_is_unchanged(user_key: int) -> None:
    attempt = partial(syscall, NR["keyctl"], KEYCTL_UPDATE, user_key, b"after", 5)
    assert in_child(attempt, program=build_filter(OPEN, arch=ARCH)) == Outcome(errno.EPERM)
    assert key_payload(user_key) == b"before"
    assert in_child(attempt, program=None) == Outcome(0)
    assert key_payload(user_key) == b"after"


def keys_described(description: bytes) -> list[int]:
    with open("/proc/keys", "rb") as keys:
        return [int(line.split()[0], 16) for line in keys if description in line]


def test_add_key_refused_and_the_host_keyring_gains_nothing() -> None:
    description = f"corral-test-{uuid.uuid4().hex}".encode()
    attempt = partial(syscall, NR["add_key"], b"user", description, b"x", 1, KEY_SPEC_USER_KEYRING)
    assert in_child(attempt, program=build_filter(OPEN, arch=ARCH)) == Outcome(errno.EPERM)
    assert keys_described(description) == []
    assert in_child(attempt, program=None) == Outcome(0)
    planted = keys_described(description)
    for key in planted:
        syscall(NR["keyctl"], KEYCTL_INVALIDATE, key)
    assert len(planted) == 1

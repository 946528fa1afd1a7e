"""Package and source tools inside a filtered sandbox, each configured only by the variables
corral sets: `pip download` from a package index and `git clone` from `git http-backend`, both
served on the host's loopback under test names ("pypi.test", "git.test")."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from tests.conftest import Layout
from tests.test_network_support import (
    WHEEL_NAME,
    Servers,
    World,
    bare_repository,
    filtered_world,
    git_http_backend,
    loopback_servers,
    package_index,
)

pytestmark = pytest.mark.usefixtures("sandbox_available")


@pytest.fixture
def world(layout: Layout) -> Iterator[World]:
    with loopback_servers() as servers, filtered_world(layout, Servers(*servers)) as made:
        yield made


def test_pip_downloads_from_an_allowed_index(world: World) -> None:
    index = package_index(f"{world.layout.outside}/index")
    try:
        code, out, err, sandbox_id = world.run(
            "python3 -m pip download --isolated --disable-pip-version-check --no-deps"
            f" --index-url http://pypi.test:{index.port}/simple/ --trusted-host pypi.test"
            " -d downloads tinypkg",
            timeout=120,
        )
    finally:
        index.close()
    assert code == 0, out + err
    with open(f"{world.layout.outside}/index/packages/{WHEEL_NAME}", "rb") as served:
        expected = hashlib.sha256(served.read()).digest()
    with open(f"{world.layout.workspace}/downloads/{WHEEL_NAME}", "rb") as got:
        assert hashlib.sha256(got.read()).digest() == expected
    # Host side: the index served both the page and the file, and nothing else was reached.
    assert f"GET /packages/{WHEEL_NAME} 200" in index.requests
    assert any(r.startswith("GET /simple/tinypkg/ 200") for r in index.requests)
    assert {(e["host"], e["decision"], e["sandbox_id"]) for e in world.events()} == {
        ("pypi.test", "allow", sandbox_id)
    }


def test_git_clones_from_an_allowed_server(world: World) -> None:
    root = f"{world.layout.outside}/git"
    os.makedirs(root)
    bare_repository(root, world.layout.env)
    server = git_http_backend(root)
    try:
        code, out, err, sandbox_id = world.run(
            f"git clone -q http://git.test:{server.port}/repo.git cloned && cat cloned/README",
            timeout=120,
        )
    finally:
        server.close()
    assert code == 0, out + err
    assert out == "hello from git.test\n"
    assert any("git-upload-pack" in r and r.endswith(" 200") for r in server.requests)
    events = world.events()
    assert events and all(
        (e["host"], e["decision"], e["sandbox_id"]) == ("git.test", "allow", sandbox_id)
        for e in events
    )


def test_git_clone_of_a_host_not_allowed_is_refused(world: World) -> None:
    before = world.servers.denied.connections
    code, _, err, _ = world.run(f"git clone -q http://other.test:{world.servers.denied.port}/r.git")
    assert code != 0
    assert "403" in err, err
    assert world.servers.denied.connections == before
    assert [e["decision"] for e in world.events("other.test")] == ["deny"]

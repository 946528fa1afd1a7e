"""Which upstream proxy corral chains to."""

from __future__ import annotations

import pytest

from corral.policy.model import HostPaths
from corral.policy.presets import preset_policy
from corral.proxy.service import upstream_proxy_for

HOST = HostPaths("/w", "/h", "/h/.config", "/h/.cache", "/h/.local/state")
POLICY = preset_policy("permissive", HOST)


@pytest.mark.parametrize(
    ("configured", "environ", "expected"),
    [
        (None, {}, None),
        (None, {"HTTPS_PROXY": "http://corp.example:3128"}, "http://corp.example:3128"),
        (None, {"https_proxy": "http://lower.example:8080"}, "http://lower.example:8080"),
        (None, {"HTTPS_PROXY": "socks5://x.example:1080"}, None),  # cannot chain: ignored
        ("http://set.example:1", {"HTTPS_PROXY": "http://env.example:2"}, "http://set.example:1"),
    ],
)
def test_upstream_proxy_choice(
    configured: str | None, environ: dict[str, str], expected: str | None
) -> None:
    policy = POLICY._replace(network=POLICY.network._replace(upstream_proxy=configured))
    assert upstream_proxy_for(policy, environ) == expected

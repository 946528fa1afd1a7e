"""The layers report: what is in force, said plainly, including what is not."""

from __future__ import annotations

from corral.layers import layers_in_force
from corral.policy.model import HostPaths
from corral.policy.presets import preset_policy
from corral.probe import MachineFacts
from tests.machines import HEALTHY

HOST = HostPaths("/w", "/h", "/h/.config", "/h/.cache", "/h/.local/state")
FACTS = HEALTHY


def rows(facts: MachineFacts = FACTS) -> dict[str, str]:
    return dict(layers_in_force(preset_policy("standard", HOST), facts))


def test_a_capable_machine_has_every_layer() -> None:
    got = rows()
    assert got["namespaces"].startswith("bubblewrap")
    assert "ABI 4" in got["landlock"]
    assert got["seccomp"].startswith("BPF")


def test_missing_layers_are_said_not_hidden() -> None:
    got = rows(FACTS._replace(max_user_namespaces=0, landlock_abi=0))
    assert got["namespaces"].startswith("NOT AVAILABLE")
    assert "not available" in got["landlock"]

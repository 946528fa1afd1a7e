"""Which layers are in force for a policy on this machine: for `corral doctor` and
`corral policy show`. A pure function of the policy and the machine facts."""

from __future__ import annotations

from corral.backends.cgroup import usable_cgroup_parent
from corral.backends.fsplan import FilesystemPlan
from corral.backends.landlock import enforcement, rules_for_plan
from corral.backends.limits import limits_in_force
from corral.policy.model import Policy
from corral.probe import MachineFacts, can_use_namespaces

EMPTY_PLAN = FilesystemPlan((), (), ("/",), (), (), ())


def layers_in_force(policy: Policy, facts: MachineFacts) -> list[tuple[str, str]]:
    """(layer, what enforces it here) rows, in the order they are applied."""
    rows: list[tuple[str, str]] = []
    namespaces = can_use_namespaces(facts)
    fallback = policy.backend == "auto" and not namespaces and facts.landlock_abi > 0
    if policy.backend == "landlock" or fallback:
        rows.append(("namespaces", "none: the Landlock-only backend (docs/security-model.md)"))
    elif namespaces:
        rows.append(("namespaces", "bubblewrap: user, mount, pid, ipc, uts, cgroup, network"))
    else:
        rows.append(("namespaces", "NOT AVAILABLE: user namespaces are off (corral refuses)"))
    seccomp = "BPF deny list, applied just before exec" if facts.seccomp else "NOT AVAILABLE"
    rows.append(("seccomp", f"{seccomp}; network {policy.network.access}"))
    if facts.landlock_abi:
        rules = rules_for_plan(EMPTY_PLAN, abi=facts.landlock_abi, network=policy.network.access)
        rows.append(("landlock", f"ABI {facts.landlock_abi}, enforcement {enforcement(rules)}"))
    else:
        rows.append(("landlock", "not available on this kernel (mounts and seccomp remain)"))
    parent = usable_cgroup_parent(facts, policy.limits)
    in_force = limits_in_force(policy.limits, facts, cgroup_parent=parent)
    rows += [(f"limits.{key}", how) for key, how in in_force]
    return rows


def format_layers(rows: list[tuple[str, str]]) -> str:
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"  {name:<{width}}  {how}" for name, how in rows)

"""A Sandbox remembers which variable names its policy removes; the command's environment must
be exactly what scrubbing it afresh would give, launch after launch, as the environment
changes: new names, new values, names gone, the order kept."""

from __future__ import annotations

from corral.launch import ScrubbedNames, sandbox_environment
from corral.policy.model import EnvPolicy, Origin, Policy, Rule
from corral.policy.presets import preset_policy
from tests.conftest import Layout

ORIGIN = Origin("built-in", "test")

# One environment per launch, in order.
ENVIRONMENTS = [
    {"PATH": "/usr/bin", "GITHUB_TOKEN": "secret-1", "HOME": "/home/u", "LANG": "C"},
    {"HOME": "/home/u", "GITHUB_TOKEN": "secret-2", "PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "k"},
    {"MY_API_TOKEN": "secret-3", "EDITOR": "vi", "ALLOWED_TOKEN": "shown"},
    {},
    {"aws_session_token": "lower-case-secret", "PATH": "/usr/local/bin", "TMPDIR": "/x"},
]


def with_env_rules(policy: Policy) -> Policy:
    deny = (*policy.env.deny, Rule("*TOKEN*", ORIGIN))
    return policy._replace(env=EnvPolicy(deny=deny, allow=(Rule("ALLOWED_TOKEN", ORIGIN),)))


def test_remembered_names_give_what_scrubbing_afresh_gives(layout: Layout) -> None:
    policy = with_env_rules(preset_policy("standard", layout.host()))
    names = ScrubbedNames(policy.env)
    for environ in ENVIRONMENTS:
        remembered = sandbox_environment(policy, environ, names=names)
        afresh = sandbox_environment(policy, environ)
        assert list(remembered.items()) == list(afresh.items())


def test_no_secret_value_passes_on_any_launch(layout: Layout) -> None:
    policy = with_env_rules(preset_policy("standard", layout.host()))
    names = ScrubbedNames(policy.env)
    for environ in ENVIRONMENTS:
        values = sandbox_environment(policy, environ, names=names).values()
        assert not any("secret" in value for value in values)
    assert "ALLOWED_TOKEN" in sandbox_environment(policy, ENVIRONMENTS[2], names=names)


def test_names_learnt_under_other_rules_are_not_used(layout: Layout) -> None:
    lax = preset_policy("standard", layout.host())._replace(env=EnvPolicy(deny=()))
    stricter = with_env_rules(lax)
    names = ScrubbedNames(lax.env)
    assert "MY_API_TOKEN" in sandbox_environment(lax, ENVIRONMENTS[2], names=names)
    assert "MY_API_TOKEN" not in sandbox_environment(stricter, ENVIRONMENTS[2], names=names)

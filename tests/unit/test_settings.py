"""`finetune-operator run`'s configuration: every setting has a flag and an FTO_* twin, both
derived from one RunConfig field, and either way of saying a value gives the same RunConfig."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.settings import RunConfig, options, parse_args, run_parser

# The pod's identity and namespace, so that parsing depends on nothing outside the test.
POD = {"POD_NAME": "op-0", "POD_NAMESPACE": "system"}


def test_every_field_has_a_flag_and_an_env_twin() -> None:
    flags = {a.dest: a.option_strings for a in run_parser()._actions if a.dest != "help"}
    envs = [option.env for _, option, _ in options()]
    for name, option, _ in options():
        assert option.flag in flags[name], name
        assert option.env.startswith("FTO_"), name
    assert len(set(envs)) == len(envs)
    assert set(flags) == {name for name, _, _ in options()}


def test_defaults_are_the_fields_defaults() -> None:
    config = parse_args([], POD)
    assert config == RunConfig(lease_namespace="system", identity="op-0")
    assert config.clusterwide and config.settings.namespaces == ()


def other_value(default: Any, choices: tuple[str, ...] | None) -> Any:
    """A value unlike the default, of its type."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, tuple):
        return ("a", "b")
    if isinstance(default, (int, float)):
        return default + 3
    return choices[-1] if choices else "VALUE-X"


def as_flag(flag: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, tuple):
        return [flag, ",".join(value)]
    return [flag, str(value)]


def as_env(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(value) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("name", [name for name, _, _ in options()])
def test_flag_and_env_give_the_same_config(name: str) -> None:
    option, default = next((o, d) for n, o, d in options() if n == name)
    value = other_value(default, option.choices)
    by_flag = parse_args(as_flag(option.flag, value), POD)
    by_env = parse_args([], {**POD, option.env: as_env(value)})
    assert by_flag == by_env
    assert by_flag != parse_args([], POD)


def test_a_flag_wins_over_its_env_twin_and_empty_env_is_unset() -> None:
    env = {**POD, "FTO_WORKER_LIMIT": "3", "FTO_NAMESPACES": ""}
    assert parse_args(["--worker-limit", "5"], env).worker_limit == 5
    assert parse_args([], env).worker_limit == 3
    assert parse_args([], env).clusterwide

"""``allow_open_relay`` on the relay table is validated: a boolean, and only with relay
control disabled (an enabled relay table with it would silently mean nothing)."""

from __future__ import annotations

import pytest

from smtpgate.config import config_from_mapping
from smtpgate.errors import ConfigError
from smtpgate.hooks import HookRunner
from smtpgate.plugins import load_plugins


def problems(tables: list[dict[str, object]]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_plugins(config_from_mapping({"plugin": tables}), HookRunner())
    return exc.value.problems


def test_non_boolean_is_refused() -> None:
    assert problems([{"use": "relay", "enabled": False, "allow_open_relay": "yes"}]) == [
        "plugin[0].allow_open_relay: must be true or false, got 'yes'"]


def test_with_relay_control_on_is_refused() -> None:
    assert problems([{"use": "relay", "allow_open_relay": True}]) == [
        "plugin[0].allow_open_relay: only meaningful with enabled = false "
        "(relay control is on)"]


def test_disabled_relay_with_the_option_builds() -> None:
    runner = HookRunner()
    provided = load_plugins(config_from_mapping(
        {"plugin": [{"use": "relay", "enabled": False, "allow_open_relay": True}]}), runner)
    assert "relay" not in provided
    assert not runner.has("rcpt")

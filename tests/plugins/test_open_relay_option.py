"""``allow_open_relay`` on the relay table is validated: a boolean, and only with relay
control disabled (an enabled relay table with it would silently mean nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.app import Smtpgate
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


def test_plugins_that_only_refuse_do_not_count_as_relay_control(tmp_path: Path) -> None:
    """qmail-spp without [rcpt] programs and a policy table without relay_decider never
    stand in for disabled relay control (registry.decides_relay)."""
    spp = tmp_path / "smtpplugins"
    spp.write_text("[mail]\n:true\n")
    base = {"server": {"listen": ["127.0.0.1:0"]}, "maildir": {"path": str(tmp_path / "m")}}
    for table in ({"use": "qmail-spp", "plugins_file": str(spp)},
                  {"use": "policy", "address": "127.0.0.1:10023"}):
        cfg = dict(base, plugin=[{"use": "relay", "enabled": False}, table])
        with pytest.raises(ConfigError) as info:
            Smtpgate(cfg)
        assert any("no other plugin decides at rcpt" in p for p in info.value.problems)
    spp.write_text("[rcpt]\n:true\n")
    Smtpgate(dict(base, plugin=[{"use": "relay", "enabled": False},
                                {"use": "qmail-spp", "plugins_file": str(spp)}]))

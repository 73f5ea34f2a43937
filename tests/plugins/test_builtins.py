"""Built-in checks are plugins on the same chain (issue 9): replace relay control with a
site plugin (docs/examples/site_relay.py), the open-relay guard and ``allow_open_relay``,
reorder a built-in with ``priority``, remove one with ``enabled = false``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from smtpgate.errors import ConfigError
from tests.support import Capture

from .conftest import probe

#: With these relay settings the built-in refuses every recipient from loopback.
NO_RELAY = {"local_networks": [], "relay_domains": []}


def site_relay(**options: Any) -> dict[str, Any]:
    return {"module": "site_relay", "domains": ["example.com"], **options}


def rcpt(c: Any, address: str) -> bytes:
    return bytes(c.cmd(f"RCPT TO:<{address}>"))


def test_replace_relay_control_with_own_plugin(run_app, raw, capture: Capture,
                                               examples_on_path: Path) -> None:
    # The built-in alone would let every loopback client relay anywhere (local_networks).
    app = run_app({"relay": {"local_networks": ["127.0.0.0/8"]},
                   "plugin": [{"use": "relay", "enabled": False}, site_relay()]},
                  deliver=capture)
    assert app.relay is None  # the built-in is gone (nothing provides "relay")
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
    assert rcpt(c, "b@example.com") == b"250 2.1.5 Recipient OK"
    assert rcpt(c, "b@mail.example.com") == b"250 2.1.5 Recipient OK"
    assert rcpt(c, "x@elsewhere.example") == b"554 5.7.1 Relaying denied by site policy"
    assert c.cmd("DATA").startswith(b"354")
    c.send(b"Subject: relay\r\n\r\nbody\r\n.\r\n")
    assert c.read_reply().startswith(b"250 ")
    assert capture.messages[0][0].recipients == ["b@example.com", "b@mail.example.com"]


def test_own_relay_plugin_trusted_networks(run_app, raw, examples_on_path: Path) -> None:
    app = run_app({"relay": NO_RELAY, "plugin": [
        {"use": "relay", "enabled": False},
        site_relay(trusted_networks=["127.0.0.0/8"], reply_text="No"),
    ]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@example.org>")
    assert rcpt(c, "x@elsewhere.example").startswith(b"250")


def test_own_relay_plugin_options_checked(run_app, examples_on_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        run_app({"plugin": [{"use": "relay", "enabled": False},
                            {"module": "site_relay", "trusted_networks": ["300.1.2.3/8"]}]})
    assert info.value.problems == ["plugin[1].domains: required"]
    with pytest.raises(ConfigError) as info:
        run_app({"plugin": [{"use": "relay", "enabled": False},
                            site_relay(trusted_networks=["300.1.2.3/8"])]})
    assert info.value.problems == [
        "plugin[1].trusted_networks: must be addresses or networks (CIDR), got '300.1.2.3/8'"]


def test_relay_removed_without_replacement_fails(run_app) -> None:
    """The guard against an open relay; its error names the table that removed relay
    control (here the second one).

    Failed before 2b41e9f: the message started ``plugin: relay control is disabled``
    without the table's index (plugins/loader.py ``build_chain``).
    """
    with pytest.raises(ConfigError) as info:
        run_app({"plugin": [probe(stages=["mail"]), {"use": "relay", "enabled": False}]})
    assert info.value.problems == [
        "plugin[1]: relay control is disabled and no other plugin decides at rcpt: this "
        "would be an open relay; set allow_open_relay = true in that [[plugin]] table if "
        "that is what you want"]


def test_relay_removed_with_only_builtin_rcpt_hooks_fails(run_app) -> None:
    """HELO rules register an rcpt hook (strict address syntax) that never decides relay:
    it must not count as a replacement for relay control.

    Failed before 2b41e9f: build_chain only asked ``runner.has(Stage.RCPT)``, so the
    helo_rules plugin's hook silenced the guard and the server started as an open relay.
    """
    with pytest.raises(ConfigError, match="open relay"):
        run_app({"helo_rule": [{"pattern": "*", "flags": "h"}],
                 "plugin": [{"use": "relay", "enabled": False}]})
    with pytest.raises(ConfigError, match="open relay"):
        run_app({"hooks": {"address_check": "os.path:exists"},
                 "plugin": [{"use": "relay", "enabled": False}]})


def test_hooks_rcpt_counts_as_relay_decision(run_app, raw) -> None:
    """A ``[hooks] rcpt`` callable is the site's own code at rcpt: it satisfies the guard."""
    app = run_app({"relay": NO_RELAY, "hooks": {"rcpt": "tests.plugins.probe:read_records"},
                   "plugin": [{"use": "relay", "enabled": False}]})
    assert app.relay is None


def test_allow_open_relay_starts(run_app, raw, capture: Capture) -> None:
    app = run_app({"relay": NO_RELAY,
                   "plugin": [{"use": "relay", "enabled": False, "allow_open_relay": True}]},
                  deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@example.org>")
    assert rcpt(c, "x@anywhere.example") == b"250 2.1.5 Recipient OK"


def test_default_relay_refuses_with_these_settings(run_app, raw) -> None:
    """The control for the tests above: the built-in is on by default."""
    app = run_app({"relay": NO_RELAY})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@example.org>")
    assert rcpt(c, "x@anywhere.example") == b"550 5.7.1 Relaying denied"


@pytest.mark.parametrize(("relay_table", "vip_reply"), [
    (None, b"550 5.7.1 Relaying denied"),  # relay at its default -90: before the site list
    ({"use": "relay"}, b"550 5.7.1 Relaying denied"),  # a table alone changes nothing
    ({"use": "relay", "priority": 50}, b"250 2.1.5 On the site list"),  # after it
])
def test_reorder_relay_control(run_app, raw, relay_table: dict[str, Any] | None,
                               vip_reply: bytes) -> None:
    tables = [probe(name="site-list", stages=["rcpt"],
                    answers={"rcpt": "250 2.1.5 On the site list"}, when={"rcpt": "vip@"},
                    priority=0)]
    if relay_table is not None:
        tables.append(relay_table)
    app = run_app({"relay": NO_RELAY, "plugin": tables})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@example.org>")
    assert rcpt(c, "vip@elsewhere.example") == vip_reply
    assert rcpt(c, "other@elsewhere.example") == b"550 5.7.1 Relaying denied"


def test_two_tables_for_one_builtin_refused(run_app) -> None:
    with pytest.raises(ConfigError) as info:
        run_app({"plugin": [{"use": "relay", "priority": 10}, {"use": "relay"}]})
    assert info.value.problems == ["plugin[1].use: 'relay' already configured by plugin[0]"]


def test_disable_helo_rules(run_app, raw) -> None:
    rules = {"helo_rule": [{"pattern": "*.bad.example", "flags": "!Go away"}]}
    app = run_app(rules)
    c = raw(app.port)
    assert c.cmd("EHLO host.bad.example") == b"550 5.7.1 Go away"
    app2 = run_app({**rules, "plugin": [{"use": "helo_rules", "enabled": False}]})
    c2 = raw(app2.port)
    assert c2.cmd("EHLO host.bad.example").startswith(b"250-mx.test")


def test_unknown_shipped_plugin(run_app) -> None:
    with pytest.raises(ConfigError) as info:
        run_app({"plugin": [{"use": "no_such_plugin"}]})
    [problem] = info.value.problems
    assert problem.startswith("plugin[0]: no shipped plugin 'smtpgate.plugins.no_such_plugin'")

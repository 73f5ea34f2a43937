"""Tests for smtpgate.config: defaults, validation messages, listen parsing, relay URLs,
paths, CLI overrides, and that the shipped example and the reference docs agree."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shutil
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest

from smtpgate.config import (
    AdminConfig,
    AuthConfig,
    CaptureConfig,
    Config,
    DeliveryConfig,
    HooksConfig,
    ListenAddress,
    LogConfig,
    MaildirConfig,
    QueueConfig,
    RelayConfig,
    ScannerConfig,
    ServerConfig,
    TlsConfig,
    config_from_mapping,
    load_config,
    parse_listen,
    redact_url,
)
from smtpgate.errors import ConfigError

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLE = DOCS / "smtpgate.example.toml"
REFERENCE = DOCS / "configuration.md"

SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "tls": TlsConfig,
    "auth": AuthConfig,
    "relay": RelayConfig,
    "maildir": MaildirConfig,
    "hooks": HooksConfig,
    "log": LogConfig,
    "admin": AdminConfig,
    "capture": CaptureConfig,
    "delivery": DeliveryConfig,
    "queue": QueueConfig,
}


def problems_of(data: dict[str, Any], **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, **kw)
    return info.value.problems


# --------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------

EXPECTED_DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {
        "listen": (ListenAddress("127.0.0.1", 2525),),
        "max_message_size": 10485760,
        "message_buffer_size": 262144,
        "max_recipients": 100,
        "max_line_length": 1000,
        "max_command_line": 512,
        "command_timeout": 300.0,
        "data_timeout": 600.0,
        "max_connections": 1000,
        "max_connections_per_ip": 50,
        "max_errors": 10,
        "max_unknown_commands": 5,
        "bare_line_endings": "reject",
        "greeting": "%H ESMTP smtpgate",
        "shutdown_timeout": 30.0,
        "vrfy": False,
        "received_tls": True,
        "received_auth": False,
        "smtputf8": True,
        "use_uvloop": True,
    },
    "tls": {
        "certificate": "",
        "key": "",
        "cafile": "",
        "capath": "",
        "ciphers": "",
        "min_version": "TLSv1.2",
    },
    "auth": {
        "users_file": "",
        "authenticator": "",
        "require_tls": True,
        "mechanisms": ("PLAIN", "LOGIN"),
        "max_failures": 5,
        "failure_window": 300.0,
    },
    "relay": {
        "url": "",
        "relay_domains": (),
        "local_networks": ("127.0.0.0/8", "::1"),
        "timeout": 60.0,
        "cafile": "",
    },
    "maildir": {"path": "./smtpgate-mail"},
    "dns": {"nameservers": (), "port": 53, "timeout": 5.0, "lifetime": 15.0, "cache_size": 10000},
    "hooks": {
        "connect": (),
        "helo": (),
        "mail": (),
        "rcpt": (),
        "data": (),
        "quit": (),
        "error": (),
        "address_check": (),
        "timeout": 30.0,
    },
    "log": {"level": "INFO", "decisions": "DEBUG", "format": "text", "file": "",
            "max_size": 0, "roll_hour": -1,
            "max_backups": 10, "roll_format": "", "roll_on_start": False,
            "roll_on_signal": False, "send_log": ""},
    "admin": {"listen": "", "token_file": ""},
    "capture": {"database": "smtpgate-capture.sqlite", "max_messages": 10000, "max_bytes": 0,
                "relay_url": ""},
}
EXPECTED_DEFAULTS["server"].update({
    "help_text": "",
    "multiline_replies": True,
    "disable_extensions": (),
    "expn": False,
    "max_error_recipients": 3,
    "listen_backlog": 1024,
    "tcp_rcvbuf": 0,
    "tcp_sndbuf": 0,
    "tarpit_initial": 0.0,
    "tarpit_exponent": 0.0,
    "tarpit_max": 0.0,
    "max_load_average": 0.0,
    "pid_file": "",
    "received_tls_peer": False,
    "limit_exceptions": None,
    "min_data_rate": 500,
    "recipient_overshoot_limit": 1000,
    "workers": 1,
})


def test_defaults_every_key() -> None:
    cfg = Config.default()
    assert cfg.server.hostname == socket.gethostname()
    for section, keys in EXPECTED_DEFAULTS.items():
        sec = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(sec)}
        expected_names = set(keys) | ({"hostname"} if section == "server" else set())
        assert names == expected_names, section
        for key, value in keys.items():
            got = getattr(sec, key)
            assert got == value, f"{section}.{key}"
            assert type(got) is type(value), f"{section}.{key}"
    assert not cfg.tls.enabled
    assert not cfg.auth.enabled
    assert cfg.relay.networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_none_and_empty_mapping_give_defaults() -> None:
    assert load_config(None) == Config.default()
    assert config_from_mapping({}) == Config.default()
    assert config_from_mapping({"server": {}, "logging": {}}) == Config.default()
    assert config_from_mapping({}, source="x").source == "x"


def test_frozen_slotted_and_replace_friendly() -> None:
    cfg = Config.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.max_recipients = 5  # type: ignore[misc]
    for obj in (cfg, cfg.server, cfg.tls, cfg.auth, cfg.relay, cfg.maildir, cfg.hooks):
        assert not hasattr(obj, "__dict__")
    changed = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, max_recipients=7))
    assert changed.server.max_recipients == 7
    assert cfg.server.max_recipients == 100
    assert hash(cfg.server.listen[0]) == hash(ListenAddress("127.0.0.1", 2525))


# --------------------------------------------------------------------------------------------
# Accepted values and their normalisation
# --------------------------------------------------------------------------------------------


def test_values_are_stored_normalised() -> None:
    cfg = config_from_mapping(
        {
            "server": {
                "hostname": "mx.example.org",
                "listen": "[::1]:0",
                "command_timeout": 5,
                "data_timeout": 0.5,
                "shutdown_timeout": 0,
                "max_line_length": 0,
                "bare_line_endings": "normalize",
                "greeting": "%H ready",
            },
            "tls": {"min_version": "tlsv1.3", "ciphers": "ECDHE+AESGCM"},
            "auth": {"mechanisms": ["login", "PLAIN", "Login"], "authenticator": "a.b:c"},
            "relay": {
                "relay_domains": ["Example.ORG.", "example.com"],
                "local_networks": ["10.1.2.3/8", "2001:db8::1"],
                "timeout": 2,
            },
            "hooks": {"rcpt": "pkg.mod:check", "data": ["a:b", "c.d:e.f"]},
            "logging": {"level": "debug"},
        }
    )
    assert cfg.server.listen == (ListenAddress("::1", 0),)
    assert cfg.server.command_timeout == 5.0 and isinstance(cfg.server.command_timeout, float)
    assert cfg.server.data_timeout == 0.5
    assert cfg.server.shutdown_timeout == 0.0
    assert cfg.server.max_line_length == 0
    assert cfg.server.bare_line_endings == "normalize"
    assert cfg.server.greeting == "%H ready"
    assert cfg.tls.min_version == "TLSv1.3"
    assert cfg.auth.mechanisms == ("LOGIN", "PLAIN")
    assert cfg.auth.enabled
    assert cfg.relay.relay_domains == ("example.org", "example.com")
    assert cfg.relay.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::1/128"),
    )
    assert cfg.relay.timeout == 2.0
    assert cfg.hooks.rcpt == ("pkg.mod:check",)
    assert cfg.hooks.by_point() == {"rcpt": ("pkg.mod:check",), "data": ("a:b", "c.d:e.f")}
    assert cfg.log.level == "DEBUG"


# --------------------------------------------------------------------------------------------
# Each key's type / range / enumeration error names the key
# --------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("server", "hostname", 5, "must be a string, got 5"),
    ("server", "hostname", "", "must not be empty"),
    ("server", "hostname", "mx example", "printable ASCII"),
    ("server", "listen", [], "nothing to listen on"),
    ("server", "listen", 2525, "must be a string or an array of strings, got 2525"),
    ("server", "max_message_size", 0, "must be a positive integer, got 0"),
    ("server", "max_message_size", 1.5, "must be an integer, got 1.5"),
    ("server", "max_message_size", "10M", 'must be an integer, got "10M"'),
    ("server", "message_buffer_size", 1023, "must be an integer >= 1024, got 1023"),
    ("server", "max_recipients", -1, "must be a positive integer, got -1"),
    ("server", "max_recipients", True, "must be an integer, got true"),
    ("server", "max_line_length", 999, "0 (unlimited) or an integer >= 1000, got 999"),
    ("server", "max_command_line", 511, "an integer >= 512"),
    ("server", "command_timeout", 0, "must be a positive number of seconds, got 0"),
    ("server", "command_timeout", True, "must be a number, got true"),
    ("server", "command_timeout", float("inf"), "finite"),
    ("server", "data_timeout", -2.5, "must be a positive number of seconds, got -2.5"),
    ("server", "data_timeout", "60", 'must be a number, got "60"'),
    ("server", "max_connections", 0, "must be a positive integer"),
    ("server", "max_connections_per_ip", -3, "must be a positive integer"),
    ("server", "max_errors", 0, "must be a positive integer"),
    ("server", "max_unknown_commands", False, "must be an integer, got false"),
    ("server", "bare_line_endings", "fix", 'must be one of "reject", "normalize", got "fix"'),
    ("server", "bare_line_endings", "REJECT", "must be one of"),
    ("server", "greeting", "hi\r\nthere", "control characters"),
    ("server", "greeting", ["x"], "must be a string, got an array"),
    ("server", "shutdown_timeout", -1, "must be a number of seconds >= 0, got -1"),
    ("server", "vrfy", 1, "must be true or false, got 1"),
    ("server", "received_tls", "yes", 'must be true or false, got "yes"'),
    ("server", "received_auth", 0, "must be true or false"),
    ("server", "smtputf8", "true", "must be true or false"),
    ("server", "use_uvloop", {"a": 1}, "must be true or false, got a table"),
    ("tls", "certificate", 5, "must be a string"),
    ("tls", "ciphers", "NO-SUCH-CIPHER", "OpenSSL selects no cipher"),
    ("tls", "min_version", "TLSv1.1", 'must be one of "TLSv1.2", "TLSv1.3", got "TLSv1.1"'),
    ("auth", "authenticator", "mymodule", 'must look like "package.module:function"'),
    ("auth", "authenticator", "my-mod:fn", 'must look like "package.module:function"'),
    ("auth", "require_tls", "no", "must be true or false"),
    ("auth", "mechanisms", [], "at least one"),
    ("auth", "mechanisms", ["CRAM-MD5"], 'must be "PLAIN" or "LOGIN", got "CRAM-MD5"'),
    ("auth", "max_failures", 0, "must be a positive integer"),
    ("auth", "failure_window", 0, "must be a positive number of seconds"),
    ("relay", "url", 25, "must be a string, got 25"),
    ("relay", "relay_domains", ["user@example.org"], "must be a domain name"),
    ("relay", "relay_domains", [1], "must be a string, got 1"),
    ("relay", "local_networks", ["10.0.0.0/33"], "must be an IP address or a CIDR network"),
    ("relay", "local_networks", ["intranet"], 'got "intranet"'),
    ("relay", "timeout", 0, "must be a positive number of seconds"),
    ("dns", "nameservers", ["nope"], "must be an IP address, optionally with a port"),
    ("dns", "nameservers", ["127.0.0.1:0"], "must be an IP address, optionally with a port"),
    ("dns", "port", 0, "must be a port number between 1 and 65535, got 0"),
    ("dns", "timeout", 0, "must be a positive number of seconds"),
    ("dns", "lifetime", -1, "must be a positive number of seconds"),
    ("dns", "cache_size", -1, "must be"),
    ("maildir", "path", "", "must not be empty"),
    ("maildir", "path", 3, "must be a string"),
    ("hooks", "connect", "nocolon", 'must look like "package.module:function"'),
    ("hooks", "helo", ["a.b:"], "must look like"),
    ("hooks", "mail", [":f"], "must look like"),
    ("hooks", "rcpt", ["import.x:f"], "must look like"),
    ("hooks", "data", 7, "must be a string or an array of strings"),
    ("hooks", "quit", ["mod.func"], "must look like"),
    ("hooks", "error", ["a b:c"], "must look like"),
    ("hooks", "timeout", -1, "must be a positive number of seconds"),
    ("log", "level", "verbose", 'must be one of "DEBUG", "INFO", "WARNING", "ERROR"'),
    ("log", "level", 10, "must be a string, got 10"),
    ("log", "format", "xml", 'must be one of "text", "json"'),
    ("log", "decisions", "ERROR", 'must be one of "DEBUG", "INFO", "WARNING"'),
    ("log", "file", 3, "must be a string"),
    ("log", "max_size", -1, "must be"),
    ("log", "roll_hour", 24, "must be an hour of the day"),
    ("log", "max_backups", -2, "must be"),
    ("log", "roll_format", "a b", "must be"),
    ("log", "roll_on_start", "yes", "must be true or false"),
    ("log", "roll_on_signal", 1, "must be true or false"),
    ("log", "send_log", [], "must be a string"),
    ("admin", "listen", "nowhere", "missing port"),
    ("admin", "token_file", "/nonexistent/token", "not"),
    ("capture", "database", 5, "must be a string"),
    ("capture", "max_messages", -1, "must be"),
    ("capture", "max_bytes", "many", "must be"),
    ("capture", "relay_url", "ftp://x", "unsupported scheme"),
    ("server", "help_text", 5, "must be a string"),
    ("server", "multiline_replies", "no", "must be true or false"),
    ("server", "disable_extensions", ["NOPE"], "unknown extension"),
    ("server", "expn", 1, "must be true or false"),
    ("server", "max_error_recipients", 0, "must be a positive integer"),
    ("server", "listen_backlog", 0, "must be a positive integer"),
    ("server", "tcp_rcvbuf", -1, "must be an integer >= 0"),
    ("server", "tcp_sndbuf", "big", "must be an integer"),
    ("server", "tarpit_initial", -1, "must be a number of seconds >= 0"),
    ("server", "tarpit_exponent", -2, "must be a number >= 0"),
    ("server", "tarpit_max", "x", "must be a number"),
    ("server", "max_load_average", -1, "must be a number >= 0"),
    ("server", "pid_file", 3, "must be a string"),
    ("server", "received_tls_peer", "y", "must be true or false"),
    ("server", "limit_exceptions", ["lan"], "must be an IP address or a CIDR network"),
    ("server", "min_data_rate", -1, "must be an integer >= 0"),
    ("server", "recipient_overshoot_limit", 1.5, "must be an integer"),
    ("server", "workers", 0, "must be between 1 and 64, got 0"),
    ("server", "workers", 65, "must be between 1 and 64, got 65"),
    ("hooks", "address_check", ["nocolon"], "must look like"),
    ("delivery", "mode", "async", 'must be one of "", "queue", "proxy"'),
    ("delivery", "mx_port", 0, "must be a positive integer"),
    ("queue", "path", "", "must not be empty"),
    ("queue", "fsync", "yes", "must be true or false"),
    ("queue", "min_backoff", 0, "must be a positive number of seconds"),
    ("queue", "max_backoff", -1, "must be a positive number of seconds"),
    ("queue", "max_lifetime", "5d", "must be a number"),
    ("queue", "delay_warning", -1, "must be a number of seconds >= 0"),
    ("queue", "workers", 0, "must be a positive integer"),
    ("queue", "per_destination", 1.5, "must be an integer"),
    ("queue", "min_free_space", -1, "must be an integer >= 0"),
    ("queue", "scan_interval", 0, "must be a positive number of seconds"),
    ("queue", "dsn", 1, "must be true or false"),
    ("queue", "etrn_networks", ["nowhere"], "must be an IP address or a CIDR network"),
    ("queue", "delivery_process", "yes", "must be true or false"),
]


SCANNER_BAD_VALUES = [
    ("type", "dspam", 'must be one of "spamassassin", "rspamd", "clamav", "sophos"'),
    ("address", "nohostport", "needs host:port or unix:/path"),
    ("timeout", 0, "must be a positive number of seconds"),
    ("max_size", 0, "must be a positive integer"),
    ("on_error", "ignore", 'must be one of "tempfail", "accept"'),
    ("tag_score", -1, "must be a number >= 0"),
    ("reject_score", "high", "must be a number"),
    ("quarantine_score", -5, "must be a number >= 0"),
    ("quarantine_path", 7, "must be a string"),
    ("quarantine_reply", "drop", 'must be one of "accept", "reject"'),
    ("subject_prefix", 1, "must be a string"),
    ("reject_text", "a\r\nb", "control characters"),
    ("action", "delete", 'must be one of "reject", "quarantine"'),
    ("per_user", "yes", "must be true or false"),
    ("controller", "x", "needs host:port"),
    ("password", 5, "must be a string"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), SCANNER_BAD_VALUES)
def test_scanner_bad_value_names_the_key(key: str, value: Any, fragment: str) -> None:
    table = {"type": "clamav", key: value}
    mapping = {"scanner": [{"type": "spamassassin"}, table]}
    if key in ("address", "controller") and isinstance(value, str):
        # the address form is the scanners plugin's to check, when the chain is built
        from smtpgate.hooks import HookRunner
        from smtpgate.plugins import load_plugins

        with pytest.raises(ConfigError) as exc:
            load_plugins(config_from_mapping(mapping), HookRunner())
        problems = exc.value.problems
    else:
        problems = problems_of(mapping)
    assert problems and problems[0].startswith(f"scanner[1].{key}: "), problems
    assert fragment in problems[0]


def test_scanner_tables() -> None:
    cfg = config_from_mapping({"scanner": [{"type": "clamav"},
                                           {"type": "rspamd", "address": "unix:/run/r.sock"}]})
    assert [s.type for s in cfg.scanners] == ["clamav", "rspamd"]
    assert cfg.scanners[0].effective_address == "127.0.0.1:3310"
    assert cfg.scanners[1].kind == "spam"
    assert {f.name for f in dataclasses.fields(ScannerConfig)} == {k for k, _, _ in
                                                                   SCANNER_BAD_VALUES}
    assert problems_of({"scanner": [{"timeout": 5}]}) == [
        "scanner[0].type: required (spamassassin, rspamd, clamav or sophos)"]
    assert "quarantine_path: required" in problems_of(
        {"scanner": [{"type": "clamav", "action": "quarantine"}]})[0]


def test_delivery_mode_resolution() -> None:
    def mode(data: dict[str, Any]) -> str:
        return config_from_mapping(data).delivery_mode

    assert mode({}) == "local"
    assert mode({"relay": {"url": "discard:"}}) == "local"
    assert mode({"relay": {"url": "smtp://mx.example:25"}}) == "queue"
    assert mode({"relay": {"url": "smtp://mx.example:25"}, "delivery": {"mode": "proxy"}}) == "proxy"
    assert mode({"relay": {"url": "mx:"}}) == "queue"
    assert mode({"relay": {"url": "MX:"}}) == "queue"


@pytest.mark.parametrize(
    ("mode", "url", "fragment"),
    [
        ("queue", "discard:", 'relay.url is "discard:"'),
        ("queue", "", "relay.url is empty"),
        ("proxy", "", "relay.url is empty"),
        ("proxy", "discard:", 'relay.url is "discard:"'),
        ("proxy", "mx:", "MX delivery needs queue mode"),
    ],
)
def test_delivery_mode_without_an_upstream_is_refused(mode: str, url: str, fragment: str) -> None:
    """Finding 5 of issue 8: mode = "queue" with "discard:" passed the check and crashed."""
    (problem,) = problems_of({"delivery": {"mode": mode}, "relay": {"url": url}})
    assert problem.startswith("delivery.mode: "), problem
    assert fragment in problem


@pytest.mark.parametrize(("section", "key", "value", "fragment"), BAD_VALUES)
def test_bad_value_names_the_key(section: str, key: str, value: Any, fragment: str) -> None:
    problems = problems_of({section: {key: value}})
    assert len(problems) == 1, problems
    assert re.match(rf"{section}\.{key}(\[\d+\])?: ", problems[0]), problems[0]
    assert fragment in problems[0]


def test_every_key_has_a_bad_value_case() -> None:
    covered = {(s, k) for s, k, _, _ in BAD_VALUES}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if (section, f.name) in {
                ("tls", "key"),
                ("tls", "cafile"),
                ("tls", "capath"),
                ("auth", "users_file"),
                ("relay", "cafile"),
            }:
                continue  # path keys: see test_paths_* below
            assert (section, f.name) in covered, f"{section}.{f.name}"


def test_list_entries_are_reported_by_index() -> None:
    problems = problems_of({"server": {"listen": ["127.0.0.1:25", "nohost", 7, "[::1]:99999"]}})
    assert [p.split(":")[0] for p in problems] == [
        "server.listen[1]",
        "server.listen[2]",
        "server.listen[3]",
    ]
    assert "missing port" in problems[0]
    assert "must be a string, got 7" in problems[1]
    assert "0..65535" in problems[2]


def test_duplicate_listen_address() -> None:
    (problem,) = problems_of({"server": {"listen": ["127.0.0.1:25", "127.0.0.1:25"]}})
    assert problem == "server.listen: 127.0.0.1:25 is listed twice"


def test_several_problems_reported_together_in_file_order() -> None:
    problems = problems_of(
        {
            "server": {"max_recipients": -1, "vrfy": "no", "listen": ["bad"]},
            "tls": {"min_version": "SSLv3"},
            "logging": {"level": "loud"},
            "sever": {},
        }
    )
    assert [p.split(":")[0] for p in problems] == [
        "server.max_recipients",
        "server.vrfy",
        "server.listen[0]",
        "tls.min_version",
        "log.level",
        "sever",
    ]
    assert problems[0] == "server.max_recipients: must be a positive integer, got -1"
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"server": {"max_errors": 0, "max_connections": 0}})
    text = str(info.value)
    assert "server.max_errors" in text and "server.max_connections" in text


# --------------------------------------------------------------------------------------------
# Unknown sections and keys
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"sever": {}}, "sever: unknown section; did you mean 'server'?"),
        ({"loging": {}}, "loging: unknown section; did you mean 'logging'?"),
        (
            {"server": {"max_recipent": 5}},
            "server.max_recipent: unknown key; did you mean 'max_recipients'?",
        ),
        (
            {"tls": {"certficate": "x.pem"}},
            "tls.certficate: unknown key; did you mean 'certificate'?",
        ),
        (
            {"relay": {"relaydomains": []}},
            "relay.relaydomains: unknown key; did you mean 'relay_domains'?",
        ),
        ({"hooks": {"rcpts": "a:b"}}, "hooks.rcpts: unknown key; did you mean 'rcpt'?"),
    ],
)
def test_unknown_with_suggestion(data: dict[str, Any], expected: str) -> None:
    assert problems_of(data) == [expected]


def test_unknown_without_close_match_lists_known_names() -> None:
    (problem,) = problems_of({"log": {"zzzz": 1}})
    assert problem.startswith("log.zzzz: unknown key; known: decisions, file, format, level, ")
    (problem,) = problems_of({"qqqqqq": {}})
    assert problem.startswith("qqqqqq: unknown section; known: ")
    assert "server" in problem


def test_section_must_be_a_table() -> None:
    assert problems_of({"server": 5}) == ["server: must be a table ([server]), got 5"]


# --------------------------------------------------------------------------------------------
# Files: TOML syntax, missing file, relative paths
# --------------------------------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "smtpgate.toml"
    path.write_text("[server]\nmax_recipients = 5\nhostname = oops\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}, line 3, column 12: TOML syntax error: ")


def test_toml_error_at_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "smtpgate.toml"
    path.write_text('[server]\nhostname = "unterminated')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems[0].startswith(f"{path}, at end of file: TOML syntax error")


def test_missing_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.problems == [f"{tmp_path / 'nope.toml'}: configuration file not found"]
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems[0].startswith(f"{tmp_path}: cannot read configuration file")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[server]\ngreeting = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.problems[0].startswith(str(bad))


def test_values_from_file_and_source(tmp_path: Path) -> None:
    path = tmp_path / "smtpgate.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:0", "[::1]:0"]\nmax_recipients = 3\n')
    cfg = load_config(path)
    assert cfg.server.listen == (ListenAddress("127.0.0.1", 0), ListenAddress("::1", 0))
    assert cfg.server.max_recipients == 3
    assert cfg.source == str(path)
    assert cfg == config_from_mapping(
        {"server": {"listen": ["127.0.0.1:0", "[::1]:0"], "max_recipients": 3}},
        base_dir=tmp_path,
    )


def test_paths_relative_to_config_directory(tmp_path: Path, monkeypatch: Any) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "tls").mkdir(parents=True)
    (conf_dir / "cas").mkdir()
    for name in ("tls/chain.pem", "tls/key.pem", "tls/ca.pem", "users", "up-ca.pem"):
        (conf_dir / name).write_text("x")
    path = conf_dir / "smtpgate.toml"
    path.write_text(
        '[tls]\ncertificate = "tls/chain.pem"\nkey = "tls/key.pem"\ncafile = "tls/ca.pem"\n'
        'capath = "cas"\n[auth]\nusers_file = "users"\n[relay]\ncafile = "up-ca.pem"\n'
        '[maildir]\npath = "mail"\n[queue]\npath = "../spool"\n'
        '[server]\npid_file = "run/smtpgate.pid"\n'
        '[[scanner]]\ntype = "clamav"\nquarantine_path = "quarantine"\n'
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.tls.certificate == str(conf_dir / "tls/chain.pem")
    assert cfg.tls.key == str(conf_dir / "tls/key.pem")
    assert cfg.tls.cafile == str(conf_dir / "tls/ca.pem")
    assert cfg.tls.capath == str(conf_dir / "cas")
    assert cfg.tls.enabled
    assert cfg.auth.users_file == str(conf_dir / "users")
    assert cfg.auth.enabled
    assert cfg.relay.cafile == str(conf_dir / "up-ca.pem")
    # finding 7 of issue 8: Maildir, spool, pid file and quarantine too (they were
    # relative to the current directory)
    assert cfg.maildir.path == str(conf_dir / "mail")
    assert cfg.queue.path == str(tmp_path / "spool")
    assert cfg.server.pid_file == str(conf_dir / "run/smtpgate.pid")
    assert cfg.scanners[0].quarantine_path == str(conf_dir / "quarantine")


def test_default_directories_follow_the_config_file(tmp_path: Path, monkeypatch: Any) -> None:
    """A file that leaves maildir.path/queue.path out gets them next to the file; without a
    file (and for a mapping without base_dir) they stay relative to the current directory."""
    conf = tmp_path / "etc" / "smtpgate.toml"
    conf.parent.mkdir()
    conf.write_text("[server]\nmax_recipients = 3\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(conf)
    assert cfg.maildir.path == str(conf.parent / "smtpgate-mail")
    assert cfg.queue.path == str(conf.parent / "smtpgate-queue")
    assert Config.default().maildir.path == "./smtpgate-mail"
    assert load_config(None).queue.path == "./smtpgate-queue"
    assert config_from_mapping({}).maildir.path == "./smtpgate-mail"


def test_paths_missing_files_reported(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    problems = problems_of(
        {
            "tls": {"certificate": "chain.pem", "key": "adir", "capath": "afile"},
            "auth": {"users_file": "users"},
            "relay": {"cafile": str(tmp_path / "nope.pem")},
        },
        base_dir=tmp_path,
    )
    assert problems == [
        f"tls.certificate: file not found: {tmp_path / 'chain.pem'}",
        f"tls.key: not a regular file: {tmp_path / 'adir'}",
        f"tls.capath: not a directory: {tmp_path / 'afile'}",
        f"auth.users_file: file not found: {tmp_path / 'users'}",
        f"relay.cafile: file not found: {tmp_path / 'nope.pem'}",
    ]


def test_tls_key_without_certificate(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x")
    problems = problems_of({"tls": {"key": "key.pem"}}, base_dir=tmp_path)
    assert problems == ["tls.key: set, but tls.certificate is empty (TLS is off)"]


# --------------------------------------------------------------------------------------------
# Listen addresses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "canonical"),
    [
        ("127.0.0.1:2525", "127.0.0.1", 2525, "127.0.0.1:2525"),
        ("0.0.0.0:25", "0.0.0.0", 25, "0.0.0.0:25"),
        ("[::1]:2525", "::1", 2525, "[::1]:2525"),
        ("[::]:0", "::", 0, "[::]:0"),
        ("[2001:db8::25]:587", "2001:db8::25", 587, "[2001:db8::25]:587"),
        ("localhost:2525", "localhost", 2525, "localhost:2525"),
        ("mx-1.example.org:65535", "mx-1.example.org", 65535, "mx-1.example.org:65535"),
        ("  127.0.0.1:25 ", "127.0.0.1", 25, "127.0.0.1:25"),
    ],
)
def test_parse_listen_good(text: str, host: str, port: int, canonical: str) -> None:
    addr = parse_listen(text)
    assert addr == ListenAddress(host, port)
    assert str(addr) == canonical
    assert parse_listen(str(addr)) == addr


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("127.0.0.1", "missing port"),
        ("localhost", "missing port"),
        ("127.0.0.1:", "missing port"),
        ("[::1]", "missing port"),
        ("[::1]:", "missing port"),
        ("::1:25", "IPv6 addresses must be in brackets"),
        ("127.0.0.1:65536", "0..65535"),
        ("127.0.0.1:-1", "0..65535"),
        ("127.0.0.1:smtp", "0..65535"),
        ("127.0.0.1:+25", "0..65535"),
        ("127.0.0.1:2 5", "0..65535"),
        (":25", "missing host"),
        ("", "empty address"),
        ("[::1:25", "missing ']'"),
        ("[::1]25", "expected ':PORT'"),
        ("[127.0.0.1]:25", "not an IPv6 address"),
        ("[nothost]:25", "not an IPv6 address"),
        ("300.1.1.1:25", "invalid IPv4 address"),
        ("bad_host:25", "invalid host name"),
        ("-bad.example:25", "invalid host name"),
    ],
)
def test_parse_listen_bad(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_listen(text)


def test_listen_address_validates_its_fields() -> None:
    with pytest.raises(ValueError):
        ListenAddress("127.0.0.1", 70000)
    with pytest.raises(ValueError):
        ListenAddress("", 25)
    with pytest.raises(ValueError):
        ListenAddress("127.0.0.1", True)
    assert ListenAddress("::1", 25).is_ipv6
    assert not ListenAddress("localhost", 25).is_ipv6


def test_parsed_listen_address_binds() -> None:
    """The parsed form is what a listener binds: port 0 picks a free port."""
    addr = parse_listen("127.0.0.1:0")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr.host, addr.port))
        assert sock.getsockname()[1] > 0


# --------------------------------------------------------------------------------------------
# Relay URLs
# --------------------------------------------------------------------------------------------

SECRET = "s3cr3t-P4ss"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "discard:",
        "smtp://mx.example.org:25",
        "smtp://mx.example.org",
        "smtp+starttls://smarthost.example.net:587",
        "smtps://[2001:db8::1]:465",
        "SMTPS://127.0.0.1:465",
        f"plain://user:{SECRET}@smarthost.example.net:587",
        "plain://user%40example.org:p%40ss%23@[::1]:2525",
    ],
)
def test_relay_url_good(url: str) -> None:
    assert config_from_mapping({"relay": {"url": url}}).relay.url == url


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        (f"http://user:{SECRET}@example.org", "unsupported scheme 'http'"),
        (f"lmtp://user:{SECRET}@example.org:24", "unsupported scheme 'lmtp'"),
        ("mx.example.org:25", "not a relay URL"),
        (f"user:{SECRET}@mx.example.org", "not a relay URL"),
        ("smtp://:25", "missing host"),
        (f"plain://user:{SECRET}@:25", "missing host"),
        ("smtp://mx.example.org:abc", "port must be a number"),
        (f"plain://user:{SECRET}@mx.example.org:99999", "port must be a number"),
        ("smtp://mx.example.org:0", "port must be a number"),
        ("plain://mx.example.org:25", "USER:PASSWORD@"),
        ("plain://user@mx.example.org:25", "USER:PASSWORD@"),
        (f"plain://user:{SECRET}#x@mx.example.org:25", "percent-encode"),
        (f"plain://user:{SECRET}/x@mx.example.org:25", "percent-encode"),
        ("discard://x", "discard: takes no host"),
        # finding 5 of issue 8: accepted by the old config parser, refused by the relay
        (f"smtp://bob:{SECRET}@localhost:25", "credentials are only sent over TLS"),
        (f"plain://bob:{SECRET}@host:587/path", "a path is not allowed"),
        (f"plain://bob:{SECRET} x@host:587", "a space is %20"),
        ("smtps://host:465?verify=maybe", "verify must be yes or no"),
    ],
)
def test_relay_url_bad_without_leaking_password(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"relay": {"url": url}})
    (problem,) = info.value.problems
    assert problem.startswith("relay.url: ")
    assert fragment in problem
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    assert "s3cr3t" not in problem


def test_relay_password_not_in_repr() -> None:
    cfg = config_from_mapping({"relay": {"url": f"plain://bob:{SECRET}@smarthost.example.net:587"}})
    assert cfg.relay.url.endswith("@smarthost.example.net:587")
    for text in (repr(cfg), repr(cfg.relay), str(cfg)):
        assert SECRET not in text
        assert "plain://bob:***@smarthost.example.net:587" in text
    assert cfg.relay.display_url == "plain://bob:***@smarthost.example.net:587"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("smtp://mx:25", "smtp://mx:25"),
        ("plain://u:pw@h:1", "plain://u:***@h:1"),
        ("plain://u:p@w@h:1", "plain://u:***@h:1"),
        ("plain://u:p/w@h:1", "plain://u:***@h:1"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# --------------------------------------------------------------------------------------------
# CLI overrides
# --------------------------------------------------------------------------------------------


def test_with_overrides() -> None:
    base = config_from_mapping({"server": {"max_recipients": 9}})
    cfg = base.with_overrides(listen=["[::1]:0", "127.0.0.1:2526"], log_level="debug")
    assert cfg.server.listen == (ListenAddress("::1", 0), ListenAddress("127.0.0.1", 2526))
    assert cfg.log.level == "DEBUG"
    assert cfg.server.max_recipients == 9
    assert base.server.listen == (ListenAddress("127.0.0.1", 2525),)
    assert base.log.level == "INFO"
    assert base.with_overrides() == base
    assert base.with_overrides(log_level="ERROR").server == base.server


def test_with_overrides_errors_name_the_key() -> None:
    base = Config.default()
    with pytest.raises(ConfigError) as info:
        base.with_overrides(listen=["localhost", "[::1]:1"], log_level="chatty")
    assert [p.split(" ")[0] for p in info.value.problems] == [
        "server.listen[0]",
        "log.level",
    ]
    assert "missing port" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        base.with_overrides(listen=[])
    assert info.value.problems[0].startswith("server.listen (--listen): ")


def test_with_overrides_admin() -> None:
    """``serve --admin HOST:PORT`` replaces ``admin.listen``, checked like the key."""
    base = config_from_mapping({"admin": {"listen": "127.0.0.1:9000"}})
    assert base.with_overrides(admin="[::1]:8025").admin.listen == "[::1]:8025"
    assert base.with_overrides(admin="").admin.listen == ""  # "" turns it off
    assert base.with_overrides().admin == base.admin
    with pytest.raises(ConfigError) as info:
        base.with_overrides(admin="192.0.2.1:8025")  # not loopback, no token_file
    assert info.value.problems == [
        "admin.listen (--admin): 192.0.2.1:8025 is not a loopback address; set "
        "admin.token_file to serve the admin API on other addresses"]
    with pytest.raises(ConfigError) as info:
        base.with_overrides(admin="8025")
    assert info.value.problems[0].startswith("admin.listen (--admin): ")


# --------------------------------------------------------------------------------------------
# The shipped example and the reference documentation
# --------------------------------------------------------------------------------------------


def test_example_file_loads(tmp_path: Path) -> None:
    """The example loads once the files it names exist next to it (paths are relative)."""
    conf = tmp_path / "smtpgate.toml"
    shutil.copy(EXAMPLE, conf)
    with pytest.raises(ConfigError) as info:
        load_config(conf)  # certificate, key, users file are not there yet
    assert {p.split(":")[0] for p in info.value.problems} == {
        "tls.certificate",
        "tls.key",
        "auth.users_file",
    }
    raw = tomllib.loads(EXAMPLE.read_text())
    for rel in (raw["tls"]["certificate"], raw["tls"]["key"], raw["auth"]["users_file"]):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("placeholder")
    cfg = load_config(conf)
    assert cfg.tls.enabled and cfg.auth.enabled
    assert cfg.tls.certificate == str(tmp_path / raw["tls"]["certificate"])
    assert [str(a) for a in cfg.server.listen] == raw["server"]["listen"]
    assert cfg.relay.url == raw["relay"]["url"]
    # every section and key is spelled out in the example
    for section, cls in SECTIONS.items():
        assert set(raw[section]) == {f.name for f in dataclasses.fields(cls)}, section


def test_reference_embeds_the_example_verbatim() -> None:
    reference = REFERENCE.read_text()
    assert "```toml\n" + EXAMPLE.read_text() + "```" in reference


def test_reference_documents_every_key_with_its_section() -> None:
    reference = REFERENCE.read_text()
    for section, cls in SECTIONS.items():
        heading = f"## `[{section}]`"
        assert heading in reference, heading
        part = reference.split(heading, 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in part, f"{section}.{f.name}"
    part = reference.split("## `[[scanner]]`", 1)[1].split("\n## ", 1)[0]
    for f in dataclasses.fields(ScannerConfig):
        assert f"| `{f.name}` |" in part, f"scanner.{f.name}"
    assert "smtpgate serve -c FILE [--listen ADDR ...] [--log-level LEVEL]" in reference
    assert "smtpgate check-config -c FILE" in reference


def test_logging_is_the_older_name_of_log() -> None:
    assert config_from_mapping({"logging": {"level": "DEBUG"}}).log.level == "DEBUG"
    assert problems_of({"logging": {"level": "DEBUG"}, "log": {}}) == [
        "logging: [logging] is the older name of [log]; use one of them"]
    assert problems_of({"logging": {"level": "loud"}})[0].startswith("log.level: ")


def test_admin_listen_needs_a_token_off_loopback(tmp_path: Path) -> None:
    assert config_from_mapping({"admin": {"listen": "127.0.0.1:8025"}}).admin.listen
    assert config_from_mapping({"admin": {"listen": "[::1]:8025"}}).admin.listen
    assert problems_of({"admin": {"listen": "0.0.0.0:8025"}}) == [
        "admin.listen: 0.0.0.0:8025 is not a loopback address; set admin.token_file to "
        "serve the admin API on other addresses"]
    token = tmp_path / "token"
    token.write_text("secret\n")
    cfg = config_from_mapping({"admin": {"listen": "0.0.0.0:8025", "token_file": str(token)}})
    assert cfg.admin.token_file == str(token)


def test_capture_mode_and_database_default(tmp_path: Path) -> None:
    conf = tmp_path / "smtpgate.toml"
    conf.write_text('[delivery]\nmode = "capture"\n')
    cfg = load_config(conf)
    assert cfg.delivery_mode == "capture"
    assert cfg.capture.database == str(tmp_path / "smtpgate-capture.sqlite")

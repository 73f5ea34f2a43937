"""The spf plugin in a running smtpgate (asyncio and uvloop, via run_app), its DNS answered
by the loopback server of conftest.py: replies, Received-SPF on delivered messages, the
recorded findings (shown by the results_header plugin), exemptions, warn mode, options."""

from __future__ import annotations

import re
import smtplib
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smtpgate.app import Smtpgate
from smtpgate.errors import ConfigError
from smtpgate.plugins.spf import OPTIONS

from ...support import Capture, RawClient
from .conftest import ThreadedDns

MESSAGE = b"From: a@example.org\r\nSubject: spf\r\n\r\nbody\r\n"


def _config(spf_dns: ThreadedDns, *, local: list[str] | None = None, cache_size: int = 0,
            **options: Any) -> dict[str, Any]:
    # No DNS cache unless asked: the tests count the queries the server saw.
    return {
        "dns": {"nameservers": [f"127.0.0.1:{spf_dns.port}"], "timeout": 0.5,
                "lifetime": 1.0, "cache_size": cache_size},
        # 127.0.0.1 (the test client) is not a local network unless a test says so.
        "relay": {"relay_domains": ["example.net"],
                  "local_networks": local if local is not None else ["192.0.2.0/24"]},
        "plugin": [{"use": "spf", **options}, {"use": "results_header"}],
    }


def _headers(message: bytes, name: bytes) -> list[bytes]:
    """The unfolded values of header field ``name``, top to bottom."""
    head = message.split(b"\r\n\r\n", 1)[0]
    head = re.sub(rb"\r\n(?=[ \t])", b"", head)
    prefix = name.lower() + b":"
    return [line[len(prefix):].strip() for line in head.split(b"\r\n")
            if line.lower().startswith(prefix)]


def _send(port: int, helo: str, sender: str) -> tuple[int, bytes]:
    """EHLO, MAIL, RCPT, DATA; returns the first non-2xx/3xx reply or the final one."""
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo(helo)
        code, text = s.mail(sender)
        if code != 250:
            return code, text
        code, text = s.rcpt("bob@example.net")
        if code != 250:
            return code, text
        code, text = s.data(MESSAGE)
        return code, text


StartApp = Callable[..., Smtpgate]


def test_pass_delivers_with_received_spf(run_app: StartApp, spf_dns: ThreadedDns,
                                         capture: Capture) -> None:
    app = run_app(_config(spf_dns), deliver=capture)
    code, _ = _send(app.port, "client.test", "a@pass.test")
    assert code == 250
    [(_envelope, message)] = capture.messages
    assert _headers(message, b"Received-SPF") == [
        b'pass (mx.test: domain of pass.test designates 127.0.0.1 as permitted sender) '
        b'client-ip=127.0.0.1; envelope-from="a@pass.test"; helo=client.test; '
        b'receiver=mx.test; mechanism="ip4:127.0.0.1"; identity=mailfrom',
        b'pass (mx.test: domain of client.test designates 127.0.0.1 as permitted sender) '
        b'client-ip=127.0.0.1; envelope-from="postmaster@client.test"; helo=client.test; '
        b'receiver=mx.test; mechanism="ip4:127.0.0.1"; identity=helo',
    ]
    [results] = _headers(message, b"X-Smtpgate-Results")
    assert b"spf_helo=pass (identity=helo domain=client.test client_ip=127.0.0.1" in results
    assert b"spf=pass (identity=mailfrom domain=pass.test client_ip=127.0.0.1 " \
           b"mechanism=ip4:127.0.0.1)" in results
    # Received-SPF comes after (below) smtpgate's own Received: it was prepended at data.
    assert message.startswith(b"Received: ")


def test_fail_gets_550_with_the_records_explanation(run_app: StartApp,
                                                    spf_dns: ThreadedDns,
                                                    capture: Capture) -> None:
    app = run_app(_config(spf_dns), deliver=capture)
    client = RawClient(app.port)
    try:
        assert client.cmd("EHLO client.test").startswith(b"250")
        assert client.cmd("MAIL FROM:<a@fail.test>") == (
            b"550 5.7.23 SPF fail: Host 127.0.0.1 may not send for fail.test; see "
            b"https://www.fail.test/spf")
        assert client.cmd("MAIL FROM:<a@failnoexp.test>") == (
            b"550 5.7.23 SPF fail: failnoexp.test does not designate 127.0.0.1 as "
            b"permitted sender")
        assert client.cmd("MAIL FROM:<a@pass.test>").startswith(b"250 ")
    finally:
        client.close()
    assert capture.messages == []


def test_temperror_gets_451(run_app: StartApp, spf_dns: ThreadedDns) -> None:
    app = run_app(_config(spf_dns))
    client = RawClient(app.port)
    try:
        client.cmd("EHLO client.test")
        assert client.cmd("MAIL FROM:<a@servfail.test>") == (
            b"451 4.7.24 SPF temporary error checking servfail.test, try again later")
        assert client.cmd("MAIL FROM:<a@timeout.test>") == (
            b"451 4.7.24 SPF temporary error checking timeout.test, try again later")
    finally:
        client.close()


@pytest.mark.parametrize(("sender", "result"), [
    ("a@soft.test", b"softfail"), ("a@neutral.test", b"neutral"), ("a@nospf.test", b"none"),
    ("a@limit.test", b"permerror"),
])
def test_other_results_recorded_and_delivered(run_app: StartApp, spf_dns: ThreadedDns,
                                              capture: Capture, sender: str,
                                              result: bytes) -> None:
    app = run_app(_config(spf_dns), deliver=capture)
    assert _send(app.port, "client.test", sender)[0] == 250
    [(_envelope, message)] = capture.messages
    assert _headers(message, b"Received-SPF")[0].startswith(result + b" (mx.test: ")
    domain = sender.partition("@")[2].encode()
    [results] = _headers(message, b"X-Smtpgate-Results")
    assert b"spf=" + result + b" (identity=mailfrom domain=" + domain in results


def test_null_sender_is_checked_through_helo(run_app: StartApp, spf_dns: ThreadedDns,
                                             capture: Capture) -> None:
    app = run_app(_config(spf_dns), deliver=capture)
    client = RawClient(app.port)
    try:
        client.cmd("EHLO badhelo.test")
        assert client.cmd("MAIL FROM:<>") == b"550 5.7.23 SPF fail: HELO badhelo.test is not ours"
    finally:
        client.close()
    assert _send(app.port, "client.test", "")[0] == 250
    [(_envelope, message)] = capture.messages
    # one identity checked: one field
    assert _headers(message, b"Received-SPF") == [
        b'pass (mx.test: domain of client.test designates 127.0.0.1 as permitted sender) '
        b'client-ip=127.0.0.1; envelope-from="postmaster@client.test"; helo=client.test; '
        b'receiver=mx.test; mechanism="ip4:127.0.0.1"; identity=helo']
    [results] = _headers(message, b"X-Smtpgate-Results")
    assert b"spf=pass (identity=helo domain=client.test client_ip=127.0.0.1" in results


def test_helo_fail_refuses_before_mail_from(run_app: StartApp, spf_dns: ThreadedDns) -> None:
    app = run_app(_config(spf_dns))
    spf_dns.server.queries.clear()
    client = RawClient(app.port)
    try:
        client.cmd("EHLO badhelo.test")
        assert client.cmd("MAIL FROM:<a@pass.test>") == (
            b"550 5.7.23 SPF fail: HELO badhelo.test is not ours")
    finally:
        client.close()
    # RFC 7208 §2.3: a conclusive HELO result spares the MAIL FROM lookups
    assert ("pass.test", "TXT") not in spf_dns.server.queries


def test_check_helo_false_checks_only_mail_from(run_app: StartApp, spf_dns: ThreadedDns,
                                               capture: Capture) -> None:
    app = run_app(_config(spf_dns, check_helo=False), deliver=capture)
    assert _send(app.port, "badhelo.test", "a@pass.test")[0] == 250
    [(_envelope, message)] = capture.messages
    assert [h.split(b" ")[0] for h in _headers(message, b"Received-SPF")] == [b"pass"]
    assert _headers(message, b"Received-SPF")[0].endswith(b"identity=mailfrom")


def test_local_network_exempt(run_app: StartApp, spf_dns: ThreadedDns,
                              capture: Capture) -> None:
    app = run_app(_config(spf_dns, local=["127.0.0.0/8"]), deliver=capture)
    spf_dns.server.queries.clear()
    assert _send(app.port, "badhelo.test", "a@fail.test")[0] == 250
    [(_envelope, message)] = capture.messages
    assert _headers(message, b"Received-SPF") == []
    [results] = _headers(message, b"X-Smtpgate-Results")
    assert b"spf=skipped (reason=local-network)" in results
    assert spf_dns.server.queries == []


def authenticate(username: str, password: str) -> bool:
    """``[auth] authenticator`` for the authenticated-client test: one user."""
    return (username, password) == ("carol", "secret")


def test_authenticated_client_exempt(run_app: StartApp, spf_dns: ThreadedDns,
                                     capture: Capture) -> None:
    cfg = _config(spf_dns)
    cfg["auth"] = {"authenticator": f"{__name__}:authenticate", "require_tls": False}
    app = run_app(cfg, deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo("badhelo.test")
        assert s.mail("a@fail.test")[0] == 550  # not yet authenticated
        s.rset()
        s.login("carol", "secret")
        s.sendmail("a@fail.test", ["bob@example.net"], MESSAGE)
    [(_envelope, message)] = capture.messages
    assert _headers(message, b"Received-SPF") == []
    [results] = _headers(message, b"X-Smtpgate-Results")
    assert b"spf=skipped (reason=authenticated)" in results


def test_warn_mode_records_but_refuses_nothing(run_app: StartApp, spf_dns: ThreadedDns,
                                              capture: Capture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    app = run_app(_config(spf_dns, mode="warn"), deliver=capture)
    with caplog.at_level("WARNING", logger="smtpgate.plugins.spf"):
        assert _send(app.port, "client.test", "a@fail.test")[0] == 250
        assert _send(app.port, "client.test", "a@servfail.test")[0] == 250
    first, second = (m for _e, m in capture.messages)
    assert _headers(first, b"Received-SPF")[0].startswith(b"fail (mx.test: domain of "
                                                          b"fail.test does not designate")
    [results] = _headers(first, b"X-Smtpgate-Results")
    assert b"spf=fail (identity=mailfrom domain=fail.test client_ip=127.0.0.1 " \
           b"explanation=Host 127.0.0.1 may not send for fail.test" in results
    assert b"warn=would reject)" in results
    [results] = _headers(second, b"X-Smtpgate-Results")
    assert b"spf=temperror (" in results and b"warn=would tempfail)" in results
    warnings = [r.getMessage() for r in caplog.records if r.name == "smtpgate.plugins.spf"]
    assert any("would refuse (550 5.7.23) at mail" in w and "domain=fail.test" in w
               for w in warnings)
    assert any("would refuse (451 4.7.24) at mail" in w and "domain=servfail.test" in w
               for w in warnings)


def test_actions_are_configurable(run_app: StartApp, spf_dns: ThreadedDns,
                                  capture: Capture) -> None:
    app = run_app(_config(spf_dns, fail="tempfail", softfail="reject", temperror="tag"),
                  deliver=capture)
    client = RawClient(app.port)
    try:
        client.cmd("EHLO client.test")
        assert client.cmd("MAIL FROM:<a@fail.test>") == (
            b"451 4.7.23 SPF fail: Host 127.0.0.1 may not send for fail.test; see "
            b"https://www.fail.test/spf")
        assert client.cmd("MAIL FROM:<a@soft.test>") == (
            b"550 5.7.23 SPF softfail for mailfrom a@soft.test from 127.0.0.1")
    finally:
        client.close()
    assert _send(app.port, "client.test", "a@servfail.test")[0] == 250
    [(_envelope, message)] = capture.messages
    assert _headers(message, b"Received-SPF")[0].startswith(b"temperror (mx.test: ")


def test_rcpt_stage(run_app: StartApp, spf_dns: ThreadedDns) -> None:
    app = run_app(_config(spf_dns, stage="rcpt"))
    client = RawClient(app.port)
    try:
        client.cmd("EHLO client.test")
        assert client.cmd("MAIL FROM:<a@fail.test>").startswith(b"250 ")
        assert client.cmd("RCPT TO:<bob@example.net>").startswith(b"550 5.7.23 SPF fail: ")
        # every recipient gets the same answer (the check runs once)
        assert client.cmd("RCPT TO:<carl@example.net>").startswith(b"550 5.7.23 SPF fail: ")
        assert client.cmd("DATA").startswith(b"554 ")
    finally:
        client.close()


def test_helo_stage_refuses_the_helo(run_app: StartApp, spf_dns: ThreadedDns,
                                     capture: Capture) -> None:
    app = run_app(_config(spf_dns, helo_stage="helo"), deliver=capture)
    client = RawClient(app.port)
    try:
        assert client.cmd("EHLO badhelo.test") == (
            b"550 5.7.23 SPF fail: HELO badhelo.test is not ours")
    finally:
        client.close()
    spf_dns.server.queries.clear()
    assert _send(app.port, "client.test", "a@pass.test")[0] == 250
    # the HELO identity was checked once, at EHLO, and kept for the transaction
    assert spf_dns.server.queries.count(("client.test", "TXT")) == 1
    [(_envelope, message)] = capture.messages
    assert [h.rsplit(b"identity=", 1)[1] for h in _headers(message, b"Received-SPF")] == [
        b"mailfrom", b"helo"]


def test_repeated_senders_are_answered_from_the_cache(run_app: StartApp,
                                                      spf_dns: ThreadedDns,
                                                      loop_kind: str) -> None:
    # a [dns] section of its own (one resolver and cache per section): a fresh cache
    app = run_app(_config(spf_dns, cache_size=777 if loop_kind == "asyncio" else 778))
    spf_dns.server.queries.clear()
    assert _send(app.port, "client.test", "a@include.test")[0] == 250
    first = list(spf_dns.server.queries)
    assert ("include.test", "TXT") in first and ("pass.test", "TXT") in first
    assert _send(app.port, "client.test", "b@include.test")[0] == 250
    assert spf_dns.server.queries == first


@pytest.mark.parametrize(("options", "problem"), [
    ({"fail": "bounce"}, "plugin[0].fail: must be one of reject, tempfail, tag, got 'bounce'"),
    ({"pass": "reject"}, "plugin[0].pass: a pass cannot be refused: use tag"),
    ({"mode": "loud"}, "plugin[0].mode: must be one of enforce, warn, got 'loud'"),
    ({"stage": "data"}, "plugin[0].stage: must be one of mail, rcpt, got 'data'"),
])
def test_option_errors(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        Smtpgate({"plugin": [{"use": "spf", **options}]})
    assert problem in info.value.problems


def test_docs_example_and_option_table_match_the_code() -> None:
    text = (Path(__file__).parents[3] / "docs" / "authentication.md").read_text()
    section = text.split("## SPF", 1)[1].split("\n## ", 1)[0]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = tomllib.loads(example)
    [table] = cfg["plugin"]
    assert table["use"] == "spf"
    assert {k: v for k, v in table.items() if k != "use"} == {
        k: o.default for k, o in OPTIONS.items()}
    Smtpgate(cfg)  # loads as written
    rows = section.split("### Options", 1)[1].split("###", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)`", rows, re.M))
    documented |= set(re.findall(r"`([a-z]+)`", rows.split("| `pass`", 1)[1].split("|")[0]))
    documented.add("pass")
    assert documented == set(OPTIONS)

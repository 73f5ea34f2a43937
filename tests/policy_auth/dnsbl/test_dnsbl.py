"""The dnsbl plugin end to end: smtpgate (both event loops) with ``[[plugin]] use =
"dnsbl"`` against a real DNS server on loopback serving test blocklist zones; clients
present their address through a PROXY listener (or connect over ::1)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from smtpgate.app import Smtpgate
from smtpgate.auth.users import add_user
from smtpgate.envelope import SessionInfo
from smtpgate.errors import ConfigError
from smtpgate.hooks import Transaction
from smtpgate.plugins.dnsbl import domain_query_name, ip_query_name, parse_zone

from ...support import RawClient
from .conftest import LISTED_TXT, proxied

REFUSED = (b"554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.test; "
           + LISTED_TXT.encode())
ONLY_QUIT = b"503 5.5.1 Session rejected; only QUIT is allowed"


def findings(app: Smtpgate) -> list[tuple[str, str, str]]:
    """Records, at each RCPT the plugin lets through, ``(client, session finding,
    transaction finding)`` (a refused RCPT ends the chain before this hook)."""
    seen: list[tuple[str, str, str]] = []

    def rcpt(session: SessionInfo, transaction: Transaction, recipient: Any) -> None:
        s, t = session.results.get("dnsbl"), transaction.results.get("dnsbl")
        seen.append((session.peer_ip, s.text() if s else "-", t.text() if t else "-"))

    app.hooks.register("rcpt", rcpt, priority=99)
    return seen


def envelope(c: RawClient, sender: str = "a@example.org",
             rcpts: tuple[str, ...] = ("b@example.com",), helo: str = "client.test",
             ) -> list[bytes]:
    assert c.cmd(f"EHLO {helo}").startswith(b"250")
    assert c.cmd(f"MAIL FROM:<{sender}>").startswith(b"250 2.1.0")
    return [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]


# ------------------------------------------------------------------ query names (unit)


def test_ipv4_query_name() -> None:
    assert ip_query_name("192.0.2.99", "zen.test") == "99.2.0.192.zen.test"
    assert ip_query_name("::ffff:192.0.2.99", "zen.test") == "99.2.0.192.zen.test"


def test_ipv6_query_name_is_rfc5782_nibbles() -> None:
    # RFC 5782 §2.4's own example.
    assert ip_query_name("2001:db8:1:2:3:4:567:89ab", "ugly.example.com") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com")
    assert ip_query_name(ipaddress.ip_address("::1"), "z.test") == "1." + "0." * 31 + "z.test"


def test_domain_query_name() -> None:
    assert domain_query_name("Bad.Example.", "dbl.test") == "bad.example.dbl.test"
    assert domain_query_name("bücher.example", "dbl.test") == "xn--bcher-kva.example.dbl.test"
    assert domain_query_name("[192.0.2.1]", "dbl.test") is None
    assert domain_query_name("", "dbl.test") is None
    assert domain_query_name("bad_/name", "dbl.test") is None
    assert domain_query_name("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 60,
                             "dbl.test") is None


def test_zone_codes_and_mask() -> None:
    plain = parse_zone("zen.test")
    assert plain.counts(ipaddress.IPv4Address("127.0.0.20"))
    assert not plain.counts(ipaddress.IPv4Address("127.255.255.254"))  # error code
    assert not plain.counts(ipaddress.IPv4Address("10.0.0.2"))
    ranged = parse_zone({"zone": "zen.test", "codes": ["127.0.0.2-11"]})
    assert [n for n in range(256) if ranged.counts(ipaddress.IPv4Address(f"127.0.0.{n}"))] == (
        list(range(2, 12)))
    masked = parse_zone({"zone": "multi.test", "mask": 8})
    assert [n for n in (2, 4, 8, 12, 64) if masked.counts(ipaddress.IPv4Address(
        f"127.0.0.{n}"))] == [8, 12]


# ------------------------------------------------------------------ early rejection


def test_listed_client_refused_at_connect(gate) -> None:
    app = gate(zones=["zen.test"], reject_at="connect")
    c = proxied(app, "192.0.2.10")
    assert c.greeting == REFUSED
    assert c.cmd("EHLO client.test") == ONLY_QUIT
    assert c.cmd("MAIL FROM:<a@example.org>") == ONLY_QUIT
    assert c.cmd("QUIT").startswith(b"221")
    ok = proxied(app, "192.0.2.99")
    assert ok.greeting.startswith(b"220 ")
    assert envelope(ok) == [b"250 2.1.5 Recipient OK"]


def test_listed_without_txt_has_a_plain_reason(gate) -> None:
    app = gate(zones=["zen.test"], reject_at="connect")
    assert proxied(app, "192.0.2.11").greeting == (
        b"554 5.7.1 Service unavailable; Client host [192.0.2.11] blocked using zen.test")


# ------------------------------------------------------------------ late rejection


def test_late_rejection_lets_postmaster_and_abuse_through(gate) -> None:
    app = gate(zones=["zen.test"], reject_at="rcpt")
    seen = findings(app)
    c = proxied(app, "192.0.2.10")
    assert c.greeting.startswith(b"220 ")  # no refusal at connect
    assert envelope(c, rcpts=("b@example.com", "postmaster@example.com", "Abuse@example.com",
                              "postmaster", "c@example.com")) == [
        REFUSED, b"250 2.1.5 Recipient OK", b"250 2.1.5 Recipient OK",
        b"250 2.1.5 Recipient OK", REFUSED]
    assert c.cmd("DATA").startswith(b"354")
    assert c.cmd("Subject: hi\r\n\r\nhello\r\n.").startswith(b"250 ")
    assert seen[0] == (
        "192.0.2.10", "dnsbl=listed (score=1 threshold=1 zones=zen.test codes=zen.test=127.0.0.2)",
        "dnsbl=listed (score=1 threshold=1 zones=zen.test codes=zen.test=127.0.0.2)")


def test_exempt_recipients_are_configurable(gate) -> None:
    app = gate(zones=["zen.test"], exempt_recipients=["help@example.com"])
    c = proxied(app, "192.0.2.10")
    assert envelope(c, rcpts=("postmaster@example.com", "help@example.com")) == [
        REFUSED, b"250 2.1.5 Recipient OK"]


def test_default_is_late_rejection_with_one_lookup_per_session(gate, dns_server) -> None:
    app = gate(zones=["zen.test"])
    c = proxied(app, "192.0.2.10")
    assert c.greeting.startswith(b"220 ")
    assert envelope(c, rcpts=("b@example.com", "c@example.com")) == [REFUSED, REFUSED]
    assert c.cmd("RSET").startswith(b"250")
    assert c.cmd("MAIL FROM:<x@example.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<b@example.com>") == REFUSED
    assert dns_server.queries.count(("10.2.0.192.zen.test", "A")) == 1
    assert dns_server.queries.count(("10.2.0.192.zen.test", "TXT")) == 1


def test_unlisted_client_and_error_code_pass(gate) -> None:
    app = gate(zones=["zen.test"])
    seen = findings(app)
    for ip in ("192.0.2.99", "192.0.2.12"):
        assert envelope(proxied(app, ip)) == [b"250 2.1.5 Recipient OK"]
    assert [t for _, _, t in seen] == ["dnsbl=clean (score=0 threshold=1)"] * 2


# ------------------------------------------------------------------ exemptions


def test_exempt_networks_and_local_networks(gate, dns_server) -> None:
    app = gate(zones=["zen.test"], reject_at="connect", exempt_networks=["192.0.2.10/32"])
    seen = findings(app)
    c = proxied(app, "192.0.2.10")
    assert c.greeting.startswith(b"220 ")
    assert envelope(c) == [b"250 2.1.5 Recipient OK"]
    local = proxied(app, "10.99.1.2")  # [relay] local_networks
    assert local.greeting.startswith(b"220 ")
    assert envelope(local, rcpts=("x@remote.example",)) == [b"250 2.1.5 Recipient OK"]
    assert dns_server.queries == []
    assert seen == [("192.0.2.10", "dnsbl=exempt (reason=network)",
                     "dnsbl=exempt (reason=network)"),
                    ("10.99.1.2", "dnsbl=exempt (reason=network)",
                     "dnsbl=exempt (reason=network)")]


def test_authenticated_client_is_exempt(gate, tmp_path) -> None:
    users = tmp_path / "users.txt"
    add_user(users, "alice", "s3cret!")
    app = gate(zones=["zen.test"], cfg={"auth": {"users_file": str(users),
                                                 "require_tls": False}})
    c = proxied(app, "192.0.2.10")
    assert c.cmd("EHLO client.test").startswith(b"250")
    assert c.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldCE=").startswith(b"235 2.7.0")
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<b@example.com>") == b"250 2.1.5 Recipient OK"
    other = proxied(app, "192.0.2.10")
    assert envelope(other) == [REFUSED]


# ------------------------------------------------------------------ IPv6


def test_ipv6_client_through_proxy(gate) -> None:
    app = gate(zones=["zen.test"], reject_at="connect")
    assert proxied(app, "2001:db8::10").greeting == (
        b"554 5.7.1 Service unavailable; Client host [2001:db8::10] blocked using zen.test; "
        b"IPv6 client listed (2001:db8::10)")
    assert proxied(app, "2001:db8::11").greeting.startswith(b"220 ")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no ::1 here")
def test_ipv6_client_over_ipv6_loopback(gate) -> None:
    app = gate(zones=["zen.test"], reject_at="connect",
               cfg={"server": {"hostname": "mx.test", "listen": ["[::1]:0"]}})
    c = RawClient(app.port, "::1")
    assert c.greeting == (
        b"554 5.7.1 Service unavailable; Client host [::1] blocked using zen.test")


# ------------------------------------------------------------------ weights, codes


def test_weights_add_up_to_the_threshold(gate) -> None:
    app = gate(zones=[{"zone": "a.test", "weight": 0.5}, {"zone": "b.test", "weight": 0.5}])
    seen = findings(app)
    assert envelope(proxied(app, "192.0.2.20"), rcpts=("b@example.com", "postmaster")) == [
        b"554 5.7.1 Service unavailable; Client host [192.0.2.20] blocked using a.test",
        b"250 2.1.5 Recipient OK"]
    assert envelope(proxied(app, "192.0.2.21")) == [b"250 2.1.5 Recipient OK"]
    assert [t for _, _, t in seen] == [
        "dnsbl=listed (score=1 threshold=1 zones=a.test,b.test "
        "codes=a.test=127.0.0.2,b.test=127.0.0.2)",
        "dnsbl=clean (score=0.5 threshold=1 zones=b.test codes=b.test=127.0.0.2)"]


def test_threshold_option(gate) -> None:
    app = gate(zones=[{"zone": "a.test", "weight": 0.5}, {"zone": "b.test", "weight": 2}],
               threshold=2.5)
    assert envelope(proxied(app, "192.0.2.20")) == [
        b"554 5.7.1 Service unavailable; Client host [192.0.2.20] blocked using b.test"]
    assert envelope(proxied(app, "192.0.2.21")) == [b"250 2.1.5 Recipient OK"]


def test_return_codes_that_count(gate) -> None:
    app = gate(zones=[{"zone": "zen.test", "codes": ["127.0.0.2-11"]}], reject_at="connect")
    assert proxied(app, "192.0.2.11").greeting.startswith(b"554 5.7.1 ")  # 127.0.0.4
    assert proxied(app, "192.0.2.13").greeting.startswith(b"220 ")        # 127.0.0.20


def test_bitmask_zone(gate) -> None:
    app = gate(zones=[{"zone": "multi.test", "mask": 8}], reject_at="connect")
    assert proxied(app, "192.0.2.30").greeting.startswith(b"554 5.7.1 ")  # 127.0.0.8
    assert proxied(app, "192.0.2.31").greeting.startswith(b"220 ")        # 127.0.0.4
    assert proxied(app, "192.0.2.32").greeting.startswith(b"554 5.7.1 ")  # 127.0.0.12


# ------------------------------------------------------------------ RHSBL


def test_rhsbl_on_sender_domain(gate, dns_server) -> None:
    app = gate(zones=["zen.test", {"zone": "dbl.test", "lookup": "sender"}])
    seen = findings(app)
    c = proxied(app, "192.0.2.99")
    assert envelope(c, sender="spammer@Bad.Example", rcpts=("b@example.com", "postmaster")) == [
        b"554 5.7.1 Service unavailable; Sender domain bad.example blocked using dbl.test; "
        b"bad.example is a spam domain", b"250 2.1.5 Recipient OK"]
    assert c.cmd("RSET").startswith(b"250")
    assert c.cmd("MAIL FROM:<ann@good.example>").startswith(b"250")
    assert c.cmd("RCPT TO:<b@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("RSET").startswith(b"250")
    assert c.cmd("MAIL FROM:<>").startswith(b"250")  # null sender: no domain to look up
    assert c.cmd("RCPT TO:<b@example.com>") == b"250 2.1.5 Recipient OK"
    assert seen[0][2] == ("dnsbl=listed (score=1 threshold=1 zones=dbl.test "
                          "codes=dbl.test=127.0.1.2)")
    assert seen[0][1] == "dnsbl=clean (score=0 threshold=1)"  # the client address itself
    assert ("badhelo.example.dbl.test", "A") not in dns_server.queries  # not a helo zone
    assert ("99.2.0.192.dbl.test", "A") not in dns_server.queries        # not an ip zone


def test_rhsbl_on_helo_name(gate) -> None:
    app = gate(zones=[{"zone": "dbl.test", "lookup": ["helo", "sender"]}])
    c = proxied(app, "192.0.2.99")
    assert envelope(c, helo="badhelo.example") == [
        b"554 5.7.1 Service unavailable; Helo name badhelo.example blocked using dbl.test"]


# ------------------------------------------------------------------ DNS failures


@pytest.mark.parametrize("ip", ["192.0.2.40", "192.0.2.41"])  # SERVFAIL, no answer
def test_temporary_dns_failure_never_refuses(gate, ip) -> None:
    app = gate(zones=["zen.test"], reject_at="connect", dns={"timeout": 0.3, "lifetime": 0.6})
    seen = findings(app)
    c = proxied(app, ip)
    assert c.greeting.startswith(b"220 ")
    assert envelope(c) == [b"250 2.1.5 Recipient OK"]
    assert seen == [(ip, "dnsbl=temperror (score=0 threshold=1 temperror=zen.test)",
                     "dnsbl=temperror (score=0 threshold=1 temperror=zen.test)")]


def test_listed_in_one_zone_failing_in_another(gate) -> None:
    app = gate(zones=["zen.test", "b.test"], dns={"timeout": 0.3, "lifetime": 0.6})
    seen = findings(app)
    # 192.0.2.21 is in b.test; zen.test answers it NXDOMAIN: listed.
    assert envelope(proxied(app, "192.0.2.21")) == [
        b"554 5.7.1 Service unavailable; Client host [192.0.2.21] blocked using b.test"]
    # 192.0.2.40: zen.test SERVFAIL, b.test NXDOMAIN: temperror, accepted.
    assert envelope(proxied(app, "192.0.2.40")) == [b"250 2.1.5 Recipient OK"]
    assert seen == [("192.0.2.40", "dnsbl=temperror (score=0 threshold=1 temperror=zen.test)",
                     "dnsbl=temperror (score=0 threshold=1 temperror=zen.test)")]


# ------------------------------------------------------------------ warn mode


def test_warn_mode_refuses_nothing(gate, caplog) -> None:
    app = gate(zones=["zen.test"], reject_at="connect", mode="warn")
    seen = findings(app)
    with caplog.at_level("WARNING", logger="smtpgate.plugins.dnsbl"):
        c = proxied(app, "192.0.2.10")
        assert c.greeting.startswith(b"220 ")
        assert envelope(c) == [b"250 2.1.5 Recipient OK"]
    assert seen[0][1] == ("dnsbl=listed (score=1 threshold=1 zones=zen.test "
                          "codes=zen.test=127.0.0.2 mode=warn)")
    warned = [r.getMessage() for r in caplog.records if "would refuse" in r.getMessage()]
    assert len(warned) == 2  # at connect and at the RCPT
    assert all(REFUSED.decode()[10:] in w and "client=192.0.2.10" in w for w in warned)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(("plugin", "problem"), [
    ({}, "plugin[0].zones: required"),
    ({"zones": []}, "plugin[0].zones: must name at least one zone"),
    ({"zones": ["zen.test"], "reject_at": "data"},
     'plugin[0].reject_at: must be "connect" or "rcpt", got \'data\''),
    ({"zones": ["zen.test"], "mode": "log"},
     'plugin[0].mode: must be "enforce" or "warn", got \'log\''),
    ({"zones": [{"zone": "zen.test", "codes": ["10.0.0.2"]}]},
     "plugin[0].zones[0].codes[0]: must be a 127.0.0.0/8 address, range "
     "(127.0.0.2-127.0.0.11 or 127.0.0.2-11) or CIDR, got '10.0.0.2'"),
    ({"zones": ["zen.test", {"zone": "x.test", "lookup": "mx"}]},
     "plugin[0].zones[1].lookup: must be one or more of ip, sender, helo, got 'mx'"),
    ({"zones": [{"zone": "x.test", "wieght": 2}]},
     "plugin[0].zones[0].wieght: unknown key (known: zone, weight, codes, mask, lookup)"),
    ({"zones": [{"zone": "x.test", "mask": 0}]},
     "plugin[0].zones[0].mask: must be an integer 1..4294967295, got 0"),
    ({"zones": ["not a zone"]}, "plugin[0].zones[0].zone: must be a domain name, "
                                "got 'not a zone'"),
    ({"zones": ["zen.test", "ZEN.test."]}, "plugin[0].zones[1]: zen.test is listed twice"),
    ({"zones": ["zen.test"], "exempt_networks": ["nope"]},
     "plugin[0].exempt_networks[0]: must be an address or CIDR, got 'nope'"),
])
def test_option_errors(plugin: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        Smtpgate({"plugin": [{"use": "dnsbl", **plugin}]})
    assert info.value.problems == [problem]


def test_plugin_does_not_decide_relay(gate) -> None:
    """An exempt recipient still goes through relay control (the plugin only refuses)."""
    app = gate(zones=["zen.test"])
    c = proxied(app, "192.0.2.10")
    assert envelope(c, rcpts=("postmaster@remote.example",)) == [
        b"550 5.7.1 Relaying denied"]


_CACHE_SIZES = iter(range(5000, 6000))


def test_answers_come_from_the_shared_cache(gate, dns_server) -> None:
    """With [dns] cache_size (a distinct size: a resolver of its own), a client seen
    before costs no query in a later session."""
    app = gate(zones=["zen.test", "a.test"], dns={"cache_size": next(_CACHE_SIZES)})
    for _ in range(3):
        assert envelope(proxied(app, "192.0.2.99")) == [b"250 2.1.5 Recipient OK"]
        assert envelope(proxied(app, "192.0.2.10")) == [REFUSED]
    assert sorted(dns_server.queries) == [
        ("10.2.0.192.a.test", "A"), ("10.2.0.192.zen.test", "A"),
        ("10.2.0.192.zen.test", "TXT"), ("99.2.0.192.a.test", "A"),
        ("99.2.0.192.zen.test", "A")]


def test_sender_domain_same_as_helo_is_asked_once(gate, dns_server) -> None:
    app = gate(zones=[{"zone": "dbl.test", "lookup": ["helo", "sender"], "weight": 0.5}])
    seen = findings(app)
    c = proxied(app, "192.0.2.99")
    assert envelope(c, sender="x@bad.example", helo="bad.example") == [
        b"250 2.1.5 Recipient OK"]  # one zone counts once: 0.5 < 1
    assert dns_server.queries == [("bad.example.dbl.test", "A")]
    assert seen[0][2] == ("dnsbl=clean (score=0.5 threshold=1 zones=dbl.test "
                          "codes=dbl.test=127.0.1.2)")

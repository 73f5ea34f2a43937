"""SPF evaluation through the plugin's DNS path (check_spf + the loopback DNS server):
every mechanism, the results, explanations, the processing limits and DNS failures;
the result -> reply mapping and the Received-SPF text."""

from __future__ import annotations

import dns.name
import dns.resolver
import pytest
import spf

from smtpgate.plugins.spf import (
    RESULTS,
    SpfOutcome,
    check_spf,
    install_lookup,
    received_spf,
    reply_for,
)

from .conftest import ThreadedDns


@pytest.mark.parametrize(("ip", "sender", "result", "mechanism"), [
    ("127.0.0.1", "a@pass.test", "pass", "ip4:127.0.0.1"),
    ("192.0.2.77", "a@pass.test", "pass", "ip4:192.0.2.0/24"),
    ("198.51.100.1", "a@pass.test", "fail", "-all"),
    ("198.51.100.1", "a@soft.test", "softfail", "~all"),
    ("198.51.100.1", "a@neutral.test", "neutral", "?all"),
    ("198.51.100.1", "a@nospf.test", "none", ""),
    ("198.51.100.1", "a@nxdomain.test", "none", ""),
    # a, a:domain/cidr, AAAA for IPv6 clients
    ("127.0.0.1", "a@a.test", "pass", "a"),
    ("198.51.100.200", "a@a.test", "pass", "a:other.a.test/24"),
    ("2001:db8::a", "a@a.test", "pass", "a"),
    ("198.51.101.1", "a@a.test", "fail", "-all"),
    # mx (A of the first MX, AAAA of the second)
    ("127.0.0.1", "a@mx.spf.test", "pass", "mx"),
    ("2001:db8::25", "a@mx.spf.test", "pass", "mx"),
    ("192.0.2.1", "a@mx.spf.test", "fail", "-all"),
    # ip6
    ("2001:db8:1:ffff::1", "a@ip6.test", "pass", "ip6:2001:db8:1::/48"),
    ("2001:db8:2::1", "a@ip6.test", "fail", "-all"),
    # include: a neutral include does not match, a pass does
    ("192.0.2.4", "a@include.test", "pass", "include:pass.test"),
    ("198.51.100.9", "a@include.test", "fail", "-all"),
    # redirect: the target's -all applies
    ("198.51.100.1", "a@redirect.test", "pass", "ip4:198.51.100.1"),
    ("198.51.100.2", "a@redirect.test", "fail", "-all"),
    # exists with a macro (%{ir}: reversed address)
    ("192.0.2.1", "a@exists.test", "pass", "exists:%{ir}.allow.exists.test"),
    ("192.0.2.2", "a@exists.test", "fail", "-all"),
    # ptr: validated name (forward lookup confirms) under the domain
    ("192.0.2.5", "a@ptr.test", "pass", "ptr"),
    ("192.0.2.6", "a@ptr.test", "fail", "-all"),
    # a record split over two character strings is joined (RFC 7208 §3.3)
    ("192.0.2.2", "a@split.test", "pass", "ip4:192.0.2.2"),
    # exactly ten lookups is allowed
    ("198.51.100.3", "a@tenlookups.test", "fail", "-all"),
])
def test_mechanisms(resolver: dns.resolver.Resolver, ip: str, sender: str, result: str,
                    mechanism: str) -> None:
    outcome = check_spf(resolver, ip, sender, "client.test")
    assert (outcome.result, outcome.mechanism) == (result, mechanism)
    assert outcome.identity == "mailfrom"
    assert outcome.domain == sender.partition("@")[2]
    assert outcome.client_ip == ip


@pytest.mark.parametrize(("sender", "result", "problem"), [
    ("a@limit.test", "permerror", "Too many DNS lookups"),
    ("a@void.test", "permerror", "Void lookup limit of 2 exceeded"),
    ("a@malformed.test", "permerror", "Invalid IP4 address: ip4:192.0.2.300"),
    ("a@unknownmech.test", "permerror", "Unknown mechanism found: foo:bar"),
    ("a@two.test", "permerror", "Two or more type TXT spf records found."),
    ("a@servfail.test", "temperror", "no server answered"),
    ("a@tempinc.test", "temperror", "no server answered"),
    ("a@timeout.test", "temperror", "DNS timeout"),
    ("a@slow.test", "temperror", "DNS timeout"),
])
def test_errors(resolver: dns.resolver.Resolver, sender: str, result: str,
                problem: str) -> None:
    outcome = check_spf(resolver, "198.51.100.1", sender, "client.test")
    assert outcome.result == result
    assert problem in outcome.problem
    assert outcome.details()["problem"] == outcome.problem


def test_utf8_sender_domain_is_checked_as_a_labels(resolver: dns.resolver.Resolver) -> None:
    outcome = check_spf(resolver, "192.0.2.1", "jörg@bücher.test", "client.test")
    assert (outcome.result, outcome.domain, outcome.sender) == (
        "pass", "xn--bcher-kva.test", "jörg@xn--bcher-kva.test")
    assert check_spf(resolver, "192.0.2.2", "jörg@bücher.test", "client.test").result == \
        "fail"


def test_fail_explanation_from_the_record(resolver: dns.resolver.Resolver) -> None:
    outcome = check_spf(resolver, "198.51.100.1", "a@fail.test", "client.test")
    assert outcome.result == "fail"
    assert outcome.from_record
    assert outcome.explanation == ("Host 198.51.100.1 may not send for fail.test; see "
                                   "https://www.fail.test/spf")
    assert outcome.details() == {"identity": "mailfrom", "domain": "fail.test",
                                 "client_ip": "198.51.100.1",
                                 "explanation": outcome.explanation, "mechanism": "-all"}


def test_fail_without_exp_uses_the_default(resolver: dns.resolver.Resolver) -> None:
    outcome = check_spf(resolver, "198.51.100.1", "a@failnoexp.test", "client.test")
    assert outcome.result == "fail"
    assert not outcome.from_record
    reply = reply_for(outcome, "reject").reply
    assert reply is not None
    assert (reply.code, reply.enhanced, reply.text) == (
        550, "5.7.23", "SPF fail: failnoexp.test does not designate 198.51.100.1 as "
                       "permitted sender")


def test_helo_identity(resolver: dns.resolver.Resolver) -> None:
    outcome = check_spf(resolver, "127.0.0.1", "", "client.test")
    assert (outcome.result, outcome.identity, outcome.domain, outcome.sender) == (
        "pass", "helo", "client.test", "postmaster@client.test")
    outcome = check_spf(resolver, "127.0.0.1", "", "badhelo.test")
    assert (outcome.result, outcome.identity, outcome.explanation) == (
        "fail", "helo", "HELO badhelo.test is not ours")


@pytest.mark.parametrize("helo", ["[127.0.0.1]", "localhost", ""])
def test_helo_not_a_domain_is_none_without_lookups(
        resolver: dns.resolver.Resolver, spf_dns: ThreadedDns, helo: str) -> None:
    before = len(spf_dns.server.queries)
    outcome = check_spf(resolver, "127.0.0.1", "", helo)
    assert (outcome.result, outcome.identity) == ("none", "helo")
    assert len(spf_dns.server.queries) == before


def test_lookups_go_to_the_configured_server_only(
        resolver: dns.resolver.Resolver, spf_dns: ThreadedDns) -> None:
    spf_dns.server.queries.clear()
    check_spf(resolver, "192.0.2.1", "a@include.test", "client.test")
    assert ("include.test", "TXT") in spf_dns.server.queries
    assert ("neutral.test", "TXT") in spf_dns.server.queries


def test_resolver_uses_only_the_configured_nameservers() -> None:
    from smtpgate.config import DnsConfig
    from smtpgate.dns import sync_resolver

    r = sync_resolver(DnsConfig(nameservers=("127.0.0.1:5399", "[::1]:5400"), timeout=2.5,
                                lifetime=7.0, cache_size=0))
    assert [(ns.address, ns.port) for ns in r.nameservers] == [  # type: ignore[union-attr]
        ("127.0.0.1", 5399), ("::1", 5400)]
    assert (r.timeout, r.lifetime, r.cache, r.search, r.domain) == (
        2.5, 7.0, None, [], dns.name.root)


def test_pyspf_keeps_its_own_lookup_outside_the_plugin() -> None:
    install_lookup()
    from smtpgate.plugins import spf as plugin
    assert spf.DNSLookup is plugin._dispatch
    assert getattr(plugin._local, "resolver", None) is None


# --- result -> action mapping ----------------------------------------------------------


def _outcome(result: str, **kw: object) -> SpfOutcome:
    o = SpfOutcome(result, "mailfrom", "example.org", "192.0.2.1", "client.example",
                   "ann@example.org")
    for k, v in kw.items():
        setattr(o, k, v)
    return o


@pytest.mark.parametrize(("result", "action", "code", "enhanced", "text"), [
    ("fail", "reject", 550, "5.7.23", "SPF fail: not you"),
    ("fail", "tempfail", 451, "4.7.23", "SPF fail: not you"),
    ("softfail", "reject", 550, "5.7.23",
     "SPF softfail for mailfrom ann@example.org from 192.0.2.1"),
    ("neutral", "tempfail", 451, "4.7.23",
     "SPF neutral for mailfrom ann@example.org from 192.0.2.1"),
    ("none", "reject", 550, "5.7.23", "SPF none for mailfrom ann@example.org from 192.0.2.1"),
    ("temperror", "tempfail", 451, "4.7.24",
     "SPF temporary error checking example.org, try again later"),
    ("temperror", "reject", 550, "5.7.24",
     "SPF temporary error checking example.org, try again later"),
    ("permerror", "reject", 550, "5.7.24",
     "SPF permanent error in the record of example.org: bad"),
    ("permerror", "tempfail", 451, "4.7.24",
     "SPF permanent error in the record of example.org: bad"),
])
def test_reply_mapping(result: str, action: str, code: int, enhanced: str,
                       text: str) -> None:
    outcome = _outcome(result, explanation="not you", from_record=True, problem="bad")
    hook = reply_for(outcome, action)
    assert hook is not None and hook.reply is not None
    assert (hook.reply.code, hook.reply.enhanced, hook.reply.text) == (code, enhanced, text)


@pytest.mark.parametrize("result", RESULTS)
def test_tag_never_refuses(result: str) -> None:
    assert reply_for(_outcome(result), "tag") is None


def test_received_spf_format() -> None:
    outcome = _outcome("pass", mechanism="ip4:192.0.2.0/24",
                       comment="domain of example.org designates 192.0.2.1 as permitted "
                               "sender")
    assert received_spf(outcome, "mx.example.net") == (
        "pass (mx.example.net: domain of example.org designates 192.0.2.1 as permitted "
        "sender) client-ip=192.0.2.1; envelope-from=\"ann@example.org\"; "
        "helo=client.example; "
        'receiver=mx.example.net; mechanism="ip4:192.0.2.0/24"; identity=mailfrom')
    perm = _outcome("permerror", problem="Unknown mechanism found: foo",
                    comment="permanent error")
    assert received_spf(perm, "mx") == (
        "permerror (mx: permanent error) client-ip=192.0.2.1; "
        'envelope-from="ann@example.org"; '
        'helo=client.example; problem="Unknown mechanism found: foo"; receiver=mx; '
        "identity=mailfrom")

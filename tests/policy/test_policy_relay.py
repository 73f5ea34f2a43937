"""Tests for relay control (smtpgate.policy.relay)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.policy import RelayPolicy, normalize_domain

# ------------------------------------------------------------------ relay domains


def test_exact_vs_leading_dot() -> None:
    p = RelayPolicy(relay_domains=["example.com", ".sub.example.org"], local_networks=())
    assert p.relay_check("user@example.com")
    assert not p.relay_check("user@a.example.com")  # plain entry: exact only
    assert not p.relay_check("user@notexample.com")
    assert p.relay_check("user@a.sub.example.org")
    assert p.relay_check("user@b.a.sub.example.org")
    assert not p.relay_check("user@sub.example.org")  # leading dot: subdomains only
    assert not p.relay_check("user@xsub.example.org")
    assert not p.relay_check("user@example.org")


def test_case_trailing_dot_brackets_and_domains() -> None:
    p = RelayPolicy(relay_domains=["Example.COM"], local_networks=())
    assert p.relay_get() == ["example.com"]
    assert p.relay_check("USER@EXAMPLE.com")
    assert p.relay_check("<user@example.com>")
    assert p.relay_check("example.com")
    assert p.relay_check("user@example.com.")
    assert p.relay_check('"we@ird"@example.com')
    assert not p.relay_check("user@example.com@evil.test")
    assert not p.relay_check("user@")
    assert not p.relay_check("")


def test_idna_unicode_and_alabel_are_equal() -> None:
    p = RelayPolicy(relay_domains=["Bücher.example", ".xn--mnchen-3ya.de"], local_networks=())
    assert p.relay_get() == ["xn--bcher-kva.example", ".xn--mnchen-3ya.de"]
    assert p.relay_check("kunde@xn--bcher-kva.example")
    assert p.relay_check("kunde@BÜCHER.example")
    assert p.relay_check("kunde@bücher\u3002example")  # ideographic full stop
    assert p.relay_check("a@post.münchen.de")
    assert not p.relay_check("a@münchen.de")
    # IDNA2008: ß is not mapped to ss
    assert normalize_domain("faß.de") == "xn--fa-hia.de"
    assert normalize_domain("fass.de") == "fass.de"
    q = RelayPolicy(relay_domains=["fass.de"], local_networks=())
    assert not q.relay_check("x@faß.de")
    # NFC: decomposed ü equals composed ü
    assert p.relay_check("kunde@bu\u0308cher.example")


def test_address_literals() -> None:
    p = RelayPolicy(relay_domains=["[192.0.2.1]", "[IPv6:2001:DB8:0::1]"], local_networks=())
    assert p.relay_get() == ["[192.0.2.1]", "[IPv6:2001:db8::1]"]
    assert p.relay_check("postmaster@[192.0.2.1]")
    assert p.relay_check("postmaster@[ipv6:2001:db8:0:0::1]")
    assert not p.relay_check("postmaster@[192.0.2.2]")
    assert not p.relay_check("postmaster@192.0.2.1")
    assert not p.relay_check("postmaster@[bogus]")


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "   ",
        ".",
        "..",
        "a..b",
        "exa mple.com",
        "user@example.com",
        "*.example.com",
        "-bad.example",
        "[999.1.1.1]",
        "[bogus]",
        "a" * 64 + ".com",
        ".",
        "example.com/24",
    ],
)
def test_invalid_domain_entries(entry: str) -> None:
    p = RelayPolicy(relay_domains=["keep.example"], local_networks=())
    with pytest.raises(ValueError):
        p.relay_add(entry)
    with pytest.raises(ValueError):
        p.relay_set(["ok.example", entry])
    assert p.relay_get() == ["keep.example"]  # all-or-nothing


def test_relay_runtime_api() -> None:
    p = RelayPolicy(local_networks=())
    assert p.relay_get() == []
    assert not p.relay_check("a@example.com")
    p.relay_add("example.com")
    p.relay_add("EXAMPLE.com")  # duplicate ignored
    p.relay_add(".example.net")
    assert p.relay_get() == ["example.com", ".example.net"]
    assert p.relay_check("a@example.com") and p.relay_check("a@x.example.net")
    assert p.relay_delete("Example.Com") is True
    assert p.relay_delete("example.com") is False
    assert p.relay_delete("not valid!") is False
    assert not p.relay_check("a@example.com")
    p.relay_set(["one.example", "two.example", "one.example"])
    assert p.relay_get() == ["one.example", "two.example"]
    assert not p.relay_check("a@x.example.net")
    p.relay_clear()
    assert p.relay_get() == []
    assert not p.relay_check("a@one.example")
    with pytest.raises(TypeError):
        p.relay_set("example.com")


# ----------------------------------------------------------------- local networks


def test_default_local_networks_are_loopback() -> None:
    p = RelayPolicy()
    assert p.local_get() == ["127.0.0.0/8", "::1"]
    assert p.local_check("127.0.0.1") and p.local_check("127.255.0.9")
    assert p.local_check("::1") and p.local_check("[::1]")
    assert p.local_check("::ffff:127.0.0.1")
    assert not p.local_check("::2")
    assert not p.local_check("128.0.0.1")


def test_cidr_v4_v6_and_hosts() -> None:
    p = RelayPolicy(local_networks=["192.0.2.0/24", "198.51.100.7", "2001:db8:1::/48", "fe80::1"])
    assert p.local_check("192.0.2.0") and p.local_check("192.0.2.255")
    assert not p.local_check("192.0.3.0")
    assert p.local_check("198.51.100.7") and not p.local_check("198.51.100.8")
    assert p.local_check("2001:db8:1:ffff::1") and not p.local_check("2001:db8:2::1")
    assert p.local_check("fe80::1%eth0") and not p.local_check("fe80::2")
    assert p.local_check("::ffff:192.0.2.77")
    assert not p.local_check("::ffff:192.0.3.77")
    assert p.local_check("::ffff:c000:201")  # mapped 192.0.2.1 in hex notation
    assert not p.local_check("::c000:201")  # IPv4-compatible (deprecated) is not mapped


def test_mapped_and_bracketed_entries() -> None:
    p = RelayPolicy(local_networks=["::ffff:10.0.0.0/104", "[2001:db8::]/32", "10.9.9.9/8"])
    assert p.local_get() == ["10.0.0.0/8", "2001:db8::/32"]
    assert p.local_check("10.200.1.1") and p.local_check("::ffff:10.1.1.1")
    assert p.local_check("2001:db8:ffff::1")


@pytest.mark.parametrize(
    "entry", ["", " ", "localhost", "10.0.0.0/33", "1.2.3", "::1/129", "[::1", "10.0.0.0/8x"]
)
def test_invalid_network_entries(entry: str) -> None:
    p = RelayPolicy(local_networks=["192.0.2.0/24"])
    with pytest.raises(ValueError):
        p.local_add(entry)
    with pytest.raises(ValueError):
        p.local_set(["10.0.0.0/8", entry])
    assert p.local_get() == ["192.0.2.0/24"]


def test_local_runtime_api() -> None:
    p = RelayPolicy(local_networks=())
    assert p.local_get() == []
    assert not p.local_check("127.0.0.1")
    p.local_add("10.0.0.0/8")
    p.local_add("10.1.2.3/8")  # same network after masking: duplicate
    p.local_add("::1/128")
    assert p.local_get() == ["10.0.0.0/8", "::1"]
    assert p.local_check("10.4.5.6") and p.local_check("::1")
    assert p.local_delete("::1") is True
    assert p.local_delete("::1") is False
    assert p.local_delete("nonsense") is False
    assert not p.local_check("::1")
    p.local_set(["192.0.2.1", "2001:db8::/64"])
    assert p.local_get() == ["192.0.2.1", "2001:db8::/64"]
    assert not p.local_check("10.4.5.6")
    p.local_clear()
    assert p.local_get() == [] and not p.local_check("192.0.2.1")
    with pytest.raises(TypeError):
        p.local_set("10.0.0.0/8")


@given(
    nets=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), min_size=0, max_size=12
    ),
    probes=st.lists(st.integers(0, 2**32 - 1), max_size=20),
)
def test_local_check_agrees_with_ipaddress_v4(
    nets: list[tuple[int, int]], probes: list[int]
) -> None:
    networks = [ipaddress.IPv4Network((a, n), strict=False) for a, n in nets]
    p = RelayPolicy(local_networks=[str(n) for n in networks])
    for value in probes + [int(n.network_address) for n in networks]:
        addr = ipaddress.IPv4Address(value)
        assert p.local_check(str(addr)) == any(addr in n for n in networks)
        assert p.local_check(f"::ffff:{addr}") == any(addr in n for n in networks)


@given(
    nets=st.lists(st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)), max_size=8),
    probes=st.lists(st.integers(0, 2**128 - 1), max_size=20),
)
def test_local_check_agrees_with_ipaddress_v6(
    nets: list[tuple[int, int]], probes: list[int]
) -> None:
    networks = [ipaddress.IPv6Network((a, n), strict=False) for a, n in nets]
    networks = [n for n in networks if not (n.prefixlen >= 96 and n.network_address.ipv4_mapped)]
    p = RelayPolicy(local_networks=[str(n) for n in networks])
    for value in probes + [int(n.broadcast_address) for n in networks]:
        addr = ipaddress.IPv6Address(value)
        if addr.ipv4_mapped is not None:
            continue
        assert p.local_check(str(addr)) == any(addr in n for n in networks)


# ------------------------------------------------------------------------ verdict


def test_empty_policy_is_never_an_open_relay() -> None:
    p = RelayPolicy(relay_domains=(), local_networks=())
    for client in ("127.0.0.1", "::1", "192.0.2.1", "", "garbage"):
        for rcpt in ("a@example.com", "a@localhost", "a@[127.0.0.1]", "a@"):
            assert p.may_relay(client, None, rcpt) is False
            assert p.may_relay(client, "", rcpt) is False
            assert p.may_relay(client, "alice", rcpt) is True


def test_may_relay_rules() -> None:
    p = RelayPolicy(relay_domains=["example.com"], local_networks=["192.0.2.0/24"])
    outsider = "203.0.113.5"
    assert p.may_relay(outsider, None, "user@example.com")  # relay domain: from anyone
    assert not p.may_relay(outsider, None, "user@elsewhere.test")
    assert p.may_relay("192.0.2.9", None, "user@elsewhere.test")  # local network
    assert p.may_relay("::ffff:192.0.2.9", None, "user@elsewhere.test")
    assert p.may_relay(outsider, "bob", "user@elsewhere.test")  # authenticated
    assert p.may_relay(outsider, None, "postmaster")  # RFC 5321 §4.5.1, no domain
    assert p.may_relay(outsider, None, "Postmaster")
    assert not p.may_relay(outsider, None, "")
    assert not p.may_relay(outsider, None, "   ")


def test_untrusted_routing_is_denied_by_default() -> None:
    p = RelayPolicy(relay_domains=["example.com"], local_networks=["192.0.2.0/24"])
    outsider = "203.0.113.5"
    for rcpt in (
        "user%victim.test@example.com",
        "victim.test!user@example.com",
        '"user@victim.test"@example.com',
        "user%victim.test",
        "host!user",
    ):
        assert not p.may_relay(outsider, None, rcpt), rcpt
        assert p.may_relay("192.0.2.1", None, rcpt)
        assert p.may_relay(outsider, "alice", rcpt)
    lax = RelayPolicy(relay_domains=["example.com"], allow_untrusted_routing=True)
    assert lax.may_relay(outsider, None, "user%victim.test@example.com")


@given(
    client=st.text(max_size=60), user=st.none() | st.text(max_size=10), rcpt=st.text(max_size=80)
)
def test_may_relay_never_raises(client: str, user: str | None, rcpt: str) -> None:
    p = RelayPolicy(relay_domains=["example.com", ".example.net", "[192.0.2.1]"])
    assert isinstance(p.may_relay(client, user, rcpt), bool)
    assert isinstance(p.relay_check(rcpt), bool)
    assert isinstance(p.local_check(client), bool)
    assert isinstance(normalize_domain(rcpt), str)


@given(client=st.text(max_size=60), rcpt=st.text(max_size=80))
def test_empty_policy_denies_anything_with_a_domain(client: str, rcpt: str) -> None:
    p = RelayPolicy(relay_domains=(), local_networks=())
    if "@" in rcpt:
        assert p.may_relay(client, None, rcpt) is False


@given(client=st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(str))
def test_invalid_or_remote_clients_not_local(client: str) -> None:
    p = RelayPolicy()
    expected = ipaddress.ip_address(client)
    if isinstance(expected, ipaddress.IPv6Address) and expected.ipv4_mapped:
        expected = expected.ipv4_mapped
    assert p.local_check(client) == expected.is_loopback

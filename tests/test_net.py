"""One client-address normaliser (smtpgate.net): the forms a socket, a PROXY header or an
address literal give for one client compare equal."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.net import client_key, parse_client_ip


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "192.0.2.1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("[IPv6:2001:db8:0::1]", "2001:db8::1"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_address_forms_are_one_client(a: str, b: str) -> None:
    assert client_key(a) == client_key(b)
    assert parse_client_ip(a) == parse_client_ip(b)


def test_non_ip_peers_are_kept_verbatim() -> None:
    assert client_key("unix:/run/smtpgate.sock") == "unix:/run/smtpgate.sock"
    assert client_key("") == ""
    assert parse_client_ip("not an address") is None


@given(st.ip_addresses())
def test_canonical_text_round_trips(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    key = client_key(str(addr))
    assert parse_client_ip(key) == parse_client_ip(str(addr))
    assert client_key(key) == key

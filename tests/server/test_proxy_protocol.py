"""Unit tests of the sans-IO PROXY protocol parser (HAProxy proxy-protocol.txt §2.1, §2.2)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.server.proxy_protocol import (
    MAX_HEADER_SIZE,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyInfo,
    ProxyProtocolError,
    crc32c,
    parse_proxy_header,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


# ----------------------------------------------------------------------------- encoders
# Written from the spec independently of the parser, so round trips test something.


def v2(
    cmd: int = 1,
    fam: int = 0x11,
    addr: bytes = b"",
    tlvs: bytes = b"",
    *,
    ver: int = 2,
    length: int | None = None,
) -> bytes:
    body = addr + tlvs
    n = len(body) if length is None else length
    return SIG + bytes([(ver << 4) | cmd, fam]) + struct.pack("!H", n) + body


def inet4(src: str, dst: str, sp: int, dp: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sp, dp)


def inet6(src: str, dst: str, sp: int, dp: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", sp, dp)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def with_crc(header_without_crc_tlv: bytes) -> bytes:
    """Append a CRC32C TLV (§2.2.3) and fix the length and checksum."""
    h = bytearray(header_without_crc_tlv + tlv(0x03, b"\0\0\0\0"))
    struct.pack_into("!H", h, 14, len(h) - 16)
    struct.pack_into("!I", h, len(h) - 4, crc32c(bytes(h)))
    return bytes(h)


# ----------------------------------------------------------------------------- v1, valid

V1_VALID: list[tuple[bytes, ProxyInfo]] = [
    (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyInfo(1, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443), {}),
    ),
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyInfo(1, "PROXY", ("255.255.255.255", 65535), ("255.255.255.255", 65535), {}),
    ),
    (
        b"PROXY TCP4 0.0.0.0 10.0.0.0 0 0\r\n",
        ProxyInfo(1, "PROXY", ("0.0.0.0", 0), ("10.0.0.0", 0), {}),
    ),
    (
        b"PROXY TCP6 2001:db8::1 2001:DB8:0:0:0:0:0:2 1 25\r\n",
        ProxyInfo(1, "PROXY", ("2001:db8::1", 1), ("2001:db8::2", 25), {}),
    ),
    (  # IPv4-mapped IPv6 stays IPv6 (inet_ntop form)
        b"PROXY TCP6 ::ffff:192.0.2.7 ::1 40000 25\r\n",
        ProxyInfo(1, "PROXY", ("::ffff:192.0.2.7", 40000), ("::1", 25), {}),
    ),
    (  # any spelling of a mapped address comes out in one form
        b"PROXY TCP6 ::FFFF:C000:207 0:0:0:0:0:ffff:c000:208 1 2\r\n",
        ProxyInfo(1, "PROXY", ("::ffff:192.0.2.7", 1), ("::ffff:192.0.2.8", 2), {}),
    ),
    (  # the 104-byte IPv6 maximum
        b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
        ProxyInfo(
            1,
            "PROXY",
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            {},
        ),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyInfo(1, "LOCAL", None, None, {})),
    (  # §2.1: anything after UNKNOWN up to the CRLF is ignored; 107-byte worst case
        b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
        ProxyInfo(1, "LOCAL", None, None, {}),
    ),
    (b"PROXY UNKNOWN whatever ~!@ 1\r\n", ProxyInfo(1, "LOCAL", None, None, {})),
]


@pytest.mark.parametrize(("header", "expected"), V1_VALID)
def test_v1_valid(header: bytes, expected: ProxyInfo) -> None:
    assert len(header) <= V1_MAX_LENGTH
    assert parse_proxy_header(header + b"EHLO x\r\n") == (expected, len(header))


def test_v1_max_lengths() -> None:
    assert len(V1_VALID[6][0]) == 104
    assert len(V1_VALID[8][0]) == 107


# ----------------------------------------------------------------------------- v1, invalid

V1_INVALID: list[bytes] = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",  # LF alone
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\r\n",  # CR before CRLF
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r443\r\n",  # CR inside
    b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",  # two spaces
    b"PROXY  TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",  # trailing space
    b"PROXY TCP4\t192.168.0.1 192.168.0.11 56324 443\r\n",  # tab
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",  # missing field
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 1\r\n",  # extra field
    b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n",  # case
    b"PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY \r\n",
    b"PROXY\r\n",
    b"proxy TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b" PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n",  # heading zero
    b"PROXY TCP4 192.168.0.256 192.168.0.11 56324 443\r\n",
    b"PROXY TCP4 192.168.0 192.168.0.11 56324 443\r\n",
    b"PROXY TCP4 192.168.0.1.5 192.168.0.11 56324 443\r\n",
    b"PROXY TCP4 +1.2.3.4 192.168.0.11 56324 443\r\n",
    b"PROXY TCP4 localhost 192.168.0.11 56324 443\r\n",
    b"PROXY TCP4 ::1 192.168.0.11 56324 443\r\n",  # wrong family
    b"PROXY TCP6 192.168.0.1 ::1 56324 443\r\n",
    b"PROXY TCP6 ::1 192.168.0.1 56324 443\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 56324 443\r\n",  # scope id
    b"PROXY TCP6 1::2::3 ::1 56324 443\r\n",
    b"PROXY TCP6 12345::1 ::1 56324 443\r\n",
    b"PROXY TCP6 ::ffff:192.0.2.07 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 443\r\n",  # port range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 0443 443\r\n",  # heading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 00 443\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 443\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 443\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 443\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 443\r\n",  # non-ASCII digit
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 443\x00\r\n",
    b"PROXY UNKNOWN \xff\r\n",  # even UNKNOWN must be printable ASCII
    b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",  # 108 bytes
    b"EHLO client.example\r\n",
    b"GET / HTTP/1.1\r\n",
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
]


@pytest.mark.parametrize("header", V1_INVALID)
def test_v1_invalid(header: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(header)


def test_v1_too_long_without_crlf() -> None:
    data = b"PROXY UNKNOWN " + b"a" * (V1_MAX_LENGTH - 14)
    assert len(data) == V1_MAX_LENGTH
    assert parse_proxy_header(data[:-1]) is None
    with pytest.raises(ProxyProtocolError, match="107"):
        parse_proxy_header(data)


@pytest.mark.parametrize(
    ("prefix", "outcome"),
    [
        (b"P", None),
        (b"PROXY", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", None),  # CR may be the start of CRLF
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx", ProxyProtocolError),
        (b"PROXY TCP4 1.2.3.4\n", ProxyProtocolError),  # rejected before any CRLF
        (b"PROXY \x80", ProxyProtocolError),
        (b"PROXX", ProxyProtocolError),
        (b"PROXYT", ProxyProtocolError),
        (b"E", ProxyProtocolError),
        (b"", None),
    ],
)
def test_v1_early_decision(prefix: bytes, outcome: type[Exception] | None) -> None:
    if outcome is None:
        assert parse_proxy_header(prefix) is None
    else:
        with pytest.raises(outcome):
            parse_proxy_header(prefix)


# ----------------------------------------------------------------------------- v2, valid

V2_VALID: list[tuple[bytes, ProxyInfo]] = [
    (
        v2(1, 0x11, inet4("192.0.2.1", "198.51.100.2", 40000, 25)),
        ProxyInfo(2, "PROXY", ("192.0.2.1", 40000), ("198.51.100.2", 25), {}),
    ),
    (
        v2(1, 0x12, inet4("192.0.2.1", "198.51.100.2", 0, 65535)),
        ProxyInfo(2, "PROXY", ("192.0.2.1", 0), ("198.51.100.2", 65535), {}),
    ),
    (
        v2(1, 0x21, inet6("2001:db8::1", "2001:db8::2", 1, 587)),
        ProxyInfo(2, "PROXY", ("2001:db8::1", 1), ("2001:db8::2", 587), {}),
    ),
    (
        v2(1, 0x21, inet6("::ffff:192.0.2.9", "::1", 1234, 25)),
        ProxyInfo(2, "PROXY", ("::ffff:192.0.2.9", 1234), ("::1", 25), {}),
    ),
    (
        v2(1, 0x22, inet6("::", "::", 0, 0)),
        ProxyInfo(2, "PROXY", ("::", 0), ("::", 0), {}),
    ),
    (  # AF_UNIX: no IP, use the real peer
        v2(1, 0x31, b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")),
        ProxyInfo(2, "PROXY", None, None, {}),
    ),
    (v2(1, 0x32, b"\0" * 216), ProxyInfo(2, "PROXY", None, None, {})),
    (v2(1, 0x00), ProxyInfo(2, "PROXY", None, None, {})),  # AF_UNSPEC
    (v2(0, 0x00), ProxyInfo(2, "LOCAL", None, None, {})),  # health check
    (  # LOCAL: the whole block is skipped, whatever it holds
        v2(0, 0x11, inet4("1.2.3.4", "5.6.7.8", 1, 2) + b"\xff\xff"),
        ProxyInfo(2, "LOCAL", None, None, {}),
    ),
    (v2(0, 0x01, b"junk"), ProxyInfo(2, "LOCAL", None, None, {})),
    (  # TLVs: ALPN, authority, unique id, SSL (raw, with sub-TLVs), NOOP dropped
        v2(
            1,
            0x11,
            inet4("10.1.2.3", "10.0.0.1", 5555, 25),
            tlv(0x01, b"smtp")
            + tlv(0x02, b"mx.example")
            + tlv(0x04, b"")
            + tlv(0x04, b"pad")
            + tlv(0x05, b"\x01" * 128)
            + tlv(0x20, b"\x01\0\0\0\0" + tlv(0x21, b"TLSv1.3"))
            + tlv(0xE0, b""),
        ),
        ProxyInfo(
            2,
            "PROXY",
            ("10.1.2.3", 5555),
            ("10.0.0.1", 25),
            {
                0x01: b"smtp",
                0x02: b"mx.example",
                0x05: b"\x01" * 128,
                0x20: b"\x01\0\0\0\0" + tlv(0x21, b"TLSv1.3"),
                0xE0: b"",
            },
        ),
    ),
    (  # TLVs after AF_UNSPEC addresses (none)
        v2(1, 0x00, b"", tlv(0x02, b"a")),
        ProxyInfo(2, "PROXY", None, None, {0x02: b"a"}),
    ),
]


@pytest.mark.parametrize(("header", "expected"), V2_VALID)
def test_v2_valid(header: bytes, expected: ProxyInfo) -> None:
    assert parse_proxy_header(header + b"EHLO x\r\n") == (expected, len(header))
    assert parse_proxy_header(header, allow_v1=False) == (expected, len(header))


def test_v2_crc32c_checked() -> None:
    base = v2(1, 0x11, inet4("192.0.2.1", "192.0.2.2", 1000, 25), tlv(0x02, b"x"))
    good = with_crc(base)
    info, n = parse_proxy_header(good) or (None, 0)
    assert info is not None and n == len(good)
    assert info.tlvs[0x03] == good[-4:] and info.tlvs[0x02] == b"x"
    bad = bytearray(good)
    bad[20] ^= 1  # flip a bit of the address block
    with pytest.raises(ProxyProtocolError, match="CRC32C"):
        parse_proxy_header(bytes(bad))
    short = v2(1, 0x11, inet4("192.0.2.1", "192.0.2.2", 1000, 25), tlv(0x03, b"\0\0\0"))
    with pytest.raises(ProxyProtocolError, match="4 bytes"):
        parse_proxy_header(short)


def test_crc32c_known_vector() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4 check value
    assert crc32c(b"") == 0


# ----------------------------------------------------------------------------- v2, invalid

ADDR4 = inet4("192.0.2.1", "192.0.2.2", 1, 2)

V2_INVALID: list[tuple[bytes, str]] = [
    (v2(1, 0x11, ADDR4, ver=1), "version"),
    (v2(1, 0x11, ADDR4, ver=3), "version"),
    (v2(2, 0x11, ADDR4), "command"),
    (v2(0xF, 0x11, ADDR4), "command"),
    (v2(1, 0x41, ADDR4), "family"),
    (v2(0, 0x41), "family"),  # nibbles are checked even for LOCAL
    (v2(1, 0x13, ADDR4), "transport"),
    (v2(1, 0x10, ADDR4), "family/transport"),  # INET without transport
    (v2(1, 0x01, ADDR4), "family/transport"),
    (v2(1, 0x11, ADDR4[:11]), "shorter"),  # length below the address block
    (v2(1, 0x21, inet6("::1", "::1", 1, 2)[:35]), "shorter"),
    (v2(1, 0x31, b"\0" * 215), "shorter"),
    (v2(1, 0x11, ADDR4, b"\x01\x00"), "truncated TLV"),
    (v2(1, 0x11, ADDR4, b"\x01\x00\x05abcd"), "overruns"),
    (v2(1, 0x11, ADDR4, tlv(0x02, b"a") + tlv(0x02, b"b")), "twice"),
    (SIG[:11] + b"X" + b"\x21\x11\x00\x0c" + ADDR4, "not a PROXY"),
]


@pytest.mark.parametrize(("header", "message"), V2_INVALID)
def test_v2_invalid(header: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(header)


def test_v2_length_is_announced_before_the_body() -> None:
    header = v2(1, 0x11, ADDR4, tlv(0x02, b"z" * 1000))
    for n in (0, 1, 11, 12, 13, 14, 15, 16, 27, len(header) - 1):
        assert parse_proxy_header(header[:n]) is None, n
    assert parse_proxy_header(header) is not None


def test_v2_bad_bytes_rejected_before_the_header_is_complete() -> None:
    # ver/cmd and family bytes are judged as soon as they arrive
    with pytest.raises(ProxyProtocolError, match="version"):
        parse_proxy_header(SIG + b"\x11")
    with pytest.raises(ProxyProtocolError, match="family"):
        parse_proxy_header(SIG + b"\x21\x51")
    with pytest.raises(ProxyProtocolError, match="shorter"):
        parse_proxy_header(SIG + b"\x21\x21\x00\x10")


def test_v2_maximum_size() -> None:
    header = v2(1, 0x11, ADDR4, tlv(0xE0, b"\0" * (0xFFFF - 12 - 3)))
    assert len(header) == MAX_HEADER_SIZE
    assert parse_proxy_header(header[:-1]) is None
    result = parse_proxy_header(header + b"QUIT\r\n")
    assert result is not None and result[1] == MAX_HEADER_SIZE
    assert result[0].tlvs[0xE0] == b"\0" * (0xFFFF - 15)


# ----------------------------------------------------------------------------- versions


def test_version_switches() -> None:
    one = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    two = v2(1, 0x11, ADDR4)
    with pytest.raises(ProxyProtocolError, match="v2 header"):
        parse_proxy_header(one, allow_v1=False)
    with pytest.raises(ProxyProtocolError, match="v1 header"):
        parse_proxy_header(two, allow_v2=False)
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(b"\r", allow_v2=False)
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(b"P", allow_v1=False)
    assert parse_proxy_header(b"P", allow_v2=False) is None
    assert parse_proxy_header(b"\r\n", allow_v1=False) is None
    with pytest.raises(ValueError):
        parse_proxy_header(one, allow_v1=False, allow_v2=False)


def test_error_message_does_not_echo_much() -> None:
    with pytest.raises(ProxyProtocolError) as exc:
        parse_proxy_header(b"AUTH PLAIN czNjcjN0\r\n")
    assert "czNj" not in str(exc.value) and "AUTH PLA" in str(exc.value)


def test_signature_constant() -> None:
    assert V2_SIGNATURE == SIG and len(SIG) == 12


# ----------------------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_arbitrary_bytes_only_raise_proxy_protocol_error(
    data: bytes, allow_v1: bool, allow_v2: bool
) -> None:
    if not (allow_v1 or allow_v2):
        allow_v1 = True
    try:
        result = parse_proxy_header(data, allow_v1=allow_v1, allow_v2=allow_v2)
    except ProxyProtocolError:
        return
    if result is not None:
        info, n = result
        assert 0 < n <= len(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([b"PROXY ", SIG]), st.binary(max_size=300))
def test_arbitrary_bytes_after_a_signature(prefix: bytes, rest: bytes) -> None:
    try:
        result = parse_proxy_header(prefix + rest)
    except ProxyProtocolError:
        return
    if result is not None:
        assert result[1] <= len(prefix + rest)
        assert result[1] <= (V1_MAX_LENGTH if prefix == b"PROXY " else MAX_HEADER_SIZE)


def text(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The expected text: IPv4-mapped IPv6 in inet_ntop form (str() varies by Python)."""
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return f"::ffff:{a.ipv4_mapped}"
    return str(a)


ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.tuples(st.just(4), ipv4, ipv4),
        st.tuples(st.just(6), ipv6, ipv6),
    ),
    ports,
    ports,
    st.binary(max_size=20),
)
def test_v1_round_trip(
    addrs: tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address
                 | ipaddress.IPv6Address],
    sp: int,
    dp: int,
    rest: bytes,
) -> None:
    fam, src, dst = addrs
    header = f"PROXY TCP{fam} {src} {dst} {sp} {dp}\r\n".encode()
    result = parse_proxy_header(header + rest)
    assert result == (ProxyInfo(1, "PROXY", (text(src), sp), (text(dst), dp), {}), len(header))
    # every strict prefix asks for more bytes
    for n in range(len(header)):
        assert parse_proxy_header(header[:n]) is None


tlv_types = st.integers(0, 255).filter(lambda t: t not in (0x03, 0x04))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.tuples(st.just(0x11), ipv4, ipv4),
        st.tuples(st.just(0x12), ipv4, ipv4),
        st.tuples(st.just(0x21), ipv6, ipv6),
        st.tuples(st.just(0x22), ipv6, ipv6),
    ),
    ports,
    ports,
    st.dictionaries(tlv_types, st.binary(max_size=40), max_size=5),
    st.booleans(),
    st.binary(max_size=20),
)
def test_v2_round_trip(
    addrs: tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address
                 | ipaddress.IPv6Address],
    sp: int,
    dp: int,
    tlvs: dict[int, bytes],
    crc: bool,
    rest: bytes,
) -> None:
    fam, src, dst = addrs
    addr = src.packed + dst.packed + struct.pack("!HH", sp, dp)
    header = v2(1, fam, addr, b"".join(tlv(k, v) for k, v in tlvs.items()))
    expected_tlvs = dict(tlvs)
    if crc:
        header = with_crc(header)
        expected_tlvs[0x03] = header[-4:]
    result = parse_proxy_header(header + rest)
    assert result == (
        ProxyInfo(2, "PROXY", (text(src), sp), (text(dst), dp), expected_tlvs),
        len(header),
    )
    for n in range(len(header)):
        assert parse_proxy_header(header[:n]) is None


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(
        [h for h, _ in V1_VALID] + [h for h, _ in V2_VALID] + [with_crc(v2(1, 0x11, ADDR4))]
    ),
    st.data(),
)
def test_mutated_headers_only_raise_proxy_protocol_error(header: bytes, data: st.DataObject) -> None:
    buf = bytearray(header)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        result = parse_proxy_header(bytes(buf[:cut]))
    except ProxyProtocolError:
        return
    if result is not None:
        assert result[1] <= cut

"""Sans-IO parser for the HAProxy PROXY protocol header, versions 1 and 2.

Entry points: :func:`parse_proxy_header`, :class:`ProxyInfo`, :class:`ProxyProtocolError`.
Implements "The PROXY protocol, Versions 1 & 2" (HAProxy doc/proxy-protocol.txt, 2020/03/05):
§2.1 human-readable v1 header, §2.2 binary v2 header, §2.2.1-2.2.8 TLVs (CRC32C checked).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import struct
from dataclasses import dataclass, field

log = logging.getLogger("smtpgate.server.proxy_protocol")

__all__ = [
    "MAX_HEADER_SIZE",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyInfo",
    "ProxyProtocolError",
    "parse_proxy_header",
]

#: §2.1: a v1 line, CRLF included, is at most 107 bytes.
V1_MAX_LENGTH = 107
#: §2.2: the 12-byte v2 signature.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: §2.2: the fixed part of a v2 header (signature, ver/cmd, fam, len).
V2_FIXED_LENGTH = 16
#: §2.2: a v2 header is 16 bytes plus a 16-bit length, so at most 65551 bytes.
MAX_HEADER_SIZE = V2_FIXED_LENGTH + 0xFFFF

# §2.2.* TLV types this module interprets.
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04

_V1_PREFIX = b"PROXY "
# §2.2: the address block length of each (family, transport) byte of a PROXY command.
_V2_ADDRESS_LENGTH = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
# §2.1: decimal without heading zeroes.
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
# §2.1: hex groups and colons; a trailing dotted quad (as inet_ntop writes ::ffff:a.b.c.d).
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:]{2,39}|[0-9A-Fa-f:]{2,29}[0-9.]{7,15}")


class ProxyProtocolError(ValueError):
    """The bytes at the start of the connection are not a valid PROXY protocol header.

    The server must close the connection without answering (§2.1: "Any sequence which
    does not exactly match the protocol must be discarded and cause the receiver to abort
    the connection"). The message describes the problem; it never contains the header bytes
    beyond a short, printable excerpt.
    """


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What a PROXY protocol header reported about the proxied connection.

    Attributes:
        version: 1 (text header, §2.1) or 2 (binary header, §2.2).
        command: ``"PROXY"`` (the connection was relayed for a client) or ``"LOCAL"``
            (v2 LOCAL, or v1 ``UNKNOWN``: the proxy's own connection, e.g. a health check).
        source: ``(ip, port)`` of the client as seen by the proxy; ``None`` when the
            header carries no usable address (LOCAL, v1 UNKNOWN, v2 AF_UNSPEC or AF_UNIX):
            then the real peer address of the socket is the client address.
            IPs are in ``ipaddress`` canonical text form; IPv4-mapped IPv6 addresses are
            kept as IPv6 (``"::ffff:192.0.2.1"``).
        destination: ``(ip, port)`` the client connected to, ``None`` as for ``source``.
        tlvs: v2 Type-Length-Value extensions by type, values raw (e.g. ``0x01`` ALPN,
            ``0x02`` authority/SNI, ``0x05`` unique id, ``0x20`` SSL info with sub-TLVs);
            NOOP (``0x04``) padding is dropped; always empty for v1 and LOCAL.
    """

    version: int
    command: str
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: dict[int, bytes] = field(default_factory=dict)


def _excerpt(data: bytes, limit: int = 40) -> str:
    """A short, printable excerpt of untrusted bytes for an error message."""
    text = data[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text + ("..." if len(data) > limit else "")


def parse_proxy_header(
    data: bytes, *, allow_v1: bool = True, allow_v2: bool = True
) -> tuple[ProxyInfo, int] | None:
    """Parse a PROXY protocol header at the start of a connection's received bytes.

    Call it with everything received so far, each time more arrives, until it returns a
    result or raises. It never reads past the header: the bytes after ``consumed`` belong
    to the proxied protocol (SMTP) and must be fed to it.

    Args:
        data: the bytes received so far on the connection, from the first one.
        allow_v1: accept the text header (§2.1).
        allow_v2: accept the binary header (§2.2).

    Returns:
        ``None`` when ``data`` is a valid beginning of a header but incomplete (read more);
        otherwise ``(info, consumed)``: the parsed header and its length in bytes.
        At most :data:`V1_MAX_LENGTH` (107) bytes are needed for v1 and 16 + the announced
        length (at most :data:`MAX_HEADER_SIZE`, 65551) for v2; once more than that
        arrived without a complete header, this raises instead of returning ``None``.

    Raises:
        ProxyProtocolError: ``data`` does not start with a valid, allowed PROXY header
            (wrong signature, bad syntax, bad address or port, unknown v2 version, command,
            family or transport, inconsistent lengths, malformed TLVs, CRC32C mismatch).
            Raised as soon as the bytes so far cannot begin a valid header (§2.1: abort
            as soon as possible).
        ValueError: both versions are disabled (a programming error).
    """
    if not (allow_v1 or allow_v2):
        raise ValueError("parse_proxy_header: at least one PROXY protocol version must be allowed")
    if not data:
        return None
    if allow_v2 and (data.startswith(V2_SIGNATURE) or V2_SIGNATURE.startswith(data)):
        return _parse_v2(data)
    if allow_v1 and (data.startswith(_V1_PREFIX) or _V1_PREFIX.startswith(data)):
        return _parse_v1(data)
    allowed = " or ".join(v for v, ok in (("v1", allow_v1), ("v2", allow_v2)) if ok)
    # Only a few bytes are shown: whatever a misdirected client sent (say ``AUTH PLAIN
    # <credentials>``) must not end up in the logs.
    raise ProxyProtocolError(f"not a PROXY protocol {allowed} header: {_excerpt(data, 8)!r}")


# --------------------------------------------------------------------------- version 1


def _parse_v1(data: bytes) -> tuple[ProxyInfo, int] | None:
    """§2.1: one US-ASCII line, single spaces, CRLF, at most 107 bytes."""
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    head = data[:V1_MAX_LENGTH] if end < 0 else data[:end]
    # Anything that can never become part of a valid line fails at once (§2.1: "abort
    # the connection as soon as possible"); a single CR or LF never ends the line.
    for i, byte in enumerate(head):
        if byte == 0x0D and (end >= 0 or i + 1 < len(data)):
            raise ProxyProtocolError("PROXY v1: bare CR in the header line")
        if byte == 0x0A:
            raise ProxyProtocolError("PROXY v1: bare LF in the header line")
        if (byte < 0x20 or byte > 0x7E) and byte != 0x0D:
            raise ProxyProtocolError("PROXY v1: header line is not printable US-ASCII")
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(
                f"PROXY v1: no CRLF within the first {V1_MAX_LENGTH} bytes"
            )
        return None
    line = data[:end]
    consumed = end + 2
    parts = line.split(b" ")
    proto = parts[1] if len(parts) > 1 else b""
    if proto == b"UNKNOWN":
        # §2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyInfo(1, "LOCAL", None, None, {}), consumed
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(
            f"PROXY v1: protocol must be TCP4, TCP6 or UNKNOWN, got {_excerpt(proto, 10)!r}"
        )
    if len(parts) != 6:
        raise ProxyProtocolError(
            "PROXY v1: expected 'PROXY TCP4|TCP6 src dst sport dport' with single spaces"
        )
    src = _v1_address(parts[2], proto)
    dst = _v1_address(parts[3], proto)
    sport = _v1_port(parts[4])
    dport = _v1_port(parts[5])
    return ProxyInfo(1, "PROXY", (src, sport), (dst, dport), {}), consumed


def _v1_address(text: bytes, proto: bytes) -> str:
    """§2.1: a canonical address of the family named by ``proto`` (TCP4 / TCP6)."""
    pattern = _V1_IPV4 if proto == b"TCP4" else _V1_IPV6
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        if not pattern.fullmatch(text):
            raise ValueError(text)
        ascii_text = text.decode("ascii")
        if proto == b"TCP4":
            addr = ipaddress.IPv4Address(ascii_text)
        else:
            addr = ipaddress.IPv6Address(ascii_text)
    except ValueError:
        raise ProxyProtocolError(
            f"PROXY v1: invalid {proto.decode()} address {_excerpt(text, 45)!r}"
        ) from None
    return _ip_text(addr)


def _ip_text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 as ``::ffff:a.b.c.d`` (like inet_ntop
    and ``getpeername()``, on every Python version), never unmapped to IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


def _v1_port(text: bytes) -> int:
    """§2.1: a decimal port in [0..65535] without heading zeroes."""
    if not _V1_PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise ProxyProtocolError(f"PROXY v1: invalid port {_excerpt(text, 10)!r}")
    return int(text)


# --------------------------------------------------------------------------- version 2


def _parse_v2(data: bytes) -> tuple[ProxyInfo, int] | None:
    """§2.2: signature, version/command, family/transport, length, addresses, TLVs."""
    if len(data) > 12:
        ver_cmd = data[12]
        if ver_cmd >> 4 != 2:
            raise ProxyProtocolError(f"PROXY v2: unsupported version {ver_cmd >> 4}")
        if ver_cmd & 0x0F not in (0x0, 0x1):
            raise ProxyProtocolError(f"PROXY v2: unassigned command {ver_cmd & 0x0F:#x}")
    if len(data) > 13:
        fam = data[13]
        if fam >> 4 > 0x3:
            raise ProxyProtocolError(f"PROXY v2: unspecified address family {fam >> 4:#x}")
        if fam & 0x0F > 0x2:
            raise ProxyProtocolError(f"PROXY v2: unspecified transport protocol {fam & 0x0F:#x}")
        if data[12] & 0x0F == 0x1 and fam not in _V2_ADDRESS_LENGTH:
            raise ProxyProtocolError(f"PROXY v2: invalid family/transport byte {fam:#04x}")
    if len(data) < V2_FIXED_LENGTH:
        return None
    ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
    total = V2_FIXED_LENGTH + length
    if ver_cmd & 0x0F == 0x0:
        # §2.2 LOCAL: "use the real connection endpoints and discard the protocol block
        # including the family which is ignored" — but always skip `length` bytes.
        if len(data) < total:
            return None
        return ProxyInfo(2, "LOCAL", None, None, {}), total
    addr_len = _V2_ADDRESS_LENGTH[fam]
    if length < addr_len:
        raise ProxyProtocolError(
            f"PROXY v2: length {length} is shorter than the {addr_len}-byte address block"
            f" of family/transport {fam:#04x}"
        )
    if len(data) < total:
        return None
    header = data[:total]
    block = header[V2_FIXED_LENGTH:]
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if fam >> 4 == 0x1:  # AF_INET
        s, d, sp, dp = struct.unpack_from("!4s4sHH", block)
        source = (_ip_text(ipaddress.IPv4Address(s)), sp)
        destination = (_ip_text(ipaddress.IPv4Address(d)), dp)
    elif fam >> 4 == 0x2:  # AF_INET6
        s, d, sp, dp = struct.unpack_from("!16s16sHH", block)
        source = (_ip_text(ipaddress.IPv6Address(s)), sp)
        destination = (_ip_text(ipaddress.IPv6Address(d)), dp)
    # AF_UNSPEC (0x00) and AF_UNIX (0x3x): no IP address; the real peer is the client.
    tlvs = _parse_tlvs(block[addr_len:], header)
    return ProxyInfo(2, "PROXY", source, destination, tlvs), total


def _parse_tlvs(raw: bytes, header: bytes) -> dict[int, bytes]:
    """§2.2: ``type(1) length(2) value(length)`` vectors filling the rest of the block.

    NOOP (§2.2.4) is dropped; CRC32C (§2.2.3) is verified against ``header``; any other
    type is kept raw. A truncated vector or a repeated type is an error.
    """
    tlvs: dict[int, bytes] = {}
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < 3:
            raise ProxyProtocolError("PROXY v2: truncated TLV header")
        kind, size = struct.unpack_from("!BH", raw, pos)
        start = pos + 3
        if start + size > len(raw):
            raise ProxyProtocolError(
                f"PROXY v2: TLV {kind:#04x} of {size} bytes overruns the header"
            )
        if kind != PP2_TYPE_NOOP:
            if kind in tlvs:
                raise ProxyProtocolError(f"PROXY v2: TLV {kind:#04x} appears twice")
            tlvs[kind] = raw[start : start + size]
            if kind == PP2_TYPE_CRC32C:
                _check_crc32c(header, raw, start, size)
        pos = start + size
    return tlvs


def _check_crc32c(header: bytes, raw: bytes, start: int, size: int) -> None:
    """§2.2.3: the CRC32c of the whole header with the checksum field zeroed."""
    if size != 4:
        raise ProxyProtocolError(f"PROXY v2: CRC32C TLV must hold 4 bytes, not {size}")
    offset = len(header) - len(raw) + start
    expected = struct.unpack_from("!I", header, offset)[0]
    zeroed = header[:offset] + b"\0\0\0\0" + header[offset + 4 :]
    if crc32c(zeroed) != expected:
        raise ProxyProtocolError("PROXY v2: CRC32C checksum mismatch")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 Appendix B) of ``data``, as used by §2.2.3.

    Args:
        data: the bytes to checksum.

    Returns:
        The 32-bit checksum (``crc32c(b"123456789") == 0xE3069283``).
    """
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF

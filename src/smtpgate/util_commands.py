"""``smtpgate util ...``: nssmtpd's helper commands for administrators and scripts.

Entry point: :func:`add_util_commands` (wired into :mod:`smtpgate.cli`). The commands map
nssmtpd's ``ns_smtpd encode|decode base64|hex|qprint``, ``ns_smtpd checkemail`` and
``ns_smtpd checkdomain``:

- ``util encode|decode base64|hex|qprint``: standard input to standard output, as bytes
  (binary safe). base64: RFC 4648 §4 (encoded output in lines of 76 characters, as
  RFC 2045 §6.8 asks of MIME); hex: RFC 4648 §8 (lower case); qprint: quoted-printable,
  RFC 2045 §6.7, in binary mode (:func:`binascii.b2a_qp` with ``istext=False``: line
  breaks are encoded as ``=0D``/``=0A``, so every byte comes back as it was).
- ``util check-email ADDRESS``: RFC 5321 §4.1.2 ``Mailbox`` syntax (with RFC 6531 UTF-8),
  checked by the SMTP server's own grammar (:func:`smtpgate.protocol.grammar.parse_path`);
  prints the address as ``local@domain``.
- ``util check-domain DOMAIN [--dns]``: RFC 5321 §4.1.2 ``Domain`` syntax; with ``--dns``
  the mail hosts: MX records (RFC 5321 §5.1), else the domain's own A/AAAA records
  (implicit MX), then each host's A/AAAA records, through the project's resolver
  (:func:`smtpgate.dns.shared_resolver`, ``[dns]`` of ``-c FILE``).

Exit codes (:data:`UTIL_EXIT_CODES`): 0 valid (and, with ``--dns``, mail can be delivered
there), 1 invalid, or no mail host (NXDOMAIN, no MX and no address, RFC 7505 null MX),
2 usage error (a bad ``-c`` file, undecodable input), 3 the DNS lookup failed (timeout,
SERVFAIL: try again later).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import sys
from collections.abc import Sequence

__all__ = ["UTIL_EXIT_CODES", "add_util_commands", "check_domain_syntax", "check_email"]

UTIL_EXIT_CODES = """\
util exit codes:
  0  valid (check-domain --dns: mail can be delivered there); encode/decode done
  1  invalid address or domain; --dns: NXDOMAIN, no MX and no A/AAAA, or a null MX
  2  usage error: a bad -c file, input that does not decode
  3  the DNS lookup failed (timeout, SERVFAIL): try again later
"""


class _DnsFailure(Exception):
    """A lookup that did not give an answer (timeout, SERVFAIL, no nameserver)."""


def _read_stdin() -> bytes:
    return sys.stdin.buffer.read()


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def encode(kind: str, data: bytes) -> bytes:
    """Encode ``data`` as ``kind`` (``base64``, ``hex`` or ``qprint``).

    Returns:
        ASCII bytes ending in a newline (empty for empty input): base64 in lines of 76
        characters (RFC 2045 §6.8), hex as one line, quoted-printable per RFC 2045 §6.7
        in binary mode (CR and LF encoded as ``=0D``/``=0A``; lines of at most 76
        characters joined by soft line breaks ``=``, one ending the output).

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "base64":
        return base64.encodebytes(data) if data else b""
    if kind == "hex":
        return binascii.hexlify(data) + b"\n" if data else b""
    if kind == "qprint":
        # binary mode: CR and LF are encoded too (=0D, =0A), so any bytes come back as
        # they were; the soft line break "=" ends the output with a newline that decodes
        # to nothing.
        return binascii.b2a_qp(data, istext=False) + b"=\n" if data else b""
    raise ValueError(f"unknown encoding {kind!r}")


def decode(kind: str, data: bytes) -> bytes:
    """Decode ``data`` from ``kind`` (``base64``, ``hex`` or ``qprint``).

    Whitespace (line breaks) in base64 and hex input is ignored.

    Raises:
        ValueError: the input is not valid ``kind`` (bad base64 characters or padding,
            an odd number of hex digits, a non-hex character), or an unknown ``kind``.
    """
    if kind == "base64":
        text = b"".join(data.split())
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"not base64: {exc}") from None
    if kind == "hex":
        text = b"".join(data.split())
        try:
            return binascii.unhexlify(text)
        except binascii.Error as exc:
            raise ValueError(f"not hex: {exc}") from None
    if kind == "qprint":
        return binascii.a2b_qp(data)
    raise ValueError(f"unknown encoding {kind!r}")


def check_email(address: str) -> str:
    """Check ``address`` as an RFC 5321 ``Mailbox`` (RFC 6531 UTF-8 allowed).

    Args:
        address: ``local@domain``, optionally in angle brackets.

    Returns:
        The mailbox as ``local@domain`` (brackets and any source route removed).

    Raises:
        ValueError: the syntax is invalid, with the SMTP server's reason (e.g. "Bad
            recipient address syntax", "Local part too long").
    """
    from .protocol.grammar import PathSyntaxError, parse_path

    text = address.strip()
    if not (text.startswith("<") and text.endswith(">")):
        text = f"<{text}>"
    try:
        mailbox, params = parse_path(text, reverse=False, smtputf8_allowed=True)
    except PathSyntaxError as exc:
        raise ValueError(f"{exc.reply.code} {exc.reply.enhanced} {exc.reply.text}") from None
    if params:
        raise ValueError("501 5.1.3 Bad recipient address syntax (text after the address)")
    return mailbox


def check_domain_syntax(domain: str) -> str:
    """Check ``domain`` as an RFC 5321 ``Domain`` (dot-separated labels of letters, digits
    and hyphens; RFC 6531 UTF-8 labels allowed; at most 255 octets). An address literal
    (``[192.0.2.1]``) is not a domain.

    Returns:
        The domain without a trailing dot.

    Raises:
        ValueError: why it is not a domain.
    """
    name = domain.strip()
    if name.endswith(".") and len(name) > 1:
        name = name[:-1]
    if not name or name.startswith("["):
        raise ValueError("not a domain name")
    try:
        check_email(f"postmaster@{name}")
    except ValueError:
        raise ValueError("not a domain name (RFC 5321 §4.1.2: letters, digits and "
                         "hyphens in dot-separated labels)") from None
    if any(len(label.encode("utf-8")) > 63 for label in name.split(".")):
        raise ValueError("a label is longer than 63 octets (RFC 1035 §2.3.4)")
    return name


async def _addresses(resolver: object, host: str) -> list[str]:
    """A and AAAA records of ``host`` (empty when it has none).

    Raises:
        _DnsFailure: a lookup failed (timeout, SERVFAIL).
    """
    import dns.exception
    import dns.resolver

    out: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(host, rdtype)  # type: ignore[attr-defined]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise _DnsFailure(f"{host} {rdtype}: {exc}") from None
        out.extend(r.to_text() for r in answer)
    return out


async def mail_hosts(domain: str, resolver: object) -> list[tuple[int, str, list[str]]]:
    """The mail hosts of ``domain`` (RFC 5321 §5.1): ``(preference, host, addresses)``.

    MX records sorted by preference; without MX records, the domain itself (preference 0)
    when it has an A or AAAA record.

    Raises:
        LookupError: the domain does not exist (NXDOMAIN), has a null MX (RFC 7505) or
            has neither MX nor address records.
        _DnsFailure: a lookup failed (timeout, SERVFAIL).
    """
    import dns.exception
    import dns.resolver

    try:
        answer = await resolver.resolve(domain, "MX")  # type: ignore[attr-defined]
        mx = sorted((int(r.preference), r.exchange.to_text(omit_final_dot=True))
                    for r in answer)
    except dns.resolver.NXDOMAIN:
        raise LookupError("the domain does not exist (NXDOMAIN)") from None
    except dns.resolver.NoAnswer:
        mx = []
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise _DnsFailure(f"{domain} MX: {exc}") from None
    if len(mx) == 1 and mx[0][1] in ("", "."):
        raise LookupError("null MX: the domain accepts no mail (RFC 7505)")
    if not mx:
        addresses = await _addresses(resolver, domain)
        if not addresses:
            raise LookupError("no MX and no A/AAAA record: no mail host")
        return [(0, domain, addresses)]
    return [(pref, host, await _addresses(resolver, host)) for pref, host in mx]


def cmd_encode(args: argparse.Namespace) -> int:
    """``util encode KIND``: standard input encoded to standard output."""
    _write(encode(args.kind, _read_stdin()))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    """``util decode KIND``: standard input decoded to standard output.

    Raises:
        UsageError: the input is not valid (exit 2).
    """
    from .cli import UsageError

    try:
        data = decode(args.kind, _read_stdin())
    except ValueError as exc:
        raise UsageError(f"util decode {args.kind}: standard input: {exc}") from None
    _write(data)
    return 0


def cmd_check_email(args: argparse.Namespace) -> int:
    """``util check-email ADDRESS``: print the mailbox (exit 0) or why not (exit 1)."""
    try:
        print(check_email(args.address))
    except ValueError as exc:
        print(f"smtpgate: {args.address}: invalid address: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check_domain(args: argparse.Namespace) -> int:
    """``util check-domain DOMAIN [--dns] [-c FILE]``.

    Prints the domain (exit 0) or why it is invalid (exit 1); with ``--dns`` one line per
    mail host, ``PREFERENCE HOST ADDRESS...``, or why there is none (exit 1), or the
    failed lookup (exit 3).
    """
    try:
        name = check_domain_syntax(args.domain)
    except ValueError as exc:
        print(f"smtpgate: {args.domain}: invalid domain: {exc}", file=sys.stderr)
        return 1
    if not args.dns:
        print(name)
        return 0
    from .cli import _load
    from .dns import shared_resolver

    cfg = _load(args)
    resolver = shared_resolver(cfg.dns)
    try:
        hosts = asyncio.run(mail_hosts(name, resolver))
    except LookupError as exc:
        print(f"smtpgate: {name}: {exc}", file=sys.stderr)
        return 1
    except _DnsFailure as exc:
        print(f"smtpgate: {name}: DNS lookup failed: {exc}", file=sys.stderr)
        return 3
    for pref, host, addresses in hosts:
        print(f"{pref} {host} {' '.join(addresses) if addresses else '(no A/AAAA record)'}")
    if not any(addresses for _, _, addresses in hosts):
        print(f"smtpgate: {name}: no mail host has an address", file=sys.stderr)
        return 1
    return 0


def add_util_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    parents: Sequence[argparse.ArgumentParser] = (),
    epilog: str | None = None,
) -> None:
    """Add ``util encode|decode|check-email|check-domain`` to the CLI.

    Args:
        sub: the ``smtpgate`` sub-command parsers.
        parents: parsers whose options every command takes (``--log-level``).
        epilog: text after each command's help (the exit codes).
    """
    u = sub.add_parser("util", help="encode/decode, check an address or a domain "
                                    "(nssmtpd's helpers)")
    usub = u.add_subparsers(dest="util_command", required=True)
    text = f"{epilog or ''}\n{UTIL_EXIT_CODES}"

    def command(name: str, doc: str) -> argparse.ArgumentParser:
        return usub.add_parser(name, help=doc, description=doc, parents=list(parents),
                               epilog=text, formatter_class=argparse.RawDescriptionHelpFormatter)

    kinds = ["base64", "hex", "qprint"]
    p = command("encode", "encode standard input to standard output (binary safe)")
    p.add_argument("kind", choices=kinds)
    p.set_defaults(func=cmd_encode)
    p = command("decode", "decode standard input to standard output (binary safe)")
    p.add_argument("kind", choices=kinds)
    p.set_defaults(func=cmd_decode)
    p = command("check-email", "check an address's RFC 5321 syntax; print it as local@domain")
    p.add_argument("address")
    p.set_defaults(func=cmd_check_email)
    p = command("check-domain", "check a domain's syntax; with --dns its mail hosts (MX, "
                                "else A/AAAA)")
    p.add_argument("domain")
    p.add_argument("--dns", action="store_true", help="look up MX, then A/AAAA records")
    p.add_argument("-c", "--config", help="configuration file (for [dns]; default: the "
                                          "system resolver)")
    p.set_defaults(func=cmd_check_domain)

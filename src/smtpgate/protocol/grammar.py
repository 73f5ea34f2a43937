"""RFC 5321 / RFC 6531 grammar for MAIL and RCPT arguments, as commented regexes.

Entry points: :func:`parse_path` (reverse-path / forward-path with ESMTP parameters),
:func:`parse_params` and :func:`sloppy_path` (ZMailer's bracket-less MAIL FROM).
Pure functions; errors are raised as :class:`PathSyntaxError` carrying the reply
to send. RFC 5321 §4.1.2 (ABNF), §4.5.3.1 (size limits),
RFC 6531 §3.3 (UTF-8 in addresses), RFC 1869 §6 (esmtp-param).
"""

from __future__ import annotations

import ipaddress
import re

from ..reply import Reply

# atext (RFC 5322 §3.2.3):  ALPHA / DIGIT / "!#$%&'*+-/=?^_`{|}~"
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
# RFC 6531 §3.3: atext =/ UTF8-non-ascii ; qtextSMTP =/ UTF8-non-ascii
_UTF8 = r"\u0080-\U0010ffff"

# Dot-string = Atom *("." Atom)
_DOT_STRING = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
_DOT_STRING_U = rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*"
# Quoted-string = DQUOTE *QcontentSMTP DQUOTE ; qtextSMTP = %d32-33 / %d35-91 / %d93-126
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_QUOTED_U = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'
# sub-domain = Let-dig [Ldh-str] ; Domain = sub-domain *("." sub-domain)
_SUBDOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_SUBDOMAIN_U = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?"
# address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
#                         General-address-literal ) "]"
_ADDR_LITERAL = (
    r"\[(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}"  # IPv4 ([0-9], not \d: no Unicode digits)
    r"|IPv6:[0-9A-Fa-f:.]+"  # IPv6 (checked loosely; validated by ipaddress elsewhere)
    r"|[A-Za-z0-9\-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+)\]"  # General
)

_MAILBOX = re.compile(
    rf"(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_SUBDOMAIN}(?:\.{_SUBDOMAIN})*|{_ADDR_LITERAL})"
)
_MAILBOX_U = re.compile(
    rf"(?P<local>{_DOT_STRING_U}|{_QUOTED_U})"
    rf"@(?P<domain>{_SUBDOMAIN_U}(?:\.{_SUBDOMAIN_U})*|{_ADDR_LITERAL})"
)
# A-d-l = At-domain *( "," At-domain ) ; At-domain = "@" Domain  (source routes: accepted, ignored)
_ADL = re.compile(r"@[^,:<>\s]+(?:,@[^,:<>\s]+)*:")

# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-") ; esmtp-value = 1*(%d33-60 / %d62-126)
_PARAM = re.compile(r"(?P<kw>[A-Za-z0-9][A-Za-z0-9\-]*)(?:=(?P<val>[\x21-\x3c\x3e-\x7e]+))?")
_PARAM_U = re.compile(
    rf"(?P<kw>[A-Za-z0-9][A-Za-z0-9\-]*)(?:=(?P<val>[\x21-\x3c\x3e-\x7e{_UTF8}]+))?"
)

MAX_LOCAL_PART = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # octets, §4.5.3.1.2
MAX_PATH = 256  # octets including the angle brackets, §4.5.3.1.3


_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")


class PathSyntaxError(ValueError):
    """A MAIL/RCPT argument did not parse; ``reply`` is what to send."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(reply.text)


def parse_path(
    argument: str,
    *,
    reverse: bool,
    smtputf8_allowed: bool,
    allow_postmaster: bool = False,
) -> tuple[str, str]:
    """Split ``<path> [params]`` and validate the path.

    Args:
        argument: the text after ``FROM:`` / ``TO:`` (leading spaces tolerated).
        reverse: True for a reverse-path (``<>`` allowed), False for a forward-path.
        smtputf8_allowed: accept UTF-8 in the mailbox (RFC 6531); the caller
            passes True when SMTPUTF8 is advertised (the MAIL command's own
            SMTPUTF8 parameter is checked by the caller after parsing).
        allow_postmaster: accept ``<Postmaster>`` without a domain (RCPT only,
            RFC 5321 §4.1.1.3).

    Returns:
        ``(mailbox, params_text)``: the mailbox without brackets (``""`` for the
        null reverse-path; source routes stripped) and the unparsed parameter text.

    Raises:
        PathSyntaxError: with 501 5.1.7 (sender) / 501 5.1.3 (recipient) for bad
        syntax, 553 5.6.7 for UTF-8 without SMTPUTF8 support.
    """
    bad = _BAD_SENDER if reverse else _BAD_RECIPIENT
    arg = argument.lstrip(" ")
    if not arg.startswith("<"):
        raise PathSyntaxError(bad)
    end = arg.find(">")
    # A quoted local part may contain '>': find the closing bracket outside quotes.
    if arg.find('"', 0, end if end >= 0 else len(arg)) >= 0:
        end = _find_close(arg)
    if end < 0:
        raise PathSyntaxError(bad)
    path = arg[1:end]
    rest = arg[end + 1 :]
    if rest and not rest.startswith(" "):
        raise PathSyntaxError(bad)
    ascii_path = path.isascii()
    if (len(path) if ascii_path else len(path.encode("utf-8"))) + 2 > MAX_PATH:
        raise PathSyntaxError(Reply(501, bad.enhanced, "Path too long"))
    params = rest.strip(" ")
    if path == "":
        if reverse:
            return "", params
        raise PathSyntaxError(bad)
    if path[0] == "@":  # a source route
        m = _ADL.match(path)
        if m:
            path = path[m.end() :]
    if allow_postmaster and len(path) == 10 and path.lower() == "postmaster":
        return path, params
    if not ascii_path:
        ascii_path = path.isascii()  # the source route may have held the non-ASCII part
    if not ascii_path and not smtputf8_allowed:
        raise PathSyntaxError(Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"))
    mm = (_MAILBOX if ascii_path else _MAILBOX_U).fullmatch(path)
    if mm is None:
        raise PathSyntaxError(bad)
    local = mm.group("local")
    if (len(local) if ascii_path else len(local.encode("utf-8"))) > MAX_LOCAL_PART:
        raise PathSyntaxError(Reply(501, bad.enhanced, "Local part too long"))
    domain = mm.group("domain")
    if (len(domain) if ascii_path else len(domain.encode("utf-8"))) > MAX_DOMAIN:
        raise PathSyntaxError(Reply(501, bad.enhanced, "Domain too long"))
    if domain.startswith("[") and not _valid_address_literal(domain[1:-1]):
        raise PathSyntaxError(bad)
    return path, params


def _valid_address_literal(inner: str) -> bool:
    """Check what the regex cannot (RFC 5321 §4.1.3).

    IPv4 ``Snum`` must be 0..255, and an ``IPv6:`` tagged literal must hold a
    valid IPv6 address (the general-literal branch of the regex would otherwise
    accept ``[IPv6:anything]``).
    """
    tag, colon, rest = inner.partition(":")
    if not colon:
        return all(int(octet) <= 255 for octet in inner.split("."))
    if tag.lower() == "ipv6":
        try:
            ipaddress.IPv6Address(rest)
        except ValueError:
            return False
        return "%" not in rest  # no zone index in a mail address
    return True


def _scan_unquoted(text: str, stops: str) -> int:
    """Index of the first character of ``stops`` outside a quoted string (RFC 5321
    Quoted-string, with backslash escapes), or -1."""
    in_quote = False
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch in stops and not in_quote:
            return i
    return -1


def _find_close(arg: str) -> int:
    """Index of the ``>`` closing a path (not one inside a quoted local part), or -1."""
    return _scan_unquoted(arg, ">")


def _token_end(text: str) -> int:
    """Index just past a blank-delimited token; a quoted string may hold blanks."""
    end = _scan_unquoted(text, " \t")
    return len(text) if end < 0 else end


def sloppy_path(argument: str) -> str | None:
    """Bracket a bare ``user@domain`` reverse-path (ZMailer's ``S`` HELO-rule flag).

    ZMailer accepts ``MAIL FROM:user@domain`` from clients that cannot follow
    RFC 821 (its example: Windows CE). This rewrites the argument so that
    :func:`parse_path` can take it: ``"user@domain SIZE=10"`` becomes
    ``"<user@domain> SIZE=10"``; a quoted local part may hold blanks
    (``"john doe"@example.com``). The mailbox itself is not judged here.

    Args:
        argument: the text after ``MAIL FROM:`` (leading blanks are skipped).

    Returns:
        The rewritten argument, or None when there is nothing to rewrite: the
        argument is empty, already starts with ``<``, or the bare token holds
        ``<`` or ``>`` (left for :func:`parse_path` to reject).
    """
    text = argument.lstrip(" \t")
    if not text or text.startswith("<"):
        return None
    end = _token_end(text)
    token, rest = text[:end], text[end:].strip(" \t")
    if not token or "<" in token or ">" in token:
        return None
    return f"<{token}> {rest}" if rest else f"<{token}>"


def parse_params(text: str, *, utf8: bool = False) -> dict[str, str | None]:
    """Parse ``KEY[=VALUE] ...`` ESMTP parameters (RFC 5321 §4.1.2, RFC 1869 §6).

    Args:
        text: the parameter text after the path, may be empty.
        utf8: allow UTF-8 in values (RFC 6531 mail parameters).

    Returns:
        Keyword (upper-cased) → value (``None`` when no ``=value``).

    Raises:
        PathSyntaxError: 501 5.5.4 on malformed or repeated parameters.
    """
    out: dict[str, str | None] = {}
    if not text:
        return out
    pattern = _PARAM_U if utf8 else _PARAM
    for token in text.split(" "):
        if not token:
            continue
        m = pattern.fullmatch(token)
        if m is None:
            raise PathSyntaxError(Reply(501, "5.5.4", f"Malformed parameter: {token[:40]}"))
        kw = m.group("kw").upper()
        if kw in out:
            raise PathSyntaxError(Reply(501, "5.5.4", f"Duplicate parameter: {kw}"))
        out[kw] = m.group("val")
    return out


_HELO_NAME = re.compile(r"[\x21-\x7e]{1,255}")


def valid_helo_argument(name: str) -> bool:
    """True when ``name`` is printable ASCII without spaces, 1..255 octets.

    RFC 5321 §4.1.1.1 wants a domain or an address literal; like Postfix, smtpgate
    accepts any printable word by default (strict checks are a policy matter).
    """
    return _HELO_NAME.fullmatch(name) is not None

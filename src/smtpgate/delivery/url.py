"""Relay URLs: where and how smtpgate hands accepted mail on (RFC 3986 syntax).

Entry point: :func:`parse_relay_url` -> :class:`RelayUrl`. Schemes ``smtp://`` (opportunistic
STARTTLS), ``smtp+starttls://``, ``smtps://`` (RFC 8314), ``plain://`` (AUTH PLAIN), ``discard:``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote

from ..errors import ConfigError

__all__ = ["DEFAULT_PORTS", "RelayUrl", "TlsMode", "parse_relay_url", "redact_relay_url"]

TlsMode = Literal["none", "may", "required", "implicit"]

#: Default port per scheme (RFC 5321 §4.5.4.2 port 25, RFC 6409 port 587, RFC 8314 port 465).
DEFAULT_PORTS: dict[str, int] = {"smtp": 25, "smtp+starttls": 587, "smtps": 465, "plain": 587}

_TLS_MODES: dict[str, TlsMode] = {
    "smtp": "may",
    "smtp+starttls": "required",
    "smtps": "implicit",
    "plain": "required",
    "discard": "none",
}

_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_TRUE = {"yes", "true", "1", "on"}
_FALSE = {"no", "false", "0", "off"}


@dataclass(frozen=True, slots=True, repr=False)
class RelayUrl:
    """A parsed relay URL. The password never appears in ``repr``/``str``.

    Attributes:
        scheme: ``"smtp"``, ``"smtp+starttls"``, ``"smtps"``, ``"plain"`` or ``"discard"``.
        host: host name (lower-cased) or IP address; IPv6 without brackets;
            ``""`` for ``discard:``.
        port: TCP port, 1..65535 (0 for ``discard:``).
        username: the AUTH user name (percent-decoded), or ``None``.
        password: the AUTH password (percent-decoded), or ``None``.
        verify: verify the upstream's certificate (chain and host name) when
            TLS is used. Always false for ``smtp://`` (opportunistic TLS, like
            Postfix ``smtp_tls_security_level = may``).
    """

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    verify: bool = True

    @property
    def tls(self) -> TlsMode:
        """TLS policy: ``"may"`` (STARTTLS if offered), ``"required"`` (STARTTLS or
        fail), ``"implicit"`` (TLS from the first byte, RFC 8314), ``"none"``."""
        return _TLS_MODES[self.scheme]

    @property
    def is_discard(self) -> bool:
        """True for ``discard:``."""
        return self.scheme == "discard"

    @property
    def host_port(self) -> str:
        """``host:port`` for logs, IPv6 hosts in brackets (``[::1]:2525``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def auth_mechanism(self) -> str | None:
        """The SASL mechanism to force (``"PLAIN"`` for ``plain://``), or ``None``
        to let the client pick among those the upstream offers."""
        return "PLAIN" if self.scheme == "plain" else None

    def redacted(self) -> str:
        """The URL with the password replaced by ``***`` (safe for logs and errors)."""
        if self.is_discard:
            return "discard:"
        userinfo = ""
        if self.username is not None:
            userinfo = (
                quote(self.username, safe="") + (":***" if self.password is not None else "") + "@"
            )
        query = ""
        if self.scheme != "smtp" and not self.verify:
            query = "?verify=no"
        return f"{self.scheme}://{userinfo}{self.host_port}{query}"

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        password = None if self.password is None else "***"
        return (
            f"RelayUrl(scheme={self.scheme!r}, host={self.host!r}, port={self.port!r}, "
            f"username={self.username!r}, password={password!r}, verify={self.verify!r})"
        )


def redact_relay_url(url: str) -> str:
    """Mask whatever could be a password in a (possibly malformed) relay URL string.

    Everything between the first ``:`` after the scheme's ``//`` (or, without ``//``,
    after the start) and the last ``@`` is replaced by ``***``; a URL without ``@`` is
    returned unchanged. Used for logs, error messages and reprs.

    Args:
        url: the URL text, e.g. ``plain://user:secret@mx.example.org:587``.

    Returns:
        ``plain://user:***@mx.example.org:587``.
    """
    if "@" not in url:
        return url
    head, _, hostpart = url.rpartition("@")
    sep = head.find("://")
    prefix = head[: sep + 3] if sep >= 0 else ""
    user, colon, _ = head[len(prefix) :].partition(":")
    return f"{prefix}{user}{':***' if colon else ''}@{hostpart}"


_redact_raw = redact_relay_url


def _parse_host(hostport: str, fail: Callable[[str], ConfigError]) -> tuple[str, str | None]:
    """Split ``host[:port]`` / ``[v6][:port]`` and validate the host."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise fail("unterminated IPv6 literal (missing ']')")
        literal = hostport[1:end]
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise fail("invalid IPv6 address in brackets") from None
        after = hostport[end + 1 :]
        if after and not after.startswith(":"):
            raise fail("unexpected text after the IPv6 literal")
        return host, (after[1:] if after else None)
    host, colon, port = hostport.partition(":")
    if ":" in port:
        raise fail("an IPv6 address must be written in brackets, e.g. smtp://[::1]:25")
    if not host:
        raise fail("missing host")
    try:
        return str(ipaddress.IPv4Address(host)), (port if colon else None)
    except ValueError:
        pass
    if len(host) > 253 or not all(_HOST_LABEL.match(lab) for lab in host.rstrip(".").split(".")):
        raise fail("invalid host name")
    return host.lower().rstrip("."), (port if colon else None)


def parse_relay_url(url: str) -> RelayUrl:
    """Parse and validate a relay URL.

    Forms: ``smtp://host[:25]``, ``smtp+starttls://[user:pw@]host[:587][?verify=no]``,
    ``smtps://[user:pw@]host[:465][?verify=no]``, ``plain://user:pw@host[:587][?verify=no]``,
    ``discard:``. User name and password are percent-decoded (RFC 3986 §2.1);
    IPv6 hosts go in brackets (``smtp://[::1]:2525``).

    Args:
        url: the URL text (surrounding whitespace is ignored).

    Returns:
        The parsed :class:`RelayUrl`.

    Raises:
        ConfigError: the URL is malformed or unsupported. The message names the
            problem and shows the URL with the password replaced by ``***``.
    """
    text = url.strip()
    shown = _redact_raw(text)

    def _fail(problem: str) -> ConfigError:
        return ConfigError(f"relay URL {shown!r}: {problem}")

    if not text:
        raise _fail("empty URL")
    if _CONTROL_OR_SPACE.search(text):
        raise _fail("contains whitespace or control characters (percent-encode them in the "
                    "user name or password: a space is %20)")
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in _TLS_MODES:
        expected = "expected smtp://, smtp+starttls://, smtps://, plain:// or discard:"
        if colon and rest.startswith("//"):
            raise _fail(f"unsupported scheme {scheme[:20]!r} ({expected})")
        raise _fail(f"not a relay URL ({expected})")
    if scheme == "discard":
        if rest.strip("/"):
            raise _fail("discard: takes no host or parameters")
        return RelayUrl("discard", "", 0, verify=False)
    if not rest.startswith("//"):
        raise _fail(f"expected {scheme}://host[:port]")
    rest = rest[2:]
    end = len(rest)
    for ch in "/?#":
        pos = rest.find(ch)
        if pos >= 0:
            end = min(end, pos)
    authority, tail = rest[:end], rest[end:]
    if "@" in tail:
        raise _fail("user name or password contains '/', '?', '#' or '@': percent-encode them")
    path, _, query = tail.partition("?")
    if "#" in query or path.startswith("#"):
        raise _fail("fragments (#...) are not allowed")
    if path not in ("", "/"):
        raise _fail("a path is not allowed (percent-encode '/' in the user name or password "
                    "as %2F)")

    username: str | None = None
    password: str | None = None
    if "@" in authority:
        userinfo, _, hostport = authority.rpartition("@")
        raw_user, has_pw, raw_pw = userinfo.partition(":")
        try:
            username = unquote(raw_user, errors="strict")
            password = unquote(raw_pw, errors="strict") if has_pw else None
        except UnicodeDecodeError:
            raise _fail("user name or password is not UTF-8 after percent-decoding") from None
        if not username:
            raise _fail("empty user name")
        if password is None or password == "":
            raise _fail("user name without password (use USER:PASSWORD@host)")
    else:
        hostport = authority

    host, port_text = _parse_host(hostport, _fail)
    if port_text is None or port_text == "":
        port = DEFAULT_PORTS[scheme]
    elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise _fail("port must be a number from 1 to 65535")

    verify = scheme != "smtp"
    if query:
        for item in query.split("&"):
            if not item:
                continue
            key, _, value = item.partition("=")
            if key.lower() != "verify":
                raise _fail("unknown query parameter (only verify=yes|no is supported)")
            if scheme == "smtp":
                raise _fail(
                    "verify= needs required TLS: use smtp+starttls://, smtps:// or plain://"
                )
            if value.lower() in _TRUE:
                verify = True
            elif value.lower() in _FALSE:
                verify = False
            else:
                raise _fail("verify must be yes or no")

    if username is not None and scheme == "smtp":
        raise _fail(
            "credentials are only sent over TLS: use plain://, smtp+starttls:// or smtps://"
        )
    if scheme == "plain" and username is None:
        raise _fail("plain:// needs credentials: plain://USER:PASSWORD@host:587")
    return RelayUrl(scheme, host, port, username, password, verify)

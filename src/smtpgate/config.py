"""smtpgate's configuration: one TOML file read with :mod:`tomllib` into frozen dataclasses.

Entry points: :func:`load_config`, :func:`config_from_mapping`, :meth:`Config.default`,
:meth:`Config.with_overrides`, :func:`parse_listen`. Every problem is collected and raised at
once as :class:`~smtpgate.errors.ConfigError`, each problem starting with the dotted key.
Limits follow RFC 5321 §4.5.3 (sizes) and §4.5.3.2 (timeouts); SMTPUTF8 is RFC 6531.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import keyword
import logging
import math
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import date, datetime, time
from typing import Any, ClassVar, TypeAlias

from .errors import ConfigError

_log = logging.getLogger("smtpgate.config")

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------------------------
# Listen addresses
# --------------------------------------------------------------------------------------------

_PORT_RE = re.compile(r"[0-9]{1,5}")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_IPV4ISH_RE = re.compile(r"[0-9.]+")


def _check_host_name(host: str) -> None:
    """Raise ValueError unless ``host`` is an IPv4 address or an RFC 1123 host name."""
    if _IPV4ISH_RE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv4 address {host!r}") from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"invalid host name {host!r}")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One address the server listens on.

    Attributes:
        host: an IPv4 address, an IPv6 address *without* brackets (``"::1"``) or a host
            name (``"localhost"``) that is resolved when the listener binds.
        port: TCP port, 0..65535; 0 lets the operating system pick a free port (tests).

    ``str()`` gives the canonical form accepted by :func:`parse_listen`:
    ``"127.0.0.1:2525"``, ``"[::1]:2525"``, ``"localhost:2525"``.

    Raises:
        ValueError: on an empty host or a port outside 0..65535.
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("missing host")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port must be an integer, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range 0..65535")

    @property
    def is_ipv6(self) -> bool:
        """True when ``host`` is an IPv6 address literal."""
        return ":" in self.host

    def __str__(self) -> str:
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(s: str) -> ListenAddress:
    """Parse ``HOST:PORT`` into a :class:`ListenAddress`.

    Accepted forms: ``"127.0.0.1:2525"``, ``"0.0.0.0:25"``, ``"[::1]:2525"``, ``"[::]:25"``,
    ``"localhost:2525"``. IPv6 addresses must be in brackets; the port is required and must be
    a decimal number 0..65535 (0 = any free port).

    Args:
        s: the address text; surrounding whitespace is ignored.

    Returns:
        The parsed address; the IPv6 host is stored without brackets.

    Raises:
        ValueError: with a message saying what is wrong (no key prefix).
    """
    text = s.strip()
    if not text:
        raise ValueError("empty address; expected HOST:PORT such as 127.0.0.1:2525")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IPv6 address (brackets are only for IPv6)"
            ) from None
        if not rest:
            raise ValueError(f"missing port in {text!r}; expected [{host}]:PORT")
        if not rest.startswith(":"):
            raise ValueError(f"expected ':PORT' after ']' in {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"missing port in {text!r}; expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"IPv6 addresses must be in brackets, e.g. [::1]:2525; got {text!r}")
        if not host:
            raise ValueError(f"missing host in {text!r}; use 0.0.0.0 or [::] for all interfaces")
        _check_host_name(host)
    if not port_text:
        raise ValueError(f"missing port in {text!r}")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"port must be a number 0..65535, got {port_text!r} in {text!r}")
    return ListenAddress(host, int(port_text))


# --------------------------------------------------------------------------------------------
# Checkers: each turns a raw TOML value into the stored value or raises _Invalid
# --------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A value failed its check; ``problems`` holds (key suffix, message) pairs."""

    def __init__(self, message: str = "", problems: Iterable[tuple[str, str]] = ()) -> None:
        self.problems = list(problems) or [("", message)]
        super().__init__(message)


@dataclass(slots=True)
class _Context:
    """What checkers need besides the value: where relative paths start."""

    base_dir: str


_Check: TypeAlias = Callable[[object, _Context], Any]


def _show(value: object, limit: int = 60) -> str:
    """Render a TOML value for an error message (TOML spelling, truncated)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= limit else text[: limit - 4] + '..."'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    return f"a {type(value).__name__}"


def _str(value: object, _ctx: _Context) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return value


def _bool(value: object, _ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be an integer, got {_show(value)}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"must be a number, got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(f"must be a finite number, got {_show(value)}")
    return float(value)


def _positive_int(value: object, _ctx: _Context) -> int:
    n = _int(value)
    if n <= 0:
        raise _Invalid(f"must be a positive integer, got {n}")
    return n


def _worker_count(value: object, _ctx: _Context) -> int:
    n = _int(value)
    if not 1 <= n <= 64:
        raise _Invalid(f"must be between 1 and 64, got {n}")
    return n


def _nonnegative_int(value: object, _ctx: _Context) -> int:
    n = _int(value)
    if n < 0:
        raise _Invalid(f"must be an integer >= 0, got {n}")
    return n


def _nonnegative_number(value: object, _ctx: _Context) -> float:
    x = _number(value)
    if x < 0 or x != x or x == float("inf"):
        raise _Invalid(f"must be a number >= 0, got {_show(value)}")
    return x


def _int_at_least(minimum: int, why: str = "", *, zero_ok: bool = False) -> _Check:
    def check(value: object, _ctx: _Context) -> int:
        n = _int(value)
        if n == 0 and zero_ok:
            return n
        if n < minimum:
            what = (
                f"0 (unlimited) or an integer >= {minimum}"
                if zero_ok
                else (f"an integer >= {minimum}")
            )
            raise _Invalid(f"must be {what}{why}, got {n}")
        return n

    return check


def _positive_seconds(value: object, _ctx: _Context) -> float:
    x = _number(value)
    if x <= 0:
        raise _Invalid(f"must be a positive number of seconds, got {_show(value)}")
    return x


def _nonnegative_seconds(value: object, _ctx: _Context) -> float:
    x = _number(value)
    if x < 0:
        raise _Invalid(f"must be a number of seconds >= 0, got {_show(value)}")
    return x


def _choice(*allowed: str, fold: bool = True) -> _Check:
    """Accept one of ``allowed``; with ``fold``, case-insensitively (stored canonical)."""
    by_key = {(a.upper() if fold else a): a for a in allowed}

    def check(value: object, ctx: _Context) -> str:
        text = _str(value, ctx)
        hit = by_key.get(text.upper() if fold else text)
        if hit is None:
            choices = ", ".join(json.dumps(a) for a in allowed)
            raise _Invalid(f"must be one of {choices}, got {_show(value)}")
        return hit

    return check


def _printable_ascii(what: str, *, spaces: bool) -> _Check:
    def check(value: object, ctx: _Context) -> str:
        text = _str(value, ctx)
        if not text:
            raise _Invalid(f"must not be empty ({what})")
        bad = [c for c in text if not (" " < c < "\x7f" or (spaces and c == " "))]
        if bad:
            kind = "spaces, control characters" if not spaces else "control characters"
            raise _Invalid(f"must be printable ASCII without {kind} ({what}), got {_show(value)}")
        return text

    return check


def _str_list(value: object) -> list[object]:
    """A TOML array, or a single string standing for an array of one."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _Invalid(f"must be a string or an array of strings, got {_show(value)}")
    return value


def _each(item_check: Callable[[str], Any], *, nonempty: bool = False) -> _Check:
    """Check every entry of a string list; report each bad entry as ``key[i]``."""

    def check(value: object, _ctx: _Context) -> tuple[Any, ...]:
        items = _str_list(value)
        if nonempty and not items:
            raise _Invalid("must contain at least one entry")
        out: list[Any] = []
        problems: list[tuple[str, str]] = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                problems.append((f"[{i}]", f"must be a string, got {_show(item)}"))
                continue
            try:
                out.append(item_check(item))
            except (_Invalid, ValueError) as exc:
                problems.append((f"[{i}]", str(exc)))
        if problems:
            raise _Invalid(problems=problems)
        return tuple(out)

    return check


def _listen_entry(text: str) -> ListenAddress:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise _Invalid(f"{exc}") from None


EXTENSIONS = (
    "8BITMIME", "CHUNKING", "BINARYMIME", "DSN", "EHLO", "ENHANCEDSTATUSCODES",
    "PIPELINING", "ETRN", "SMTPUTF8", "DELIVERBY", "STARTTLS", "AUTH",
)


def _extension_name(text: str) -> str:
    name = text.upper()
    if name not in EXTENSIONS:
        raise _Invalid(f"unknown extension {text!r}; one of {', '.join(EXTENSIONS)}")
    return name


def _listen(value: object, ctx: _Context) -> tuple[ListenAddress, ...]:
    addresses: tuple[ListenAddress, ...] = _each(_listen_entry)(value, ctx)
    seen: set[ListenAddress] = set()
    for addr in addresses:
        if addr in seen and addr.port != 0:
            raise _Invalid(f"{addr} is listed twice")
        seen.add(addr)
    return addresses


def _hook_spec(text: str) -> str:
    """Syntax check for ``package.module:attribute`` (importing happens elsewhere)."""
    module, sep, attr = text.partition(":")

    def dotted(name: str) -> bool:
        parts = name.split(".")
        return all(p.isidentifier() and not keyword.iskeyword(p) for p in parts)

    if not sep or not dotted(module) or not dotted(attr):
        raise _Invalid(f'must look like "package.module:function", got {_show(text)}')
    return text


def _hook_list(value: object, ctx: _Context) -> tuple[str, ...]:
    result: tuple[str, ...] = _each(_hook_spec)(value, ctx)
    return result


def _optional_hook(value: object, ctx: _Context) -> str:
    text = _str(value, ctx)
    return _hook_spec(text) if text else ""


def _path(kind: str) -> _Check:
    """A path that, when non-empty, must exist; ``kind`` is ``"file"`` or ``"dir"``.

    Relative paths are resolved against ``ctx.base_dir`` (the config file's directory).
    """

    def check(value: object, ctx: _Context) -> str:
        text = _str(value, ctx)
        if not text:
            return ""
        path = os.path.abspath(os.path.join(ctx.base_dir, os.path.expanduser(text)))
        if not os.path.exists(path):
            raise _Invalid(f"{kind} not found: {path}")
        if kind == "file" and not os.path.isfile(path):
            raise _Invalid(f"not a regular file: {path}")
        if kind == "dir" and not os.path.isdir(path):
            raise _Invalid(f"not a directory: {path}")
        if not os.access(path, os.R_OK):
            raise _Invalid(f"not readable: {path}")
        return path

    return check


def _ciphers(value: object, ctx: _Context) -> str:
    text = _str(value, ctx)
    if text:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(text)
        except ssl.SSLError:
            raise _Invalid(f"OpenSSL selects no cipher from {_show(text)}") from None
    return text


def _mechanism(text: str) -> str:
    name = text.upper()
    if name not in ("PLAIN", "LOGIN"):
        raise _Invalid(f'must be "PLAIN" or "LOGIN", got {_show(text)}')
    return name


def _mechanisms(value: object, ctx: _Context) -> tuple[str, ...]:
    names: tuple[str, ...] = _each(_mechanism)(value, ctx)
    if not names:
        raise _Invalid('must contain at least one of "PLAIN", "LOGIN"')
    return tuple(dict.fromkeys(names))  # drop repeats, keep order


_DOMAIN_BAD = frozenset(" \t\r\n@/:[]\\,;")


def _domain(text: str) -> str:
    if not text or any(c in _DOMAIN_BAD or not c.isprintable() for c in text):
        raise _Invalid(f"must be a domain name such as example.org, got {_show(text)}")
    return text.lower().rstrip(".")


def _network(text: str) -> str:
    try:
        ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise _Invalid(
            f"must be an IP address or a CIDR network such as 192.0.2.0/24, got {_show(text)}"
        ) from None
    return text.strip()


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs, reprs and errors).

    Args:
        url: a relay URL such as ``plain://user:secret@mx.example.org:587``.

    Returns:
        ``plain://user:***@mx.example.org:587``; URLs without a password unchanged.
    """
    from .delivery.url import redact_relay_url

    return redact_relay_url(url)


def _relay_url(value: object, _ctx: _Context) -> str:
    """Validate the upstream URL with THE relay-URL parser (:func:`parse_relay_url`).

    ``""`` (Maildir) and ``mx:`` (queue mode, MX lookup) are accepted besides the relay
    URLs; ``discard:`` is stored as ``"discard:"``. Messages show the URL with its
    password replaced by ``***``.
    """
    from .delivery.url import parse_relay_url

    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    url = value
    if url == "":
        return ""
    if url.strip().lower() == "mx:":
        return "mx:"
    try:
        parsed = parse_relay_url(url)
    except ConfigError as exc:
        message = exc.problems[0]
        message = message.removeprefix("relay URL ")
        if "unsupported scheme" in message:
            message += '; "" (Maildir) and mx: (queue mode: deliver by MX lookup) work too'
        raise _Invalid(message) from None
    return "discard:" if parsed.is_discard else url


def _dir_path(value: object, ctx: _Context) -> str:
    """A directory smtpgate creates if missing (Maildir, spool): resolved, not checked here.

    Relative paths are resolved against ``ctx.base_dir`` (the config file's directory);
    whether the directory can be created and written is checked by
    :func:`smtpgate.preflight.preflight`.
    """
    text = _printable_ascii("a directory path", spaces=True)(value, ctx)
    return os.path.abspath(os.path.join(ctx.base_dir, os.path.expanduser(text)))


def _new_file_path(value: object, ctx: _Context) -> str:
    """A file smtpgate writes (pid file): ``""`` = none, else resolved like :func:`_dir_path`."""
    text = _str(value, ctx)
    if not text:
        return ""
    return os.path.abspath(os.path.join(ctx.base_dir, os.path.expanduser(text)))


# --------------------------------------------------------------------------------------------
# The configuration model. Field defaults are THE defaults; ``metadata["check"]`` validates.
# --------------------------------------------------------------------------------------------


def _opt(default: Any = MISSING, check: _Check = _str, *, factory: Any = MISSING) -> Any:
    """A dataclass field with a default and the checker used when loading it."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: listeners, protocol limits (RFC 5321 §4.5.3) and timeouts (seconds).

    Attributes:
        hostname: name in the 220 banner, the EHLO reply and the Received header.
        listen: addresses to listen on (at least one).
        max_message_size: bytes; advertised in EHLO ``SIZE`` (RFC 1870).
        message_buffer_size: bytes of a message held in memory while it arrives; a
            longer message goes to a temporary file as it arrives (queue mode: in the
            spool's ``tmp/``), so memory per session stays bounded.
        max_recipients: RCPTs per transaction; excess gets ``452 4.5.3``.
        max_line_length: octets incl. CRLF per message text line; 0 = unlimited.
        max_command_line: octets incl. CRLF per command line (RFC 5321 §4.5.3.1.4).
        command_timeout: seconds within which a whole command line must arrive (a
            deadline, not extended by partial lines; RFC 5321 §4.5.3.2).
        data_timeout: deadline in seconds for one DATA text or BDAT chunk, extended by
            N / ``min_data_rate`` seconds per read of N bytes (at most ``data_timeout``
            past the latest read).
        max_connections: simultaneous sessions; beyond gets ``421 4.7.0``.
        max_connections_per_ip: simultaneous sessions per client IP; beyond ``421 4.7.0``.
        max_errors: error replies per session before ``421`` and close.
        max_unknown_commands: unknown commands per session before ``421`` and close.
        bare_line_endings: ``"reject"`` (550 5.6.11 after the data) or ``"normalize"``.
        greeting: 220 banner text; ``%H`` is replaced by ``hostname``.
        shutdown_timeout: seconds a graceful shutdown waits for transactions in flight.
        vrfy: False answers VRFY with ``252 2.5.0``.
        received_tls: put TLS version and cipher into the Received header.
        received_auth: put the authenticated user into the Received header.
        smtputf8: advertise SMTPUTF8 (RFC 6531).
        use_uvloop: use uvloop when it is installed.
        help_text: text of the 214 reply to HELP (``""``: the built-in text).
        multiline_replies: send multi-line replies (False: only the first line of each,
            for very old clients; ZMailer no-multiline-replies). EHLO stays multi-line.
        disable_extensions: EHLO keywords not to offer (ZMailer's NoX flags).
        expn: answer EXPN (False: 502); VRFY/EXPN answers come from the address check.
        max_error_recipients: recipients allowed on a message from ``<>``.
        listen_backlog: listen(2) queue length (ZMailer ListenQueueSize).
        tcp_rcvbuf / tcp_sndbuf: socket buffer sizes in bytes, 0 = OS default.
        tarpit_initial / tarpit_exponent / tarpit_max: delay (seconds) before each
            4xx/5xx reply, growing with the session's error count; 0 = off.
        max_load_average: refuse new sessions with 421 4.3.2 above this 1-minute load
            average (ZMailer -L); 0 = off.
        pid_file: write the process id here at start (ZMailer -I); ``""`` = none.
            Absolute after loading (relative to the config file's directory); its
            directory must exist and be writable (checked by preflight).
        received_tls_peer: put the TLS client certificate's subject into Received.
        limit_exceptions: client networks exempt from the per-IP connection limit and the
            ZMailer flood escalation (Postfix ``smtpd_client_event_limit_exceptions``);
            ``None`` (the default) means ``relay.local_networks``
            (see :attr:`Config.limit_exception_networks`).
        min_data_rate: bytes/s a client must keep up during DATA/BDAT (Postfix
            ``smtpd_min_data_rate``): the data deadline starts at ``data_timeout`` and
            each read of N bytes extends it by N / ``min_data_rate`` seconds; 0 = the
            deadline is only ``data_timeout`` of silence (idle timeout).
        recipient_overshoot_limit: RCPTs beyond ``max_recipients`` answered 452 before
            each further one counts toward ``max_errors`` (Postfix
            ``smtpd_recipient_overshoot_limit``).
        workers: SMTP worker processes, 1..64 (Haraka ``nodes``). 1: one process serves
            every listener. N > 1: ``smtpgate serve`` supervises N processes that each
            listen on every address with ``SO_REUSEPORT`` (the kernel spreads the
            connections), while the supervisor owns the spool and the queue delivery;
            ``max_connections`` and ``max_connections_per_ip`` then count per worker.
            Needs fixed ports (no port 0; checked by preflight).
    """

    hostname: str = _opt(
        factory=socket.gethostname, check=_printable_ascii("a host name", spaces=False)
    )
    listen: tuple[ListenAddress, ...] = _opt((ListenAddress("127.0.0.1", 2525),), _listen)
    max_message_size: int = _opt(10_485_760, _positive_int)
    message_buffer_size: int = _opt(262_144, _int_at_least(1024))
    max_recipients: int = _opt(100, _positive_int)
    max_line_length: int = _opt(1000, _int_at_least(1000, zero_ok=True))
    max_command_line: int = _opt(512, _int_at_least(512, " (RFC 5321 §4.5.3.1.4)"))
    command_timeout: float = _opt(300.0, _positive_seconds)
    data_timeout: float = _opt(600.0, _positive_seconds)
    max_connections: int = _opt(1000, _positive_int)
    max_connections_per_ip: int = _opt(50, _positive_int)
    max_errors: int = _opt(10, _positive_int)
    max_unknown_commands: int = _opt(5, _positive_int)
    bare_line_endings: str = _opt("reject", _choice("reject", "normalize", fold=False))
    greeting: str = _opt("%H ESMTP smtpgate", _printable_ascii("banner text", spaces=True))
    shutdown_timeout: float = _opt(30.0, _nonnegative_seconds)
    vrfy: bool = _opt(False, _bool)
    received_tls: bool = _opt(True, _bool)
    received_auth: bool = _opt(False, _bool)
    smtputf8: bool = _opt(True, _bool)
    use_uvloop: bool = _opt(True, _bool)
    help_text: str = _opt("", _str)
    multiline_replies: bool = _opt(True, _bool)
    disable_extensions: tuple[str, ...] = _opt((), _each(_extension_name))
    expn: bool = _opt(False, _bool)
    max_error_recipients: int = _opt(3, _positive_int)
    listen_backlog: int = _opt(1024, _positive_int)
    tcp_rcvbuf: int = _opt(0, _nonnegative_int)
    tcp_sndbuf: int = _opt(0, _nonnegative_int)
    tarpit_initial: float = _opt(0.0, _nonnegative_seconds)
    tarpit_exponent: float = _opt(0.0, _nonnegative_number)
    tarpit_max: float = _opt(0.0, _nonnegative_seconds)
    max_load_average: float = _opt(0.0, _nonnegative_number)
    pid_file: str = _opt("", _new_file_path)
    received_tls_peer: bool = _opt(False, _bool)
    limit_exceptions: tuple[str, ...] | None = _opt(None, _each(_network))
    min_data_rate: int = _opt(500, _nonnegative_int)
    recipient_overshoot_limit: int = _opt(1000, _nonnegative_int)
    workers: int = _opt(1, _worker_count)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[tls]``: certificate and key for STARTTLS / implicit TLS.

    TLS is enabled iff :attr:`certificate` is non-empty. Paths are absolute after loading
    (relative ones are resolved against the config file's directory); ``""`` = not set.

    Attributes:
        certificate: PEM file with the certificate chain (the key may be in it too).
        key: optional separate PEM private key file.
        cafile: CA bundle for verifying client certificates.
        capath: directory of hashed CA certificates.
        ciphers: OpenSSL cipher string for TLS 1.2; ``""`` = OpenSSL defaults.
        min_version: ``"TLSv1.2"`` or ``"TLSv1.3"``.
    """

    certificate: str = _opt("", _path("file"))
    key: str = _opt("", _path("file"))
    cafile: str = _opt("", _path("file"))
    capath: str = _opt("", _path("dir"))
    ciphers: str = _opt("", _ciphers)
    min_version: str = _opt("TLSv1.2", _choice("TLSv1.2", "TLSv1.3"))

    @property
    def enabled(self) -> bool:
        """True when a certificate is configured."""
        return bool(self.certificate)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``[auth]``: SMTP AUTH (RFC 4954) with SASL PLAIN (RFC 4616) and LOGIN.

    AUTH is enabled iff :attr:`users_file` or :attr:`authenticator` is set.

    Attributes:
        users_file: absolute path of the users file (``smtpgate user add``), or ``""``.
        authenticator: ``"package.module:function"`` called as
            ``(username, password[, session]) -> bool``, or ``""``.
        require_tls: do not advertise or accept AUTH before TLS.
        mechanisms: offered SASL mechanisms, upper case, a subset of PLAIN and LOGIN.
        max_failures: failed AUTH attempts per client IP per :attr:`failure_window`.
        failure_window: seconds.
    """

    users_file: str = _opt("", _path("file"))
    authenticator: str = _opt("", _optional_hook)
    require_tls: bool = _opt(True, _bool)
    mechanisms: tuple[str, ...] = _opt(("PLAIN", "LOGIN"), _mechanisms)
    max_failures: int = _opt(5, _positive_int)
    failure_window: float = _opt(300.0, _positive_seconds)

    @property
    def enabled(self) -> bool:
        """True when a users file or an authenticator callable is configured."""
        return bool(self.users_file or self.authenticator)


@dataclass(frozen=True, slots=True, repr=False)
class RelayConfig:
    """``[relay]``: where accepted mail goes, and who may relay.

    ``repr()`` shows the URL with its password replaced by ``***``.

    Attributes:
        url: ``""`` (deliver to the Maildir), ``smtp://``, ``smtp+starttls://``, ``smtps://``,
            ``plain://USER:PASSWORD@HOST:PORT``, ``discard:`` or ``mx:`` (queue mode).
            Checked with :func:`smtpgate.delivery.url.parse_relay_url`, the one relay-URL
            parser; stored as written (``discard:``/``mx:`` lower-cased).
        relay_domains: recipient domains accepted from anyone (lower case).
        local_networks: CIDRs or addresses whose clients may relay anywhere.
        timeout: seconds for the upstream connect and each upstream command.
        cafile: absolute path of the CA bundle for the upstream certificate; ``""`` = system.
    """

    url: str = _opt("", _relay_url)
    relay_domains: tuple[str, ...] = _opt((), _each(_domain))
    local_networks: tuple[str, ...] = _opt(("127.0.0.0/8", "::1"), _each(_network))
    timeout: float = _opt(60.0, _positive_seconds)
    cafile: str = _opt("", _path("file"))

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """:attr:`local_networks` parsed with ``ipaddress.ip_network(strict=False)``."""
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.local_networks)

    @property
    def display_url(self) -> str:
        """:attr:`url` with the password replaced by ``***``; safe for logs."""
        return redact_url(self.url)

    def __repr__(self) -> str:
        return (
            f"RelayConfig(url={self.display_url!r}, relay_domains={self.relay_domains!r}, "
            f"local_networks={self.local_networks!r}, timeout={self.timeout!r}, "
            f"cafile={self.cafile!r})"
        )


@dataclass(frozen=True, slots=True)
class MaildirConfig:
    """``[maildir]``: local delivery when ``relay.url`` is empty.

    Attributes:
        path: Maildir directory, absolute after loading: a relative path in a file is
            relative to the file's directory (the default too, when loaded from a file);
            :meth:`Config.default` keeps ``./smtpgate-mail``, relative to the current
            directory.
    """

    path: str = _opt("./smtpgate-mail", _dir_path)


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """``[hooks]``: ``"package.module:function"`` callables per hook point.

    Attributes:
        connect, helo, mail, rcpt, data, quit, error: callables for that point, in order.
        timeout: seconds per hook call.
    """

    POINTS: ClassVar[tuple[str, ...]] = (
        "connect",
        "helo",
        "mail",
        "rcpt",
        "data",
        "quit",
        "error",
    )

    connect: tuple[str, ...] = _opt((), _hook_list)
    helo: tuple[str, ...] = _opt((), _hook_list)
    mail: tuple[str, ...] = _opt((), _hook_list)
    rcpt: tuple[str, ...] = _opt((), _hook_list)
    data: tuple[str, ...] = _opt((), _hook_list)
    quit: tuple[str, ...] = _opt((), _hook_list)
    error: tuple[str, ...] = _opt((), _hook_list)
    address_check: tuple[str, ...] = _opt((), _hook_list)
    timeout: float = _opt(30.0, _positive_seconds)

    def by_point(self) -> dict[str, tuple[str, ...]]:
        """Return ``{hook point: callable specs}`` for the points that have any."""
        return {p: getattr(self, p) for p in self.POINTS if getattr(self, p)}


def _roll_hour(value: object, _ctx: _Context) -> int:
    n = _int(value)
    if not -1 <= n <= 23:
        raise _Invalid(f"must be an hour of the day, 0 to 23, or -1 for none, got {n}")
    return n


def _roll_format(value: object, ctx: _Context) -> str:
    text = _str(value, ctx)
    if not all(c.isascii() and c.isprintable() and c not in " /" for c in text):
        raise _Invalid(f"must be a strftime suffix without spaces or '/', got {_show(text)}")
    return text


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]`` (``[logging]`` is accepted as its older name): the server log and the
    send log (docs/operations.md). NaviServer nssmtpd's log parameters map as
    ``logfile`` = ``file``, ``logroll`` = ``roll_on_start``, ``logrollfmt`` =
    ``roll_format``, ``logmaxbackup`` = ``max_backups``, ``logrollonsignal`` =
    ``roll_on_signal``, ``logrollhour`` = ``roll_hour``.

    Attributes:
        level: ``"DEBUG"``, ``"INFO"``, ``"WARNING"`` or ``"ERROR"`` (upper case).
        decisions: the level at which each plugin decision of the decision record is
            logged (one line per hook call: stage, plugin, verdict, reply, time,
            findings; docs/explain.md): ``"DEBUG"``, ``"INFO"`` or ``"WARNING"``.
        format: ``"text"`` (``key=value`` fields, values with spaces quoted) or
            ``"json"`` (one JSON object per line with the same fields).
        file: the log file (resolved against the configuration file's directory);
            ``""`` = standard error. Reopened on SIGUSR1 and SIGHUP (for logrotate).
        max_size: bytes; roll the file when a record would take it past this (0 = never).
        roll_hour: roll the file once a day at this local hour, 0-23 (-1 = never).
        max_backups: rolled files kept (``file.1`` ... or by ``roll_format``); older
            ones are removed.
        roll_format: a :func:`time.strftime` suffix for rolled files (``"%Y-%m-%d"``
            gives ``smtpgate.log.2026-12-04``); ``""`` = numbered ``.1``, ``.2``, ...
        roll_on_start: roll an existing non-empty file when the server starts.
        roll_on_signal: on SIGUSR1/SIGHUP roll the file instead of only reopening it.
        send_log: nssmtpd's send log: one line per relayed message (time, queue id,
            sender, recipients, upstream, reply), rolled like ``file``; ``""`` = off.
    """

    level: str = _opt("INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"))
    decisions: str = _opt("DEBUG", _choice("DEBUG", "INFO", "WARNING"))
    format: str = _opt("text", _choice("text", "json"))
    file: str = _opt("", _new_file_path)
    max_size: int = _opt(0, _nonnegative_int)
    roll_hour: int = _opt(-1, _roll_hour)
    max_backups: int = _opt(10, _nonnegative_int)
    roll_format: str = _opt("", _roll_format)
    roll_on_start: bool = _opt(False, _bool)
    roll_on_signal: bool = _opt(False, _bool)
    send_log: str = _opt("", _new_file_path)


def _admin_listen(value: object, ctx: _Context) -> str:
    text = _str(value, ctx).strip()
    if text:
        _listen_entry(text)
    return text


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the administration HTTP listener (API, web page, ``/metrics``;
    docs/operations.md). Off unless ``listen`` is set.

    Attributes:
        listen: ``host:port`` of the admin listener; ``""`` = no listener. Bind it to
            loopback unless ``token_file`` is set.
        token_file: a file holding the bearer token required for everything but
            ``/metrics``; ``""`` = no token (then only loopback addresses may be listened on).
    """

    listen: str = _opt("", _admin_listen)
    token_file: str = _opt("", _path("file"))


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """``[capture]``: capture mode (``[delivery] mode = "capture"``, like Mailpit):
    accepted messages are stored in an SQLite database, shown on the admin page and API.

    Attributes:
        database: the SQLite file (resolved against the configuration file's directory).
        max_messages: messages kept; the oldest are removed first (0 = no limit).
        max_bytes: bytes of message text kept; the oldest are removed first (0 = no limit).
        relay_url: where "relay this message" sends a captured message (same forms as
            ``relay.url``); ``""`` = ``relay.url``.
    """

    database: str = _opt("smtpgate-capture.sqlite", _new_file_path)
    max_messages: int = _opt(10000, _nonnegative_int)
    max_bytes: int = _opt(0, _nonnegative_int)
    relay_url: str = _opt("", _relay_url)


def _scanner_address(value: object, ctx: _Context) -> str:
    # The form (host:port, [v6]:port, unix:/path) is the scanners plugin's to check: it
    # reports scanner[N].address when the chain is built (check-config, serve).
    return _str(value, ctx)


SCANNER_DEFAULT_ADDRESS = {
    "spamassassin": "127.0.0.1:783",
    "rspamd": "127.0.0.1:11333",
    "clamav": "127.0.0.1:3310",
    "sophos": "127.0.0.1:4010",
}


@dataclass(frozen=True, slots=True)
class ScannerConfig:
    """One ``[[scanner]]`` table: a content scanner in the data phase (see docs/scanning.md).

    Attributes:
        type: ``spamassassin`` | ``rspamd`` | ``clamav`` | ``sophos``.
        address: ``host:port`` or ``unix:/path``; ``""`` = the type's usual port on 127.0.0.1.
        timeout: seconds for one scan (connect included).
        max_size: bytes; larger messages are not scanned (a header says so).
        on_error: ``tempfail`` (451 4.7.1, nothing unscanned slips through) or ``accept``.
        tag_score: spam score from which the message is tagged (X-Spam-* headers).
        reject_score: spam score from which the message is rejected (0 = never).
        quarantine_score: spam score from which it goes to ``quarantine_path`` (0 = never).
        quarantine_path: Maildir for quarantined messages (absolute after loading,
            relative paths against the config file's directory).
        quarantine_reply: ``accept`` (250 after quarantining) or ``reject`` (550/554).
        subject_prefix: prepended to the Subject of tagged spam (``""`` = none).
        reject_text: text of the 550 reply for spam.
        action: for virus scanners, ``reject`` (554 5.7.1) or ``quarantine``.
        per_user: spamd only: scan once per recipient with its address as ``User``.
        controller / password: rspamd controller address and password for training.
    """

    type: str = _opt("", _choice("spamassassin", "rspamd", "clamav", "sophos"))
    address: str = _opt("", _scanner_address)
    timeout: float = _opt(30.0, _positive_seconds)
    max_size: int = _opt(1_048_576, _positive_int)
    on_error: str = _opt("tempfail", _choice("tempfail", "accept"))
    tag_score: float = _opt(5.0, _nonnegative_number)
    reject_score: float = _opt(10.0, _nonnegative_number)
    quarantine_score: float = _opt(0.0, _nonnegative_number)
    quarantine_path: str = _opt("", _new_file_path)
    quarantine_reply: str = _opt("accept", _choice("accept", "reject"))
    subject_prefix: str = _opt("", _str)
    reject_text: str = _opt("Message rejected as spam", _printable_ascii("reply text", spaces=True))
    action: str = _opt("reject", _choice("reject", "quarantine"))
    per_user: bool = _opt(False, _bool)
    controller: str = _opt("", _scanner_address)
    password: str = _opt("", _str)

    @property
    def kind(self) -> str:
        """``"spam"`` or ``"virus"``."""
        return "virus" if self.type in ("clamav", "sophos") else "spam"

    @property
    def effective_address(self) -> str:
        """``address``, or the type's default when empty."""
        return self.address or SCANNER_DEFAULT_ADDRESS[self.type]

    def __repr__(self) -> str:
        return f"ScannerConfig(type={self.type!r}, address={self.effective_address!r})"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One ``[[listener]]`` table: an address with its own protocol and TLS settings.

    Attributes:
        address: ``host:port`` (``[v6]:port`` for IPv6; port 0 = any free port).
        protocol: ``smtp``, ``lmtp`` (RFC 2033), ``milter`` (the plugin chain served to
            an MTA as a milter, protocol version 6) or ``policy`` (served to Postfix as a
            policy server, SMTPD_POLICY_README); see docs/postfix.md. ``milter`` and
            ``policy`` take none of the other keys.
        tls: ``none``, ``starttls`` (RFC 3207; needs ``[tls]``) or ``implicit``
            (TLS from the first byte, RFC 8314, port 465; ZMailer listen-ssmtp).
        require_auth: submission mode (ZMailer MSA-mode): MAIL needs AUTH first.
        proxy_protocol: expect a HAProxy PROXY v1/v2 header first.
        trusted_proxies: peers (IPs/CIDRs) allowed to send that header.
    """

    address: str = _opt("", _str)
    protocol: str = _opt("smtp", _choice("smtp", "lmtp", "milter", "policy"))
    tls: str = _opt("starttls", _choice("none", "starttls", "implicit"))
    require_auth: bool = _opt(False, _bool)
    proxy_protocol: bool = _opt(False, _bool)
    trusted_proxies: tuple[str, ...] = _opt((), _each(_network))

    @property
    def listen(self) -> ListenAddress:
        """The parsed address."""
        return parse_listen(self.address)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """``[delivery]``: how accepted mail leaves smtpgate (see docs/queue.md).

    Attributes:
        mode: ``"queue"`` (store durably, answer 250, deliver later with retries) or
            ``"proxy"`` (relay synchronously: 250 only after the upstream accepted);
            ``""`` = ``queue`` when ``relay.url`` names an upstream (or ``mx:``), else
            local Maildir delivery.
        mx_port: TCP port used for MX delivery (25; tests use another).
    """

    mode: str = _opt("", _choice("", "queue", "proxy", "capture"))
    mx_port: int = _opt(25, _positive_int)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """``[queue]``: the durable spool and its delivery workers (queue mode).

    Attributes:
        path: spool directory, resolved like ``maildir.path`` (against the config
            file's directory; ``./smtpgate-queue`` in the current directory without a file).
        fsync: fsync files and directories before acknowledging (never turn off in
            production: a power loss would lose acknowledged mail).
        min_backoff / max_backoff: seconds; retry delays double from min to max.
        max_lifetime: seconds after arrival when a message still undelivered bounces.
        delay_warning: seconds after arrival to send a delay DSN (0 = never).
        workers: deliveries in flight at once.
        per_destination: deliveries in flight per destination (domain or relay).
        min_free_space: bytes; below this, new mail gets ``452 4.3.1``.
        scan_interval: seconds between spool scans for due or flushed messages.
        dsn: advertise DSN (RFC 3461) and honour NOTIFY/RET/ENVID/ORCPT.
        etrn_networks: client networks allowed to use ETRN (RFC 1985).
        delivery_process: recover and deliver in a separate process (Postfix-style
            smtpd/qmgr split; uses a second CPU core).
    """

    path: str = _opt("./smtpgate-queue", _dir_path)
    fsync: bool = _opt(True, _bool)
    min_backoff: float = _opt(300.0, _positive_seconds)
    max_backoff: float = _opt(3600.0, _positive_seconds)
    max_lifetime: float = _opt(432000.0, _positive_seconds)
    delay_warning: float = _opt(0.0, _nonnegative_seconds)
    workers: int = _opt(20, _positive_int)
    per_destination: int = _opt(5, _positive_int)
    min_free_space: int = _opt(104_857_600, _nonnegative_int)
    scan_interval: float = _opt(1.0, _positive_seconds)
    dsn: bool = _opt(True, _bool)
    etrn_networks: tuple[str, ...] = _opt(("127.0.0.0/8", "::1"), _each(_network))
    delivery_process: bool = _opt(True, _bool)


def _dns_port(value: object, _ctx: _Context) -> int:
    n = _int(value)
    if not 1 <= n <= 65535:
        raise _Invalid(f"must be a port number between 1 and 65535, got {n}")
    return n


def _nameserver(text: str) -> str:
    """``IP``, ``IPv4:PORT`` or ``[IPv6]:PORT`` (normalised)."""
    raw = text.strip()
    host, port = raw, ""
    if raw.startswith("["):
        host, _, rest = raw[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("?" if rest else "")
    elif raw.count(":") == 1:
        host, _, port = raw.partition(":")
    try:
        ip = ipaddress.ip_address(host)
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(port)
    except ValueError:
        raise _Invalid("must be an IP address, optionally with a port (127.0.0.1:5353, "
                       f"[::1]:5353), got {_show(text)}") from None
    if not port:
        return str(ip)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """``[dns]``: the one resolver configuration for everything that looks things up (MX
    delivery, and plugins such as DNSBL and SPF): dnspython's asyncio stub resolver.

    Attributes:
        nameservers: the recursive resolvers to ask: ``IP`` or ``IP:PORT``
            (``[IPv6]:PORT``); empty: the system's (``/etc/resolv.conf``).
        port: the UDP/TCP port of a nameserver given without one (53).
        timeout: seconds to wait for one server's answer.
        lifetime: seconds in total for one query, retries included.
        cache_size: answers kept in the shared cache (an LRU cache honouring each
            answer's TTL); 0 disables it.
    """

    nameservers: tuple[str, ...] = _opt((), _each(_nameserver))
    port: int = _opt(53, _dns_port)
    timeout: float = _opt(5.0, _positive_seconds)
    lifetime: float = _opt(15.0, _positive_seconds)
    cache_size: int = _opt(10000, _nonnegative_int)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "tls": TlsConfig,
    "auth": AuthConfig,
    "relay": RelayConfig,
    "maildir": MaildirConfig,
    "hooks": HooksConfig,
    "log": LogConfig,
    "admin": AdminConfig,
    "capture": CaptureConfig,
    "delivery": DeliveryConfig,
    "queue": QueueConfig,
    "dns": DnsConfig,
}


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration: one attribute per TOML section.

    Immutable; derive variants with :func:`dataclasses.replace` or :meth:`with_overrides`.
    Lists from the file are stored as tuples.

    Attributes:
        server, tls, auth, relay, maildir, hooks, log, admin, capture, delivery, queue, dns: the
            sections.
        source: where it came from (a file path, ``"<mapping>"`` or ``"<defaults>"``);
            ignored by ``==``.
    """

    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    maildir: MaildirConfig = field(default_factory=MaildirConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    scanners: tuple[ScannerConfig, ...] = ()
    listeners: tuple[ListenerConfig, ...] = ()
    helo_rules: tuple[dict[str, Any], ...] = ()
    plugins: tuple[PluginConfig, ...] = ()
    source: str = field(default="<defaults>", compare=False)

    @property
    def delivery_mode(self) -> str:
        """The effective delivery mode: ``"queue"``, ``"proxy"``, ``"capture"`` or ``"local"``.

        ``local`` (Maildir, a callable, or ``discard:``) answers after storing locally;
        ``capture`` stores in the ``[capture]`` database.
        """
        if self.delivery.mode == "capture":
            return "capture"
        url = self.relay.url
        if not url or url == "discard:":
            return "local" if self.delivery.mode != "queue" or not url else "queue"
        if url == "mx:":
            return "queue"
        return self.delivery.mode or "queue"

    @property
    def limit_exception_networks(self) -> tuple[str, ...]:
        """``server.limit_exceptions``, or ``relay.local_networks`` when it is not set."""
        exc = self.server.limit_exceptions
        return self.relay.local_networks if exc is None else exc

    @classmethod
    def default(cls) -> Config:
        """Return the configuration used when no file is given (all defaults).

        ``server.hostname`` is :func:`socket.gethostname` at call time.
        """
        return cls()

    def with_overrides(
        self, listen: list[str] | None = None, log_level: str | None = None,
        admin: str | None = None,
    ) -> Config:
        """Apply the CLI flags ``--listen ADDR`` (repeatable), ``--log-level LEVEL`` and
        ``--admin HOST:PORT``.

        Args:
            listen: replaces ``server.listen`` when not None (must hold at least one address).
            log_level: replaces ``log.level`` when not None (case-insensitive).
            admin: replaces ``admin.listen`` when not None (``""`` turns the listener off);
                checked like the file's key, including "loopback only without
                ``admin.token_file``".

        Returns:
            A new :class:`Config`; ``self`` is unchanged.

        Raises:
            ConfigError: naming ``server.listen`` / ``log.level`` / ``admin.listen`` for bad
                values.
        """
        ctx = _Context(base_dir=os.getcwd())
        problems: list[str] = []
        result = self
        if listen is not None:
            try:
                addrs = _listen(list(listen), ctx)
                if not addrs:
                    raise _Invalid("must list at least one address")
            except _Invalid as exc:
                problems += [f"server.listen{sfx} (--listen): {msg}" for sfx, msg in exc.problems]
            else:
                result = replace(result, server=replace(result.server, listen=addrs))
        if log_level is not None:
            try:
                level = _choice("DEBUG", "INFO", "WARNING", "ERROR")(log_level, ctx)
            except _Invalid as exc:
                problems += [f"log.level (--log-level): {msg}" for _, msg in exc.problems]
            else:
                result = replace(result, log=replace(result.log, level=level))
        if admin is not None:
            try:
                address = _admin_listen(admin, ctx)
            except _Invalid as exc:
                problems += [f"admin.listen (--admin): {msg}" for _, msg in exc.problems]
            else:
                section = replace(result.admin, listen=address)
                cross: list[str] = []
                _cross_checks({"admin": section}, cross)
                problems += [p.replace("admin.listen:", "admin.listen (--admin):", 1)
                             for p in cross]
                result = replace(result, admin=section)
        if problems:
            raise ConfigError(problems)
        return result


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _unknown(kind: str, key: str, name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return f"{key}: unknown {kind}{hint}"


def _load_section(
    name: str, cls: type[Any], raw: object, ctx: _Context, problems: list[str]
) -> Any:
    if not isinstance(raw, Mapping):
        problems.append(f"{name}: must be a table ([{name}]), got {_show(raw)}")
        return None
    checks = {f.name: f.metadata["check"] for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        check = checks.get(key)
        if check is None:
            problems.append(_unknown("key", dotted, str(key), checks))
            continue
        try:
            kwargs[key] = check(value, ctx)
        except _Invalid as exc:
            problems.extend(f"{dotted}{suffix}: {msg}" for suffix, msg in exc.problems)
    return cls(**kwargs)


def _array_of_tables(raw: object, key: str, problems: list[str]) -> list[object]:
    """The tables of ``[[KEY]]`` in order (one ``[KEY]`` table counts as one); ``[]`` and a
    problem for anything else."""
    if isinstance(raw, Mapping):
        return [raw]
    if not isinstance(raw, list):
        problems.append(f"{key}: must be an array of tables ([[{key}]]), got {_show(raw)}")
        return []
    return raw


def _load_scanners(raw: object, ctx: _Context, problems: list[str]) -> tuple[ScannerConfig, ...]:
    """``[[scanner]]`` tables, in order; each needs a ``type``."""
    out: list[ScannerConfig] = []
    for i, table in enumerate(_array_of_tables(raw, "scanner", problems)):
        name = f"scanner[{i}]"
        before = len(problems)
        section = _load_section(name, ScannerConfig, table, ctx, problems)
        if section is None or len(problems) > before:
            continue
        if not section.type:
            problems.append(f"{name}.type: required (spamassassin, rspamd, clamav or sophos)")
            continue
        if section.quarantine_score and not section.quarantine_path:
            problems.append(f"{name}.quarantine_path: required when quarantine_score is set")
        if section.action == "quarantine" and not section.quarantine_path:
            problems.append(f"{name}.quarantine_path: required when action = \"quarantine\"")
        out.append(section)
    return tuple(out)


def _load_listeners(
    raw: object, ctx: _Context, problems: list[str]
) -> tuple[ListenerConfig, ...]:
    """``[[listener]]`` tables, in order; each needs an ``address``."""
    out: list[ListenerConfig] = []
    for i, table in enumerate(_array_of_tables(raw, "listener", problems)):
        name = f"listener[{i}]"
        before = len(problems)
        section = _load_section(name, ListenerConfig, table, ctx, problems)
        if section is None or len(problems) > before:
            continue
        try:
            parse_listen(section.address)
        except ValueError as exc:
            problems.append(f"{name}.address: {exc}" if section.address
                            else f"{name}.address: required (host:port)")
            continue
        if section.proxy_protocol and not section.trusted_proxies:
            problems.append(f"{name}.trusted_proxies: required when proxy_protocol = true")
        if section.protocol in ("milter", "policy") and isinstance(table, Mapping):
            extra = [k for k in ("tls", "require_auth", "proxy_protocol", "trusted_proxies")
                     if k in table]
            if extra:
                problems.extend(f"{name}.{k}: not used by protocol {section.protocol!r} "
                                "(the MTA talks to its clients)" for k in extra)
                continue
            section = replace(section, tls="none")
        out.append(section)
    return tuple(out)


_PLUGIN_KEYS = ("module", "use", "name", "priority", "timeout", "on_error", "enabled")
_PLUGIN_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """One ``[[plugin]]`` table: a plugin on the chain and its options.

    The plugin itself is imported and validates its own options when the application
    is built (:func:`smtpgate.plugins.load_plugins`); here only the common keys are checked.

    Attributes:
        index: position among the ``[[plugin]]`` tables (error messages say ``plugin[N]``).
        module: a module with ``register(registry, options)`` (``""`` with ``use``).
        use: a plugin shipped with smtpgate, by short name (``""`` with ``module``).
        name: display name (default: ``use`` or ``module``).
        priority: -100..100, lower runs first; the plugin's hooks take it unless they
            set their own.
        timeout: seconds per hook call; ``None``: ``[hooks] timeout``.
        on_error: ``"tempfail"`` (a timeout or exception gives ``451 4.3.0``) or
            ``"accept"`` (the chain goes on).
        enabled: False removes the plugin (and, with ``use``, the default one of that
            name, e.g. the relay control built from ``[relay]``).
        options: every other key of the table, for the plugin to validate.
        priority_set: the table gave ``priority`` (it then overrides the plugin's own
            default priority).
    """

    index: int
    module: str = ""
    use: str = ""
    name: str = ""
    priority: int = 0
    timeout: float | None = None
    on_error: str = "tempfail"
    enabled: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    priority_set: bool = False

    @property
    def display_name(self) -> str:
        """:attr:`name`, else :attr:`use`, else :attr:`module`."""
        return self.name or self.use or self.module


def _load_plugins(raw: object, ctx: _Context, problems: list[str]) -> tuple[PluginConfig, ...]:
    """``[[plugin]]`` tables, in order; each needs ``module`` or ``use``."""
    out: list[PluginConfig] = []
    for i, table in enumerate(_array_of_tables(raw, "plugin", problems)):
        where = f"plugin[{i}]"
        if not isinstance(table, Mapping):
            problems.append(f"{where}: must be a table, got {_show(table)}")
            continue
        before = len(problems)
        values: dict[str, Any] = {}
        checks: dict[str, _Check] = {
            "module": _optional_hook_module, "use": _plugin_short_name, "name": _str,
            "priority": _int_between(-100, 100), "timeout": _positive_seconds,
            "on_error": _choice("tempfail", "accept"), "enabled": _bool,
        }
        for key in _PLUGIN_KEYS:
            if key in table:
                try:
                    values[key] = checks[key](table[key], ctx)
                except _Invalid as exc:
                    problems.extend(f"{where}.{key}{sfx}: {msg}" for sfx, msg in exc.problems)
        if bool(values.get("module")) == bool(values.get("use")) and len(problems) == before:
            problems.append(f"{where}: exactly one of 'module' (your plugin) or 'use' "
                            "(a shipped plugin) is required")
        if len(problems) > before:
            continue
        options = {str(k): v for k, v in table.items() if k not in _PLUGIN_KEYS}
        out.append(PluginConfig(index=i, options=options, priority_set="priority" in values,
                                **values))
    return tuple(out)


def _optional_hook_module(value: object, ctx: _Context) -> str:
    text = _str(value, ctx)
    if not all(part.isidentifier() for part in text.split(".")):
        raise _Invalid(f"not a Python module name: {_show(text)}")
    return text


def _plugin_short_name(value: object, ctx: _Context) -> str:
    text = _str(value, ctx)
    if not _PLUGIN_NAME_RE.match(text):
        raise _Invalid(f"not a plugin name: {_show(text)} (lower case letters, digits, - or _)")
    return text


def _int_between(low: int, high: int) -> _Check:
    def check(value: object, _ctx: _Context) -> int:
        n = _int(value)
        if not low <= n <= high:
            raise _Invalid(f"must be between {low} and {high}, got {n}")
        return n

    return check


def _cross_checks(sections: Mapping[str, Any], problems: list[str]) -> None:
    server = sections.get("server")
    if isinstance(server, ServerConfig) and not server.listen and not sections.get("listeners"):
        problems.append("server.listen: empty, and no [[listener]]: nothing to listen on")
    admin = sections.get("admin")
    if isinstance(admin, AdminConfig) and admin.listen and not admin.token_file:
        host = parse_listen(admin.listen).host
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            problems.append(f"admin.listen: {admin.listen} is not a loopback address; set "
                            "admin.token_file to serve the admin API on other addresses")
    tls = sections.get("tls")
    if isinstance(tls, TlsConfig) and not tls.certificate:
        for key in ("key", "cafile", "capath"):
            if getattr(tls, key):
                problems.append(f"tls.{key}: set, but tls.certificate is empty (TLS is off)")
    delivery = sections.get("delivery")
    relay = sections.get("relay")
    mode = delivery.mode if isinstance(delivery, DeliveryConfig) else ""
    url = relay.url if isinstance(relay, RelayConfig) else ""
    if mode == "queue" and url in ("", "discard:"):
        shown = "is empty (Maildir delivery)" if not url else 'is "discard:"'
        problems.append(
            'delivery.mode: "queue" needs an upstream in relay.url (smtp://, smtp+starttls://, '
            f'smtps://, plain:// or mx:), but relay.url {shown}; remove mode to deliver locally'
        )
    elif mode == "proxy" and url in ("", "discard:", "mx:"):
        shown = {"": "is empty (Maildir delivery)", "discard:": 'is "discard:"',
                 "mx:": 'is "mx:" (MX delivery needs queue mode)'}[url]
        problems.append(
            'delivery.mode: "proxy" needs an upstream in relay.url (smtp://, smtp+starttls://, '
            f"smtps:// or plain://), but relay.url {shown}"
        )


#: Directory keys whose default is resolved against the config file's directory when a
#: file is loaded (see :func:`config_from_mapping`).
_DEFAULT_DIRS: tuple[tuple[str, str], ...] = (
    ("maildir", "path"), ("queue", "path"), ("capture", "database"))


def _resolve_default_dirs(sections: dict[str, Any], base_dir: str) -> None:
    """Resolve the default of every key in :data:`_DEFAULT_DIRS` the data left out."""
    for name, key in _DEFAULT_DIRS:
        cls = _SECTIONS[name]
        section = sections.get(name) or cls()
        default = getattr(cls(), key)
        if getattr(section, key) == default:
            path = os.path.abspath(os.path.join(base_dir, str(default)))
            sections[name] = replace(section, **{key: path})


def config_from_mapping(
    data: Mapping[str, Any],
    source: str = "<mapping>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Build and validate a :class:`Config` from a parsed-TOML-shaped mapping.

    Args:
        data: ``{"server": {...}, "tls": {...}, ...}``; missing sections and keys take
            their defaults.
        source: a name for where ``data`` came from, kept in :attr:`Config.source`.
        base_dir: directory that relative paths (``[tls]``, ``[auth]``, ``relay.cafile``,
            ``maildir.path``, ``queue.path``, ``server.pid_file``,
            ``scanner.quarantine_path``) are resolved against; defaults to the current
            directory. When given (:func:`load_config` passes the file's directory), the
            defaults ``./smtpgate-mail`` and ``./smtpgate-queue`` are resolved against it
            too; without it they stay relative to the current directory.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: listing every problem, each starting with its dotted key.
    """
    ctx = _Context(base_dir=os.fspath(base_dir) if base_dir is not None else os.getcwd())
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, raw in data.items():
        if name == "scanner":
            sections["scanners"] = _load_scanners(raw, ctx, problems)
            continue
        if name == "listener":
            sections["listeners"] = _load_listeners(raw, ctx, problems)
            continue
        if name == "plugin":
            sections["plugins"] = _load_plugins(raw, ctx, problems)
            continue
        if name == "helo_rule":
            # The helo_rules plugin validates the tables (patterns, flags, limits) when
            # the chain is built: check-config and serve report its problems.
            tables = [raw] if isinstance(raw, Mapping) else raw
            if not isinstance(tables, list) or not all(isinstance(t, Mapping)
                                                       for t in tables):
                problems.append(f"helo_rule: must be an array of tables ([[helo_rule]]), "
                                f"got {_show(raw)}")
            else:
                sections["helo_rules"] = tuple(dict(t) for t in tables)
            continue
        if name == "logging":  # the older name of [log]
            if "log" in data:
                problems.append("logging: [logging] is the older name of [log]; use one of them")
                continue
            name = "log"
        cls = _SECTIONS.get(name)
        if cls is None:
            known = [*_SECTIONS, "logging", "scanner", "listener", "helo_rule", "plugin"]
            problems.append(_unknown("section", str(name), str(name), known))
            continue
        section = _load_section(name, cls, raw, ctx, problems)
        if section is not None:
            sections[name] = section
    _cross_checks(sections, problems)
    if problems:
        raise ConfigError(problems)
    if base_dir is not None:
        _resolve_default_dirs(sections, ctx.base_dir)
    return Config(**sections, source=source)


_TOML_POS_RE = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)$")


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a TOML configuration file (see docs/configuration.md).

    Args:
        path: the file; ``None`` returns :meth:`Config.default`.

    Returns:
        The validated configuration; ``source`` is the path as given.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid TOML (the problem names
            the file and line), or has invalid values (every problem, by dotted key).
    """
    if path is None:
        return Config.default()
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{name}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read configuration file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        pos = _TOML_POS_RE.search(message)
        if pos and pos.group(1):
            where = f"{name}, line {pos.group(1)}, column {pos.group(2)}"
            message = message[: pos.start()]
        elif pos:
            where = f"{name}, at end of file"
            message = message[: pos.start()]
        else:
            where = name
        raise ConfigError(f"{where}: TOML syntax error: {message}") from None
    base_dir = os.path.dirname(os.path.abspath(name))
    config = config_from_mapping(data, source=name, base_dir=base_dir)
    _log.debug("configuration loaded from %s", name)
    return config


__all__ = [
    "AuthConfig",
    "ListenerConfig",
    "DeliveryConfig",
    "QueueConfig",
    "ScannerConfig",
    "Config",
    "HooksConfig",
    "ListenAddress",
    "LogConfig",
    "MaildirConfig",
    "RelayConfig",
    "ServerConfig",
    "TlsConfig",
    "config_from_mapping",
    "load_config",
    "parse_listen",
    "redact_url",
]

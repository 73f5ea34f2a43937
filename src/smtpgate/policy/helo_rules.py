"""ZMailer-style HELO-glob table: per-client "style" flags chosen by the HELO/EHLO name.

Entry points: :class:`HeloRules` (``from_config``, ``match``), :class:`HeloPolicy`,
:func:`check_helo_syntax`, :func:`strict_address_ok`,
:func:`parse_zmailer_table`. RFCs: 5321 §4.1.1.1 (HELO/EHLO argument), §4.1.2
(Domain, address literals), §4.1.3, §4.1.1.3 (Postmaster), 1035 §2.3.1 / 1123 §2.1 (labels).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..reply import Reply

__all__ = [
    "BAD_HELO",
    "DEFAULT_FLAGS",
    "DEFAULT_REFUSE_TEXT",
    "FLAG_MEANINGS",
    "HeloPolicy",
    "HeloRule",
    "HeloRules",
    "check_helo_syntax",
    "glob_to_regex",
    "parse_zmailer_table",
    "strict_address_ok",
]

logger = logging.getLogger("smtpgate.policy.helo_rules")

#: ZMailer's compiled-in style when no rule matches (``-s`` default): ``ve``.
DEFAULT_FLAGS = "ve"

#: ZMailer's text for a bare ``!`` rule.
DEFAULT_REFUSE_TEXT = "Sorry, access denied."

#: Reply when the ``h`` flag is on and the HELO/EHLO argument is not a domain or literal.
BAD_HELO = Reply(
    501, "5.5.4", "Invalid HELO/EHLO argument: expected a domain name or an address literal"
)

#: Every style flag smtpgate accepts, with its meaning (ZMailer smtpserver(8) ``-s``).
FLAG_MEANINGS: dict[str, str] = {
    "f": "verify MAIL FROM addresses through the [hooks] address_check hook",
    "t": "verify RCPT TO addresses through the [hooks] address_check hook",
    "v": "verify the VRFY argument through the address-check hook (and advertise VRFY)",
    "e": "verify the EXPN argument through the address-check hook (and advertise EXPN)",
    "R": "strict addresses: MAIL/RCPT paths must be local@domain (RCPT <Postmaster> excepted)",
    "S": "sloppy MAIL FROM: accept 'MAIL FROM:user@domain' without angle brackets",
    "h": "check the HELO/EHLO argument: a FQDN or an address literal, else 501 5.5.4",
    "D": "accepted for ZMailer compatibility and ignored (kept timed-out partial messages)",
    "-": "no flags (ZMailer's placeholder)",
}
_FLAG_CHARS = frozenset(FLAG_MEANINGS)

_RULE_KEYS = ("pattern", "flags", "refuse", "max_load_average")
_MAX_REFUSE_TEXT = 400  # an SMTP reply line is at most 512 octets (RFC 5321 §4.5.3.1.5)

# RFC 5321 §4.1.2 sub-domain = Let-dig [Ldh-str]; at most 63 octets (RFC 1035 §2.3.4).
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_MAX_DOMAIN = 253  # RFC 1035 §3.1: 255 octets on the wire = 253 as text


# ---------------------------------------------------------------------------- glob patterns


def _class_char(ch: str) -> str:
    """Escape one character for use inside a regex character class."""
    return "\\" + ch if ch in "\\]^-[" else ch


def glob_to_regex(pattern: str) -> str:
    r"""Translate a shell glob (ZMailer ``strmatch``) into a regular expression.

    Supported: ``*`` (any run, including dots), ``?`` (one character), ``[...]``
    classes with ``!`` negation and ``a-z`` ranges, and ``\x`` escapes, which
    fnmatch lacks and ZMailer's sample table needs (``\[*\]`` matches an address
    literal). An unclosed ``[`` and a trailing ``\`` are literal characters;
    a reversed range (``[z-a]``) matches nothing, as in fnmatch.

    Args:
        pattern: the glob text.

    Returns:
        A regex source string that matches the whole subject (``re.fullmatch``
        semantics via a trailing ``\Z``); compile it with ``re.IGNORECASE``.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "\\":
            if i < n:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                out.append(re.escape("\\"))
        elif c == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            parsed = _parse_class(pattern, i)
            if parsed is None:
                out.append(re.escape("["))
            else:
                regex, i = parsed
                out.append(regex)
        else:
            out.append(re.escape(c))
    return "(?s:" + "".join(out) + r")\Z"


def _parse_class(pattern: str, start: int) -> tuple[str, int] | None:
    """Parse a ``[...]`` class whose ``[`` is just before ``start``.

    Returns ``(regex, index after ']')`` or None when the class is not closed.
    """
    n = len(pattern)
    k = start
    negate = k < n and pattern[k] == "!"
    if negate:
        k += 1
    items: list[tuple[str, bool]] = []  # (character, escaped)
    first = True
    while k < n:
        ch = pattern[k]
        if ch == "]" and not first:
            break
        first = False
        if ch == "\\" and k + 1 < n:
            items.append((pattern[k + 1], True))
            k += 2
            continue
        items.append((ch, False))
        k += 1
    else:
        return None
    parts: list[str] = []
    j = 0
    while j < len(items):
        lo = items[j][0]
        if j + 2 < len(items) and items[j + 1] == ("-", False):
            hi = items[j + 2][0]
            if lo <= hi:
                parts.append(f"{_class_char(lo)}-{_class_char(hi)}")
            j += 3
        else:
            parts.append(_class_char(lo))
            j += 1
    body = "".join(parts)
    if not body:
        regex = "." if negate else "(?!)"
    else:
        regex = f"[{'^' if negate else ''}{body}]"
    return regex, k + 1


# ---------------------------------------------------------------------------- syntax checks


def _valid_literal(text: str) -> bool:
    """``[IPv4]`` or ``[IPv6:...]`` (RFC 5321 §4.1.3); the brackets are included."""
    if len(text) < 3 or not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    if not inner.isascii() or "%" in inner or any(ch.isspace() for ch in inner):
        return False
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def _valid_domain(name: str) -> bool:
    """A fully qualified domain: LDH labels, at least two, top label not all-numeric."""
    if not name.isascii() or len(name) > _MAX_DOMAIN:
        return False
    labels = name.split(".")
    if len(labels) < 2:
        return False
    if not all(_LABEL_RE.match(label) for label in labels):
        return False
    return not labels[-1].isdigit()  # RFC 1123 §2.1: a bare dotted quad is not a name


def check_helo_syntax(name: str) -> bool:
    """True when a HELO/EHLO argument is a FQDN or an address literal (RFC 5321 §4.1.1.1).

    A FQDN here is at least two letter-digit-hyphen labels separated by dots
    (RFC 5321 §4.1.2 ``Domain``, RFC 1035 §2.3.1), each 1..63 octets, 253 characters in
    all (the DNS limit), no trailing root dot, and a top-level label that is not all digits (a bare
    ``192.0.2.1`` must be written ``[192.0.2.1]``, RFC 1123 §2.1). Literals are
    ``[IPv4]`` or ``[IPv6:...]`` checked with :mod:`ipaddress` (no zone index).
    ZMailer's ``-h`` switch made this check; the ``h`` style flag turns it on per rule.

    Args:
        name: the argument as received (surrounding whitespace makes it invalid).

    Returns:
        Whether the syntax is acceptable. Never raises.
    """
    if not isinstance(name, str) or not name:
        return False
    if name.startswith("["):
        return _valid_literal(name)
    return _valid_domain(name)


def strict_address_ok(address: str, *, recipient: bool) -> bool:
    """The ``R`` flag's check: is ``address`` a complete ``local@domain`` mailbox?

    ZMailer's ``R`` demands "addresses to be of syntax: local@remote (strict 2821)".
    The null reverse-path (``""``) stays legal for MAIL FROM, and RCPT TO
    ``<Postmaster>`` without a domain stays legal because RFC 5321 §4.1.1.3 requires
    servers to accept it. The domain must pass the same test as :func:`check_helo_syntax`.

    Args:
        address: the mailbox without angle brackets, after the ordinary path parser.
        recipient: True for RCPT TO, False for MAIL FROM.

    Returns:
        Whether the address satisfies the strict rule. Never raises.
    """
    if address == "":
        return not recipient
    if recipient and address.lower() == "postmaster":
        return True
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return False
    return check_helo_syntax(domain)


# ---------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class HeloRule:
    """One line of the HELO-glob table.

    Attributes:
        pattern: shell glob (see :func:`glob_to_regex`), matched case-insensitively
            against the whole HELO/EHLO argument.
        flags: style flags, each a key of :data:`FLAG_MEANINGS` (``""`` = none).
        refuse: reply text for a client whose HELO matches; ``None`` = do not refuse
            (ZMailer's ``!message`` flags).
        max_load_average: 1-minute load average above which matching clients are
            told to come back later (421); ``None`` = no limit (ZMailer's 999).
    """

    pattern: str
    flags: str = ""
    refuse: str | None = None
    max_load_average: float | None = None
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(glob_to_regex(self.pattern), re.IGNORECASE))

    def matches(self, helo: str) -> bool:
        """True when ``helo`` matches :attr:`pattern` (case-insensitive, whole string)."""
        return self._regex.match(helo) is not None


@dataclass(frozen=True, slots=True)
class HeloPolicy:
    """The style in force for one session after HELO/EHLO (or before it: the default).

    Attributes:
        flags: the style flag string in force.
        refuse_text: text of the refusal, or None.
        max_load_average: load-average limit for this client, or None.
        pattern: the rule's pattern, or None when the default style applies.
        index: the rule's position in the table, or None for the default.
    """

    flags: str = DEFAULT_FLAGS
    refuse_text: str | None = None
    max_load_average: float | None = None
    pattern: str | None = None
    index: int | None = None

    @property
    def verify_sender(self) -> bool:
        """``f``: pass MAIL FROM addresses to the address-check hook."""
        return "f" in self.flags

    @property
    def verify_recipient(self) -> bool:
        """``t``: pass RCPT TO addresses to the address-check hook."""
        return "t" in self.flags

    @property
    def verify_vrfy(self) -> bool:
        """``v``: pass the VRFY argument to the address-check hook; advertise VRFY."""
        return "v" in self.flags

    @property
    def verify_expn(self) -> bool:
        """``e``: pass the EXPN argument to the address-check hook; advertise EXPN."""
        return "e" in self.flags

    @property
    def strict_addresses(self) -> bool:
        """``R``: require ``local@domain`` paths (see :func:`strict_address_ok`)."""
        return "R" in self.flags

    @property
    def sloppy_mail_from(self) -> bool:
        """``S``: accept MAIL FROM without angle brackets
        (see :func:`smtpgate.protocol.grammar.sloppy_path`)."""
        return "S" in self.flags

    @property
    def check_helo(self) -> bool:
        """``h``: the HELO/EHLO argument must pass :func:`check_helo_syntax`."""
        return "h" in self.flags

    @property
    def refused(self) -> bool:
        """True when the matching rule refuses the client."""
        return self.refuse_text is not None

    @property
    def refuse_reply(self) -> Reply | None:
        """``550 5.7.1 <refuse_text>`` for a refusing rule, else None.

        ZMailer answered ``501`` and kept the session open; smtpgate answers
        550 5.7.1 (RFC 5321 §4.3.2 lists 550 for HELO/EHLO, RFC 3463 5.7.1 "delivery
        not authorized") and also keeps the session open without recording the HELO.
        """
        if self.refuse_text is None:
            return None
        return Reply(550, "5.7.1", self.refuse_text)


def _text_ok(text: str) -> bool:
    return all(ch.isprintable() for ch in text)


def _check_flags(flags: Any, key: str, problems: list[str]) -> str:
    if not isinstance(flags, str):
        problems.append(f"{key}: expected a string of style flags, got {flags!r}")
        return ""
    bad = sorted({ch for ch in flags if ch not in _FLAG_CHARS})
    if bad:
        known = "".join(ch for ch in FLAG_MEANINGS if ch != "-")
        problems.append(f"{key}: unknown style flag(s) {''.join(bad)!r} (known: {known} and '-')")
    return flags


def _check_load(value: Any, where: str, problems: list[str]) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{where}.max_load_average: expected a number, got {value!r}")
        return None
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        problems.append(f"{where}.max_load_average: must be a positive number, got {value!r}")
        return None
    return number


def _check_refuse(value: Any, where: str, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}.refuse: expected a non-empty reply text, got {value!r}")
        return None
    if not _text_ok(value) or len(value) > _MAX_REFUSE_TEXT:
        problems.append(
            f"{where}.refuse: must be printable text on one line, "
            f"at most {_MAX_REFUSE_TEXT} characters"
        )
        return None
    return value.strip()


def _rule_from_mapping(i: int, entry: Any, key: str, problems: list[str]) -> HeloRule | None:
    where = f"{key}[{i}]"
    if not isinstance(entry, Mapping):
        problems.append(f"{where}: expected a table with pattern/flags/refuse/max_load_average")
        return None
    before = len(problems)
    for k in entry:
        if k not in _RULE_KEYS:
            problems.append(f"{where}.{k}: unknown key (expected one of {', '.join(_RULE_KEYS)})")
    pattern = entry.get("pattern")
    if pattern is None:
        problems.append(f"{where}.pattern: required")
    elif not isinstance(pattern, str) or not pattern:
        problems.append(f"{where}.pattern: expected a non-empty glob string, got {pattern!r}")
    elif not _text_ok(pattern) or any(ch.isspace() for ch in pattern):
        problems.append(f"{where}.pattern: must be printable and contain no whitespace")
    raw_flags = entry.get("flags", "")
    refuse = _check_refuse(entry.get("refuse"), where, problems)
    if isinstance(raw_flags, str) and raw_flags.startswith("!"):
        # ZMailer spelling: flags "!message" refuses with that message.
        if "refuse" in entry:
            problems.append(f"{where}.flags: '!message' and refuse are both set; use refuse")
        text = raw_flags[1:].strip()
        refuse = _check_refuse(text or DEFAULT_REFUSE_TEXT, where, problems)
        flags = ""
    else:
        flags = _check_flags(raw_flags, f"{where}.flags", problems)
        if refuse is not None and flags.strip("-"):
            problems.append(f"{where}.flags: must be empty when refuse is set")
    load = _check_load(entry.get("max_load_average"), where, problems)
    if len(problems) != before:
        return None
    assert isinstance(pattern, str)
    if "D" in flags:
        logger.info("%s: style flag D is accepted for ZMailer compatibility and ignored", where)
    return HeloRule(pattern=pattern, flags=flags, refuse=refuse, max_load_average=load)


class HeloRules:
    """The ordered HELO-glob table; the first rule whose pattern matches wins.

    ZMailer matched the table against the HELO/EHLO argument only (``findcf()`` on
    the argument in ``smtp_helo``); before HELO, and when no rule matches, its
    global ``-s`` style applied. smtpgate does the same: :meth:`match` looks at the
    HELO/EHLO argument, and ``client_ip`` is used for logging only. To treat clients
    that introduce themselves with an address literal, match the literal
    (``\\[*\\]`` or ``\\[192.0.2.*\\]``), as ZMailer's sample table does.

    Usage in a session: ``policy = rules.match(arg, peer_ip)``; if
    ``policy.refuse_reply`` send it and keep waiting for HELO; if ``policy.check_helo``
    and not ``check_helo_syntax(arg)`` send :data:`BAD_HELO`; if the load average is
    over ``policy.max_load_average`` send 421 and close; else keep ``policy`` for
    MAIL/RCPT/VRFY/EXPN (``verify_*``, ``strict_addresses``, ``sloppy_mail_from``).

    Args:
        rules: the table, in order.
        default_flags: the style before HELO and when no rule matches (ZMailer ``-s``,
            default ``"ve"``).

    Raises:
        ConfigError: when ``default_flags`` holds an unknown flag.
    """

    def __init__(self, rules: Iterable[HeloRule] = (), default_flags: str = DEFAULT_FLAGS) -> None:
        problems: list[str] = []
        _check_flags(default_flags, "default_flags", problems)
        if problems:
            raise ConfigError(problems)
        self._rules: tuple[HeloRule, ...] = tuple(rules)
        self._default = HeloPolicy(flags=default_flags)

    @classmethod
    def from_config(
        cls,
        entries: Sequence[Any] | None,
        *,
        default_flags: str = DEFAULT_FLAGS,
        key: str = "helo_rule",
    ) -> HeloRules:
        """Build the table from ``[[helo_rule]]`` TOML tables.

        Each entry is a mapping with ``pattern`` (required), ``flags`` (default
        ``""``; a ZMailer-style ``"!message"`` means ``refuse = "message"``),
        ``refuse`` and ``max_load_average``.

        Args:
            entries: the parsed ``[[helo_rule]]`` list (None or empty = no rules).
            default_flags: see :class:`HeloRules`.
            key: name used in error messages (``helo_rule[2].flags: ...``).

        Returns:
            The validated table.

        Raises:
            ConfigError: listing every problem, each naming ``key[i].field``.
        """
        problems: list[str] = []
        rules: list[HeloRule] = []
        if entries is not None and (
            isinstance(entries, str | bytes | Mapping) or not isinstance(entries, Sequence)
        ):
            raise ConfigError(f"{key}: expected an array of tables ([[{key}]])")
        for i, entry in enumerate(entries or ()):
            rule = _rule_from_mapping(i, entry, key, problems)
            if rule is not None:
                rules.append(rule)
        _check_flags(default_flags, "default_flags", problems)
        if problems:
            raise ConfigError(problems)
        return cls(rules, default_flags=default_flags)

    @property
    def rules(self) -> tuple[HeloRule, ...]:
        """The table, in order."""
        return self._rules

    @property
    def default(self) -> HeloPolicy:
        """The policy before HELO and when no rule matches."""
        return self._default

    def __len__(self) -> int:
        return len(self._rules)

    def match(self, helo: str, client_ip: str = "") -> HeloPolicy:
        """Pick the style for a client by its HELO/EHLO argument (first match wins).

        Args:
            helo: the HELO/EHLO argument as received (surrounding blanks are ignored).
            client_ip: the client's address, used in the log line only.

        Returns:
            The matching rule's policy, or :attr:`default` when no rule matches.
        """
        name = helo.strip(" \t")
        for i, rule in enumerate(self._rules):
            if rule.matches(name):
                logger.debug(
                    "helo %r from %s matches helo_rule[%d] %r", name, client_ip, i, rule.pattern
                )
                return HeloPolicy(
                    flags=rule.flags,
                    refuse_text=rule.refuse,
                    max_load_average=rule.max_load_average,
                    pattern=rule.pattern,
                    index=i,
                )
        logger.debug("helo %r from %s matches no helo_rule; default style", name, client_ip)
        return self._default


# ---------------------------------------------------------------------------- migration


_ZMAILER_NO_LIMIT = 999


def parse_zmailer_table(text: str) -> list[dict[str, Any]]:
    """Read the HELO-glob lines of a ZMailer ``smtpserver.conf`` (for migration).

    Follows ZMailer's ``readcffile()``: lines starting with ``#`` or whitespace and
    ``PARAM`` lines are skipped; a line is ``pattern [maxloadavg] flags``; the
    pattern is lower-cased; a load limit below 2 is raised to 2 and 999 (ZMailer's
    "never") becomes no limit; flags starting with ``!`` are a refusal message.

    Args:
        text: the file's contents.

    Returns:
        Mappings ready for :meth:`HeloRules.from_config` (keys ``pattern``,
        ``flags``, and ``refuse`` / ``max_load_average`` when set). Flags are not
        validated here.
    """
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line or line[0] == "#" or line[0].isspace():
            continue
        if line.startswith("PARAM"):
            continue
        head = re.match(r"(\S+)[ \t]*(.*)", line)
        if head is None:  # pragma: no cover - a non-blank first character always matches
            continue
        pattern, rest = head.group(1), head.group(2)
        entry: dict[str, Any] = {"pattern": pattern.lower()}
        m = re.match(r"\d+", rest)
        if m:
            limit = max(2, int(m.group()))
            if limit < _ZMAILER_NO_LIMIT:
                entry["max_load_average"] = float(limit)
            rest = rest[m.end() :].lstrip(" \t")
        flags = rest.rstrip()
        if flags.startswith("!"):
            entry["flags"] = ""
            entry["refuse"] = flags[1:].strip() or DEFAULT_REFUSE_TEXT
        else:
            entry["flags"] = flags
        out.append(entry)
    return out

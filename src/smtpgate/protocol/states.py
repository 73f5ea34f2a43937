"""The protocol core's state machine as data: what each input may do in each state.

Entry points: :class:`State`, :class:`Rule`, :class:`Success`, :data:`TRANSITIONS`,
:func:`rule`, and the pseudo-inputs :data:`GREETING`, :data:`END_OF_DATA`,
:data:`SASL`, :data:`CREDENTIALS`, :data:`TLS_HANDSHAKE`, :data:`UNKNOWN`. RFC 5321 §3 and §4.1.4
(command order), RFC 3030 (BDAT), RFC 3207 (STARTTLS), RFC 4954 (AUTH), RFC 2033.

Every state transition of :class:`~smtpgate.protocol.ServerConnection` lives in
:data:`TRANSITIONS` (as h11's ``_state.py``), keyed by ``(state, input)``. An input
is an upper-case command verb as the client sent it (``"MAIL"``) or one of the
lower-case pseudo-inputs below. A :class:`Rule` says whether the input is allowed
in that state, which reply refuses it when not, and which state follows the reply
sent to it. The connection consults the table and never assigns a state itself,
with one exception valid in every state: any ``421`` reply, the error and
unknown-command limits and ``close_reply()`` end in :attr:`State.CLOSED`.

This module knows nothing about bytes, arguments or configuration. Checks that
depend on them (syntax, a disabled extension, ``require_auth``) stay in the
command handlers and, where they came first before, still come first (DATA with
an argument is ``501`` in every state).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..reply import R, Reply


class State(enum.Enum):
    """Session states (RFC 5321 §3, §4.1.4)."""

    GREETING = "GREETING"  # nothing sent yet; the driver must send the greeting
    REJECTED = "REJECTED"  # greeting was 554: only QUIT (and NOOP/HELP) are allowed
    INIT = "INIT"  # greeted, waiting for HELO/EHLO
    READY = "READY"  # HELO/EHLO done, no transaction
    MAIL = "MAIL"  # MAIL accepted, no recipient yet
    RCPT = "RCPT"  # at least one recipient accepted
    DATA = "DATA"  # reading message text
    BDAT = "BDAT"  # at least one BDAT chunk accepted, more to come (RFC 3030)
    AUTH = "AUTH"  # SASL exchange in progress
    TLS_PENDING = "TLS_PENDING"  # 220 sent to STARTTLS, handshake not yet done
    CLOSED = "CLOSED"

    # Members are singletons compared by identity: hash them by identity too (C speed)
    # rather than through Enum.__hash__, a Python call for every (state, input)
    # lookup in TRANSITIONS (hot path: several per command).
    __hash__ = object.__hash__


class Success(enum.Enum):
    """Which reply codes mean that an input succeeded (so :attr:`Rule.then` applies)."""

    POSITIVE = "2xx"  # any 2xx (MAIL, RCPT, HELO, RSET, a BDAT chunk)
    CODE_220 = "220"  # the greeting, STARTTLS
    CODE_334 = "334"  # AUTH / a SASL response answered with a further challenge
    CODE_354 = "354"  # DATA: go ahead
    ANY = "any"  # every reply (QUIT, the end of a message)

    def matches(self, code: int) -> bool:
        """Whether reply ``code`` (100..599) counts as success under this rule."""
        low, high = _SUCCESS_CODES[self]
        return low <= code < high


#: The reply codes ``low <= code < high`` each :class:`Success` accepts.
_SUCCESS_CODES: dict[Success, tuple[int, int]] = {
    Success.POSITIVE: (200, 300),
    Success.CODE_220: (220, 221),
    Success.CODE_334: (334, 335),
    Success.CODE_354: (354, 355),
    Success.ANY: (100, 600),
}


@dataclass(frozen=True, slots=True)
class Rule:
    """What one input may do in one state.

    Attributes:
        refusal: ``None`` when the input is allowed; else the reply that refuses it.
        refusal_after_refused_rcpt: when set, the refusal to use instead once a
            RCPT has been refused in this transaction (``554 5.5.1 No valid
            recipients`` rather than ``503 5.5.1 Need RCPT``, RFC 5321 §3.3).
        first: the refusal is given before anything else about the line is looked
            at (its arguments, UTF-8, a disabled extension): a session whose
            greeting was ``554`` refuses every command but QUIT, NOOP and HELP
            (RFC 5321 §3.1). Otherwise the command's handler asks at its own point.
        then: state after a successful reply (see ``on``); ``None``: unchanged.
        on: which replies count as success.
        otherwise: state after any other reply; ``None``: unchanged.
    """

    refusal: Reply | None = None
    refusal_after_refused_rcpt: Reply | None = None
    first: bool = False
    then: State | None = None
    on: Success = Success.POSITIVE
    otherwise: State | None = None
    #: ``on`` as a range of codes, ``success_low <= code < success_high`` (derived).
    success_low: int = field(default=200, init=False, repr=False, compare=False)
    success_high: int = field(default=300, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        low, high = _SUCCESS_CODES[self.on]
        object.__setattr__(self, "success_low", low)
        object.__setattr__(self, "success_high", high)

    @property
    def allowed(self) -> bool:
        """True when the input is accepted in this state."""
        return self.refusal is None


# Pseudo-inputs (lower case, so they never collide with a command verb).
GREETING = "greeting"
"""The driver's first reply: ``220`` opens the session, another code rejects it."""
END_OF_DATA = "end-of-data"
"""The reply to a complete message (``<CRLF>.<CRLF>`` or ``BDAT ... LAST``)."""
SASL = "sasl-response"
"""A line of an AUTH exchange (RFC 4954 §4), or its abortion by an over-long line."""
CREDENTIALS = "credentials"
"""The reply to complete SASL credentials (235, 535, 454): the exchange is over."""
TLS_HANDSHAKE = "tls-handshake"
"""The driver reports the STARTTLS handshake done (RFC 3207 §4.2)."""
UNKNOWN = "unknown-command"
"""A command line whose verb the core does not know."""

COMMAND_STATES: tuple[State, ...] = (
    State.REJECTED, State.INIT, State.READY, State.MAIL, State.RCPT, State.BDAT,
)
"""States in which a line is read as a command (every verb has a rule in each)."""

_DATA_TX = Reply(503, "5.5.1", "Command not permitted during a mail transaction")
_NO_RCPT_YET = Reply(503, "5.5.1", "Need RCPT command first")
_DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA not permitted after BDAT in one transaction")
_RCPT_AFTER_BDAT = Reply(503, "5.5.1", "RCPT not permitted after BDAT")
REJECTED_SESSION = Reply(503, "5.5.1", "Session rejected; only QUIT is allowed")

_OK = Rule()
_HELO_FIRST = Rule(R.HELO_FIRST)
_NEED_MAIL = Rule(R.NEED_MAIL)
_IN_TX = Rule(_DATA_TX)
_NEED_RCPT = Rule(_NO_RCPT_YET, refusal_after_refused_rcpt=R.NO_VALID_RECIPIENTS)
_TO_READY = Rule(then=State.READY)


def _row(init: Rule, ready: Rule, mail: Rule, rcpt: Rule, bdat: Rule) -> dict[State, Rule]:
    return {
        State.INIT: init, State.READY: ready, State.MAIL: mail, State.RCPT: rcpt,
        State.BDAT: bdat,
    }


_ALWAYS = _row(_OK, _OK, _OK, _OK, _OK)
_NESTED = Rule(R.NESTED_MAIL)
_AUTH_IN_TX = Rule(R.AUTH_IN_TRANSACTION)
_QUIT = Rule(then=State.CLOSED, on=Success.ANY)

# verb -> {state: rule} for the command states other than REJECTED (added below).
_COMMANDS: dict[str, dict[State, Rule]] = {
    # columns: INIT, READY, MAIL, RCPT, BDAT
    # HELO/EHLO/LHLO: any time; a 2xx starts over without a transaction (§4.1.4).
    "HELO": _row(_TO_READY, _TO_READY, _TO_READY, _TO_READY, _TO_READY),
    "EHLO": _row(_TO_READY, _TO_READY, _TO_READY, _TO_READY, _TO_READY),
    "LHLO": _row(_TO_READY, _TO_READY, _TO_READY, _TO_READY, _TO_READY),
    "MAIL": _row(_HELO_FIRST, Rule(then=State.MAIL), _NESTED, _NESTED, _NESTED),
    "RCPT": _row(
        _NEED_MAIL, _NEED_MAIL, Rule(then=State.RCPT), Rule(then=State.RCPT),
        Rule(_RCPT_AFTER_BDAT),
    ),
    "DATA": _row(
        _HELO_FIRST, _NEED_MAIL, _NEED_RCPT, Rule(then=State.DATA, on=Success.CODE_354),
        Rule(_DATA_AFTER_BDAT),
    ),
    # A chunk accepted (250) enters or stays in BDAT; the last one is END_OF_DATA.
    "BDAT": _row(
        _HELO_FIRST, _NEED_MAIL, _NEED_RCPT, Rule(then=State.BDAT), Rule(then=State.BDAT)
    ),
    "RSET": _row(_OK, _TO_READY, _TO_READY, _TO_READY, _TO_READY),
    "NOOP": _ALWAYS,
    "HELP": _ALWAYS,
    "QUIT": _row(_QUIT, _QUIT, _QUIT, _QUIT, _QUIT),
    "VRFY": _ALWAYS,
    "EXPN": _ALWAYS,
    "TURN": _ALWAYS,
    "SEND": _ALWAYS,
    "SOML": _ALWAYS,
    "SAML": _ALWAYS,
    "ETRN": _row(_HELO_FIRST, _OK, _IN_TX, _IN_TX, _IN_TX),
    "STARTTLS": _row(
        _HELO_FIRST, Rule(then=State.TLS_PENDING, on=Success.CODE_220), _IN_TX, _IN_TX, _IN_TX
    ),
    # A 334 challenge enters the SASL exchange (RFC 4954 §4).
    "AUTH": _row(
        _HELO_FIRST, Rule(then=State.AUTH, on=Success.CODE_334), _AUTH_IN_TX, _AUTH_IN_TX,
        _AUTH_IN_TX,
    ),
    UNKNOWN: _ALWAYS,
}

# After a 554 greeting (RFC 5321 §3.1) only QUIT, NOOP and HELP are allowed (as
# before HELO); an unknown verb is still answered as unknown.
_REJECTED_ALLOWS = {"QUIT", "NOOP", "HELP", UNKNOWN}

_OTHER: dict[tuple[State, str], Rule] = {
    (State.GREETING, GREETING): Rule(
        then=State.INIT, on=Success.CODE_220, otherwise=State.REJECTED
    ),
    # The message (DATA, BDAT chunks, or BDAT LAST as the only chunk) is answered:
    # the transaction ends whatever the reply.
    (State.DATA, END_OF_DATA): Rule(then=State.READY, on=Success.ANY),
    (State.BDAT, END_OF_DATA): Rule(then=State.READY, on=Success.ANY),
    (State.RCPT, END_OF_DATA): Rule(then=State.READY, on=Success.ANY),
    # A further challenge keeps the exchange going; anything else ends it.
    (State.AUTH, SASL): Rule(then=State.AUTH, on=Success.CODE_334, otherwise=State.READY),
    # Credentials complete (from a SASL response, or AUTH's initial response in
    # READY): whatever the verdict, no further challenge follows.
    (State.AUTH, CREDENTIALS): Rule(then=State.READY, on=Success.ANY),
    (State.READY, CREDENTIALS): _OK,
    # RFC 3207 §4.2: after the handshake the client must greet again.
    (State.TLS_PENDING, TLS_HANDSHAKE): Rule(then=State.INIT, on=Success.ANY),
}


def _build() -> dict[tuple[State, str], Rule]:
    table: dict[tuple[State, str], Rule] = {}
    for verb, rows in _COMMANDS.items():
        for state, r in rows.items():
            table[(state, verb)] = r
        table[(State.REJECTED, verb)] = (
            rows[State.INIT] if verb in _REJECTED_ALLOWS else Rule(REJECTED_SESSION, first=True)
        )
    table.update(_OTHER)
    return table


TRANSITIONS: Mapping[tuple[State, str], Rule] = MappingProxyType(_build())
"""``(state, input) -> Rule``: every transition of the protocol core.

Every verb in :data:`VERBS` and :data:`UNKNOWN` has a rule in each of
:data:`COMMAND_STATES`; the pseudo-inputs have rules only where they can occur.
"""

VERBS: frozenset[str] = frozenset(v for v in _COMMANDS if v != UNKNOWN)
"""The command verbs the core knows (RFC 5321 §4.1 and the extensions it speaks)."""


def rule(state: State, inp: str) -> Rule | None:
    """The rule for input ``inp`` in ``state``, or ``None`` when it cannot occur there."""
    return TRANSITIONS.get((state, inp))

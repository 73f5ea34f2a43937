"""The sans-IO SMTP protocol core: no sockets, no asyncio, no logging.

Entry points: :class:`ServerConnection`, :class:`ProtocolConfig`, the events in
:mod:`smtpgate.protocol.events`, :data:`NEED_DATA`, and the state table
(:class:`State`, :data:`TRANSITIONS`) in :mod:`smtpgate.protocol.states`.
RFC 5321 and its extensions.
"""

from .connection import ProtocolConfig, ServerConnection
from .events import (
    NEED_DATA,
    AuthCredentials,
    AutoReply,
    BdatStart,
    Data,
    DataComplete,
    Etrn,
    Event,
    Expn,
    Helo,
    MailFrom,
    MessageChunk,
    Quit,
    RcptTo,
    Rset,
    StartTls,
    UnknownCommand,
    Vrfy,
)
from .states import TRANSITIONS, Rule, State

__all__ = [
    "NEED_DATA",
    "AuthCredentials",
    "AutoReply",
    "BdatStart",
    "Data",
    "DataComplete",
    "MessageChunk",
    "Etrn",
    "Event",
    "Expn",
    "Helo",
    "MailFrom",
    "ProtocolConfig",
    "Quit",
    "RcptTo",
    "Rset",
    "Rule",
    "ServerConnection",
    "StartTls",
    "State",
    "TRANSITIONS",
    "UnknownCommand",
    "Vrfy",
]

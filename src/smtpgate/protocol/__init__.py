"""The sans-IO SMTP protocol core: no sockets, no asyncio, no logging.

Entry points: :class:`ServerConnection`, :class:`ProtocolConfig`, the events in
:mod:`smtpgate.protocol.events` and :data:`NEED_DATA`. RFC 5321 and its extensions.
"""

from .connection import ProtocolConfig, ServerConnection, State
from .events import (
    NEED_DATA,
    AuthCredentials,
    AutoReply,
    Data,
    DataComplete,
    Etrn,
    Event,
    Expn,
    Helo,
    MailFrom,
    Quit,
    RcptTo,
    Rset,
    StartTls,
    Vrfy,
)

__all__ = [
    "NEED_DATA",
    "AuthCredentials",
    "AutoReply",
    "Data",
    "DataComplete",
    "Etrn",
    "Event",
    "Expn",
    "Helo",
    "MailFrom",
    "ProtocolConfig",
    "Quit",
    "RcptTo",
    "Rset",
    "ServerConnection",
    "StartTls",
    "State",
    "Vrfy",
]

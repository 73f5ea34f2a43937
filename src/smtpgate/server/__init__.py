"""The asyncio server layer: listeners, sessions, TLS.

Entry points: :class:`SmtpServer`, :class:`ServerContext`, :func:`server_tls_context`.
"""

from .context import ServerContext
from .listener import SmtpServer
from .tls import server_tls_context

__all__ = ["ServerContext", "SmtpServer", "server_tls_context"]

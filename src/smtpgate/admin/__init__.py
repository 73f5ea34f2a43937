"""The administration listener: HTTP API, web page and Prometheus ``/metrics``
(docs/operations.md), served by aiohttp in the server's own event loop.

Entry point: :class:`~smtpgate.admin.server.AdminServer`, started by
:meth:`smtpgate.app.Smtpgate.start` when ``[admin] listen`` is set.
"""

from .server import GATE, AdminServer

__all__ = ["GATE", "AdminServer"]

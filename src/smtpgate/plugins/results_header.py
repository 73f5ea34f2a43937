"""Shipped plugin ``results_header``: show the plugins' findings in the message.

Entry point: :func:`register`. At the ``queue`` stage (the message is accepted, before
delivery) it adds one header (default ``X-Smtpgate-Results``) with every finding recorded
in ``session.results`` and ``transaction.results``, e.g.
``X-Smtpgate-Results: mx.example.org; spamassassin=ham (score=1.2)``. Not added by
default: enable it with ``[[plugin]] use = "results_header"``. RFC 5322 §3.6.8
(optional fields).
"""

from __future__ import annotations

from ..envelope import SessionInfo
from ..hooks import Transaction
from . import Option, PluginRegistry

PRIORITY = 100
OPTIONS = {
    "header": Option(str, default="X-Smtpgate-Results",
                     check=lambda v: None if v and all(33 <= ord(c) <= 126 and c != ":"
                                                       for c in v)
                     else "must be a header field name (printable ASCII, no colon)",
                     help="name of the header added"),
}


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the queue hook."""
    header = options["header"]
    assert isinstance(header, str)
    hostname = registry.config.server.hostname

    def queue(session: SessionInfo, transaction: Transaction) -> None:
        findings = [f.text() for f in (*session.results, *transaction.results)]
        if findings:
            transaction.add_header(header, f"{hostname}; " + "; ".join(findings), prepend=True)

    registry.on("queue", queue)

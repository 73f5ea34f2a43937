"""Send one message through a relay: nssmtpd's ``ns_smtpd send``, for scripts and the CLI.

Entry point: :func:`send_message`, built on :class:`~.upstream.UpstreamDelivery`
(RFC 5321 transaction, RFC 3207 STARTTLS); bare LF becomes CRLF (RFC 5321 §2.3.8).
"""

from __future__ import annotations

import dataclasses
import re

from ..envelope import Envelope, Recipient
from ..errors import ConfigError
from ..reply import Reply
from .local import DiscardDelivery
from .upstream import UpstreamDelivery
from .url import DEFAULT_PORTS, parse_relay_url

__all__ = ["normalize_line_endings", "send_message"]

_BARE_LF = re.compile(rb"(?<!\r)\n")


def normalize_line_endings(message: bytes) -> bytes:
    """Turn bare LF line endings into CRLF (existing CRLF pairs are kept).

    Args:
        message: message bytes, LF or CRLF line endings.

    Returns:
        The message with CRLF line endings.
    """
    return _BARE_LF.sub(b"\r\n", message)


async def send_message(
    mail_from: str,
    rcpt_to: list[str],
    message: bytes,
    *,
    relay_url: str | None = None,
    host: str | None = None,
    port: int | None = None,
    timeout: float = 60.0,
    helo_name: str = "localhost",
    cafile: str | None = None,
) -> Reply:
    """Send one message and return the upstream's acceptance (nssmtpd ``ns_smtpd send``).

    The target is ``host``/``port`` when ``host`` is given (plain ``smtp://``
    with opportunistic STARTTLS), else ``relay_url`` (with ``port`` replacing
    its port when given), else ``smtp://localhost`` (``port`` or 25).
    ``SMTPUTF8`` is requested when an address is not ASCII and ``BODY=8BITMIME``
    when the message has 8-bit bytes.

    Args:
        mail_from: the reverse-path without angle brackets (``""`` for ``<>``).
        rcpt_to: the recipients' addresses.
        message: the complete message (headers and body); LF or CRLF line endings.
        relay_url: a relay URL (see :func:`~smtpgate.delivery.url.parse_relay_url`).
        host: upstream host name or IP address (IPv6 with or without brackets).
        port: upstream TCP port.
        timeout: connect and per-command timeout, seconds.
        helo_name: our EHLO name.
        cafile: CA bundle for verifying the upstream certificate (TLS-required URLs).

    Returns:
        The 2xx reply, e.g. ``250 2.0.0 Message accepted upstream: ...``.

    Raises:
        TemporaryDeliveryError: 4xx: upstream unreachable, or a 4xx reply.
        PermanentDeliveryError: 5xx: a recipient, the sender or the data refused.
        ConfigError: a bad relay URL or host.
    """
    if port is not None and not 0 < port <= 65535:
        raise ConfigError(f"port {port}: must be from 1 to 65535")
    if host is not None:
        bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
        url = parse_relay_url(f"smtp://{bracketed}:{port or DEFAULT_PORTS['smtp']}")
    elif relay_url is not None:
        url = parse_relay_url(relay_url)
        if port is not None and not url.is_discard:
            url = dataclasses.replace(url, port=port)
    else:
        url = parse_relay_url(f"smtp://localhost:{port or DEFAULT_PORTS['smtp']}")

    data = normalize_line_endings(message)
    params: dict[str, str | None] = {}
    if not all(a.isascii() for a in [mail_from, *rcpt_to]):
        params["SMTPUTF8"] = None
    if not data.isascii():
        params["BODY"] = "8BITMIME"
    envelope = Envelope(mail_from, params, [Recipient(r) for r in rcpt_to])

    if url.is_discard:
        return await DiscardDelivery().deliver(envelope, data)
    delivery = UpstreamDelivery(
        url, timeout=timeout, helo_name=helo_name, cafile=cafile, pool_size=0
    )
    try:
        return await delivery.deliver(envelope, data)
    finally:
        await delivery.aclose()

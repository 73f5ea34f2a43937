"""systemd's notify protocol (sd_notify(3)): tell the service manager the server's state.

Entry point: :func:`notify`. With ``Type=notify`` in the unit (contrib/systemd/
smtpgate.service), systemd waits for ``READY=1`` before it counts the service as started,
and shows ``STATUS=`` in ``systemctl status``. ``serve`` sends ``READY=1`` once every
listener is open and ``STOPPING=1`` when a graceful shutdown begins.

The protocol: one datagram of newline-separated ``VARIABLE=value`` assignments sent to the
``AF_UNIX`` ``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract
socket name when it starts with ``@``). Without ``$NOTIFY_SOCKET`` (not started by
systemd) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify"]

log = logging.getLogger("smtpgate.sdnotify")


def _address(value: str) -> str | bytes | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or ``b"\\0name"`` for ``@name``."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    return None


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``, ``"STOPPING=1"`` ...) to the
    service manager in one datagram.

    Never raises: a missing ``$NOTIFY_SOCKET`` means "not under systemd" and a failed
    send is logged (a service manager that does not listen must not stop the server).

    Returns:
        True when the datagram was sent.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an @abstract name; not notifying",
                    value)
        return False
    message = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", value, exc.strerror or exc)
        return False
    return True

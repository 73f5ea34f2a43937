"""Everything a session needs from the running server, bundled once per listener.

Entry point: :class:`ServerContext`. Built by :class:`smtpgate.app.Smtpgate`; sessions
only read it (the relay policy and hook runner may be changed at run time through
the app, and sessions see the change at their next command).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from ..auth import Authenticator, FailureLimiter
from ..delivery import Delivery
from ..envelope import SessionInfo
from ..hooks import HookRunner
from ..protocol import ProtocolConfig
from ..reply import Reply


@dataclass(slots=True)
class ServerContext:
    """Shared, per-listener session settings and services.

    Attributes:
        protocol: settings of the sans-IO core.
        hooks: the plugin pipeline: one chain of hooks per stage (every check, built-in
            or the site's, is a plugin on it; the driver knows none of them).
        delivery: where accepted messages go (upstream relay, Maildir, callable).
        authenticator: SASL credential check, ``None`` when AUTH is off.
        auth_limiter: failed-AUTH rate limit per client IP.
        tls_context: server TLS context for STARTTLS, ``None`` when TLS is off.
        greeting: text of the 220 banner.
        command_timeout: seconds within which a whole command line must arrive, counted
            from when the server starts waiting for it (a deadline, not an idle timer:
            partial lines do not extend it; Postfix ``smtpd_per_request_deadline``).
        data_timeout: seconds; the DATA/BDAT deadline starts at this and each read of N
            bytes extends it by N / ``min_data_rate`` seconds, never to more than
            ``data_timeout`` from now (RFC 5321 §4.5.3.2 minimums: 5 min command,
            10 min data block; Postfix ``smtpd_min_data_rate``).
        min_data_rate: bytes/s a client must keep up during DATA/BDAT; 0 makes
            ``data_timeout`` an idle timeout (restarted by every read).
        limit_exceptions: client networks exempt from the per-IP connection limit and
            the flood escalation (``server.limit_exceptions``, default the local networks).
        received_tls / received_auth: what the Received header includes.
        tls_handshake_timeout: seconds allowed for the STARTTLS handshake.
        etrn: answers ETRN (RFC 1985) for a node and client; ``None``: 458 4.0.0.
        implicit_tls: TLS from the first byte (RFC 8314), after the PROXY header if any.
        proxy_protocol: expect a HAProxy PROXY v1/v2 header before anything else.
        trusted_proxies: networks allowed to send that header (others are disconnected).
        proxy_timeout: seconds to wait for the PROXY header.
        multiline_replies: False sends only the first line of multi-line replies.
        received_tls_peer: put the client certificate's subject into Received.
        vrfy_enabled / expn_enabled: answer VRFY / EXPN (through the ``vrfy`` stage);
            off: ``252 2.5.0`` / ``502 5.5.1``.
        forced_peer_ip: treat every client as coming from this address (policy test).
        dry_run: sessions are dry runs (``smtpgate explain``; ``SessionInfo.dry_run``).
        delivered_in_session: run the ``delivered`` stage after delivery here (local and
            proxy delivery); False in queue mode, where the delivery process runs it.
        message_dir: where a long message's temporary file is made while it arrives
            (queue mode: the spool's ``tmp/``, on the spool's file system); ``None``:
            the system's temporary directory.
    """

    protocol: ProtocolConfig
    hooks: HookRunner
    delivery: Delivery
    authenticator: Authenticator | None = None
    auth_limiter: FailureLimiter = field(default_factory=FailureLimiter)
    tls_context: ssl.SSLContext | None = None
    greeting: str = "localhost ESMTP smtpgate"
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    min_data_rate: float = 0.0
    limit_exceptions: tuple[IPv4Network | IPv6Network, ...] = ()
    received_tls: bool = True
    received_auth: bool = False
    tls_handshake_timeout: float = 60.0
    etrn: Callable[[str, SessionInfo], Reply] | None = None
    implicit_tls: bool = False
    proxy_protocol: bool = False
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    proxy_timeout: float = 30.0
    multiline_replies: bool = True
    received_tls_peer: bool = False
    vrfy_enabled: bool = False
    expn_enabled: bool = False
    forced_peer_ip: str | None = None
    dry_run: bool = False
    delivered_in_session: bool = True
    message_dir: str | None = None

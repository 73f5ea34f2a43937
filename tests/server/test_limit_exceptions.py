"""``server.limit_exceptions`` (issue 8, finding 4; Postfix
``smtpd_client_event_limit_exceptions``): clients on the local networks (the default)
are exempt from the per-IP connection limit and the ZMailer flood escalation.

Before the fix, 200 concurrent sessions from 127.0.0.1 with the per-IP limit at 50 got
150 refusals; past 4x the limit connections were closed without a word.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from smtpgate.reply import R
from smtpgate.server.listener import SmtpServer

CLIENTS = 210  # past 4 x 50: the flood escalation would close some without a word


@contextmanager
def open_sessions(port: int, count: int) -> Iterator[list[bytes]]:
    """Open ``count`` concurrent connections; yield the first reply line of each
    (``b""`` when closed without a word), keeping them all open meanwhile."""
    socks: list[socket.socket] = []
    files = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=15)
            socks.append(s)
            files.append(s.makefile("rb"))
        firsts = []
        for f in files:
            try:
                firsts.append(f.readline())
            except ConnectionResetError:
                firsts.append(b"")
        yield firsts
        # every session that was greeted is served while all are open
        for s, first in zip(socks, firsts, strict=True):
            if first.startswith(b"220"):
                s.sendall(b"EHLO c.test\r\nNOOP\r\nQUIT\r\n")
        for f, first in zip(files, firsts, strict=True):
            if first.startswith(b"220"):
                lines = [f.readline() for _ in range(2)]
                while not lines[-1].startswith(b"250 "):
                    lines.append(f.readline())
                assert f.readline() == b"250 2.0.0 OK\r\n"
                assert f.readline().startswith(b"221 2.0.0")
    finally:
        for f in files:
            f.close()
        for s in socks:
            s.close()


def test_local_network_clients_are_exempt_from_the_per_ip_limit(run_app) -> None:
    app = run_app({"server": {"max_connections_per_ip": 50},
                   "relay": {"local_networks": ["127.0.0.0/8"]}})
    with open_sessions(app.port, CLIENTS) as firsts:
        assert [f[:4] for f in firsts] == [b"220 "] * CLIENTS


def test_explicit_limit_exceptions(run_app) -> None:
    """``limit_exceptions`` set: only those networks are exempt (not local_networks)."""
    app = run_app({"server": {"max_connections_per_ip": 50,
                              "limit_exceptions": ["127.0.0.0/8"]},
                   "relay": {"local_networks": ["192.0.2.0/24"]}})
    with open_sessions(app.port, CLIENTS) as firsts:
        assert [f[:4] for f in firsts] == [b"220 "] * CLIENTS


def test_empty_limit_exceptions_keeps_the_limit_and_the_escalation(run_app) -> None:
    app = run_app({"server": {"max_connections_per_ip": 50, "limit_exceptions": []},
                   "relay": {"local_networks": ["127.0.0.0/8"]}})
    with open_sessions(app.port, CLIENTS) as firsts:
        assert [f[:4] for f in firsts[:50]] == [b"220 "] * 50
        assert firsts[50:200] == [b"421 4.7.0 Too many connections from your address\r\n"] * 150
        assert firsts[200:] == [b""] * (CLIENTS - 200)  # past 4x: closed without a word


def test_local_networks_not_exempt_when_limit_exceptions_names_others(run_app) -> None:
    app = run_app({"server": {"max_connections_per_ip": 2,
                              "limit_exceptions": ["192.0.2.0/24"]},
                   "relay": {"local_networks": ["127.0.0.0/8"]}})
    with open_sessions(app.port, 3) as firsts:
        assert firsts[2] == b"421 4.7.0 Too many connections from your address\r\n"


def test_exempt_client_still_meets_the_total_limit(run_app) -> None:
    """The total (``max_connections``) is a resource limit: it applies to everyone,
    with a 421 reply (an exempt client is never closed without a word)."""
    app = run_app({"server": {"max_connections": 5},
                   "relay": {"local_networks": ["127.0.0.0/8"]}})
    with open_sessions(app.port, 110) as firsts:
        assert [f[:4] for f in firsts[:5]] == [b"220 "] * 5
        refused = set(firsts[5:])
        assert refused == {b"421 4.7.0 Too many connections, try again later\r\n"}, refused


class _Dummy:
    """A stand-in for a Session in the admission bookkeeping (only its identity counts)."""


def test_admission_is_typed_and_rebind_honours_exemptions() -> None:
    from smtpgate.server.admission import AdmissionKind

    server = SmtpServer([], max_connections=100, max_connections_per_ip=1)
    proxy = _Dummy()
    first = server.admit(proxy, "127.0.0.1", per_ip=False)  # type: ignore[arg-type]
    assert first.kind is AdmissionKind.ACCEPT and first.reply is None
    other = _Dummy()
    assert server.admit(other, "192.0.2.1").kind is AdmissionKind.ACCEPT  # type: ignore[arg-type]
    again = server.admit(_Dummy(), "192.0.2.1")  # type: ignore[arg-type]
    assert (again.kind, again.reply) == (AdmissionKind.REFUSE, R.TOO_MANY_FROM_IP)
    # a PROXY header reports 192.0.2.1, already at its limit: refused unless exempt
    assert server.rebind(proxy, "127.0.0.1", "192.0.2.1") is R.TOO_MANY_FROM_IP  # type: ignore[arg-type]
    assert server.rebind(proxy, "127.0.0.1", "192.0.2.1", exempt=True) is None  # type: ignore[arg-type]
    exempt = server.admit(_Dummy(), "::ffff:192.0.2.1", exempt=True)  # type: ignore[arg-type]
    assert exempt.kind is AdmissionKind.ACCEPT and exempt.same_ip == 4

"""MX resolution against a loopback authoritative DNS server, and MxDelivery against real
aiosmtpd upstreams on loopback ports (RFC 5321 §5.1, RFC 7505)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtpgate.delivery.mx import Destination, MxDelivery, resolve_destinations
from smtpgate.dns import make_resolver
from smtpgate.envelope import Envelope, Recipient
from smtpgate.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError
from smtpgate.reply import Reply

from .conftest import Pki, StartUpstream, free_port
from .dns_server import DnsServer

MESSAGE = b"From: a@example.org\r\nTo: b@example.test\r\nSubject: mx\r\n\r\nhello\r\n.dot\r\n"

RECORDS: dict[tuple[str, str], list[str]] = {
    ("example.test", "MX"): [
        "20 mx2.example.test.",
        "10 mx1.example.test.",
        "30 mx3.example.test.",
        "10 mx1b.example.test.",
    ],
    ("mx1.example.test", "A"): ["127.0.0.1"],
    ("mx1.example.test", "AAAA"): ["::1"],
    ("mx1b.example.test", "A"): ["127.0.0.1"],
    ("mx2.example.test", "A"): ["127.0.0.1", "127.0.0.1"],
    ("mx3.example.test", "A"): ["127.0.0.1"],
    ("nomx.test", "A"): ["127.0.0.1"],
    ("nomx.test", "TXT"): ['"v=spf1 -all"'],
    ("nothing.test", "TXT"): ['"exists, but no mail records"'],
    ("nullmx.test", "MX"): ["0 ."],
    ("deadmx.test", "MX"): ["10 gone.test.", "20 noaddr.test."],
    ("noaddr.test", "TXT"): ['"no address"'],
    ("brokenmx.test", "MX"): ["10 broken.test."],
    ("partial.test", "MX"): ["10 broken.test.", "20 mx3.example.test."],
    ("loop.test", "MX"): ["10 gate.test.", "20 backup.test."],
    ("gate.test", "A"): ["127.0.0.1"],
    ("backup.test", "A"): ["127.0.0.1"],
    ("loopfirst.test", "MX"): ["10 gate.test."],
}


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    async with DnsServer(
        RECORDS, servfail=["servfail.test", "broken.test"], drop=["slow.test"]
    ) as server:
        yield server


def resolver_for(server: DnsServer) -> object:
    return make_resolver(["127.0.0.1"], port=server.port, timeout=0.3, lifetime=0.6)


async def test_mx_order_by_preference_addresses_ipv6_first(dns_server: DnsServer) -> None:
    dests = await resolve_destinations(
        "example.test", make_resolver(["127.0.0.1"], port=dns_server.port)
    )
    assert [d.preference for d in dests] == [10, 10, 20, 30]
    assert {d.host for d in dests[:2]} == {"mx1.example.test", "mx1b.example.test"}
    assert dests[2:] == [
        Destination("mx2.example.test", 20, ("127.0.0.1",)),  # duplicate A collapsed
        Destination("mx3.example.test", 30, ("127.0.0.1",)),
    ]
    mx1 = next(d for d in dests if d.host == "mx1.example.test")
    assert mx1.addresses == ("::1", "127.0.0.1")
    v4 = await resolve_destinations(
        "EXAMPLE.test.",
        make_resolver(["127.0.0.1"], port=dns_server.port),
        address_preference="ipv4",
    )
    assert next(d for d in v4 if d.host == "mx1.example.test").addresses == ("127.0.0.1", "::1")


async def test_equal_preferences_are_shuffled(dns_server: DnsServer) -> None:
    resolver = make_resolver(["127.0.0.1"], port=dns_server.port)
    firsts = set()
    for seed in range(12):
        dests = await resolve_destinations("example.test", resolver, rng=random.Random(seed))
        firsts.add(dests[0].host)
        assert [d.host for d in dests[2:]] == ["mx2.example.test", "mx3.example.test"]
    assert firsts == {"mx1.example.test", "mx1b.example.test"}


async def test_implicit_mx_uses_the_domain_itself(dns_server: DnsServer) -> None:
    dests = await resolve_destinations(
        "nomx.test", make_resolver(["127.0.0.1"], port=dns_server.port)
    )
    assert dests == [Destination("nomx.test", 0, ("127.0.0.1",))]
    assert ("nomx.test", "MX") in dns_server.queries


@pytest.mark.parametrize(
    ("domain", "exc", "code", "enhanced"),
    [
        ("nullmx.test", PermanentDeliveryError, 556, "5.1.10"),
        ("nxdomain.test", PermanentDeliveryError, 550, "5.1.2"),
        ("nothing.test", PermanentDeliveryError, 550, "5.1.2"),  # no MX, no A/AAAA
        ("deadmx.test", PermanentDeliveryError, 550, "5.4.4"),  # MX hosts without addresses
        ("servfail.test", TemporaryDeliveryError, 451, "4.4.3"),
        ("slow.test", TemporaryDeliveryError, 451, "4.4.3"),  # no answer: timeout
        ("brokenmx.test", TemporaryDeliveryError, 451, "4.4.3"),  # the MX host's A lookup fails
        ("[300.1.2.3]", PermanentDeliveryError, 550, "5.1.2"),
        ("[IPv6:nonsense]", PermanentDeliveryError, 550, "5.1.2"),
        ("bad..name.test", PermanentDeliveryError, 550, "5.1.2"),
    ],
)
async def test_resolution_failures(
    dns_server: DnsServer, domain: str, exc: type[Exception], code: int, enhanced: str
) -> None:
    resolver = make_resolver(["127.0.0.1"], port=dns_server.port, timeout=0.3, lifetime=0.6)
    with pytest.raises(exc) as ei:
        await resolve_destinations(domain, resolver)
    reply = ei.value.reply  # type: ignore[attr-defined]
    assert (reply.code, reply.enhanced) == (code, enhanced)


async def test_failed_mx_host_lookup_falls_back_to_others(dns_server: DnsServer) -> None:
    dests = await resolve_destinations(
        "partial.test",
        make_resolver(["127.0.0.1"], port=dns_server.port, timeout=0.3, lifetime=0.6),
    )
    assert dests == [Destination("mx3.example.test", 20, ("127.0.0.1",))]


async def test_address_literals_bypass_dns(dns_server: DnsServer) -> None:
    resolver = make_resolver(["127.0.0.1"], port=dns_server.port)
    assert await resolve_destinations("[192.0.2.1]", resolver) == [
        Destination("192.0.2.1", 0, ("192.0.2.1",))
    ]
    assert await resolve_destinations("[IPv6:2001:DB8:0::1]", resolver) == [
        Destination("2001:db8::1", 0, ("2001:db8::1",))
    ]
    assert dns_server.queries == []


def test_make_resolver_rejects_bad_nameserver() -> None:
    with pytest.raises(ConfigError):
        make_resolver(["not-an-ip"])


# -- MxDelivery ----------------------------------------------------------------------


def env(*rcpts: str, sender: str = "a@example.org") -> Envelope:
    return Envelope(sender, {}, [Recipient(r) for r in rcpts])


async def test_falls_over_from_dead_first_mx_to_live_second(
    dns_server: DnsServer, start_upstream: StartUpstream
) -> None:
    live = start_upstream()
    dead = free_port()
    mx = MxDelivery(
        helo_name="gate.test",
        resolver=make_resolver(["127.0.0.1"], port=dns_server.port),
        ports={"mx1.example.test": dead, "mx1b.example.test": dead, "mx2.example.test": live.port},
        timeout=5,
    )
    results = await mx.deliver_recipients(env("b@example.test", "c@example.test"), MESSAGE)
    assert results.remote_mta == "mx2.example.test"
    assert {a: (r.code, r.enhanced) for a, r in results.items()} == {
        "b@example.test": (250, "2.0.0"),
        "c@example.test": (250, "2.0.0"),
    }
    assert results["b@example.test"].text == "Ok: queued as CAPTURE1"
    assert results.delivered == ["b@example.test", "c@example.test"] and not results.synthesized
    [msg] = live.handler.messages
    assert msg.content == MESSAGE and msg.rcpt_tos == ["b@example.test", "c@example.test"]
    # mx1 (::1 and 127.0.0.1) and mx1b refused the connection; then mx2 answered.
    assert mx.connections_opened == 4


async def test_skips_host_with_421_greeting(
    dns_server: DnsServer, start_upstream: StartUpstream
) -> None:
    async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"421 4.3.2 busy.test too busy, try later\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(busy, "127.0.0.1", 0)
    busy_port = server.sockets[0].getsockname()[1]
    live = start_upstream()
    try:
        mx = MxDelivery(
            resolver=make_resolver(["127.0.0.1"], port=dns_server.port),
            ports={
                "mx1.example.test": busy_port,
                "mx1b.example.test": busy_port,
                "mx2.example.test": live.port,
            },
            address_preference="ipv4",
            timeout=5,
        )
        results = await mx.deliver_recipients(env("b@example.test"), MESSAGE)
    finally:
        server.close()
        await server.wait_closed()
    assert results["b@example.test"].code == 250
    assert results.remote_mta == "mx2.example.test"
    assert len(live.handler.messages) == 1


async def test_first_host_answering_decides_no_fallback_on_5xx(
    dns_server: DnsServer, start_upstream: StartUpstream
) -> None:
    first = start_upstream()
    first.handler.refuse_rcpt["bad@example.test"] = "550 5.1.1 No such user"
    second = start_upstream()
    mx = MxDelivery(
        resolver=make_resolver(["127.0.0.1"], port=dns_server.port),
        ports={
            "mx1.example.test": first.port,
            "mx1b.example.test": first.port,
            "mx2.example.test": second.port,
        },
        address_preference="ipv4",
        timeout=5,
    )
    results = await mx.deliver_recipients(env("bad@example.test", "good@example.test"), MESSAGE)
    assert results["bad@example.test"] == Reply(550, "5.1.1", "No such user")
    assert results["good@example.test"].code == 250
    assert results.failed == ["bad@example.test"]
    assert results.is_remote("bad@example.test")
    assert [m.rcpt_tos for m in first.handler.messages] == [["good@example.test"]]
    assert second.handler.messages == [] and second.handler.commands == []


async def test_all_hosts_down_gives_every_recipient_451(dns_server: DnsServer) -> None:
    dead = free_port()
    mx = MxDelivery(
        resolver=make_resolver(["127.0.0.1"], port=dns_server.port),
        port=dead,
        timeout=5,
        max_attempts=3,
    )
    results = await mx.deliver_recipients(env("b@example.test", "c@example.test"), MESSAGE)
    assert {r.code for r in results.values()} == {451}
    assert {r.enhanced for r in results.values()} == {"4.4.1"}
    assert "Connection to " in results["b@example.test"].text
    assert results.synthesized == {"b@example.test", "c@example.test"}
    assert results.remote_mta is None
    assert mx.connections_opened == 3  # max_attempts


@pytest.mark.parametrize(
    ("domain", "code", "enhanced"),
    [
        ("nullmx.test", 556, "5.1.10"),
        ("nxdomain.test", 550, "5.1.2"),
        ("servfail.test", 451, "4.4.3"),
        ("loopfirst.test", 554, "5.4.6"),
    ],
)
async def test_dns_outcome_applies_to_every_recipient(
    dns_server: DnsServer, domain: str, code: int, enhanced: str
) -> None:
    mx = MxDelivery(
        resolver=make_resolver(["127.0.0.1"], port=dns_server.port, timeout=0.3, lifetime=0.6),
        local_hosts=["gate.test"],
        port=free_port(),
    )
    results = await mx.deliver_recipients(env(f"x@{domain}", f"y@{domain}"), MESSAGE)
    assert {(r.code, r.enhanced) for r in results.values()} == {(code, enhanced)}
    assert len(results) == 2 and mx.connections_opened == 0


async def test_own_mx_and_less_preferred_are_dropped(
    dns_server: DnsServer, start_upstream: StartUpstream
) -> None:
    up = start_upstream()
    mx = MxDelivery(
        resolver=make_resolver(["127.0.0.1"], port=dns_server.port),
        local_hosts=["backup.test."],  # we are the backup MX: only gate.test may be used
        ports={"gate.test": up.port, "backup.test": free_port()},
    )
    results = await mx.deliver_recipients(env("x@loop.test"), MESSAGE)
    assert results["x@loop.test"].code == 250 and results.remote_mta == "gate.test"


async def test_address_literal_destination_with_starttls(
    start_upstream: StartUpstream, pki: Pki
) -> None:
    up = start_upstream(tls_context=pki.server_context)
    mx = MxDelivery(ports={"127.0.0.1": up.port}, timeout=5)
    results = await mx.deliver_recipients(env("b@[127.0.0.1]"), MESSAGE)
    assert results["b@[127.0.0.1]"].code == 250
    assert results.remote_mta == "127.0.0.1"
    [msg] = up.handler.messages
    assert msg.tls  # opportunistic STARTTLS, certificate not verified


async def test_recipients_of_several_domains_need_explicit_domain(
    start_upstream: StartUpstream,
) -> None:
    up = start_upstream()
    mx = MxDelivery(ports={"127.0.0.1": up.port})
    e = env("a@one.test", "b@two.test")
    with pytest.raises(ValueError):
        await mx.deliver_recipients(e, MESSAGE)
    results = await mx.deliver_recipients(e, MESSAGE, domain="[127.0.0.1]")
    assert results.delivered == ["a@one.test", "b@two.test"]


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        MxDelivery(helo_name="bad name")
    with pytest.raises(ConfigError):
        MxDelivery(port=0)
    with pytest.raises(ConfigError):
        MxDelivery(ports={"mx.test": 70000})
    with pytest.raises(ConfigError):
        MxDelivery(max_attempts=0)


async def test_message_file_is_streamed_to_the_mx(
    dns_server: DnsServer, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """A long message from the spool goes to the MX host from its file, in pieces, and
    again from the start to the next host when the first fails."""
    import os

    from smtpgate.message import MessageFile

    big = b"Subject: big\r\n\r\n" + b"".join(
        (b"." if i % 7 == 0 else b"") + b"line %07d of a long message\r\n" % i
        for i in range(120_000))
    path = tmp_path / "m"
    path.write_bytes(b"HEADER-LINE\n" + big)
    live = start_upstream()
    mx = MxDelivery(
        helo_name="gate.test",
        resolver=make_resolver(["127.0.0.1"], port=dns_server.port),
        ports={"mx1.example.test": free_port(), "mx1b.example.test": free_port(),
               "mx2.example.test": live.port},
        timeout=10,
    )
    fd = os.open(path, os.O_RDONLY)
    msg = MessageFile(fd, len(big), offset=len(b"HEADER-LINE\n"))
    try:
        results = await mx.deliver_recipients(env("b@example.test"), msg)
    finally:
        msg.close()
    assert results["b@example.test"].code == 250
    [got] = live.handler.messages
    assert got.content == big

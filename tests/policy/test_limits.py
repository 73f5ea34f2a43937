"""Tests for ZMailer-style connection limits and max-error-recipients (smtpgate.policy.limits)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import ConfigError
from smtpgate.policy.limits import (
    TOO_MANY_ERROR_RECIPIENTS,
    Admission,
    AdmissionKind,
    ConnectionLimiter,
    ErrorRecipientLimit,
    client_key,
)
from smtpgate.reply import R

ACCEPT, REFUSE, DROP = AdmissionKind.ACCEPT, AdmissionKind.REFUSE, AdmissionKind.DROP


def kinds(limiter: ConnectionLimiter, ips: list[str]) -> list[AdmissionKind]:
    return [limiter.admit(ip).kind for ip in ips]


# ------------------------------------------------------------------ per-IP limit


def test_per_ip_limit_reply_then_silent_past_four_times() -> None:
    lim = ConnectionLimiter(max_total=1000, max_per_ip=2)
    got = kinds(lim, ["192.0.2.1"] * 9)
    # 2 served, then refused with a reply up to 4 x 2 = 8 open, then dropped silently.
    assert got == [ACCEPT, ACCEPT] + [REFUSE] * 6 + [DROP]
    assert lim.active == 8 and lim.active_from("192.0.2.1") == 8
    # Another client is unaffected.
    other = lim.admit("192.0.2.2")
    assert other == Admission(ACCEPT, None, 9, 1)


def test_refusal_reply_and_counts() -> None:
    lim = ConnectionLimiter(max_total=100, max_per_ip=1)
    first = lim.admit("198.51.100.7")
    assert first.accepted and first.holds_slot and first.reply is None
    second = lim.admit("198.51.100.7")
    assert second == Admission(REFUSE, R.TOO_MANY_FROM_IP, 2, 2)
    assert second.holds_slot and not second.accepted
    assert second.reply is not None
    assert second.reply.to_bytes() == b"421 4.7.0 Too many connections from your address\r\n"


def test_release_frees_slots() -> None:
    lim = ConnectionLimiter(max_total=10, max_per_ip=1)
    assert lim.admit("192.0.2.1").kind is ACCEPT
    assert lim.admit("192.0.2.1").kind is REFUSE
    lim.release("192.0.2.1")
    lim.release("192.0.2.1")
    assert lim.active == 0 and lim.active_from("192.0.2.1") == 0
    assert lim.admit("192.0.2.1").kind is ACCEPT


def test_dropped_connections_hold_no_slot() -> None:
    lim = ConnectionLimiter(max_total=100, max_per_ip=1, per_ip_drop_factor=2)
    assert kinds(lim, ["192.0.2.1"] * 4) == [ACCEPT, REFUSE, DROP, DROP]
    dropped = lim.admit("192.0.2.1")
    assert dropped == Admission(DROP, None, 2, 2) and not dropped.holds_slot
    assert lim.active == 2


def test_release_without_admission_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    lim = ConnectionLimiter(max_total=10, max_per_ip=5)
    lim.release("192.0.2.1")
    assert lim.active == 0
    assert "without a matching admission" in caplog.text
    lim.admit("192.0.2.1")
    lim.release("192.0.2.9")  # other address: ignored, the real one stays counted
    assert lim.active == 1 and lim.active_from("192.0.2.1") == 1


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "192.0.2.1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("[IPv6:2001:db8:0::1]", "2001:db8::1"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1"),
    ],
)
def test_address_forms_count_as_one_client(a: str, b: str) -> None:
    assert client_key(a) == client_key(b)
    lim = ConnectionLimiter(max_total=10, max_per_ip=1)
    assert lim.admit(a).kind is ACCEPT
    assert lim.admit(b).kind is REFUSE
    lim.release(b)
    lim.release(a)
    assert lim.active == 0


def test_non_ip_peers_are_keyed_verbatim() -> None:
    assert client_key("unix:/run/smtpgate.sock") == "unix:/run/smtpgate.sock"
    assert client_key("") == ""


# ------------------------------------------------------------------ total limit


def test_total_limit_reply_then_silent_past_margin() -> None:
    lim = ConnectionLimiter(max_total=3, max_per_ip=100, total_drop_margin=2)
    ips = [f"192.0.2.{i}" for i in range(1, 8)]
    got = [lim.admit(ip) for ip in ips]
    assert [a.kind for a in got] == [ACCEPT] * 3 + [REFUSE] * 2 + [DROP] * 2
    assert got[3].reply == R.TOO_MANY_CONNECTIONS
    assert got[3].reply is not None
    assert got[3].reply.to_bytes() == b"421 4.7.0 Too many connections, try again later\r\n"
    assert lim.active == 5


def test_zmailer_default_margin_is_100() -> None:
    lim = ConnectionLimiter(max_total=1, max_per_ip=1000)
    got = kinds(lim, [f"10.0.{i // 250}.{i % 250}" for i in range(103)])
    assert got == [ACCEPT] + [REFUSE] * 100 + [DROP] * 2


def test_total_refusal_wins_over_per_ip_refusal() -> None:
    # ZMailer checks MaxParallelConnections before MaxSameIpSource.
    lim = ConnectionLimiter(max_total=1, max_per_ip=1)
    lim.admit("192.0.2.1")
    assert lim.admit("192.0.2.1").reply == R.TOO_MANY_CONNECTIONS


@pytest.mark.parametrize(
    ("kwargs", "problems"),
    [
        (
            {"max_total": 0, "max_per_ip": 1},
            ["server.max_connections: expected an integer >= 1, got 0"],
        ),
        (
            {"max_total": 5, "max_per_ip": True},
            ["server.max_connections_per_ip: expected an integer >= 1, got True"],
        ),
        (
            {"max_total": 1.5, "max_per_ip": -1, "total_drop_margin": -1, "per_ip_drop_factor": 0},
            [
                "server.max_connections: expected an integer >= 1, got 1.5",
                "server.max_connections_per_ip: expected an integer >= 1, got -1",
                "total_drop_margin: expected an integer >= 0, got -1",
                "per_ip_drop_factor: expected an integer >= 1, got 0",
            ],
        ),
    ],
)
def test_invalid_limits(kwargs: dict[str, object], problems: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        ConnectionLimiter(**kwargs)  # type: ignore[arg-type]
    assert exc.value.problems == problems


@given(
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=5),
    st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=3)), max_size=80),
)
def test_counts_stay_consistent(
    max_total: int, max_per_ip: int, ops: list[tuple[bool, int]]
) -> None:
    """Random admit/release sequences: counts match a model, limits hold."""
    lim = ConnectionLimiter(max_total, max_per_ip, total_drop_margin=3)
    held: dict[str, int] = {}
    for is_admit, n in ops:
        ip = f"192.0.2.{n}"
        if is_admit:
            adm = lim.admit(ip)
            if adm.holds_slot:
                held[ip] = held.get(ip, 0) + 1
            if adm.accepted:
                assert adm.total <= max_total and adm.same_ip <= max_per_ip
            else:
                assert adm.total > max_total or adm.same_ip > max_per_ip
        elif held.get(ip):
            lim.release(ip)
            held[ip] -= 1
        assert lim.active == sum(held.values()) <= max_total + 3
        assert all(lim.active_from(k) == v for k, v in held.items())
        assert all(v <= 4 * max_per_ip for v in held.values())


async def test_limiter_in_front_of_a_real_listener() -> None:
    """Loopback clients against a listener that uses the limiter as a session would."""
    lim = ConnectionLimiter(max_total=50, max_per_ip=1, per_ip_drop_factor=3)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip = writer.get_extra_info("peername")[0]
        adm = lim.admit(ip)
        if adm.kind is DROP:
            writer.close()
            return
        try:
            if adm.reply is not None:
                writer.write(adm.reply.to_bytes())
            else:
                writer.write(b"220 mx.test ESMTP\r\n")
            await writer.drain()
            await reader.read()  # hold the slot until the client hangs up
        finally:
            lim.release(ip)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conns = []
    try:
        lines = []
        for _ in range(4):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            conns.append((r, w))
            lines.append(await asyncio.wait_for(r.readline(), 5))
        assert lines == [
            b"220 mx.test ESMTP\r\n",
            b"421 4.7.0 Too many connections from your address\r\n",
            b"421 4.7.0 Too many connections from your address\r\n",
            b"",  # fourth: more than 3 x 1 open, closed without a word
        ]
        for _, w in conns:
            w.close()
        for _ in range(100):  # the server notices the hang-ups and releases
            if lim.active == 0:
                break
            await asyncio.sleep(0.01)
        assert lim.active == 0
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r.readline(), 5) == b"220 mx.test ESMTP\r\n"
        w.close()
    finally:
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------ max-error-recipients


def test_error_recipient_limit() -> None:
    limit = ErrorRecipientLimit(3)  # ZMailer's default
    assert [limit.rcpt_reply("", n) for n in range(3)] == [None, None, None]
    assert limit.rcpt_reply("", 3) is TOO_MANY_ERROR_RECIPIENTS
    assert limit.rcpt_reply("", 50) is TOO_MANY_ERROR_RECIPIENTS
    # Only the null reverse-path is limited.
    assert limit.rcpt_reply("sender@example.com", 500) is None
    assert TOO_MANY_ERROR_RECIPIENTS.to_bytes() == (
        b"550 5.7.1 Too many recipients for a message with an empty reverse-path\r\n"
    )


def test_error_recipient_limit_one_and_disabled() -> None:
    assert ErrorRecipientLimit(1).rcpt_reply("", 0) is None
    assert ErrorRecipientLimit(1).rcpt_reply("", 1) is not None
    assert ErrorRecipientLimit(None).rcpt_reply("", 10_000) is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "3"])
def test_error_recipient_limit_rejects(bad: object) -> None:
    with pytest.raises(ConfigError) as exc:
        ErrorRecipientLimit(bad)  # type: ignore[arg-type]
    assert exc.value.problems == [
        f"server.max_error_recipients: expected an integer >= 1, got {bad!r}"
    ]

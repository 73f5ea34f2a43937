"""Per-recipient delivery (the queue path): UpstreamDelivery.deliver_recipients against real
aiosmtpd upstreams and a scripted raw SMTP peer on loopback (RFC 5321 §3.3, §6.1)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from smtpgate.delivery.outbound import RecipientResults, remote_reply
from smtpgate.delivery.upstream import UpstreamDelivery
from smtpgate.envelope import Envelope, Recipient
from smtpgate.reply import Reply

from .conftest import StartUpstream, Upstream, free_port

MESSAGE = (
    b"From: a@example.org\r\nTo: b@example.com\r\nSubject: per-recipient\r\n\r\n"
    b".leading dot\r\nbody\r\n"
)


def env(*rcpts: str, sender: str = "a@example.org", **params: str | None) -> Envelope:
    return Envelope(sender, dict(params), [Recipient(r) for r in rcpts])


def url(up: Upstream) -> str:
    return f"smtp://{up.hostport}"


def codes(results: RecipientResults) -> dict[str, tuple[int, str | None]]:
    return {a: (r.code, r.enhanced) for a, r in results.items()}


async def test_one_of_two_refused_other_delivered(upstream: Upstream) -> None:
    upstream.handler.refuse_rcpt["bad@example.com"] = "550 5.1.1 No such user here"
    async with UpstreamDelivery(url(upstream)) as d:
        results = await d.deliver_recipients(env("bad@example.com", "good@example.com"), MESSAGE)
    assert results == {
        "bad@example.com": Reply(550, "5.1.1", "No such user here"),
        "good@example.com": Reply(250, "2.0.0", "Ok: queued as CAPTURE1"),
    }
    assert results.delivered == ["good@example.com"] and results.failed == ["bad@example.com"]
    assert results.is_remote("bad@example.com") and results.remote_mta == "127.0.0.1"
    [msg] = upstream.handler.messages
    assert msg.rcpt_tos == ["good@example.com"] and msg.content == MESSAGE


async def test_all_refused_sends_no_data_and_resets(upstream: Upstream) -> None:
    upstream.handler.refuse_rcpt["x@example.com"] = "450 4.2.1 Mailbox busy"
    upstream.handler.refuse_rcpt["y@example.com"] = "554 refused"
    async with UpstreamDelivery(url(upstream)) as d:
        results = await d.deliver_recipients(env("x@example.com", "y@example.com"), MESSAGE)
        assert codes(results) == {"x@example.com": (450, "4.2.1"), "y@example.com": (554, "5.0.0")}
        assert results.deferred == ["x@example.com"]
        # the connection was reset and is reused
        again = await d.deliver_recipients(env("z@example.com"), MESSAGE)
        assert again["z@example.com"].code == 250
        assert d.connections_opened == 1
    assert upstream.handler.rset_count >= 1
    assert [m.rcpt_tos for m in upstream.handler.messages] == [["z@example.com"]]


async def test_upstream_down_all_451_4_4_1() -> None:
    async with UpstreamDelivery(f"smtp://127.0.0.1:{free_port()}", timeout=5) as d:
        results = await d.deliver_recipients(env("b@example.com", "c@example.com"), MESSAGE)
    assert codes(results) == {"b@example.com": (451, "4.4.1"), "c@example.com": (451, "4.4.1")}
    assert results.synthesized == {"b@example.com", "c@example.com"}
    assert not results.is_remote("b@example.com")


@pytest.mark.parametrize(
    ("data_reply", "code", "enhanced"),
    [("554 5.7.1 Rejected by content filter", 554, "5.7.1"), ("452 4.3.1 Disk full", 452, "4.3.1")],
)
async def test_data_failure_goes_to_every_accepted_recipient(
    upstream: Upstream, data_reply: str, code: int, enhanced: str
) -> None:
    upstream.handler.data_reply = data_reply
    upstream.handler.refuse_rcpt["bad@example.com"] = "550 5.1.1 No such user"
    async with UpstreamDelivery(url(upstream)) as d:
        results = await d.deliver_recipients(
            env("b@example.com", "bad@example.com", "c@example.com"), MESSAGE
        )
    assert codes(results) == {
        "b@example.com": (code, enhanced),
        "bad@example.com": (550, "5.1.1"),
        "c@example.com": (code, enhanced),
    }
    assert results["b@example.com"].text == data_reply.split(" ", 2)[2]


async def test_sender_refused_applies_to_all(upstream: Upstream) -> None:
    upstream.handler.refuse_mail = "553 5.1.8 Sender domain does not exist"
    async with UpstreamDelivery(url(upstream)) as d:
        results = await d.deliver_recipients(env("b@example.com", "c@example.com"), MESSAGE)
    assert set(codes(results).values()) == {(553, "5.1.8")}
    assert upstream.handler.commands == ["MAIL a@example.org"]


async def test_dsn_params_only_when_advertised(start_upstream: StartUpstream) -> None:
    e = Envelope(
        "a@example.org",
        {"RET": "HDRS", "ENVID": "Q1"},
        [Recipient("b@example.com", {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;b@example.com"})],
    )
    with_dsn = start_upstream(dsn=True)
    without = start_upstream()
    async with UpstreamDelivery(url(with_dsn)) as d:
        assert (await d.deliver_recipients(e, MESSAGE))["b@example.com"].code == 250
    async with UpstreamDelivery(url(without)) as d:
        assert (await d.deliver_recipients(e, MESSAGE))["b@example.com"].code == 250
    [got] = with_dsn.handler.messages
    assert "RET=HDRS" in got.mail_options and "ENVID=Q1" in got.mail_options
    assert got.rcpt_options == ["NOTIFY=FAILURE,DELAY", "ORCPT=RFC822;B@EXAMPLE.COM"]
    [plain] = without.handler.messages
    assert not any(o.startswith(("RET", "ENVID")) for o in plain.mail_options)
    assert plain.rcpt_options == []


async def test_bad_address_refused_locally_others_delivered(upstream: Upstream) -> None:
    async with UpstreamDelivery(url(upstream)) as d:
        results = await d.deliver_recipients(env("ok@example.com", "x>y@example.com"), MESSAGE)
    assert codes(results) == {"ok@example.com": (250, "2.0.0"), "x>y@example.com": (501, "5.1.3")}
    assert results.synthesized == {"x>y@example.com"}
    assert upstream.handler.messages[0].rcpt_tos == ["ok@example.com"]


async def test_smtputf8_needed_but_missing_is_permanent_for_all(
    start_upstream: StartUpstream,
) -> None:
    up = start_upstream(enable_SMTPUTF8=False)
    async with UpstreamDelivery(url(up)) as d:
        results = await d.deliver_recipients(env("j\u00f6rg@example.com", "b@example.com"), MESSAGE)
    assert set(codes(results).values()) == {(553, "5.6.7")}
    assert up.handler.commands == []


async def test_closed_delivery_defers_everyone(upstream: Upstream) -> None:
    d = UpstreamDelivery(url(upstream))
    await d.aclose()
    results = await d.deliver_recipients(env("b@example.com"), MESSAGE)
    assert codes(results) == {"b@example.com": (451, "4.3.2")}
    assert await d.deliver_recipients(env(), MESSAGE) == {}


async def test_shares_the_pool_with_the_atomic_path(upstream: Upstream) -> None:
    async with UpstreamDelivery(url(upstream), probe_after=60) as d:
        assert (await d.deliver(env("one@example.com"), MESSAGE)).code == 250
        results = await d.deliver_recipients(env("two@example.com"), MESSAGE)
        assert results["two@example.com"].code == 250
        assert d.connections_opened == 1


# -- failure modes aiosmtpd cannot produce: a scripted peer ------------------------------

Script = Callable[[str, int], bytes | None]


class ScriptedPeer:
    """A raw SMTP peer: ``script(command, rcpt_index)`` returns the reply bytes for RCPT
    and the final DATA reply (``rcpt_index`` = -1), or ``None`` to drop the connection."""

    def __init__(self, script: Script, *, mail_reply: bytes = b"250 2.1.0 ok\r\n") -> None:
        self.script = script
        self.mail_reply = mail_reply
        self.server: asyncio.Server | None = None
        self.data: list[bytes] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer.test ESMTP\r\n")
        rcpt = 0
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    reply: bytes | None = b"250-peer.test\r\n250 8BITMIME\r\n"
                elif verb == b"MAIL":
                    reply = self.mail_reply
                elif verb == b"RCPT":
                    reply = self.script("RCPT", rcpt)
                    rcpt += 1
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    body = b""
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        body += chunk
                    self.data.append(body)
                    reply = self.script("DATA", -1)
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    reply = b"250 2.0.0 ok\r\n"
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if reply.startswith(b"421"):
                    break
        finally:
            writer.close()


async def run_peer(peer: ScriptedPeer, e: Envelope) -> RecipientResults:
    port = await peer.start()
    try:
        async with UpstreamDelivery(f"smtp://127.0.0.1:{port}", timeout=5) as d:
            return await d.deliver_recipients(e, MESSAGE)
    finally:
        await peer.stop()


async def test_421_during_rcpt_defers_the_rest_keeps_earlier_refusal() -> None:
    replies = [b"550 5.1.1 unknown\r\n", b"250 2.1.5 ok\r\n", b"421 4.3.2 shutting down\r\n"]
    peer = ScriptedPeer(lambda cmd, i: replies[i] if cmd == "RCPT" else b"250 ok\r\n")
    results = await run_peer(peer, env("a@x.test", "b@x.test", "c@x.test", "d@x.test"))
    assert codes(results) == {
        "a@x.test": (550, "5.1.1"),
        "b@x.test": (451, "4.4.1"),  # accepted, but no DATA happened
        "c@x.test": (451, "4.4.1"),
        "d@x.test": (451, "4.4.1"),  # never tried
    }
    assert "421 4.3.2 shutting down" in results["c@x.test"].text
    assert results.synthesized == {"b@x.test", "c@x.test", "d@x.test"}
    assert peer.data == []


async def test_connection_lost_after_the_dot_defers_accepted_recipients() -> None:
    peer = ScriptedPeer(
        lambda cmd, i: (
            (b"250 ok\r\n" if i == 0 else b"551 5.1.6 moved\r\n") if cmd == "RCPT" else None
        )
    )
    results = await run_peer(peer, env("a@x.test", "b@x.test"))
    assert codes(results) == {"a@x.test": (451, "4.4.1"), "b@x.test": (551, "5.1.6")}
    assert len(peer.data) == 1  # the message went out; its fate is unknown (RFC 5321 §6.1)


async def test_421_at_mail_defers_everyone() -> None:
    peer = ScriptedPeer(lambda cmd, i: b"250 ok\r\n", mail_reply=b"421 4.7.0 go away\r\n")
    results = await run_peer(peer, env("a@x.test", "b@x.test"))
    assert set(codes(results).values()) == {(451, "4.4.1")}


async def test_data_reply_without_enhanced_code() -> None:
    peer = ScriptedPeer(lambda cmd, i: b"250 ok\r\n" if cmd == "RCPT" else b"250 queued as 42\r\n")
    results = await run_peer(peer, env("a@x.test"))
    assert results["a@x.test"] == Reply(250, "2.0.0", "queued as 42")


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (550, "5.1.1 No such user\n5.1.1 really", Reply(550, "5.1.1", "No such user really")),
        (450, "5.1.1 class mismatch", Reply(450, "4.0.0", "class mismatch")),
        (354, "go ahead", Reply(451, "4.4.0", "Unexpected reply from remote server: 354 go ahead")),
        (250, "", Reply(250, "2.0.0", "(no text)")),
        (554, "bad\x00byte", Reply(554, "5.0.0", "bad?byte")),
    ],
)
def test_remote_reply(code: int, message: str, expected: Reply) -> None:
    assert remote_reply(code, message) == expected

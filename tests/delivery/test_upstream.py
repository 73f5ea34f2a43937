"""UpstreamDelivery against real aiosmtpd upstreams on loopback (and Postfix smtp-sink)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from urllib.parse import quote

import pytest

from smtpgate.delivery import UpstreamDelivery, make_delivery
from smtpgate.envelope import Envelope, Recipient
from smtpgate.errors import PermanentDeliveryError, TemporaryDeliveryError

from .conftest import PASSWORD, USER, Pki, StartUpstream, Upstream, authenticator, free_port

MESSAGE = (
    b"Received: from x (unknown [192.0.2.1])\r\n\tby y (smtpgate) with ESMTP id A1\r\n"
    b"From: a@example.org\r\nTo: b@example.com\r\nSubject: dots\r\n\r\n"
    b".leading dot\r\n..two dots\r\n.\r\n. space\r\nend\r\n"
)


def env(*rcpts: str, sender: str = "a@example.org", **params: str | None) -> Envelope:
    return Envelope(sender, dict(params), [Recipient(r) for r in rcpts or ("b@example.com",)])


def smtp_url(up: Upstream) -> str:
    return f"smtp://{up.hostport}"


async def test_bytes_arrive_exactly_including_dot_lines(upstream: Upstream) -> None:
    d = UpstreamDelivery(smtp_url(upstream), helo_name="gate.test")
    try:
        reply = await d.deliver(env("b@example.com"), MESSAGE)
    finally:
        await d.aclose()
    assert reply.code == 250 and reply.enhanced == "2.0.0"
    assert reply.text == "Message accepted upstream: Ok: queued as CAPTURE1"
    [msg] = upstream.handler.messages
    assert msg.content == MESSAGE
    assert msg.mail_from == "a@example.org"
    assert msg.rcpt_tos == ["b@example.com"]
    assert not msg.tls


async def test_null_sender_and_params_passed_when_advertised(
    start_upstream: StartUpstream,
) -> None:
    up = start_upstream(dsn=True)
    e = Envelope(
        "",
        {"BODY": "8BITMIME", "RET": "HDRS", "ENVID": "QQ123", "SIZE": "5", "FOO": "bar"},
        [
            Recipient(
                "b@example.com", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;b@example.com"}
            )
        ],
    )
    body = MESSAGE + "caf\u00e9\r\n".encode()
    async with UpstreamDelivery(smtp_url(up)) as d:
        await d.deliver(e, body)
    [msg] = up.handler.messages
    assert msg.mail_from == "<>"  # aiosmtpd records the null reverse-path as "<>"
    assert f"SIZE={len(body)}" in msg.mail_options
    assert "BODY=8BITMIME" in msg.mail_options
    assert "RET=HDRS" in msg.mail_options and "ENVID=QQ123" in msg.mail_options
    assert not any(o.startswith("FOO") for o in msg.mail_options)
    assert msg.rcpt_options == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=RFC822;B@EXAMPLE.COM"]
    assert msg.content == body


async def test_dsn_params_dropped_when_not_advertised(upstream: Upstream) -> None:
    e = Envelope(
        "a@example.org",
        {"RET": "FULL"},
        [Recipient("b@example.com", {"NOTIFY": "NEVER"})],
    )
    async with UpstreamDelivery(smtp_url(upstream)) as d:
        assert (await d.deliver(e, MESSAGE)).code == 250
    [msg] = upstream.handler.messages
    assert not any(o.startswith("RET") for o in msg.mail_options)
    assert msg.rcpt_options == []


async def test_smtputf8_passed_through(start_upstream: StartUpstream) -> None:
    up = start_upstream(enable_SMTPUTF8=True)
    e = env("j\u00f6rg@b\u00fccher.example", SMTPUTF8=None)
    async with UpstreamDelivery(smtp_url(up)) as d:
        assert (await d.deliver(e, MESSAGE)).code == 250
    [msg] = up.handler.messages
    assert "SMTPUTF8" in msg.mail_options
    assert msg.rcpt_tos == ["j\u00f6rg@b\u00fccher.example"]


async def test_smtputf8_to_upstream_without_it_is_permanent(
    start_upstream: StartUpstream,
) -> None:
    up = start_upstream(enable_SMTPUTF8=False)
    async with UpstreamDelivery(smtp_url(up)) as d:
        with pytest.raises(PermanentDeliveryError) as ei:
            await d.deliver(env("j\u00f6rg@example.com", SMTPUTF8=None), MESSAGE)
        assert (ei.value.reply.code, ei.value.reply.enhanced) == (553, "5.6.7")
        # SMTPUTF8 requested but nothing needs it: delivered without the parameter.
        assert (await d.deliver(env("b@example.com", SMTPUTF8=None), MESSAGE)).code == 250
    assert [m.rcpt_tos for m in up.handler.messages] == [["b@example.com"]]
    assert "SMTPUTF8" not in up.handler.messages[0].mail_options


async def test_one_refused_recipient_delivers_nothing(upstream: Upstream) -> None:
    upstream.handler.refuse_rcpt["bad@example.com"] = "550 5.1.1 No such user here"
    async with UpstreamDelivery(smtp_url(upstream)) as d:
        with pytest.raises(PermanentDeliveryError) as ei:
            await d.deliver(env("good@example.com", "bad@example.com"), MESSAGE)
        reply = ei.value.reply
        assert (reply.code, reply.enhanced) == (550, "5.1.1")
        assert reply.text == "Upstream refused <bad@example.com>: 550 5.1.1 No such user here"
        assert upstream.handler.messages == []
        assert upstream.handler.rset_count == 1
        # The connection was reset cleanly and is reused for the next transaction.
        assert (await d.deliver(env("good@example.com"), MESSAGE)).code == 250
        assert d.connections_opened == 1
    assert [m.rcpt_tos for m in upstream.handler.messages] == [["good@example.com"]]


async def test_any_4xx_refusal_makes_it_temporary(upstream: Upstream) -> None:
    upstream.handler.refuse_rcpt["busy@example.com"] = "450 4.2.1 Mailbox busy"
    upstream.handler.refuse_rcpt["bad@example.com"] = "550 5.1.1 No such user"
    async with UpstreamDelivery(smtp_url(upstream)) as d:
        with pytest.raises(TemporaryDeliveryError) as ei:
            await d.deliver(env("bad@example.com", "busy@example.com"), MESSAGE)
    reply = ei.value.reply
    assert (reply.code, reply.enhanced) == (450, "4.2.1")
    assert reply.text.startswith("Upstream refused <busy@example.com>: 450 4.2.1 Mailbox busy")
    assert reply.text.endswith("(and 1 more)")
    assert upstream.handler.messages == []


async def test_refusal_without_enhanced_code_gets_default(upstream: Upstream) -> None:
    upstream.handler.refuse_rcpt["x@example.com"] = "554 nope"
    async with UpstreamDelivery(smtp_url(upstream)) as d:
        with pytest.raises(PermanentDeliveryError) as ei:
            await d.deliver(env("x@example.com"), MESSAGE)
    assert (ei.value.reply.code, ei.value.reply.enhanced) == (554, "5.0.0")


async def test_sender_refused(upstream: Upstream) -> None:
    upstream.handler.refuse_mail = "553 5.1.8 Sender domain does not exist"
    async with UpstreamDelivery(smtp_url(upstream)) as d:
        with pytest.raises(PermanentDeliveryError) as ei:
            await d.deliver(env(), MESSAGE)
    assert (ei.value.reply.code, ei.value.reply.enhanced) == (553, "5.1.8")
    assert "Upstream refused sender <a@example.org>" in ei.value.reply.text


@pytest.mark.parametrize(
    ("data_reply", "exc", "code", "enhanced"),
    [
        ("554 5.7.1 Rejected by content filter", PermanentDeliveryError, 554, "5.7.1"),
        ("452 4.3.1 Insufficient system storage", TemporaryDeliveryError, 452, "4.3.1"),
    ],
)
async def test_data_phase_failure_passed_back(
    upstream: Upstream, data_reply: str, exc: type[Exception], code: int, enhanced: str
) -> None:
    upstream.handler.data_reply = data_reply
    async with UpstreamDelivery(smtp_url(upstream)) as d:
        with pytest.raises(exc) as ei:
            await d.deliver(env(), MESSAGE)
    reply = ei.value.reply  # type: ignore[attr-defined]
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert reply.text.startswith("Upstream rejected the message: ")


async def test_upstream_down_is_temporary_4_4_1(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there any more
    url = f"plain://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}"
    caplog.set_level(logging.DEBUG, logger="smtpgate")
    async with UpstreamDelivery(url, timeout=5) as d:
        with pytest.raises(TemporaryDeliveryError) as ei:
            await d.deliver(env(), MESSAGE)
    reply = ei.value.reply
    # Says what failed (finding 8), not a generic "unreachable".
    assert (reply.code, reply.enhanced, reply.text) == (
        451,
        "4.4.1",
        f"Connection to 127.0.0.1:{port} failed: connection refused",
    )
    assert f"127.0.0.1:{port}" in caplog.text
    assert PASSWORD not in caplog.text and quote(PASSWORD, safe="") not in caplog.text
    assert PASSWORD not in str(ei.value) and PASSWORD not in repr(d)


async def test_upstream_closing_during_greeting_is_temporary() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with UpstreamDelivery(f"smtp://127.0.0.1:{port}", timeout=5) as d:
            with pytest.raises(TemporaryDeliveryError) as ei:
                await d.deliver(env(), MESSAGE)
        assert ei.value.reply.enhanced == "4.4.1"
    finally:
        server.close()
        await server.wait_closed()


async def test_starttls_required_verified_with_cafile(
    start_upstream: StartUpstream, pki: Pki
) -> None:
    up = start_upstream(tls_context=pki.server_context, require_starttls=True)
    async with UpstreamDelivery(f"smtp+starttls://{up.hostport}", cafile=pki.cafile) as d:
        assert (await d.deliver(env(), MESSAGE)).code == 250
    [msg] = up.handler.messages
    assert msg.tls and msg.content == MESSAGE


async def test_starttls_required_untrusted_cert_fails(
    start_upstream: StartUpstream, pki: Pki
) -> None:
    up = start_upstream(tls_context=pki.server_context, require_starttls=True)
    async with UpstreamDelivery(f"smtp+starttls://{up.hostport}", timeout=5) as d:
        with pytest.raises(TemporaryDeliveryError) as ei:
            await d.deliver(env(), MESSAGE)
    reply = ei.value.reply
    assert (reply.code, reply.enhanced) == (451, "4.7.5")
    assert reply.text.startswith(
        f"TLS is required, but the certificate of host {up.hostport} was not verified: "
    ), reply.text
    assert up.handler.messages == []
    # ...but verify=no accepts it.
    async with UpstreamDelivery(f"smtp+starttls://{up.hostport}?verify=no") as d:
        assert (await d.deliver(env(), MESSAGE)).code == 250


async def test_starttls_required_but_not_offered(
    upstream: Upstream, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A security/configuration error, said as such and logged at ERROR once per attempt
    (was ``451 4.4.1 Upstream unreachable`` at WARNING)."""
    caplog.set_level(logging.INFO, logger="smtpgate")
    async with UpstreamDelivery(
        f"smtp+starttls://{upstream.hostport}", cafile=pki.cafile, timeout=5
    ) as d:
        with pytest.raises(TemporaryDeliveryError) as ei:
            await d.deliver(env(), MESSAGE)
    reply = ei.value.reply
    assert (reply.code, reply.enhanced, reply.text) == (
        451, "4.7.4", f"TLS is required, but was not offered by host {upstream.hostport}"
    )
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "TLS" in errors[0].getMessage()
    assert upstream.handler.messages == []


async def test_opportunistic_tls_does_not_verify(start_upstream: StartUpstream, pki: Pki) -> None:
    up = start_upstream(tls_context=pki.server_context)
    async with UpstreamDelivery(smtp_url(up)) as d:  # no cafile: cert is untrusted
        assert (await d.deliver(env(), MESSAGE)).code == 250
    assert up.handler.messages[0].tls


async def test_plain_auth_over_starttls(
    start_upstream: StartUpstream, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    up = start_upstream(
        tls_context=pki.server_context,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    )
    good = f"plain://{USER}:{quote(PASSWORD, safe='')}@{up.hostport}"
    delivery = make_delivery(good, cafile=pki.cafile)
    assert isinstance(delivery, UpstreamDelivery)
    try:
        assert (await delivery.deliver(env(), MESSAGE)).code == 250
    finally:
        await delivery.aclose()
    assert up.handler.messages[0].tls

    caplog.set_level(logging.DEBUG, logger="smtpgate")
    bad = f"plain://{USER}:wrong-{quote(PASSWORD, safe='')}@{up.hostport}"
    async with UpstreamDelivery(bad, cafile=pki.cafile) as d:
        with pytest.raises(TemporaryDeliveryError) as ei:
            await d.deliver(env(), MESSAGE)
    assert (ei.value.reply.code, ei.value.reply.enhanced) == (451, "4.7.0")
    assert "AUTHENTICATION TO UPSTREAM" in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert PASSWORD not in caplog.text and "wrong-" not in caplog.text
    assert len(up.handler.messages) == 1


async def test_implicit_tls_smtps(start_upstream: StartUpstream, pki: Pki) -> None:
    up = start_upstream(ssl_context=pki.server_context)
    async with UpstreamDelivery(f"smtps://{up.hostport}", cafile=pki.cafile) as d:
        assert (await d.deliver(env(), MESSAGE)).code == 250
    [msg] = up.handler.messages
    assert msg.tls and msg.content == MESSAGE


async def test_ipv6_upstream(start_upstream: StartUpstream) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    up = start_upstream(hostname="::1")
    async with UpstreamDelivery(f"smtp://{up.hostport}") as d:
        assert (await d.deliver(env(), MESSAGE)).code == 250
    assert up.handler.messages[0].content == MESSAGE


async def test_pooled_connection_reused(upstream: Upstream) -> None:
    async with UpstreamDelivery(smtp_url(upstream), probe_after=0.0) as d:
        await d.deliver(env("one@example.com"), MESSAGE)
        assert d.idle_connections == 1
        await d.deliver(env("two@example.com"), MESSAGE)
        assert d.connections_opened == 1
    assert len(upstream.handler.sessions) == 1
    assert len({m.session for m in upstream.handler.messages}) == 1
    assert [m.rcpt_tos for m in upstream.handler.messages] == [
        ["one@example.com"],
        ["two@example.com"],
    ]
    assert upstream.handler.rset_count == 1  # the probe before reuse


async def test_concurrent_deliveries_one_transaction_per_connection(upstream: Upstream) -> None:
    async with UpstreamDelivery(smtp_url(upstream), pool_size=3) as d:
        msgs = [MESSAGE + f"n={i}\r\n".encode() for i in range(6)]
        replies = await asyncio.gather(
            *(d.deliver(env(f"r{i}@example.com"), m) for i, m in enumerate(msgs))
        )
        assert all(r.code == 250 for r in replies)
        opened = d.connections_opened
        assert d.idle_connections == 3
        again = await asyncio.gather(
            *(d.deliver(env(f"s{i}@example.com"), msgs[i]) for i in range(3))
        )
        assert all(r.code == 250 for r in again)
        assert d.connections_opened == opened  # all three came from the pool
    got = {m.rcpt_tos[0]: m.content for m in upstream.handler.messages}
    assert got == {
        **{f"r{i}@example.com": msgs[i] for i in range(6)},
        **{f"s{i}@example.com": msgs[i] for i in range(3)},
    }


async def test_idle_connections_expire(upstream: Upstream) -> None:
    async with UpstreamDelivery(smtp_url(upstream), idle_timeout=0.2) as d:
        await d.deliver(env(), MESSAGE)
        assert d.idle_connections == 1
        await asyncio.sleep(0.5)
        assert d.idle_connections == 0
        await d.deliver(env(), MESSAGE)
        assert d.connections_opened == 2


async def test_pooled_connection_closed_by_upstream_is_replaced(
    start_upstream: StartUpstream,
) -> None:
    up = start_upstream(timeout=0.3)  # aiosmtpd drops idle clients after 0.3 s
    async with UpstreamDelivery(smtp_url(up), probe_after=60) as d:
        await d.deliver(env("one@example.com"), MESSAGE)
        await asyncio.sleep(0.8)
        assert (await d.deliver(env("two@example.com"), MESSAGE)).code == 250
        assert d.connections_opened == 2
    assert [m.rcpt_tos for m in up.handler.messages] == [["one@example.com"], ["two@example.com"]]


class RawUpstream:
    """A tiny hand-written SMTP peer for failure modes aiosmtpd cannot produce.

    ``drop_second_mail``: close the socket, without a reply, at the second MAIL on
    a connection (a pooled connection that died unnoticed). ``broken_starttls``:
    advertise STARTTLS, answer 220, then send garbage instead of a TLS handshake.
    """

    def __init__(self, *, drop_second_mail: bool = False, broken_starttls: bool = False):
        self.drop_second_mail = drop_second_mail
        self.broken_starttls = broken_starttls
        self.connections = 0
        self.delivered: list[tuple[list[str], bytes]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        mails = 0
        rcpts: list[str] = []
        writer.write(b"220 raw.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                cmd = line.decode().strip()
                verb = cmd[:4].upper()
                if verb == "EHLO":
                    tls = "250-STARTTLS\r\n" if self.broken_starttls else ""
                    writer.write(f"250-raw.test\r\n{tls}250 8BITMIME\r\n".encode())
                elif verb == "STAR":
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    writer.write(b"this is not TLS\r\n" * 10)
                    await writer.drain()
                    break
                elif verb == "MAIL":
                    mails += 1
                    if self.drop_second_mail and mails == 2:
                        break
                    rcpts = []
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == "RCPT":
                    rcpts.append(cmd.split(":", 1)[1].strip("<> "))
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    data = b""
                    while (chunk := await reader.readline()) != b".\r\n":
                        data += chunk[1:] if chunk.startswith(b".") else chunk
                    self.delivered.append((rcpts, data))
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        finally:
            writer.close()


async def test_dead_pooled_connection_detected_at_mail_is_retried_fresh() -> None:
    raw = RawUpstream(drop_second_mail=True)
    port = await raw.start()
    try:
        async with UpstreamDelivery(f"smtp://127.0.0.1:{port}", probe_after=60) as d:
            await d.deliver(env("one@example.com"), MESSAGE)
            assert (await d.deliver(env("two@example.com"), MESSAGE)).code == 250
            assert d.connections_opened == 2
    finally:
        await raw.stop()
    assert raw.delivered == [(["one@example.com"], MESSAGE), (["two@example.com"], MESSAGE)]


async def test_opportunistic_tls_falls_back_to_plaintext_on_handshake_failure() -> None:
    raw = RawUpstream(broken_starttls=True)
    port = await raw.start()
    try:
        async with UpstreamDelivery(f"smtp://127.0.0.1:{port}", timeout=5) as d:
            assert (await d.deliver(env(), MESSAGE)).code == 250
        async with UpstreamDelivery(f"smtp+starttls://127.0.0.1:{port}", timeout=5) as d:
            with pytest.raises(TemporaryDeliveryError) as ei:
                await d.deliver(env(), MESSAGE)
        assert ei.value.reply.enhanced == "4.4.1"
    finally:
        await raw.stop()
    assert raw.delivered == [(["b@example.com"], MESSAGE)]
    assert raw.connections == 3


async def test_aclose_closes_pool_and_refuses_new_work(upstream: Upstream) -> None:
    d = UpstreamDelivery(smtp_url(upstream))
    await d.deliver(env(), MESSAGE)
    assert d.idle_connections == 1
    await d.aclose()
    assert d.idle_connections == 0
    with pytest.raises(TemporaryDeliveryError) as ei:
        await d.deliver(env(), MESSAGE)
    assert ei.value.reply.code == 451


async def test_smtp_sink_accepts(tmp_path: object) -> None:
    sink = shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if shutil.which("smtp-sink", path="/usr/sbin") else None
    )
    if sink is None:
        pytest.skip("Postfix smtp-sink not installed")
    port = free_port()
    proc = subprocess.Popen(
        [sink, "-u", "nobody", f"127.0.0.1:{port}", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("smtp-sink did not start")
                await asyncio.sleep(0.05)
        async with UpstreamDelivery(f"smtp://127.0.0.1:{port}") as d:
            reply = await d.deliver(env("b@example.com", "c@example.com"), MESSAGE)
            assert (reply.code, reply.enhanced) == (250, "2.0.0")
            assert (await d.deliver(env(), MESSAGE)).code == 250
    finally:
        proc.terminate()
        proc.wait(timeout=5)

"""send_message: the nssmtpd ``ns_smtpd send`` equivalent, end to end over loopback."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from smtpgate.delivery import send_message
from smtpgate.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError

from .conftest import PASSWORD, USER, Pki, StartUpstream, Upstream, authenticator, free_port


async def test_round_trip_host_port_normalises_lf(upstream: Upstream) -> None:
    reply = await send_message(
        "a@example.org",
        ["b@example.com", "c@example.com"],
        b"Subject: hi\n\n.dot\nline two\r\nend\n",
        host="127.0.0.1",
        port=upstream.port,
    )
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    [msg] = upstream.handler.messages
    assert msg.content == b"Subject: hi\r\n\r\n.dot\r\nline two\r\nend\r\n"
    assert msg.rcpt_tos == ["b@example.com", "c@example.com"]
    assert "BODY=8BITMIME" not in msg.mail_options


async def test_round_trip_relay_url_with_auth(start_upstream: StartUpstream, pki: Pki) -> None:
    up = start_upstream(
        tls_context=pki.server_context,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    )
    url = f"plain://{USER}:{quote(PASSWORD, safe='')}@{up.hostport}"
    reply = await send_message(
        "a@example.org",
        ["b@example.com"],
        "Subject: \u00e9\n\nx\n".encode(),
        relay_url=url,
        cafile=pki.cafile,
    )
    assert reply.code == 250
    [msg] = up.handler.messages
    assert msg.tls and "BODY=8BITMIME" in msg.mail_options
    assert msg.content == "Subject: \u00e9\r\n\r\nx\r\n".encode()


async def test_host_takes_precedence_over_relay_url(upstream: Upstream) -> None:
    reply = await send_message(
        "a@example.org",
        ["b@example.com"],
        b"x\r\n",
        relay_url="smtp://127.0.0.1:1",
        host="127.0.0.1",
        port=upstream.port,
    )
    assert reply.code == 250
    assert len(upstream.handler.messages) == 1


async def test_port_overrides_relay_url_port(upstream: Upstream) -> None:
    await send_message(
        "a@example.org",
        ["b@example.com"],
        b"x\r\n",
        relay_url="smtp://127.0.0.1:1",
        port=upstream.port,
    )
    assert len(upstream.handler.messages) == 1


async def test_refused_recipient_raises(upstream: Upstream) -> None:
    upstream.handler.refuse_rcpt["bad@example.com"] = "550 5.1.1 unknown"
    with pytest.raises(PermanentDeliveryError):
        await send_message(
            "a@example.org",
            ["ok@example.com", "bad@example.com"],
            b"x\r\n",
            host="127.0.0.1",
            port=upstream.port,
        )
    assert upstream.handler.messages == []


async def test_unreachable_raises_temporary() -> None:
    with pytest.raises(TemporaryDeliveryError) as ei:
        await send_message(
            "a@example.org",
            ["b@example.com"],
            b"x\r\n",
            host="127.0.0.1",
            port=free_port(),
            timeout=5,
        )
    assert ei.value.reply.enhanced == "4.4.1"


async def test_discard_and_bad_input() -> None:
    reply = await send_message("a@x.example", ["b@x.example"], b"x\n", relay_url="discard:")
    assert reply.code == 250
    with pytest.raises(ConfigError):
        await send_message("a@x.example", ["b@x.example"], b"x\n", relay_url="bogus://h")
    with pytest.raises(ConfigError):
        await send_message("a@x.example", ["b@x.example"], b"x\n", host="h", port=70000)
    with pytest.raises(PermanentDeliveryError) as ei:
        await send_message("a@x.example", [], b"x\n", host="127.0.0.1", port=free_port())
    assert ei.value.reply.code == 554

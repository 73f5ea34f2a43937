"""DiscardDelivery, CallableDelivery and the make_delivery factory."""

from __future__ import annotations

import logging

import pytest

from smtpgate.delivery import (
    CallableDelivery,
    Delivery,
    DiscardDelivery,
    UpstreamDelivery,
    make_delivery,
)
from smtpgate.envelope import Envelope, Recipient
from smtpgate.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError
from smtpgate.reply import Reply

MESSAGE = b"Subject: x\r\n\r\nhi\r\n"


def env() -> Envelope:
    return Envelope("a@example.org", {}, [Recipient("b@example.com")])


async def test_discard() -> None:
    d = make_delivery("discard:")
    assert isinstance(d, DiscardDelivery)
    reply = await d.deliver(env(), MESSAGE)
    assert reply == Reply(250, "2.0.0", "Message accepted and discarded")
    await d.aclose()


async def test_sync_callable_gets_envelope_and_bytes() -> None:
    seen: list[tuple[Envelope, bytes]] = []

    def func(e: Envelope, m: bytes) -> None:
        seen.append((e, m))

    e = env()
    reply = await CallableDelivery(func).deliver(e, MESSAGE)
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    assert seen == [(e, MESSAGE)]


async def test_async_callable_returning_reply() -> None:
    async def func(e: Envelope, m: bytes) -> Reply:
        return Reply(250, "2.0.0", f"stored {len(m)} bytes")

    reply = await CallableDelivery(func).deliver(env(), MESSAGE)
    assert reply == Reply(250, "2.0.0", f"stored {len(MESSAGE)} bytes")


@pytest.mark.parametrize(
    ("reply", "exc"),
    [
        (Reply(550, "5.7.1", "no thanks"), PermanentDeliveryError),
        (Reply(452, "4.2.2", "over quota"), TemporaryDeliveryError),
    ],
)
async def test_callable_failure_reply_raises(reply: Reply, exc: type[Exception]) -> None:
    async def func(e: Envelope, m: bytes) -> Reply:
        return reply

    with pytest.raises(exc) as ei:
        await CallableDelivery(func).deliver(env(), MESSAGE)
    assert ei.value.reply == reply  # type: ignore[attr-defined]


async def test_callable_delivery_error_passes_through() -> None:
    err = PermanentDeliveryError(Reply(554, "5.6.0", "bad content"))

    def func(e: Envelope, m: bytes) -> None:
        raise err

    with pytest.raises(PermanentDeliveryError) as ei:
        await CallableDelivery(func).deliver(env(), MESSAGE)
    assert ei.value is err


@pytest.mark.parametrize("is_async", [False, True])
async def test_callable_exception_is_451_and_logged(
    is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def sync_func(e: Envelope, m: bytes) -> None:
        raise RuntimeError("boom")

    async def async_func(e: Envelope, m: bytes) -> None:
        raise RuntimeError("boom")

    caplog.set_level(logging.ERROR, logger="smtpgate")
    d = CallableDelivery(async_func if is_async else sync_func)
    with pytest.raises(TemporaryDeliveryError) as ei:
        await d.deliver(env(), MESSAGE)
    assert (ei.value.reply.code, ei.value.reply.enhanced) == (451, "4.3.0")
    [record] = [r for r in caplog.records if r.name.startswith("smtpgate")]
    assert record.exc_info is not None and "boom" in caplog.text


async def test_callable_returning_garbage_is_451() -> None:
    def func(e: Envelope, m: bytes) -> object:
        return "ok"

    with pytest.raises(TemporaryDeliveryError):
        await CallableDelivery(func).deliver(env(), MESSAGE)  # type: ignore[arg-type]


def test_factory_kinds_and_protocol(tmp_path: object) -> None:
    up = make_delivery("smtp://127.0.0.1:2525", timeout=3, helo_name="gate.test")
    assert isinstance(up, UpstreamDelivery)
    assert up.timeout == 3 and up.helo_name == "gate.test"
    for d in (up, DiscardDelivery(), CallableDelivery(lambda e, m: None), make_delivery(None)):
        assert isinstance(d, Delivery)


def test_factory_bad_url_hides_password() -> None:
    with pytest.raises(ConfigError) as ei:
        make_delivery("plain://u:TopSecret99@host:notaport")
    assert "TopSecret99" not in str(ei.value)
    with pytest.raises(ConfigError):
        make_delivery("smtp://h", helo_name="bad\r\nname")

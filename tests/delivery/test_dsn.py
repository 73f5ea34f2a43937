"""RFC 3464 DSNs built by smtpgate.delivery.dsn, parsed back with the stdlib email package,
and the RFC 3461 NOTIFY decision table."""

from __future__ import annotations

import re
from email import message_from_bytes, policy
from email.message import EmailMessage, Message

import pytest

from smtpgate.delivery.dsn import (
    RecipientStatus,
    build_dsn,
    original_recipient,
    should_notify,
    xtext_decode,
)
from smtpgate.delivery.upstream import UpstreamDelivery
from smtpgate.envelope import Envelope, Recipient
from smtpgate.reply import Reply

from .conftest import Upstream

ORIGINAL = (
    b"Received: from client.example.org (client.example.org [192.0.2.7])\r\n"
    b"\tby gate.example.net (smtpgate) with ESMTPS id 4B2\r\n"
    b"From: Alice <a@example.org>\r\nTo: b@example.com, c@example.com\r\n"
    b"Subject: quarterly numbers, a subject long enough to exceed the seventy-eight column fold\r\n"
    b"Message-ID: <orig-1@example.org>\r\n\r\n"
    b"Hello,\r\n.leading dot\r\nthe body text\r\n"
)
ARRIVAL = 1_700_000_000.0


def statuses() -> list[RecipientStatus]:
    return [
        RecipientStatus(
            "b@example.com",
            Reply(550, "5.1.1", "No such user here"),
            {"NOTIFY": "FAILURE", "ORCPT": "rfc822;B+2Bx@Example.COM"},
            remote_mta="mx1.example.com",
            last_attempt=ARRIVAL + 60,
        ),
        RecipientStatus(
            "c@example.com",
            Reply(451, "4.4.1", "Connection to mx.example.com[192.0.2.9]:25 failed"),
        ),
    ]


def build(**overrides: object) -> bytes:
    kwargs: dict[str, object] = dict(
        reporting_mta="gate.example.net",
        original_envelope_id="ENV+2B42",
        mail_from="a@example.org",
        arrival_date=ARRIVAL,
        recipients=statuses(),
        original_message=ORIGINAL,
        ret="FULL",
        kind="failure",
        message_id_domain="gate.example.net",
        now=ARRIVAL + 120,
    )
    kwargs.update(overrides)
    return build_dsn(**kwargs)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    out = []
    for part in payload:
        assert isinstance(part, EmailMessage)
        out.append(part)
    return out


def blocks(dsn: EmailMessage) -> list[Message]:
    status = parts(dsn)[1]
    assert status.get_content_type() == "message/delivery-status"
    payload = status.get_payload()
    assert isinstance(payload, list)
    return [b for b in payload if isinstance(b, Message)]


def test_failure_report_structure() -> None:
    raw = build()
    assert re.search(rb"(?<!\r)\n", raw) is None, "bare LF in the DSN"
    assert raw.isascii()
    dsn = parse(raw)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert str(dsn["From"]) == "Mail Delivery System <MAILER-DAEMON@gate.example.net>"
    assert str(dsn["To"]) == "a@example.org"
    assert str(dsn["Subject"]) == "Undelivered Mail Returned to Sender"
    assert str(dsn["Auto-Submitted"]) == "auto-replied"
    assert str(dsn["Message-ID"]).endswith("@gate.example.net>")
    assert str(dsn["Date"]) == "Tue, 14 Nov 2023 22:15:20 +0000"
    report = parts(dsn)
    assert [p.get_content_type() for p in report] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    text = report[0].get_content()
    assert "could not be delivered" in text
    assert "<b@example.com>: mx1.example.com said: 550 5.1.1 No such user here" in text

    per_message, b, c = blocks(dsn)
    assert per_message["Reporting-MTA"] == "dns; gate.example.net"
    assert per_message["Original-Envelope-Id"] == "ENV+42"  # xtext-decoded
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert dict(b.items()) == {
        "Original-Recipient": "rfc822;B+x@Example.COM",
        "Final-Recipient": "rfc822; b@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 No such user here",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:14:20 +0000",
    }
    assert c["Final-Recipient"] == "rfc822; c@example.com"
    assert c["Original-Recipient"] is None and c["Remote-MTA"] is None
    assert c["Status"] == "4.4.1"
    assert c["Diagnostic-Code"].startswith("X-Smtpgate; 451 4.4.1 Connection to")


def test_ret_full_returns_the_message_verbatim() -> None:
    raw = build(ret="full")
    assert ORIGINAL in raw  # header lines (even the long one) and body byte for byte
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "message/rfc822"
    [inner] = parts(returned)
    assert inner["Message-ID"] == "<orig-1@example.org>"
    assert "the body text" in inner.get_content()


def test_ret_hdrs_returns_only_the_headers() -> None:
    raw = build(ret="HDRS")
    part = parts(parse(raw))[2]
    assert part.get_content_type() == "text/rfc822-headers"
    headers = part.get_content()
    assert "Message-ID: <orig-1@example.org>" in headers
    assert "Subject: quarterly numbers" in headers
    assert b"the body text" not in raw
    assert "Its headers are attached" in parts(parse(raw))[0].get_content()


def test_oversized_original_falls_back_to_headers() -> None:
    part = parts(parse(build(max_full_size=100)))[2]
    assert part.get_content_type() == "text/rfc822-headers"
    part = parts(parse(build(max_full_size=len(ORIGINAL))))[2]
    assert part.get_content_type() == "message/rfc822"


def test_delay_report() -> None:
    rcpt = RecipientStatus(
        "c@example.com",
        Reply(451, "4.4.1", "Connection refused"),
        remote_mta=None,
        last_attempt=ARRIVAL + 3600,
        will_retry_until=ARRIVAL + 5 * 86400,
    )
    dsn = parse(build(kind="delay", recipients=[rcpt], original_envelope_id=None, ret="HDRS"))
    assert str(dsn["Subject"]) == "Delayed Mail (still being retried)"
    per_message, block = blocks(dsn)
    assert per_message["Original-Envelope-Id"] is None
    assert block["Action"] == "delayed"
    assert block["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    assert "WARNING ONLY" in parts(dsn)[0].get_content()


def test_success_report_and_status_from_reply_class() -> None:
    rcpts = [
        RecipientStatus("b@example.com", Reply(250, None, "ok"), remote_mta="mx.example.com"),
    ]
    dsn = parse(build(kind="success", recipients=rcpts))
    _, block = blocks(dsn)
    assert (block["Action"], block["Status"]) == ("delivered", "2.0.0")
    assert block["Diagnostic-Code"] == "smtp; 250 2.0.0 ok"
    assert str(dsn["Subject"]) == "Successful Mail Delivery Report"


def test_eight_bit_original_and_international_recipient() -> None:
    original = ORIGINAL.replace(b"the body text", "caf\u00e9 \u2603".encode())
    rcpt = RecipientStatus("j\u00f6rg@example.com", Reply(550, "5.1.1", "unknown"))
    raw = build(original_message=original, recipients=[rcpt])
    assert original in raw
    dsn = parse(raw)
    assert parts(dsn)[2]["Content-Transfer-Encoding"] == "8bit"
    _, block = blocks(dsn)
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@example.com"


def test_header_injection_in_reply_text_is_neutralised() -> None:
    rcpt = RecipientStatus("b@example.com", Reply(550, "5.0.0", "line one\nX-Evil: yes"))
    _, block = blocks(parse(build(recipients=[rcpt])))
    assert block["X-Evil"] is None
    assert block["Diagnostic-Code"] == "X-Smtpgate; 550 5.0.0 line one X-Evil: yes"


@pytest.mark.parametrize(
    "bad",
    [
        {"mail_from": ""},
        {"recipients": []},
        {"kind": "bounce"},
        {"ret": "BODY"},
        {"reporting_mta": "bad host\r\nX: y"},
        {"message_id_domain": ""},
    ],
)
def test_invalid_input_raises_value_error(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build(**bad)


def test_null_reverse_path_never_gets_a_dsn() -> None:
    with pytest.raises(ValueError, match="null reverse-path"):
        build(mail_from="")


NOTIFY_TABLE = [
    # (NOTIFY value or None when absent, failure, delay, success)
    (None, True, True, False),
    ("NEVER", False, False, False),
    ("never", False, False, False),
    ("SUCCESS", False, False, True),
    ("FAILURE", True, False, False),
    ("DELAY", False, True, False),
    ("SUCCESS,FAILURE", True, False, True),
    ("failure, delay", True, True, False),
    ("SUCCESS,FAILURE,DELAY", True, True, True),
]


@pytest.mark.parametrize(("notify", "failure", "delay", "success"), NOTIFY_TABLE)
def test_should_notify_table(notify: str | None, failure: bool, delay: bool, success: bool) -> None:
    params: dict[str, str | None] = {} if notify is None else {"NOTIFY": notify}
    assert should_notify(params, "failure") is failure
    assert should_notify(params, "delay") is delay
    assert should_notify(params, "success") is success


def test_should_notify_default_delay_is_configurable() -> None:
    assert should_notify({}, "delay", default_delay=False) is False
    assert should_notify({"NOTIFY": "DELAY"}, "delay", default_delay=False) is True
    assert should_notify({"notify": "NEVER"}, "failure") is False
    with pytest.raises(ValueError):
        should_notify({}, "expanded")  # type: ignore[arg-type]
    # "relayed" (RFC 3461 §5.2.2) is asked for by NOTIFY=SUCCESS only.
    assert should_notify({"NOTIFY": "SUCCESS"}, "relayed") is True
    assert should_notify({"NOTIFY": "FAILURE,DELAY"}, "relayed") is False
    assert should_notify({}, "relayed") is False


def test_xtext_and_orcpt() -> None:
    assert xtext_decode("a+2Bb+3Dc+zz") == "a+b=c+zz"
    assert original_recipient({"ORCPT": "rfc822;x+2By@example.com"}) == "rfc822;x+y@example.com"
    assert original_recipient({"ORCPT": "nonsense"}) is None
    assert original_recipient({}) is None


async def test_dsn_relayed_with_null_reverse_path(upstream: Upstream) -> None:
    """The queue's use: send the DSN with MAIL FROM:<> to the original sender."""
    raw = build()
    bounce = Envelope("", {}, [Recipient("a@example.org")])
    async with UpstreamDelivery(f"smtp://{upstream.hostport}") as d:
        results = await d.deliver_recipients(bounce, raw)
    assert results["a@example.org"].code == 250
    [msg] = upstream.handler.messages
    assert msg.mail_from == "<>" and msg.content == raw

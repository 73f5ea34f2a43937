"""Verdicts, helpers, exceptions, the default reply table and the return-value mapping."""

from __future__ import annotations

import pytest

from smtpgate.errors import SmtpgateError
from smtpgate.hooks import (
    Disconnect,
    HookResult,
    HookVerdictException,
    Reject,
    Stage,
    TempFail,
    Verdict,
    accept,
    cont,
    default_reply,
    drop,
    reject,
    tempfail,
)
from smtpgate.hooks.runner import normalise_result
from smtpgate.reply import Reply


def test_helpers_build_expected_results() -> None:
    assert accept() == HookResult(Verdict.OK, None)
    assert accept("Welcome") == HookResult(Verdict.OK, Reply(250, "2.0.0", "Welcome"))
    assert cont() == HookResult(Verdict.CONT)
    r = reject("No such user", code=550, enhanced="5.1.1")
    assert r.verdict is Verdict.DENY and r.reply == Reply(550, "5.1.1", "No such user")
    assert not r.disconnect
    r = reject("Bye", code=554, disconnect=True)
    assert r.verdict is Verdict.DENY_DISCONNECT and r.disconnect
    assert r.reply is not None and r.reply.code == 554
    t = tempfail("Later")
    assert t.verdict is Verdict.DENYSOFT and t.reply == Reply(451, "4.7.1", "Later")
    t = tempfail("Later", code=421, enhanced="4.7.0", disconnect=True)
    assert t.verdict is Verdict.DENYSOFT_DISCONNECT and t.disconnect
    d = drop()
    assert d.verdict is Verdict.DENYSOFT_DISCONNECT and d.disconnect
    assert d.reply is not None and (d.reply.code, d.reply.enhanced) == (421, "4.7.0")
    d = drop("Go away", code=554, enhanced="5.7.1")
    assert d.verdict is Verdict.DENY_DISCONNECT


@pytest.mark.parametrize(
    "call",
    [
        lambda: reject("x", code=451),
        lambda: reject("x", code=250),
        lambda: tempfail("x", code=550),
        lambda: tempfail("x", code=250),
        lambda: reject("x", code=550, enhanced="4.7.1"),  # class mismatch
        lambda: drop("x", code=250),
        lambda: Reject("x", code=450),
        lambda: TempFail("x", code=554),
        lambda: HookResult(Verdict.OK, Reply(550, "5.7.1", "x")),
        lambda: HookResult(Verdict.DENY, Reply(451, "4.7.1", "x")),
        lambda: HookResult(Verdict.DENYSOFT, Reply(250, "2.0.0", "x")),
        lambda: HookResult(Verdict.CONT, Reply(250, "2.0.0", "x")),
    ],
)
def test_inconsistent_codes_raise_value_error(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_exceptions_carry_results() -> None:
    for exc, verdict, code in [
        (Reject("Spam"), Verdict.DENY, 550),
        (TempFail("Busy"), Verdict.DENYSOFT, 451),
        (Disconnect("Bye"), Verdict.DENYSOFT_DISCONNECT, 421),
    ]:
        assert isinstance(exc, HookVerdictException) and isinstance(exc, SmtpgateError)
        assert exc.result.verdict is verdict
        assert exc.result.reply is not None and exc.result.reply.code == code


@pytest.mark.parametrize(
    ("stage", "verdict", "expected"),
    [
        (Stage.RCPT, Verdict.DENY, "550 5.7.1 Recipient rejected"),
        (Stage.RCPT, Verdict.DENYSOFT, "450 4.7.1 Recipient temporarily rejected"),
        (Stage.MAIL, Verdict.DENY, "550 5.7.1 Sender rejected"),
        (Stage.MAIL, Verdict.DENYSOFT, "450 4.7.1 Sender temporarily rejected"),
        (Stage.CONNECT, Verdict.DENY, "554 5.7.1 Access denied"),
        (Stage.DATA, Verdict.DENY, "550 5.7.1 Message rejected"),
        (Stage.DATA, Verdict.DENYSOFT, "451 4.7.1 Message temporarily rejected"),
        (Stage.HELO, Verdict.DENY, "550 5.7.1 HELO rejected"),
        (Stage.HELO, Verdict.DENY_DISCONNECT, "550 5.7.1 HELO rejected"),
        ("rcpt", Verdict.DENY, "550 5.7.1 Recipient rejected"),
    ],
)
def test_default_reply_table(stage: Stage | str, verdict: Verdict, expected: str) -> None:
    assert str(default_reply(stage, verdict)) == expected


def test_default_reply_edges() -> None:
    for stage in Stage:
        assert default_reply(stage, Verdict.CONT) is None
        assert default_reply(stage, Verdict.OK) is None
    for verdict in Verdict:
        assert default_reply(Stage.QUIT, verdict) is None
        assert default_reply(Stage.ERROR, verdict) is None
    for stage in (Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT, Stage.DATA):
        reply = default_reply(stage, Verdict.DENYSOFT_DISCONNECT)
        assert reply is not None and reply.code == 421  # RFC 5321 §3.8
        assert HookResult(Verdict.DENYSOFT_DISCONNECT, reply).disconnect
    with pytest.raises(ValueError):
        default_reply("bogus", Verdict.DENY)


R550 = Reply(550, "5.1.1", "No such user")
R451 = Reply(451, "4.7.1", "Greylisted")
R421 = Reply(421, "4.7.0", "Bye")
R250 = Reply(250, "2.1.5", "Fine")


@pytest.mark.parametrize(
    ("value", "verdict", "reply"),
    [
        (None, Verdict.CONT, None),
        (True, Verdict.CONT, None),
        (False, Verdict.DENY, Reply(550, "5.7.1", "Recipient rejected")),
        (
            HookResult(Verdict.DENYSOFT),
            Verdict.DENYSOFT,
            Reply(450, "4.7.1", "Recipient temporarily rejected"),
        ),
        (HookResult(Verdict.OK), Verdict.OK, None),
        (reject("No", code=550, enhanced="5.1.1"), Verdict.DENY, Reply(550, "5.1.1", "No")),
        (Verdict.DENY, Verdict.DENY, Reply(550, "5.7.1", "Recipient rejected")),
        (R250, Verdict.OK, R250),
        (Reply(354, None, "go"), Verdict.OK, Reply(354, None, "go")),
        (R451, Verdict.DENYSOFT, R451),
        (R421, Verdict.DENYSOFT_DISCONNECT, R421),
        (R550, Verdict.DENY, R550),
    ],
)
def test_return_value_mapping(value: object, verdict: Verdict, reply: Reply | None) -> None:
    result = normalise_result(Stage.RCPT, value)
    assert result.verdict is verdict
    assert result.reply == reply


@pytest.mark.parametrize("garbage", ["250 OK", 0, 1, 550, b"DENY", object(), ["DENY"]])
def test_garbage_return_values_are_type_errors(garbage: object) -> None:
    with pytest.raises(TypeError):
        normalise_result(Stage.RCPT, garbage)


def test_stage_is_a_str_enum() -> None:
    assert Stage("rcpt") is Stage.RCPT
    assert isinstance(Stage.RCPT, str) and str(Stage.RCPT) == "rcpt"
    assert {"rcpt": 1}[Stage.RCPT] == 1
    assert [s.value for s in Stage] == [
        "connect", "helo", "auth", "mail", "rcpt", "data_start", "headers", "data", "queue",
        "delivered", "vrfy", "unknown", "rset", "error", "quit",
    ]

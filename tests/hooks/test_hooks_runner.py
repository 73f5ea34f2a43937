"""HookRunner: ordering, first non-CONT wins, sync/async/blocking hooks, timeouts, errors."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from smtpgate.envelope import Envelope, Recipient, SessionInfo
from smtpgate.hooks import (
    HookResult,
    HookRunner,
    Reject,
    Stage,
    TempFail,
    Transaction,
    Verdict,
    accept,
    drop,
    reject,
)
from smtpgate.reply import R, Reply

HOOK_TIMEOUT = Reply(451, "4.3.0", "Hook timeout")


def rcpt_args(session: SessionInfo) -> tuple[Any, ...]:
    txn = Transaction(Envelope("a@example.org"), "T1")
    return session, txn, Recipient("user@example.com")


async def test_no_hooks_fast_path(session: SessionInfo) -> None:
    runner = HookRunner()
    assert not runner.has(Stage.RCPT) and not runner.has("rcpt")
    assert not runner.has("nonsense")
    result = await runner.run(Stage.RCPT, *rcpt_args(session))
    assert result == HookResult(Verdict.CONT)


async def test_order_priority_then_registration(session: SessionInfo) -> None:
    runner = HookRunner()
    calls: list[str] = []

    def make(tag: str) -> Any:
        def hook(*args: Any) -> None:
            calls.append(tag)

        return hook

    runner.register("helo", make("b0"), name="b0")
    runner.register(Stage.HELO, make("a-50"), priority=-50, name="a-50")
    runner.register("helo", make("c0"), name="c0")
    runner.register("helo", make("z-big"), priority=10_000, name="z-big")  # clamped to 100
    runner.register("helo", make("d100"), priority=100, name="d100")
    runner.register("helo", make("first"), priority=-1_000, name="first")  # clamped to -100
    assert runner.has("helo")
    listed = runner.hooks("helo")
    assert [h.name for h in listed] == ["first", "a-50", "b0", "c0", "z-big", "d100"]
    assert [h.priority for h in listed] == [-100, -50, 0, 0, 100, 100]
    result = await runner.run("helo", session, "client.example")
    assert result.verdict is Verdict.CONT
    assert calls == ["first", "a-50", "b0", "c0", "z-big", "d100"]


async def test_first_non_cont_wins(session: SessionInfo) -> None:
    runner = HookRunner()
    calls: list[str] = []

    def cont_hook(s: SessionInfo, t: Transaction, r: Recipient) -> None:
        calls.append("cont")

    async def deny_hook(s: SessionInfo, t: Transaction, r: Recipient) -> Any:
        calls.append("deny")
        return reject("No such user", code=550, enhanced="5.1.1")

    def never(s: SessionInfo, t: Transaction, r: Recipient) -> Any:
        calls.append("never")
        return accept()

    runner.register("rcpt", never, priority=50)
    runner.register("rcpt", deny_hook)
    runner.register("rcpt", cont_hook, priority=-5)
    result = await runner.run("rcpt", *rcpt_args(session))
    assert calls == ["cont", "deny"]
    assert result.verdict is Verdict.DENY
    assert str(result.reply) == "550 5.1.1 No such user"


async def test_ok_stops_the_chain(session: SessionInfo) -> None:
    runner = HookRunner()
    runner.register("mail", lambda s, t: accept("Known sender"))
    runner.register("mail", lambda s, t: False)
    txn = Transaction(Envelope("a@example.org"), "T1")
    result = await runner.run("mail", session, txn)
    assert result == HookResult(Verdict.OK, Reply(250, "2.0.0", "Known sender"))


@pytest.mark.parametrize(
    ("behaviour", "verdict", "reply"),
    [
        (lambda: None, Verdict.CONT, None),
        (lambda: True, Verdict.CONT, None),
        (lambda: False, Verdict.DENY, Reply(550, "5.7.1", "Recipient rejected")),
        (lambda: Reply(550, "5.1.1", "Unknown"), Verdict.DENY, Reply(550, "5.1.1", "Unknown")),
        (lambda: Reply(452, "4.2.2", "Full"), Verdict.DENYSOFT, Reply(452, "4.2.2", "Full")),
        (lambda: Reply(250, "2.1.5", "Yes"), Verdict.OK, Reply(250, "2.1.5", "Yes")),
        (
            lambda: HookResult(Verdict.DENYSOFT),
            Verdict.DENYSOFT,
            Reply(450, "4.7.1", "Recipient temporarily rejected"),
        ),
        (lambda: drop(), Verdict.DENYSOFT_DISCONNECT, Reply(421, "4.7.0", "Closing connection")),
        (lambda: "250 OK", Verdict.DENYSOFT, R.HOOK_ERROR),  # garbage → hook error
        (lambda: 42, Verdict.DENYSOFT, R.HOOK_ERROR),
    ],
)
async def test_return_values_through_the_runner(
    session: SessionInfo, behaviour: Any, verdict: Verdict, reply: Reply | None
) -> None:

    async def async_hook(*args: Any) -> Any:
        await asyncio.sleep(0)
        return behaviour()

    def sync_hook(*args: Any) -> Any:
        return behaviour()

    for hook in (sync_hook, async_hook):
        runner = HookRunner()
        runner.register("rcpt", hook)
        result = await runner.run("rcpt", *rcpt_args(session))
        assert (result.verdict, result.reply) == (verdict, reply), hook.__name__


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (Reject("Go away"), "550 5.7.1 Go away"),
        (Reject("Bad user", code=553, enhanced="5.1.3"), "553 5.1.3 Bad user"),
        (TempFail("Greylisted", code=450, enhanced="4.7.1"), "450 4.7.1 Greylisted"),
    ],
)
async def test_verdict_exceptions(session: SessionInfo, exc: Exception, expected: str) -> None:
    runner = HookRunner()

    def sync_hook(*args: Any) -> None:
        raise exc

    async def async_hook(*args: Any) -> None:
        raise exc

    for hook in (sync_hook, async_hook):
        runner = HookRunner()
        runner.register("rcpt", hook)
        result = await runner.run("rcpt", *rcpt_args(session))
        assert str(result.reply) == expected


async def test_disconnect_exception(session: SessionInfo) -> None:
    from smtpgate.hooks import Disconnect

    runner = HookRunner()

    def hook(s: SessionInfo) -> None:
        raise Disconnect("Too many errors")

    runner.register("connect", hook)
    result = await runner.run("connect", session)
    assert result.disconnect and result.verdict is Verdict.DENYSOFT_DISCONNECT
    assert str(result.reply) == "421 4.7.0 Too many errors"


async def test_exception_is_tempfail_with_traceback(
    session: SessionInfo, caplog: pytest.LogCaptureFixture
) -> None:
    runner = HookRunner()

    def broken(s: SessionInfo, t: Transaction) -> None:
        raise KeyError("boom-marker")

    runner.register("data", broken, name="broken-hook")
    runner.register("data", lambda s, t: accept())  # must not run: error is never an accept
    txn = Transaction(Envelope("a@example.org"), "T1")
    with caplog.at_level(logging.ERROR, logger="smtpgate.hooks"):
        result = await runner.run("data", session, txn)
    assert result == HookResult(Verdict.DENYSOFT, R.HOOK_ERROR)
    assert result.reply is not None and (result.reply.code, result.reply.enhanced) == (
        451,
        "4.3.0",
    )
    records = [r for r in caplog.records if r.name == "smtpgate.hooks"]
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert records[0].exc_info is not None and records[0].exc_info[0] is KeyError
    assert "broken-hook" in records[0].getMessage()
    assert "boom-marker" in caplog.text  # the traceback was rendered


async def test_garbage_return_is_logged(
    session: SessionInfo, caplog: pytest.LogCaptureFixture
) -> None:
    runner = HookRunner()
    runner.register("helo", lambda s, h: "OK", name="stringy")
    with caplog.at_level(logging.ERROR, logger="smtpgate.hooks"):
        result = await runner.run("helo", session, "x")
    assert result.reply == R.HOOK_ERROR
    assert "stringy" in caplog.text and "str" in caplog.text


async def test_async_timeout(session: SessionInfo, caplog: pytest.LogCaptureFixture) -> None:
    runner = HookRunner(timeout=0.05)
    finished = False

    async def slow(s: SessionInfo, h: str) -> Any:
        nonlocal finished
        await asyncio.sleep(5)
        finished = True
        return accept()

    runner.register("helo", slow, name="slow-hook")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="smtpgate.hooks"):
        result = await runner.run("helo", session, "client.example")
    assert time.monotonic() - started < 2
    assert result == HookResult(Verdict.DENYSOFT, HOOK_TIMEOUT)
    assert str(result.reply) == "451 4.3.0 Hook timeout"
    assert not finished
    assert "slow-hook" in caplog.text and "timed out" in caplog.text


async def test_blocking_hook_runs_in_thread_and_times_out(session: SessionInfo) -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    release = threading.Event()

    def blocking(s: SessionInfo, h: str) -> Any:
        seen.append(threading.get_ident())
        return reject("From a thread")

    def stuck(s: SessionInfo, h: str) -> Any:
        release.wait(5)
        return accept()

    runner = HookRunner(timeout=0.1)
    runner.register("helo", blocking, blocking=True)
    result = await runner.run("helo", session, "x")
    assert str(result.reply) == "550 5.7.1 From a thread"
    assert seen and seen[0] != loop_thread

    runner = HookRunner(timeout=0.1)
    runner.register("helo", stuck, blocking=True)
    try:
        result = await runner.run("helo", session, "x")
    finally:
        release.set()
    assert result.reply == HOOK_TIMEOUT


async def test_sync_hook_runs_on_loop_thread(session: SessionInfo) -> None:
    seen: list[int] = []
    runner = HookRunner()
    runner.register("connect", lambda s: seen.append(threading.get_ident()))
    await runner.run("connect", session)
    assert seen == [threading.get_ident()]


async def test_slow_sync_hook_warns(session: SessionInfo, caplog: pytest.LogCaptureFixture) -> None:
    runner = HookRunner()

    def slow(s: SessionInfo) -> None:
        time.sleep(0.3)

    runner.register("connect", slow, name="sleepy")
    with caplog.at_level(logging.WARNING, logger="smtpgate.hooks"):
        result = await runner.run("connect", session)
    assert result.verdict is Verdict.CONT
    assert "sleepy" in caplog.text and "blocking=True" in caplog.text


async def test_hook_own_timeout_error_is_an_error_not_a_timeout(session: SessionInfo) -> None:
    runner = HookRunner(timeout=5)

    async def hook(s: SessionInfo) -> None:
        raise TimeoutError("upstream lookup timed out")

    runner.register("connect", hook)
    result = await runner.run("connect", session)
    assert result.reply == R.HOOK_ERROR


async def test_sync_hook_returning_awaitable(session: SessionInfo) -> None:
    runner = HookRunner()

    async def inner() -> Any:
        return reject("Via awaitable")

    runner.register("connect", lambda s: inner())
    result = await runner.run("connect", session)
    assert str(result.reply) == "550 5.7.1 Via awaitable"


async def test_cancellation_propagates(session: SessionInfo) -> None:
    runner = HookRunner()
    started = asyncio.Event()

    async def slow(s: SessionInfo) -> None:
        started.set()
        await asyncio.sleep(10)

    runner.register("connect", slow)
    task = asyncio.create_task(runner.run("connect", session))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("stage", [Stage.QUIT, Stage.ERROR])
async def test_notify_stages_run_all_and_ignore_verdicts(
    stage: Stage, session: SessionInfo, caplog: pytest.LogCaptureFixture
) -> None:
    runner = HookRunner(timeout=0.05)
    calls: list[str] = []

    def denies(*args: Any) -> Any:
        calls.append("denies")
        return reject("ignored")

    async def raises(*args: Any) -> None:
        calls.append("raises")
        raise RuntimeError("quit-hook-failure")

    def raises_verdict(*args: Any) -> None:
        calls.append("raises_verdict")
        raise Reject("ignored too")

    async def times_out(*args: Any) -> None:
        calls.append("times_out")
        await asyncio.sleep(5)

    def last(*args: Any) -> Any:
        calls.append("last")
        return False

    for hook in (denies, raises, raises_verdict, times_out, last):
        runner.register(stage, hook)
    args: tuple[Any, ...] = (
        (session,) if stage is Stage.QUIT else (session, R.BAD_SEQUENCE, "RCPT TO:<x@y>")
    )
    with caplog.at_level(logging.WARNING, logger="smtpgate.hooks"):
        result = await runner.run(stage, *args)
    assert result == HookResult(Verdict.CONT)
    assert calls == ["denies", "raises", "raises_verdict", "times_out", "last"]
    assert "quit-hook-failure" in caplog.text
    assert "timed out" in caplog.text


async def test_unregister(session: SessionInfo) -> None:
    runner = HookRunner()

    class Plugin:
        def __init__(self) -> None:
            self.calls = 0

        def connect(self, s: SessionInfo) -> None:
            self.calls += 1

    plugin = Plugin()
    runner.register("connect", plugin.connect)
    runner.register("connect", plugin.connect)
    await runner.run("connect", session)
    assert plugin.calls == 2
    runner.unregister("connect", plugin.connect)  # bound methods compare equal
    assert not runner.has("connect") and runner.hooks("connect") == []
    await runner.run("connect", session)
    assert plugin.calls == 2
    with pytest.raises(ValueError):
        runner.unregister("connect", plugin.connect)


def test_register_validation() -> None:
    runner = HookRunner()

    async def coro(s: SessionInfo) -> None:
        return None

    with pytest.raises(ValueError):
        runner.register("bogus", lambda s: None)
    with pytest.raises(TypeError):
        runner.register("connect", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        runner.register("connect", coro, blocking=True)
    with pytest.raises(ValueError):
        HookRunner(timeout=0)
    runner.register("connect", coro)
    (hook,) = runner.hooks("connect")
    assert hook.name.endswith("coro") and ":" in hook.name
    assert hook.stage is Stage.CONNECT and not hook.blocking


async def test_one_debug_record_per_decision_without_secrets(
    session: SessionInfo, caplog: pytest.LogCaptureFixture
) -> None:
    runner = HookRunner()
    runner.register("error", lambda s, r, c: None, name="notifier")
    runner.register("rcpt", lambda s, t, r: None, name="first")
    runner.register("rcpt", lambda s, t, r: reject("Nope"), name="second")
    session.auth_user = "alice"
    with caplog.at_level(logging.DEBUG, logger="smtpgate.hooks"):
        await runner.run("rcpt", *rcpt_args(session))
        await runner.run("error", session, R.AUTH_FAILED, "AUTH PLAIN AGFsaWNlAHMzY3JldA==")
    decisions = [r for r in caplog.records if r.getMessage().startswith("hook decision")]
    assert len(decisions) == 3
    msgs = [r.getMessage() for r in decisions]
    assert "stage=rcpt" in msgs[0] and "hook=first" in msgs[0] and "verdict=CONT" in msgs[0]
    assert "hook=second" in msgs[1] and "verdict=DENY" in msgs[1]
    assert "550 5.7.1 Nope" in msgs[1]
    assert "stage=error" in msgs[2]
    assert "AGFsaWNlAHMzY3JldA" not in caplog.text and "s3cret" not in caplog.text

"""The hook runner: ordered chains per stage, bounded calls, first non-CONT verdict wins.

Entry points: :class:`HookRunner` (``register``, ``unregister``, ``has``, ``hooks``, ``run``)
and :class:`RegisteredHook`. Verdict semantics follow Haraka (priority, then registration
order; a timeout or an error is a temporary failure, never an accept). RFC 5321 §4.2.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import metrics as _metrics
from ..envelope import MAX_DECISIONS, Decision
from ..logs import Event
from ..reply import R, Reply
from .verdict import (
    CONT_RESULT,
    NOTIFY_STAGES,
    HookResult,
    HookVerdictException,
    Stage,
    Verdict,
    default_reply,
)

__all__ = ["HOOK_TIMEOUT_REPLY", "HookRunner", "RegisteredHook", "normalise_result"]

log = logging.getLogger("smtpgate.hooks")

HOOK_TIMEOUT_REPLY = Reply(451, "4.3.0", "Hook timeout")
"""Sent (as DENYSOFT) when a hook does not finish within the runner's timeout."""

_SLOW_SYNC_SECONDS = 0.25
_PRIORITY_MIN, _PRIORITY_MAX = -100, 100


@dataclass(frozen=True, slots=True)
class RegisteredHook:
    """One entry of a stage's chain, as listed by :meth:`HookRunner.hooks`.

    Attributes:
        stage: where it runs.
        name: display name (``"module:qualname"`` unless given at registration).
        func: the callable (``def`` or ``async def``).
        priority: -100..100; lower runs first.
        blocking: a sync hook run in a worker thread (``asyncio.to_thread``).
        timeout: seconds per call; ``None`` takes the runner's timeout.
        on_error: ``"tempfail"`` (a timeout or an exception gives DENYSOFT
            ``451 4.3.0``) or ``"accept"`` (it gives CONT: the chain goes on).
        plugin: the plugin that registered it (``""``: registered in code).
    """

    stage: Stage
    name: str
    func: Callable[..., Any] = field(repr=False)
    priority: int = 0
    blocking: bool = False
    seq: int = field(default=0, repr=False, compare=False)
    timeout: float | None = None
    on_error: str = "tempfail"
    plugin: str = ""


def _warn_slow(hook: RegisteredHook, spent: float) -> None:
    log.warning("hook %s at %s blocked the event loop for %.3f s; register it with "
                "blocking=True", hook.name, hook.stage.value, spent)


def _session_id(args: tuple[Any, ...]) -> str:
    return str(getattr(args[0], "session_id", "-")) if args else "-"


class _BadReturn(TypeError):
    """A hook returned something that is not a verdict."""


class _HookTimeout(Exception):
    """A hook exceeded the runner's timeout."""


def _callable_name(func: Callable[..., Any]) -> str:
    inner: Any = func
    while isinstance(inner, functools.partial):
        inner = inner.func
    module = getattr(inner, "__module__", None) or type(inner).__module__
    qualname = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    return f"{module}:{qualname}"


def _fill_default(stage: Stage, result: HookResult) -> HookResult:
    if result.reply is None and result.verdict.is_denial:
        return HookResult(result.verdict, default_reply(stage, result.verdict))
    return result


def normalise_result(stage: Stage | str, value: object) -> HookResult:
    """Turn what a hook returned into a :class:`HookResult`.

    Mapping: ``None``/``True`` → CONT; ``False`` → DENY with the stage's default
    reply; a :class:`Verdict` → that verdict with the stage's default reply; a
    :class:`HookResult` → itself (a denial without a reply gets the stage's
    default); a :class:`~smtpgate.reply.Reply` → OK for 2xx/3xx, DENYSOFT for 4xx
    (DENYSOFT_DISCONNECT for 421, which closes the channel per RFC 5321 §3.8),
    DENY for 5xx.

    Raises:
        TypeError: any other value (the runner treats it as a hook error).
        ValueError: ``stage`` is not a stage name.
    """
    if type(stage) is not Stage:
        stage = Stage(stage)
    if value is None or value is True:
        return CONT_RESULT
    if value is False:
        return HookResult(Verdict.DENY, default_reply(stage, Verdict.DENY))
    if isinstance(value, HookResult):
        return _fill_default(stage, value)
    if isinstance(value, Verdict):
        return _fill_default(stage, HookResult(value))
    if isinstance(value, Reply):
        if value.is_positive:
            return HookResult(Verdict.OK, value)
        if value.code == 421:
            return HookResult(Verdict.DENYSOFT_DISCONNECT, value)
        if value.is_transient:
            return HookResult(Verdict.DENYSOFT, value)
        return HookResult(Verdict.DENY, value)
    raise _BadReturn(f"unsupported return value of type {type(value).__name__}")


class HookRunner:
    """Runs the hooks registered for each :class:`Stage`.

    Hooks of a stage run in ascending priority, then registration order. The first
    result other than CONT ends the chain and is returned; if every hook continues
    the result is CONT. For QUIT and ERROR every hook runs and verdicts are ignored.

    Each call is bounded by ``timeout`` seconds: ``async`` hooks (and sync hooks
    returning an awaitable) through :func:`asyncio.timeout`, ``blocking=True`` sync
    hooks through :func:`asyncio.to_thread` under the same deadline (the thread
    cannot be killed and finishes in the background). Plain sync hooks run on the
    event loop and cannot be interrupted; keep them quick. A timeout gives
    DENYSOFT ``451 4.3.0 Hook timeout``; an exception other than
    :class:`~smtpgate.hooks.verdict.HookVerdictException`, or an unsupported return
    value, gives DENYSOFT ``451 4.3.0`` (``R.HOOK_ERROR``) and an ERROR log record
    with the traceback on logger ``smtpgate.hooks``. Cancellation propagates.

    Every call is added to the session's decision record (``SessionInfo.decisions``, a
    :class:`~smtpgate.envelope.Decision` each: stage, plugin, verdict, reply, time, the
    ``results`` findings it added; docs/explain.md) and logged on ``smtpgate.hooks`` at
    ``decision_level``.

    Args:
        timeout: per-call limit in seconds, > 0.
        decision_level: the :mod:`logging` level of the decision lines
            (``[log] decisions``; DEBUG by default).

    Raises:
        ValueError: ``timeout`` is not positive.
    """

    def __init__(self, timeout: float = 30.0, decision_level: int = logging.DEBUG) -> None:
        if not timeout > 0:
            raise ValueError(f"hook timeout must be positive, got {timeout!r}")
        self.timeout = float(timeout)
        self.decision_level = decision_level
        # Keyed by Stage; Stage is a str enum, so a lookup with "rcpt" finds Stage.RCPT.
        self._chains: dict[str, tuple[RegisteredHook, ...]] = {}
        self._seq = 0

    def register(
        self,
        stage: Stage | str,
        func: Callable[..., Any],
        *,
        priority: int = 0,
        name: str | None = None,
        blocking: bool = False,
        timeout: float | None = None,
        on_error: str = "tempfail",
        plugin: str = "",
    ) -> None:
        """Add ``func`` to the chain of ``stage``.

        Args:
            stage: a :class:`Stage` or its value (``"rcpt"``).
            func: the hook, ``def`` or ``async def``, with the stage's signature
                (see the :mod:`smtpgate.hooks` docstring).
            priority: lower runs first; clamped to -100..100.
            name: display name for logs and listings (default ``module:qualname``).
            blocking: run a sync hook in a worker thread (for hooks that do I/O).
            timeout: seconds per call (> 0); ``None``: the runner's timeout.
            on_error: ``"tempfail"`` or ``"accept"`` (see :class:`RegisteredHook`).
            plugin: name of the plugin registering it (for listings and logs).

        Raises:
            ValueError: unknown stage, ``blocking=True`` for an ``async def``, a
                timeout that is not positive or an unknown ``on_error``.
            TypeError: ``func`` is not callable.
        """
        if timeout is not None and not timeout > 0:
            raise ValueError(f"hook timeout must be positive, got {timeout!r}")
        if on_error not in ("tempfail", "accept"):
            raise ValueError(f"on_error must be 'tempfail' or 'accept', got {on_error!r}")
        st = Stage(stage)
        if not callable(func):
            raise TypeError(f"hook for {st.value} is not callable: {func!r}")
        if blocking and inspect.iscoroutinefunction(func):
            raise ValueError("blocking=True applies to sync hooks only")
        prio = max(_PRIORITY_MIN, min(_PRIORITY_MAX, int(priority)))
        self._seq += 1
        hook = RegisteredHook(
            stage=st,
            name=name or _callable_name(func),
            func=func,
            priority=prio,
            blocking=blocking,
            seq=self._seq,
            timeout=None if timeout is None else float(timeout),
            on_error=on_error,
            plugin=plugin,
        )
        chain = [*self._chains.get(st, ()), hook]
        chain.sort(key=lambda h: (h.priority, h.seq))
        self._chains[st] = tuple(chain)

    def unregister(self, stage: Stage | str, func: Callable[..., Any]) -> None:
        """Remove every registration of ``func`` (compared with ``==``) from ``stage``.

        Raises:
            ValueError: unknown stage, or ``func`` is not registered there.
        """
        st = Stage(stage)
        chain = self._chains.get(st, ())
        kept = tuple(h for h in chain if h.func != func)
        if len(kept) == len(chain):
            raise ValueError(f"hook {_callable_name(func)} is not registered for {st.value}")
        if kept:
            self._chains[st] = kept
        else:
            del self._chains[st]

    def has(self, stage: Stage | str) -> bool:
        """True when at least one hook is registered for ``stage`` (O(1), never raises)."""
        return stage in self._chains

    def hooks(self, stage: Stage | str) -> list[RegisteredHook]:
        """The chain of ``stage`` in run order (a copy).

        Raises:
            ValueError: unknown stage.
        """
        return list(self._chains.get(Stage(stage), ()))

    async def run(self, stage: Stage | str, *args: Any) -> HookResult:
        """Run the chain of ``stage`` with ``args`` (the stage's hook arguments).

        Returns:
            The first non-CONT result (a denial always carries a reply: the hook's
            or the stage default), or CONT when every hook continued or none is
            registered. Always CONT for QUIT and ERROR.

        Raises:
            ValueError: unknown stage (only checked when hooks exist).
            asyncio.CancelledError: when the calling task is cancelled.
        """
        chain = self._chains.get(stage)
        if not chain:
            return CONT_RESULT
        st = stage if type(stage) is Stage else Stage(stage)
        if st in NOTIFY_STAGES:
            for hook in chain:
                await self._call(st, hook, args)
            return CONT_RESULT
        for hook in chain:
            result = await self._call(st, hook, args)
            if result.verdict is not Verdict.CONT:
                return result
        return CONT_RESULT

    async def _in_thread(self, hook: RegisteredHook, args: tuple[Any, ...]) -> object:
        """What a ``blocking=True`` hook returned, run in a worker thread within its
        deadline (``timeout`` seconds).

        Raises:
            _HookTimeout: the deadline passed (the thread finishes in the background).
        """
        timeout_cm = asyncio.timeout(self.timeout if hook.timeout is None else hook.timeout)
        try:
            async with timeout_cm:
                value: object = await asyncio.to_thread(hook.func, *args)
                if inspect.isawaitable(value):
                    value = await value
        except TimeoutError:
            if timeout_cm.expired():
                raise _HookTimeout from None
            raise
        return value

    async def _settle(self, hook: RegisteredHook, value: object, started: float) -> object:
        """What a plain hook's call gave (``value``, returned at ``started``, a
        :func:`time.monotonic` reading taken just before the call), awaited if it is
        awaitable (``async def`` hooks) within the deadline counted from the call.

        A plain call cannot be interrupted, so no timeout context is set up for it (one
        timer handle per call saved); one that took longer than a quarter second is
        logged (it should be ``blocking=True``).

        Raises:
            _HookTimeout: the deadline passed.
        """
        spent = time.monotonic() - started
        if spent > _SLOW_SYNC_SECONDS:
            _warn_slow(hook, spent)
        if not inspect.isawaitable(value):
            return value
        limit = self.timeout if hook.timeout is None else hook.timeout
        timeout_cm = asyncio.timeout_at(asyncio.get_running_loop().time() + limit - spent)
        try:
            async with timeout_cm:
                return await value
        except TimeoutError:
            if timeout_cm.expired():
                raise _HookTimeout from None
            raise

    async def _call(self, stage: Stage, hook: RegisteredHook, args: tuple[Any, ...]) -> HookResult:
        """One hook call: its result (errors and timeouts mapped to verdicts), timed,
        counted in the metrics and added to the decision record."""
        session = args[0] if args else None
        # the decision record: the session's; findings from the transaction if any
        record: list[Decision] | None = getattr(session, "decisions", None)
        tx = args[1] if len(args) > 1 and hasattr(args[1], "envelope") else None
        results = getattr(tx if tx is not None else session, "results", None)
        found_before = len(results) if results is not None else 0
        started = time.monotonic()
        try:
            if hook.blocking:
                value = await self._in_thread(hook, args)
            else:
                value = hook.func(*args)
                if value is not None and value is not True:
                    value = await self._settle(hook, value, started)
                elif time.monotonic() - started > _SLOW_SYNC_SECONDS:
                    _warn_slow(hook, time.monotonic() - started)
            result = CONT_RESULT if value is None or value is True else normalise_result(
                stage, value)
        except HookVerdictException as exc:
            result = _fill_default(stage, exc.result)
        except Exception as exc:  # noqa: BLE001 - any hook failure is a verdict
            result = self._failed(stage, hook, args, exc)
        if result.verdict is Verdict.QUARANTINE and stage not in (Stage.HEADERS, Stage.DATA):
            log.error("hook %s at %s answered QUARANTINE, which only the headers and data "
                      "stages allow (session %s)", hook.name, stage.value, _session_id(args))
            result = HookResult(Verdict.DENYSOFT, R.HOOK_ERROR)
        spent = time.monotonic() - started
        label = hook.plugin or hook.name
        # ``_name_``/``_value_``: the enum's own attributes (the properties cost more)
        verdict: str = result.verdict._name_
        stage_name: str = stage._value_
        # smtpgate_plugin_duration_seconds / smtpgate_plugin_verdicts_total
        _metrics.M.plugin(label, stage_name, verdict, spent)
        findings: tuple[str, ...] = ()
        if results is not None and len(results) > found_before:
            findings = tuple(f.text() for f in list(results)[found_before:])
        reply = str(result.reply) if result.reply is not None else ""
        if record is not None:
            if len(record) >= MAX_DECISIONS:
                del record[: MAX_DECISIONS // 2]
            record.append(Decision(stage_name, label, hook.name, verdict,
                                   reply, spent, findings, getattr(tx, "id", "")))
        if log.isEnabledFor(self.decision_level):  # the decision record, logged
            log.log(self.decision_level, Event(
                "hook decision", stage=stage_name, plugin=label,
                hook=hook.name, verdict=verdict, reply=reply,
                ms=round(spent * 1000, 3), findings="; ".join(findings),
                session=_session_id(args), tx=getattr(tx, "id", "")))
        return result

    def _failed(self, stage: Stage, hook: RegisteredHook, args: tuple[Any, ...],
                exc: BaseException) -> HookResult:
        """The result of a hook that timed out, returned no verdict or raised (logged)."""
        session_id = _session_id(args)
        if isinstance(exc, _HookTimeout):
            log.warning(
                "hook %s at %s timed out after %.1f s (session %s)",
                hook.name,
                stage.value,
                self.timeout if hook.timeout is None else hook.timeout,
                session_id,
            )
            if hook.on_error == "accept":
                return CONT_RESULT
            return HookResult(Verdict.DENYSOFT, HOOK_TIMEOUT_REPLY)
        if isinstance(exc, _BadReturn):
            log.error("hook %s at %s: %s (session %s)", hook.name, stage.value, exc, session_id)
        else:
            log.error(
                "hook %s at %s raised an exception (session %s)%s",
                hook.name,
                stage.value,
                session_id,
                "; on_error = accept: going on" if hook.on_error == "accept" else "",
                exc_info=exc,
            )
        return CONT_RESULT if hook.on_error == "accept" else HookResult(
            Verdict.DENYSOFT, R.HOOK_ERROR)

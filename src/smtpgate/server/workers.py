"""SMTP worker processes (``[server] workers = N``, N > 1).

Entry points: :class:`WorkerPool` (the supervisor's handle on its workers: ``start``,
``reload``, ``stop``, ``pids``), :func:`probe_listeners` (is every address free?) and
:class:`NotifyingDrop` (a worker's queue handle).

The process model, after Postfix's master/smtpd/qmgr and Haraka's ``nodes``:

* ``smtpgate serve`` is the supervisor. In queue mode it owns the spool (``owner.lock``)
  and runs the queue delivery as with one process; it accepts no connection itself.
* It starts N worker processes (multiprocessing, spawn). Each builds its own
  :class:`~smtpgate.app.Smtpgate` and binds every listen address with ``SO_REUSEPORT``:
  the kernel spreads new connections among them. In queue mode a worker commits into the
  supervisor's spool without owning it (like ``smtpgate inetd``) and passes each
  committed message ID to the supervisor through a pipe, which hands it to the delivery.
  Limits held in memory (``max_connections``, ``max_connections_per_ip``, AUTH failure
  counts) are per worker.
* A worker that dies is noticed at once (its sentinel is watched on the event loop),
  logged at ERROR, and replaced after a backoff (1 s doubling to 60 s; reset after 60 s of
  life). Its sessions end with the process: their clients see the connection close,
  and no message they had not received a 250 for was accepted. A worker that exits by
  itself with status 0 (``kill -TERM`` of one worker: it finishes its transactions
  within ``shutdown_timeout``, then exits) is replaced at once: a graceful restart of
  that worker.
* SIGTERM/SIGINT to the supervisor stops every worker gracefully (transactions in
  flight may finish within ``shutdown_timeout``), then the delivery. SIGHUP makes every
  worker re-read and apply the configuration file (as one process does). A worker whose
  supervisor disappears stops gracefully too (its control pipe reaches end of file).
* The admin listener (``[admin] listen``) runs in the supervisor: through the same pipes
  it asks every worker for its sessions, kills one where it runs, and passes run-time
  relay changes on (:meth:`WorkerPool.sessions`, :meth:`WorkerPool.kill`,
  :meth:`WorkerPool.relay_change`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import logging
import multiprocessing
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..config import Config
from ..queue.manager import request_flush
from ..queue.runner import SpoolDrop
from ..queue.store import QueueEntry, QueueStore

log = logging.getLogger("smtpgate.workers")

_RESTART_MIN = 1.0  # seconds before the first restart of a dead worker
_RESTART_MAX = 60.0  # the backoff doubles up to this
_RESTART_RESET = 60.0  # a worker that ran this long restarts after _RESTART_MIN again


class WorkerStartError(RuntimeError):
    """A worker could not start.

    Attributes:
        kind: ``"listen"`` (an address could not be bound) or ``"start"`` (anything else).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class NotifyingDrop(SpoolDrop):
    """A worker's queue handle: commits into the supervisor's spool (it never delivers)
    and passes every committed message ID to ``notify`` (the pipe to the supervisor);
    if that fails, the owner is asked to rescan through its flush file instead.

    Args:
        store: the spool committed into.
        notify: called with the message ID; may raise :class:`OSError`.
    """

    def __init__(self, store: QueueStore, notify: Callable[[str], None]) -> None:
        super().__init__(store)
        self._notify = notify

    def submit(self, entry: QueueEntry, message: bytes | None = None) -> None:
        """Tell the supervisor about a committed message (deliver it now)."""
        try:
            self._notify(entry.id)
        except (OSError, ValueError):
            super().submit(entry, message)


def listen_targets(cfg: Config) -> list[tuple[str, int]]:
    """``(host, port)`` of every ``[server] listen`` entry and ``[[listener]]``."""
    return [(a.host, a.port) for a in cfg.server.listen] + [
        (lc.listen.host, lc.listen.port) for lc in cfg.listeners
    ]


async def probe_listeners(cfg: Config) -> None:
    """Bind every listen address without ``SO_REUSEPORT`` and close it again, so that an
    address another process listens on (another smtpgate too, with or without workers)
    is refused before any worker starts, as one process would be.

    Raises:
        OSError: an address cannot be bound (asyncio's text names it and the cause).
    """
    loop = asyncio.get_running_loop()
    for host, port in listen_targets(cfg):
        server = await loop.create_server(
            asyncio.Protocol, host=host, port=port, reuse_address=True,
            start_serving=False,
            family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC,
        )
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------ worker side


def _worker_main(cfg: Config, args: argparse.Namespace, index: int, control: Connection,
                 events: Connection) -> None:
    """Entry point of a worker process (multiprocessing, spawn start method)."""
    from ..logs import setup_logging

    setup_logging(cfg.log, process=f"worker {index}", roller=False)  # serve's process rolls
    try:
        import uvloop

        if cfg.server.use_uvloop:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    sys.exit(asyncio.run(_worker(cfg, args, control, events, index)))


async def _worker(cfg: Config, args: argparse.Namespace, control: Connection,
                  events: Connection, index: int) -> int:
    from ..app import Smtpgate
    from ..cli import _reload
    from ..logs import setup_logging

    loop = asyncio.get_running_loop()
    app = Smtpgate(cfg)
    app.log_setup = functools.partial(setup_logging, process=f"worker {index}",
                                      roller=False, start=False)

    def notify(qid: str) -> None:
        events.send(("submit", qid))

    try:
        await app.start(role="worker", notify=notify)
    except OSError as exc:
        events.send(("error", "listen", str(exc)))
        return 1
    except Exception as exc:  # QueueError, RuntimeError, ConfigError
        events.send(("error", "start", str(exc)))
        return 1
    events.send(("ready",))
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(_reload(app, args))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def admin_request(msg: tuple[Any, ...]) -> None:
        """The supervisor's admin API asks about this worker's sessions or relay lists."""
        from ..admin.api import sessions_snapshot

        if msg[0] == "sessions":
            events.send(("sessions", msg[1], sessions_snapshot(app)))
        elif msg[0] == "kill":
            killed = False
            if app.server is not None:
                for session in list(app.server.sessions):
                    if session.info is not None and session.info.session_id == msg[2]:
                        killed = session.kill()
                        break
            events.send(("killed", msg[1], killed))
        elif msg[0] == "relay" and app.relay is not None:
            op, value = msg[1], msg[2]
            try:
                getattr(app.relay, op)(value)
            except ValueError as exc:  # checked by the supervisor first; never expected
                log.error("admin relay change %s %s refused: %s", op, value, exc)

    def readable() -> None:
        try:
            while control.poll():
                msg = control.recv()
                if msg[0] == "stop":
                    stop.set()
                elif msg[0] == "reload":
                    reload()
                else:
                    admin_request(msg)
        except (EOFError, OSError):  # the supervisor is gone: stop gracefully
            loop.remove_reader(control.fileno())
            stop.set()

    # SIGTERM to one worker: a graceful restart of it. SIGINT (a terminal's ^C reaches
    # the whole process group) is left to the supervisor, which stops everyone.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_reader(control.fileno(), readable)
    try:
        await stop.wait()
    finally:
        for task in list(tasks):
            task.cancel()
        await app.stop()
    return 0


# -------------------------------------------------------------- supervisor side


class _Slot:
    """One worker position: its current process and pipes."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.control: Connection | None = None
        self.events: Connection | None = None
        self.started_at = 0.0
        self.backoff = _RESTART_MIN
        self.restart: asyncio.Task[None] | None = None


class WorkerPool:
    """The supervisor's handle on its SMTP worker processes.

    Args:
        cfg: the configuration (pickled to every worker); ``cfg.server.workers`` of them.
        args: the ``serve`` command line (a worker re-reads ``args.config`` on SIGHUP).
        nudge: called with each message ID a worker committed (the owner's delivery).
        start_timeout: seconds a worker may take to report that it listens.
    """

    def __init__(self, cfg: Config, args: argparse.Namespace,
                 nudge: Callable[[str], None] | None = None,
                 start_timeout: float = 60.0) -> None:
        self.cfg = cfg
        self.args = args
        self.nudge = nudge
        self.start_timeout = start_timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i + 1) for i in range(cfg.server.workers)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.restarts = 0
        self._requests = itertools.count(1)
        # admin requests in flight: id -> (future, answers still expected, answers so far)
        self._pending: dict[int, tuple[asyncio.Future[list[Any]], set[int], list[Any]]] = {}
        # run-time relay changes since the last reload, replayed to a replaced worker
        self._relay_changes: list[tuple[str, str]] = []

    @property
    def pids(self) -> list[int]:
        """The pids of the running workers."""
        return [int(s.process.pid) for s in self._slots
                if s.process is not None and s.process.is_alive()]

    async def start(self) -> None:
        """Start every worker and wait until each listens.

        Raises:
            WorkerStartError: a worker could not start; the others are stopped again.
        """
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(self._start_one(slot) for slot in self._slots))
        except BaseException:
            await self.stop(timeout=1.0)
            raise

    async def _start_one(self, slot: _Slot) -> None:
        loop = self._loop
        assert loop is not None
        ctl_r, ctl_w = self._ctx.Pipe(duplex=False)
        ev_r, ev_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_worker_main, args=(self.cfg, self.args, slot.index, ctl_r, ev_w),
            name=f"smtpgate-worker-{slot.index}", daemon=True,
        )
        proc.start()
        ctl_r.close()
        ev_w.close()
        slot.process, slot.control, slot.events = proc, ctl_w, ev_r
        try:
            ready = await asyncio.to_thread(ev_r.poll, self.start_timeout)
            msg = ev_r.recv() if ready else ("error", "start", "no answer in "
                                            f"{self.start_timeout:g}s")
        except (EOFError, OSError):
            msg = ("error", "start", f"it exited with code {proc.exitcode}")
        if msg[0] != "ready":
            await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5.0)
            self._close(slot)
            slot.process = None
            raise WorkerStartError(str(msg[1]), str(msg[2]))
        slot.started_at = time.monotonic()
        loop.add_reader(ev_r.fileno(), self._on_event, slot, ev_r)
        loop.add_reader(proc.sentinel, self._on_exit, slot, proc)
        for op, value in self._relay_changes:  # a replaced worker: the API's changes too
            self._tell(slot, ("relay", op, value))
        log.info("worker %d started (pid %d)", slot.index, proc.pid)

    def _on_event(self, slot: _Slot, events: Connection) -> None:
        """A worker wrote: a committed message ID."""
        try:
            while events.poll():
                msg = events.recv()
                if msg[0] == "submit" and self.nudge is not None:
                    self.nudge(str(msg[1]))
                elif msg[0] in ("sessions", "killed"):
                    self._answer(slot, int(msg[1]), msg[2])
        except (EOFError, OSError):  # the worker is gone; _on_exit handles it
            assert self._loop is not None
            self._loop.remove_reader(events.fileno())

    def _close(self, slot: _Slot) -> None:
        loop = self._loop
        for conn in (slot.control, slot.events):
            if conn is None:
                continue
            if loop is not None and conn is slot.events:
                try:
                    loop.remove_reader(conn.fileno())
                except (OSError, ValueError):
                    pass
            conn.close()
        slot.control = slot.events = None

    def _on_exit(self, slot: _Slot, proc: Any) -> None:
        """A worker ended (its sentinel became readable): replace it."""
        loop = self._loop
        assert loop is not None
        loop.remove_reader(proc.sentinel)
        proc.join(0.5)  # reap it; the sentinel closes a moment before it can be waited for
        if self._stopping or proc is not slot.process:
            return
        self._drain(slot)
        self._close(slot)
        slot.process = None
        if self.cfg.delivery_mode == "queue":
            # a commit whose ID did not reach us is found by the owner's rescan
            try:
                request_flush(self.cfg.queue.path)
            except OSError:
                pass
        if proc.exitcode == 0:
            delay = 0.0
            log.warning("worker %d (pid %s) exited; starting a new one", slot.index, proc.pid)
        else:
            if time.monotonic() - slot.started_at > _RESTART_RESET:
                slot.backoff = _RESTART_MIN
            delay = slot.backoff
            slot.backoff = min(slot.backoff * 2, _RESTART_MAX)
            log.error("worker %d (pid %s) died with exit code %s; its sessions were cut off; "
                      "restarting in %gs", slot.index, proc.pid, proc.exitcode, delay)
        if slot.restart is None or slot.restart.done():
            slot.restart = loop.create_task(self._restart_after(slot, delay))

    def _drain(self, slot: _Slot) -> None:
        """Pass on the message IDs a dead worker wrote before it ended."""
        if slot.events is not None:
            self._on_event(slot, slot.events)

    async def _restart_after(self, slot: _Slot, delay: float) -> None:
        await asyncio.sleep(delay)
        while not self._stopping:
            try:
                await self._start_one(slot)
                self.restarts += 1
                return
            except Exception as exc:  # WorkerStartError, OSError: try again later
                delay = slot.backoff
                slot.backoff = min(slot.backoff * 2, _RESTART_MAX)
                log.error("worker %d restart failed: %s; next try in %gs", slot.index, exc,
                          delay)
                await asyncio.sleep(delay)

    def _answer(self, slot: _Slot, request: int, value: Any) -> None:
        pending = self._pending.get(request)
        if pending is None:
            return  # too late: the request timed out
        future, waiting, answers = pending
        waiting.discard(slot.index)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    item["worker"] = slot.index
            answers.extend(value)
        else:
            answers.append(value)
        if not waiting and not future.done():
            future.set_result(answers)

    async def _ask(self, msg: tuple[Any, ...], timeout: float) -> list[Any]:
        """Send ``(kind, request id, *msg[1:])`` to every running worker; the answers
        that arrive within ``timeout`` seconds (a worker that does not answer in time,
        e.g. one being restarted, is left out)."""
        loop = self._loop
        assert loop is not None
        request = next(self._requests)
        future: asyncio.Future[list[Any]] = loop.create_future()
        slots = [s for s in self._slots if s.control is not None]
        answers: list[Any] = []
        self._pending[request] = (future, {s.index for s in slots}, answers)
        try:
            for slot in slots:
                self._tell(slot, (msg[0], request, *msg[1:]))
            if not slots:
                return []
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                log.warning("admin request %s: %d worker(s) did not answer within %gs",
                            msg[0], len(self._pending[request][1]), timeout)
                return list(answers)
        finally:
            self._pending.pop(request, None)

    async def sessions(self, timeout: float = 3.0) -> list[dict[str, Any]]:
        """The live sessions of every worker (as ``GET /api/sessions`` shows them, each
        with ``"worker"``: the worker's number), oldest first."""
        found = [s for s in await self._ask(("sessions",), timeout) if isinstance(s, dict)]
        return sorted(found, key=lambda s: -float(s.get("age") or 0))

    async def kill(self, session_id: str, timeout: float = 3.0) -> bool:
        """Kill the session ``session_id`` in whichever worker holds it (``421 4.3.2``).

        Returns:
            True when a worker had it.
        """
        return any(a is True for a in await self._ask(("kill", session_id), timeout))

    def relay_change(self, op: str, value: str) -> None:
        """Apply a run-time relay change (``relay_add``, ``relay_delete``, ``local_add``,
        ``local_delete`` of :class:`~smtpgate.policy.RelayPolicy`) in every worker, as the
        admin API made it in the supervisor. The changes are kept until the next reload:
        a worker started in between (one that died and was replaced) gets them too.

        Raises:
            ValueError: an unknown ``op``.
        """
        if op not in ("relay_add", "relay_delete", "local_add", "local_delete"):
            raise ValueError(f"unknown relay change {op!r}")
        self._relay_changes.append((op, value))
        for slot in self._slots:
            self._tell(slot, ("relay", op, value))

    def reload(self, cfg: Config | None = None) -> None:
        """SIGHUP: every worker re-reads and applies the configuration file.

        Args:
            cfg: the configuration the supervisor now runs (after its own reload): a
                worker started from now on (a replaced one) starts with it, not with the
                configuration of the start. Run-time relay changes are forgotten, as the
                file's lists replace them.
        """
        if cfg is not None:
            self.cfg = cfg
        self._relay_changes.clear()
        for slot in self._slots:
            self._tell(slot, ("reload",))

    def _tell(self, slot: _Slot, msg: tuple[Any, ...]) -> None:
        if slot.control is None:
            return
        try:
            slot.control.send(msg)
        except OSError:
            pass  # it is dying; _on_exit handles that

    async def stop(self, timeout: float | None = None) -> None:
        """Stop every worker gracefully: each stops accepting and lets transactions in
        flight finish within ``timeout`` seconds (default ``server.shutdown_timeout``);
        a worker still alive 5 s after that is killed."""
        if timeout is None:
            timeout = self.cfg.server.shutdown_timeout
        self._stopping = True
        restarts = [s.restart for s in self._slots if s.restart is not None]
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        loop = self._loop
        procs = []
        for slot in self._slots:
            proc = slot.process
            if proc is None:
                continue
            if loop is not None:
                loop.remove_reader(proc.sentinel)
            self._tell(slot, ("stop",))
            procs.append((slot, proc))
        deadline = time.monotonic() + timeout + 5.0
        for slot, proc in procs:
            await asyncio.to_thread(proc.join, max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker %d (pid %s) did not stop; killing it", slot.index, proc.pid)
                proc.kill()
                await asyncio.to_thread(proc.join, 5.0)
            self._drain(slot)
            self._close(slot)
            slot.process = None

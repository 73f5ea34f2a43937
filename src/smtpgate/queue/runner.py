"""Queue delivery in a separate process (``[queue] delivery_process = true``).

Entry points: :func:`build_manager` (the queue manager for a configuration, used in and
out of process), :class:`RemoteQueue` (the owner's stand-in for, and supervisor of, its
delivery process) and :class:`SpoolDrop` (the handle of a process that commits into a
spool it does not own). Like Postfix's smtpd/qmgr split, the process that speaks
SMTP to clients only commits messages to the spool; a child process recovers the spool,
schedules and delivers. They share nothing but the spool and a pipe that carries "new message ID",
"ETRN node" and "stop". On a machine with more than one core the two run in parallel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..config import Config, LogConfig
from ..envelope import Recipient, SessionInfo
from ..hooks import HookRunner, Stage, Transaction
from ..reply import Reply
from .manager import Outbound, OutcomeHook, QueueManager, request_flush
from .schedule import RetrySchedule
from .store import DELIVERY_LOCK, QueuedRecipient, QueueEntry, QueueStore, SpoolOwnership

log = logging.getLogger("smtpgate.queue")

_RESTART_MIN = 1.0  # seconds before the first restart of a dead delivery process
_RESTART_MAX = 60.0  # the backoff doubles up to this
_RESTART_RESET = 60.0  # a process that ran this long restarts after _RESTART_MIN again
_DELIVERY_LOCK_WAIT = 60.0  # seconds a new delivery process waits for its predecessor


def build_manager(cfg: Config, hooks: HookRunner | None = None) -> QueueManager:
    """The :class:`QueueManager` for a configuration: spool, outbound (relay or MX), DSNs,
    and the plugins' ``delivered`` stage told every delivery outcome.

    Args:
        cfg: the configuration.
        hooks: the plugin chain (the server's, when delivery runs in process); ``None``
            builds it from ``cfg`` (the delivery process).

    Raises:
        ConfigError: the plugin chain cannot be built.
    """
    from ..delivery.mx import MxDelivery
    from ..delivery.upstream import UpstreamDelivery
    from .outbound import MxOutbound, RelayOutbound, dsn_factory

    q = cfg.queue
    store = QueueStore(q.path, fsync=q.fsync)
    outbound: Outbound
    if cfg.relay.url == "mx:":
        from ..dns import shared_resolver

        outbound = MxOutbound(MxDelivery(
            helo_name=cfg.server.hostname, port=cfg.delivery.mx_port,
            timeout=cfg.relay.timeout, local_hosts=(cfg.server.hostname,),
            resolver=shared_resolver(cfg.dns),
        ))
    else:
        outbound = RelayOutbound(UpstreamDelivery(
            cfg.relay.url, timeout=cfg.relay.timeout, helo_name=cfg.server.hostname,
            cafile=cfg.relay.cafile or None,
        ))
    if hooks is None:
        from ..plugins import load_plugins

        hooks = HookRunner(timeout=cfg.hooks.timeout,
                           decision_level=logging.getLevelName(cfg.log.decisions))
        load_plugins(cfg, hooks)
    schedule = RetrySchedule(q.min_backoff, q.max_backoff, q.max_lifetime)
    return QueueManager(
        store, outbound, schedule=schedule, workers=q.workers,
        per_destination=q.per_destination, scan_interval=q.scan_interval,
        delay_warning=q.delay_warning, make_dsn=dsn_factory(cfg.server.hostname, schedule),
        on_outcome=_delivered_stage(hooks) if hooks.has(Stage.DELIVERED) else None,
    )


def _delivered_stage(hooks: HookRunner) -> OutcomeHook:
    """Run the ``delivered`` chain for one recipient's outcome, with the session and
    transaction rebuilt from the queue entry (client facts, envelope, message)."""

    async def run(entry: QueueEntry, rcpt: QueuedRecipient, reply: Reply,
                  message: bytes) -> None:
        client = entry.client
        session = SessionInfo(
            session_id=client.get("session", ""), peer_ip=client.get("ip", ""), peer_port=0,
            helo_name=client.get("helo") or None, auth_user=client.get("auth") or None,
            tls_version=client.get("tls") or None,
        )
        tx = Transaction(entry.to_envelope(pending_only=False), entry.id)
        tx.message = message
        await hooks.run(Stage.DELIVERED, session, tx, Recipient(rcpt.address,
                                                                 dict(rcpt.params)), reply)

    return run


def _child_main(cfg: Config, commands: Connection, events: Connection, clean: bool) -> None:
    """Entry point of the delivery process (multiprocessing, spawn start method)."""
    from ..logs import setup_logging

    setup_logging(cfg.log, process="delivery", roller=False)  # serve's process rolls
    try:
        import uvloop

        if cfg.server.use_uvloop:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(_child(cfg, commands, events, clean))


async def _child(cfg: Config, commands: Connection, events: Connection, clean: bool) -> None:
    # One delivery process at a time: a predecessor that is still finishing its
    # deliveries (its owner was killed) holds the lock until it exits.
    lock = await asyncio.to_thread(
        SpoolOwnership.wait, Path(cfg.queue.path) / DELIVERY_LOCK, _DELIVERY_LOCK_WAIT
    )
    from ..logs import setup_logging

    try:
        manager = build_manager(cfg)
        await manager.start(clean=clean)
        events.send("ready")
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        tasks: set[asyncio.Task[int]] = set()

        def readable() -> None:
            try:
                while commands.poll():
                    msg = commands.recv()
                    if msg[0] == "submit":
                        manager.submit_id(msg[1])
                    elif msg[0] == "etrn":
                        task = loop.create_task(manager.flush_matching(msg[1]))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    elif msg[0] == "log":  # a reload changed [log]
                        try:
                            setup_logging(msg[1], process="delivery", roller=False,
                                          start=False)
                        except OSError as exc:
                            log.error("delivery process: keeping the log set-up: %s", exc)
                    elif msg[0] == "stop":
                        done.set()
            except (EOFError, OSError):  # the receiving process is gone: finish and exit
                loop.remove_reader(commands.fileno())
                done.set()

        loop.add_reader(commands.fileno(), readable)
        await done.wait()
        await manager.stop()
    finally:
        lock.release()


class RemoteQueue:
    """The owner's handle on its delivery process (same interface the session side
    uses of :class:`QueueManager`: ``submit``, ``flush_matching``, ``stop``), and its
    supervisor: the process's death is noticed at once (its sentinel is watched on the
    event loop), logged, and the process restarted with exponential backoff
    (``_RESTART_MIN`` to ``_RESTART_MAX`` seconds), whatever the traffic. Nothing is
    lost meanwhile: the restarted process recovers every committed message from the
    spool.

    Args:
        cfg: the configuration (pickled to the child).
        start_timeout: seconds to wait for the child's recovery and start.
    """

    def __init__(self, cfg: Config, start_timeout: float = 120.0) -> None:
        self.cfg = cfg
        self.start_timeout = start_timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._commands: Connection | None = None
        self._restart: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._backoff = _RESTART_MIN
        self._started_at = 0.0
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The delivery process's pid (``None`` while none runs)."""
        proc = self._process
        return int(proc.pid) if proc is not None and proc.is_alive() else None

    async def start(self, clean: bool = True) -> None:
        """Start the delivery process and wait until it has recovered the spool.

        Raises:
            RuntimeError: it died or did not report ready in time.
        """
        self._loop = asyncio.get_running_loop()
        cmd_r, cmd_w = self._ctx.Pipe(duplex=False)
        ev_r, ev_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_child_main, args=(self.cfg, cmd_r, ev_w, clean),
            name="smtpgate-delivery", daemon=True,
        )
        proc.start()
        self._process = proc
        cmd_r.close()
        ev_w.close()
        self._commands = cmd_w
        self._loop.add_reader(proc.sentinel, self._on_exit, proc)
        try:
            ready = await asyncio.to_thread(ev_r.poll, self.start_timeout)
            ok = ready and ev_r.recv() == "ready"
        except (EOFError, OSError):
            ok = False
        finally:
            ev_r.close()
        if not ok:
            raise RuntimeError("the queue delivery process did not start "
                               f"(exit code {proc.exitcode})")
        self._started_at = time.monotonic()
        log.info("queue delivery process started (pid %d)", proc.pid)

    def _on_exit(self, proc: Any) -> None:
        """The delivery process ended (its sentinel became readable)."""
        loop = self._loop
        assert loop is not None
        loop.remove_reader(proc.sentinel)
        # Reap it (no <defunct> left behind). The sentinel closes while the process
        # exits, a moment before it can be waited for: allow that moment.
        proc.join(0.5)
        if self._stopping or proc is not self._process:
            return
        if self._commands is not None:
            self._commands.close()
            self._commands = None
        if time.monotonic() - self._started_at > _RESTART_RESET:
            self._backoff = _RESTART_MIN
        delay = self._backoff
        self._backoff = min(self._backoff * 2, _RESTART_MAX)
        log.error("queue delivery process (pid %s) died with exit code %s; restarting in %gs",
                  proc.pid, proc.exitcode, delay)
        if self._restart is None or self._restart.done():
            self._restart = loop.create_task(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        while not self._stopping:
            try:
                # The spool is the truth: the new process finds everything committed.
                # Its recovery takes the commit lock, so commits in flight are safe.
                await self.start(clean=True)
                self.restarts += 1
                return
            except Exception as exc:  # RuntimeError, OSError: try again later
                delay = self._backoff
                self._backoff = min(self._backoff * 2, _RESTART_MAX)
                log.error("queue delivery process restart failed: %s; next try in %gs",
                          exc, delay)
                await asyncio.sleep(delay)

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._commands is None:
            return  # restarting: the new process will find the message in the spool
        try:
            self._commands.send(msg)
        except OSError:
            log.warning("cannot reach the queue delivery process; it will find the "
                        "message in the spool")

    def submit(self, entry: QueueEntry, message: bytes | None = None) -> None:
        """Tell the delivery process about a committed message (deliver it now). Only
        its id goes through the pipe (Postfix's cleanup tells qmgr no more): each
        command is one pickle well under PIPE_BUF, so a write is never split and the
        non-blocking reader always gets whole commands."""
        self._send(("submit", entry.id))

    def submit_id(self, qid: str) -> None:
        """Tell the delivery process about a message another process committed (a worker)."""
        self._send(("submit", qid))

    def set_log(self, log_cfg: LogConfig) -> None:
        """A reload changed ``[log]``: the delivery process sets its logging up again (a
        restarted one starts with it)."""
        self.cfg = dataclasses.replace(self.cfg, log=log_cfg)
        self._send(("log", log_cfg))

    async def flush_matching(self, node: str) -> int:
        """ETRN: ask the delivery process to flush mail for ``node`` (count unknown: 0)."""
        self._send(("etrn", node))
        return 0

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the delivery process to finish deliveries in flight and exit."""
        self._stopping = True
        if self._restart is not None and not self._restart.done():
            self._restart.cancel()
            await asyncio.gather(self._restart, return_exceptions=True)
        proc = self._process
        if proc is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(proc.sentinel)
        try:
            if self._commands is not None:
                self._commands.send(("stop",))
        except OSError:
            pass
        await asyncio.to_thread(proc.join, timeout + 5.0)
        if proc.is_alive():
            proc.terminate()
            await asyncio.to_thread(proc.join, 5.0)
        if self._commands is not None:
            self._commands.close()
            self._commands = None
        self._process = None


class SpoolDrop:
    """The queue handle of a process that commits into a spool it does not own
    (``smtpgate inetd``, ``bsmtp``, ``policy-test``), like Postfix's ``postdrop``.

    It never recovers, schedules, delivers or deletes: after each commit it asks the
    spool's owner (a running ``smtpgate serve``) to rescan (``<spool>/flush``). When no
    owner runs, messages wait in the spool, committed, until one starts; a warning
    says so once.

    Args:
        store: the spool committed into.
    """

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self._warned = False

    def submit(self, entry: QueueEntry, message: bytes | None = None) -> None:
        """Tell the owner about a committed message."""
        try:
            request_flush(self.store.path)
        except OSError as exc:
            log.warning("queue: cannot signal the spool owner: %s", exc)
        if not self._warned and self.store.owner_pid() is None:
            self._warned = True
            log.warning("queue: no smtpgate server owns %s; message %s stays queued until "
                        "one starts", self.store.path, entry.id)

    async def flush_matching(self, node: str) -> int:
        """ETRN: ask the owner to rescan (it flushes what is due); the count is unknown."""
        request_flush(self.store.path)
        return 0

    async def stop(self, timeout: float = 10.0) -> None:
        """Nothing runs here: nothing to stop."""

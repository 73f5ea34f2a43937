"""Queue delivery in a separate process (``[queue] delivery_process = true``).

Entry points: :func:`build_manager` (the queue manager for a configuration, used in and
out of process) and :class:`RemoteQueue` (the receiving process's stand-in for the
manager). Like Postfix's smtpd/qmgr split, the process that speaks SMTP to clients only
commits messages to the spool; a child process recovers the spool, schedules and
delivers. They share nothing but the spool and a pipe that carries "new message ID",
"ETRN node" and "stop". On a machine with more than one core the two run in parallel.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import sys
from multiprocessing.connection import Connection
from typing import Any

from ..config import Config
from .manager import Outbound, QueueManager
from .schedule import RetrySchedule
from .store import QueueEntry, QueueStore

log = logging.getLogger("smtpgate.queue")


def build_manager(cfg: Config) -> QueueManager:
    """The :class:`QueueManager` for a configuration: spool, outbound (relay or MX), DSNs."""
    from ..delivery.mx import MxDelivery
    from ..delivery.upstream import UpstreamDelivery
    from .outbound import MxOutbound, RelayOutbound, dsn_factory

    q = cfg.queue
    store = QueueStore(q.path, fsync=q.fsync)
    outbound: Outbound
    if cfg.relay.url == "mx:":
        outbound = MxOutbound(MxDelivery(
            helo_name=cfg.server.hostname, port=cfg.delivery.mx_port,
            timeout=cfg.relay.timeout, local_hosts=(cfg.server.hostname,),
        ))
    else:
        outbound = RelayOutbound(UpstreamDelivery(
            cfg.relay.url, timeout=cfg.relay.timeout, helo_name=cfg.server.hostname,
            cafile=cfg.relay.cafile or None,
        ))
    schedule = RetrySchedule(q.min_backoff, q.max_backoff, q.max_lifetime)
    return QueueManager(
        store, outbound, schedule=schedule, workers=q.workers,
        per_destination=q.per_destination, scan_interval=q.scan_interval,
        delay_warning=q.delay_warning, make_dsn=dsn_factory(cfg.server.hostname, schedule),
    )


def _child_main(cfg: Config, commands: Connection, events: Connection, clean: bool) -> None:
    """Entry point of the delivery process (multiprocessing, spawn start method)."""
    logging.basicConfig(
        level=getattr(logging, cfg.logging.level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[delivery]: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop

        if cfg.server.use_uvloop:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(_child(cfg, commands, events, clean))


async def _child(cfg: Config, commands: Connection, events: Connection, clean: bool) -> None:
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
                elif msg[0] == "stop":
                    done.set()
        except (EOFError, OSError):  # the receiving process is gone: finish and exit
            loop.remove_reader(commands.fileno())
            done.set()

    loop.add_reader(commands.fileno(), readable)
    await done.wait()
    await manager.stop()


class RemoteQueue:
    """The receiving process's handle on the delivery process (same interface the
    session side uses of :class:`QueueManager`: ``submit``, ``flush_matching``, ``stop``).

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

    async def start(self, clean: bool = True) -> None:
        """Start the delivery process and wait until it has recovered the spool.

        Raises:
            RuntimeError: it died or did not report ready in time.
        """
        cmd_r, cmd_w = self._ctx.Pipe(duplex=False)
        ev_r, ev_w = self._ctx.Pipe(duplex=False)
        self._process = self._ctx.Process(
            target=_child_main, args=(self.cfg, cmd_r, ev_w, clean),
            name="smtpgate-delivery", daemon=True,
        )
        self._process.start()
        cmd_r.close()
        ev_w.close()
        self._commands = cmd_w
        ready = await asyncio.to_thread(ev_r.poll, self.start_timeout)
        if not ready or ev_r.recv() != "ready":
            raise RuntimeError("the queue delivery process did not start")
        ev_r.close()
        log.info("queue delivery process started (pid %d)", self._process.pid)

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._restart is not None and not self._restart.done():
            return  # the restarted process will find the message in the spool
        if self._process is not None and not self._process.is_alive():
            # The spool is the truth: a restarted process finds everything queued. It must
            # not clean up, because this process may be in the middle of a commit.
            log.error("queue delivery process died (exit %s); restarting",
                      self._process.exitcode)
            self._restart = asyncio.get_running_loop().create_task(self.start(clean=False))
            return
        if self._commands is not None:
            try:
                self._commands.send(msg)
            except OSError:
                log.exception("cannot reach the queue delivery process")

    def submit(self, entry: QueueEntry, message: bytes | None = None) -> None:
        """Tell the delivery process about a committed message (deliver it now)."""
        self._send(("submit", entry.id))

    async def flush_matching(self, node: str) -> int:
        """ETRN: ask the delivery process to flush mail for ``node`` (count unknown: 0)."""
        self._send(("etrn", node))
        return 0

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the delivery process to finish deliveries in flight and exit."""
        proc = self._process
        if proc is None:
            return
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
        self._process = None

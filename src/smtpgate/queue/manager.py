"""Queue manager: schedules queued messages, runs delivery workers, retries, bounces.

Entry points: :class:`QueueManager` (``start``, ``stop``, ``submit``, ``flush``),
the :class:`Outbound` protocol it delivers through, and :func:`request_flush` (used by
the ``smtpgate queue flush`` CLI on a running server's spool). Per-recipient outcomes
(RFC 5321 §4.2.5 / §6.1): 2xx done, 4xx or no connection → retry with backoff, 5xx →
permanent failure and an RFC 3464 DSN to the reverse-path (never for ``<>``).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple, Protocol

from .. import metrics as _metrics
from ..envelope import Envelope, Recipient
from ..errors import QueueError
from ..logs import send_log
from ..message import Message, MessageFile
from ..reply import Reply
from .schedule import RetrySchedule
from .store import QueuedRecipient, QueueEntry, QueueStore

log = logging.getLogger("smtpgate.queue")

FLUSH_FILE = "flush"
_RESCAN_EVERY = 60.0
#: Messages larger than this (bytes) are sent from their spool file in chunks, never
#: loaded whole (unless a DSN or a ``delivered`` plugin needs them), and are not kept
#: in memory between commit and first attempt.
STREAM_FROM = 1 << 20


class Outcome(NamedTuple):
    """One recipient's result of one delivery attempt.

    Attributes:
        reply: the final reply for this attempt (2xx delivered, 4xx retry, 5xx failed).
        remote: host name of the MTA that gave ``reply``; ``""`` when smtpgate made
            the reply up (connection failure, TLS requirement, local check), so that
            DSNs and ``queue show`` never name a host that did not answer.
        relayed: delivered to a next hop that does not offer DSN (RFC 3461 §5.2.2):
            a ``NOTIFY=SUCCESS`` recipient then gets a "relayed" DSN from us.
    """

    reply: Reply
    remote: str
    relayed: bool = False


class Outbound(Protocol):
    """How the queue reaches the next hop (a relay URL, or MX hosts per domain)."""

    def destination(self, address: str) -> str:
        """The grouping key for a recipient: ``"relay"`` or the recipient's domain."""
        ...

    async def send(
        self, destination: str, envelope: Envelope, message: Message
    ) -> dict[str, Outcome]:
        """Deliver to every recipient of ``envelope`` (all share ``destination``).

        ``message`` is bytes, or (above :data:`STREAM_FROM` bytes) a
        :class:`~smtpgate.message.MessageFile` on the spool file.

        Returns:
            forward-path → :class:`Outcome`; a recipient missing from the result
            counts as a temporary failure.
        """
        ...

    async def aclose(self) -> None:
        """Close pooled connections."""
        ...


DsnFactory = Callable[[QueueEntry, bytes, list[QueuedRecipient], str], bytes | None]
"""(entry, original message, recipients, kind "failure"|"delay"|"relayed") → DSN bytes or
None when no DSN is due (e.g. NOTIFY=NEVER, or no NOTIFY=SUCCESS for "relayed")."""

#: The reply recorded for recipients returned by ``smtpgate queue bounce`` (RFC 3463 X.0.0).
ADMIN_BOUNCE = "550 5.0.0 Returned to sender by the mail administrator"


def _domain_matches(address: str, node: str) -> bool:
    domain = address[address.rfind("@") + 1 :].lower()
    if node.startswith("@"):
        return domain == node[1:] or domain.endswith("." + node[1:])
    return domain == node


def request_flush(spool: str | os.PathLike[str]) -> None:
    """Ask a running server to rescan its spool now (touches ``<spool>/flush``)."""
    p = Path(spool) / FLUSH_FILE
    p.touch()
    os.utime(p)


OutcomeHook = Callable[[QueueEntry, QueuedRecipient, Reply, bytes], Awaitable[None]]
"""``(entry, recipient, reply, message)``: told the outcome of each delivery attempt."""


class QueueManager:
    """Runs delivery for a :class:`~smtpgate.queue.store.QueueStore`.

    Args:
        store: the spool.
        outbound: the next hop.
        schedule: retry delays and message lifetime.
        workers: deliveries in flight at once.
        per_destination: deliveries in flight per destination.
        scan_interval: seconds between checks for due messages and flush requests.
        delay_warning: seconds after arrival for a delay DSN (0 = never).
        make_dsn: builds DSN messages; ``None`` disables bounces (not recommended).
        on_outcome: awaited after each delivery attempt of a destination with
            ``(entry, recipient, reply, message)`` per recipient (the plugins'
            ``delivered`` stage); its errors are logged, never fatal.
        clock: time source (epoch seconds), injectable for tests.
    """

    def __init__(
        self,
        store: QueueStore,
        outbound: Outbound,
        *,
        schedule: RetrySchedule | None = None,
        workers: int = 20,
        per_destination: int = 5,
        scan_interval: float = 1.0,
        delay_warning: float = 0.0,
        make_dsn: DsnFactory | None = None,
        clock: Callable[[], float] = time.time,
        on_outcome: OutcomeHook | None = None,
    ) -> None:
        self.store = store
        self.outbound = outbound
        self.schedule = schedule or RetrySchedule()
        self.n_workers = workers
        self.per_destination = per_destination
        self.scan_interval = scan_interval
        self.delay_warning = delay_warning
        self.make_dsn = make_dsn
        self.on_outcome = on_outcome
        self.clock = clock
        self._due: dict[str, float] = {}
        # (due time, id) min-heap over _due; entries whose time no longer matches are stale
        self._heap: list[tuple[float, str]] = []
        self._fresh: dict[str, tuple[QueueEntry, bytes]] = {}
        self._finishing: list[tuple[QueueEntry, asyncio.Future[str]]] = []
        self._finisher: asyncio.Task[None] | None = None
        self._inflight: set[str] = set()
        self._work: asyncio.Queue[str] = asyncio.Queue()
        self._dest_sems: dict[str, asyncio.Semaphore] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._flush_mtime = 0.0
        self._last_rescan = 0.0
        self._stopping = False
        self.delivered = 0
        self.bounced = 0

    # ------------------------------------------------------------- lifecycle

    async def start(self, clean: bool = True) -> None:
        """Recover the spool after a crash, then start the scheduler and the workers.

        Args:
            clean: also remove leftovers of interrupted commits (only safe while no
                process is committing to the spool: at start-up, before listening).
        """
        entries = await asyncio.to_thread(self.store.recover, clean)
        for entry in entries:
            if entry.state != "hold":
                self._set_due(entry.id, entry.next_attempt)
        if entries:
            log.info("queue: recovered %d message(s) from %s", len(entries), self.store.path)
        self._flush_mtime = self._flush_stamp()
        self._last_rescan = time.monotonic()
        self._tasks.append(asyncio.create_task(self._scheduler(), name="queue-scheduler"))
        for i in range(self.n_workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"queue-worker-{i}"))

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work; wait up to ``timeout`` seconds for deliveries in flight.

        A delivery cut off here is retried after restart (at most a duplicate, never a loss).
        """
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.outbound.aclose()

    def _set_due(self, qid: str, when: float) -> None:
        self._due[qid] = when
        heapq.heappush(self._heap, (when, qid))

    def submit_id(self, qid: str) -> None:
        """Schedule a message committed by another process for immediate delivery."""
        self._set_due(qid, self.clock())
        self._wake.set()

    def submit(self, entry: QueueEntry, message: bytes | None = None) -> None:
        """Schedule a freshly enqueued message for immediate delivery.

        With ``message`` the first attempt uses the in-memory copies instead of reading
        the spool back (they are the bytes just committed; later attempts read the disk).
        Messages above :data:`STREAM_FROM` bytes are not kept: they are sent from the spool.
        """
        self._set_due(entry.id, entry.next_attempt)
        if message is not None and len(message) <= STREAM_FROM and len(self._fresh) < 10000:
            self._fresh[entry.id] = (entry, message)
        self._wake.set()

    def flush(self, qid: str | None = None) -> None:
        """Make one (or every) deferred message due now (in-process; see :func:`request_flush`)."""
        now = self.clock()
        for key in [qid] if qid else list(self._due):
            if key in self._due:
                self._set_due(key, now)
        self._wake.set()

    async def flush_matching(self, node: str) -> int:
        """ETRN (RFC 1985): make due now every message with a pending recipient at ``node``.

        ``node`` is ``domain`` (exactly), ``@domain`` (the domain and its subdomains) or
        ``#queue`` (every message). Returns how many messages were flushed.
        """
        node_l = node.lower()
        entries = await asyncio.to_thread(lambda: list(self.store.entries(("incoming",
                                                                            "deferred"))))
        now = self.clock()
        count = 0
        for e in entries:
            if node_l.startswith("#") or any(
                _domain_matches(r.address, node_l) for r in e.pending
            ):
                if e.id not in self._inflight:
                    self._set_due(e.id, now)
                    count += 1
        self._wake.set()
        return count

    @property
    def queued(self) -> int:
        """Messages known to the scheduler (not on hold)."""
        return len(self._due)

    # ------------------------------------------------------------- scheduler

    def _flush_stamp(self) -> float:
        try:
            return (self.store.path / FLUSH_FILE).stat().st_mtime
        except OSError:
            return 0.0

    async def _rescan(self) -> None:
        entries = await asyncio.to_thread(lambda: list(self.store.entries()))
        due: dict[str, float] = {}
        for e in entries:
            if e.state != "hold":
                due[e.id] = e.next_attempt
        for qid in self._inflight:
            due.pop(qid, None)
        for qid, when in self._due.items():
            # submitted while the spool was being read (committed after its listing)
            due.setdefault(qid, when)
        self._due = due
        self._heap = [(when, qid) for qid, when in due.items()]
        heapq.heapify(self._heap)
        self._last_rescan = time.monotonic()

    async def _scheduler(self) -> None:
        while not self._stopping:
            try:
                async with asyncio.timeout(self.scan_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                return
            try:
                stamp = self._flush_stamp()
                stale = time.monotonic() - self._last_rescan > _RESCAN_EVERY
                if stamp != self._flush_mtime or stale:
                    self._flush_mtime = stamp
                    await self._rescan()
                now = self.clock()
                heap = self._heap
                while heap and heap[0][0] <= now:
                    when, qid = heapq.heappop(heap)
                    if self._due.get(qid) != when or qid in self._inflight:
                        continue  # stale heap entry (rescheduled, or in flight)
                    self._inflight.add(qid)
                    del self._due[qid]
                    self._work.put_nowait(qid)
            except Exception:
                log.exception("queue scheduler error")

    async def _worker(self) -> None:
        while True:
            qid = await self._work.get()
            try:
                await self._process(qid)
            except Exception:
                log.exception("queue: delivery of %s failed unexpectedly; retrying later", qid)
                self._set_due(qid, self.clock() + self.schedule.min_backoff)
            finally:
                self._inflight.discard(qid)

    # -------------------------------------------------------------- delivery

    def _open_message(self, qid: str, entry: QueueEntry) -> Message:
        """The message for one attempt: bytes, or above :data:`STREAM_FROM` bytes a
        :class:`MessageFile` (size and CRC-32 checked in chunks). Raises QueueError."""
        if entry.size <= STREAM_FROM:
            return self.store.read_message(qid, entry)
        return self.store.open_message(entry)

    async def _process(self, qid: str) -> None:
        fresh = self._fresh.pop(qid, None)
        message: Message
        if fresh is not None:
            entry, message = fresh  # finish_attempt merges any change made meanwhile
        else:
            # Reading the envelope and a short message is a few page-cache syscalls: on
            # the loop (a worker thread's hand-offs and GIL switches cost more than the
            # reads). A long message (its CRC-32 is checked over the whole file) is
            # opened in a thread.
            try:
                entry = self.store.find(qid)
            except KeyError:
                return  # deleted meanwhile (queue delete)
            if entry.state == "hold":
                return
            try:
                if entry.size <= STREAM_FROM:
                    message = self._open_message(qid, entry)
                else:
                    message = await asyncio.to_thread(self._open_message, qid, entry)
            except QueueError as exc:
                log.error("queue id=%s: %s; moved to corrupt/", qid, exc)
                await asyncio.to_thread(self.store.quarantine, entry, str(exc))
                return
        try:
            await self._attempt(entry, message)
        finally:
            if isinstance(message, MessageFile):
                message.close()

    async def _attempt(self, entry: QueueEntry, message: Message) -> None:
        now = self.clock()
        newly_failed: list[QueuedRecipient] = []
        newly_relayed: list[QueuedRecipient] = []
        if entry.bounce:
            # Our decision, not any host's: no Remote-MTA; the last attempt's outcome is kept
            # in the text (saying which host gave it, if one did).
            for r in entry.pending:
                r.state = "failed"
                r.last_reply = _with_last(ADMIN_BOUNCE, r)
                r.remote_mta = ""
                newly_failed.append(r)
        else:
            groups: dict[str, list[QueuedRecipient]] = {}
            for r in entry.pending:
                groups.setdefault(self.outbound.destination(r.address), []).append(r)
            await asyncio.gather(*(
                self._deliver_group(entry, dest, rcpts, message, newly_failed, newly_relayed)
                for dest, rcpts in groups.items()
            ))
        if entry.pending and self.schedule.expired(entry.created, now):
            for r in entry.pending:
                r.state = "failed"
                r.last_reply = _with_last("450 4.4.7 Delivery time expired", r)
                r.remote_mta = ""
                newly_failed.append(r)
        await self._notify(entry, message, newly_failed, newly_relayed, now)
        entry.attempts += 1
        entry.next_attempt = now + self.schedule.delay(entry.attempts)
        entry.last_reply = next((r.last_reply for r in entry.pending if r.last_reply), "")
        # Merge with any administrator change and write the result under one lock hold.
        outcome = await self._finish(entry)
        if outcome == "gone":
            return  # deleted by the administrator during the attempt
        if outcome == "removed":
            log.info("queue id=%s done attempts=%d delivered=%d failed=%d", entry.id,
                     entry.attempts, sum(r.state == "delivered" for r in entry.recipients),
                     sum(r.state == "failed" for r in entry.recipients))
            return
        if outcome != "hold":
            self._set_due(entry.id, entry.next_attempt)
        log.info("queue id=%s %s attempts=%d next=%+.0fs reply=%r", entry.id, outcome,
                 entry.attempts, entry.next_attempt - now, entry.last_reply[:200])

    async def _finish(self, entry: QueueEntry) -> str:
        """Record an attempt; attempts finishing together share one spool-lock hold."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._finishing.append((entry, fut))
        if self._finisher is None or self._finisher.done():
            self._finisher = asyncio.create_task(self._finish_loop())
        return await fut

    async def _finish_loop(self) -> None:
        while self._finishing:
            batch, self._finishing = self._finishing, []
            try:
                entries = [e for e, _ in batch]
                if all(e.finished for e in entries):
                    # Only removals (unlinks, no fsync): inline, cheaper than a thread's
                    # hand-offs (see _process).
                    outcomes = self.store.finish_attempts(entries)
                else:  # envelope files to write and fsync: off the loop
                    outcomes = await asyncio.to_thread(self.store.finish_attempts, entries)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), outcome in zip(batch, outcomes, strict=True):
                if not fut.done():
                    fut.set_result(outcome)

    async def _deliver_group(
        self, entry: QueueEntry, dest: str, rcpts: list[QueuedRecipient], message: Message,
        failed: list[QueuedRecipient], relayed_to: list[QueuedRecipient],
    ) -> None:
        """Deliver one destination's recipients; ``relayed_to`` gets those accepted by a
        next hop without DSN."""
        sem = self._dest_sems.get(dest)
        if sem is None:
            sem = self._dest_sems[dest] = asyncio.Semaphore(self.per_destination)
        env = Envelope(entry.mail_from, dict(entry.mail_params),
                       [Recipient(r.address, dict(r.params)) for r in rcpts])
        async with sem:
            try:
                results = await self.outbound.send(dest, env, message)
            except Exception as exc:  # an outbound bug must not lose the message
                log.exception("queue id=%s: outbound to %s raised", entry.id, dest)
                results = {r.address: Outcome(Reply(451, "4.3.0",
                                                    f"Local delivery error: {exc}"[:200]), "")
                           for r in rcpts}
        sent: dict[tuple[str, str, int], list[str]] = {}  # the send log's lines
        for r in rcpts:
            out = results.get(r.address)
            if out is None:
                out = Outcome(Reply(451, "4.4.1", "No result for this recipient"), "")
            reply, remote = out[0], out[1]
            _metrics.M.delivery(dest, reply.code)  # smtpgate_delivery_attempts_total
            relayed = len(out) > 2 and bool(out[2])
            r.attempts += 1
            r.last_reply = f"{reply.code} {reply.enhanced or ''} {reply.text}".replace("  ", " ")
            r.remote_mta = remote
            if reply.code < 400:
                r.state = "delivered"
                if relayed:
                    relayed_to.append(r)
                self.delivered += 1
            elif reply.code >= 500:
                r.state = "failed"
                failed.append(r)
            log.info("queue id=%s to=<%s> dest=%s remote=%s reply=%r", entry.id, r.address,
                     dest, remote or "-", r.last_reply[:200])
            sent.setdefault((remote or dest, r.last_reply, reply.code), []).append(r.address)
            if self.on_outcome is not None:
                try:
                    await self.on_outcome(entry, r, reply, await _whole(message))
                except Exception:
                    log.exception("queue id=%s: delivered notification failed", entry.id)
        for (upstream, text, code), addresses in sent.items():
            send_log(entry.id, entry.mail_from, addresses, upstream, text, status=(
                "sent" if code < 400 else "deferred" if code < 500 else "bounced"))

    async def _notify(
        self, entry: QueueEntry, message: Message, failed: list[QueuedRecipient],
        relayed: list[QueuedRecipient], now: float,
    ) -> None:
        if self.make_dsn is None or entry.mail_from == "":
            if failed and entry.mail_from == "":
                log.info("queue id=%s: %d recipient(s) failed; no bounce for null sender",
                         entry.id, len(failed))
            return
        jobs: list[tuple[list[QueuedRecipient], str]] = []
        if failed:
            jobs.append((failed, "failure"))
        if relayed:  # accepted by a next hop without DSN: ours to report (RFC 3461 §5.2.2)
            jobs.append((relayed, "relayed"))
        if self.delay_warning and now - entry.created >= self.delay_warning:
            late = [r for r in entry.pending if not r.delay_notified]
            if late:
                jobs.append((late, "delay"))
                for r in late:
                    r.delay_notified = True
        for rcpts, kind in jobs:
            dsn = self.make_dsn(entry, await _whole(message), rcpts, kind)
            if dsn is None:
                continue
            params: dict[str, str | None] = {}
            if any(b > 127 for b in dsn):
                params["BODY"] = "8BITMIME"
            if not entry.mail_from.isascii():
                params["SMTPUTF8"] = None
            env = Envelope("", params, [Recipient(entry.mail_from)])
            try:
                dsn_entry = await asyncio.to_thread(self.store.enqueue, env, dsn)
            except QueueError:
                log.exception("queue id=%s: cannot queue the %s DSN", entry.id, kind)
                continue
            if kind == "failure":
                self.bounced += len(rcpts)
            log.info("queue id=%s: %s DSN queued as %s to <%s>", entry.id, kind, dsn_entry.id,
                     entry.mail_from)
            self.submit(dsn_entry)



async def _whole(message: Message) -> bytes:
    """The message's bytes (a :class:`MessageFile` is read once, off the event loop)."""
    if isinstance(message, MessageFile):
        return await asyncio.to_thread(message.read)
    return message


def _with_last(reason: str, r: QueuedRecipient) -> str:
    """``reason`` plus the recipient's last attempt outcome, naming the host that gave it."""
    last = r.last_reply.strip()
    if not last:
        return reason
    who = f" from {r.remote_mta}" if r.remote_mta else ""
    return f"{reason}; last reply{who}: {last}"[:900]

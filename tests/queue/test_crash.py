"""Queue crash safety: smtpgate is ``kill -9``ed at random points and restarted on its spool.

Proves the guarantees of docs/queue.md ("Crash safety") against a real subprocess, a real
SMTP client (raw sockets) and a capture upstream: every message acknowledged with 250 is
delivered, at least once and a second time only when the crash hit between the upstream's
acceptance and the dequeue; nothing partial, corrupted or never finished is delivered;
leftovers of interrupted enqueues are cleaned up; the spool drains after the last restart.
"""

from __future__ import annotations

import os
import select
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

import pytest

from ..support import RawClient
from .crash_support import (
    SENDER,
    CaptureUpstream,
    Delivery,
    GateProcess,
    SpoolSnapshot,
    dot_stuff,
    embedded_envelope,
    free_port,
    make_message,
    queue_list,
    queued_id,
    snapshot_spool,
    strip_received,
    wait_for,
    write_config,
)

N_MESSAGES = 32
KILL_KINDS = ("mid_data", "after_dot", "after_250", "during_delivery", "deferred", "startup")
DRAIN_TIMEOUT = 30.0


@dataclass
class Sent:
    """A message the client tried to send.

    status: ``"cut"`` (killed before the final dot was sent), ``"unknown"`` (the dot was
    sent, no reply seen), ``"acked"`` (the client saw ``250 ... Queued as``).
    """

    serial: int
    content: bytes
    rcpts: tuple[str, ...]
    gen: int = -1
    status: str = "new"
    qid: str | None = None


@dataclass
class Crash:
    """A SIGKILL of generation ``gen`` and the spool as it left it."""

    gen: int
    kind: str
    at: float
    snap: SpoolSnapshot
    recovered: bool  # the killed process had finished start-up recovery (was listening)


@dataclass
class Harness:
    """One smtpgate subprocess on one spool, restarted after every crash."""

    root: Path
    upstream: CaptureUpstream
    gen: int = 0
    crashes: list[Crash] = field(default_factory=list)
    sent: dict[int, Sent] = field(default_factory=dict)
    client: RawClient | None = None
    listening: bool = False

    def __post_init__(self) -> None:
        self.spool = self.root / "spool"
        self.config = self.root / "smtpgate.toml"
        self.port = free_port()
        write_config(self.config, self.port, self.upstream.port, self.spool)
        self.gate = GateProcess(self.config, self.port, self.root / "smtpgate.log")

    # ------------------------------------------------------------ processes

    def start(self) -> None:
        self.upstream.generation = self.gen
        self.listening = False
        self.gate.start()
        self.listening = True

    def crash(self, kind: str) -> Crash:
        """SIGKILL, let the upstream finish what the dead process sent, snapshot."""
        at = self.gate.kill()
        if self.client is not None:
            self.client.close()
            self.client = None
        assert self.upstream.wait_idle(), "upstream connections did not close after the kill"
        c = Crash(self.gen, kind, at, snapshot_spool(self.spool), self.listening)
        self.crashes.append(c)
        self.gen += 1
        return c

    def restart(self) -> None:
        self.start()

    def connect(self) -> RawClient:
        if self.client is None:
            c = RawClient(self.port, timeout=15)
            assert c.greeting.startswith(b"220 "), c.greeting
            assert c.cmd("EHLO client.test").startswith(b"250"), "EHLO"
            self.client = c
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.gate.cleanup()

    # -------------------------------------------------------------- sending

    def begin(self, msg: Sent) -> tuple[RawClient, bytes]:
        """MAIL, RCPT, DATA; returns the client and the DATA wire bytes."""
        self.sent[msg.serial] = msg
        msg.gen = self.gen
        c = self.connect()
        r = c.cmd(f"MAIL FROM:<{SENDER}> SIZE={len(msg.content)}")
        assert r.startswith(b"250"), r
        for rcpt in msg.rcpts:
            r = c.cmd(f"RCPT TO:<{rcpt}>")
            assert r.startswith(b"250"), r
        r = c.cmd("DATA")
        assert r.startswith(b"354"), r
        return c, dot_stuff(msg.content)

    def finish(self, msg: Sent, c: RawClient) -> None:
        """Read the reply to the final dot; it must be ``250 ... Queued as ID``."""
        reply = c.read_reply()
        msg.qid = queued_id(reply)
        assert msg.qid, reply
        msg.status = "acked"

    def send(self, msg: Sent) -> None:
        c, wire = self.begin(msg)
        c.send(wire)
        msg.status = "unknown"
        self.finish(msg, c)

    def late_reply(self, msg: Sent, c: RawClient) -> None:
        """After a kill that followed the final dot: a 250 already in the socket buffer
        was seen by the client (so the message was committed)."""
        try:
            c.sock.settimeout(1.0)
            reply = c.read_reply()
        except OSError:
            return
        finally:
            c.close()
        if queued_id(reply):
            msg.qid = queued_id(reply)
            msg.status = "acked"

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> SpoolSnapshot:
        """Wait until the running server's spool is empty (incl. tmp/ and messages/)."""
        dirs = ("incoming", "deferred", "hold", "messages", "tmp")
        ok = wait_for(lambda: all(not os.listdir(self.spool / d) for d in dirs), timeout, 0.05)
        snap = snapshot_spool(self.spool)
        assert ok, f"spool did not drain in {timeout}s: {snap}\n{self.gate.log_tail()}"
        return snap


@pytest.fixture
def upstream() -> Iterator[CaptureUpstream]:
    up = CaptureUpstream()
    yield up
    up.stop()


@pytest.fixture
def harness(tmp_path: Path, upstream: CaptureUpstream) -> Iterator[Harness]:
    h = Harness(tmp_path, upstream)
    yield h
    h.close()


# ------------------------------------------------------------------ verification


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    stats: dict[str, object] = field(default_factory=dict)


def verify(h: Harness, deliveries: list[Delivery]) -> Verdict:
    """Check every guarantee of docs/queue.md against what the upstream received."""
    v = Verdict()
    bad = v.problems.append
    sent = h.sent
    full = {m.content: m.serial for m in sent.values() if m.status in ("acked", "unknown")}
    crash_of = {c.gen: c for c in h.crashes}
    before = {c.gen + 1: c.snap for c in h.crashes}  # spool as generation g+1 found it

    # nothing partial, corrupted or never finished; right envelope
    recs: dict[tuple[int, str], list[Delivery]] = defaultdict(list)
    for d in deliveries:
        try:
            body = strip_received(d.content)
        except (AssertionError, ValueError) as exc:
            bad(f"delivery without smtpgate's Received header (serial {d.serial}): {exc}")
            continue
        serial = full.get(body)
        if serial is None:
            m = sent.get(d.serial or -1)
            what = m.status if m else "unknown serial"
            bad(f"delivered bytes (serial {d.serial}, {len(body)} bytes, sent as {what}) "
                "equal no message a client sent in full")
            continue
        if d.mail_from != SENDER:
            bad(f"serial {serial}: reverse-path {d.mail_from!r}")
        for r in d.rcpts:
            if r not in sent[serial].rcpts:
                bad(f"serial {serial}: delivered to {r}, not a recipient")
            recs[(serial, r)].append(d)
        if d.gen < sent[serial].gen:
            bad(f"serial {serial} delivered by generation {d.gen} before it was sent")

    lost_250 = 0
    for (serial, r), lst in recs.items():
        # at most once more per crash that hit between the upstream's acceptance and the
        # dequeue (delivered by the killed process, still pending in the spool it left)
        hits = sum(1 for c in h.crashes if any(d.gen == c.gen for d in lst)
                   and r in c.snap.pending.get(serial, set()))
        if len(lst) > 1 + hits:
            bad(f"serial {serial} -> {r}: delivered {len(lst)}x, only {hits} crash(es) "
                "between acceptance and dequeue")
        per_gen = Counter(d.gen for d in lst)
        for g, n in per_gen.items():
            if n > 1:
                bad(f"serial {serial} -> {r}: delivered {n}x by one process (generation {g})")
        for d in lst:
            # a delivery by a later process must come from an envelope that was committed
            # and still pending for this recipient when that process started
            if d.gen > sent[serial].gen and r not in before[d.gen].pending.get(serial, set()):
                bad(f"serial {serial} -> {r}: delivered by generation {d.gen}, but not "
                    "pending in the spool it recovered (dequeued message delivered again)")
            crash = crash_of.get(d.gen)
            if crash is not None and (d.replied is None or d.replied > crash.at):
                # the upstream took it but its 250 never reached smtpgate: must be retried
                lost_250 += 1
                if r not in crash.snap.pending.get(serial, set()):
                    bad(f"serial {serial} -> {r}: upstream's 250 lost in the crash of "
                        f"generation {d.gen}, yet not pending in the spool")
                if not any(e.gen > d.gen for e in lst):
                    bad(f"serial {serial} -> {r}: not re-delivered after its 250 was lost")

    # nothing acknowledged is lost at any crash
    for c in h.crashes:
        prev = before.get(c.gen)
        for m in sent.values():
            if m.status != "acked" or m.gen > c.gen:
                continue
            for r in m.rcpts:
                if r in c.snap.pending.get(m.serial, set()):
                    continue
                confirmed = any(d.gen == c.gen and d.replied is not None and d.replied <= c.at
                                for d in recs.get((m.serial, r), []))
                gone_before = m.gen < c.gen and prev is not None and r not in prev.pending.get(
                    m.serial, set())
                if not confirmed and not gone_before:
                    bad(f"serial {m.serial} -> {r} (250 {m.qid}) lost: not in the spool after "
                        f"the {c.kind} crash of generation {c.gen} and not delivered")
        for s in c.snap.qids:
            if sent[s].status == "cut":
                bad(f"serial {s} committed to the spool although its DATA was cut")
        for o in c.snap.orphans:
            if isinstance(o, int) and sent[o].status == "cut":
                bad(f"serial {o}: message file written although its DATA was cut")
        # An envelope file without its queue file is what a crash in the middle of a
        # removal leaves (the queue file goes first): the message was delivered (checked
        # above for every 250) and the next recovery removes the envelope file.
        if c.snap.corrupt:
            bad(f"crash of generation {c.gen}: corrupt/ {c.snap.corrupt}")
        # leftovers of the previous crash are removed by the recovery of this generation
        if prev is not None and c.recovered:
            kept = set(prev.missing_message) & set(c.snap.missing_message)
            if kept:
                bad(f"generation {c.gen} recovered but kept envelopes without message {kept}")
            left = {n for n in prev.tmp if n.count(".") == 1} & set(c.snap.tmp)
            orphans = set(prev.orphans) & set(c.snap.orphans)
            if left or orphans:
                bad(f"generation {c.gen} recovered but kept tmp {left} / orphans {orphans}")

    for m in sent.values():
        if m.status == "acked":
            for r in m.rcpts:
                if not recs.get((m.serial, r)):
                    bad(f"serial {m.serial} -> {r} acknowledged ({m.qid}) but never delivered")
        if m.status == "cut" and any(s == m.serial for s, _ in recs):
            bad(f"serial {m.serial}: DATA cut by the kill, yet delivered")

    counts = Counter({k: len(v) for k, v in recs.items()})
    statuses = Counter(m.status for m in sent.values())
    unknown_delivered = sum(1 for m in sent.values() if m.status == "unknown"
                            and any(s == m.serial for s, _ in recs))
    v.stats = {
        "messages": len(sent),
        "sent_in_full": statuses["acked"] + statuses["unknown"],
        "250s": statuses["acked"],
        "no_reply": statuses["unknown"],
        "no_reply_delivered": unknown_delivered,
        "cut_mid_data": statuses["cut"],
        "kills": len(h.crashes),
        "kill_kinds": dict(Counter(c.kind for c in h.crashes)),
        "deliveries": sum(counts.values()),
        "duplicates": sum(n - 1 for n in counts.values()),
        "max_per_recipient": max(counts.values(), default=0),
        "upstream_250s_lost_in_crash": lost_250,
        "tmp_leftovers": sum(len(c.snap.tmp) for c in h.crashes),
        "orphan_messages": sum(len(c.snap.orphans) for c in h.crashes),
        "double_envelopes": sum(len(c.snap.duplicate_envelopes) for c in h.crashes),
        "upstream_refusals": h.upstream.refused,
    }
    return v


def assert_verdict(v: Verdict, h: Harness) -> None:
    assert not v.problems, (
        f"{len(v.problems)} violation(s):\n" + "\n".join(v.problems[:25])
        + f"\nstats: {v.stats}\n--- smtpgate log tail:\n{h.gate.log_tail(60)}"
    )


# ------------------------------------------------------------------ random crashes


def _upstream_mode(rng: Random, up: CaptureUpstream) -> None:
    up.mode = rng.choices(["accept", "slow", "refuse_net", "refuse_data"], [5, 3, 1, 1])[0]
    up.delay = rng.uniform(0.05, 0.3)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_kills(seed: int, harness: Harness, upstream: CaptureUpstream) -> None:
    """kill -9 at random points (mid-DATA, after the dot, after 250, during delivery, while
    deferred, during start-up recovery), restart on the same spool, then drain and verify."""
    rng = Random(seed)
    h = harness
    kinds = list(KILL_KINDS) + [rng.choice(KILL_KINDS[:5])]
    rng.shuffle(kinds)
    positions = sorted(rng.sample(range(2, N_MESSAGES - 1), len(kinds)))
    plan = dict(zip(positions, kinds, strict=True))
    big = set(rng.sample(range(N_MESSAGES), 5)) | {i for i, k in plan.items() if k == "mid_data"}

    upstream.start()
    h.start()
    for i in range(N_MESSAGES):
        serial = seed * 1000 + i
        kill = plan.get(i)
        if kill == "after_dot" and rng.random() < 0.5:
            big.add(i)
        size = rng.randint(150_000, 250_000) if i in big else rng.randint(200, 6000)
        rcpts = [f"s{serial}@example.com"]
        if rng.random() < 0.3 or kill == "deferred":
            rcpts.append(f"s{serial}@example.net")
        msg = Sent(serial, make_message(rng, serial, size), tuple(rcpts))
        if kill == "during_delivery":
            upstream.mode, upstream.delay = "slow", 0.5
        elif kill == "deferred":
            upstream.mode = rng.choice(["refuse_rcpt", "refuse_net", "refuse_data"])
        elif rng.random() < 0.15:
            _upstream_mode(rng, upstream)

        if kill == "mid_data":
            c, wire = h.begin(msg)
            cut = len(wire) - rng.choice([1, 2, 3]) if rng.random() < 0.3 else \
                rng.randint(1, len(wire) - 1)
            c.send(wire[:cut])
            msg.status = "cut"
            time.sleep(0.05)  # let the server read what was sent
            h.crash(kill)
        elif kill == "after_dot":
            c, wire = h.begin(msg)
            c.send(wire)
            msg.status = "unknown"
            time.sleep(rng.choice([0.0, rng.uniform(0, 0.01)]))
            h.client = None  # keep the socket: a 250 may already be in its buffer
            h.crash(kill)
            h.late_reply(msg, c)
        else:
            h.send(msg)
            if kill == "after_250":
                time.sleep(rng.uniform(0, 0.06))
                h.crash(kill)
            elif kill == "during_delivery":
                assert wait_for(lambda: upstream.in_data > 0, 5), "no delivery in progress"
                time.sleep(rng.uniform(0, 0.2))
                h.crash(kill)
            elif kill == "deferred":
                time.sleep(rng.uniform(0.1, 0.9))
                h.crash(kill)
            elif kill == "startup":
                h.crash("after_250")
                h.upstream.generation = h.gen
                h.gate.spawn()
                time.sleep(rng.uniform(0.0, 0.35))
                h.listening = False
                h.crash("startup")
            elif rng.random() < 0.15:
                time.sleep(rng.uniform(0.05, 0.3))
        if kill is not None:
            _upstream_mode(rng, upstream)
            h.restart()

    upstream.mode = "accept"
    h.drain()
    time.sleep(0.3)  # nothing more may arrive once the spool is empty
    assert queue_list(h.config) == []
    assert h.gate.proc is not None and h.gate.proc.poll() is None, "smtpgate died on its own"
    v = verify(h, upstream.deliveries)
    print(f"\nseed {seed}: {v.stats}")
    assert_verdict(v, h)
    assert v.stats["kills"] == len(kinds) + 1
    # the interesting windows were really hit: a DATA cut by the kill, and an upstream
    # acceptance whose 250 died with the process (-> a justified duplicate)
    assert v.stats["cut_mid_data"] and v.stats["upstream_250s_lost_in_crash"], v.stats


# ------------------------------------------------------------------ focused cases


def test_kill_after_250_with_upstream_down_delivers_exactly_once(
    harness: Harness, upstream: CaptureUpstream
) -> None:
    h = harness
    rng = Random(7)
    h.start()  # upstream not listening yet: connection refused, message deferred
    msg = Sent(1, make_message(rng, 1, 3000, "once"), ("once@example.com",))
    h.send(msg)
    assert msg.status == "acked"
    c = h.crash("after_250")
    assert c.snap.pending == {1: {"once@example.com"}}, c.snap
    assert c.snap.qids[1] == msg.qid
    assert upstream.deliveries == []

    upstream.start()
    h.restart()
    assert wait_for(lambda: len(upstream.deliveries) >= 1, 10), h.gate.log_tail()
    h.drain()
    time.sleep(1.2)  # longer than max_backoff: a second attempt would have happened by now
    got = upstream.deliveries
    assert len(got) == 1, [d.serial for d in got]
    assert strip_received(got[0].content) == msg.content
    assert got[0].rcpts == ("once@example.com",) and got[0].mail_from == SENDER
    assert queue_list(h.config) == []
    assert_verdict(verify(h, got), h)


def _spool_state(spool: Path) -> tuple[set[str], set[str]]:
    """(enqueue tmp files, queue files never committed: no envelope file and no intact
    trailer) — for polling."""
    tmp = {n for n in os.listdir(spool / "tmp") if "." not in n}
    envs = {n[:-5] for d in ("incoming", "deferred", "hold") for n in os.listdir(spool / d)}
    torn = set()
    for qid in set(os.listdir(spool / "messages")) - envs:
        try:
            data = (spool / "messages" / qid).read_bytes()
        except FileNotFoundError:
            continue
        if embedded_envelope(data) is None:
            torn.add(qid)
    return tmp, torn


def test_interrupted_enqueue_leftovers_are_removed_and_never_delivered(
    harness: Harness, upstream: CaptureUpstream
) -> None:
    """Kill a big message's enqueue while its queue file is being written in tmp/ (the
    spool is frozen with SIGSTOP to see the exact state the kill leaves). After restart
    the leftovers are gone, the interrupted messages are never delivered, every 250 is
    delivered exactly once. (A queue file reaches messages/ only by the rename that
    commits it, complete with its trailer, so a kill cannot leave one there half done;
    the "orphan" case of the earlier two-file layout no longer arises, and a torn file
    left by a power failure is covered by tests/queue/test_store.py.)"""
    h = harness
    rng = Random(11)
    h.start()  # upstream down: nothing is dequeued, so a lone message file is an orphan
    for serial in (1, 2):
        h.send(Sent(serial, make_message(rng, serial, 2000, "enq"), (f"e{serial}@example.com",)))
    caught: dict[str, int] = {}
    interrupted: list[int] = []
    attempts = 0
    for attempt in range(40):
        attempts = attempt + 1
        if "tmp" in caught:
            break
        serial = 100 + attempt
        msg = Sent(serial, make_message(rng, serial, 3_000_000, "enq"),
                   (f"e{serial}@example.com",))
        c, wire = h.begin(msg)
        base_tmp, base_orphans = _spool_state(h.spool)
        c.send(wire)
        msg.status = "unknown"
        want = "tmp"
        seen = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            tmp, orphans = _spool_state(h.spool)
            if (tmp - base_tmp) if want == "tmp" else (orphans - base_orphans):
                seen = True
                break
            if select.select([c.sock], [], [], 0)[0]:
                break  # the reply is there: missed the window
        if seen:
            h.gate.freeze()
            snap = snapshot_spool(h.spool)
            tmp, orphans = _spool_state(h.spool)
            if serial not in snap.qids and ((tmp - base_tmp) if want == "tmp" else
                                            (orphans - base_orphans)):
                h.client = None
                crash = h.crash(f"enqueue_{want}")
                c.close()
                assert serial not in crash.snap.qids
                caught[want] = serial
                interrupted.append(serial)
                h.restart()
                # recovery ran before the listener opened: the leftovers are gone
                tmp_now, orphans_now = _spool_state(h.spool)
                assert not (set(crash.snap.tmp) & tmp_now), (crash.snap.tmp, tmp_now)
                assert not (orphans - base_orphans) & orphans_now, orphans_now
                assert serial not in snapshot_spool(h.spool).qids
                continue
            h.gate.thaw()
        h.finish(msg, c)
    assert "tmp" in caught, f"window not caught: {caught}"
    h.send(Sent(999, make_message(rng, 999, 2000, "enq"), ("e999@example.com",)))

    upstream.start()
    h.drain()
    time.sleep(0.3)
    got = upstream.deliveries
    delivered = Counter(d.serial for d in got)
    for m in h.sent.values():
        if m.serial in interrupted:
            assert delivered[m.serial] == 0, f"interrupted enqueue {m.serial} was delivered"
        elif m.status == "acked":
            assert delivered[m.serial] == 1, (m.serial, delivered[m.serial])
    assert sum(delivered.values()) == sum(m.status == "acked" for m in h.sent.values())
    assert_verdict(verify(h, got), h)
    print(f"\nenqueue leftovers caught: {caught} in {attempts} big messages; "
          f"tmp/orphans left: {[(c.snap.tmp, c.snap.orphans) for c in h.crashes]}; "
          f"messages {len(h.sent)}, 250s {sum(m.status == 'acked' for m in h.sent.values())}, "
          f"deliveries {len(got)}")


def test_failed_commit_fsync_leaves_nothing_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error after the commit rename (the fsync of messages/ fails): the client
    gets 451, so the enqueue must be undone completely: no queue file is left."""
    import errno

    from smtpgate.envelope import Envelope, Recipient
    from smtpgate.errors import QueueError
    from smtpgate.queue import store as store_mod

    real = store_mod._fsync_dir

    def failing(path: Path) -> None:
        if path.name == "messages":
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    store = store_mod.QueueStore(tmp_path / "spool")
    monkeypatch.setattr(store_mod, "_fsync_dir", failing)
    with pytest.raises(QueueError):
        store.enqueue(Envelope(SENDER, {}, [Recipient("a@example.com")]), b"Subject: x\r\n\r\nx\r\n")
    monkeypatch.setattr(store_mod, "_fsync_dir", real)
    snap = snapshot_spool(tmp_path / "spool")
    assert snap.empty and not snap.missing_message, snap
    assert store_mod.QueueStore(tmp_path / "spool").recover() == []
    assert os.listdir(tmp_path / "spool" / "corrupt") == []

"""The durable spool: commit protocol, recovery after crashes, locking, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from smtpgate.envelope import Envelope, Recipient
from smtpgate.errors import QueueError
from smtpgate.queue.store import QueueEntry, QueueStore

HEADER = re.compile(rb"#smtpgate-queue-file 2 ([0-9]{12})\n")
TRAILER = re.compile(rb"\n#smtpgate-envelope ([0-9]{10}) ([0-9a-f]{8})\n\Z")


def split_queue_file(data: bytes) -> tuple[bytes, dict]:
    """(message, envelope) of a queue file: header, message, envelope JSON, trailer."""
    h = HEADER.match(data)
    m = TRAILER.search(data)
    assert h is not None and m is not None, (data[:40], data[-80:])
    size, n = int(h.group(1)), int(m.group(1))
    assert h.end() + size + n == m.start()
    env_raw = data[m.start() - n : m.start()]
    assert zlib.crc32(env_raw) == int(m.group(2), 16)
    return data[h.end() : h.end() + size], json.loads(env_raw)

MSG = b"Subject: queued\r\n\r\nbody\r\n"


def env(*rcpts: str) -> Envelope:
    return Envelope("sender@example.org", {"BODY": "8BITMIME"},
                    [Recipient(r, {"NOTIFY": "FAILURE"}) for r in rcpts or ("a@example.com",)])


def test_enqueue_layout(tmp_path: Path) -> None:
    """One queue file per message: the message, its envelope, the trailer; nothing else."""
    store = QueueStore(tmp_path)
    entry = store.enqueue(env("a@example.com", "b@example.net"), MSG)
    message, data = split_queue_file((tmp_path / "messages" / entry.id).read_bytes())
    assert message == MSG
    assert all(os.listdir(tmp_path / d) == [] for d in ("incoming", "deferred", "hold"))
    assert data["mail_from"] == "sender@example.org"
    assert data["size"] == len(MSG) and data["crc32"] == zlib.crc32(MSG)
    assert [r["address"] for r in data["recipients"]] == ["a@example.com", "b@example.net"]
    assert data["recipients"][0]["params"] == {"NOTIFY": "FAILURE"}
    assert os.listdir(tmp_path / "tmp") == []
    assert oct((tmp_path / "messages" / entry.id).stat().st_mode & 0o777) == "0o600"
    again = store.find(entry.id)
    assert again.recipients[1].address == "b@example.net" and again.state == "incoming"
    assert store.read_message(entry.id) == MSG


def test_recover_removes_uncommitted_and_tmp(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    kept = store.enqueue(env(), MSG)
    # a queue file torn by a crash before its batch was flushed (no client saw 250):
    whole = (tmp_path / "messages" / kept.id).read_bytes()
    (tmp_path / "messages" / "TORN").write_bytes(whole[:-7])
    # a torn file ending in a forged envelope and trailer that a client put in its
    # message: the header names the real message length, so it is not taken:
    forged_entry = QueueStore(tmp_path / "other").enqueue(env("evil@example.net"), MSG)
    forged = (tmp_path / "other" / "messages" / forged_entry.id).read_bytes()
    body = b"Subject: x\r\n\r\n" + forged[forged_entry.offset :]  # envelope + trailer
    good = QueueStore(tmp_path / "other").enqueue(env(), body)
    torn = (tmp_path / "other" / "messages" / good.id).read_bytes()
    (tmp_path / "messages" / "FORGED").write_bytes(torn[: good.offset + len(body)])
    # a message file of an older version that never got its envelope:
    (tmp_path / "messages" / "ORPHAN").write_bytes(MSG)
    # a crash while writing:
    (tmp_path / "tmp" / "HALF").write_bytes(MSG[:5])
    (tmp_path / "tmp" / "HALF.json").write_bytes(b"{")
    entries = QueueStore(tmp_path).recover()
    assert [e.id for e in entries] == [kept.id]
    assert os.listdir(tmp_path / "tmp") == []
    assert sorted(os.listdir(tmp_path / "messages")) == [kept.id]


def test_recover_duplicate_envelopes_keeps_latest(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    entry = store.enqueue(env(), MSG)
    entry.attempts = 3
    store.save(entry, "deferred")  # seq 1, in deferred/
    # simulate a crash during a move: an older copy left behind in incoming/
    stale = QueueEntry.from_json((tmp_path / "deferred" / f"{entry.id}.json").read_bytes())
    stale.seq = 0
    stale.attempts = 0
    (tmp_path / "incoming" / f"{entry.id}.json").write_bytes(stale.to_json())
    entries = store.recover()
    assert len(entries) == 1 and entries[0].attempts == 3 and entries[0].state == "deferred"
    assert not (tmp_path / "incoming" / f"{entry.id}.json").exists()


def test_corrupt_envelope_quarantined_message_kept(tmp_path: Path) -> None:
    """An unreadable changed envelope goes to corrupt/; the queue file's own envelope
    takes over (delivered at least once, never lost)."""
    store = QueueStore(tmp_path)
    entry = store.enqueue(env(), MSG)
    entry.attempts = 2
    store.save(entry, "deferred")
    (tmp_path / "deferred" / f"{entry.id}.json").write_bytes(b"not json")
    [back] = store.recover()
    assert (back.id, back.state, back.attempts) == (entry.id, "incoming", 0)
    assert os.listdir(tmp_path / "corrupt") == [f"deferred.{entry.id}.json"]
    assert store.read_message(entry.id) == MSG


def test_envelope_of_a_removed_message_is_removed(tmp_path: Path) -> None:
    """A crash during a removal (queue file gone, envelope file not yet)."""
    store = QueueStore(tmp_path)
    entry = store.enqueue(env(), MSG)
    store.save(entry, "deferred")
    (tmp_path / "messages" / entry.id).unlink()
    assert store.recover() == []
    assert os.listdir(tmp_path / "deferred") == [] and os.listdir(tmp_path / "corrupt") == []


def test_spool_of_the_two_file_layout_is_read(tmp_path: Path) -> None:
    """A spool written by the earlier layout (message file + incoming/<id>.json) is
    recovered and delivered from: nothing queued before an upgrade is lost."""
    store = QueueStore(tmp_path)
    entry = store.enqueue(env(), MSG)
    old = store.find(entry.id)
    old.offset = 0  # the earlier layout's envelope has no offset: the message starts at 0
    (tmp_path / "messages" / entry.id).write_bytes(MSG)  # no header, envelope or trailer
    (tmp_path / "incoming" / f"{entry.id}.json").write_bytes(old.to_json())
    [back] = QueueStore(tmp_path).recover()
    assert back.id == entry.id and back.state == "incoming"
    assert store.read_message(entry.id) == MSG


def test_open_message_checks_size_and_crc(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    entry = store.enqueue(env(), MSG)
    msg = store.open_message(entry)
    try:
        assert (msg.size, msg.read()) == (len(MSG), MSG)
    finally:
        msg.close()
    longer = store.find(entry.id)
    longer.size = 10_000
    with pytest.raises(QueueError, match="shorter"):
        store.open_message(longer)
    path = tmp_path / "messages" / entry.id
    data = bytearray(path.read_bytes())
    data[entry.offset] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(QueueError, match="CRC"):
        store.open_message(store.find(entry.id))


def test_state_moves_and_remove(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    entry = store.enqueue(env(), MSG)
    store.save(entry, "hold")
    assert store.find(entry.id).state == "hold"
    assert not (tmp_path / "incoming" / f"{entry.id}.json").exists()
    with pytest.raises(QueueError):
        store.save(entry, "nowhere")
    store.remove(store.find(entry.id))
    with pytest.raises(KeyError):
        store.find(entry.id)
    assert os.listdir(tmp_path / "messages") == []


def test_update_under_lock_and_merge(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    entry = store.enqueue(env("a@example.com", "b@example.com"), MSG)
    attempt = store.find(entry.id)  # a worker starts an attempt
    store.update(entry.id, lambda e: "hold")  # the administrator holds it meanwhile
    attempt.recipients[0].state = "delivered"
    merged = store.merge_after_attempt(attempt)
    assert merged.state == "hold"
    store.save(merged, "hold")
    final = store.find(entry.id)
    assert final.state == "hold" and final.recipients[0].state == "delivered"
    store.remove(final)
    gone = store.merge_after_attempt(attempt)
    assert gone.state == "gone"


def test_enqueue_failure_leaves_nothing(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    (tmp_path / "messages").chmod(0o500)
    try:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        with pytest.raises(QueueError):
            store.enqueue(env(), MSG)
        assert os.listdir(tmp_path / "messages") == [] and os.listdir(tmp_path / "tmp") == []
    finally:
        (tmp_path / "messages").chmod(0o700)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smtpgate", "queue", *args],
                          capture_output=True, text=True, timeout=60)


def test_queue_cli_commands(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    a = store.enqueue(env("a@example.com"), MSG)
    b = store.enqueue(env("b@example.com"), MSG)
    out = run_cli("list", "--spool", str(tmp_path))
    assert out.returncode == 0 and a.id in out.stdout and "Kbytes in 2 Requests." in out.stdout
    listed = json.loads(run_cli("list", "--spool", str(tmp_path), "--json").stdout)
    assert {e["id"] for e in listed} == {a.id, b.id}
    shown = run_cli("show", "--spool", str(tmp_path), a.id)
    assert shown.returncode == 0 and "Subject: queued" in shown.stdout
    assert run_cli("hold", "--spool", str(tmp_path), a.id).returncode == 0
    assert store.find(a.id).state == "hold"
    assert run_cli("release", "--spool", str(tmp_path), a.id).returncode == 0
    assert store.find(a.id).state == "deferred"
    assert run_cli("flush", "--spool", str(tmp_path), b.id).returncode == 0
    assert store.find(b.id).next_attempt == 0.0
    assert (tmp_path / "flush").exists()
    assert run_cli("bounce", "--spool", str(tmp_path), b.id).returncode == 0
    assert store.find(b.id).bounce
    assert run_cli("delete", "--spool", str(tmp_path), a.id).returncode == 0
    with pytest.raises(KeyError):
        store.find(a.id)
    assert run_cli("show", "--spool", str(tmp_path), "NOPE").returncode == 1
    assert run_cli("delete", "--spool", str(tmp_path), "NOPE").returncode == 1


def test_incomplete_message_file_is_detected_and_quarantined(tmp_path: Path) -> None:
    """A crash before the batch flush can leave a committed queue file whose message part
    is incomplete (delayed allocation): the CRC-32 catches it; it is never delivered."""
    store = QueueStore(tmp_path)
    entry = store.enqueue(env(), MSG)
    assert store.read_message(entry.id, entry) == MSG
    path = tmp_path / "messages" / entry.id
    whole = path.read_bytes()
    path.write_bytes(whole[:entry.offset] + b"\0" * len(MSG) + whole[entry.offset + len(MSG):])
    with pytest.raises(QueueError, match="does not match"):
        store.read_message(entry.id, store.find(entry.id))
    store.quarantine(store.find(entry.id), "test")
    with pytest.raises(KeyError):
        store.find(entry.id)
    assert sorted(os.listdir(tmp_path / "corrupt")) == [f"message.{entry.id}"]


def test_group_commit_many(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    results = store.enqueue_many([(env(f"r{i}@example.com"), MSG + bytes([65 + i]), None, None)
                                  for i in range(5)])
    assert all(isinstance(r, QueueEntry) for r in results)
    assert len(os.listdir(tmp_path / "messages")) == 5 and os.listdir(tmp_path / "tmp") == []
    for r in results:
        assert isinstance(r, QueueEntry)
        assert store.read_message(r.id, r).startswith(MSG)

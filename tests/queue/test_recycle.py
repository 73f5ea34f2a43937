"""Recycled queue files: removal moves a short message's queue file to ``free/``, the next
commit writes over it (same inode), and a file holding another message's complete queue
file (what a power loss can leave after a recycled file was renamed but not rewritten on
disk) never passes for a committed message."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from smtpgate.envelope import Envelope, Recipient
from smtpgate.errors import QueueError
from smtpgate.queue.store import FREE_POOL_MAX, RECYCLE_MAX, QueueStore


def message_and_id(data: bytes) -> tuple[bytes, str]:
    """The message and the envelope's id in a queue file (header, message, JSON, trailer),
    checking that the file ends where its trailer says."""
    h = re.match(rb"#smtpgate-queue-file 2 ([0-9]{12})\n", data)
    t = re.search(rb"\n#smtpgate-envelope ([0-9]{10}) ([0-9a-f]{8})\n\Z", data)
    assert h is not None and t is not None
    size, n = int(h.group(1)), int(t.group(1))
    assert h.end() + size + n == t.start()
    return data[h.end():h.end() + size], str(json.loads(data[t.start() - n:t.start()])["id"])


def env(*rcpts: str) -> Envelope:
    return Envelope("sender@example.org", {}, [Recipient(r) for r in rcpts or ("a@b.example",)])


needs_syncfs = pytest.mark.skipif(
    not QueueStore.__init__.__globals__["_SYNCFS"], reason="recycling needs syncfs(2)")


@needs_syncfs
def test_removed_queue_file_is_reused_by_the_next_commit(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)  # the delivery process's handle: it removes
    first = store.enqueue(env("a@b.example"), b"Subject: one\r\n\r\n" + b"1" * 3000 + b"\r\n")
    ino = os.stat(tmp_path / "messages" / first.id).st_ino
    store.remove(first)
    assert os.listdir(tmp_path / "messages") == []
    assert os.listdir(tmp_path / "free") == [first.id]
    second_msg = b"Subject: two\r\n\r\nshort\r\n"
    receiver = QueueStore(tmp_path)  # the receiving process's handle: it commits
    second = receiver.enqueue(env("c@d.example"), second_msg)
    path = tmp_path / "messages" / second.id
    assert os.stat(path).st_ino == ino  # the same file, rewritten
    assert os.listdir(tmp_path / "free") == [] and os.listdir(tmp_path / "tmp") == []
    assert message_and_id(path.read_bytes()) == (second_msg, second.id)  # cut to length
    assert store.read_message(second.id) == second_msg
    assert [e.id for e in store.entries()] == [second.id]
    # A message longer than RECYCLE_MAX is unlinked, not kept.
    big = receiver.enqueue(env(), b"Subject: long\r\n\r\n" + b"y" * (RECYCLE_MAX + 1))
    store.remove(big)
    assert big.id not in os.listdir(tmp_path / "free")
    assert os.listdir(tmp_path / "messages") == [second.id]


@needs_syncfs
def test_pool_is_bounded(tmp_path: Path) -> None:
    free = tmp_path / "free"
    QueueStore(tmp_path)
    for i in range(FREE_POOL_MAX):
        (free / f"spare{i}").write_bytes(b"")
    entry = QueueStore(tmp_path).enqueue(env(), b"Subject: x\r\n\r\nx\r\n")
    QueueStore(tmp_path).remove(entry)  # counts free/ at its first removal: full
    assert len(os.listdir(free)) == FREE_POOL_MAX
    assert os.listdir(tmp_path / "messages") == []


def test_other_messages_queue_file_under_a_new_name_is_not_committed(tmp_path: Path) -> None:
    """A power loss after a recycled file was renamed into messages/ but before its new
    content reached the disk leaves the old message, complete, under the new id: it must
    not be delivered (it was delivered already) nor listed; recovery removes it."""
    store = QueueStore(tmp_path)
    old = store.enqueue(env("old@b.example"), b"Subject: old\r\n\r\ndelivered already\r\n")
    stale = tmp_path / "messages" / "0000000000000STALE00001"
    shutil.copyfile(tmp_path / "messages" / old.id, stale)
    store.remove(old)
    with pytest.raises(KeyError):
        store.find(stale.name)
    assert list(store.entries()) == []
    with pytest.raises(QueueError):
        store.read_message(stale.name)
    assert store.recover() == []
    assert not stale.exists()


@needs_syncfs
def test_recovery_empties_the_pool(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    kept = store.enqueue(env(), b"Subject: kept\r\n\r\nkept\r\n")
    gone = store.enqueue(env(), b"Subject: gone\r\n\r\ngone\r\n")
    store.remove(gone)
    assert os.listdir(tmp_path / "free") == [gone.id]
    assert [e.id for e in QueueStore(tmp_path).recover()] == [kept.id]
    assert os.listdir(tmp_path / "free") == []
    assert store.read_message(kept.id) == b"Subject: kept\r\n\r\nkept\r\n"


@pytest.mark.parametrize("size", [10, RECYCLE_MAX + 16 * 1024 - 600, 300 * 1024])
def test_find_then_read_message_short_and_long(tmp_path: Path, size: int) -> None:
    """find() reads a short queue file whole and read_message() takes the message from
    those bytes; a longer one is read in parts; both check the CRC-32."""
    msg = b"Subject: s\r\n\r\n" + b"z" * size + b"\r\n"
    store = QueueStore(tmp_path)
    entry = store.enqueue(env("a@b.example", "c@d.example"), msg)
    reader = QueueStore(tmp_path)
    found = reader.find(entry.id)
    assert (found.id, found.size, [r.address for r in found.recipients]) == (
        entry.id, len(msg), ["a@b.example", "c@d.example"])
    assert reader.read_message(entry.id, found) == msg
    assert reader.read_message(entry.id, found) == msg  # again, from the file
    found.crc32 ^= 1
    reader.find(entry.id)
    with pytest.raises(QueueError, match="CRC-32"):
        reader.read_message(entry.id, found)

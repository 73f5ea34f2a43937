"""Queue delivery of a large message in bounded memory (issue 13, delivery path): a
50 MiB message is sent from its spool file to a real upstream (a separate process on
loopback) byte for byte, without the delivery process ever holding it in memory."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from smtpgate.delivery.upstream import UpstreamDelivery
from smtpgate.envelope import Envelope, Recipient
from smtpgate.queue.manager import QueueManager
from smtpgate.queue.outbound import RelayOutbound
from smtpgate.queue.store import QueueStore

SINK = Path(__file__).parent.parent / "delivery" / "raw_sink.py"


@pytest.fixture
def raw_sink(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    out = tmp_path / "sink"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(SINK), str(out)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline()), out
    finally:
        proc.kill()
        proc.wait()


def big_message(size: int) -> bytes:
    line = b".dotted line, the next one is not\r\nplain line of text 0123456789\r\n"
    head = b"Subject: 50 MiB through the queue\r\n\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return (head + body)[: size - 2] + b"\r\n"


def test_50mib_queued_message_streamed_from_spool(
    raw_sink: tuple[int, Path], tmp_path: Path
) -> None:
    port, out = raw_sink
    store = QueueStore(tmp_path / "spool", fsync=False)
    data = big_message(50 * 1024 * 1024)
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    store.enqueue(Envelope("a@example.org", {}, [Recipient("b@example.net")]), data)
    del data

    async def run() -> int:
        relay = UpstreamDelivery(f"smtp://127.0.0.1:{port}", timeout=30)
        manager = QueueManager(store, RelayOutbound(relay), scan_interval=0.05)
        tracemalloc.start()
        try:
            await manager.start()
            for _ in range(1200):
                if manager.delivered and not list(store.entries()):
                    break
                await asyncio.sleep(0.05)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await manager.stop()
        assert manager.delivered == 1
        return peak

    peak = asyncio.run(run())
    raw = out / "1.raw"
    for _ in range(500):
        if raw.exists():
            break
        time.sleep(0.02)
    assert raw.read_bytes() == expected
    # the whole message was never in Python memory: a few chunks at most
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB traced during delivery"

"""Sending DATA in bounded memory (issue 13, delivery path): :class:`DataEncoder` gives
aiosmtplib's exact encoding whatever the piece boundaries, and :class:`MessageFile`
messages (and large ``bytes``) reach a real upstream byte for byte, dot-stuffed across
chunk boundaries."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from smtpgate.delivery.outbound import DataEncoder
from smtpgate.delivery.upstream import UpstreamDelivery
from smtpgate.envelope import Envelope, Recipient
from smtpgate.message import DATA_CHUNK, MessageFile

SINK = Path(__file__).with_name("raw_sink.py")


def wire(message: bytes) -> bytes:
    """What aiosmtplib's ``data()`` sends after ``354`` (the reference encoding)."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


def encode_in_pieces(message: bytes, cuts: list[int]) -> bytes:
    enc = DataEncoder()
    out = []
    last = 0
    for c in [*sorted(cuts), len(message)]:
        out.append(enc.feed(message[last:c]))
        last = c
    out.append(enc.end())
    return b"".join(out)


@pytest.mark.parametrize("message", [
    b"", b".", b"\r", b"\n", b"\r\n", b".\r\n", b"a\r\n.\r\n.", b"..\r\n..",
    b"x\r", b"x\r\r\n.", b"\n.\n.", b"\r.\r.", b"body without newline",
])
def test_encoder_matches_aiosmtplib_edge_cases(message: bytes) -> None:
    for cut in range(len(message) + 1):
        assert encode_in_pieces(message, [cut]) == wire(message), (message, cut)


def test_encoder_matches_aiosmtplib_random() -> None:
    rnd = random.Random(13)
    alphabet = b"..\r\n\r\nab"
    for _ in range(3000):
        n = rnd.randrange(0, 40)
        message = bytes(rnd.choice(alphabet) for _ in range(n))
        cuts = [rnd.randrange(0, n + 1) for _ in range(rnd.randrange(0, 5))]
        assert encode_in_pieces(message, cuts) == wire(message), (message, cuts)


@pytest.fixture
def raw_sink(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    out = tmp_path / "sink"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(SINK), str(out)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield port, out
    finally:
        proc.kill()
        proc.wait()


def wait_raw(out: Path, n: int) -> bytes:
    path = out / f"{n}.raw"
    for _ in range(500):
        if path.exists():
            return path.read_bytes()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def big_message(size: int) -> bytes:
    """CRLF lines, many starting with '.', some '..', a '.' line, dots at every offset so
    that chunk boundaries fall before, on and after them."""
    parts = [b"Subject: big\r\n\r\n"]
    total = len(parts[0])
    i = 0
    while total < size:
        line = (b"." * (i % 3)) + b"line %d " % i + b"x" * (i % 97) + b"\r\n"
        if i % 1000 == 0:
            line = b".\r\n"
        parts.append(line)
        total += len(line)
        i += 1
    return b"".join(parts)[:size - 2] + b"\r\n"


def deliver(port: int, message: bytes | MessageFile) -> None:
    async def run() -> None:
        relay = UpstreamDelivery(f"smtp://127.0.0.1:{port}", timeout=30)
        try:
            env = Envelope("a@example.org", {}, [Recipient("b@example.net")])
            res = await relay.deliver_recipients(env, message)
            assert res["b@example.net"].code == 250, res
        finally:
            await relay.aclose()
    asyncio.run(run())


def test_50mib_message_file_byte_exact(raw_sink: tuple[int, Path], tmp_path: Path) -> None:
    port, out = raw_sink
    data = big_message(50 * 1024 * 1024)
    assert data.count(b"\r\n.") > 10000
    path = tmp_path / "msg"
    path.write_bytes(data)
    msg = MessageFile(os.open(path, os.O_RDONLY), len(data))
    try:
        deliver(port, msg)
        # a view: a new header in front, the file's first line skipped
        first = data.index(b"\r\n") + 2
        deliver(port, msg.view(b"X-New: 1\r\n", skip=first))
    finally:
        msg.close()
    assert wait_raw(out, 1) == wire(data)
    assert wait_raw(out, 2) == wire(b"X-New: 1\r\n" + data[first:])
    # the same as bytes (above DATA_CHUNK: sent in pieces too)
    deliver(port, data)
    assert wait_raw(out, 3) == wire(data)


class SmallChunks(MessageFile):
    """Chunks of 997 bytes, so that corpus messages cross chunk boundaries too."""

    def chunks(self, chunk_size: int = DATA_CHUNK) -> Iterator[bytes]:
        return super().chunks(997)


def test_corpus_messages_byte_exact(raw_sink: tuple[int, Path], tmp_path: Path) -> None:
    corpus = Path(os.environ.get("MAIL_CORPUS", "/work/shared/corpus"))
    files = sorted(p for p in corpus.glob("*.eml"))[:40]
    if not files:
        pytest.skip("no corpus")
    port, out = raw_sink
    n = 0
    for p in files:
        data = p.read_bytes()
        path = tmp_path / "m"
        path.write_bytes(data)
        msg = SmallChunks(os.open(path, os.O_RDONLY), len(data))
        try:
            deliver(port, msg)
        finally:
            msg.close()
        n += 1
        assert wait_raw(out, n) == wire(data), p.name

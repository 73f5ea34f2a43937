"""SMTP smuggling through smtpgate: a fake end-of-data inside a message must not split it.

Entry points: ``test_smuggling_*``. The message carries one of the non-standard
end-of-data sequences (``\\n.\\n``, ``\\r\\n.\\n``, ...) followed by a second, smuggled
transaction, then the real ``CRLF.CRLF``. Under either ``bare_line_endings`` policy at
most one message may reach the upstream (aiosmtpd capture, and Postfix's smtp-sink), and
never one made of the smuggled part. RFC 5321 §2.3.8 and §4.1.1.4; SEC Consult's
"SMTP smuggling" (CVE-2023-51764/51765/51766).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from smtpgate.app import Smtpgate

from .e2e_support import (
    RECIPIENT,
    SENDER,
    CaptureUpstream,
    RawClient,
    assert_one_received_then,
    free_port,
    running_gate,
    which,
)

VARIANTS = {
    "LF.LF": b"\n.\n",
    "CRLF.LF": b"\r\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.CR": b"\r\n.\r",
    "LF.CR": b"\n.\r",
}
POLICIES = ["reject", "normalize"]

REAL = b"From: <sender@example.org>\r\nSubject: real\r\n\r\nreal body"
SMUGGLED = (
    b"MAIL FROM:<evil@x>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"From: <ceo@example.com>\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)
_ANY_EOL = re.compile(rb"\r\n|\r|\n")


def smuggling_data(variant: bytes) -> tuple[bytes, bytes]:
    """(bytes written after 354 including the real ``.CRLF``, the message normalised).

    The message is everything before the final ``.CRLF``; under ``normalize`` it must
    arrive as one message with every bare CR/LF turned into CRLF. Only CRLF ends a line
    on the wire, so in ``CRLF.LF`` / ``CRLF.CR`` the dot starts a line that has more
    characters: it is a transparency dot and is removed (RFC 5321 §4.5.2).
    """
    message = REAL + variant + SMUGGLED
    unstuffed = message.replace(b"\r\n.", b"\r\n")
    return message + b".\r\n", _ANY_EOL.sub(b"\r\n", unstuffed)


def converse(port: int, variant: bytes, mode: str) -> list[tuple[int, str]]:
    """Run the attack; return every reply after DATA's 354 (the QUIT is pipelined)."""
    data, _ = smuggling_data(variant)
    with RawClient(port) as c:
        c.envelope()
        if mode == "one-write":
            c.send(data + b"QUIT\r\n")
        elif mode == "small-writes":
            c.send_chunked(data, [1, 2, 3, 5, 7], pause=0.0005)
            c.send(b"QUIT\r\n")
        else:
            raise AssertionError(mode)
        replies = []
        while True:
            try:
                replies.append(c.reply())
            except (ConnectionError, TimeoutError):
                break
            if replies[-1][0] == 221:
                break
    return replies


def split_writes(port: int, variant: bytes, cut: int) -> list[tuple[int, str]]:
    """Like :func:`converse` but with two writes, cut ``cut`` bytes into the variant."""
    data, _ = smuggling_data(variant)
    at = len(REAL) + cut
    with RawClient(port) as c:
        c.envelope()
        c.send(data[:at])
        time.sleep(0.02)
        c.send(data[at:] + b"QUIT\r\n")
        replies = [c.reply()]
        replies.append(c.reply())
    return replies


def check_replies(policy: str, replies: list[tuple[int, str]]) -> None:
    """One reply to the message, then 221: the smuggled commands were never executed."""
    assert [code for code, _ in replies][-1:] == [221], replies
    assert len(replies) == 2, f"extra replies mean smuggled commands ran: {replies}"
    code, text = replies[0]
    if policy == "reject":
        assert (code, text[:6]) == (550, "5.6.11"), replies
    else:
        assert code == 250, replies


# ---------------------------------------------------------------- aiosmtpd capture


@pytest.fixture(scope="module", params=POLICIES)
def gate(request: pytest.FixtureRequest, upstream: CaptureUpstream) -> Iterator[Smtpgate]:
    """smtpgate relaying to the capture, under each ``bare_line_endings`` policy."""
    with running_gate(relay_url=upstream.url, bare_line_endings=request.param) as app:
        yield app


def check_capture(policy: str, variant: bytes, upstream: CaptureUpstream) -> None:
    got = upstream.handler.take()
    assert len(got) <= 1, [g.mail_from for g in got]
    for g in got:
        assert g.mail_from == SENDER and g.rcpt_tos == [RECIPIENT]
        assert b"real body" in g.content
    if policy == "reject":
        assert got == []
    else:
        assert len(got) == 1
        _, normalized = smuggling_data(variant)
        assert_one_received_then(got[0].content, normalized)


@pytest.mark.parametrize("mode", ["one-write", "small-writes"])
@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_smuggling_capture(
    gate: Smtpgate, upstream: CaptureUpstream, variant: bytes, mode: str
) -> None:
    """At most one upstream message, never the smuggled one, however the bytes arrive."""
    policy = gate.config.server.bare_line_endings
    upstream.handler.take()
    check_replies(policy, converse(gate.port, variant, mode))
    check_capture(policy, variant, upstream)


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_smuggling_capture_split_inside_terminator(
    gate: Smtpgate, upstream: CaptureUpstream, variant: bytes
) -> None:
    """Two writes, cut at every position of the fake terminator (and just after it)."""
    policy = gate.config.server.bare_line_endings
    for cut in range(len(variant) + 1):
        upstream.handler.take()
        check_replies(policy, split_writes(gate.port, variant, cut))
        check_capture(policy, variant, upstream)


def test_smuggling_control_real_pipelined_second_message(
    gate: Smtpgate, upstream: CaptureUpstream
) -> None:
    """Positive control: a genuine CRLF.CRLF followed by a pipelined second transaction
    does give two messages, so the capture would notice a split."""
    upstream.handler.take()
    second = SMUGGLED.replace(b"evil@x", b"second@example.org")
    with RawClient(gate.port) as c:
        c.envelope()
        c.send(REAL + b"\r\n.\r\n" + second + b".\r\nQUIT\r\n")
        replies = [c.reply() for _ in range(5)]
    assert [r[0] for r in replies] == [250, 250, 250, 354, 250], replies
    got = upstream.handler.take()
    assert [g.mail_from for g in got] == [SENDER, "second@example.org"]
    assert got[1].rcpt_tos == ["victim@example.com"]


# ---------------------------------------------------------------- Postfix smtp-sink

SMTP_SINK = which("smtp-sink")


@dataclass
class Sink:
    """A running ``smtp-sink -d DIR/...``: one dump file per transaction it received."""

    port: int
    dump_dir: Path

    def clear(self) -> None:
        for p in self.dump_dir.iterdir():
            p.unlink()

    def dumps(self, expect: int, timeout: float = 5.0) -> list[str]:
        """Dump files' texts, waiting up to ``timeout`` s for ``expect`` of them, then
        a little longer for any unexpected extra one."""
        deadline = time.monotonic() + timeout
        while len(list(self.dump_dir.iterdir())) < expect and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        return [p.read_bytes().decode("utf-8", "replace") for p in sorted(self.dump_dir.iterdir())]


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    """Postfix's smtp-sink on a free loopback port; skipped when not installed."""
    if SMTP_SINK is None:
        pytest.skip("smtp-sink (Debian package postfix) not installed")
    dump_dir = Path(tempfile.mkdtemp(prefix="smtpgate-e2e-sink-"))
    dump_dir.chmod(0o777)  # smtp-sink writes as "nobody" when started as root
    port = free_port()
    cmd = [SMTP_SINK]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    cmd += ["-d", f"{dump_dir}/%H%M%S.", f"127.0.0.1:{port}", "100"]
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    errors.seek(0)
                    pytest.fail(f"smtp-sink did not start: {errors.read()!r}")
                time.sleep(0.05)
        yield Sink(port, dump_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        errors.close()
        shutil.rmtree(dump_dir, ignore_errors=True)


@pytest.fixture(scope="module", params=POLICIES)
def sink_gate(request: pytest.FixtureRequest, sink: Sink) -> Iterator[Smtpgate]:
    """smtpgate relaying to smtp-sink under each policy."""
    with running_gate(
        relay_url=f"smtp://127.0.0.1:{sink.port}", bare_line_endings=request.param
    ) as app:
        yield app


def _dump_body(dump: str) -> str:
    """The message part of an smtp-sink dump (after its own 3-line Received header)."""
    lines = dump.split("\n")
    i = next(n for n, line in enumerate(lines) if line.startswith("Received: from"))
    return "\n".join(lines[i + 3 :])


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_smuggling_smtp_sink(sink_gate: Smtpgate, sink: Sink, variant: bytes) -> None:
    """What a real MTA (Postfix smtp-sink) receives from smtpgate: one transaction from
    the real sender (normalize) or none (reject); never a transaction from evil@x."""
    policy = sink_gate.config.server.bare_line_endings
    sink.clear()
    check_replies(policy, converse(sink_gate.port, variant, "one-write"))
    dumps = sink.dumps(expect=0 if policy == "reject" else 1)
    assert all("X-Mail-Args: FROM:<evil@x>" not in d for d in dumps), dumps
    if policy == "reject":
        assert dumps == []
        return
    assert len(dumps) == 1, dumps
    dump = dumps[0]
    assert f"X-Mail-Args: <{SENDER}>" in dump or f"X-Mail-Args: FROM:<{SENDER}>" in dump, dump
    assert f"X-Rcpt-Args: <{RECIPIENT}>" in dump or f"TO:<{RECIPIENT}>" in dump, dump
    _, normalized = smuggling_data(variant)
    body = _dump_body(dump)
    # smtp-sink writes LF line ends and one empty line after the message.
    assert body.startswith("Received: from client.test"), body[:300]
    assert body.endswith(normalized.decode().replace("\r\n", "\n") + "\n"), body


def test_smuggling_smtp_sink_control(sink_gate: Smtpgate, sink: Sink) -> None:
    """Positive control: two genuine pipelined transactions give two smtp-sink dumps."""
    sink.clear()
    second = SMUGGLED.replace(b"evil@x", b"second@example.org")
    with RawClient(sink_gate.port) as c:
        c.envelope()
        c.send(REAL + b"\r\n.\r\n" + second + b".\r\nQUIT\r\n")
        replies = [c.reply() for _ in range(6)]
    assert [r[0] for r in replies] == [250, 250, 250, 354, 250, 221], replies
    dumps = sink.dumps(expect=2)
    assert len(dumps) == 2
    assert sum("second@example.org" in d.split("Received:")[0] for d in dumps) == 1

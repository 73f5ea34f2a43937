"""Pipelined queue delivery (RFC 2920): MAIL, RCPT and DATA in one write, replies in order.

The upstream is a real SMTP server on loopback, a small threaded one written here so
that what arrived in each read and every byte of the data can be checked; it advertises
PIPELINING, answers each command as it reads it (one write per reply), refuses the
recipients and senders it is told to, and answers DATA without an accepted recipient
with 554 (or, ``broken_354``, with 354 as a broken server would). Postfix's smtp-sink is
the second upstream (the benchmark's).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from smtpgate.delivery import UpstreamDelivery
from smtpgate.envelope import Envelope, Recipient
from smtpgate.message import DATA_CHUNK, MessageFile

from .conftest import CaptureHandler, Pki, StartUpstream, free_port

MESSAGE = (
    b"From: a@example.org\r\nTo: b@example.com\r\nSubject: dots\r\n\r\n"
    b".leading dot\r\n..two dots\r\n.\r\n. space\r\nend\r\n"
)
STUFFED = (
    b"From: a@example.org\r\nTo: b@example.com\r\nSubject: dots\r\n\r\n"
    b"..leading dot\r\n...two dots\r\n..\r\n.. space\r\nend\r\n.\r\n"
)


@dataclass
class PipeServer:
    """A PIPELINING SMTP server in a thread; records reads, commands and data."""

    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    refuse_mail: str | None = None
    broken_354: bool = False
    port: int = 0
    chunks: list[bytes] = field(default_factory=list)  # every read after EHLO
    commands: list[str] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)  # as on the wire, up to .CRLF
    sessions: int = 0

    def start(self) -> PipeServer:
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._srv.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            self.sessions += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"220 pipe.test ESMTP\r\n")
            buf = b""
            greeted = False
            mail_ok = False
            rcpts = 0
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                if greeted:
                    self.chunks.append(chunk)
                buf += chunk
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    verb = line[:4].upper()
                    self.commands.append(line.decode())
                    if verb == b"EHLO":
                        greeted = True
                        conn.sendall(b"250-pipe.test\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n"
                                     b"250 8BITMIME\r\n")
                    elif verb == b"MAIL":
                        if self.refuse_mail:
                            conn.sendall(self.refuse_mail.encode() + b"\r\n")
                        else:
                            mail_ok = True
                            conn.sendall(b"250 2.1.0 Ok\r\n")
                    elif verb == b"RCPT":
                        addr = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                        if not mail_ok:
                            conn.sendall(b"503 5.5.1 Error: need MAIL command\r\n")
                        elif addr in self.refuse_rcpt:
                            conn.sendall(self.refuse_rcpt[addr].encode() + b"\r\n")
                        else:
                            rcpts += 1
                            conn.sendall(b"250 2.1.5 Ok\r\n")
                    elif verb == b"DATA":
                        if not rcpts and not self.broken_354:
                            conn.sendall(b"554 5.5.1 Error: no valid recipients\r\n")
                            continue
                        conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        data = buf
                        while not (data == b".\r\n" or data.endswith(b"\r\n.\r\n")):
                            more = conn.recv(65536)
                            if not more:
                                return
                            data += more
                        buf = b""
                        self.data.append(data)
                        if rcpts:
                            conn.sendall(b"250 2.0.0 Ok: queued as PIPE1\r\n")
                        else:
                            conn.sendall(b"554 5.5.1 Error: no valid recipients\r\n")
                        mail_ok, rcpts = False, 0
                    elif verb == b"RSET":
                        mail_ok, rcpts = False, 0
                        conn.sendall(b"250 2.0.0 Ok\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        conn.sendall(b"502 5.5.2 Error: command not recognized\r\n")


@pytest.fixture
def pipe_server() -> Iterator[PipeServer]:
    srv = PipeServer().start()
    yield srv
    srv.stop()


def env(*rcpts: str, sender: str = "a@example.org") -> Envelope:
    return Envelope(sender, {}, [Recipient(r) for r in rcpts])


async def test_group_in_one_write_refused_rcpt_gets_its_reply(pipe_server: PipeServer) -> None:
    pipe_server.refuse_rcpt["no@example.com"] = "550 5.1.1 <no@example.com>: unknown user"
    relay = UpstreamDelivery(f"smtp://127.0.0.1:{pipe_server.port}", timeout=10)
    try:
        results = await relay.deliver_recipients(
            env("b@example.com", "no@example.com", "c@example.com"), MESSAGE)
    finally:
        await relay.aclose()
    assert results["b@example.com"].code == 250
    assert results["c@example.com"].code == 250
    assert "queued as PIPE1" in results["b@example.com"].text
    refused = results["no@example.com"]
    assert (refused.code, refused.enhanced) == (550, "5.1.1")
    assert "unknown user" in refused.text
    assert results.is_remote("no@example.com")
    # MAIL, the three RCPTs and DATA came in one read (one write): pipelined.
    assert pipe_server.chunks[0] == (
        b"MAIL FROM:<a@example.org> SIZE=%d\r\nRCPT TO:<b@example.com>\r\n"
        b"RCPT TO:<no@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n" % len(MESSAGE))
    assert pipe_server.data == [STUFFED]


async def test_refused_mail_gives_every_recipient_its_reply_and_connection_stays_usable(
    pipe_server: PipeServer,
) -> None:
    pipe_server.refuse_mail = "550 5.7.1 sender rejected"
    relay = UpstreamDelivery(f"smtp://127.0.0.1:{pipe_server.port}", timeout=10)
    try:
        results = await relay.deliver_recipients(env("b@example.com", "c@example.com"),
                                                 MESSAGE)
        assert {a: (r.code, r.enhanced) for a, r in results.items()} == {
            "b@example.com": (550, "5.7.1"), "c@example.com": (550, "5.7.1")}
        assert pipe_server.data == []
        assert pipe_server.chunks[0].startswith(b"MAIL FROM:<a@example.org>")
        assert pipe_server.chunks[0].endswith(b"RCPT TO:<c@example.com>\r\nDATA\r\n")
        assert pipe_server.commands[-1] == "RSET"
        # The 503s to RCPT and the 554 to DATA were read: the next transaction on the
        # same connection gets its own replies.
        pipe_server.refuse_mail = None
        again = await relay.deliver_recipients(env("d@example.com"), MESSAGE)
    finally:
        await relay.aclose()
    assert again["d@example.com"].code == 250
    assert pipe_server.data == [STUFFED]
    assert pipe_server.sessions == 1


async def test_every_rcpt_refused_after_354_ends_data_at_once(pipe_server: PipeServer) -> None:
    pipe_server.broken_354 = True
    pipe_server.refuse_rcpt["no@example.com"] = "550 5.1.1 unknown"
    pipe_server.refuse_rcpt["later@example.com"] = "450 4.2.0 try later"
    relay = UpstreamDelivery(f"smtp://127.0.0.1:{pipe_server.port}", timeout=10)
    try:
        results = await relay.deliver_recipients(env("no@example.com", "later@example.com"),
                                                 MESSAGE)
        assert (results["no@example.com"].code, results["later@example.com"].code) == (550, 450)
        assert pipe_server.data == [b".\r\n"]  # no message: only the end of data
        again = await relay.deliver_recipients(env("d@example.com"), MESSAGE)
    finally:
        await relay.aclose()
    assert again["d@example.com"].code == 250
    assert pipe_server.data == [b".\r\n", STUFFED]
    assert pipe_server.sessions == 1


async def test_long_message_from_file_streamed_after_pipelined_group(
    pipe_server: PipeServer, tmp_path: Path,
) -> None:
    body = b"".join(b".line %07d of a long message\r\n" % i for i in range(DATA_CHUNK // 16))
    path = tmp_path / "m"
    path.write_bytes(b"junk" + body)
    fd = os.open(path, os.O_RDONLY)
    msg = MessageFile(fd, len(body), offset=4)
    relay = UpstreamDelivery(f"smtp://127.0.0.1:{pipe_server.port}", timeout=10)
    try:
        results = await relay.deliver_recipients(env("b@example.com"), msg)
    finally:
        msg.close()
        await relay.aclose()
    assert results["b@example.com"].code == 250
    assert pipe_server.chunks[0].endswith(b"RCPT TO:<b@example.com>\r\nDATA\r\n")
    assert pipe_server.data == [body.replace(b"\r\n.", b"\r\n..").replace(b".line", b"..line", 1)
                                + b".\r\n"]


@pytest.mark.skipif(shutil.which("smtp-sink", path="/usr/sbin:/usr/bin") is None,
                    reason="Postfix smtp-sink not installed")
async def test_smtp_sink_takes_pipelined_transactions_on_one_connection() -> None:
    """Postfix's smtp-sink (it offers PIPELINING) as the upstream: two transactions on
    one connection, each dumped by the sink with its recipients and its text."""
    port = free_port()
    out = Path(tempfile.mkdtemp())
    out.chmod(0o777)
    user = ["-u", "nobody"] if os.getuid() == 0 else []
    sink = subprocess.Popen(
        [shutil.which("smtp-sink", path="/usr/sbin:/usr/bin") or "smtp-sink", *user,
         "-d", f"{out}/%M.", f"127.0.0.1:{port}", "10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        relay = UpstreamDelivery(f"smtp://127.0.0.1:{port}", timeout=10)
        try:
            first = await relay.deliver_recipients(env("b@example.com", "c@example.com"),
                                                   MESSAGE)
            second = await relay.deliver_recipients(env("d@example.com"), MESSAGE)
        finally:
            await relay.aclose()
        assert [r.code for r in first.values()] == [250, 250]
        assert second["d@example.com"].code == 250
        assert relay.connections_opened == 1
        dumps = []
        for _ in range(200):
            dumps = sorted(p.read_bytes() for p in out.iterdir())
            if len(dumps) == 2 and all(d.endswith(b"end\n\n") for d in dumps):
                break
            await asyncio.sleep(0.05)
        assert len(dumps) == 2
        text = MESSAGE.replace(b"\r\n", b"\n")
        assert all(text in d for d in dumps)
        rcpts = sorted(b" ".join(sorted(line for line in d.split(b"\n")
                                        if line.startswith(b"X-Rcpt-Args"))) for d in dumps)
        assert rcpts == sorted([b"X-Rcpt-Args: <b@example.com> X-Rcpt-Args: <c@example.com>",
                                b"X-Rcpt-Args: <d@example.com>"])
    finally:
        sink.terminate()
        sink.wait(5)
        shutil.rmtree(out, ignore_errors=True)


class PipeliningCapture(CaptureHandler):
    """aiosmtpd's capture handler, advertising PIPELINING (aiosmtpd reads the commands
    of a group one line at a time and answers each with its own write)."""

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        responses.insert(-1, "250-PIPELINING")
        return responses


async def test_pipelined_over_starttls_to_aiosmtpd(start_upstream: StartUpstream,
                                                   pki: Pki) -> None:
    handler = PipeliningCapture(refuse_rcpt={"no@example.com": "550 5.1.1 no such user"})
    up = start_upstream(handler=handler, tls_context=pki.server_context,
                        require_starttls=True)
    relay = UpstreamDelivery(f"smtp+starttls://{up.hostport}", cafile=pki.cafile, timeout=10)
    try:
        results = await relay.deliver_recipients(env("b@example.com", "no@example.com"),
                                                 MESSAGE)
        again = await relay.deliver_recipients(env("c@example.com"), MESSAGE)
    finally:
        await relay.aclose()
    assert (results["b@example.com"].code, results["no@example.com"].code) == (250, 550)
    assert results["no@example.com"].enhanced == "5.1.1"
    assert again["c@example.com"].code == 250
    assert relay.connections_opened == 1
    assert [(m.rcpt_tos, m.content, m.tls) for m in handler.messages] == [
        (["b@example.com"], MESSAGE, True), (["c@example.com"], MESSAGE, True)]

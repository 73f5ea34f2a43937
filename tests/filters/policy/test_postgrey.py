"""The policy plugin against a real postgrey (Debian package), started by the test on a
free loopback port with its own database directory, whitelists and a 2-second delay:
the first attempt is greylisted (450, postgrey's DEFER_IF_PERMIT), the retry after the
delay is accepted and the message carries postgrey's X-Greylist header (PREPEND)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Capture

from .conftest import free_port

POSTGREY = shutil.which("postgrey") or "/usr/sbin/postgrey"
DELAY = 2
MSG = b"From: ann@example.org\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def _wait_port(port: int, proc: subprocess.Popen[bytes], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postgrey exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("postgrey did not start listening")


@pytest.fixture
def postgrey(tmp_path: Path) -> Iterator[int]:
    if not Path(POSTGREY).exists():
        pytest.skip("postgrey is not installed")
    db = tmp_path / "postgrey"
    db.mkdir()
    (db / "whitelist_clients").write_text("")
    (db / "whitelist_recipients").write_text("")
    port = free_port()
    log = open(tmp_path / "postgrey.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={db}", f"--delay={DELAY}",
         f"--pidfile={db / 'pid'}", "--user=root", "--group=root",
         f"--whitelist-clients={db / 'whitelist_clients'}",
         f"--whitelist-recipients={db / 'whitelist_recipients'}",
         "--auto-whitelist-clients=0", "--hostname=greylist.test"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_greylisted_then_accepted(run_app, raw, capture: Capture, postgrey: int) -> None:
    app = run_app({"plugin": [{"use": "policy", "address": f"127.0.0.1:{postgrey}",
                               "timeout": 20}]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"250 2.1.0 Sender OK"
    first = c.cmd("RCPT TO:<bob@example.com>")
    # postgrey answers "DEFER_IF_PERMIT 4.2.0 Greylisted, see ...": its code is kept
    assert first == (b"450 4.2.0 <bob@example.com>: Recipient address rejected: Greylisted, "
                     b"see http://postgrey.schweikert.ch/help/example.com.html")
    c.cmd("RSET")
    time.sleep(DELAY + 1.5)  # postgrey's own delay, not a timing assertion
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"250 2.1.0 Sender OK"
    assert c.cmd("RCPT TO:<bob@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("DATA").startswith(b"354")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"250 ")
    body = Capture.strip_received(capture.messages[0][1])
    header, _, rest = body.partition(b"\r\n")
    assert header.startswith(b"X-Greylist: delayed ")
    assert b"by SQLgrey" not in header and b"greylist.test" in body.split(b"\r\nFrom:")[0]
    assert rest.endswith(MSG)

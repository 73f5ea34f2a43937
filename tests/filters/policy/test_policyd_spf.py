"""The policy plugin against the real postfix-policyd-spf-python (``/usr/bin/policyd-spf``).

policyd-spf speaks the policy protocol on stdin/stdout (Postfix runs it under spawn(8));
here a small acceptor on a free loopback port runs one policyd-spf per connection, as
spawn does, with the test's own configuration file. Its DNS goes to a test DNS server on
loopback only: policyd-spf's SPF library (pyspf) uses pydns when dnspython is not
importable, and pydns takes its name servers from ``DNS.defaults`` after
``DNS.DiscoverNameServers()`` read /etc/resolv.conf; a wrapper makes dnspython
unimportable, turns that discovery into a no-op and sets ``DNS.defaults`` to the test
server's address and port before running the unchanged /usr/bin/policyd-spf.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.delivery.dns_server import DnsServer
from tests.support import Capture

POLICYD_SPF = Path("/usr/bin/policyd-spf")
SYSTEM_PYTHON = Path("/usr/bin/python3")
MSG = b"From: ann@example.org\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nbody\r\n"

ZONE = {
    ("example.org", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
    ("bad.example", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"'],
    ("soft.example", "TXT"): ['"v=spf1 ~all"'],
}

WRAPPER = '''\
import runpy
import sys

sys.modules["dns"] = None          # pyspf falls back to pydns, configured below
import DNS                          # noqa: E402

DNS.DiscoverNameServers = lambda: None   # never read /etc/resolv.conf
DNS.defaults["server"] = ["127.0.0.1"]
DNS.defaults["port"] = {port}
sys.argv = ["{policyd}", "{config}"]
runpy.run_path("{policyd}", run_name="__main__")
'''

CONFIG = """\
debugLevel = 1
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
skip_addresses = 192.0.2.255/32
Lookup_Time = 10
Authserv_Id = mx.test
"""


class Spawner:
    """A loopback TCP acceptor that runs ``argv`` per connection with the connection
    as its stdin/stdout (Postfix spawn(8)), plus the test DNS server, in one thread."""

    def __init__(self, argv_for_dns_port: Callable[[int], list[str]]) -> None:
        self.make_argv = argv_for_dns_port
        self.port = 0
        self.dns: DnsServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.procs: list[asyncio.subprocess.Process] = []

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(Exception):
            dst.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.dns is not None
        proc = await asyncio.create_subprocess_exec(
            *self.make_argv(self.dns.port), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        await asyncio.gather(self._pump(reader, proc.stdin), self._pump(proc.stdout, writer))
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    def start(self) -> Spawner:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop

            async def setup() -> None:
                self.dns = DnsServer(ZONE, zone="example")
                await self.dns.start()
                server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
                self.port = server.sockets[0].getsockname()[1]
                ready.set()

            loop.run_until_complete(setup())
            loop.run_forever()
            loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    async def _shutdown(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self.dns is not None:
            self.dns.stop()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def stop(self) -> None:
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not None:
            self.thread.join(10)


@pytest.fixture
def policyd_spf(tmp_path: Path) -> Iterator[Spawner]:
    if not POLICYD_SPF.exists() or not SYSTEM_PYTHON.exists():
        pytest.skip("postfix-policyd-spf-python is not installed")
    config = tmp_path / "policyd-spf.conf"
    config.write_text(CONFIG)

    def argv(dns_port: int) -> list[str]:
        wrapper = tmp_path / "run_policyd_spf.py"
        wrapper.write_text(WRAPPER.format(port=dns_port, policyd=POLICYD_SPF, config=config))
        return [str(SYSTEM_PYTHON), str(wrapper)]

    spawner = Spawner(argv).start()
    yield spawner
    spawner.stop()


def test_spf_pass_prepends_received_spf(run_app, raw, capture: Capture,
                                        policyd_spf: Spawner) -> None:
    app = run_app({"plugin": [{"use": "policy", "address": f"127.0.0.1:{policyd_spf.port}",
                               "timeout": 30}]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"250 2.1.0 Sender OK"
    assert c.cmd("RCPT TO:<bob@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("DATA").startswith(b"354")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"250 ")
    body = Capture.strip_received(capture.messages[0][1])
    first = body.replace(b"\r\n ", b" ")
    assert first.startswith(b"Received-SPF: Pass (mailfrom) identity=mailfrom; "
                            b"client-ip=127.0.0.1; helo=client.test; "
                            b"envelope-from=ann@example.org;"), body[:300]
    assert body.endswith(MSG)
    assert policyd_spf.dns is not None
    assert ("example.org", "TXT") in policyd_spf.dns.queries


def test_spf_fail_rejected_with_its_code(run_app, raw, capture: Capture,
                                         policyd_spf: Spawner) -> None:
    app = run_app({"plugin": [{"use": "policy", "address": f"127.0.0.1:{policyd_spf.port}",
                               "timeout": 30}]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<spam@bad.example>") == b"250 2.1.0 Sender OK"
    reply = c.cmd("RCPT TO:<bob@example.com>")
    assert reply.startswith(b"550 5.7.23 <bob@example.com>: Recipient address rejected: "
                            b"Message rejected due to: SPF fail - not authorized."), reply
    # softfail: accepted with a Received-SPF header saying so, on the same connection
    c.cmd("RSET")
    assert c.cmd("MAIL FROM:<x@soft.example>") == b"250 2.1.0 Sender OK"
    assert c.cmd("RCPT TO:<bob@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("DATA").startswith(b"354")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"250 ")
    assert Capture.strip_received(capture.messages[0][1]).startswith(b"Received-SPF: Softfail")
    assert len(policyd_spf.procs) == 1  # one policyd-spf process served every request

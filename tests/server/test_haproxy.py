"""smtpgate behind a real HAProxy (``mode tcp``, ``send-proxy`` / ``send-proxy-v2``).

The client connects to HAProxy from 127.0.0.3, HAProxy connects to smtpgate from
127.0.0.2 (``source``), so the session must report 127.0.0.3, never 127.0.0.2.
Skipped when the ``haproxy`` binary is missing (Debian package ``haproxy``).
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from smtpgate.app import Smtpgate
from smtpgate.envelope import SessionInfo
from smtpgate.server.proxy_protocol import parse_proxy_header
from tests.support import Capture

HAPROXY = shutil.which("haproxy")
CLIENT_IP = "127.0.0.3"  # the real client, as HAProxy sees it
PROXY_IP = "127.0.0.2"  # HAProxy's source address towards smtpgate
STRANGER_IP = "127.0.0.4"  # an untrusted direct peer
MSG = b"From: a@example.org\r\nTo: b@remote.example\r\nSubject: via haproxy\r\n\r\nhello\r\n"

# server-line options per mode; "v2-crc32c" also makes HAProxy add the CRC32C TLV (§2.2.3)
MODES = {
    "v1": "send-proxy",
    "v2": "send-proxy-v2",
    "v2-crc32c": "send-proxy-v2 proxy-v2-options crc32c",
}

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Whether some socket listens on 127.0.0.1:port, without connecting to it (a probe
    connection would travel through HAProxy to the backend and disturb the test)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            return any(
                parts[1] == want and parts[3] == "0A"  # 0A = TCP_LISTEN
                for parts in (line.split() for line in f.readlines()[1:])
            )
    except OSError:  # no procfs: fall back to the TCP stack's answer
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited {proc.returncode}: {log.read_text()[-2000:]}")
        if listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"haproxy did not listen on {port}: {log.read_text()[-2000:]}")


@dataclass
class Haproxy:
    port: int
    proc: subprocess.Popen[bytes]


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[int, str], Haproxy]]:
    """``haproxy(backend_port, mode)`` starts HAProxy in front of 127.0.0.1:backend_port."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(backend_port: int, mode: str) -> Haproxy:
        assert HAPROXY is not None
        for attempt in range(3):
            port = free_port()
            cfg = tmp_path / f"haproxy-{port}.cfg"
            log = tmp_path / f"haproxy-{port}.log"
            cfg.write_text(
                "global\n"
                f"    pidfile {tmp_path}/haproxy-{port}.pid\n"
                "    nbthread 1\n"
                "    maxconn 64\n"
                "defaults\n"
                "    mode tcp\n"
                "    timeout connect 5s\n"
                "    timeout client 30s\n"
                "    timeout server 30s\n"
                "frontend smtp_in\n"
                f"    bind 127.0.0.1:{port}\n"
                "    default_backend smtpgate\n"
                "backend smtpgate\n"
                f"    server gate 127.0.0.1:{backend_port} {MODES[mode]} source {PROXY_IP}\n"
            )
            with log.open("wb") as out:
                proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)],
                                        stdout=out, stderr=subprocess.STDOUT)
            procs.append(proc)
            try:
                wait_for_port(port, proc, log)
            except RuntimeError:
                if attempt == 2 or "bind" not in log.read_text().lower():
                    raise
                continue  # lost the race for the free port: try another one
            return Haproxy(port, proc)
        raise AssertionError("unreachable")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def gate(tmp_path: Path, loop_kind: str) -> Iterator[Callable[..., Smtpgate]]:
    """``gate(local_networks=[...], trusted=[...])``: smtpgate with a PROXY listener.

    The PROXY listener is the app's last address; ``server.listen`` (first) is a plain one.
    """
    apps: list[Smtpgate] = []

    def start(*, local_networks: list[str], trusted: list[str] | None = None,
              deliver: Any = None) -> Smtpgate:
        app = Smtpgate(
            {
                "server": {"hostname": "mx.test", "listen": ["127.0.0.1:0"],
                           "use_uvloop": loop_kind == "uvloop"},
                "maildir": {"path": str(tmp_path / "mail")},
                "relay": {"local_networks": local_networks, "relay_domains": ["example.com"]},
                "listener": [{
                    "address": "127.0.0.1:0",
                    "protocol": "smtp",
                    "tls": "none",
                    "require_auth": False,
                    "proxy_protocol": True,
                    "trusted_proxies": [PROXY_IP] if trusted is None else trusted,
                }],
            },
            deliver=deliver,
        )
        app.start_thread()
        apps.append(app)
        assert len(app.addresses) == 2, app.addresses
        return app

    yield start
    for app in apps:
        app.stop_thread(timeout=2)


def proxy_port(app: Smtpgate) -> int:
    return app.addresses[-1][1]


def seen_sessions(app: Smtpgate) -> list[SessionInfo]:
    seen: list[SessionInfo] = []
    app.hooks.register("connect", lambda session: seen.append(session))
    return seen


def client(port: int, source: str = CLIENT_IP) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10,
                        source_address=(source, 0))


def assert_closed_without_greeting(sock: socket.socket) -> None:
    """The server closes without sending a byte (no 220, no error reply)."""
    sock.settimeout(5)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    assert got == b""


# ------------------------------------------------------------------ HAProxy's own bytes


@pytest.mark.parametrize("mode", list(MODES))
def test_parser_accepts_what_haproxy_sends(haproxy, mode: str) -> None:
    """A plain socket as HAProxy's backend: parse the exact header HAProxy writes."""
    with socket.socket() as backend:
        backend.bind(("127.0.0.1", 0))
        backend.listen(1)
        hp = haproxy(backend.getsockname()[1], mode)
        with socket.create_connection(("127.0.0.1", hp.port), timeout=10,
                                      source_address=(CLIENT_IP, 0)) as c:
            client_port = c.getsockname()[1]
            backend.settimeout(10)
            conn, peer = backend.accept()
            with conn:
                assert peer[0] == PROXY_IP
                conn.settimeout(10)
                data = b""
                result = None
                while result is None:
                    chunk = conn.recv(4096)
                    assert chunk, f"closed after {data!r}"
                    data += chunk
                    result = parse_proxy_header(data)
                c.sendall(b"EHLO after.header\r\n")
                rest = data[result[1]:]
                while b"\r\n" not in rest:
                    chunk = conn.recv(4096)
                    assert chunk, f"closed after {rest!r}"
                    rest += chunk
    info, used = result
    assert info.version == (1 if mode == "v1" else 2)
    assert info.command == "PROXY"
    assert info.source == (CLIENT_IP, client_port)
    assert info.destination == ("127.0.0.1", hp.port)
    assert rest == b"EHLO after.header\r\n"  # nothing of the header leaks into SMTP
    if mode == "v2-crc32c":
        assert 0x03 in info.tlvs and len(info.tlvs[0x03]) == 4
    if mode == "v1":
        assert data[:used] == (
            f"PROXY TCP4 {CLIENT_IP} 127.0.0.1 {client_port} {hp.port}\r\n".encode()
        )


# ------------------------------------------------------------------ smtpgate behind HAProxy


@pytest.mark.parametrize("mode", list(MODES))
def test_session_sees_the_client_haproxy_reports(gate, haproxy, mode: str) -> None:
    capture = Capture()
    app = gate(local_networks=[f"{CLIENT_IP}/32"], deliver=capture)
    seen = seen_sessions(app)
    hp = haproxy(proxy_port(app), mode)
    with client(hp.port) as s:
        client_port = s.sock.getsockname()[1]
        code, banner = s.ehlo()
        assert code == 250
        s.mail("a@example.org")
        assert s.rcpt("b@remote.example")[0] == 250  # relaying: allowed for 127.0.0.3
        assert s.data(MSG)[0] == 250
        s.quit()
    assert len(capture.messages) == 1
    env, message = capture.messages[0]
    assert env.recipients == ["b@remote.example"]
    received = message.split(b"\r\n\r\n", 1)[0].split(b"\r\nFrom:", 1)[0]
    assert received.startswith(b"Received: from client.test (unknown [127.0.0.3])"), received
    assert PROXY_IP.encode() not in message
    assert Capture.strip_received(message) == MSG
    sessions = [x for x in seen if x.peer_ip == CLIENT_IP]
    assert len(sessions) == 1, [(x.peer_ip, x.peer_port) for x in seen]
    session = sessions[0]
    assert session.peer_port == client_port
    assert (session.local_ip, session.local_port) == ("127.0.0.1", hp.port)
    assert all(x.peer_ip != PROXY_IP for x in seen)


@pytest.mark.parametrize("mode", list(MODES))
def test_relay_control_uses_the_reported_address(gate, haproxy, mode: str) -> None:
    """local_networks lists only HAProxy's own address: the real client may not relay."""
    capture = Capture()
    app = gate(local_networks=[f"{PROXY_IP}/32"], deliver=capture)
    hp = haproxy(proxy_port(app), mode)
    with client(hp.port) as s:
        s.ehlo()
        s.mail("a@example.org")
        code, text = s.rcpt("b@remote.example")
        assert (code, text) == (550, b"5.7.1 Relaying denied")
        assert s.rcpt("b@example.com")[0] == 250  # a relay domain is still accepted
        assert s.data(MSG)[0] == 250
        s.quit()
    assert [env.recipients for env, _ in capture.messages] == [["b@example.com"]]


FORGED = {
    "v1": f"PROXY TCP4 {CLIENT_IP} 127.0.0.1 4444 25\r\n".encode(),
    "v2": (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton(CLIENT_IP)
           + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 4444, 25)),
}


@pytest.mark.parametrize("version", list(FORGED))
def test_forged_header_from_untrusted_peer_is_refused(gate, version: str) -> None:
    capture = Capture()
    app = gate(local_networks=[f"{CLIENT_IP}/32"], deliver=capture)
    seen = seen_sessions(app)
    dialogue = (FORGED[version] + b"EHLO forged.test\r\nMAIL FROM:<a@example.org>\r\n"
                b"RCPT TO:<b@remote.example>\r\nDATA\r\n" + MSG + b".\r\nQUIT\r\n")
    with socket.create_connection(("127.0.0.1", proxy_port(app)), timeout=10,
                                  source_address=(STRANGER_IP, 0)) as sock:
        try:
            sock.sendall(dialogue)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert_closed_without_greeting(sock)
    time.sleep(0.2)
    assert capture.messages == []
    assert seen == []


@pytest.mark.parametrize("source", [PROXY_IP, STRANGER_IP])
def test_plain_smtp_on_a_proxy_listener_is_closed(gate, source: str) -> None:
    """Even the trusted proxy's address must send a header: no guessing (spec §2)."""
    capture = Capture()
    app = gate(local_networks=["127.0.0.0/8"], deliver=capture)
    seen = seen_sessions(app)
    with socket.create_connection(("127.0.0.1", proxy_port(app)), timeout=10,
                                  source_address=(source, 0)) as sock:
        try:
            sock.sendall(b"EHLO plain.test\r\nMAIL FROM:<a@example.org>\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert_closed_without_greeting(sock)
    assert capture.messages == []
    assert seen == []


def test_no_greeting_before_the_header(gate) -> None:
    """The receiver must not speak before a complete header (spec §2): SMTP server-first."""
    app = gate(local_networks=["127.0.0.0/8"])
    with socket.create_connection(("127.0.0.1", proxy_port(app)), timeout=10,
                                  source_address=(PROXY_IP, 0)) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.3 127.0.0.1 5000 ")  # incomplete
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.settimeout(10)
        sock.sendall(b"25\r\n")
        assert sock.recv(4096).startswith(b"220 ")


@pytest.mark.parametrize("header", [
    b"PROXY UNKNOWN\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00",  # v2 LOCAL (health check)
], ids=["v1-unknown", "v2-local"])
def test_local_and_unknown_use_the_real_peer(gate, header: bytes) -> None:
    capture = Capture()
    app = gate(local_networks=[f"{PROXY_IP}/32"], deliver=capture)
    seen = seen_sessions(app)
    with socket.create_connection(("127.0.0.1", proxy_port(app)), timeout=10,
                                  source_address=(PROXY_IP, 0)) as sock:
        sock.sendall(header)
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        sock.sendall(b"HELO hc.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@remote.example>\r\n")
        assert f.readline().startswith(b"250 ")
        assert f.readline().startswith(b"250 ")
        assert f.readline().startswith(b"250 ")  # relaying allowed: the peer is 127.0.0.2
        sock.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"221 ")
    assert [s.peer_ip for s in seen] == [PROXY_IP]


def test_plain_listener_is_unaffected(gate) -> None:
    """``server.listen`` (no proxy_protocol) still speaks SMTP at once."""
    capture = Capture()
    app = gate(local_networks=["127.0.0.0/8"], deliver=capture)
    with client(app.addresses[0][1]) as s:
        s.ehlo()
        s.sendmail("a@example.org", ["b@remote.example"], MSG)
    assert len(capture.messages) == 1
    assert b"[127.0.0.3]" in capture.messages[0][1].split(b"\r\n", 2)[0]

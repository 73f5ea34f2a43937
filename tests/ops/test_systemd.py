"""Deployment (issue 12, "Deployment files"): the sd_notify protocol spoken by a real
``smtpgate serve`` subprocess to a real unix datagram socket given as ``$NOTIFY_SOCKET``
(a path and an abstract ``@name``), and the systemd unit contrib/systemd/smtpgate.service
(``systemd-analyze verify`` when systemd is installed).

The server runs under each event loop (``[server] use_uvloop`` false / true).
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgate.cli import build_parser
from smtpgate.sdnotify import notify

from ..support import free_port

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "systemd" / "smtpgate.service"
SMTPGATE = [sys.executable, "-m", "smtpgate"]
#: A bound on waiting for a datagram (the test fails, it does not measure time).
WAIT = 60.0




def datagram_socket(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(WAIT)
    return sock


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def write_config(tmp: Path, port: int, loop: str) -> Path:
    conf = tmp / "smtpgate.toml"
    conf.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
        f'use_uvloop = {"true" if loop == "uvloop" else "false"}\n'
        f'[maildir]\npath = "{tmp / "mail"}"\n'
    )
    return conf


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return str(request.param)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        yield Path(d)


def run_serve_until_stopping(conf: Path, notify_socket: str, sock: socket.socket,
                             port: int) -> tuple[dict[str, str], dict[str, str], int, str]:
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket}
    proc = subprocess.Popen([*SMTPGATE, "serve", "-c", str(conf)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = fields(sock.recv(4096))
        # READY=1 comes after the listener is open: connecting now gets the greeting.
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
            banner = c.makefile("rb").readline().decode()
        proc.send_signal(signal.SIGTERM)
        stopping = fields(sock.recv(4096))
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert banner.startswith("220 "), banner
    return ready, stopping, proc.returncode, err.decode()


def test_ready_and_stopping_on_a_path_socket(short_tmp: Path, loop: str) -> None:
    port = free_port()
    conf = write_config(short_tmp, port, loop)
    path = str(short_tmp / "notify")
    with datagram_socket(path) as sock:
        ready, stopping, code, err = run_serve_until_stopping(conf, path, sock, port)
    assert ready["READY"] == "1"
    assert ready["STATUS"] == f"listening on 127.0.0.1:{port}"
    assert int(ready["MAINPID"]) > 0
    assert stopping == {"STOPPING": "1", "STATUS": "shutting down"}
    assert code == 0, err
    assert "Traceback" not in err


def test_ready_on_an_abstract_socket(short_tmp: Path, loop: str) -> None:
    port = free_port()
    conf = write_config(short_tmp, port, loop)
    name = f"smtpgate-test-{os.getpid()}-{port}"
    with datagram_socket(b"\0" + name.encode()) as sock:
        ready, stopping, code, err = run_serve_until_stopping(conf, "@" + name, sock, port)
    assert ready["READY"] == "1" and stopping["STOPPING"] == "1"
    assert code == 0, err


def test_notify_without_or_with_a_dead_socket_never_fails(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "nobody-listens"))
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert notify("READY=1") is False
    path = short_tmp / "n"
    with datagram_socket(str(path)) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("STATUS=two\nlines", "READY=1") is True
        assert sock.recv(4096) == b"STATUS=two lines\nREADY=1"


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_file_is_type_notify_and_hardened() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for key, value in {
        "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
        "ProtectHome": "yes", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "ReadWritePaths": "/var/lib/smtpgate /var/log/smtpgate",
    }.items():
        assert service[key] == value, key
    assert "SystemCallFilter=@system-service" in UNIT.read_text()
    # the commands it runs are commands this smtpgate has
    for key in ("ExecStart", "ExecStartPre"):
        argv = shlex.split(service[key])
        args = build_parser().parse_args(argv[1:])
        assert args.config == "/etc/smtpgate/smtpgate.toml"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    smtpgate = Path(sys.executable).with_name("smtpgate")
    if not smtpgate.exists():
        pytest.skip("no smtpgate console script next to the interpreter")
    unit = tmp_path / "smtpgate.service"
    unit.write_text(UNIT.read_text().replace("/opt/smtpgate/.venv/bin/smtpgate", str(smtpgate)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "smtpgate.service" not in out.stderr, out.stderr
    # it does catch mistakes: a misspelt option is reported
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    bad = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=120)
    assert "ProtectHomes" in bad.stderr

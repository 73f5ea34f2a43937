"""``smtpgate serve`` as a process (issue 8, findings 10 and 18): SIGHUP reloads the
configuration gracefully, an invalid new configuration keeps the old one, and a listener
that cannot bind ends the process at once with one line and exit code 1."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SMTPGATE = [sys.executable, "-m", "smtpgate"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(path: Path, port: int, mail: Path, greeting: str, extra: str = "") -> None:
    path.write_text(
        "[server]\n"
        'hostname = "mx.test"\n'
        f'listen = ["127.0.0.1:{port}"]\n'
        f'greeting = "{greeting}"\n'
        f"{extra}"
        "[maildir]\n"
        f'path = "{mail}"\n'
    )


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            data += chunk
        s.sendall(b"QUIT\r\n")
        return data


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("not listening:\n" + log.read_text())


def _wait_log(log: Path, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{log.read_text()}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int, Path]]:
    port = _free_port()
    config = tmp_path / "smtpgate.toml"
    _config(config, port, tmp_path / "mail", "%H first banner")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*SMTPGATE, "serve", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_listening(proc, port, log)
        yield proc, config, port, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def test_sighup_reloads_and_session_in_flight_completes(
    served: tuple[subprocess.Popen[bytes], Path, int, Path], tmp_path: Path
) -> None:
    proc, config, port, log = served
    assert b"first banner" in _banner(port)
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo("inflight.test")
    assert client.mail("a@client.test")[0] == 250
    assert client.rcpt("b@example.com")[0] == 250
    # new banner, fewer recipients allowed: new sessions only
    _config(config, port, tmp_path / "mail", "%H second banner", "max_recipients = 1\n")
    proc.send_signal(signal.SIGHUP)
    _wait_log(log, "configuration reloaded")
    assert proc.poll() is None
    # the session in flight keeps its settings (max_recipients 100) and completes
    assert client.rcpt("c@example.com")[0] == 250
    code, _ = client.data(b"Subject: in flight\r\n\r\nbody\r\n")
    assert code == 250
    client.quit()
    assert len(os.listdir(tmp_path / "mail" / "new")) == 1
    assert b"second banner" in _banner(port)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as fresh:
        fresh.ehlo("new.test")
        fresh.mail("a@client.test")
        assert fresh.rcpt("b@example.com")[0] == 250
        assert fresh.rcpt("c@example.com")[0] == 452  # the reloaded limit
    assert "WARNING" not in log.read_text()


def test_sighup_with_invalid_config_keeps_the_old_one(
    served: tuple[subprocess.Popen[bytes], Path, int, Path]
) -> None:
    proc, config, port, log = served
    good = config.read_text()
    config.write_text(good.replace('greeting = "%H first banner"',
                                   'greeting = "%H broken"\nno_such_key = 1'))
    proc.send_signal(signal.SIGHUP)
    text = _wait_log(log, "reload failed, keeping the running configuration")
    assert "server.no_such_key" in text
    assert proc.poll() is None
    assert b"first banner" in _banner(port)


def test_sighup_restart_only_setting_is_logged(
    served: tuple[subprocess.Popen[bytes], Path, int, Path], tmp_path: Path
) -> None:
    proc, config, port, log = served
    other = _free_port()
    _config(config, other, tmp_path / "mail", "%H first banner")
    proc.send_signal(signal.SIGHUP)
    _wait_log(log, "server.listen changed; it takes effect after a restart")
    assert proc.poll() is None
    assert b"first banner" in _banner(port)  # still on the old address


@pytest.mark.parametrize("mode", ["maildir", "queue"])
def test_port_in_use_exits_at_once(tmp_path: Path, mode: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = tmp_path / "smtpgate.toml"
    extra = ""
    _config(config, port, tmp_path / "mail", "%H banner", extra)
    if mode == "queue":
        config.write_text(config.read_text() + "[relay]\nurl = \"smtp://127.0.0.1:9\"\n"
                          f"[queue]\npath = \"{tmp_path / 'spool'}\"\nmin_free_space = 0\n")
    started = time.monotonic()
    try:
        out = subprocess.run([*SMTPGATE, "serve", "-c", str(config)], capture_output=True,
                             timeout=60)
    finally:
        holder.close()
    elapsed = time.monotonic() - started
    assert out.returncode == 1
    err = out.stderr.decode()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("smtpgate:")]
    assert len(lines) == 1, err
    assert "cannot listen" in lines[0] and str(port) in lines[0]
    assert "address already in use" in lines[0].lower()
    assert elapsed < 15, f"took {elapsed:.1f}s"
    if mode == "queue":  # the spool lock was released: a new server can own it
        from smtpgate.queue.store import QueueStore

        QueueStore(tmp_path / "spool").acquire_owner().release()

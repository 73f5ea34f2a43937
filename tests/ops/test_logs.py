"""Logs (issue 12, "Logs" and "send log"): JSON lines and text key=value lines carry the
fields, a rejection at RCPT by a plugin is logged at INFO with the reply, the log file
rolls by size keeping ``max_backups``, ``smtpgate serve`` reopens (or rolls) its file on
SIGUSR1 and SIGHUP, and the send log has one line per relayed message (proxy mode; the
queue mode's send log is in test_metrics.py). Real SMTP clients over loopback; servers in
their own thread under each event loop (``run_app``) or as a ``smtpgate serve`` process."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from smtpgate.app import Smtpgate
from smtpgate.config import LogConfig, config_from_mapping
from smtpgate.hooks import Stage
from smtpgate.logs import (
    Event,
    RollingFileHandler,
    TextFormatter,
    format_value,
    reopen_logs,
    setup_logging,
)
from smtpgate.reply import Reply

from ..support import Capture, free_port, wait_for

MSG = (b"From: ann@example.org\r\nTo: bob@example.com\r\nSubject: logs\r\n"
       b"Message-ID: <logs-1@example.org>\r\n\r\nHello.\r\n")
REFUSAL = Reply(554, "5.7.1", "<bad@example.com>: Relay access denied; it's \"blocked\"")


def log_config(**keys: Any) -> LogConfig:
    return config_from_mapping({"log": keys}).log


@pytest.fixture
def own_logging() -> Iterator[None]:
    """Let a test set up logging with :func:`setup_logging`; restore the root logger's
    handlers and level afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    setup_logging(None, level="WARNING")  # closes the files the test opened
    for h in root.handlers[:]:
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)






def traffic(app: Smtpgate) -> None:
    """One session: bob accepted, bad refused by the ``blocklist`` plugin, one message."""

    def blocklist(session: Any, tx: Any, rcpt: Any) -> Reply | None:
        return REFUSAL if rcpt.address == "bad@example.com" else None

    app.hooks.register(Stage.RCPT, blocklist, name="blocklist", plugin="blocklist")
    with smtplib.SMTP("127.0.0.1", app.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("ann@example.org")
        assert s.rcpt("bob@example.com")[0] == 250
        assert s.rcpt("bad@example.com")[0] == 554
        assert s.data(MSG)[0] == 250


def test_json_lines_carry_the_fields(run_app: Callable[..., Smtpgate], tmp_path: Path,
                                     own_logging: None) -> None:
    """``format = "json"``: every line is one JSON object with time, level, logger,
    message and the fields; the plugin's refusal at RCPT is an INFO ``reject`` record with
    the stage, client, helo, sender, recipient and the reply; the transaction record
    carries the Message-ID."""
    path = tmp_path / "smtpgate.log"
    setup_logging(log_config(format="json", file=str(path), level="INFO"))
    app = run_app(deliver=Capture())
    traffic(app)
    assert wait_for(lambda: '"message":"session"' in path.read_text())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        assert {"time", "level", "logger", "message"} <= r.keys()
    [reject] = [r for r in records if r["message"] == "reject"]
    assert reject["level"] == "INFO" and reject["logger"] == "smtpgate.session"
    assert reject["stage"] == "rcpt" and reject["client"] == "127.0.0.1"
    assert reject["helo"] == "client.test"
    assert reject["from"] == "<ann@example.org>" and reject["to"] == "<bad@example.com>"
    assert reject["code"] == 554
    assert reject["reply"] == str(REFUSAL)
    assert reject["reply"].startswith("554 5.7.1 <bad@example.com>: Relay access denied")
    [tx] = [r for r in records if r["message"] == "transaction"]
    assert tx["message_id"] == "<logs-1@example.org>"
    assert tx["from"] == "<ann@example.org>" and tx["to"] == "<bob@example.com>"
    assert tx["result"].startswith("250 2.0.0") and tx["outcome"] == "delivered"
    assert tx["size"] == len(MSG)
    [session] = [r for r in records if r["message"] == "session"]
    assert session["messages"] == 1 and session["end"] == "quit"


def _fields(line: str) -> tuple[str, dict[str, str]]:
    """Parse a text line ``TIME LEVEL LOGGER: NAME key=value ...`` back with shlex."""
    head, _, rest = line.partition(": ")
    words = shlex.split(rest)
    return head, dict(w.split("=", 1) for w in words[1:]) | {"": words[0]}


def test_text_lines_parse_back_as_key_value(run_app: Callable[..., Smtpgate], tmp_path: Path,
                                            own_logging: None) -> None:
    """``format = "text"``: values with spaces and quotes are quoted so that a shell-word
    parser gives every field back exactly; the rejection is at INFO."""
    path = tmp_path / "smtpgate.log"
    setup_logging(log_config(format="text", file=str(path), level="INFO"))
    app = run_app(deliver=Capture())
    traffic(app)
    assert wait_for(lambda: " INFO smtpgate.session: session id=" in path.read_text())
    lines = path.read_text().splitlines()
    [reject] = [ln for ln in lines if "smtpgate.session: reject " in ln]
    head, f = _fields(reject)
    assert head.endswith(" INFO smtpgate.session")
    assert f[""] == "reject"
    assert f["stage"] == "rcpt" and f["client"] == "127.0.0.1" and f["helo"] == "client.test"
    assert f["from"] == "<ann@example.org>" and f["to"] == "<bad@example.com>"
    assert f["code"] == "554" and f["reply"] == str(REFUSAL)
    [tx] = [ln for ln in lines if "smtpgate.session: transaction " in ln]
    _, t = _fields(tx)
    assert t["message_id"] == "<logs-1@example.org>" and t["outcome"] == "delivered"


def test_format_value_round_trips() -> None:
    for v in ["plain", "a b", "it's", 'say "hi"', "", "x=y", "back\\slash", "<a@b>", "ü ö"]:
        assert shlex.split(f"k={format_value(v)}") == [f"k={v}"], v
    assert str(Event("e", a="1 2", b=None)) == "e a='1 2' b=-"


def test_rolls_by_size_and_keeps_max_backups(tmp_path: Path, own_logging: None) -> None:
    """``max_size`` rolls the file before it would grow past it (FILE.1 newest), and only
    ``max_backups`` rolled files are kept; no line is lost in the files kept."""
    path = tmp_path / "smtpgate.log"
    setup_logging(log_config(file=str(path), max_size=2000, max_backups=3, level="INFO"))
    log = logging.getLogger("smtpgate.test")
    for i in range(200):
        log.info(Event("line", n=f"{i:04d}", pad="x" * 40))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["smtpgate.log", "smtpgate.log.1", "smtpgate.log.2", "smtpgate.log.3"]
    numbers = []
    for name in ["smtpgate.log.3", "smtpgate.log.2", "smtpgate.log.1", "smtpgate.log"]:
        data = (tmp_path / name).read_text()
        assert 0 < len(data.encode()) <= 2000
        numbers += [int(line.split(" n=")[1][:4]) for line in data.splitlines()]
    assert numbers == list(range(numbers[0], 200))  # consecutive up to the last line
    assert numbers[0] > 0  # the oldest lines went with the removed backups


def test_roll_format_roll_on_start_and_signal(tmp_path: Path, own_logging: None) -> None:
    """``roll_format`` names rolled files with a strftime suffix (``-N`` when taken);
    ``roll_on_start`` rolls a non-empty file at set-up; ``roll_on_signal`` makes
    :func:`reopen_logs` (SIGUSR1/SIGHUP) roll; ``max_backups`` holds for named files."""
    path = tmp_path / "smtpgate.log"
    path.write_text("from the last run\n")
    setup_logging(log_config(file=str(path), roll_format="%Y%m%d", roll_on_start=True,
                             roll_on_signal=True, max_backups=2, level="INFO"))
    day = time.strftime("%Y%m%d")
    assert (tmp_path / f"smtpgate.log.{day}").read_text() == "from the last run\n"
    log = logging.getLogger("smtpgate.test")
    log.info("first")
    reopen_logs()
    assert "first" in (tmp_path / f"smtpgate.log.{day}-1").read_text()
    log.info("second")
    reopen_logs()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "smtpgate.log", f"smtpgate.log.{day}-1", f"smtpgate.log.{day}-2"]
    log.info("third")
    assert "third" in path.read_text()


def test_daily_roll_at_roll_hour(tmp_path: Path) -> None:
    """``roll_hour``: the first record after that hour rolls the file (the next roll is
    put one day later)."""
    path = tmp_path / "smtpgate.log"
    handler = RollingFileHandler(str(path), roll_hour=time.localtime().tm_hour)
    handler.setFormatter(TextFormatter())
    try:
        assert handler._next_roll > time.time()  # today's hour has begun: tomorrow
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "before", None, None)
        handler.handle(record)
        handler._next_roll = time.time() - 1  # as if that hour had come
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "after", None, None)
        handler.handle(record)
        assert "before" in (tmp_path / "smtpgate.log.1").read_text()
        assert "after" in path.read_text() and "before" not in path.read_text()
        assert handler._next_roll > time.time() + 22 * 3600
    finally:
        handler.close()


def test_one_process_rolls_the_others_follow(tmp_path: Path) -> None:
    """Two writers of one file, as serve's process and a worker or the delivery process:
    the rolling one rolls when the file passes ``max_size`` even if only the other wrote
    (it checks once a second); the other reopens the new file by itself; no line lost."""
    path = tmp_path / "smtpgate.log"
    roller = RollingFileHandler(str(path), max_size=2000, max_backups=5, roller=True)
    other = RollingFileHandler(str(path), roller=False)
    other.setFormatter(TextFormatter("worker 1"))
    written = 0

    def write() -> None:
        nonlocal written
        other.handle(logging.LogRecord("t", logging.INFO, __file__, 1, f"line {written:05d} "
                                       + "x" * 60, None, None))
        written += 1

    try:
        for _ in range(50):  # about 4 KB: past max_size, written by the other only
            write()
        assert wait_for(lambda: (tmp_path / "smtpgate.log.1").exists())

        def followed() -> bool:
            write()
            return path.exists() and "line" in path.read_text()

        assert wait_for(followed)
        files = [tmp_path / f"smtpgate.log.{i}" for i in range(5, 0, -1)] + [path]
        lines = [ln for f in files if f.exists() for ln in f.read_text().splitlines()]
        assert [int(ln.split("line ")[1][:5]) for ln in lines] == list(range(written))
        assert all("t[worker 1]: line" in ln for ln in lines)
    finally:
        roller.close()
        other.close()


def test_send_log_in_proxy_mode(run_app: Callable[..., Smtpgate], tmp_path: Path,
                                own_logging: None) -> None:
    """Proxy mode: the session relays, and writes one send-log line per relayed message
    (time, queue id, sender, recipients, upstream, reply)."""
    port = free_port()

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 Taken upstream"

    ctl = Controller(Handler(), hostname="127.0.0.1", port=port, server_hostname="up.test")
    ctl.start()
    try:
        send = tmp_path / "send.log"
        setup_logging(log_config(send_log=str(send), level="WARNING"))
        app = run_app({"relay": {"url": f"smtp://127.0.0.1:{port}", "timeout": 5},
                       "delivery": {"mode": "proxy"}})
        with smtplib.SMTP("127.0.0.1", app.port, timeout=10) as s:
            s.ehlo("client.test")
            s.mail("ann@example.org")
            s.rcpt("bob@example.com")
            s.rcpt("carl@example.com")
            assert s.data(MSG)[0] == 250
    finally:
        ctl.stop()
    [line] = send.read_text().splitlines()
    _, f = _fields(line)
    assert f[""] == "sent" and f["from"] == "<ann@example.org>"
    assert f["to"] == "<bob@example.com>,<carl@example.com>"
    assert f["upstream"] == f"127.0.0.1:{port}" and f["status"] == "sent"
    assert f["reply"] == "250 2.0.0 Taken upstream"
    assert f["id"]


# ------------------------------------------------------------- serve + signals


def _start_serve(tmp_path: Path, config: Path) -> subprocess.Popen[bytes]:
    """``smtpgate serve -c CONFIG`` in a process of its own, once it listens (its output
    in ``stderr.log``); the caller terminates it."""
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    if not wait_for(lambda: b"listening on" in stderr.read_bytes(), timeout=60):
        proc.kill()
        proc.wait(20)
        raise AssertionError(stderr.read_text())
    return proc


def _serve(tmp_path: Path, extra_log: str = "") -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    logfile = tmp_path / "smtpgate.log"
    config = tmp_path / "smtpgate.toml"
    config.write_text(
        f'[server]\nhostname = "mx.test"\nlisten = ["127.0.0.1:{port}"]\n'
        f'[maildir]\npath = "{tmp_path / "mail"}"\n'
        f'[log]\nfile = "{logfile}"\nlevel = "INFO"\n{extra_log}')
    return _start_serve(tmp_path, config), port, logfile


def _session(port: int, helo: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo(helo)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGHUP])
def test_serve_reopens_its_log_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """logrotate's way: the file is moved away, the signal makes ``serve`` open a new file
    at the path; lines after it go there, none to the moved file."""
    proc, port, logfile = _serve(tmp_path)
    try:
        _session(port, "before.test")
        assert wait_for(lambda: "helo=before.test" in logfile.read_text())
        moved = tmp_path / "smtpgate.log.moved"
        os.rename(logfile, moved)
        proc.send_signal(sig)
        assert wait_for(logfile.exists)
        _session(port, "after.test")
        assert wait_for(lambda: "helo=after.test" in logfile.read_text())
        assert "helo=after.test" not in moved.read_text()
        assert "helo=before.test" in moved.read_text()
        if sig == signal.SIGHUP:  # and the configuration was reloaded, logged in the new file
            assert wait_for(lambda: "configuration reloaded" in logfile.read_text())
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_rolls_on_signal_when_configured(tmp_path: Path) -> None:
    """``roll_on_signal = true``: SIGUSR1 makes ``serve`` itself roll the file to FILE.1."""
    proc, port, logfile = _serve(tmp_path, "roll_on_signal = true\n")
    try:
        _session(port, "before.test")
        assert wait_for(lambda: "helo=before.test" in logfile.read_text())
        proc.send_signal(signal.SIGUSR1)
        rolled = tmp_path / "smtpgate.log.1"
        assert wait_for(rolled.exists)
        _session(port, "after.test")
        assert wait_for(lambda: "helo=after.test" in logfile.read_text())
        assert "helo=before.test" in rolled.read_text()
        assert "helo=after.test" not in rolled.read_text()
    finally:
        proc.terminate()
        proc.wait(20)


def test_workers_follow_the_supervisors_roll(tmp_path: Path) -> None:
    """``server.workers = 2``: the worker processes write the sessions' lines, the
    supervisor rolls on SIGUSR1 (``roll_on_signal``), and the workers follow it to the
    new file by themselves; every session's line is in one of the two files."""
    port = free_port()
    logfile = tmp_path / "smtpgate.log"
    config = tmp_path / "smtpgate.toml"
    config.write_text(
        f'[server]\nhostname = "mx.test"\nlisten = ["127.0.0.1:{port}"]\nworkers = 2\n'
        f'[maildir]\npath = "{tmp_path / "mail"}"\n'
        f'[log]\nfile = "{logfile}"\nlevel = "INFO"\nroll_on_signal = true\n')
    proc = _start_serve(tmp_path, config)
    try:
        _session(port, "before.test")
        assert wait_for(lambda: "helo=before.test" in logfile.read_text())
        assert "[worker " in logfile.read_text()
        proc.send_signal(signal.SIGUSR1)
        rolled = tmp_path / "smtpgate.log.1"
        assert wait_for(rolled.exists)
        sent = 0

        def followed() -> bool:
            nonlocal sent
            _session(port, f"after{sent}.test")
            sent += 1
            return "]: session id=" in logfile.read_text()

        assert wait_for(followed)
        both = rolled.read_text() + logfile.read_text()
        assert wait_for(lambda: all(f"helo=after{i}.test " in rolled.read_text()
                                    + logfile.read_text() for i in range(sent)))
        assert both.count("helo=before.test ") == 1
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_applies_a_changed_log_section(tmp_path: Path, workers: int) -> None:
    """SIGHUP with a changed ``[log]`` (level WARNING to INFO, text to JSON, another
    file): ``serve``'s process, its workers and the queue delivery process all write the
    new file in the new format at the new level; nothing more goes to the old file."""
    port, up_port = free_port(), free_port()
    received: list[str] = []

    class Upstream:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received.append(envelope.mail_from)
            return "250 2.0.0 Taken upstream"

    ctl = Controller(Upstream(), hostname="127.0.0.1", port=up_port,
                     server_hostname="up.test")
    ctl.start()
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    config = tmp_path / "smtpgate.toml"

    def write_config(log: str) -> None:
        config.write_text(
            f'[server]\nhostname = "mx.test"\nlisten = ["127.0.0.1:{port}"]\n'
            f"workers = {workers}\n"
            f'[relay]\nurl = "smtp://127.0.0.1:{up_port}"\ntimeout = 5\n'
            f'[queue]\npath = "{tmp_path / "spool"}"\n{log}')

    def send(helo: str) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo(helo)
            s.sendmail("ann@example.org", ["bob@example.com"], MSG)

    write_config(f'[log]\nfile = "{old_log}"\nlevel = "WARNING"\n')
    try:
        proc = _start_serve(tmp_path, config)
    except BaseException:
        ctl.stop()
        raise
    try:
        assert old_log.exists()
        send("before.test")
        assert wait_for(lambda: len(received) == 1)
        assert "before.test" not in old_log.read_text()  # INFO lines: not at WARNING

        write_config(f'[log]\nfile = "{new_log}"\nlevel = "INFO"\nformat = "json"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: new_log.exists()
                        and "configuration reloaded" in new_log.read_text(), timeout=20)

        def delivered_logged() -> bool:
            send(f"after{len(received)}.test")
            lines = [json.loads(line) for line in new_log.read_text().splitlines()]
            return any(r["message"] == "transaction" and r.get("helo", "").startswith("after")
                       for r in lines) and any(r.get("process") == "delivery"
                                               and "queue id=" in r["message"] for r in lines)

        assert wait_for(delivered_logged, timeout=30), new_log.read_text()
        records = [json.loads(line) for line in new_log.read_text().splitlines()]
        if workers > 1:
            assert any(r.get("process", "").startswith("worker ") for r in records)
        assert "after" not in old_log.read_text()
    finally:
        proc.terminate()
        proc.wait(20)
        ctl.stop()


def test_a_log_file_that_cannot_be_opened_keeps_the_running_set_up(
        tmp_path: Path, own_logging: None) -> None:
    """What a reload with a bad ``[log] file`` (or ``send_log``) meets: OSError, and the
    lines keep going to the file set up before, at its level."""
    good = tmp_path / "good.log"
    setup_logging(log_config(file=str(good), level="INFO"))
    bad = tmp_path / "no-such-dir" / "x.log"
    with pytest.raises(OSError):
        setup_logging(log_config(file=str(bad), level="DEBUG"), start=False)
    with pytest.raises(OSError):
        setup_logging(log_config(file=str(tmp_path / "other.log"), send_log=str(bad)),
                      start=False)
    logging.getLogger("smtpgate.test").info("still here")
    logging.getLogger("smtpgate.test").debug("not at INFO")
    text = good.read_text()
    assert "still here" in text and "not at INFO" not in text
    assert not (tmp_path / "other.log").exists() or "still here" not in (
        tmp_path / "other.log").read_text()

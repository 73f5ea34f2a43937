"""``[[plugin]] use = "content-filter"``: ZMailer's content filter (``#hungry`` protocol,
smtpserver(8) CONTENTFILTER INTERFACE) against filter programs written here from that
description (ctfilter.py, ctfilter.sh), through a real smtpgate on loopback (smtplib and
a raw client), under both event loops: replies, delivered bytes, the quarantine Maildir,
the message file the filter saw, restarts, timeouts and two filters at once."""

from __future__ import annotations

import logging
import os
import shlex
import smtplib
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from smtpgate.app import Smtpgate
from smtpgate.errors import ConfigError
from smtpgate.plugins.content_filter import parse_answer, parse_reply
from smtpgate.reply import Reply
from tests.support import Capture, RawClient

AppFactory = Callable[..., Smtpgate]
RawFactory = Callable[..., RawClient]

HERE = Path(__file__).resolve().parent
PY_FILTER = HERE / "ctfilter.py"
SH_FILTER = HERE / "ctfilter.sh"

MSG = (b"From: Ann <ann@example.org>\r\nTo: bob@example.com\r\nSubject: filter me\r\n"
       b"\r\nHello,\r\n.leading dot\r\nbye\r\n")


def table(mode: str, record: Path, arg: str | None = None, **options: Any) -> dict[str, Any]:
    """A ``[[plugin]]`` table running ctfilter.py in ``mode``."""
    argv = [sys.executable, str(PY_FILTER), mode, str(record)] + ([arg] if arg else [])
    return {"use": "content-filter", "command": shlex.join(argv), **options}


@pytest.fixture
def record(tmp_path: Path) -> Path:
    d = tmp_path / "record"
    d.mkdir()
    return d


def send(port: int, message: bytes = MSG) -> tuple[int, bytes]:
    """One transaction over smtplib; the end-of-data reply (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("ann@example.org")[0] == 250
        assert s.rcpt("bob@example.com")[0] == 250
        return s.data(message)


def raw_send(c: RawClient, message: bytes = MSG) -> bytes:
    """MAIL, RCPT, DATA over a raw client (EHLO done): the end-of-data reply, byte exact."""
    assert c.cmd("MAIL FROM:<ann@example.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<bob@example.com>").startswith(b"250")
    assert c.cmd("DATA").startswith(b"354")
    c.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    return bytes(c.read_reply())


def jobs(record: Path) -> list[tuple[str, str, bytes]]:
    """(path, mode, content) of every file the filters were given, in job order."""
    out = []
    for info in sorted(record.glob("*.info"), key=lambda p: p.stat().st_mtime_ns):
        path, mode = info.read_text().split()
        out.append((path, mode, info.with_suffix(".msg").read_bytes()))
    return out


def started(record: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in record.glob("started-*")}


def not_running(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (a SIGKILL takes effect when the process is
    next scheduled: poll for up to 10 s)."""
    for _ in range(200):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # gone between open and read
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def maildir_files(path: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((path / "new").glob("*"))] if path.exists() else []


# ------------------------------------------------------------------ accept


def test_accept_file_is_the_message_private_and_removed(run_app: AppFactory, record: Path,
                                                        capture: Capture) -> None:
    app = run_app({"plugin": [{"module": "tests.filters.content_filter.earlier"},
                              table("answer", record, "0")]}, deliver=capture)
    code, text = send(app.port)
    assert code == 250 and text.startswith(b"2.0.0 ")  # "0" alone: the usual reply
    [(path, mode, seen)] = jobs(record)
    head, body = MSG.split(b"\r\n\r\n", 1)
    expected = head + b"\r\nX-Earlier: added before the filter\r\n\r\n" + body
    assert seen == expected  # byte for byte, with the earlier plugin's header
    assert Capture.strip_received(capture.messages[0][1]) == expected
    assert mode == "600"
    assert os.path.isabs(path) and not os.path.exists(path)  # deleted after the answer


def test_accept_with_text_sets_the_reply_and_directory_option(run_app: AppFactory, record: Path,
                                                              tmp_path: Path,
                                                              capture: Capture) -> None:
    spool = tmp_path / "cf-files"
    spool.mkdir()
    app = run_app({"plugin": [table("answer", record, "0 250 2.6.0 Message OK!",
                                    directory=str(spool))]}, deliver=capture)
    assert send(app.port) == (250, b"2.6.0 Message OK!")
    [(path, _, seen)] = jobs(record)
    assert Path(path).parent == spool and seen == MSG
    assert list(spool.iterdir()) == []
    assert len(capture.messages) == 1


# ------------------------------------------------------------------ reject


def test_reject_without_text_gets_the_default(run_app: AppFactory, record: Path, capture: Capture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app = run_app({"plugin": [table("answer", record, "-1")]}, deliver=capture)
    assert send(app.port) == (550, b"5.7.1 Rejected by content filter")
    assert capture.messages == []
    line = next(r.getMessage() for r in caplog.records if r.name == "smtpgate.session"
                and r.getMessage().startswith("transaction "))
    assert "results='content-filter=reject (answer=-1 pid=" in line


def test_reject_with_custom_text_shell_filter_with_arguments(run_app: AppFactory, capture: Capture) -> None:
    command = shlex.join(["/bin/sh", str(SH_FILTER), "-1 554 5.7.0 No spam here, thanks"])
    app = run_app({"plugin": [{"use": "content-filter", "command": command}]},
                  deliver=capture)
    assert send(app.port) == (554, b"5.7.0 No spam here, thanks")
    assert capture.messages == []


@pytest.mark.parametrize(("answer", "reply"), [
    ("-1 550 That is spam", b"550 5.7.1 That is spam"),  # no enhanced code: one is added
    ("-1 That is spam", b"550 5.7.1 That is spam"),  # no codes at all
    ("-1 451 4.7.1 Try later", b"451 4.7.1 Try later"),
    ("-1 550 4.7.1 Wrong class", b"550 5.7.1 Wrong class"),
])
def test_reject_reply_codes(run_app: AppFactory, raw: RawFactory, record: Path, capture: Capture, answer: str,
                            reply: bytes) -> None:
    app = run_app({"plugin": [table("answer", record, answer)]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert raw_send(c) == reply
    assert capture.messages == []


def test_multi_line_reply(run_app: AppFactory, raw: RawFactory, record: Path, capture: Capture) -> None:
    app = run_app({"plugin": [table("answer", record,
                                    r"-1 550 5.7.1 Spam detected\rscore 12.5\rgo away")]},
                  deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert raw_send(c) == (b"550-5.7.1 Spam detected\r\n550-5.7.1 score 12.5\r\n"
                           b"550 5.7.1 go away")
    assert capture.messages == []
    assert c.cmd("NOOP").startswith(b"250")  # the session goes on


def test_reject_reported_as_acceptance_destroys_the_message(run_app: AppFactory, record: Path,
                                                            capture: Capture) -> None:
    app = run_app({"plugin": [table(
        "answer", record, "-1 250 2.7.1 Glad to see some spam, immediately destroyed :)")]},
        deliver=capture)
    assert send(app.port) == (250, b"2.7.1 Glad to see some spam, immediately destroyed :)")
    assert capture.messages == []


def test_accept_with_a_refusal_text_is_not_delivered(run_app: AppFactory, record: Path,
                                                     capture: Capture) -> None:
    app = run_app({"plugin": [table("answer", record, "0 550 5.7.1 No")]}, deliver=capture)
    assert send(app.port) == (550, b"5.7.1 No")
    assert capture.messages == []


# ------------------------------------------------------------------ freeze


def test_freeze_stores_in_quarantine(run_app: AppFactory, record: Path, tmp_path: Path,
                                     capture: Capture) -> None:
    freezer = tmp_path / "freezer"
    app = run_app({"plugin": [table("answer", record, "1", quarantine_path=str(freezer))]},
                  deliver=capture)
    assert send(app.port) == (550, b"5.7.1 Rejected by content filter")
    assert capture.messages == []
    [stored] = maildir_files(freezer)
    assert Capture.strip_received(stored) == MSG


def test_freeze_with_positive_reply(run_app: AppFactory, record: Path, tmp_path: Path,
                                    capture: Capture) -> None:
    freezer = tmp_path / "freezer"
    app = run_app({"plugin": [table("answer", record, "1 250 2.7.1 Held for review",
                                    quarantine_path=str(freezer))]}, deliver=capture)
    assert send(app.port) == (250, b"2.7.1 Held for review")
    assert capture.messages == []
    assert len(maildir_files(freezer)) == 1


def test_freeze_without_quarantine_path_tempfails(run_app: AppFactory, record: Path,
                                                  capture: Capture) -> None:
    app = run_app({"plugin": [table("answer", record, "1")]}, deliver=capture)
    assert send(app.port) == (451, b"4.3.0 Message cannot be stored, try again later")
    assert capture.messages == []


# ------------------------------------------------------------------ malformed answers


def test_malformed_answer_freezes_and_filter_is_replaced(run_app: AppFactory, record: Path,
                                                         tmp_path: Path,
                                                         capture: Capture) -> None:
    freezer = tmp_path / "freezer"
    app = run_app({"plugin": [table("malformed", record, quarantine_path=str(freezer))]},
                  deliver=capture)
    assert send(app.port) == (550, b"5.7.1 Rejected by content filter")
    assert len(maildir_files(freezer)) == 1
    [first] = started(record)
    assert not_running(first)
    # The channel was closed: the next message gets a new filter (and is frozen too).
    assert send(app.port) == (550, b"5.7.1 Rejected by content filter")
    assert len(started(record)) == 2
    assert len(maildir_files(freezer)) == 2
    assert capture.messages == []


def test_well_formed_line_after_a_malformed_one_is_used(run_app: AppFactory, record: Path,
                                                        tmp_path: Path,
                                                        capture: Capture) -> None:
    freezer = tmp_path / "freezer"
    app = run_app({"plugin": [table("malformed", record, "-1 550 5.7.1 Late verdict",
                                    quarantine_path=str(freezer))]}, deliver=capture)
    assert send(app.port) == (550, b"5.7.1 Late verdict")
    assert maildir_files(freezer) == [] and capture.messages == []


# ------------------------------------------------------------------ failures


def test_filter_crash_tempfails_then_restarts(run_app: AppFactory, record: Path, capture: Capture) -> None:
    app = run_app({"plugin": [table("crash-once", record)]}, deliver=capture)
    assert send(app.port) == (451, b"4.3.0 Content filter unavailable, try again later")
    [crashed] = started(record)
    code, text = send(app.port)
    assert code == 250 and text.startswith(b"2.6.0 served by ")
    server_pid = int(text.rsplit(b" ", 1)[1])
    assert server_pid != crashed and started(record) == {crashed, server_pid}
    assert len(capture.messages) == 1


def test_hanging_filter_is_killed_and_restarted(run_app: AppFactory, record: Path,
                                                capture: Capture) -> None:
    app = run_app({"plugin": [table("hang-once", record, timeout=2)]}, deliver=capture)
    assert send(app.port) == (451, b"4.3.0 Content filter unavailable, try again later")
    [hung] = started(record)
    assert not_running(hung)
    code, text = send(app.port)
    assert code == 250 and int(text.rsplit(b" ", 1)[1]) != hung
    assert len(capture.messages) == 1


def test_filter_that_cannot_run(run_app: AppFactory, tmp_path: Path, capture: Capture) -> None:
    dies = tmp_path / "dies.sh"
    dies.write_text("#!/bin/sh\necho 'broken filter' >&2\nexit 1\n")
    dies.chmod(0o755)
    app = run_app({"plugin": [{"use": "content-filter", "command": str(dies)}]},
                  deliver=capture)
    for _ in range(2):  # at once, then while the restart is delayed
        assert send(app.port) == (451, b"4.3.0 Content filter unavailable, try again later")
    assert capture.messages == []


def test_on_error_accept_lets_the_message_through(run_app: AppFactory, tmp_path: Path,
                                                  capture: Capture,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    dies = tmp_path / "dies.sh"
    dies.write_text("#!/bin/sh\nexit 1\n")
    dies.chmod(0o755)
    app = run_app({"plugin": [{"use": "content-filter", "command": str(dies),
                               "on_error": "accept"}]}, deliver=capture)
    code, _ = send(app.port)
    assert code == 250 and len(capture.messages) == 1
    assert any("results='content-filter=error (reason=" in r.getMessage()
               for r in caplog.records if r.name == "smtpgate.session")


# ------------------------------------------------------------------ processes


def test_two_processes_serve_two_sessions_at_once(run_app: AppFactory, record: Path,
                                                  capture: Capture) -> None:
    # Each filter answers only once both have a job: with one filter at a time both
    # messages would time out (451).
    app = run_app({"plugin": [table("barrier", record, processes=2, timeout=60)]},
                  deliver=capture)
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda _: send(app.port), range(2)))
    assert [code for code, _ in replies] == [250, 250], replies
    pids = {int(text.rsplit(b" ", 1)[1]) for _, text in replies}
    assert len(pids) == 2 and pids == started(record)
    assert len(capture.messages) == 2


def test_one_filter_serves_messages_in_turn(run_app: AppFactory, record: Path, capture: Capture) -> None:
    app = run_app({"plugin": [table("answer", record, "0 250 2.6.0 ok")]}, deliver=capture)
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: send(app.port), range(3)))
    assert replies == [(250, b"2.6.0 ok")] * 3
    assert len(started(record)) == 1 and len(jobs(record)) == 3


# ------------------------------------------------------------------ stderr, shutdown


def test_stderr_goes_to_the_log_and_filter_ends_at_shutdown(
        run_app: AppFactory, record: Path, capture: Capture, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpgate.plugins.content_filter")
    app = run_app({"plugin": [table("answer", record, "0")]}, deliver=capture)
    assert send(app.port)[0] == 250
    [pid] = started(record)
    app.stop_thread(timeout=2)
    texts = [r.getMessage() for r in caplog.records
             if r.name == "smtpgate.plugins.content_filter"]
    assert f"content filter {pid}: filter {pid} ready (mode answer)" in texts
    assert any(t.startswith(f"content filter {pid}: job 1: ") for t in texts)
    assert not_running(pid)


# ------------------------------------------------------------------ configuration


def test_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Smtpgate({"plugin": [{"use": "content-filter",
                              "command": str(tmp_path / "missing")}]})
    assert info.value.problems == [
        f"plugin[0].command: {tmp_path / 'missing'}: not an executable file"]
    with pytest.raises(ConfigError) as info:
        Smtpgate({"plugin": [{"use": "content-filter", "command": "/bin/cat",
                              "processes": 0}]})
    assert info.value.problems == ["plugin[0].processes: must be 1..64"]
    with pytest.raises(ConfigError) as info:
        Smtpgate({"plugin": [{"use": "content-filter"}]})
    assert info.value.problems == ["plugin[0].command: required"]


# ------------------------------------------------------------------ the answer line


def test_parse_answer() -> None:
    assert parse_answer("0") == (0, "")
    assert parse_answer("-1 550 5.7.1 no") == (-1, "550 5.7.1 no")
    assert parse_answer("+1\tx") == (1, "x")
    assert parse_answer("#hungry") is None
    assert parse_answer("1abc") is None
    assert parse_answer("") is None


def test_parse_reply() -> None:
    assert parse_reply("", -1) is None
    assert parse_reply("250 2.6.0 Message OK!", 0) == Reply(250, "2.6.0", "Message OK!")
    assert parse_reply("250 fine", 0) == Reply(250, "2.6.0", "fine")
    assert parse_reply("fine", 0) == Reply(250, "2.6.0", "fine")
    assert parse_reply("550", 1) == Reply(550, "5.7.1", "Rejected by content filter")
    assert parse_reply("a\rb\r", -1) == Reply(550, "5.7.1", "a\nb")
    assert parse_reply("123 not a code", -1) == Reply(550, "5.7.1", "123 not a code")
    assert parse_reply("550 5.7.1 bell\x07", -1) == Reply(550, "5.7.1", "bell?")

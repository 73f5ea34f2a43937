"""The example plugin of docs/plugins.md (docs/examples/sender_blocklist.py), loaded from
``sys.path`` through a ``[[plugin]]`` table, over real sockets: its own reply text, its
finding in ``transaction.results`` and its header; option errors naming ``plugin[N].KEY``
(in process and through ``smtpgate check-config``); per-plugin ``timeout`` and
``on_error``; priorities deciding which plugin's reply wins."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smtpgate.errors import ConfigError
from tests.support import Capture

from .conftest import EXAMPLES, REPO, Records, probe

MSG = (b"From: Ann <ann@example.org>\r\nTo: bob@example.com\r\nSubject: example\r\n\r\n"
       b"body\r\n")


def blocklist(**options: Any) -> dict[str, Any]:
    """A ``[[plugin]]`` table for the example plugin."""
    return {"module": "sender_blocklist", "blocked_senders": ["spam@bad.example"], **options}


def send(c: Any, sender: str, rcpt: str, message: bytes) -> bytes:
    """MAIL, RCPT, DATA over a raw client (EHLO done); the end-of-data reply."""
    assert c.cmd(f"MAIL FROM:<{sender}>").startswith(b"250")
    assert c.cmd(f"RCPT TO:<{rcpt}>").startswith(b"250")
    assert c.cmd("DATA").startswith(b"354")
    c.send(message + b".\r\n")
    return bytes(c.read_reply())


# ------------------------------------------------------------------ its replies


def test_rejection_reply_reaches_client_verbatim(run_app, raw, capture: Capture,
                                                 examples_on_path: Path) -> None:
    app = run_app({"plugin": [blocklist(
        blocked_domains=["junk.example"],
        reply_text="Mail from <{sender}> is not accepted here")]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<spam@bad.example>") == (
        b"550 5.7.1 Mail from <spam@bad.example> is not accepted here")
    assert c.cmd("MAIL FROM:<Someone@JUNK.example>") == (
        b"550 5.7.1 Mail from <Someone@JUNK.example> is not accepted here")
    assert c.cmd("MAIL FROM:<>") == b"250 2.1.0 Sender OK"  # the null sender is not listed
    c.cmd("RSET")
    assert send(c, "ann@example.org", "bob@example.com", MSG).startswith(b"250 ")
    assert len(capture.messages) == 1
    # a listed From: header is refused at end of data with the same text
    listed = MSG.replace(b"ann@example.org", b"spam@bad.example")
    assert send(c, "ann@example.org", "bob@example.com", listed) == (
        b"550 5.7.1 Mail from <spam@bad.example> is not accepted here")
    assert len(capture.messages) == 1


def test_default_reply_text(run_app, raw, examples_on_path: Path) -> None:
    app = run_app({"plugin": [blocklist()]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<spam@bad.example>") == (
        b"550 5.7.1 Sender <spam@bad.example> is blocked here")


def test_finding_in_results_header_and_log_line(run_app, raw, capture: Capture,
                                                records: Records, examples_on_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The data hook records ``pass`` in ``transaction.results``; a later plugin reads it;
    the header and the transaction log line show it."""
    caplog.set_level(logging.INFO, logger="smtpgate.session")
    app = run_app({"plugin": [
        blocklist(header="X-Blocklist-Check"),
        probe(records, stages=["data"], priority=50),
    ]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert send(c, "ann@example.org", "bob@example.com", MSG).startswith(b"250 ")
    [(_, message)] = capture.messages
    body = Capture.strip_received(message)
    assert body.startswith(MSG.split(b"\r\n\r\n")[0])
    assert b"\r\nX-Blocklist-Check: sender_blocklist=pass (from=ann@example.org)\r\n" in body
    [seen] = records.all("data")
    assert seen["results"] == "sender_blocklist=pass (from=ann@example.org)"
    lines = [r.getMessage() for r in caplog.records if "transaction id=" in r.getMessage()]
    assert any("results='sender_blocklist=pass (from=ann@example.org)'" in line
               for line in lines), lines


# ------------------------------------------------------------ option errors


@pytest.mark.parametrize(("options", "problem"), [
    ({"blocked_senders": ["spam@bad.example", "not-an-address"]},
     "plugin[1].blocked_senders: must be e-mail addresses (local@domain), "
     "got 'not-an-address'"),
    ({"blocked_senders": ["ok@example.org", 7]},
     "plugin[1].blocked_senders[1]: must be a string, got 7"),
    ({"blocked_senders": "spam@bad.example"},
     "plugin[1].blocked_senders: must be an array, got 'spam@bad.example'"),
    ({"blocked_sender": ["spam@bad.example"]},
     "plugin[1].blocked_sender: unknown option (did you mean 'blocked_senders'?)"),
    ({"blocked_senders": ["a@b.example"], "reply_text": "No {who}"},
     "plugin[1].reply_text: may only use the placeholder {sender}"),
    ({"blocked_senders": ["a@b.example"], "header": "X Bad"},
     "plugin[1].header: must be a header field name, got 'X Bad'"),
    ({"blocked_senders": []},  # raised by register() itself
     "plugin[1].blocked_senders: nothing to block"),
])
def test_option_error_names_plugin_key(run_app, examples_on_path: Path,
                                       options: dict[str, Any], problem: str) -> None:
    table = {"module": "sender_blocklist", **options}
    with pytest.raises(ConfigError) as info:
        run_app({"plugin": [probe(), table]})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_register_raising_is_a_config_error(run_app) -> None:
    with pytest.raises(ConfigError) as info:
        run_app({"plugin": [probe(fail_register=True)]})
    assert info.value.problems == [
        "plugin[0]: plugin 'tests.plugins.probe': register() failed: "
        "RuntimeError: probe told to fail"]


def _check_config(tmp_path: Path, plugin_toml: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "smtpgate.toml"
    config.write_text(f"""
[server]
hostname = "mx.test"
listen = ["127.0.0.1:0"]
[maildir]
path = "{tmp_path / 'mail'}"
{plugin_toml}
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "smtpgate", "check-config", "-c", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_check_config_names_plugin_key(tmp_path: Path) -> None:
    out = _check_config(tmp_path, """
[[plugin]]
module = "sender_blocklist"
blocked_senders = ["not-an-address"]
""")
    assert "Traceback" not in out.stderr
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        f"smtpgate: {tmp_path / 'smtpgate.toml'}: plugin[0].blocked_senders: must be e-mail "
        "addresses (local@domain), got 'not-an-address'"]


def test_check_config_register_raising(tmp_path: Path) -> None:
    out = _check_config(tmp_path, """
[[plugin]]
module = "tests.plugins.probe"
fail_register = true
""")
    assert "Traceback" not in out.stderr
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.splitlines()
    assert line.endswith("plugin[0]: plugin 'tests.plugins.probe': register() failed: "
                         "RuntimeError: probe told to fail"), line


def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    out = _check_config(tmp_path, """
[[plugin]]
module = "sender_blocklist"
blocked_senders = ["spam@bad.example"]
""")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{tmp_path / 'smtpgate.toml'}: OK\n"


# ------------------------------------------------------- timeout and on_error


@pytest.mark.parametrize(("answer", "reply"), [
    ("sleep", b"451 4.3.0 Hook timeout"),
    ("raise", b"451 4.3.0 Local error in processing, try again later"),
])
def test_timeout_or_exception_tempfails(run_app, raw, capture: Capture, examples_on_path: Path,
                                        answer: str, reply: bytes) -> None:
    app = run_app({"plugin": [
        blocklist(),
        probe(stages=["mail", "data"], answers={"mail": answer, "data": answer},
              when={"mail": "slow@"}, timeout=0.2),
    ]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<slow@example.org>") == reply
    assert send(c, "ann@example.org", "bob@example.com", MSG) == reply
    assert capture.messages == []


@pytest.mark.parametrize("answer", ["sleep", "raise"])
def test_on_error_accept_lets_the_message_through(run_app, raw, capture: Capture,
                                                  examples_on_path: Path, answer: str) -> None:
    app = run_app({"plugin": [
        blocklist(),
        probe(stages=["mail", "data"], answers={"mail": answer, "data": answer},
              timeout=0.2, on_error="accept"),
    ]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert send(c, "ann@example.org", "bob@example.com", MSG).startswith(b"250 ")
    assert len(capture.messages) == 1
    # the other plugins still decide
    assert c.cmd("MAIL FROM:<spam@bad.example>").startswith(b"550 5.7.1 ")


# ---------------------------------------------------------------- priorities


@pytest.mark.parametrize(("first", "second", "winner"), [
    (-5, 5, b"first list"),
    (5, -5, b"second list"),
    (0, 0, b"first list"),  # same priority: the order of the tables
])
def test_priorities_decide_which_reply_wins(run_app, raw, examples_on_path: Path,
                                            first: int, second: int, winner: bytes) -> None:
    app = run_app({"plugin": [
        blocklist(name="first", priority=first, reply_text="Refused by the first list"),
        blocklist(name="second", priority=second, reply_text="Refused by the second list"),
    ]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<spam@bad.example>") == b"550 5.7.1 Refused by the " + winner


def test_module_priority_is_the_default(run_app, raw, examples_on_path: Path) -> None:
    """Without ``priority`` in the table the module's ``PRIORITY`` (-10) applies: a
    probe at -20 runs first, one at 0 after."""
    app = run_app({"plugin": [
        probe(name="late", stages=["mail"], answers={"mail": "451 4.7.1 late"}, priority=0),
        blocklist(),
        probe(name="early", stages=["mail"], answers={"mail": "451 4.7.1 early"},
              when={"mail": "early@"}, priority=-20),
    ]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<early@example.org>") == b"451 4.7.1 early"
    assert c.cmd("MAIL FROM:<spam@bad.example>").startswith(b"550 5.7.1 Sender")
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"451 4.7.1 late"

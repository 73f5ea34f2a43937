"""qmail-spp (issue 10): the shell-script plugins of tests/filters/spp/plugins/, written
from the seed's README (003), run by a real smtpgate over loopback, under both event
loops (``run_app``). Each test asserts the replies byte for byte, what was delivered and
the files the plugins wrote."""

from __future__ import annotations

import logging
import os
import smtplib
import threading
from pathlib import Path
from typing import Any

import pytest

from smtpgate.errors import ConfigError
from tests.support import Capture, RawClient

PLUGINS = Path(__file__).resolve().parent / "plugins"
MSG = b"From: ann@example.org\r\nTo: bob@example.com\r\nSubject: spp\r\n\r\nbody\r\n"


def authenticate(username: str, password: str) -> bool:
    """``[auth] authenticator`` for the AUTH tests: one user."""
    return (username, password) == ("carol", "secret")


def spp(tmp_path: Path, text: str, **options: Any) -> dict[str, Any]:
    """Write ``smtpplugins`` (next to a ``plugins`` link to the test scripts) and return
    the configuration enabling qmail-spp with it."""
    link = tmp_path / "plugins"
    if not link.exists():
        link.symlink_to(PLUGINS)
    path = tmp_path / "smtpplugins"
    path.write_text(text)
    return {"plugin": [{"use": "qmail-spp", "plugins_file": str(path), **options}]}


def strict_relay(cfg: dict[str, Any]) -> dict[str, Any]:
    """No trusted networks: only example.com is accepted (so relay control decides)."""
    return {**cfg, "relay": {"local_networks": [], "relay_domains": ["example.com"]}}


def read_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and key.isidentifier():
            env[key] = value
    return env


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan whose reaper is slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone (also between open and read)
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def send_message(c: RawClient, sender: str, rcpts: list[str]) -> bytes:
    assert c.cmd(f"MAIL FROM:<{sender}>").startswith(b"250 ")
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>").startswith(b"250 ")
    assert c.cmd("DATA").startswith(b"354")
    c.send(MSG + b".\r\n")
    return c.read_reply()


# --------------------------------------------------------------- the seed's example


def test_seed_example_c_h_s_a_and_stderr(run_app, raw, capture: Capture, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """The README's RCPT plugin: C changes the recipient, H adds the header, S sets
    $spam, A turns qmail-spp off for the session (the refusing plugin after it and
    every later plugin never run), the stderr line is logged."""
    caplog.set_level(logging.INFO, logger="smtpgate")
    out = tmp_path / "out"
    out.mkdir()
    app = run_app(spp(tmp_path, f"""# smtpplugins for the seed example
[rcpt]
plugins/seed_example
:plugins/say "E550 5.7.1 not reached"
[data]
:plugins/envdump {out}/data.env
"""), deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<spammer@aol.example>") == b"250 2.1.0 Sender OK"
    assert c.cmd("RCPT TO:<bob@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("RCPT TO:<carol@example.com>") == b"250 2.1.5 Recipient OK"  # A: off
    assert c.cmd("DATA").startswith(b"354")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"250 ")
    envelope, message = capture.messages[0]
    assert envelope.recipients == ["spam@myhost.com", "carol@example.com"]
    assert Capture.strip_received(message) == b"X-Spam-Flag: YES\r\n" + MSG
    assert not (out / "data.env").exists()  # A: no [data] plugin ran
    logged = [r.getMessage() for r in caplog.records]
    assert any("redirected spam from <spammer@aol.example>" in m for m in logged), logged
    line = next(m for m in logged if "transaction id=" in m)
    assert "qmail-spp=accept" in line and "rcpt:bob@example.com->spam@myhost.com" in line


# ----------------------------------------------------------------- environment


def test_environment_at_every_section(run_app, raw, tmp_path: Path) -> None:
    """Each section's program sees qmail-spp's variables, the ucspi-tcp names and
    stdin on /dev/null; counts include rejected recipients in ...ALL only."""
    out = tmp_path / "out"
    out.mkdir()
    sections = "".join(f"[{s}]\n:plugins/envdump {out}/{s}.env\n"
                       for s in ("connection", "helo", "mail", "data", "auth"))
    cfg = strict_relay(spp(tmp_path, sections + f"[rcpt]\n:plugins/envdump "
                                                 f"{out}/rcpt.$SMTPRCPTCOUNTALL.env\n"))
    cfg["auth"] = {"authenticator": "tests.filters.spp.test_qmail_spp:authenticate",
                   "require_tls": False}
    app = run_app(cfg)
    c = raw(app.port)
    env = read_env(out / "connection.env")
    local_port = c.sock.getpeername()[1]
    assert env["PROTO"] == "TCP"
    assert env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCPREMOTEPORT"] == str(c.sock.getsockname()[1])
    assert env["TCPLOCALIP"] == "127.0.0.1"
    assert env["TCPLOCALPORT"] == str(local_port)
    assert env["TCPLOCALHOST"] == "mx.test"
    assert "TCPREMOTEHOST" not in env  # no reverse lookup: not known
    assert "SMTPHELOHOST" not in env and "RELAYCLIENT" not in env
    assert env["STDIN"] == "/dev/null"
    assert env["PATH"] == os.environ["PATH"]  # the server's own environment
    assert c.cmd("EHLO client.test").startswith(b"250")
    assert read_env(out / "helo.env")["SMTPHELOHOST"] == "client.test"
    assert c.cmd("MAIL FROM:<ann@example.org> SIZE=100") == b"250 2.1.0 Sender OK"
    env = read_env(out / "mail.env")
    assert env["SMTPMAILFROM"] == "ann@example.org"  # bare, no brackets or parameters
    assert c.cmd("RCPT TO:<bob@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("RCPT TO:<x@elsewhere.example>") == b"550 5.7.1 Relaying denied"
    assert c.cmd("RCPT TO:<dan@example.com>") == b"250 2.1.5 Recipient OK"
    first, refused, third = (read_env(out / f"rcpt.{n}.env") for n in (1, 2, 3))
    assert (first["SMTPRCPTTO"], first["SMTPRCPTCOUNT"], first["SMTPRCPTCOUNTALL"],
            first["SMTPRCPTHOSTSOK"]) == ("bob@example.com", "0", "1", "1")
    assert (refused["SMTPRCPTTO"], refused["SMTPRCPTCOUNT"], refused["SMTPRCPTCOUNTALL"],
            refused["SMTPRCPTHOSTSOK"]) == ("x@elsewhere.example", "1", "2", "0")
    assert (third["SMTPRCPTTO"], third["SMTPRCPTCOUNT"], third["SMTPRCPTCOUNTALL"],
            third["SMTPRCPTHOSTSOK"]) == ("dan@example.com", "1", "3", "1")
    assert c.cmd("DATA").startswith(b"354")
    env = read_env(out / "data.env")
    assert (env["SMTPHELOHOST"], env["SMTPMAILFROM"], env["SMTPRCPTTO"]) == (
        "client.test", "ann@example.org", "dan@example.com")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"250 ")
    assert c.cmd("AUTH PLAIN AGNhcm9sAHNlY3JldA==").startswith(b"235")  # carol / secret
    env = read_env(out / "auth.env")
    assert (env["SMTPAUTHUSER"], env["SMTPAUTHMETHOD"], env["RELAYCLIENT"]) == (
        "carol", "plain", "")


def test_s_and_u_carry_variables_through_the_session(run_app, raw, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """S at connection is seen at HELO and MAIL; U removes it (and one of the server's
    own variables) from then on."""
    monkeypatch.setenv("SPP_TEST_SERVER_VAR", "from-server")
    out = tmp_path / "out"
    out.mkdir()
    app = run_app(spp(tmp_path, f"""[connection]
:plugins/setvar spam=1 greeting=hello=world
[helo]
:plugins/envdump {out}/helo.env
:plugins/unsetvar spam SPP_TEST_SERVER_VAR
[mail]
:plugins/envdump {out}/mail.env
"""))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    env = read_env(out / "helo.env")
    assert (env["spam"], env["greeting"], env["SPP_TEST_SERVER_VAR"]) == (
        "1", "hello=world", "from-server")
    c.cmd("MAIL FROM:<ann@example.org>")
    env = read_env(out / "mail.env")
    assert "spam" not in env and "SPP_TEST_SERVER_VAR" not in env
    assert env["greeting"] == "hello=world"


# ------------------------------------------------------------------ replies


def test_e_refuses_the_command_with_the_plugins_text(run_app, raw, tmp_path: Path) -> None:
    """E: the plugin's own reply; its qmail-style (#5.7.1) becomes the enhanced code;
    a message without a code gets the stage's rejection code."""
    app = run_app(spp(tmp_path, """[mail]
plugins/badmailfrom
:plugins/badmailfrom spam@bad.example
[rcpt]
:test "$SMTPRCPTTO" = nocode@example.com && echo "Eno such user here"; true
:test "$SMTPRCPTTO" = soft@example.com && echo "E450 4.2.1 mailbox busy"; true
"""))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<spam@bad.example>") == (
        b"553 5.7.1 sorry, your envelope sender is in my badmailfrom list (#5.7.1)")
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"250 2.1.0 Sender OK"
    assert c.cmd("RCPT TO:<nocode@example.com>") == b"550 5.7.1 no such user here"
    assert c.cmd("RCPT TO:<soft@example.com>") == b"450 4.2.1 mailbox busy"
    assert c.cmd("RCPT TO:<bob@example.com>") == b"250 2.1.5 Recipient OK"


def test_p_lines_lead_the_reply(run_app, raw, tmp_path: Path) -> None:
    """P then E: a multi-line reply, every line with the final line's codes."""
    app = run_app(spp(tmp_path, "[rcpt]\nplugins/greylist\n"))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == (
        b"451-4.7.1 Greylisted: this is the first time 127.0.0.1 sends to bob@example.com"
        b"\r\n451 4.7.1 Please try again later")


def test_n_ends_the_plugins_but_not_the_checks(run_app, raw, tmp_path: Path) -> None:
    """N: the later plugins of the command do not run; relay control still does."""
    app = run_app(strict_relay(spp(tmp_path, """[rcpt]
:plugins/say N
:plugins/say "E550 5.7.1 not reached"
""")))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("RCPT TO:<x@elsewhere.example>") == b"550 5.7.1 Relaying denied"


def test_o_skips_relay_control(run_app, raw, capture: Capture, tmp_path: Path) -> None:
    """O at RCPT accepts without the relay check (qmail's rcpthosts), as qmail-spp."""
    app = run_app(strict_relay(spp(tmp_path, """[rcpt]
:plugins/whitelist trusted@partner.example
:plugins/say "E550 5.7.1 not reached for the trusted sender"
""")), deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"250 2.1.0 Sender OK"
    assert c.cmd("RCPT TO:<x@elsewhere.example>") == b"550 5.7.1 not reached for the " \
                                                     b"trusted sender"
    c.cmd("RSET")
    assert send_message(c, "trusted@partner.example", ["x@elsewhere.example"]).startswith(
        b"250 ")
    assert capture.messages[0][0].recipients == ["x@elsewhere.example"]


def test_p_with_o_extends_the_positive_reply(run_app, raw, tmp_path: Path) -> None:
    app = run_app(spp(tmp_path, "[mail]\n:plugins/say 'P250-Welcome back' O\n"))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<ann@example.org>") == (
        b"250-2.1.0 Welcome back\r\n250 2.1.0 Sender OK")


def test_lm_lr_ld_refuse_the_later_command_until_rset(run_app, raw, capture: Capture,
                                                      tmp_path: Path) -> None:
    """LM at connection: every MAIL gets the message (without running [mail]) until
    RSET; LR at MAIL refuses the RCPTs; LD at RCPT refuses DATA."""
    out = tmp_path / "out"
    out.mkdir()
    app = run_app(spp(tmp_path, f"""[connection]
:plugins/say "LM550 5.7.1 you were listed at connection time"
[mail]
:plugins/envdump {out}/mail.env
:test "$SMTPMAILFROM" = lr@example.org && plugins/say "LR451 4.7.1 later, rcpt"; true
[rcpt]
:test "$SMTPRCPTTO" = ld@example.com && plugins/say "LD554 5.7.1 no data for you"; true
"""), deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    for _ in range(2):
        assert c.cmd("MAIL FROM:<ann@example.org>") == (
            b"550 5.7.1 you were listed at connection time")
    assert not (out / "mail.env").exists()
    assert c.cmd("RSET") == b"250 2.0.0 Reset OK"
    assert c.cmd("MAIL FROM:<lr@example.org>") == b"250 2.1.0 Sender OK"
    assert c.cmd("RCPT TO:<bob@example.com>") == b"451 4.7.1 later, rcpt"
    assert c.cmd("RCPT TO:<carol@example.com>") == b"451 4.7.1 later, rcpt"
    assert c.cmd("RSET") == b"250 2.0.0 Reset OK"
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"250 2.1.0 Sender OK"
    assert c.cmd("RCPT TO:<ld@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("DATA") == b"554 5.7.1 no data for you"
    assert c.cmd("RSET") == b"250 2.0.0 Reset OK"
    assert send_message(c, "ann@example.org", ["bob@example.com"]).startswith(b"250 ")
    assert len(capture.messages) == 1


def test_r_replies_and_disconnects(run_app, raw, tmp_path: Path) -> None:
    """R at connection: the message instead of the greeting, then the connection is
    closed; R at HELO the same after EHLO."""
    app = run_app(spp(tmp_path, """[connection]
:plugins/rbl 127.0.0.1
[helo]
:test "$SMTPHELOHOST" = bad.test && plugins/say "R421 4.7.0 bad HELO, bye"; true
"""))
    c = raw(app.port)
    assert c.greeting == b"554 5.7.1 Your address 127.0.0.1 is listed; closing"
    assert c.closed_by_peer()
    app2 = run_app(spp(tmp_path, """[helo]
:test "$SMTPHELOHOST" = bad.test && plugins/say "R421 4.7.0 bad HELO, bye"; true
"""))
    c = raw(app2.port)
    assert c.cmd("EHLO good.test").startswith(b"250")
    assert c.cmd("EHLO bad.test") == b"421 4.7.0 bad HELO, bye"
    assert c.closed_by_peer()


def test_d_drops_the_connection(run_app, raw, tmp_path: Path) -> None:
    """D: the connection is closed (smtpgate says 421 first, RFC 5321 §3.8)."""
    app = run_app(spp(tmp_path, """[mail]
:test "$SMTPMAILFROM" = bad@example.org && plugins/drop; true
"""))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<good@example.org>") == b"250 2.1.0 Sender OK"
    c.cmd("RSET")
    assert c.cmd("MAIL FROM:<bad@example.org>") == b"421 4.7.0 Closing connection"
    assert c.closed_by_peer()


def test_h_headers_in_order_at_the_top(run_app, capture: Capture, tmp_path: Path) -> None:
    """H from [connection], [mail] and [data] plugins, in the order printed, right after
    smtpgate's Received; they belong to the session's first message only."""
    app = run_app(spp(tmp_path, """[connection]
:plugins/headers "X-Spp-Connect: 1"
[mail]
:plugins/headers "X-Spp-Mail: $SMTPMAILFROM" "X-Spp-Second: two"
[data]
:plugins/headers "X-Spp-Data: yes"
:plugins/headers "not a header line"
"""), deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo("client.test")
        s.sendmail("ann@example.org", ["bob@example.com"], MSG)
        s.sendmail("dan@example.org", ["bob@example.com"], MSG)
    first = Capture.strip_received(capture.messages[0][1])
    second = Capture.strip_received(capture.messages[1][1])
    assert first == (b"X-Spp-Connect: 1\r\nX-Spp-Mail: ann@example.org\r\n"
                     b"X-Spp-Second: two\r\nX-Spp-Data: yes\r\n" + MSG)
    assert second == (b"X-Spp-Mail: dan@example.org\r\nX-Spp-Second: two\r\n"
                      b"X-Spp-Data: yes\r\n" + MSG)


def test_c_changes_sender_and_recipient(run_app, capture: Capture, tmp_path: Path) -> None:
    """C at MAIL changes the sender (and SMTPMAILFROM for the later plugins); C at RCPT
    the recipient."""
    out = tmp_path / "out"
    out.mkdir()
    app = run_app(spp(tmp_path, f"""[mail]
:plugins/rewrite SMTPMAILFROM old@example.org new@example.org
:plugins/envdump {out}/mail.env
[rcpt]
:plugins/rewrite SMTPRCPTTO bob@example.com robert@example.com
"""), deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo("client.test")
        s.sendmail("old@example.org", ["bob@example.com", "carol@example.com"], MSG)
    envelope, _ = capture.messages[0]
    assert envelope.mail_from == "new@example.org"
    assert envelope.recipients == ["robert@example.com", "carol@example.com"]
    assert read_env(out / "mail.env")["SMTPMAILFROM"] == "new@example.org"


# ------------------------------------------------------------- NOSPP, SPPCONFFILE


def test_nospp_in_server_environment(run_app, raw, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOSPP", "")
    app = run_app(spp(tmp_path, "[mail]\n:plugins/badmailfrom spam@bad.example\n"))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<spam@bad.example>") == b"250 2.1.0 Sender OK"


def test_nospp_set_by_a_plugin(run_app, raw, tmp_path: Path) -> None:
    """S NOSPP=... at connection: no plugin runs in that session (the next one again)."""
    app = run_app(spp(tmp_path, """[connection]
:test -e nospp-now && plugins/setvar NOSPP=1; true
[mail]
:plugins/badmailfrom spam@bad.example
"""))
    (tmp_path / "nospp-now").touch()
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<spam@bad.example>") == b"250 2.1.0 Sender OK"
    (tmp_path / "nospp-now").unlink()
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<spam@bad.example>").startswith(b"553 5.7.1 ")


def test_sppconffile_overrides_plugins_file(run_app, raw, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "plugins").symlink_to(PLUGINS)
    (other / "smtpplugins.alt").write_text(
        "[mail]\n:plugins/say 'E550 5.7.1 from the SPPCONFFILE file'\n")
    monkeypatch.setenv("SPPCONFFILE", str(other / "smtpplugins.alt"))
    app = run_app(spp(tmp_path, "[mail]\n:plugins/say 'E550 5.7.1 from plugins_file'\n"))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"550 5.7.1 from the SPPCONFFILE file"


# ------------------------------------------------------------- failures


def test_slow_plugin_is_killed_at_the_timeout(run_app, raw, tmp_path: Path) -> None:
    """A plugin still running after ``timeout``: 451 4.3.0, and it (with its child) is
    killed; the session goes on."""
    pids = tmp_path / "slow.pids"
    app = run_app(spp(tmp_path, f"[mail]\n:plugins/slow {pids}\n", timeout=1))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<ann@example.org>") == (
        f"451 4.3.0 qmail-spp failure: :plugins/slow {pids}: timeout after 1s".encode())
    for pid in pids.read_text().split():
        assert not running(int(pid))
    assert c.cmd("NOOP") == b"250 2.0.0 OK"


def test_slow_plugin_with_on_error_accept_is_skipped(run_app, raw, tmp_path: Path) -> None:
    pids = tmp_path / "slow.pids"
    app = run_app(spp(tmp_path, f"""[mail]
:plugins/slow {pids}
:plugins/say "E550 5.7.1 the next plugin ran"
""", timeout=1, on_error="accept"))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"550 5.7.1 the next plugin ran"


@pytest.mark.parametrize("program, reason", [
    ("plugins/crash", "child crashed (signal 11)"),
    ("plugins/exit120", "can't execute (exit 120)"),
])
def test_crashing_plugin_gives_451(run_app, raw, tmp_path: Path, program: str,
                                   reason: str) -> None:
    app = run_app(spp(tmp_path, f"[rcpt]\n{program}\n"))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == (
        f"451 4.3.0 qmail-spp failure: {program}: {reason}".encode())
    assert c.cmd("NOOP") == b"250 2.0.0 OK"


def test_other_exit_status_is_not_a_failure(run_app, capture: Capture,
                                            tmp_path: Path) -> None:
    app = run_app(spp(tmp_path, "[rcpt]\nplugins/exit1\n"), deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.sendmail("ann@example.org", ["bob@example.com"], MSG)
    assert Capture.strip_received(capture.messages[0][1]) == b"X-Exit-One: yes\r\n" + MSG


# ------------------------------------------------------- concurrency, bound


def test_programs_do_not_block_other_sessions(run_app, raw, tmp_path: Path) -> None:
    """While one session's plugin runs, another session is served in full."""
    go = tmp_path / "go"
    app = run_app(spp(tmp_path, f"[mail]\n:plugins/gate slow@example.org {go}\n"))
    slow = raw(app.port)
    slow.cmd("EHLO slow.test")
    replies: list[bytes] = []
    t = threading.Thread(target=lambda: replies.append(slow.cmd("MAIL FROM:<slow@example.org>")))
    t.start()
    try:
        with smtplib.SMTP("127.0.0.1", app.port, timeout=10) as s:
            s.ehlo("fast.test")
            assert s.mail("fast@example.org") == (250, b"2.1.0 Sender OK")
            assert s.rcpt("bob@example.com")[0] == 250
        assert not replies  # the slow plugin is still waiting for the file
    finally:
        go.touch()
        t.join(20)
    assert replies == [b"250 2.1.0 Sender OK"]


def test_max_processes_bounds_running_programs(run_app, tmp_path: Path) -> None:
    """max_processes = 1: the plugins of concurrent sessions never overlap."""
    app = run_app(spp(tmp_path, f"[mail]\n:plugins/exclusive {tmp_path}\n", max_processes=1))
    replies: list[tuple[int, bytes]] = []

    def session() -> None:
        with smtplib.SMTP("127.0.0.1", app.port, timeout=20) as s:
            s.ehlo("client.test")
            replies.append(s.mail("ann@example.org"))

    threads = [threading.Thread(target=session) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert replies == [(250, b"2.1.0 Sender OK")] * 4


# ------------------------------------------------------------ configuration


def test_missing_plugins_file_is_a_configuration_error(tmp_path: Path) -> None:
    from smtpgate.app import Smtpgate

    with pytest.raises(ConfigError) as info:
        Smtpgate({"plugin": [{"use": "qmail-spp", "plugins_file": str(tmp_path / "nope")}]})
    assert info.value.problems == [
        f"plugin[0].plugins_file: cannot read {tmp_path / 'nope'}: No such file or directory"]


def test_missing_program_is_a_configuration_error(tmp_path: Path) -> None:
    from smtpgate.app import Smtpgate

    cfg = spp(tmp_path, "[rcpt]\nplugins/no-such-plugin\n:plugins/anything goes here\n")
    with pytest.raises(ConfigError) as info:
        Smtpgate(cfg)
    path = tmp_path / "smtpplugins"
    assert info.value.problems == [
        f"plugin[0].plugins_file: {path}:2: [rcpt] plugins/no-such-plugin: no such program "
        f"({tmp_path / 'plugins/no-such-plugin'})"]


def test_bad_max_processes(tmp_path: Path) -> None:
    from smtpgate.app import Smtpgate

    with pytest.raises(ConfigError) as info:
        Smtpgate(spp(tmp_path, "", max_processes=0))
    assert info.value.problems == ["plugin[0].max_processes: must be >= 1"]


def test_e_at_connection_is_the_greeting(run_app, raw, tmp_path: Path) -> None:
    """E at connection: qmail-smtpd prints the message instead of its greeting and
    goes on; smtpgate sends it as the greeting (RFC 5321 §3.1: 554, session open)."""
    app = run_app(spp(tmp_path, "[connection]\n:plugins/say 'E554 5.7.1 no service here'\n"))
    c = raw(app.port)
    assert c.greeting == b"554 5.7.1 no service here"
    assert c.cmd("QUIT").startswith(b"221")


def test_e_at_auth_refuses_the_authentication(run_app, raw, tmp_path: Path) -> None:
    """[auth] runs after a successful exchange; E refuses it (the client is not
    authenticated: relaying stays denied)."""
    cfg = strict_relay(spp(tmp_path, """[auth]
:test "$SMTPAUTHUSER" = carol && plugins/say "E535 5.7.8 carol may not send from here"; true
"""))
    cfg["auth"] = {"authenticator": "tests.filters.spp.test_qmail_spp:authenticate",
                   "require_tls": False}
    app = run_app(cfg)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("AUTH PLAIN AGNhcm9sAHNlY3JldA==") == (
        b"535 5.7.8 carol may not send from here")
    c.cmd("MAIL FROM:<carol@example.org>")
    assert c.cmd("RCPT TO:<x@elsewhere.example>") == b"550 5.7.1 Relaying denied"

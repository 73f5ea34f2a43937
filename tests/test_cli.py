"""The command-line interface, run as real subprocesses."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

from smtpgate.auth.users import load_users, verify_password

SMTPGATE = [sys.executable, "-m", "smtpgate"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not start")


def test_serve_embedded_default_then_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*SMTPGATE, "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "info"],
        cwd=tmp_path, stderr=subprocess.PIPE,
    )
    try:
        wait_port(port, proc)
        msg = b"Subject: cli\r\n\r\nhello\r\n"
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("a@example.org", ["b@example.com"], msg)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"listening on 127.0.0.1:{port}" in err
    assert str((tmp_path / "smtpgate-mail").resolve()) in err
    assert "transaction id=" in err and "outcome=delivered" in err
    files = list((tmp_path / "smtpgate-mail" / "new").iterdir())
    assert len(files) == 1
    assert files[0].read_bytes().endswith(b"\r\n\r\nSubject: cli\r\n\r\nhello\r\n"[-22:])


def test_check_config_ok_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nlisten = ["127.0.0.1:2525"]\n[relay]\nurl = "discard:"\n')
    out = subprocess.run([*SMTPGATE, "check-config", "-c", str(good)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nmax_recipents = 5\nlisten = ["nope"]\n'
                   '[relay]\nurl = "plain://u:Secr3t@host"\n[hooks]\nrcpt = "x"\n')
    out = subprocess.run([*SMTPGATE, "check-config", "-c", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "server.max_recipents" in out.stderr and "max_recipients" in out.stderr
    assert "server.listen" in out.stderr
    assert "hooks.rcpt" in out.stderr
    assert "Secr3t" not in out.stderr


def test_user_add_reads_password_from_stdin(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    out = subprocess.run([*SMTPGATE, "user", "add", "--users-file", str(users), "alice@example.org"],
                         input="pa55word\n", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    table = load_users(users)
    assert verify_password(table["alice@example.org"], "pa55word")
    assert not verify_password(table["alice@example.org"], "wrong")
    assert oct(users.stat().st_mode & 0o777) == "0o600"
    assert "pa55word" not in users.read_text()


def test_send_command_through_smtpgate(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([*SMTPGATE, "serve", "--listen", f"127.0.0.1:{port}"],
                            cwd=tmp_path, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        msg = tmp_path / "m.eml"
        msg.write_bytes(b"Subject: sent\n\nvia smtpgate send\n")
        out = subprocess.run(
            [*SMTPGATE, "send", "a@example.org", "b@example.com", "-f", str(msg),
             "--server", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("250")
    finally:
        proc.terminate()
        proc.wait(10)
    files = list((tmp_path / "smtpgate-mail" / "new").iterdir())
    assert files and files[0].read_bytes().endswith(b"Subject: sent\r\n\r\nvia smtpgate send\r\n")


def test_version() -> None:
    out = subprocess.run([*SMTPGATE, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("smtpgate ")


def test_serve_bind_failure_exit_code(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([*SMTPGATE, "serve", "--listen", f"127.0.0.1:{port}"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "cannot listen" in out.stderr


BATCH = (b"EHLO batch.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
         b"Subject: bsmtp\r\n\r\n..dot\r\n.\r\nQUIT\r\n")


def test_bsmtp_batch_on_stdin(tmp_path: Path) -> None:
    out = subprocess.run([*SMTPGATE, "bsmtp"], input=BATCH, capture_output=True, cwd=tmp_path,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split(b"\r\n")
    assert lines[0].startswith(b"220 ")
    codes = [ln[:3] for ln in lines if ln[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    files = list((tmp_path / "smtpgate-mail" / "new").iterdir())
    assert len(files) == 1 and files[0].read_bytes().endswith(b"Subject: bsmtp\r\n\r\n.dot\r\n")


def test_bsmtp_accepts_lf_batch_files(tmp_path: Path) -> None:
    out = subprocess.run([*SMTPGATE, "bsmtp"], input=BATCH.replace(b"\r\n", b"\n"),
                         capture_output=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and b"250 2.0.0 Message stored" in out.stdout


def test_inetd_mode_stdin_is_a_socket(tmp_path: Path) -> None:
    # inetd hands the accepted TCP connection over as stdin/stdout.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    ours = socket.create_connection(lsock.getsockname())
    theirs, _ = lsock.accept()
    lsock.close()
    proc = subprocess.Popen([*SMTPGATE, "inetd"], stdin=theirs, stdout=theirs,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    theirs.close()
    try:
        ours.settimeout(20)
        f = ours.makefile("rb")
        assert f.readline().startswith(b"220 ")
        ours.sendall(BATCH)
        replies: list[bytes] = []
        while not replies or not replies[-1].startswith((b"221", b"421")) and replies[-1]:
            replies.append(f.readline())
        assert replies[-1].startswith(b"221 2.0.0")
        assert any(r.startswith(b"250 2.0.0 Message stored") for r in replies)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        ours.close()


def test_policy_test_mode_shows_decisions(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[relay]\nrelay_domains = ["example.com"]\nlocal_networks = ["10.0.0.0/8"]\n')
    script = (b"EHLO probe\nMAIL FROM:<a@example.org>\nRCPT TO:<b@example.com>\n"
              b"RCPT TO:<c@elsewhere.org>\nQUIT\n")
    out = subprocess.run([*SMTPGATE, "policy-test", "-c", str(cfg), "--client-ip", "192.0.2.7"],
                         input=script, capture_output=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0
    assert b"250 2.1.5 Recipient OK" in out.stdout
    assert b"550 5.7.1 Relaying denied" in out.stdout
    err = out.stderr.decode()
    assert "session as if from [192.0.2.7]" in err
    assert "relay allowed" in err and "client=192.0.2.7" in err and "relay denied" in err
    out = subprocess.run([*SMTPGATE, "policy-test", "-c", str(cfg), "--client-ip", "10.1.2.3"],
                         input=script, capture_output=True, cwd=tmp_path, timeout=60)
    assert b"550 5.7.1" not in out.stdout


def test_pid_file(tmp_path: Path) -> None:
    port = free_port()
    pid_file = tmp_path / "smtpgate.pid"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\npid_file = "{pid_file}"\n')
    proc = subprocess.Popen([*SMTPGATE, "serve", "-c", str(cfg)], cwd=tmp_path,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        assert int(pid_file.read_text()) == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()

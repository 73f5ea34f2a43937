"""Issue 8, findings 5, 6 and 7: ``check-config`` and ``serve`` share one validation path,
no CLI command ends in a traceback, and the queue tools read an existing spool only.

Every test runs ``python -m smtpgate`` as a real subprocess and looks at its exit code,
its stderr lines and the files it left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from smtpgate.envelope import Envelope, Recipient
from smtpgate.queue.store import QueueStore

SMTPGATE = [sys.executable, "-m", "smtpgate"]


def run(*args: str, cwd: Path, stdin: object = subprocess.DEVNULL,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    kwargs: dict[str, object] = {"input": input} if input is not None else {"stdin": stdin}
    return subprocess.run([*SMTPGATE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, **kwargs)  # type: ignore[call-overload]


def error_line(out: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert exit ``code`` and exactly one stderr line without a traceback; return it."""
    lines = out.stderr.splitlines()
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, (out.returncode, out.stderr)
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("smtpgate: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Finding 5: check-config <=> serve
# --------------------------------------------------------------------------------------------

LISTEN = '[server]\nlisten = ["127.0.0.1:0"]\n'


def _garbage_cert(d: Path) -> str:
    (d / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    return '[tls]\ncertificate = "cert.pem"\n'


def _bad_users(d: Path) -> str:
    (d / "users").write_text("alice-without-a-hash\n")
    return '[auth]\nusers_file = "users"\n'


def _maildir_under_a_file(d: Path) -> str:
    (d / "plainfile").write_text("x")
    return '[maildir]\npath = "plainfile/mail"\n'


BAD_CONFIGS: dict[str, tuple[Callable[[Path], str], str]] = {
    "smtp-credentials": (lambda d: '[relay]\nurl = "smtp://bob:pw@localhost:25"\n',
                         "relay.url: "),
    "plain-with-path": (lambda d: '[relay]\nurl = "plain://bob:pw@host:587/path"\n',
                        "relay.url: "),
    "password-with-space": (lambda d: '[relay]\nurl = "plain://bob:p w@host:587"\n',
                            "relay.url: "),
    "queue-mode-discard": (lambda d: '[delivery]\nmode = "queue"\n[relay]\nurl = "discard:"\n',
                           "delivery.mode: "),
    "spool-in-proc": (lambda d: '[relay]\nurl = "smtp://127.0.0.1:1"\n'
                                '[queue]\npath = "/proc/smtpgate-queue"\n', "queue.path: "),
    "maildir-in-proc": (lambda d: '[maildir]\npath = "/proc/smtpgate-mail"\n', "maildir.path: "),
    "maildir-under-a-file": (_maildir_under_a_file, "maildir.path: "),
    "hook-not-importable": (lambda d: '[hooks]\nrcpt = "no_such_module_x.hooks:rcpt"\n',
                            "hooks.rcpt: "),
    "tls-certificate-garbage": (_garbage_cert, "tls.certificate: "),
    "implicit-tls-without-certificate": (
        lambda d: '[[listener]]\naddress = "127.0.0.1:0"\ntls = "implicit"\n',
        "listener[0].tls: "),
    "pid-file-directory-missing": (lambda d: 'pid_file = "no/such/dir/smtpgate.pid"\n',
                                   "server.pid_file: "),
    "quarantine-in-proc": (lambda d: '[[scanner]]\ntype = "clamav"\naction = "quarantine"\n'
                                     'quarantine_path = "/proc/quarantine"\n',
                           "scanner[0].quarantine_path: "),
    "users-file-malformed": (_bad_users, "auth.users_file: "),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_refused_alike_by_check_config_and_serve(tmp_path: Path,
                                                                   case: str) -> None:
    make, key = BAD_CONFIGS[case]
    conf = tmp_path / "smtpgate.toml"
    conf.write_text(LISTEN + make(tmp_path))
    checked = error_line(run("check-config", "-c", str(conf), cwd=tmp_path), 2)
    served = error_line(run("serve", "-c", str(conf), cwd=tmp_path), 2)
    assert checked == served
    assert checked.startswith(f"smtpgate: {conf}: {key}"), checked
    if key == "relay.url: ":
        assert "bob:***@" in checked and "pw" not in checked  # never the relay password
    assert not (tmp_path / "smtpgate-mail").exists()
    assert not (tmp_path / "smtpgate-queue").exists()


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    conf = tmp_path / "smtpgate.toml"
    conf.write_text(LISTEN + '[hooks]\nmail = "no_such_module_y:f"\n'
                    '[maildir]\npath = "/proc/m"\n' + _garbage_cert(tmp_path))
    out = run("check-config", "-c", str(conf), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    keys = sorted(line.split(": ")[2] for line in out.stderr.splitlines())
    assert keys == ["hooks.mail", "maildir.path", "tls.certificate"], out.stderr


GOOD_CONFIGS: dict[str, str] = {
    "maildir-relative": '[maildir]\npath = "mail"\n',
    "queue-relative-spool": '[relay]\nurl = "smtp://127.0.0.1:9"\n[queue]\npath = "spool"\n'
                            "delivery_process = false\n",
    "mx": '[relay]\nurl = "mx:"\n[queue]\npath = "spool"\ndelivery_process = false\n',
    "plain-percent-encoded-space": '[relay]\nurl = "plain://bob:p%20w@127.0.0.1:9"\n'
                                   '[delivery]\nmode = "proxy"\n',
    "discard": '[relay]\nurl = "discard:"\n',
}


@pytest.mark.parametrize("case", list(GOOD_CONFIGS))
def test_what_check_config_accepts_serve_starts(tmp_path: Path, case: str) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = etc / "smtpgate.toml"
    conf.write_text(LISTEN + GOOD_CONFIGS[case])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = run("check-config", "-c", str(conf), cwd=cwd)
    assert out.returncode == 0 and out.stdout.strip() == f"{conf}: OK", out.stderr
    assert sorted(os.listdir(etc)) == ["smtpgate.toml"]  # check-config creates nothing
    proc = subprocess.Popen([*SMTPGATE, "serve", "-c", str(conf)], cwd=cwd,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:
            seen.append(line)
            if " listening on " in line:
                break
        else:
            raise AssertionError(f"serve did not start: {''.join(seen)}")
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(30) == 0, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(seen) + rest
    assert os.listdir(cwd) == []  # relative paths are next to the file, not in the cwd


# --------------------------------------------------------------------------------------------
# Finding 6: one line, an exit code, no traceback
# --------------------------------------------------------------------------------------------


def test_send_missing_file(tmp_path: Path) -> None:
    line = error_line(run("send", "a@example.org", "b@example.com", "-f", "missing.eml",
                          cwd=tmp_path), 2)
    assert "missing.eml" in line and "No such file" in line


def test_scan_missing_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[[scanner]]\ntype = "clamav"\naddress = "127.0.0.1:9"\n')
    line = error_line(run("scan", "virus", "missing.eml", "-c", str(conf), cwd=tmp_path), 2)
    assert "missing.eml" in line and "No such file" in line


def test_user_add_into_missing_directory(tmp_path: Path) -> None:
    line = error_line(run("user", "add", "--users-file", "/missing/dir/u", "NAME",
                          cwd=tmp_path, input="secret\n"), 2)
    assert "/missing/dir/u" in line
    assert not Path("/missing").exists()


def test_inetd_without_a_socket(tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("QUIT\r\n")
    with batch.open("rb") as f:
        line = error_line(run("inetd", cwd=tmp_path, stdin=f), 2)
    assert "not a socket" in line


def test_queue_list_spool_in_proc(tmp_path: Path) -> None:
    line = error_line(run("queue", "list", "--spool", "/proc/q", cwd=tmp_path), 2)
    assert "/proc/q" in line and "not a spool directory" in line
    assert not Path("/proc/q").exists()


def test_config_file_missing(tmp_path: Path) -> None:
    line = error_line(run("serve", "-c", "nope.toml", cwd=tmp_path), 2)
    assert line == "smtpgate: nope.toml: configuration file not found"


def test_log_level_debug_adds_the_traceback(tmp_path: Path) -> None:
    out = run("send", "a@example.org", "b@example.com", "-f", "missing.eml",
              "--log-level", "debug", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback (most recent call last)" in out.stderr
    assert out.stderr.splitlines()[-1].startswith("smtpgate: missing.eml: ")


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    out = run("--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "exit codes:" in out.stdout
    for code in ("0  success", "1  runtime failure", "2  configuration or usage error"):
        assert code in out.stdout
    for cmd in (["serve"], ["check-config"], ["bsmtp"], ["send"], ["queue", "list"],
                ["user", "add"]):
        sub = run(*cmd, "--help", cwd=tmp_path)
        assert sub.returncode == 0 and "exit codes:" in sub.stdout, cmd
        assert "--log-level" in sub.stdout, cmd


# --------------------------------------------------------------------------------------------
# Finding 7: queue tools
# --------------------------------------------------------------------------------------------

MSG = b"Subject: queued\r\n\r\nbody\r\n"


def make_spool(path: Path) -> str:
    store = QueueStore(path, fsync=False)
    entry = store.enqueue(Envelope("a@example.org", {}, [Recipient("b@example.com", {})]), MSG)
    return entry.id


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_queue_list_reads_the_spool_named_by_the_config_file(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    qid = make_spool(etc / "spool")
    conf = etc / "smtpgate.toml"
    conf.write_text('[relay]\nurl = "smtp://127.0.0.1:9"\n[queue]\npath = "spool"\n')
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = run("queue", "list", "-c", str(conf), cwd=cwd)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("-Queue ID-") and lines[1].startswith(qid)
    assert lines[-1].endswith("Kbytes in 1 Request.")
    assert os.listdir(cwd) == []


def test_queue_list_default_spool_is_next_to_the_config_file(tmp_path: Path) -> None:
    qid = make_spool(tmp_path / "smtpgate-queue")
    conf = tmp_path / "smtpgate.toml"
    conf.write_text('[relay]\nurl = "smtp://127.0.0.1:9"\n')
    out = run("queue", "list", "-c", str(conf), cwd=Path("/"))
    assert out.returncode == 0 and qid in out.stdout, out.stderr


@pytest.mark.parametrize("how", ["--spool", "-c"])
def test_missing_spool_is_an_error_and_is_not_created(tmp_path: Path, how: str) -> None:
    conf = tmp_path / "smtpgate.toml"
    conf.write_text('[queue]\npath = "typo"\n')
    arg = str(tmp_path / "typo") if how == "--spool" else str(conf)
    for cmd in ("list", "flush"):
        line = error_line(run("queue", cmd, how, arg, cwd=tmp_path), 2)
        assert str(tmp_path / "typo") in line and "not a spool directory" in line
    line = error_line(run("queue", "show", how, arg, "SOMEID", cwd=tmp_path), 2)
    assert not (tmp_path / "typo").exists()


def test_list_and_show_change_nothing(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    qid = make_spool(spool)
    bad = spool / "deferred" / "BROKEN.json"
    bad.write_text("{not json")
    before = tree(spool)
    out = run("queue", "list", "--spool", str(spool), cwd=tmp_path)
    assert out.returncode == 0 and qid in out.stdout and "Kbytes in 1 Request." in out.stdout
    assert "BROKEN" in out.stderr and "Traceback" not in out.stderr  # reported, not moved
    out = run("queue", "list", "--json", "--spool", str(spool), cwd=tmp_path)
    assert [e["id"] for e in json.loads(out.stdout)] == [qid]
    out = run("queue", "show", "--spool", str(spool), qid, cwd=tmp_path)
    assert out.returncode == 0 and "Subject: queued" in out.stdout
    line = error_line(run("queue", "show", "--spool", str(spool), "BROKEN", cwd=tmp_path), 1)
    assert "BROKEN" in line
    assert tree(spool) == before
    assert bad.read_text() == "{not json"
    assert os.listdir(spool / "corrupt") == []

"""The administrators' command line (issue 12, "CLI for administrators"): ``config show``,
``queue list|delete|hold|release`` like mailq/postsuper, ``sessions`` and ``reload``
through the admin API of a real running ``smtpgate serve`` (started with ``--admin``),
and ``serve --admin``. Every command runs as a ``python -m smtpgate`` subprocess; the
tests look at stdout, the one-line stderr and the exit code.

The server is ready when it says so over ``$NOTIFY_SOCKET`` (sd_notify ``READY=1``); it
runs under each event loop (``[server] use_uvloop`` false / true).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgate.envelope import Envelope, Recipient
from smtpgate.queue.store import QueueStore

from ..support import free_port

SMTPGATE = [sys.executable, "-m", "smtpgate"]
WAIT = 60.0  # a bound on waiting (a failing test stops there), not a timed assertion
MSG = b"From: a@example.org\r\nSubject: queued\r\n\r\n" + b"body line\r\n" * 200


def run(*args: str, cwd: Path | None = None, data: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SMTPGATE, *args], cwd=cwd, input=data, capture_output=True,
                          text=True, timeout=WAIT,
                          stdin=None if data is not None else subprocess.DEVNULL)


def one_error(out: subprocess.CompletedProcess[str], code: int) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smtpgate: "), out.stderr
    return lines[0]




# ---------------------------------------------------------------------- config show

CONFIG = """\
[server]
listen = ["127.0.0.1:2600", "[::1]:2600"]
max_recipients = 50
greeting = "%H ESMTP \\"quoted\\" back\\\\slash"
[relay]
relay_domains = ["example.org"]
[queue]
path = "spool"
[admin]
listen = "127.0.0.1:8026"
[[scanner]]
type = "rspamd"
address = "127.0.0.1:11333"
[[plugin]]
use = "tarpit"
priority = 5
"""


def test_config_show_prints_every_key_and_marks_the_changed_ones(tmp_path: Path) -> None:
    conf = tmp_path / "smtpgate.toml"
    conf.write_text(CONFIG)
    out = run("config", "show", "-c", str(conf))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert 'listen = ["127.0.0.1:2600", "[::1]:2600"]  # default: ["127.0.0.1:2525"]' in lines
    assert "max_recipients = 50  # default: 100" in lines
    assert "max_message_size = 10485760" in lines  # a default, unmarked
    assert f'path = "{tmp_path / "spool"}"  # default: "{tmp_path / "smtpgate-queue"}"' in lines
    assert f'path = "{tmp_path / "smtpgate-mail"}"' in lines  # maildir default, resolved
    assert '[[scanner]]' in lines and 'type = "rspamd"' in lines
    for section in ("[server]", "[tls]", "[auth]", "[relay]", "[maildir]", "[hooks]", "[log]",
                    "[admin]", "[capture]", "[delivery]", "[queue]", "[dns]"):
        assert section in lines
    assert "# limit_exceptions is unset (default)" in lines


def test_config_show_output_is_a_configuration_check_config_accepts(tmp_path: Path) -> None:
    conf = tmp_path / "smtpgate.toml"
    conf.write_text(CONFIG)
    (tmp_path / "spool").mkdir()
    shown = tmp_path / "shown.toml"
    shown.write_text(run("config", "show", "-c", str(conf)).stdout)
    checked = run("check-config", "-c", str(shown))
    assert checked.returncode == 0 and checked.stdout == f"{shown}: OK\n", checked.stderr
    again = run("config", "show", "-c", str(shown))
    assert again.stdout.splitlines()[1:] == shown.read_text().splitlines()[1:]  # a fixpoint
    # and -n of the shown file is -n of the original: the same effective configuration
    assert (run("config", "show", "-n", "-c", str(shown)).stdout.splitlines()[1:]
            == run("config", "show", "-n", "-c", str(conf)).stdout.splitlines()[1:])


def test_config_show_n_prints_only_non_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "smtpgate.toml"
    conf.write_text(CONFIG)
    out = run("config", "show", "-n", "-c", str(conf))
    assert out.returncode == 0
    body = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith("#")]
    assert body == [
        "[server]",
        'listen = ["127.0.0.1:2600", "[::1]:2600"]  # default: ["127.0.0.1:2525"]',
        "max_recipients = 50  # default: 100",
        'greeting = "%H ESMTP \\"quoted\\" back\\\\slash"  # default: "%H ESMTP smtpgate"',
        "[relay]",
        'relay_domains = ["example.org"]  # default: []',
        "[admin]",
        'listen = "127.0.0.1:8026"  # default: ""',
        "[queue]",
        f'path = "{tmp_path / "spool"}"  # default: "{tmp_path / "smtpgate-queue"}"',
        "[[scanner]]",
        'type = "rspamd"',
        'address = "127.0.0.1:11333"  # default: ""',
        "[[plugin]]",
        'use = "tarpit"',
        "priority = 5  # default: 0",
    ]


def test_config_show_without_a_file_shows_the_defaults() -> None:
    out = run("config", "show", "-n")
    assert out.returncode == 0
    assert [ln for ln in out.stdout.splitlines() if ln and not ln.startswith("#")] == []
    assert "listen = [\"127.0.0.1:2525\"]" in run("config", "show").stdout.splitlines()


def test_config_show_of_a_bad_file_is_one_line_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("[server]\nmax_recipients = -1\n")
    line = one_error(run("config", "show", "-c", str(conf)), 2)
    assert line.startswith(f"smtpgate: {conf}: server.max_recipients")
    line = one_error(run("config", "show", "-c", str(tmp_path / "missing.toml")), 2)
    assert "not found" in line


# ---------------------------------------------------------------------- queue (mailq/postsuper)

def make_spool(path: Path, n: int) -> list[str]:
    store = QueueStore(path)
    ids = []
    for i in range(n):
        entry = store.enqueue(Envelope(f"s{i}@example.com" if i else "",
                                       rcpt_to=[Recipient(f"r{i}@example.org"),
                                                Recipient("all@example.org")]), MSG)
        ids.append(entry.id)
    return ids


def test_queue_list_is_like_mailq(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    ids = make_spool(spool, 3)
    out = run("queue", "list", "--spool", str(spool))
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    assert re.fullmatch(r"-Queue ID- *--Size-- ----Arrival Time---- -Sender/Recipient-------",
                        lines[0])
    width = len(lines[0]) - len("--Size-- ----Arrival Time---- -Sender/Recipient-------") - 1
    first = lines[1]
    assert first.startswith(ids[0] + "*")  # incoming: active
    size = len(MSG)
    assert first[width:width + 9] == f" {size:>8}"
    assert re.fullmatch(r"  [A-Z][a-z]{2} [A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d",
                        first[width + 9:width + 30])
    assert first[width + 31:] == "MAILER-DAEMON"  # the null sender, as mailq shows it
    assert lines[2].strip() == "r0@example.org" and lines[3].strip() == "all@example.org"
    assert lines[2].index("r0") == width + 31  # recipients under the sender
    assert lines[4] == ""
    assert lines[-1] == f"-- {(3 * size + 1023) // 1024} Kbytes in 3 Requests."
    # machine-readable form kept
    listed = json.loads(run("queue", "list", "--json", "--spool", str(spool)).stdout)
    assert [e["id"] for e in listed] == ids


def test_queue_list_empty(tmp_path: Path) -> None:
    QueueStore(tmp_path / "spool")
    out = run("queue", "list", "--spool", str(tmp_path / "spool"))
    assert (out.returncode, out.stdout) == (0, "Mail queue is empty\n")


def test_queue_hold_release_delete_all_and_stdin(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    ids = make_spool(spool, 4)
    out = run("queue", "hold", "--spool", str(spool), "ALL")
    assert out.returncode == 0
    assert out.stdout.splitlines() == [f"{q}: hold" for q in ids] + ["hold: 4 messages"]
    listing = run("queue", "list", "--spool", str(spool)).stdout
    assert all(f"{q}!" in listing for q in ids)  # "!" marks held messages, as mailq

    # ids from stdin, one a line (blank lines and a mailq state mark are fine)
    out = run("queue", "release", "--spool", str(spool), "-",
              data=f"{ids[0]}\n\n{ids[1]}!\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{ids[0]}: release", f"{ids[1]}: release",
                                       "release: 2 messages"]
    store = QueueStore(spool, create=False)
    states = {e.id: e.state for e in store.entries(repair=False)}
    assert [states[q] for q in ids] == ["deferred", "deferred", "hold", "hold"]

    # release ALL: only the held ones
    out = run("queue", "release", "--spool", str(spool), "ALL")
    assert out.stdout.splitlines()[-1] == "release: 2 messages"

    # several ids and an unknown one: the others are still changed, exit 1, one line
    out = run("queue", "delete", "--spool", str(spool), ids[0], "NOSUCHID", ids[1])
    assert out.returncode == 1
    assert out.stdout.splitlines() == [f"{ids[0]}: delete", f"{ids[1]}: delete",
                                       "delete: 2 messages"]
    assert out.stderr == f"smtpgate: {spool}: no such message: NOSUCHID\n"

    out = run("queue", "delete", "--spool", str(spool), "ALL")
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "delete: 2 messages"
    assert run("queue", "list", "--spool", str(spool)).stdout == "Mail queue is empty\n"


def test_queue_change_needs_an_id(tmp_path: Path) -> None:
    make_spool(tmp_path / "spool", 1)
    out = run("queue", "delete", "--spool", str(tmp_path / "spool"))
    assert out.returncode == 2 and "the following arguments are required: ID" in out.stderr


# ---------------------------------------------------------------------- a running server

@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return str(request.param)


class Server:
    """``smtpgate serve`` as a subprocess; ready once it sent READY=1 (sd_notify)."""

    def __init__(self, directory: Path, conf: Path, *extra: str) -> None:
        self.directory = directory
        self.conf = conf
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.stderr = ""

    def __enter__(self) -> Server:
        path = str(self.directory / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(WAIT)
            self.proc = subprocess.Popen(
                [*SMTPGATE, "serve", "-c", str(self.conf), *self.extra],
                env={**os.environ, "NOTIFY_SOCKET": path}, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True)
            try:
                assert b"READY=1" in sock.recv(4096)
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, self.stderr = self.proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="adm") as d:
        yield Path(d)


def server_config(d: Path, loop: str, *, admin: str = "", token_file: str = "") -> Path:
    conf = d / "smtpgate.toml"
    text = (f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n'
            f'use_uvloop = {"true" if loop == "uvloop" else "false"}\n'
            f'[maildir]\npath = "mail"\n')
    if admin or token_file:
        text += f'[admin]\nlisten = "{admin}"\ntoken_file = "{token_file}"\n'
    conf.write_text(text)
    return conf


def smtp_port(conf: Path) -> int:
    return int(re.search(r"127\.0\.0\.1:(\d+)", conf.read_text()).group(1))  # type: ignore[union-attr]


def open_session(port: int, helo: str) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    f = c.makefile("rb")
    assert f.readline().startswith(b"220")
    c.sendall(f"EHLO {helo}\r\n".encode())
    while not f.readline().startswith(b"250 "):
        pass
    return c


def test_sessions_and_reload_through_the_admin_api(short_tmp: Path, loop: str) -> None:
    aport = free_port()
    conf = server_config(short_tmp, loop, admin=f"127.0.0.1:{aport}")
    with Server(short_tmp, conf):
        held = open_session(smtp_port(conf), "held.example")
        try:
            out = run("sessions", "-c", str(conf))
            assert out.returncode == 0 and out.stderr == "", out.stderr
            lines = out.stdout.splitlines()
            assert lines[0].split() == ["-Session", "ID-", "-Client-", "-HELO-", "-TLS-",
                                        "-AUTH-", "-State-", "-In-", "-Out-", "-Age-"]
            row = [ln for ln in lines[1:] if "held.example" in ln]
            assert len(row) == 1, out.stdout
            local_port = held.getsockname()[1]
            assert f"127.0.0.1:{local_port}" in row[0]
            assert lines[-1] == "-- 1 session."
            listed = json.loads(run("sessions", "--json", "-c", str(conf)).stdout)
            assert [(s["client_port"], s["helo"]) for s in listed] == [
                (local_port, "held.example")]
        finally:
            held.close()

        out = run("reload", "-c", str(conf))
        assert (out.returncode, out.stdout, out.stderr) == (0, "reloaded\n", "")

        # a broken configuration: refused, the server keeps running the old one
        good = conf.read_text()
        conf.write_text(good + "[server]\nno_such_key = 1\n")
        line = one_error(run("reload", "--admin-url", f"http://127.0.0.1:{aport}"), 1)
        assert line.startswith(f"smtpgate: http://127.0.0.1:{aport}/api/reload: HTTP 422: ")
        conf.write_text(good)
        assert run("sessions", "-c", str(conf)).stdout.splitlines()[-1] == "-- 0 sessions."


def test_serve_admin_flag_opens_the_listener(short_tmp: Path, loop: str) -> None:
    conf = server_config(short_tmp, loop)  # no [admin] in the file
    aport = free_port()
    with Server(short_tmp, conf, "--admin", f"127.0.0.1:{aport}") as server:
        out = run("sessions", "--admin-url", f"http://127.0.0.1:{aport}")
        assert out.returncode == 0 and out.stdout.splitlines()[-1] == "-- 0 sessions."
        # the file names no admin listener: the CLI says so
        line = one_error(run("sessions", "-c", str(conf)), 2)
        assert line == (f"smtpgate: {conf}: admin.listen: no admin listener is configured "
                        "(set [admin] listen, or use --admin-url)")
    assert f"admin page, API and /metrics on http://127.0.0.1:{aport}/" in server.stderr


def test_token_is_sent_and_a_wrong_one_is_exit_2(short_tmp: Path, loop: str) -> None:
    (short_tmp / "token").write_text("s3cret-token\n")
    aport = free_port()
    conf = server_config(short_tmp, loop, admin=f"127.0.0.1:{aport}", token_file="token")
    wrong = short_tmp / "wrong.toml"
    (short_tmp / "wrong-token").write_text("not-it\n")
    wrong.write_text(f'[admin]\nlisten = "127.0.0.1:{aport}"\ntoken_file = "wrong-token"\n')
    no_token = short_tmp / "none.toml"
    no_token.write_text(f'[admin]\nlisten = "127.0.0.1:{aport}"\n')
    with Server(short_tmp, conf):
        assert run("sessions", "-c", str(conf)).returncode == 0
        line = one_error(run("sessions", "-c", str(wrong)), 2)
        assert line == (f"smtpgate: http://127.0.0.1:{aport}/api/sessions: HTTP 401: the "
                        "token of admin.token_file was refused")
        line = one_error(run("reload", "-c", str(no_token)), 2)
        assert "HTTP 401: a token is required: set admin.token_file" in line


def test_admin_errors_without_a_server(tmp_path: Path) -> None:
    aport = free_port()  # nothing listens there
    conf = tmp_path / "smtpgate.toml"
    conf.write_text(f'[admin]\nlisten = "0.0.0.0:{aport}"\ntoken_file = "token"\n')
    (tmp_path / "token").write_text("t\n")
    line = one_error(run("sessions", "-c", str(conf)), 1)
    # a wildcard listen address is reached over loopback
    assert line.startswith(f"smtpgate: http://127.0.0.1:{aport}/api/sessions: cannot connect (")
    assert f"admin listener of {conf}: admin.listen" in line
    line = one_error(run("reload", "--admin-url", f"http://127.0.0.1:{aport}"), 1)
    assert "cannot connect" in line
    # no -c and no --admin-url: nothing to talk to
    line = one_error(run("sessions"), 2)
    assert "admin.listen: no admin listener is configured (give -c FILE" in line
    (tmp_path / "token").write_text("")
    line = one_error(run("reload", "-c", str(conf)), 2)
    assert line == f"smtpgate: {conf}: admin.token_file: {tmp_path / 'token'} is empty"


def test_serve_admin_flag_is_checked_like_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "smtpgate.toml"
    conf.write_text('[server]\nlisten = ["127.0.0.1:0"]\n')
    line = one_error(run("serve", "-c", str(conf), "--admin", "0.0.0.0:8025"), 2)
    assert line == (f"smtpgate: {conf}: admin.listen (--admin): 0.0.0.0:8025 is not a loopback "
                    "address; set admin.token_file to serve the admin API on other addresses")
    line = one_error(run("serve", "-c", str(conf), "--admin", "8025"), 2)
    assert "admin.listen (--admin): " in line

"""``[server] workers = N`` (issue 13, part "Workers"): ``smtpgate serve`` supervises N
SMTP worker processes sharing the listeners with SO_REUSEPORT, the supervisor owning the
spool. Every message acknowledged by any worker is delivered exactly once; a worker
killed with SIGKILL is replaced (new pid, logged at ERROR) and its sessions end without a
250 for the unfinished message; SIGHUP reloads every worker; SIGTERM stops them all.

Before this change ``workers`` was an unknown key: the configuration was refused."""

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
from random import Random

import pytest

from ..queue.crash_support import CaptureUpstream, make_message, serial_of, wait_for

SMTPGATE = [sys.executable, "-m", "smtpgate"]
SENDER = "sender@client.test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A ``smtpgate serve`` process with its config, log and port."""

    def __init__(self, tmp: Path, body: str, port: int) -> None:
        self.config = tmp / "smtpgate.toml"
        self.config.write_text(body)
        self.log = tmp / "serve.log"
        self.port = port
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*SMTPGATE, "serve", "-c", str(self.config)],
                                     stdout=self._out, stderr=subprocess.STDOUT)
        assert wait_for(lambda: b" workers (pids " in self.log.read_bytes()
                        or self.proc.poll() is not None, 60), self.text()
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> set[int]:
        """Children of the supervisor that hold a listening socket on our port."""
        listening = _listen_inodes(self.port)
        out = set()
        for pid in _children(self.proc.pid):
            if _socket_inodes(pid) & listening:
                out.add(pid)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return int(self.proc.returncode)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _tcp_rows() -> list[list[str]]:
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            rows += [line.split() for line in f.readlines()[1:]]
    return rows


def _listen_inodes(port: int) -> set[str]:
    return {r[9] for r in _tcp_rows()
            if r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port}


def _owner_of(served: Served, client: socket.socket) -> int | None:
    """The worker pid serving the connection ``client`` (server side: local = our port,
    remote = the client's port)."""
    cport = client.getsockname()[1]
    inodes = {r[9] for r in _tcp_rows()
              if int(r[1].rsplit(":", 1)[1], 16) == served.port
              and int(r[2].rsplit(":", 1)[1], 16) == cport and r[9] != "0"}
    for pid in served.workers():
        if _socket_inodes(pid) & inodes:
            return pid
    return None


def _maildir_config(port: int, mail: Path, greeting: str = "%H ESMTP workers") -> str:
    return (
        "[server]\n"
        'hostname = "mx.test"\n'
        f'listen = ["127.0.0.1:{port}"]\n'
        f'greeting = "{greeting}"\n'
        "workers = 2\n"
        "shutdown_timeout = 5\n"
        "[maildir]\n"
        f'path = "{mail}"\n'
    )


@pytest.fixture
def maildir_served(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    mail = tmp_path / "mail"
    port = _free_port()
    served = Served(tmp_path, _maildir_config(port, mail), port)
    try:
        yield served, mail
    finally:
        served.stop()


def _send_many(port: int, count: int, connections: int, tag: str) -> list[int]:
    """Send ``count`` messages round-robin over ``connections`` persistent sessions;
    the serials acknowledged with 250."""
    rng = Random(13)
    clients = [smtplib.SMTP("127.0.0.1", port, timeout=30) for _ in range(connections)]
    acked = []
    try:
        for c in clients:
            c.ehlo("client.test")
        for serial in range(count):
            c = clients[serial % connections]
            msg = make_message(rng, serial, 2000, tag=tag)
            c.sendmail(SENDER, ["rcpt@example.com"], msg)  # raises unless 250
            acked.append(serial)
    finally:
        for c in clients:
            c.quit()
    return acked


def _maildir_serials(mail: Path) -> list[int]:
    out = []
    for f in (mail / "new").iterdir():
        s = serial_of(f.read_bytes())
        assert s is not None
        out.append(s)
    return sorted(out)


def test_two_workers_listen_and_each_message_is_stored_once(
    maildir_served: tuple[Served, Path],
) -> None:
    served, mail = maildir_served
    workers = served.workers()
    assert len(workers) == 2, served.text()
    assert served.proc.pid not in workers
    acked = _send_many(served.port, 40, 8, "maildir")
    assert _maildir_serials(mail) == sorted(acked) == list(range(40))
    # each Maildir file name carries the pid of the worker that stored it
    pids = {int(f.name.split("P")[1].split("Q")[0]) for f in (mail / "new").iterdir()}
    assert pids <= workers


def test_killed_worker_is_replaced_and_its_session_fails_cleanly(
    maildir_served: tuple[Served, Path],
) -> None:
    served, mail = maildir_served
    workers = served.workers()
    assert len(workers) == 2, served.text()
    # one open session on each worker
    owned: dict[int, socket.socket] = {}
    spare: list[socket.socket] = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", served.port), timeout=30)
        assert s.recv(512).startswith(b"220")
        pid = _owner_of(served, s)
        if pid is not None and pid not in owned:
            owned[pid] = s
        else:
            spare.append(s)
        if len(owned) == 2:
            break
    for s in spare:
        s.close()
    assert set(owned) == workers
    victim, survivor = sorted(workers)
    for s in owned.values():
        s.sendall(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                  b"RCPT TO:<b@mx.test>\r\nDATA\r\n")
        reply = b""
        while b"354" not in reply:
            chunk = s.recv(4096)
            assert chunk, reply
            reply += chunk
        s.sendall(b"Subject: unfinished\r\nX-Serial: 999\r\n\r\nhalf a message\r\n")
    os.kill(victim, signal.SIGKILL)
    # the victim's session ends without any further reply: no 250 for its message
    s = owned[victim]
    rest = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
    except ConnectionResetError:
        pass
    assert rest == b""
    s.close()
    # the survivor's session goes on
    t = owned[survivor]
    t.sendall(b".\r\n")
    reply = t.recv(4096)
    assert reply.startswith(b"250 2.0.0"), reply
    t.sendall(b"QUIT\r\n")
    t.close()
    # the victim is replaced: a new pid, logged at ERROR
    assert wait_for(lambda: len(served.workers()) == 2
                    and victim not in served.workers(), 30), served.text()
    assert survivor in served.workers()
    log = served.text()
    assert f"ERROR smtpgate.workers: worker 1 (pid {victim}) died with exit code -9" in log \
        or f"ERROR smtpgate.workers: worker 2 (pid {victim}) died with exit code -9" in log, log
    # new sessions are served, by both workers
    acked = _send_many(served.port, 10, 4, "after")
    assert len(acked) == 10
    # exactly what was acknowledged is stored: the survivor's message and the 10
    assert _maildir_serials(mail) == [*range(10), 999]
    assert served.stop() == 0


def test_sighup_reloads_every_worker_and_sigterm_stops_all(tmp_path: Path) -> None:
    port = _free_port()
    mail = tmp_path / "mail"
    served = Served(tmp_path, _maildir_config(port, mail, "%H first banner"), port)
    try:
        workers = served.workers()
        assert len(workers) == 2
        served.config.write_text(_maildir_config(port, mail, "%H second banner"))
        served.proc.send_signal(signal.SIGHUP)
        # the supervisor's own reload, then each worker's
        assert wait_for(lambda: served.text().count("configuration reloaded") == 3, 30), \
            served.text()
        assert served.text().count("[worker 1]: configuration reloaded") == 1
        assert served.text().count("[worker 2]: configuration reloaded") == 1
        for _ in range(12):  # spread over both workers by the kernel
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                assert s.recv(512) == b"220 mx.test second banner\r\n"
                s.sendall(b"QUIT\r\n")
        assert served.workers() == workers  # reloaded in place, not restarted
    finally:
        code = served.stop()
    assert code == 0, served.text()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(
            f"/proc/{pid}/stat").read_text().split()[2]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("delivery_process", ["true", "false"])
def test_queue_mode_workers_commit_and_the_owner_delivers_each_once(
    tmp_path: Path, delivery_process: str,
) -> None:
    upstream = CaptureUpstream()
    upstream.start()
    port = _free_port()
    spool = tmp_path / "spool"
    served = Served(tmp_path, (
        "[server]\n"
        'hostname = "mx.test"\n'
        f'listen = ["127.0.0.1:{port}"]\n'
        "workers = 2\n"
        "[relay]\n"
        f'url = "smtp://127.0.0.1:{upstream.port}"\n'
        "timeout = 5\n"
        "[delivery]\n"
        'mode = "queue"\n'
        "[queue]\n"
        f'path = "{spool}"\n'
        # no periodic rescan to speak of: the workers' notices make delivery happen
        "scan_interval = 3600\n"
        "min_free_space = 0\n"
        f"delivery_process = {delivery_process}\n"
    ), port)
    try:
        assert len(served.workers()) == 2
        # the supervisor owns the spool
        assert (spool / "owner.lock").read_text().split()[0] == str(served.proc.pid)
        acked = _send_many(port, 30, 6, "queued")
        assert wait_for(lambda: len(upstream.deliveries) >= 30, 60), served.text()
        time.sleep(0.5)  # a duplicate would show up here
        serials = sorted(-1 if (n := serial_of(d.content)) is None else n
                         for d in upstream.deliveries)
        assert serials == sorted(acked) == list(range(30))
    finally:
        code = served.stop()
        upstream.stop()
    assert code == 0, served.text()


@pytest.mark.parametrize(("server", "expected"), [
    ('listen = ["127.0.0.1:0"]\nworkers = 2\n',
     "server.listen: port 0 cannot be shared by server.workers = 2 processes"),
    ('listen = ["127.0.0.1:2525"]\nworkers = 65\n',
     "server.workers: must be between 1 and 64, got 65"),
])
def test_check_config_refuses_what_serve_cannot_start(tmp_path: Path, server: str,
                                                      expected: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[server]\n{server}[maildir]\npath = \"{tmp_path / 'm'}\"\n")
    for command in ("check-config", "serve"):
        run = subprocess.run([*SMTPGATE, command, "-c", str(config)], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 2, run.stderr
        assert expected in run.stderr


def test_address_in_use_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(_maildir_config(port, tmp_path / "mail"))
        run = subprocess.run([*SMTPGATE, "serve", "-c", str(config)], capture_output=True,
                             text=True, timeout=60)
    assert run.returncode == 1
    assert "smtpgate: cannot listen:" in run.stderr
    assert "worker 1 started" not in run.stderr


def test_sigterm_to_one_worker_is_a_graceful_restart_of_it(
    maildir_served: tuple[Served, Path],
) -> None:
    served, mail = maildir_served
    workers = served.workers()
    s = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    assert s.recv(512).startswith(b"220")
    pid = _owner_of(served, s)
    assert pid in workers
    s.sendall(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
              b"RCPT TO:<b@mx.test>\r\nDATA\r\n")
    reply = b""
    while b"354" not in reply:
        chunk = s.recv(4096)
        assert chunk, reply
        reply += chunk
    s.sendall(b"Subject: in flight\r\nX-Serial: 7\r\n\r\nbody\r\n")
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: pid not in served.workers(), 30), served.text()
    # the transaction in flight may finish: 250, then the worker says goodbye
    s.sendall(b".\r\n")
    rest = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        rest += chunk
    s.close()
    assert rest.startswith(b"250 2.0.0"), rest
    assert b"421 4.3.2" in rest, rest
    assert _maildir_serials(mail) == [7]
    # replaced at once by a new worker; the other one untouched
    assert wait_for(lambda: len(served.workers()) == 2 and pid not in served.workers(), 30)
    assert (workers - {pid}) <= served.workers()
    assert f"(pid {pid}) exited; starting a new one" in served.text()
    assert "ERROR" not in served.text()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_stop_when_the_supervisor_dies(tmp_path: Path) -> None:
    port = _free_port()
    served = Served(tmp_path, _maildir_config(port, tmp_path / "mail"), port)
    try:
        workers = served.workers()
        assert len(workers) == 2
        served.proc.kill()
        served.proc.wait()
        assert wait_for(lambda: all(_gone(pid) for pid in workers), 30), served.text()
    finally:
        served.stop()

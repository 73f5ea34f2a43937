"""One owner per spool (issue 8, finding 1): a running server holds the spool; every other
process on the same spool (``policy-test``, ``inetd``, ``bsmtp``, ``queue list``, a second
``serve``) commits or reads without recovering, scheduling or deleting.

Real processes throughout: ``smtpgate serve`` relaying to a capturing upstream, load from
Python SMTP clients and Postfix's ``smtp-source``, and the other commands run in a loop.
The end state is counted: every acknowledged message delivered exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from random import Random

import pytest

from .crash_support import (
    SENDER,
    CaptureUpstream,
    GateProcess,
    free_port,
    make_message,
    wait_for,
    write_config,
)

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTPGATE = [sys.executable, "-m", "smtpgate"]


@pytest.fixture
def upstream() -> object:
    up = CaptureUpstream()
    up.start()
    yield up
    up.stop()


def _gate(tmp_path: Path, upstream: CaptureUpstream) -> tuple[GateProcess, Path, Path, int]:
    port = free_port()
    spool = tmp_path / "spool"
    config = tmp_path / "queue.toml"
    write_config(config, port, upstream.port, spool)
    return GateProcess(config, port, tmp_path / "gate.log"), config, spool, port


def _bsmtp_batch(serials: list[int], rng: Random) -> bytes:
    out = [b"HELO batch.test\r\n"]
    for serial in serials:
        msg = make_message(rng, serial, 800, tag="bsmtp")
        stuffed = msg.replace(b"\r\n.", b"\r\n..")
        out += [f"MAIL FROM:<{SENDER}>\r\n".encode(), b"RCPT TO:<rcpt@example.com>\r\n",
                b"DATA\r\n", stuffed, b".\r\n"]
    out.append(b"QUIT\r\n")
    return b"".join(out)


def _inetd_session(config: Path, serial: int, rng: Random) -> bool:
    """One message through ``smtpgate inetd`` on a socket pair; True when acknowledged."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([*SMTPGATE, "inetd", "-c", str(config)], stdin=theirs,
                            stdout=theirs, stderr=subprocess.DEVNULL)
    theirs.close()
    ours.settimeout(30)
    f = ours.makefile("rwb")

    def reply() -> bytes:
        line = f.readline()
        while line[3:4] == b"-":
            line = f.readline()
        return line

    try:
        assert reply().startswith(b"220")
        msg = make_message(rng, serial, 600, tag="inetd")
        for cmd in (b"HELO inetd.test\r\n", f"MAIL FROM:<{SENDER}>\r\n".encode(),
                    b"RCPT TO:<rcpt@example.com>\r\n", b"DATA\r\n"):
            f.write(cmd)
            f.flush()
            reply()
        f.write(msg.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        f.flush()
        acked = reply().startswith(b"250")
        f.write(b"QUIT\r\n")
        f.flush()
        reply()
        return acked
    finally:
        f.close()
        ours.close()
        proc.wait(timeout=30)


def _run_side_commands(config: Path, stop: threading.Event, acked: set[int],
                       lock: threading.Lock, counts: dict[str, int]) -> None:
    """policy-test, queue list, bsmtp, inetd and a second serve, in a loop, until ``stop``."""
    rng = Random(7)
    serial = 500_000
    while not stop.is_set():
        subprocess.run([*SMTPGATE, "policy-test", "-c", str(config), "--client-ip",
                        "192.0.2.1"], input=b"QUIT\r\n", capture_output=True, timeout=60)
        counts["policy-test"] += 1
        subprocess.run([*SMTPGATE, "queue", "list", "-c", str(config)],
                       capture_output=True, timeout=60)
        counts["queue list"] += 1
        serials = [serial, serial + 1]
        serial += 2
        out = subprocess.run([*SMTPGATE, "bsmtp", "-c", str(config)],
                             input=_bsmtp_batch(serials, rng), capture_output=True, timeout=60)
        queued = [line for line in out.stdout.splitlines() if b"Queued as" in line]
        with lock:
            acked.update(serials[: len(queued)])
        assert len(queued) == len(serials), out.stdout + out.stderr
        counts["bsmtp"] += 1
        if _inetd_session(config, serial, rng):
            with lock:
                acked.add(serial)
        serial += 1
        counts["inetd"] += 1
        second = subprocess.run([*SMTPGATE, "serve", "-c", str(config)],
                                capture_output=True, timeout=60)
        assert second.returncode == 1, second.stderr
        assert b"in use by another smtpgate server" in second.stderr, second.stderr
        counts["second serve"] += 1


def _client_load(port: int, first: int, count: int, acked: set[int],
                 lock: threading.Lock) -> None:
    rng = Random(first)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("load.test")
        for serial in range(first, first + count):
            msg = make_message(rng, serial, 2000, tag="load")
            try:
                client.sendmail(SENDER, ["rcpt@example.com"], msg)
            except smtplib.SMTPException:
                continue
            with lock:
                acked.add(serial)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_concurrent_processes_never_lose_or_duplicate(
    tmp_path: Path, upstream: CaptureUpstream
) -> None:
    gate, config, spool, port = _gate(tmp_path, upstream)
    gate.start()
    try:
        acked: set[int] = set()
        lock = threading.Lock()
        stop = threading.Event()
        counts = {k: 0 for k in ("policy-test", "queue list", "bsmtp", "inetd",
                                 "second serve")}
        errors: list[BaseException] = []

        def side() -> None:
            try:
                _run_side_commands(config, stop, acked, lock, counts)
            except BaseException as exc:  # reported below
                errors.append(exc)

        side_thread = threading.Thread(target=side)
        side_thread.start()
        source = subprocess.Popen(
            [SMTP_SOURCE, "-s", "10", "-m", "400", "-l", "2000", "-f", SENDER,
             "-t", "source@example.com", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        clients = [threading.Thread(target=_client_load, args=(port, i * 10_000, 150, acked,
                                                               lock)) for i in range(1, 9)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        source_out, _ = source.communicate(timeout=120)
        # keep the side commands going until each ran at least twice
        wait_for(lambda: min(counts.values()) >= 2, 120, 0.2)
        stop.set()
        side_thread.join(timeout=120)
        assert not errors, errors
        assert source.returncode == 0, source_out
        assert min(counts.values()) >= 2, counts

        def drained() -> bool:
            return all(not os.listdir(spool / d) for d in ("incoming", "deferred", "messages"))

        assert wait_for(drained, 60, 0.2), gate.log_tail()
        deliveries = upstream.deliveries
        serials = [d.serial for d in deliveries]
        numbered = [s for s in serials if s is not None]
        lost = acked - set(numbered)
        duplicated = {s for s in numbered if numbered.count(s) > 1}
        from_source = sum(1 for d in deliveries if "source@example.com" in d.rcpts)
        assert not lost, f"{len(lost)} acknowledged message(s) lost"
        assert not duplicated, f"{len(duplicated)} message(s) delivered twice"
        assert set(numbered) == acked
        assert from_source == 400
        assert os.listdir(spool / "corrupt") == []
        assert len(acked) >= 8 * 150
    finally:
        gate.cleanup()


def test_second_serve_refused_and_pid_file_kept(tmp_path: Path,
                                                 upstream: CaptureUpstream) -> None:
    gate, config, spool, port = _gate(tmp_path, upstream)
    pid_file = tmp_path / "smtpgate.pid"
    other = tmp_path / "other.toml"
    text = config.read_text().replace('hostname = "mx.test"\n',
                                      f'hostname = "mx.test"\npid_file = "{pid_file}"\n')
    config.write_text(text)
    other.write_text(text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
    gate.start()
    try:
        assert pid_file.read_text().strip() == str(gate.proc.pid if gate.proc else "")
        second = subprocess.run([*SMTPGATE, "serve", "-c", str(other)],
                                capture_output=True, timeout=60)
        assert second.returncode == 1
        err = second.stderr.decode()
        assert "Traceback" not in err
        assert f"spool {spool} is in use by another smtpgate server" in err
        # the running server's pid file is untouched
        assert pid_file.read_text().strip() == str(gate.proc.pid if gate.proc else "")
    finally:
        gate.cleanup()


def test_bsmtp_without_owner_leaves_mail_queued(tmp_path: Path,
                                                upstream: CaptureUpstream) -> None:
    """No server running: bsmtp commits, warns, starts no delivery; the next server
    delivers it."""
    gate, config, spool, port = _gate(tmp_path, upstream)
    out = subprocess.run([*SMTPGATE, "bsmtp", "-c", str(config)],
                         input=_bsmtp_batch([1, 2], Random(1)), capture_output=True, timeout=60)
    assert out.stdout.count(b"Queued as") == 2, out.stdout
    assert b"stays queued until one starts" in out.stderr
    time.sleep(1.0)
    assert upstream.deliveries == []
    assert len(os.listdir(spool / "messages")) == 2  # committed queue files, not yet tried
    gate.start()
    try:
        assert wait_for(lambda: len(upstream.deliveries) == 2, 30), gate.log_tail()
        assert sorted(d.serial or -1 for d in upstream.deliveries) == [1, 2]
    finally:
        gate.cleanup()


def _delivery_pid(parent: int) -> int | None:
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            return int(child)
    return None


@pytest.mark.parametrize("full_spool", [False, True], ids=["idle", "spool-full"])
def test_killed_delivery_process_restarted(tmp_path: Path, upstream: CaptureUpstream,
                                           full_spool: bool) -> None:
    """Finding 11: a killed delivery process is noticed at once and restarted whatever
    the traffic; with a full spool (every new message refused) the queue still drains."""
    gate, config, spool, port = _gate(tmp_path, upstream)
    feeder = tmp_path / "feeder.toml"
    feeder.write_text(config.read_text())
    if full_spool:  # the server refuses every new message (452 4.3.1): no commits
        config.write_text(config.read_text().replace(
            "min_free_space = 0", "min_free_space = 1000000000000000"))
    upstream.stop()  # messages wait in the spool
    gate.start()
    try:
        out = subprocess.run([*SMTPGATE, "bsmtp", "-c", str(feeder)],
                             input=_bsmtp_batch(list(range(5)), Random(3)),
                             capture_output=True, timeout=60)
        assert out.stdout.count(b"Queued as") == 5, out.stdout
        assert gate.proc is not None
        if full_spool:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("full.test")
                code, text = client.mail(SENDER)
                assert (code, text[:5]) == (452, b"4.3.1")
        parent = gate.proc.pid
        old = _delivery_pid(parent)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: (_delivery_pid(parent) or old) != old, 15), gate.log_tail()
        log = gate.log_path.read_text()
        assert "died with exit code -9; restarting" in log
        upstream.start()
        assert wait_for(lambda: len(upstream.deliveries) == 5, 30), gate.log_tail()
        assert os.listdir(spool / "corrupt") == []
        # no zombie left behind
        state = Path(f"/proc/{old}/stat")
        assert not state.exists() or ") Z" not in state.read_text()
    finally:
        gate.cleanup()

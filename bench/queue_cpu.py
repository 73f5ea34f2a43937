"""CPU per message of queue mode, per process, receiving and delivering together.

Runs ``bench/peers_queue_sut.sh`` (the shared rig's queue-mode SUT: smtpgate, its
delivery process and an ``smtp-sink`` child), sends scenario a (``smtp-source -d -s 20
-l 4096 -m N``), waits until the spool is empty (every message delivered), and reports the
user+system CPU of each process of the tree over that window, per message: the receiving
process, the delivery process, the sink, and their sums (smtpgate alone; the tree as
``peers.sh`` counts it). See bench/METHOD.md ("Queue mode CPU per message").

Usage::

    .venv/bin/python bench/queue_cpu.py [ROUNDS] [MESSAGES]
    SRC=/tmp/base/src .venv/bin/python bench/queue_cpu.py   # another source tree (A/B)

Environment: ``SRC`` (prepended to PYTHONPATH), ``WARM`` (warm-up messages, 1000),
``QUEUE_DIR`` (parent of the spool, /var/tmp), ``SESSIONS`` (20), ``SIZE`` (4096).
Everything is on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text()
                        .split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def cpu(pid: int) -> float:
    """User+system CPU seconds of one process (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def comm(pid: int) -> str:
    """The process's command line, shortened."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:60]


def ready(port: int) -> bool:
    """True when an SMTP greeting comes from ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(100).startswith(b"220")
    except OSError:
        return False


def spool_of(pid: int) -> Path:
    """The spool directory of the SUT (from its -c argument)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    cfg = Path(args[args.index(b"-c") + 1].decode())
    return cfg.parent / "spool"


def drain(spool: Path, timeout: float = 120.0) -> float:
    """Wait until ``spool/messages`` is empty; returns the seconds waited."""
    t0 = time.monotonic()
    while os.listdir(spool / "messages"):
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"spool {spool} not empty after {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - t0


def source(port: int, n: int) -> float:
    """Run smtp-source (scenario a); returns its wall time in seconds."""
    cmd = ["smtp-source", "-d", "-s", os.environ.get("SESSIONS", "20"), "-l",
           os.environ.get("SIZE", "4096"), "-m", str(n), "-f", "a@example.com",
           "-t", "b@example.com", f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def main() -> int:
    """Start the SUT, warm up, run the rounds, print per-process µs/msg."""
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 6000
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
    if env.get("SRC"):
        env["PYTHONPATH"] = env["SRC"] + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                          else "")
    port = free_port()
    proc = subprocess.Popen([str(HERE / "peers_queue_sut.sh"), str(port)], env=env,
                            start_new_session=True)
    spool: Path | None = None
    try:
        deadline = time.monotonic() + 30
        while not ready(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("SUT did not start")
            time.sleep(0.1)
        spool = spool_of(proc.pid)
        source(port, int(os.environ.get("WARM", "1000")))
        drain(spool)
        time.sleep(0.5)
        kids = children(proc.pid)
        pids = {"receiving": proc.pid}
        for kid in kids:
            name = comm(kid)
            pids["sink" if "smtp-sink" in name else "delivery"] = kid
        rows: dict[str, list[float]] = {k: [] for k in (*pids, "smtpgate", "tree")}
        rates = []
        for _ in range(rounds):
            before = {k: cpu(p) for k, p in pids.items()}
            wall = source(port, n)
            d = drain(spool)
            after = {k: cpu(p) for k, p in pids.items()}
            per = {k: 1e6 * (after[k] - before[k]) / n for k in pids}
            per["smtpgate"] = per["receiving"] + per.get("delivery", 0.0)
            per["tree"] = sum(per[k] for k in pids)
            for k, v in per.items():
                rows[k].append(v)
            rates.append(n / wall)
            print(f"  {n / wall:6.0f} msgs/s drain {d:4.1f}s  " + "  ".join(
                f"{k} {v:5.0f}" for k, v in per.items()), flush=True)
        print(f"median over {rounds} rounds of {n} (µs/msg): " + "  ".join(
            f"{k} {statistics.median(v):.0f}" for k, v in rows.items())
            + f"  accept {statistics.median(rates):.0f} msgs/s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        time.sleep(0.5)
        if spool is not None:
            shutil.rmtree(spool.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

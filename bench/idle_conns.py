"""Idle connections: RSS per connection after EHLO at 1,000 and 10,000 connections, and
the greeting latency of new clients while 10,000 are held (issue 13).

``python bench/idle_conns.py [--src DIR] [--counts 1000,10000] [--rounds 3] [--probes 20]``

For each round and each count, a fresh ``smtpgate serve`` (uvloop, ``relay.url =
"discard:"``, ``max_connections(_per_ip) = 20000``, logging at WARNING) is started on
127.0.0.1 with ``RLIMIT_NOFILE`` raised (this process raises its own soft limit to the
hard limit; the server inherits it). :func:`idle_mem.measure` warms it up with 50
EHLO+QUIT sessions, reads VmRSS, opens N connections one after the other (each reads
the 220, sends EHLO, reads the whole 250), waits 0.5 s and reads VmRSS again:
KiB per connection = (after - before) / N. With the N connections still held, ``--probes``
new clients each time connect → 220 and EHLO → 250 (``time.perf_counter``); then every
held connection must still answer NOOP with 250 (served, no error). ``--src DIR`` runs
the package from another tree (``PYTHONPATH=DIR``), e.g. ``git archive REV src | tar -x``.
Loopback only; at most max(counts) + probes client sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import idle_mem  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(src: str | None, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    cfg = workdir / f"idle-{port}.toml"
    cfg.write_text(
        "[server]\n"
        'hostname = "bench.local"\n'
        f'listen = ["127.0.0.1:{port}"]\n'
        "max_connections = 20000\n"
        "max_connections_per_ip = 20000\n"
        "use_uvloop = true\n"
        "[log]\n"
        'level = "WARNING"\n'
        "[relay]\n"
        'url = "discard:"\n'
    )
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "-c", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"idle-{port}.log", "wb"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return proc, port
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def _probe(port: int) -> tuple[float, float]:
    """Seconds from connect to the 220, and for EHLO → 250, for one new client."""
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        f = s.makefile("rb")
        greet = idle_mem._read_reply(f)
        t1 = time.perf_counter()
        s.sendall(b"EHLO probe.test\r\n")
        last = idle_mem._read_reply(f)
        t2 = time.perf_counter()
        if not greet.startswith(b"220") or not last.startswith(b"250"):
            raise ConnectionError(f"probe: {greet!r} {last!r}")
        s.sendall(b"QUIT\r\n")
        f.close()
    finally:
        s.close()
    return t1 - t0, t2 - t1


def _noop_all(socks: list[socket.socket]) -> int:
    """NOOP on every held connection (pipelined in batches); count the 250 replies."""
    ok = 0
    for i in range(0, len(socks), 500):
        batch = socks[i : i + 500]
        for s in batch:
            s.sendall(b"NOOP\r\n")
        for s in batch:
            f = s.makefile("rb")
            if idle_mem._read_reply(f).startswith(b"250"):
                ok += 1
            f.close()
    return ok


def run_one(src: str | None, n: int, probes: int, workdir: Path) -> dict[str, float]:
    """One fresh server: KiB/conn at n connections, probe latencies, NOOP check."""
    proc, port = _start(src, workdir)
    try:
        for s in idle_mem.open_ehlo(port, 50):  # warm-up, as idle_mem.measure does
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
            s.close()
        time.sleep(0.5)
        before = idle_mem.vm_rss_kib(proc.pid)
        t0 = time.monotonic()
        socks = idle_mem.open_ehlo(port, n)
        open_s = time.monotonic() - t0
        try:
            time.sleep(0.5)
            after = idle_mem.vm_rss_kib(proc.pid)
            greets, ehlos = [], []
            for _ in range(probes):
                g, e = _probe(port)
                greets.append(g)
                ehlos.append(e)
                time.sleep(0.05)
            ok = _noop_all(socks)
        finally:
            for s in socks:
                s.close()
        if proc.poll() is not None:
            raise RuntimeError("server died")
        return {
            "kib_per_conn": (after - before) / n, "rss_before": before, "rss_after": after,
            "open_s": open_s, "greet_med_ms": statistics.median(greets) * 1e3,
            "greet_max_ms": max(greets) * 1e3, "ehlo_med_ms": statistics.median(ehlos) * 1e3,
            "noop_ok": ok,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    """CLI: print one line per round and count, and the medians."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", default=None, help="run smtpgate from DIR (PYTHONPATH)")
    ap.add_argument("--counts", default="1000,10000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probes", type=int, default=20)
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(counts) + args.probes + 200
    if hard < need:
        print(f"RLIMIT_NOFILE hard limit {hard} < {need}", file=sys.stderr)
        return 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="smtpgate-idle-") as tmp:
        for r in range(args.rounds):
            for n in counts:
                res = run_one(args.src, n, args.probes, Path(tmp))
                results[n].append(res)
                print(f"round {r + 1} n={n}: {res['kib_per_conn']:.2f} KiB/conn "
                      f"(RSS {res['rss_before']:.0f} -> {res['rss_after']:.0f} KiB, "
                      f"opened in {res['open_s']:.1f}s); new client 220 median "
                      f"{res['greet_med_ms']:.2f} ms max {res['greet_max_ms']:.2f} ms, "
                      f"EHLO {res['ehlo_med_ms']:.2f} ms; NOOP 250 on "
                      f"{res['noop_ok']:.0f}/{n}", flush=True)
    for n in counts:
        rs = results[n]
        kib = [r["kib_per_conn"] for r in rs]
        print(f"n={n}: KiB/conn median {statistics.median(kib):.2f} "
              f"[{min(kib):.2f}-{max(kib):.2f}]; 220 median of medians "
              f"{statistics.median(r['greet_med_ms'] for r in rs):.2f} ms, worst "
              f"{max(r['greet_max_ms'] for r in rs):.2f} ms; all NOOPs answered: "
              f"{all(r['noop_ok'] == n for r in rs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

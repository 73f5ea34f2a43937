"""Issue-13 benchmark: discard and queue mode vs aiosmtpd, workers 1 vs 2, 50 MB memory probe.

Entry point: ``python bench/perf.py`` (normally ``PERF=1 bench/run.sh``). Reuses the
servers, /proc accounting and smtp-source runner of ``bench/bench.py``; the method and
its caveats are in ``bench/METHOD.md``. Everything runs on 127.0.0.1.

Parts (each can be switched off through the environment, see METHOD.md):

1. **modes**: scenarios a/b/c against aiosmtpd (the ratio baseline), smtpgate with
   ``relay.url = "discard:"`` and smtpgate in queue mode (fsync on) relaying to a counting
   ``smtp-sink``; ``PERF_ROUNDS`` rounds, server order rotating; per row the median
   msgs/s and server CPU per message (whole process tree from /proc; queue rows include
   the drain, i.e. the relaying), and same-round ratios to aiosmtpd.
2. **workers**: smtpgate discard with ``server.workers = 1`` and ``= 2`` (and aiosmtpd for
   reference) under scenario a driven by two concurrent smtp-source processes; ratio
   workers=2 / workers=1 in the same round.
3. **memory**: peak RSS growth over idle (process tree) while one 50 MiB message is
   received, discard mode and queue mode (queue: until it has been relayed to smtp-sink).

Output: a table on stdout and in ``bench/results/perf-latest.txt``; raw runs in
``bench/results/perf-latest.json``. Exit status 1 when a run is not clean (BenchError).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import bench
from bench import (
    AIO,
    RECIPIENT,
    RESULTS,
    SCENARIOS,
    SENDER,
    UPSTREAM,
    BenchError,
    Run,
    Scenario,
    Server,
    ServerSpec,
    cpu_seconds,
    fs_type,
    run_load,
    system_busy_seconds,
    tree_pids,
)

#: max_message_size for the memory probe (the message itself is MEM_MESSAGE_BYTES).
MEM_LIMIT = 64 * 1024 * 1024


def env_int(name: str, default: int) -> int:
    """Integer from the environment (empty or unset: default)."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


class PerfServer(Server):
    """bench.Server plus ``server.workers`` and ``server.max_message_size`` for smtpgate.

    Args:
        spec: what to run (see bench.ServerSpec).
        workdir: config files and logs.
        workers: ``[server] workers`` (1: one process, no supervisor).
        max_size: ``[server] max_message_size`` in bytes (0: the default, 10 MiB).
        kw: passed on to bench.Server (upstream, spool_root).
    """

    def __init__(self, spec: ServerSpec, workdir: Path, workers: int = 1, max_size: int = 0,
                 **kw: object) -> None:
        super().__init__(spec, workdir, **kw)  # type: ignore[arg-type]
        self.workers = workers
        self.max_size = max_size

    def _command(self) -> list[str]:
        cmd = super()._command()
        if self.spec.kind == "smtpgate":
            cfg = self.workdir / f"smtpgate-{self.port}.toml"
            extra = ""
            if self.workers != 1:
                extra += f"workers = {self.workers}\n"
            if self.max_size:
                extra += f"max_message_size = {self.max_size}\n"
            text = cfg.read_text().replace("[server]\n", "[server]\n" + extra, 1)
            cfg.write_text(text)
        return cmd

    def start(self) -> PerfServer:
        """Start (bench.Server.start) and, with workers, wait until every worker runs.

        Raises:
            BenchError: the server did not start, or fewer than ``workers`` worker
                processes appeared within 20 s.
        """
        super().start()
        if self.workers > 1:
            deadline = time.monotonic() + 20
            while len(tree_pids(self.pid)) < self.workers + 1:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.spec.name}: {self.workers} workers did not start")
                time.sleep(0.05)
            time.sleep(0.5)  # let the last worker bind and enter its loop
        return self


# ------------------------------------------------------------------ workers runs


def run_two_sources(server: Server, sc: Scenario, messages: int, rnd: int) -> Run:
    """Scenario sc from two concurrent smtp-source processes, ``messages/2`` each.

    msgs/s is all messages over the wall time from starting both to the later exit. CPU
    of the server is its whole process tree (supervisor and workers) from /proc.

    Raises:
        BenchError: an smtp-source exited non-zero or timed out, or the server died.
    """
    server.check_alive()
    half = messages // 2
    cmd = bench.smtp_source(sc, server.port, half)
    cpu0 = cpu_seconds(server.pid)
    busy0 = system_busy_seconds()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(120.0, messages / 20))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise BenchError(f"smtp-source timed out against {server.spec.name}") from None
        outs.append(out)
    t1 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise BenchError(f"smtp-source exit {p.returncode} against {server.spec.name} "
                             f"(two sources, round {rnd}): {' '.join(cmd)}\n"
                             + out.decode(errors="replace")[-2000:])
    server.check_alive()
    server.sent += 2 * half
    cpu1 = cpu_seconds(server.pid)
    busy1 = system_busy_seconds()
    client = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    srv = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
    other = max(0.0, (busy1 - busy0) - srv - client)
    return Run(server.spec.name, sc.key + "x2", rnd, 2 * half, t1 - t0, srv,
               cpu1[1] - cpu0[1], client, other)


# ------------------------------------------------------------------ memory probe


def tree_kib(pid: int, key: str) -> dict[int, int]:
    """{pid: VmRSS or VmHWM in KiB} for the process tree rooted at pid."""
    out: dict[int, int] = {}
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, BenchError):
            out[p] = bench.rss_kib(p, key)
    return out


def proc_label(pid: int) -> str:
    """'PID command line' (shortened to its last 60 characters) of a running process."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        cmd = "?"
    return f"{pid} {cmd[-60:]}"


def clear_hwm(pid: int) -> bool:
    """Reset VmHWM of every process in the tree (``echo 5 > /proc/PID/clear_refs``)."""
    ok = True
    for p in tree_pids(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def send_big(port: int, size: int) -> tuple[str, float]:
    """Send one message of ``size`` body bytes (78-char lines + CRLF) over a fresh session.

    Returns:
        (the final reply line to DATA's end, seconds from DATA to that reply).

    Raises:
        BenchError: a reply other than the expected 2xx/354.
    """
    line = b"x" * 78 + b"\r\n"
    chunk = line * (1024 * 1024 // len(line))
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        f = s.makefile("rb")

        def reply() -> str:
            while True:
                ln = f.readline().decode(errors="replace")
                if len(ln) < 4 or ln[3] != "-":
                    return ln.strip()

        def cmd(c: str, want: str) -> str:
            s.sendall(c.encode() + b"\r\n")
            r = reply()
            if not r.startswith(want):
                raise BenchError(f"memory probe: {c!r} got {r!r}")
            return r

        if not reply().startswith("220"):
            raise BenchError("memory probe: no greeting")
        cmd("EHLO client.test", "250")
        cmd(f"MAIL FROM:<{SENDER}>", "250")
        cmd(f"RCPT TO:<{RECIPIENT}>", "250")
        t0 = time.perf_counter()
        cmd("DATA", "354")
        s.sendall(b"Subject: 50 MB memory probe\r\n\r\n")
        left = size
        while left > 0:
            piece = chunk[:left]
            s.sendall(piece)
            left -= len(piece)
        s.sendall(b".\r\n")
        final = reply()
        dt = time.perf_counter() - t0
        if not final.startswith("250"):
            raise BenchError(f"memory probe: end of DATA got {final!r}")
        with contextlib.suppress(OSError):
            cmd("QUIT", "221")
        return final, dt


@dataclass
class MemResult:
    """One memory probe: KiB figures for one server, one 50 MiB message."""

    server: str
    message_bytes: int
    idle_kib: int  # sum of VmRSS over the tree before the message
    peak_sampled_kib: int  # max over samples (every 5 ms) of the tree's summed VmRSS
    hwm_growth_kib: int  # sum over processes of (VmHWM after - VmRSS idle), HWM reset before
    per_process: dict[str, int]  # "pid command line": HWM growth KiB
    hwm_reset: bool
    data_seconds: float
    drain_seconds: float

    @property
    def sampled_growth_kib(self) -> int:
        """Peak sampled tree RSS minus idle tree RSS."""
        return self.peak_sampled_kib - self.idle_kib


def memory_probe(server: PerfServer, size: int) -> MemResult:
    """Peak RSS growth of server's tree while it receives one message of ``size`` bytes.

    The server has been warmed up. Idle = summed VmRSS after 1 s of rest; VmHWM of every
    process is reset, the message is sent while a thread samples the tree's VmRSS every
    5 ms; queue rows wait until smtp-sink has the message and the spool is empty.

    Raises:
        BenchError: the message was refused, not relayed, or the server died.
    """
    time.sleep(1.0)
    idle = tree_kib(server.pid, "VmRSS")
    labels = {p: proc_label(p) for p in idle}
    reset = clear_hwm(server.pid)
    before = server.upstream.sink_counts()[1] if server.upstream is not None else 0
    peak = [sum(idle.values())]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sum(tree_kib(server.pid, "VmRSS").values()))
            time.sleep(0.005)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        _final, dt = send_big(server.port, size)
        t_end = time.perf_counter()
        drain = 0.0
        if server.spec.relay == "queue":
            drain = server.wait_relayed(before, 1, t_end)
        time.sleep(0.2)
    finally:
        stop.set()
        th.join()
    server.check_alive()
    hwm = tree_kib(server.pid, "VmHWM")
    per = {labels.get(p) or proc_label(p): hwm[p] - idle.get(p, 0) for p in hwm}
    return MemResult(server.spec.name, size, sum(idle.values()), peak[0],
                     sum(max(0, v) for v in per.values()), per, reset, dt, drain)


# ------------------------------------------------------------------ report


def med(xs: list[float]) -> float:
    """Median (0 for no values)."""
    return statistics.median(xs) if xs else 0.0


def fmt_range(xs: list[float], f: str) -> str:
    """'median [min-max]'."""
    return f"{med(xs):{f}} [{min(xs):{f}}-{max(xs):{f}}]" if xs else "-"


def rows_table(runs: list[Run], scenario: str, names: list[str], base: str,
               title: str, ratio_names: list[str]) -> list[str]:
    """Table lines for one scenario: per server msgs/s, CPU µs/msg, then same-round ratios."""
    out = [title]
    by: dict[str, list[Run]] = {n: [r for r in runs if r.server == n and r.scenario == scenario]
                                for n in names}
    for n in names:
        rs = by[n]
        if not rs:
            continue
        rates = [r.rate for r in rs]
        cpu = [1e6 * r.server_cpu / r.messages for r in rs]
        srv = [100 * r.server_cpu / r.window for r in rs]
        other = [100 * r.other_cpu / r.window for r in rs]
        drain = [r.drain for r in rs]
        dr = f"  drain {med(drain):.2f}s" if any(drain) else ""
        out.append(f"  {n:34s} {fmt_range(rates, '.0f'):>22s} msgs/s  "
                   f"CPU {med(cpu):7.0f} µs/msg  srv {med(srv):4.0f}%  other {med(other):3.0f}%"
                   + dr)
    for n in ratio_names:
        pairs = [(a.rate / b.rate) for a in by.get(n, []) for b in by.get(base, [])
                 if a.round == b.round]
        if pairs:
            out.append(f"  ratio {n} / {base}: {fmt_range(pairs, '.2f')}")
    return out


def main() -> int:
    """Run the enabled parts; print and write the report. Returns the exit status."""
    rounds = env_int("PERF_ROUNDS", 3)
    base = env_int("PERF_MESSAGES", 4000)
    scen_keys = [k for k in os.environ.get("SCENARIOS", "a,b,c").split(",") if k]
    do_modes = env_int("PERF_MODES", 1)
    do_workers = env_int("PERF_WORKERS", 1)
    do_mem = env_int("PERF_MEM", 1)
    mem_bytes = env_int("MEM_MESSAGE_BYTES", 50 * 1024 * 1024)
    RESULTS.mkdir(exist_ok=True)
    workdir = RESULTS
    qparent = Path(os.environ.get("QUEUE_DIR", "").strip() or "/var/tmp")
    spool_root = Path(tempfile.mkdtemp(prefix="smtpgate-perf-spool-", dir=qparent))
    lines = [f"smtpgate perf (issue 13) {time.strftime('%Y-%m-%d %H:%M')}  "
             f"cores={os.cpu_count()}  rounds={rounds}  messages a={base}",
             f"spools in {spool_root} ({fs_type(spool_root)})", ""]
    runs: list[Run] = []
    wruns: list[Run] = []
    mems: list[MemResult] = []
    started: list[Server] = []
    budget = [float(env_int("QUIET_WAIT", 60))]
    busy_rounds = [0]

    def quiet(rnd: int) -> None:
        waited, ok = bench.wait_quiet(max(budget[0], 1.0))
        budget[0] -= waited
        if not ok:
            busy_rounds[0] += 1
            print(f"round {rnd}: machine busy (started anyway)", flush=True)

    SG_DISCARD = ServerSpec("smtpgate discard", "smtpgate", uvloop=True)
    SG_Q = ServerSpec("smtpgate queue fsync -> sink", "smtpgate", uvloop=True, relay="queue")
    W1 = ServerSpec("smtpgate discard workers=1", "smtpgate", uvloop=True)
    W2 = ServerSpec("smtpgate discard workers=2", "smtpgate", uvloop=True)
    try:
        upstream = PerfServer(UPSTREAM, workdir).start()
        started.append(upstream)
        if do_modes:
            servers = [PerfServer(AIO, workdir).start(),
                       PerfServer(SG_DISCARD, workdir).start(),
                       PerfServer(SG_Q, workdir, upstream=upstream,
                                  spool_root=spool_root).start()]
            started += servers
            warm = SCENARIOS["a"]
            for s in servers:
                run_load(s, warm, 500, 0)
            for rnd in range(1, rounds + 1):
                quiet(rnd)
                order = servers[rnd % 3:] + servers[:rnd % 3]
                if rnd % 2 == 0:
                    order.reverse()
                for k in scen_keys:
                    sc = SCENARIOS[k]
                    m = max(100, int(base * sc.share))
                    for s in order:
                        r = run_load(s, sc, m, rnd)
                        runs.append(r)
                        print(f"round {rnd} {k} {s.spec.name}: {r.rate:.0f} msgs/s "
                              f"{1e6 * r.server_cpu / r.messages:.0f} µs/msg", flush=True)
            for s in servers:
                s.stop()
                s.verify_count()
            if servers[2].queue_list():
                    raise BenchError("queue list not empty at the end")
        if do_workers:
            wservers = [PerfServer(AIO, workdir).start(),
                        PerfServer(W1, workdir, workers=1).start(),
                        PerfServer(W2, workdir, workers=2).start()]
            started += wservers
            sc = SCENARIOS["a"]
            for s in wservers:
                run_two_sources(s, sc, 1000, 0)
            for rnd in range(1, rounds + 1):
                quiet(rnd)
                order = wservers[rnd % 3:] + wservers[:rnd % 3]
                if rnd % 2 == 0:
                    order.reverse()
                for s in order:
                    r = run_two_sources(s, sc, base, rnd)
                    wruns.append(r)
                    print(f"round {rnd} a x2 {s.spec.name}: {r.rate:.0f} msgs/s "
                          f"{1e6 * r.server_cpu / r.messages:.0f} µs/msg", flush=True)
            for s in wservers:
                s.stop()
                s.verify_count()
        if do_mem:
            for spec in (SG_DISCARD, SG_Q):
                queue = spec.relay == "queue"
                srv = PerfServer(spec, workdir, max_size=MEM_LIMIT,
                                 upstream=upstream if queue else None,
                                 spool_root=spool_root if queue else None).start()
                started.append(srv)
                run_load(srv, SCENARIOS["a"], 200, 0)  # warm-up: imports, buffers
                res = memory_probe(srv, mem_bytes)
                mems.append(res)
                srv.stop()
                print(f"memory {spec.name}: idle {res.idle_kib} KiB, growth sampled "
                      f"{res.sampled_growth_kib} KiB, HWM {res.hwm_growth_kib} KiB", flush=True)
    except BenchError as exc:
        print(f"perf.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("perf.py: interrupted", file=sys.stderr)
        return 1
    finally:
        for running in started:
            running.stop()
        shutil.rmtree(spool_root, ignore_errors=True)

    lines.insert(2, f"rounds started on a busy machine (> 30% of a core used by others): "
                    f"{busy_rounds[0]}")
    names = [AIO.name, SG_DISCARD.name, SG_Q.name]
    for k in scen_keys:
        sc = SCENARIOS[k]
        lines += rows_table(runs, k, names, AIO.name,
                            f"{k}: {sc.title}  (smtp-source {'-d ' if sc.persistent else ''}"
                            f"-s {sc.sessions} -l {sc.size} -m {max(100, int(base * sc.share))})",
                            [SG_DISCARD.name, SG_Q.name])
        lines.append("")
    if wruns:
        lines += rows_table(wruns, "ax2", [AIO.name, W1.name, W2.name], W1.name,
                            f"workers: scenario a from 2 smtp-source processes "
                            f"(each -d -s 20 -l 4096 -m {base // 2})", [W2.name])
        pairs = [a.rate / b.rate for a in wruns if a.server == W2.name
                 for b in wruns if b.server == AIO.name and a.round == b.round]
        if pairs:
            lines.append(f"  ratio {W2.name} / {AIO.name}: {fmt_range(pairs, '.2f')}")
        lines.append("")
    if mems:
        lines.append(f"memory: one message of {mem_bytes} bytes (max_message_size "
                     f"{MEM_LIMIT}), process tree, KiB")
        for mr in mems:
            lines.append(f"  {mr.server:34s} idle {mr.idle_kib:7d}  growth: sampled peak "
                         f"{mr.sampled_growth_kib:7d}, VmHWM {mr.hwm_growth_kib:7d} "
                         f"({mr.hwm_growth_kib / 1024:.1f} MiB; {len(mr.per_process)} procs"
                         f"{'' if mr.hwm_reset else ', HWM not reset'})"
                         f"  DATA {mr.data_seconds:.2f}s"
                         + (f"  drain {mr.drain_seconds:.2f}s" if mr.drain_seconds else ""))
            for label, kib in mr.per_process.items():
                lines.append(f"      VmHWM growth {kib:7d} KiB  pid {label}")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (RESULTS / "perf-latest.txt").write_text(text)
    (RESULTS / "perf-latest.json").write_text(json.dumps(
        {"runs": [asdict(r) for r in runs], "workers": [asdict(r) for r in wruns],
         "memory": [asdict(m) | {"sampled_growth_kib": m.sampled_growth_kib} for m in mems]},
        indent=1))
    return 0


if __name__ == "__main__":
    with bench.terminate_on_signal():
        sys.exit(main())

"""Benchmark harness: smtpgate vs aiosmtpd under Postfix's smtp-source, on loopback.

Entry point: ``python bench/bench.py`` (normally via ``bench/run.sh``). Runs the
scenarios a/b/c for several rounds, alternating the servers within each round; then the
families "queue" (store-and-forward vs proxy to smtp-sink, plus DATA-end latency) and
"scan" (clamd in the data phase vs no scanner); then measures resident memory per idle
connection after EHLO, and prints (and writes to bench/results/latest.txt) a table of
messages/s, same-round ratios, CPU per message. Tuning through the environment: ROUNDS,
MESSAGES, SCENARIOS, EXTRAS, QUEUE, SCAN, FAMILY_ROUNDS, QUEUE_MESSAGES, SCAN_MESSAGES,
LAT_MESSAGES, QUEUE_DIR, MEM_CONNS, PROFILE (see bench/README.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import clamd_proc
import idle_mem
import latency
import smtpgate_probe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
SENDER = "bench@client.test"
RECIPIENT = "sink@bench.test"


class BenchError(Exception):
    """The run is not clean (server died, smtp-source failed): abort, exit status 1."""


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One smtp-source workload.

    Attributes:
        key: "a", "b" or "c".
        title: human description for the table.
        persistent: pass ``-d`` (many messages per connection) or not (one per connection).
        sessions: smtp-source ``-s`` (concurrent sessions).
        size: smtp-source ``-l``, payload bytes including CRLFs (headers add ~126 bytes).
        share: messages per run = MESSAGES * share.
        target: required median ratio smtpgate/aiosmtpd.
    """

    key: str
    title: str
    persistent: bool
    sessions: int
    size: int
    share: float
    target: float


SCENARIOS = {
    "a": Scenario("a", "persistent, 20 sessions, 4 KiB", True, 20, 4096, 1.0, 2.0),
    "b": Scenario("b", "conn per message, 20 conc, 4 KiB", False, 20, 4096, 0.5, 1.3),
    "c": Scenario("c", "persistent, 10 sessions, 100 KiB", True, 10, 102400, 0.125, 3.0),
}
#: The scan family's serialisation check: scenario a with a single session.
A1 = Scenario("a1", "persistent, 1 session, 4 KiB", True, 1, 4096, 0.1, 0.0)
#: Target of the queue family: queue (fsync) / proxy msgs/s, median of same-round ratios.
QUEUE_TARGET = 0.5


# ------------------------------------------------------------------ servers


@dataclass(frozen=True)
class ServerSpec:
    """A server under test.

    Attributes:
        name: row label.
        kind: "smtpgate", "aiosmtpd" or "smtp-sink".
        uvloop: run on uvloop (smtpgate ``server.use_uvloop``, aiosmtpd ``--uvloop``).
        relay: "" (``relay.url = "discard:"``), or the ``delivery.mode`` ("proxy":
            synchronous relay, "queue": spool then relay) with which smtpgate relays every
            message to a Postfix smtp-sink.
        compared: "sg" (the smtpgate of the ratio), "base" (the baseline) or "" (info).
        fsync: ``queue.fsync`` (queue mode only).
        scanner: add ``[[scanner]] type = "clamav"`` pointing at the family's private clamd.
        probe: run through bench/smtpgate_probe.py (per-message data-phase and scan times).
        counter: smtp-sink only: ``-c`` (message counters on stdout, for delivery checks).
    """

    name: str
    kind: str
    uvloop: bool = False
    relay: str = ""
    compared: str = ""
    fsync: bool = True
    scanner: bool = False
    probe: bool = False
    counter: bool = False


SG = ServerSpec("smtpgate (uvloop)", "smtpgate", uvloop=True, compared="sg")
SG_ASYNCIO = ServerSpec("smtpgate (asyncio)", "smtpgate", uvloop=False)
AIOSMTPD_VERSION = importlib.metadata.version("aiosmtpd")
AIO = ServerSpec(f"aiosmtpd {AIOSMTPD_VERSION}", "aiosmtpd", uvloop=False, compared="base")
AIO_UV = ServerSpec("aiosmtpd + uvloop", "aiosmtpd", uvloop=True)
SINK = ServerSpec("smtp-sink (rig ceiling)", "smtp-sink")
UPSTREAM = ServerSpec("smtp-sink upstream", "smtp-sink", counter=True)
SG_RELAY = ServerSpec("smtpgate proxy -> smtp-sink", "smtpgate", uvloop=True, relay="proxy",
                      compared="base")
SG_QUEUE = ServerSpec("smtpgate queue, fsync -> sink", "smtpgate", uvloop=True, relay="queue",
                      compared="sg")
SG_QUEUE_NOSYNC = ServerSpec("smtpgate queue, no fsync -> sink", "smtpgate", uvloop=True,
                             relay="queue", fsync=False)
SG_NOSCAN = ServerSpec("smtpgate, no scanner (probe)", "smtpgate", uvloop=True, probe=True,
                       compared="base")
SG_CLAMD = ServerSpec("smtpgate + clamd (probe)", "smtpgate", uvloop=True, probe=True,
                      scanner=True, compared="sg")


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child if the harness dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smtp_ping(port: int, timeout: float = 2.0) -> bool:
    """True when 127.0.0.1:port answers with a 220 greeting (then QUIT)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            f = s.makefile("rb")
            line = f.readline()
            if not line.startswith(b"220"):
                return False
            s.sendall(b"QUIT\r\n")
            f.readline()
            return True
    except OSError:
        return False


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/PID/task/TID/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in
                                Path(f"/proc/{p}/task/{task}/children").read_text().split())
    return out


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds of the process tree rooted at pid, from /proc/PID/stat."""
    user = system = 0
    for p in tree_pids(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        user += int(fields[11])  # utime (field 14)
        system += int(fields[12])  # stime (field 15)
    return user / CLK_TCK, system / CLK_TCK


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (user+nice+system+irq+softirq+steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_quiet(budget: float, threshold: float = 0.3) -> tuple[float, bool]:
    """Wait (at most budget seconds) until the machine is quiet.

    Quiet: over one second, all CPUs together were busy less than ``threshold`` of one
    core (our servers are idle between runs, so that is other people's work).

    Returns:
        (seconds waited, whether it was quiet in the end).
    """
    t0 = time.monotonic()
    while True:
        b0 = system_busy_seconds()
        time.sleep(1.0)
        busy = system_busy_seconds() - b0
        waited = time.monotonic() - t0
        if busy < threshold:
            return waited, True
        if waited + 1.0 > budget:
            return waited, False


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """VmRSS (or VmHWM) of one process in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"{key} missing for pid {pid}")


class Server:
    """A running server process (plus, for the relay rows, its smtp-sink upstream).

    Args:
        spec: what to run.
        workdir: config files and logs.
        upstream: the counting smtp-sink the relay rows deliver to.
        clamd: the private clamd of the scanner rows.
        spool_root: parent directory of the queue rows' spools (on a real disk).
    """

    def __init__(self, spec: ServerSpec, workdir: Path, upstream: Server | None = None,
                 clamd: clamd_proc.Clamd | None = None, spool_root: Path | None = None) -> None:
        self.spec = spec
        self.workdir = workdir
        self.upstream = upstream
        self.clamd = clamd
        self.spool_root = spool_root
        self.port = 0
        self.sent = 0  # messages smtp-source got a 250 for (all runs, warm-up included)
        self.proc: subprocess.Popen[bytes] | None = None
        self.slug = re.sub(r"[^A-Za-z0-9]+", "_", spec.name).strip("_")
        self.log_path = workdir / f"{self.slug}.log"
        self.probe_path = workdir / f"{self.slug}.probe"
        self.probe_offset = 0
        self.spool: Path | None = None

    def _command(self) -> list[str]:
        spec = self.spec
        if spec.kind == "smtpgate":
            cfg = self.workdir / f"smtpgate-{self.port}.toml"
            text = ("[server]\n"
                    'hostname = "bench.local"\n'
                    f'listen = ["127.0.0.1:{self.port}"]\n'
                    "max_connections = 5000\n"
                    "max_connections_per_ip = 5000\n"
                    f"use_uvloop = {'true' if spec.uvloop else 'false'}\n"
                    "[log]\n"
                    'level = "WARNING"\n'
                    "[relay]\n")
            if spec.relay:
                assert self.upstream is not None
                text += (f'url = "smtp://127.0.0.1:{self.upstream.port}"\n'
                         f'[delivery]\nmode = "{spec.relay}"\n')
            else:
                text += 'url = "discard:"\n'
            if spec.relay == "queue":
                assert self.spool_root is not None
                self.spool = self.spool_root / f"{self.slug}-{self.port}"
                text += (f'[queue]\npath = "{self.spool}"\n'
                         f"fsync = {'true' if spec.fsync else 'false'}\n")
            if spec.scanner:
                assert self.clamd is not None
                text += f'[[scanner]]\ntype = "clamav"\naddress = "{self.clamd.address}"\n'
            cfg.write_text(text)
            if spec.probe:
                self.probe_path = self.workdir / f"{self.slug}-{self.port}.probe"
                return [sys.executable, str(HERE / "smtpgate_probe.py"), str(self.probe_path),
                        "serve", "-c", str(cfg)]
            return [sys.executable, "-m", "smtpgate", "serve", "-c", str(cfg)]
        if spec.kind == "aiosmtpd":
            cmd = [sys.executable, str(HERE / "aiosmtpd_discard.py"), "--port", str(self.port)]
            return cmd + (["--uvloop"] if spec.uvloop else [])
        if spec.kind == "smtp-sink":
            cmd = ["smtp-sink"]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]
            if spec.counter:
                cmd.append("-c")
            return cmd + ["-m", "2000", f"127.0.0.1:{self.port}", "1024"]
        raise ValueError(spec.kind)

    def start(self) -> Server:
        """Start on a free port and wait (<= 20 s) for its 220 greeting.

        Raises:
            BenchError: the process exited or never greeted.
        """
        for _attempt in range(3):
            self.port = free_port()
            self.log_path = self.workdir / f"{self.slug}-{self.port}.log"
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, preexec_fn=_die_with_parent,
            )
            log.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if smtp_ping(self.port):
                    return self
                time.sleep(0.05)
            self.stop()
        raise BenchError(
            f"{self.spec.name} did not start; log bench/results/{self.log_path.name}:\n"
            + self.log_path.read_text(errors="replace")[-2000:])

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise BenchError when the server process has exited."""
        if self.proc is None or self.proc.poll() is not None:
            status = self.proc.returncode if self.proc is not None else None
            raise BenchError(f"{self.spec.name} died (exit status {status}; negative = killed "
                             f"by that signal); log bench/results/{self.log_path.name}:\n"
                             + self.log_path.read_text(errors="replace")[-2000:])

    def verify_count(self) -> None:
        """After stop(): the aiosmtpd baseline must have received every message sent.

        Raises:
            BenchError: its exit line is missing or its message count differs.
        """
        if self.spec.kind != "aiosmtpd":
            return
        m = re.search(r"^messages (\d+) octets (\d+)$",
                      self.log_path.read_text(errors="replace"), re.M)
        if m is None or int(m.group(1)) != self.sent:
            got = m.group(1) if m else "no count"
            raise BenchError(f"{self.spec.name} received {got} messages, smtp-source "
                             f"sent {self.sent}; log bench/results/{self.log_path.name}")

    def stop(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def aux_pids(self) -> list[int]:
        """Helper processes whose CPU belongs to this row: the upstream sink, clamd."""
        pids = []
        if self.spec.relay and self.upstream is not None:
            pids.append(self.upstream.pid)
        if self.spec.scanner and self.clamd is not None:
            pids.append(self.clamd.pid)
        return pids

    def sink_counts(self) -> tuple[int, int]:
        """smtp-sink ``-c`` counters: (sessions, messages) so far, from its stdout log.

        Its counter lines look like ``sess=12 quit=12 mesg=3000``, separated by CR.
        """
        size = self.log_path.stat().st_size
        with self.log_path.open("rb") as f:
            f.seek(max(0, size - 512))
            tail = f.read()
        for rec in reversed(tail.split(b"\r")):
            m = re.fullmatch(rb"\s*sess=(\d+) quit=\d+ mesg=(\d+)\s*", rec)
            if m:
                return int(m.group(1)), int(m.group(2))
        return 0, 0

    def spool_files(self) -> dict[str, int]:
        """Files per spool subdirectory that hold mail (incoming, deferred, hold, messages, tmp)."""
        assert self.spool is not None
        out: dict[str, int] = {}
        for sub in ("incoming", "deferred", "hold", "messages", "tmp"):
            with contextlib.suppress(FileNotFoundError):
                out[sub] = sum(1 for _ in os.scandir(self.spool / sub))
        return out

    def queue_list(self) -> list[object]:
        """``python -m smtpgate queue list --spool DIR --json`` (the spool's own account).

        Raises:
            BenchError: the command failed or printed no JSON list.
        """
        assert self.spool is not None
        res = subprocess.run([sys.executable, "-m", "smtpgate", "queue", "list", "--spool",
                              str(self.spool), "--json"], capture_output=True, text=True)
        try:
            entries = json.loads(res.stdout)
        except ValueError:
            entries = None
        if res.returncode != 0 or not isinstance(entries, list):
            raise BenchError(f"smtpgate queue list --spool {self.spool} failed "
                             f"(exit {res.returncode}): {res.stderr[-1000:]}")
        return entries

    def wait_relayed(self, before: int, messages: int, t_end: float) -> float:
        """Wait until smtp-sink has all ``messages`` of this run (and the spool is empty).

        Args:
            before: the upstream's message counter before the run.
            messages: messages the client got a 250 for in this run.
            t_end: ``time.perf_counter()`` when the client finished.

        Returns:
            the drain time: seconds from ``t_end`` until the last message reached the
            sink and (queue mode) the spool held no message any more.

        Raises:
            BenchError: the sink got more or, within 30 s + 10 ms per message, fewer
                messages than sent, or the spool did not empty (a delivery was deferred).
        """
        assert self.upstream is not None
        deadline = time.monotonic() + 30 + messages / 100
        while True:
            got = self.upstream.sink_counts()[1] - before
            if got > messages:
                raise BenchError(f"{self.spec.name}: smtp-sink received {got} messages, "
                                 f"the client sent {messages} (duplicates)")
            if got == messages:
                if self.spool is None:
                    return time.perf_counter() - t_end
                files = self.spool_files()
                if not any(files.values()):
                    return time.perf_counter() - t_end
            if time.monotonic() > deadline:
                where = f"; spool {self.spool_files()}" if self.spool is not None else ""
                raise BenchError(f"{self.spec.name}: smtp-sink received {got} of {messages} "
                                 f"messages{where}; log bench/results/{self.log_path.name}")
            self.check_alive()
            self.upstream.check_alive()
            time.sleep(0.005)


# ----------------------------------------------------------------- a run


@dataclass
class Run:
    """One timed smtp-source run against one server.

    CPU figures cover the run and, for queue rows, the drain after it (background relaying).
    """

    server: str
    scenario: str
    round: int
    messages: int
    seconds: float
    server_cpu: float  # user+system seconds of the server's process tree
    server_sys: float  # of which system (kernel) seconds
    client_cpu: float
    other_cpu: float  # busy CPU seconds of the whole machine minus all of the above
    aux_cpu: float = 0.0  # helper processes of the row: upstream smtp-sink, clamd
    drain: float = 0.0  # seconds from smtp-source's exit until everything was relayed
    extra: dict[str, float] = field(default_factory=dict)  # upstream sessions, probe sums

    @property
    def rate(self) -> float:
        """Messages per second (wall clock of smtp-source)."""
        return self.messages / self.seconds

    @property
    def window(self) -> float:
        """Seconds the CPU figures cover: the run plus the drain."""
        return self.seconds + self.drain

    @property
    def sys_ms(self) -> float:
        """Server system (kernel) CPU milliseconds per message."""
        return 1000.0 * self.server_sys / self.messages

    @property
    def cpu_ms(self) -> float:
        """Server CPU milliseconds (user+system, whole process tree) per message."""
        return 1000.0 * self.server_cpu / self.messages

    @property
    def aux_ms(self) -> float:
        """Helper (upstream sink, clamd) CPU milliseconds per message."""
        return 1000.0 * self.aux_cpu / self.messages


def smtp_source(sc: Scenario, port: int, messages: int) -> list[str]:
    """The smtp-source command line for a scenario (no -c: it prints per message)."""
    cmd = ["smtp-source", "-s", str(sc.sessions), "-m", str(messages), "-l", str(sc.size),
           "-f", SENDER, "-t", RECIPIENT, "-M", "client.test"]
    if sc.persistent:
        cmd.append("-d")
    return cmd + [f"127.0.0.1:{port}"]


def aux_cpu_seconds(server: Server) -> float:
    """User+system CPU seconds of the row's helper processes (see Server.aux_pids)."""
    return sum(sum(cpu_seconds(p)) for p in server.aux_pids())


def run_load(server: Server, sc: Scenario, messages: int, rnd: int) -> Run:
    """Run smtp-source once against server; time it and measure the server's CPU.

    Relay rows: waits until smtp-sink got every message (queue rows: until the spool is
    empty too) and records that drain time. Probe rows: checks that every message has
    its transaction line (and, with the scanner, a clamd scan and ``clamav=clean``).

    Raises:
        BenchError: smtp-source exited non-zero (an unexpected reply), timed out, the
            server died, or a message was not relayed / not scanned.
    """
    server.check_alive()
    if server.spec.relay and server.upstream is not None:
        server.upstream.check_alive()
    if server.spec.scanner and server.clamd is not None:
        try:
            server.clamd.check_alive()
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
    cmd = smtp_source(sc, server.port, messages)
    relayed_before = server.upstream.sink_counts() if server.spec.relay and server.upstream \
        else (0, 0)
    if server.spec.probe:
        server.probe_offset = smtpgate_probe.read_probe(server.probe_path,
                                                        server.probe_offset)[1]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = cpu_seconds(server.pid)
    aux0 = aux_cpu_seconds(server)
    busy0 = system_busy_seconds()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=max(120.0, messages / 20))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(
            f"smtp-source timed out against {server.spec.name}: {' '.join(cmd)}") from None
    t1 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        helper = ""
        if server.spec.relay and server.upstream is not None and server.upstream.proc is not None \
                and server.upstream.proc.poll() is not None:
            helper = (f"\nthe upstream smtp-sink has exited (status "
                      f"{server.upstream.proc.returncode}; negative = killed by that signal)")
        if server.spec.scanner and server.clamd is not None and server.clamd.proc is not None \
                and server.clamd.proc.poll() is not None:
            helper = f"\nclamd has exited (status {server.clamd.proc.returncode})"
        raise BenchError(
            f"smtp-source exit {proc.returncode} against {server.spec.name} "
            f"(scenario {sc.key}, round {rnd}): {' '.join(cmd)}\n"
            + out.decode(errors="replace")[-2000:] + helper
        )
    server.check_alive()
    server.sent += messages
    drain = 0.0
    extra: dict[str, float] = {}
    if server.spec.relay:
        drain = server.wait_relayed(relayed_before[1], messages, t1)
        extra["upstream_sessions"] = server.upstream.sink_counts()[0] - relayed_before[0] \
            if server.upstream else 0
        if server.spec.relay != "queue":
            drain = 0.0  # proxy: relayed before the 250; the wait only confirmed the count
    busy1 = system_busy_seconds()
    cpu1 = cpu_seconds(server.pid)
    aux = aux_cpu_seconds(server) - aux0
    if server.spec.probe:
        extra.update(probe_stats(server, messages, sc, rnd))
    client = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    srv = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
    other = max(0.0, (busy1 - busy0) - srv - client - aux)
    return Run(server.spec.name, sc.key, rnd, messages, t1 - t0, srv, cpu1[1] - cpu0[1],
               client, other, aux, drain, extra)


def probe_stats(server: Server, messages: int, sc: Scenario, rnd: int) -> dict[str, float]:
    """Sums over this run's probe lines (bench/smtpgate_probe.py).

    Returns:
        ``tx_sum`` (data-phase seconds, all messages), ``scan_n``, ``scan_sum``,
        ``scan_p50``, ``scan_p95`` (clamd exchange seconds).

    Raises:
        BenchError: not exactly one transaction line (with ``outcome=delivered`` and the
            expected scan result) and, with the scanner, one scan per message.
    """
    deadline = time.monotonic() + 5
    while True:
        probe, end = smtpgate_probe.read_probe(server.probe_path, server.probe_offset)
        if len(probe.tx) >= messages or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    server.probe_offset = end
    want = "delivered clamav=clean" if server.spec.scanner else "delivered -"
    bad = [o for o in probe.outcomes if o != want]
    n_scans = len(probe.scans)
    if len(probe.tx) != messages or bad or n_scans != (messages if server.spec.scanner else 0):
        raise BenchError(
            f"{server.spec.name} (scenario {sc.key}, round {rnd}): {len(probe.tx)} transaction "
            f"lines and {n_scans} scans for {messages} messages; unexpected outcomes "
            f"{bad[:3]}; probe bench/results/{server.probe_path.name}")
    out = {"tx_sum": sum(probe.tx), "scan_n": float(n_scans), "scan_sum": sum(probe.scans)}
    if probe.scans:
        out["scan_p50"] = statistics.median(probe.scans)
        out["scan_p95"] = latency.percentile(probe.scans, 95)
    return out


# ------------------------------------------------------------------ stats


def med(xs: list[float]) -> float:
    """Median."""
    return statistics.median(xs)


def spread(xs: list[float], fmt: str) -> str:
    """'median [min-max]' with the given format ('median [min..max]' for signed formats)."""
    sep = ".." if "+" in fmt else "-"
    return f"{med(xs):{fmt}} [{min(xs):{fmt}}{sep}{max(xs):{fmt}}]"


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100)."""
    return latency.percentile(xs, q)


@dataclass
class Family:
    """A group of rows with its own rounds: main (vs aiosmtpd), queue, scan."""

    key: str
    servers: list[ServerSpec]
    scenarios: list[Scenario]


@dataclass
class Report:
    """Everything measured, and the text table."""

    header: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    memory: dict[str, list[float]] = field(default_factory=dict)
    rss_after: dict[str, tuple[int, int]] = field(default_factory=dict)
    profile: list[str] = field(default_factory=list)
    latency: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # s, by round
    notes: dict[str, list[str]] = field(default_factory=dict)  # family key -> title lines

    def rates(self, server: str, scenario: str) -> dict[int, Run]:
        """Runs of one server in one scenario, by round."""
        return {r.round: r for r in self.runs if r.server == server and r.scenario == scenario}

    def same_round(self, a: ServerSpec, b: ServerSpec, scenario: str,
                   value: Callable[[Run, Run], float]) -> list[float]:
        """value(run of a, run of b) for every round in which both ran the scenario."""
        ra, rb = self.rates(a.name, scenario), self.rates(b.name, scenario)
        return [value(ra[k], rb[k]) for k in sorted(ra) if k in rb]

    def table(self, families: list[Family]) -> str:
        """The result table (plain text, about 110 columns)."""
        lines = list(self.header)
        lines.append("")
        verdicts: list[str] = []
        for fam in families:
            lines.extend(self.notes.get(fam.key, []))
            if fam.key == "main":
                lines.extend(self._main(fam, verdicts))
            elif fam.key == "queue":
                lines.extend(self._queue(fam, verdicts))
            elif fam.key == "scan":
                lines.extend(self._scan(fam))
        w = 34
        if self.memory:
            lines.append("Idle connections after EHLO: server RSS delta / connections "
                         "(median [min-max] over fresh processes)")
            for name, vals in self.memory.items():
                lines.append(f"  {name:<{w - 2}} {spread(vals, '.1f'):>26} KiB/conn")
            lines.append("")
        if self.rss_after:
            lines.append("RSS of the long-running servers at the end of the load rounds "
                         "(VmRSS / VmHWM, MiB)")
            for name, (rss, hwm) in self.rss_after.items():
                lines.append(f"  {name:<{w - 2}} {rss / 1024:>10.1f} / {hwm / 1024:.1f}")
            lines.append("")
        if verdicts:
            lines.append("Targets (median of same-round ratios): " + "; ".join(verdicts))
        lines.append("CPU ms/msg: server user+system time per message (/proc/PID/stat, whole "
                     "process tree); (sys): of which kernel.")
        lines.append("srv / src / aux / other: CPU of the server / of smtp-source / of the row's "
                     "helper (upstream smtp-sink, clamd) /")
        lines.append("  of everything else on the machine (kernel included), as % of one core "
                     "during the run (server near 100% = server-bound).")
        if self.runs:
            other = med([r.other_cpu / r.window for r in self.runs]) * 100
            if other > 25:
                lines.append(f"WARNING: other processes used a median {other:.0f}% of a core "
                             "during the timed runs: the machine was busy, the numbers are "
                             "disturbed; rerun on a quiet machine.")
        if self.profile:
            lines.append("")
            lines.extend(self.profile)
        return "\n".join(lines) + "\n"

    def _rows(self, spec: ServerSpec, sc: Scenario, w: int, aux: bool,
              drain: bool = False) -> str | None:
        """One row: msgs/s, CPU ms/msg, (sys), srv/src[/aux]/other CPU [, drain, conn/msg]."""
        runs = list(self.rates(spec.name, sc.key).values())
        if not runs:
            return None
        rates = [r.rate for r in runs]
        cpu = med([r.cpu_ms for r in runs])
        sys_ms = med([r.sys_ms for r in runs])
        srv = med([r.server_cpu / r.window for r in runs]) * 100
        cli = med([r.client_cpu / r.window for r in runs]) * 100
        oth = med([r.other_cpu / r.window for r in runs]) * 100
        text = (f"  {spec.name:<{w - 2}} {spread(rates, '.0f'):>26} "
                f"{cpu:>11.3f} {sys_ms:>7.3f} {srv:>7.0f}% {cli:>7.0f}%")
        if aux:
            text += f" {med([r.aux_cpu / r.window for r in runs]) * 100:>7.0f}%"
        text += f" {oth:>5.0f}%"
        if drain:
            d = f"{med([r.drain for r in runs]):.2f}" if spec.relay == "queue" else "-"
            conns = med([r.extra.get("upstream_sessions", 0) / r.messages for r in runs])
            text += f" {d:>8} {conns:>9.3f}"
        return text

    def _scenario_line(self, sc: Scenario, fam: Family) -> str:
        names = {s.name for s in fam.servers}
        n = int(next((r.messages for r in self.runs
                      if r.scenario == sc.key and r.server in names and r.round > 0), 0))
        flag = "-d " if sc.persistent else ""
        return (f"{sc.key}: {sc.title}  (smtp-source {flag}-s {sc.sessions} -l {sc.size} "
                f"-m {n})")

    def _main(self, fam: Family, verdicts: list[str]) -> list[str]:
        w = 34
        lines = [f"{'scenario / server':<{w}} {'msgs/s median [min-max]':>26} "
                 f"{'CPU ms/msg':>11} {'(sys)':>7} {'srv CPU':>8} {'src CPU':>8} "
                 f"{'other':>6}"]
        lines.append("-" * 107)
        for sc in fam.scenarios:
            lines.append(self._scenario_line(sc, fam))
            for spec in fam.servers:
                row = self._rows(spec, sc, w, aux=False)
                if row:
                    lines.append(row)
            for spec in fam.servers:
                if spec.kind != "smtpgate" or spec.relay:
                    continue
                ratios = self.same_round(spec, AIO, sc.key, lambda m, b: m.rate / b.rate)
                if not ratios:
                    continue
                label = f"  ratio {spec.name}/aiosmtpd"
                text = f"{label:<{w}} {spread(ratios, '.2f'):>26}"
                if spec.compared == "sg":
                    verdict = "PASS" if med(ratios) >= sc.target else "MISS"
                    text += f"   target >= {sc.target:.1f}: {verdict}"
                    verdicts.append(f"{sc.key}: {med(ratios):.2f} (>= {sc.target:.1f}) {verdict}")
                lines.append(text)
                if spec.compared == "sg":
                    eff = self.same_round(spec, AIO, sc.key,
                                          lambda m, b: b.cpu_ms / m.cpu_ms if m.cpu_ms else 0.0)
                    if eff:
                        label = "    (CPU/msg aiosmtpd/smtpgate)"
                        lines.append(f"{label:<{w}} {spread(eff, '.2f'):>26}")
            lines.append("")
        return lines

    def _queue(self, fam: Family, verdicts: list[str]) -> list[str]:
        w = 34
        proxy = SG_RELAY
        lines = [f"{'scenario / server':<{w}} {'msgs/s median [min-max]':>26} "
                 f"{'CPU ms/msg':>11} {'(sys)':>7} {'srv CPU':>8} {'src CPU':>8} "
                 f"{'sink':>8} {'other':>6} {'drain s':>8} {'conn/msg':>9}"]
        lines.append("-" * 125)
        queues = [s for s in fam.servers if s.relay == "queue"]
        for sc in fam.scenarios:
            lines.append(self._scenario_line(sc, fam))
            for spec in fam.servers:
                row = self._rows(spec, sc, w, aux=True, drain=True)
                if row:
                    lines.append(row)
            for spec in queues:
                ratios = self.same_round(spec, proxy, sc.key, lambda q, p: q.rate / p.rate)
                if not ratios:
                    continue
                what = "fsync" if spec.fsync else "no fsync"
                label = f"  ratio queue ({what})/proxy"
                text = f"{label:<{w}} {spread(ratios, '.2f'):>26}"
                if spec.compared == "sg":
                    verdict = "PASS" if med(ratios) >= QUEUE_TARGET else "MISS"
                    text += f"   target >= {QUEUE_TARGET:.1f}: {verdict}"
                    verdicts.append(f"queue/proxy {sc.key}: {med(ratios):.2f} "
                                    f"(>= {QUEUE_TARGET:.1f}) {verdict}")
                lines.append(text)
                done = self.same_round(spec, proxy, sc.key,
                                       lambda q, p: q.messages / q.window / p.rate)
                label = "    (incl. drain: delivered/s)"
                lines.append(f"{label:<{w}} {spread(done, '.2f'):>26}")
            lines.append("")
        lines.extend(self._latency(fam))
        return lines

    def _latency(self, fam: Family) -> list[str]:
        w = 34
        specs = [s for s in fam.servers if s.name in self.latency]
        if not specs:
            return []
        k = len(next(iter(self.latency[specs[0].name].values())))
        lines = [f"DATA-end latency, one session, {k} messages of 4 KiB one after another per "
                 "server and round (bench/latency.py), ms:",
                 f"  {'server':<{w - 2}} {'median':>8} {'p95':>8}   per-round medians "
                 "[min-max]"]
        for spec in specs:
            rounds = self.latency[spec.name]
            allx = [x for xs in rounds.values() for x in xs]
            meds = [1000 * med(xs) for xs in rounds.values()]
            lines.append(f"  {spec.name:<{w - 2}} {1000 * med(allx):>8.2f} "
                         f"{1000 * pct(allx, 95):>8.2f}   {spread(meds, '.2f')}")
        base = self.latency.get(SG_RELAY.name)
        for spec in specs:
            mine = self.latency[spec.name]
            if spec.relay != "queue" or base is None:
                continue
            both = [r for r in mine if r in base]
            d50 = [1000 * (med(mine[r]) - med(base[r])) for r in both]
            d95 = [1000 * (pct(mine[r], 95) - pct(base[r], 95)) for r in both]
            what = "fsync" if spec.fsync else "no fsync"
            lines.append(f"  added by queue ({what}) vs proxy, same round: median "
                         f"{spread(d50, '+.2f')} ms, p95 {spread(d95, '+.2f')} ms")
        lines.append("")
        return lines

    def _scan(self, fam: Family) -> list[str]:
        w = 34
        lines = [f"{'scenario / server':<{w}} {'msgs/s median [min-max]':>26} "
                 f"{'CPU ms/msg':>11} {'(sys)':>7} {'srv CPU':>8} {'src CPU':>8} "
                 f"{'clamd':>8} {'other':>6}"]
        lines.append("-" * 116)
        for sc in fam.scenarios:
            lines.append(self._scenario_line(sc, fam))
            for spec in fam.servers:
                row = self._rows(spec, sc, w, aux=True)
                if row:
                    lines.append(row)
            ratios = self.same_round(SG_CLAMD, SG_NOSCAN, sc.key, lambda c, n: c.rate / n.rate)
            if ratios:
                label = "  ratio clamd/no scanner"
                lines.append(f"{label:<{w}} {spread(ratios, '.2f'):>26}")
            lines.append("")
        keys = [sc for sc in fam.scenarios if self.rates(SG_CLAMD.name, sc.key)]
        if not keys:
            return lines
        cw = 21
        metrics: list[tuple[str, ServerSpec, Callable[[Run, Scenario], float], str]] = [
            ("clamd exchange ms, mean", SG_CLAMD,
             lambda r, sc: 1000 * r.extra["scan_sum"] / r.messages, ".2f"),
            ("clamd exchange ms, median", SG_CLAMD,
             lambda r, sc: 1000 * r.extra["scan_p50"], ".2f"),
            ("clamd exchange ms, p95", SG_CLAMD, lambda r, sc: 1000 * r.extra["scan_p95"], ".2f"),
            ("data phase ms/msg, + clamd", SG_CLAMD,
             lambda r, sc: 1000 * r.extra["tx_sum"] / r.messages, ".2f"),
            ("data phase ms/msg, no scanner", SG_NOSCAN,
             lambda r, sc: 1000 * r.extra["tx_sum"] / r.messages, ".3f"),
            ("clamd CPU ms/msg", SG_CLAMD, lambda r, sc: r.aux_ms, ".3f"),
            ("clamd CPU % of clamd+smtpgate", SG_CLAMD,
             lambda r, sc: 100 * r.aux_cpu / (r.aux_cpu + r.server_cpu), ".0f"),
            ("wait share of session time %", SG_CLAMD,
             lambda r, sc: 100 * r.extra["scan_sum"] / (sc.sessions * r.seconds), ".0f"),
            ("scans in flight (sum/wall)", SG_CLAMD,
             lambda r, sc: r.extra["scan_sum"] / r.seconds, ".2f"),
        ]
        rows: list[tuple[str, list[str]]] = []
        for label, spec, fn, fmt in metrics:
            cells = []
            for sc in keys:
                runs = list(self.rates(spec.name, sc.key).values())
                cells.append(spread([fn(r, sc) for r in runs], fmt) if runs else "-")
            rows.append((label, cells))
        lines.append("Scanner stage, smtpgate + clamd (median [min-max] over rounds); columns: "
                     "scenario (sessions)")
        lines.append(f"  {'':<{w - 2}}" + "".join(f"{f'{sc.key} ({sc.sessions})':>{cw}}"
                                                   for sc in keys))
        for label, cells in rows:
            lines.append(f"  {label:<{w - 2}}" + "".join(f"{c:>{cw}}" for c in cells))
        for sc in keys:
            if sc.key != "a":  # a1 is scenario a with one session
                continue
            for spec in (SG_CLAMD, SG_NOSCAN):
                one = self.rates(spec.name, A1.key)
                mine = self.rates(spec.name, sc.key)
                both = [k for k in mine if k in one]
                if not both:
                    continue
                ratio = [mine[k].rate / one[k].rate for k in both]
                lines.append(f"  msgs/s {sc.key} ({sc.sessions} sessions) / {A1.key} (1 session), "
                             f"{spec.name}: {spread(ratio, '.2f')}")
        lines.append("")
        return lines


# ------------------------------------------------------------------ phases


def env_int(name: str, default: int) -> int:
    """An integer from the environment."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def header(rounds: int, base_messages: int) -> list[str]:
    """Context lines: versions, machine, load."""
    import aiosmtpd

    import smtpgate

    try:
        uv = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uv = "NOT INSTALLED (smtpgate falls back to asyncio)"
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    pf = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "postfix"],
                        capture_output=True, text=True).stdout.strip() or "?"
    load = Path("/proc/loadavg").read_text().split()[:3]
    return [
        f"smtpgate benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"smtpgate {smtpgate.__version__}, aiosmtpd {aiosmtpd.__version__}, uvloop {uv}, "
        f"Python {platform.python_version()}, postfix smtp-source {pf}",
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"loadavg at start {' '.join(load)}",
        f"{rounds} rounds, servers alternate within each round; MESSAGES={base_messages}. "
        "Absolute msgs/s swing between runs; compare only the same-round ratios.",
    ]


class QuietBudget:
    """Seconds left, over the whole run, to wait for a quiet machine (QUIET_WAIT)."""

    left: float = 60.0


def fs_type(path: Path) -> str:
    """Type and device of the file system holding path (/proc/mounts): 'ext4 /dev/vda'."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, typ, dev)
    return f"{best[1]} {best[2]}"


def make_spool_root(report: Report) -> Path:
    """A fresh directory for the queue rows' spools under QUEUE_DIR (default /var/tmp)."""
    parent = Path(os.environ.get("QUEUE_DIR", "").strip() or "/var/tmp")
    root = Path(tempfile.mkdtemp(prefix="smtpgate-bench-spool-", dir=parent))
    fs = fs_type(root)
    note = f"spools in {root} ({fs})"
    if fs.split()[0] in ("tmpfs", "ramfs", "overlay"):
        note += "  WARNING: not a plain disk file system, fsync costs are not representative"
    report.notes.setdefault("queue", []).append(note)
    return root


def latency_round(report: Report, servers: list[Server], rnd: int, count: int) -> None:
    """Time ``count`` DATA ends per relay row (one session each, bench/latency.py).

    Every message must reach smtp-sink (and leave the spool) before the next row is timed.

    Raises:
        BenchError: a message was refused, lost or not relayed.
    """
    order = servers if rnd % 2 else list(reversed(servers))
    warmup = 10
    for srv in order:
        srv.check_alive()
        before = srv.upstream.sink_counts()[1] if srv.upstream else 0
        try:
            xs = latency.measure(srv.port, count, 4096, warmup=warmup)
        except (latency.SmtpReplyError, OSError) as exc:
            raise BenchError(f"latency client against {srv.spec.name}: {exc}") from None
        t_end = time.perf_counter()
        srv.sent += count + warmup
        srv.wait_relayed(before, count + warmup, t_end)
        report.latency.setdefault(srv.spec.name, {})[rnd] = xs
    print(f"round {rnd} latency: " + ", ".join(
        f"{s.spec.name} {1000 * med(report.latency[s.spec.name][rnd]):.2f} ms" for s in servers),
        flush=True)


def check_scanning(srv: Server) -> None:
    """A message carrying EICAR through smtpgate + clamd must be refused with 554 5.7.1.

    Raises:
        BenchError: it was accepted (the scanner is not in the pipeline) or another reply.
    """
    body = clamd_proc.EICAR.decode() + "\r\n"
    try:
        reply = latency.send_one(srv.port, body)
    except OSError as exc:
        raise BenchError(f"EICAR check against {srv.spec.name}: {exc}") from None
    if not reply.startswith("554"):
        raise BenchError(f"{srv.spec.name} answered {reply!r} to a message carrying EICAR "
                         "(expected 554 5.7.1 Virus found): the scanner is not scanning")


def load_rounds(report: Report, fam: Family, rounds: int, base: int, workdir: Path,
                lat_messages: int = 0, profile: bool = False) -> None:
    """Start every server of a family once, warm them up, then run the rounds (order rotates).

    Also starts what the rows need: the counting smtp-sink upstream (relay rows), a private
    clamd (scanner rows), a spool directory on disk (queue rows); removes it all afterwards.

    Args:
        lat_messages: after each round's scenarios, time that many DATA ends on every relay
            row (see :func:`latency_round`); 0 = not.
        profile: also py-spy the family's "sg" row once under its first scenario.

    Raises:
        BenchError: any failure (server died, refused or lost message, queue not drained).
    """
    servers, scenarios = fam.servers, fam.scenarios
    label = "" if fam.key == "main" else f"{fam.key} "
    started: list[Server] = []
    clamd: clamd_proc.Clamd | None = None
    spool_root: Path | None = None
    try:
        upstream: Server | None = None
        if any(s.relay for s in servers):
            upstream = Server(UPSTREAM, workdir).start()
            started.append(upstream)
        if any(s.scanner for s in servers):
            clamd = clamd_proc.Clamd(workdir, threads=env_int("CLAMD_THREADS", 10))
            try:
                clamd.start()
            except RuntimeError as exc:
                raise BenchError(str(exc)) from None
            verdict = clamd.scan(clamd_proc.EICAR)
            if "FOUND" not in verdict:
                raise BenchError(f"private clamd does not detect EICAR: {verdict!r}")
            report.notes.setdefault("scan", []).append(
                f"private clamd: {clamd.version()}, MaxThreads {clamd.threads}, "
                "database = 2 test signatures (bench/clamd_proc.py); EICAR -> "
                f"{verdict.removeprefix('stream: ')}")
        if any(s.relay == "queue" for s in servers):
            spool_root = make_spool_root(report)
        live: dict[str, Server] = {}
        for spec in servers:
            srv = Server(spec, workdir, upstream, clamd, spool_root).start()
            started.append(srv)
            live[spec.name] = srv
        print(f"{label}warm-up ...", flush=True)
        for sc in scenarios:
            for spec in servers:
                run_load(live[spec.name], sc, max(200, int(base * sc.share / 20)), 0)
        busy_rounds = 0
        relays = [live[s.name] for s in servers if s.relay]
        for rnd in range(1, rounds + 1):
            waited, quiet = wait_quiet(QuietBudget.left)
            QuietBudget.left -= waited
            if not quiet:
                busy_rounds += 1
                print(f"{label}round {rnd}: machine busy (other processes), going ahead",
                      flush=True)
            elif waited > 1.5:
                print(f"{label}round {rnd}: waited {waited:.0f} s for a quiet machine",
                      flush=True)
            for sc in scenarios:
                n = max(100, int(base * sc.share))
                shift = (rnd - 1) % len(servers)
                order = servers[shift:] + servers[:shift]
                if rnd % 2 == 0:
                    order.reverse()
                parts: list[str] = []
                others: list[float] = []
                for spec in order:
                    run = run_load(live[spec.name], sc, n, rnd)
                    report.runs.append(run)
                    parts.append(f"{spec.name} {run.rate:.0f}/s"
                                 + (f" +{run.drain:.1f}s drain" if run.drain else ""))
                    others.append(run.other_cpu / run.window)
                print(f"{label}round {rnd}/{rounds} {sc.key}: " + ", ".join(parts)
                      + f"  [other CPU {100 * max(others):.0f}%]", flush=True)
            if lat_messages > 0 and relays:
                latency_round(report, relays, rnd, lat_messages)
        report.header.append(
            f"{label}rounds started on a busy machine (other CPU >= 30% of a core after waiting "
            f"QUIET_WAIT): {busy_rounds} of {rounds}")
        for spec in servers:
            srv = live[spec.name]
            report.rss_after[spec.name] = (rss_kib(srv.pid), rss_kib(srv.pid, "VmHWM"))
            if spec.scanner:
                check_scanning(srv)
            if spec.relay == "queue":
                left = srv.queue_list()
                if left:
                    raise BenchError(f"{spec.name}: smtpgate queue list shows {len(left)} "
                                     f"message(s) left in {srv.spool}")
        if profile:
            target = next((s for s in servers if s.compared == "sg"), None)
            if target is not None and scenarios:
                report.profile.extend(profile_run(live[target.name], scenarios[0], base,
                                                  workdir))
        for srv in started:
            srv.stop()
            srv.verify_count()
        if fam.key == "queue":
            queued = sum(srv.sent for srv in started if srv.spec.relay == "queue")
            report.notes.setdefault("queue", []).append(
                f"checked: every message reached smtp-sink (its -c counters) after each run; "
                f"smtpgate queue list --json empty at the end ({queued} messages went "
                "through the queue rows)")
    finally:
        for srv in reversed(started):
            srv.stop()
        if clamd is not None:
            clamd.stop(keep_log=workdir / "clamd.log")
        if spool_root is not None:
            shutil.rmtree(spool_root, ignore_errors=True)
            if spool_root.exists():
                print(f"WARNING: could not remove the spool {spool_root}", file=sys.stderr)
            else:
                report.notes.setdefault("queue", []).append(f"spools removed: {spool_root}")


def memory_phase(report: Report, specs: list[ServerSpec], conns: int, reps: int,
                 workdir: Path) -> None:
    """Idle memory per connection after EHLO, on fresh server processes."""
    for rep in range(reps):
        for spec in (specs if rep % 2 == 0 else list(reversed(specs))):
            srv = Server(spec, workdir).start()
            try:
                per_conn = idle_mem.measure(srv.pid, srv.port, conns)
            finally:
                srv.stop()
            report.memory.setdefault(spec.name, []).append(per_conn)
            print(f"idle memory {spec.name}: {per_conn:.1f} KiB/conn", flush=True)


def profile_run(srv: Server, sc: Scenario, base: int, workdir: Path,
                idle: bool = False) -> list[str]:
    """py-spy one extra (untimed) run of scenario sc against a running server; summarise.

    Args:
        idle: also sample threads that are blocked (``py-spy --idle``): shows where the
            queue's worker threads wait (fsync) rather than only what burns CPU.
    """
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return ["PROFILE: py-spy not found (pip install py-spy)"]
    raw = workdir / f"pyspy-{srv.slug}-{sc.key}.txt"
    cmd = [pyspy, "record", "--pid", str(srv.pid), "--format", "raw", "--rate", "250",
           "--native", "--output", str(raw)] + (["--idle"] if idle else [])
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        run_load(srv, sc, max(100, int(base * sc.share)), 0)
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    name = f"pyspy-{sc.key}.txt" if srv.spec == SG else f"pyspy-{srv.slug}-{sc.key}.txt"
    if raw.exists():
        shutil.copy(raw, RESULTS / name)
    return summarise_pyspy(raw, sc, srv.spec.name, idle)


def profile_phase(report: Report, scenarios: list[Scenario], base: int, workdir: Path) -> None:
    """py-spy the smtpgate (uvloop) process under each scenario; summarise the hot spots."""
    for sc in scenarios:
        srv = Server(SG, workdir).start()
        try:
            run_load(srv, sc, max(200, int(base * sc.share / 10)), 0)  # warm-up
            report.profile.extend(profile_run(srv, sc, base, workdir))
        finally:
            srv.stop()


def summarise_pyspy(raw: Path, sc: Scenario, name: str = SG.name, idle: bool = False,
                    top: int = 22) -> list[str]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    where: dict[str, int] = {}  # "leaf < two nearest Python callers"
    total = 0
    if not raw.exists():
        return [f"profile {sc.key}: py-spy wrote nothing"]
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f for f in frames if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        total += n
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        callers = [f.split(" (")[0] for f in frames[:-1] if ".py)" in f][-2:]
        key = " < ".join([frames[-1].split(" (")[0]] + callers[::-1])
        where[key] = where.get(key, 0) + n
    if not total:
        return [f"profile {sc.key}: no samples"]
    what = ("all threads, blocked ones included (--idle)" if idle
            else "the busy server; idle waits are not sampled")
    out = [f"py-spy --native profile of {name}, scenario {sc.key} ({total} samples of {what})",
           f"  {'self%':>6} {'total%':>7}  function (file)"]
    for fn, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / total:>6.1f} {100 * incl[fn] / total:>7.1f}  {fn[:110]}")
    out.append("  -- inclusive, top smtpgate frames --")
    mine = [(k, v) for k, v in incl.items() if "smtpgate" in k]
    for fn, n in sorted(mine, key=lambda kv: -kv[1])[:12]:
        out.append(f"  {'':>6} {100 * n / total:>7.1f}  {fn[:110]}")
    out.append("  -- self, by leaf frame < its two nearest Python callers --")
    for fn, n in sorted(where.items(), key=lambda kv: -kv[1])[:12]:
        out.append(f"  {100 * n / total:>6.1f}  {'':>7}{fn[:110]}")
    out.append("")
    return out


@contextlib.contextmanager
def terminate_on_signal() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that servers are always stopped."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def families_from_env(keys: list[str]) -> list[Family]:
    """The families to run, from SCENARIOS, EXTRAS, QUEUE and SCAN."""
    extras = os.environ.get("EXTRAS", "1").strip() or "1"
    queue = os.environ.get("QUEUE", "1").strip() not in ("", "0")
    scan = os.environ.get("SCAN", "1").strip() not in ("", "0")
    scenarios = [SCENARIOS[k] for k in keys]
    servers = [SG, AIO]
    if extras != "0":
        servers += [SG_ASYNCIO, SINK] + ([] if queue else [SG_RELAY])
    if extras == "2":
        servers += [AIO_UV]
    fams = [Family("main", servers, scenarios)]
    if queue:
        fams.append(Family("queue", [SG_RELAY, SG_QUEUE, SG_QUEUE_NOSYNC], scenarios))
    scan_scenarios = [sc for sc in scenarios if sc.key in ("a", "c")]
    if scan and scan_scenarios:
        if "a" in keys:
            scan_scenarios.append(A1)
        fams.append(Family("scan", [SG_NOSCAN, SG_CLAMD], scan_scenarios))
    return fams


def main() -> int:
    """Run all phases; print and write the table. Exit 1 when the run was not clean."""
    rounds = env_int("ROUNDS", 5)
    base = env_int("MESSAGES", 10000)
    fam_rounds = env_int("FAMILY_ROUNDS", 5)
    queue_base = env_int("QUEUE_MESSAGES", 4000)
    scan_base = env_int("SCAN_MESSAGES", 5000)
    lat_messages = env_int("LAT_MESSAGES", 200)
    mem_conns = env_int("MEM_CONNS", 1000)
    mem_reps = env_int("MEM_ROUNDS", 3)
    QuietBudget.left = float(env_int("QUIET_WAIT", 60))
    keys = [k.strip() for k in os.environ.get("SCENARIOS", "a,b,c").split(",") if k.strip()]
    extras = os.environ.get("EXTRAS", "1") != "0"
    profile = os.environ.get("PROFILE", "0") not in ("", "0")
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install postfix; see bench/run.sh)",
                  file=sys.stderr)
            return 1
    families = families_from_env(keys)
    if any(f.key == "scan" for f in families) and clamd_proc.clamd_binary() is None:
        print("clamd not found (apt-get install clamav-daemon; see bench/run.sh), or SCAN=0",
              file=sys.stderr)
        return 1
    scenarios = families[0].scenarios
    RESULTS.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.log", "*.probe", "pyspy-*.txt"):  # artefacts of an earlier run
        for old in RESULTS.glob(pattern):
            old.unlink()
    report = Report(header=header(rounds, base))
    report.notes["queue"] = [
        f"QUEUE: store-and-forward vs proxy, both relaying every message to a counting "
        f"smtp-sink; {fam_rounds} rounds, QUEUE_MESSAGES={queue_base}"]
    report.notes["scan"] = [
        f"SCAN: clamd in the data phase ([[scanner]] type = \"clamav\"), relay.url = "
        f"\"discard:\"; both rows run through bench/smtpgate_probe.py; {fam_rounds} rounds, "
        f"SCAN_MESSAGES={scan_base}"]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="smtpgate-bench-") as tmp, terminate_on_signal():
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        try:
            for fam in families:
                if fam.key == "main":
                    load_rounds(report, fam, rounds, base, workdir)
                elif fam.key == "queue":
                    load_rounds(report, fam, fam_rounds, queue_base, workdir,
                                lat_messages=lat_messages, profile=profile)
                else:
                    load_rounds(report, fam, fam_rounds, scan_base, workdir, profile=profile)
            if mem_conns > 0:
                mem_specs = [SG, AIO] + ([SG_ASYNCIO] if extras else [])
                memory_phase(report, mem_specs, mem_conns, mem_reps, workdir)
            if profile:
                profile_phase(report, [s for s in scenarios if s.key in "ac"], base, workdir)
        except BenchError as exc:
            print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            for pattern in ("*.log", "*.probe"):
                for log in workdir.glob(pattern):
                    shutil.copy(log, RESULTS / log.name)
    report.header.append(f"wall time of the whole run: {time.monotonic() - t_start:.0f} s")
    text = report.table(families)
    print("\n" + text)
    (RESULTS / "latest.txt").write_text(text)
    (RESULTS / "latest.json").write_text(json.dumps(
        {"runs": [vars(r) for r in report.runs], "memory_kib_per_conn": report.memory,
         "latency_s": report.latency}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
from collections.abc import Iterator
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
                    "[logging]\n"
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
            raise BenchError(f"{self.spec.name} died; log bench/results/{self.log_path.name}:\n"
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
        raise BenchError(
            f"smtp-source exit {proc.returncode} against {server.spec.name} "
            f"(scenario {sc.key}, round {rnd}): {' '.join(cmd)}\n"
            + out.decode(errors="replace")[-2000:]
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
    """'median [min-max]' with the given format."""
    return f"{med(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"


@dataclass
class Report:
    """Everything measured, and the text table."""

    header: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    memory: dict[str, list[float]] = field(default_factory=dict)
    rss_after: dict[str, tuple[int, int]] = field(default_factory=dict)
    profile: list[str] = field(default_factory=list)

    def rates(self, server: str, scenario: str) -> dict[int, Run]:
        """Runs of one server in one scenario, by round."""
        return {r.round: r for r in self.runs if r.server == server and r.scenario == scenario}

    def table(self, servers: list[ServerSpec], scenarios: list[Scenario]) -> str:
        """The result table (plain text, 100 columns)."""
        lines = list(self.header)
        lines.append("")
        w = 34
        lines.append(f"{'scenario / server':<{w}} {'msgs/s median [min-max]':>26} "
                     f"{'CPU ms/msg':>11} {'(sys)':>7} {'srv CPU':>8} {'src CPU':>8} "
                     f"{'other':>6}")
        lines.append("-" * 107)
        verdicts: list[str] = []
        for sc in scenarios:
            n = int(next((r.messages for r in self.runs if r.scenario == sc.key), 0))
            flag = "-d " if sc.persistent else ""
            lines.append(f"{sc.key}: {sc.title}  (smtp-source {flag}-s {sc.sessions} "
                         f"-l {sc.size} -m {n})")
            for spec in servers:
                runs = list(self.rates(spec.name, sc.key).values())
                if not runs:
                    continue
                rates = [r.rate for r in runs]
                cpu = med([r.cpu_ms for r in runs])
                sys_ms = med([r.sys_ms for r in runs])
                srv = med([r.server_cpu / r.seconds for r in runs]) * 100
                cli = med([r.client_cpu / r.seconds for r in runs]) * 100
                oth = med([r.other_cpu / r.seconds for r in runs]) * 100
                lines.append(f"  {spec.name:<{w - 2}} {spread(rates, '.0f'):>26} "
                             f"{cpu:>11.3f} {sys_ms:>7.3f} {srv:>7.0f}% {cli:>7.0f}% {oth:>5.0f}%")
            base = self.rates(AIO.name, sc.key)
            for spec in servers:
                if spec.kind != "smtpgate" or spec.relay:
                    continue
                mine = self.rates(spec.name, sc.key)
                both = [k for k in mine if k in base]
                if not both:
                    continue
                ratios = [mine[k].rate / base[k].rate for k in both]
                label = f"  ratio {spec.name}/aiosmtpd"
                text = f"{label:<{w}} {spread(ratios, '.2f'):>26}"
                if spec.compared == "sg":
                    verdict = "PASS" if med(ratios) >= sc.target else "MISS"
                    text += f"   target >= {sc.target:.1f}: {verdict}"
                    verdicts.append(f"{sc.key}: {med(ratios):.2f} (>= {sc.target:.1f}) {verdict}")
                lines.append(text)
                if spec.compared == "sg":
                    eff = [base[k].cpu_ms / mine[k].cpu_ms for k in both if mine[k].cpu_ms > 0]
                    if eff:
                        label = "    (CPU/msg aiosmtpd/smtpgate)"
                        lines.append(f"{label:<{w}} {spread(eff, '.2f'):>26}")
            lines.append("")
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
        lines.append("srv / src / other: CPU of the server / of smtp-source / of everything else "
                     "on the machine (kernel included),")
        lines.append("  as % of one core during the run (server near 100% = server-bound).")
        if self.runs:
            other = med([r.other_cpu / r.seconds for r in self.runs]) * 100
            if other > 25:
                lines.append(f"WARNING: other processes used a median {other:.0f}% of a core "
                             "during the timed runs: the machine was busy, the numbers are "
                             "disturbed; rerun on a quiet machine.")
        if self.profile:
            lines.append("")
            lines.extend(self.profile)
        return "\n".join(lines) + "\n"


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


def load_rounds(report: Report, servers: list[ServerSpec], scenarios: list[Scenario],
                rounds: int, base: int, workdir: Path) -> None:
    """Start every server once, warm them up, then run the rounds (order rotates)."""
    started: list[Server] = []
    try:
        upstream: Server | None = None
        if any(s.relay for s in servers):
            upstream = Server(ServerSpec("smtp-sink upstream", "smtp-sink"), workdir).start()
            started.append(upstream)
        live: dict[str, Server] = {}
        for spec in servers:
            srv = Server(spec, workdir, upstream.port if upstream else None).start()
            started.append(srv)
            live[spec.name] = srv
        print("warm-up ...", flush=True)
        for sc in scenarios:
            for spec in servers:
                run_load(live[spec.name], sc, max(200, int(base * sc.share / 20)), 0)
        budget = float(env_int("QUIET_WAIT", 60))
        busy_rounds = 0
        for rnd in range(1, rounds + 1):
            waited, quiet = wait_quiet(budget)
            budget -= waited
            if not quiet:
                busy_rounds += 1
                print(f"round {rnd}: machine busy (other processes), going ahead", flush=True)
            elif waited > 1.5:
                print(f"round {rnd}: waited {waited:.0f} s for a quiet machine", flush=True)
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
                    parts.append(f"{spec.name} {run.rate:.0f}/s")
                    others.append(run.other_cpu / run.seconds)
                print(f"round {rnd}/{rounds} {sc.key}: " + ", ".join(parts)
                      + f"  [other CPU {100 * max(others):.0f}%]", flush=True)
        report.header.append(
            f"rounds started on a busy machine (other CPU >= 30% of a core after waiting "
            f"QUIET_WAIT): {busy_rounds} of {rounds}")
        for spec in servers:
            srv = live[spec.name]
            report.rss_after[spec.name] = (rss_kib(srv.pid), rss_kib(srv.pid, "VmHWM"))
        for srv in started:
            srv.stop()
            srv.verify_count()
    finally:
        for srv in reversed(started):
            srv.stop()


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


def profile_phase(report: Report, scenarios: list[Scenario], base: int, workdir: Path) -> None:
    """py-spy the smtpgate (uvloop) process under each scenario; summarise the hot spots."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        report.profile.append("PROFILE: py-spy not found (pip install py-spy)")
        return
    for sc in scenarios:
        srv = Server(SG, workdir).start()
        raw = workdir / f"pyspy-{sc.key}.txt"
        try:
            run_load(srv, sc, max(200, int(base * sc.share / 10)), 0)  # warm-up
            spy = subprocess.Popen(
                [pyspy, "record", "--pid", str(srv.pid), "--format", "raw", "--rate", "250",
                 "--native", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            run_load(srv, sc, max(100, int(base * sc.share)), 0)
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        finally:
            srv.stop()
        report.profile.extend(summarise_pyspy(raw, sc))
        shutil.copy(raw, RESULTS / f"pyspy-{sc.key}.txt")


def summarise_pyspy(raw: Path, sc: Scenario, top: int = 22) -> list[str]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
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
    if not total:
        return [f"profile {sc.key}: no samples"]
    out = [f"py-spy --native profile of smtpgate (uvloop), scenario {sc.key} ({total} samples "
           "of the busy server; idle waits are not sampled)",
           f"  {'self%':>6} {'total%':>7}  function (file)"]
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / total:>6.1f} {100 * incl[name] / total:>7.1f}  {name[:110]}")
    out.append("  -- inclusive, top smtpgate frames --")
    mine = [(k, v) for k, v in incl.items() if "smtpgate" in k]
    for name, n in sorted(mine, key=lambda kv: -kv[1])[:12]:
        out.append(f"  {'':>6} {100 * n / total:>7.1f}  {name[:110]}")
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


def main() -> int:
    """Run all phases; print and write the table. Exit 1 when the run was not clean."""
    rounds = env_int("ROUNDS", 5)
    base = env_int("MESSAGES", 10000)
    mem_conns = env_int("MEM_CONNS", 1000)
    mem_reps = env_int("MEM_ROUNDS", 3)
    keys = [k.strip() for k in os.environ.get("SCENARIOS", "a,b,c").split(",") if k.strip()]
    extras = os.environ.get("EXTRAS", "1") != "0"
    profile = os.environ.get("PROFILE", "0") not in ("", "0")
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install postfix; see bench/run.sh)",
                  file=sys.stderr)
            return 1
    scenarios = [SCENARIOS[k] for k in keys]
    servers = [SG, AIO] + ([SG_ASYNCIO, SINK, SG_RELAY] if extras else [])
    if os.environ.get("EXTRAS", "1") == "2":
        servers += [AIO_UV, SG_QUEUE]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.log", "pyspy-*.txt"):  # artefacts of an earlier run
        for old in RESULTS.glob(pattern):
            old.unlink()
    report = Report(header=header(rounds, base))
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="smtpgate-bench-") as tmp, terminate_on_signal():
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        try:
            load_rounds(report, servers, scenarios, rounds, base, workdir)
            if mem_conns > 0:
                mem_specs = [SG, AIO] + ([SG_ASYNCIO] if extras else [])
                memory_phase(report, mem_specs, mem_conns, mem_reps, workdir)
            if profile:
                profile_phase(report, [s for s in scenarios if s.key in "ac"], base, workdir)
        except BenchError as exc:
            print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            for log in workdir.glob("*.log"):
                shutil.copy(log, RESULTS / log.name)
    report.header.append(f"wall time of the whole run: {time.monotonic() - t_start:.0f} s")
    text = report.table(servers, scenarios)
    print("\n" + text)
    (RESULTS / "latest.txt").write_text(text)
    (RESULTS / "latest.json").write_text(json.dumps(
        {"runs": [vars(r) for r in report.runs], "memory_kib_per_conn": report.memory},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

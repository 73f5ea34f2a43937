"""Prometheus metrics (docs/operations.md, "Metrics"): names with the ``smtpgate_`` prefix,
served at ``/metrics`` on the admin listener by :func:`exposition`.

Several processes count: the server (or each ``server.workers`` worker process) and the
queue delivery process (``[queue] delivery_process = true``). Every metric therefore
lives in prometheus-client's multiprocess mode: each process writes its values to
memory-mapped files in one directory (``PROMETHEUS_MULTIPROC_DIR``), and
:func:`exposition` adds them up (``MultiProcessCollector``) wherever ``/metrics`` is
served. The directory is chosen once, by the top process, before any metric exists:

* ``smtpgate serve`` calls :func:`setup` (via its logging set-up): it uses
  ``PROMETHEUS_MULTIPROC_DIR`` when the operator set it (and empties it: values of an
  earlier run must not count), else a fresh private directory, removed at exit.
* A process started by multiprocessing (spawn) inherits the variable and writes into the
  same directory (the module joins it on import).
* Any other process importing this module (an embedding program, a test) gets a private
  directory of its own on import, removed at exit; child processes it spawns join it.

Metric objects live in :data:`M` (a :class:`Metrics`), rebuilt by :func:`setup`; callers
look them up at use (``metrics.M.sessions_total.inc()``), so a rebuild reaches them.
Labels are bounded: stage, command, reply class, plugin, scanner, verdict, outcome, TLS
version, AUTH mechanism and delivery destination (at most :data:`MAX_DESTINATIONS`
distinct values, then ``"other"``); never an address or an IP.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import shutil
import tempfile
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

__all__ = [
    "M",
    "MAX_DESTINATIONS",
    "Metrics",
    "directory",
    "exposition",
    "setup",
    "watch_spool",
]

_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Set to the directory when smtpgate created it itself (so that a ``serve`` started by a
#: process that had one makes its own instead of emptying the parent's).
_ENV_PRIVATE = "SMTPGATE_METRICS_PRIVATE_DIR"

#: Distinct ``destination`` label values kept; later destinations count as ``"other"``.
MAX_DESTINATIONS = 200

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)

_REPLY_CLASSES = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class _Value(Protocol):
    def inc(self, amount: float) -> None: ...


def _value_of(metric: Counter | Gauge) -> _Value:
    """The value object behind an unlabelled metric or a label child."""
    return cast(_Value, metric._value)


class Metrics:
    """Every smtpgate metric of one process (created with no registry: :func:`exposition`
    reads them through the multiprocess files).

    The ``*_for``/``reply`` methods cache label children, so the per-command path costs
    a dict lookup and one increment (a locked write into a memory-mapped file).
    """

    def __init__(self) -> None:
        reg = None
        self.sessions_open = Gauge(
            "smtpgate_sessions_open", "SMTP sessions open now.", registry=reg,
            multiprocess_mode="livesum")
        self.sessions_total = Counter(
            "smtpgate_sessions", "SMTP sessions started (connections admitted).", registry=reg)
        self.connections_refused_total = Counter(
            "smtpgate_connections_refused",
            "Connections refused at admission (connection limits, shutdown).", registry=reg)
        self.transactions_total = Counter(
            "smtpgate_transactions",
            "Mail transactions by outcome: accepted (2xx at end of data), rejected (5xx), "
            "tempfailed (4xx), quarantined, aborted (ended before the end of data).",
            ["outcome"], registry=reg)
        self.replies_total = Counter(
            "smtpgate_replies", "Replies sent, by SMTP stage and reply code class.",
            ["stage", "class"], registry=reg)
        self.received_bytes_total = Counter(
            "smtpgate_received_bytes",
            "Message bytes received (DATA/BDAT text at the end of data, any outcome).",
            registry=reg)
        self.tls_total = Counter(
            "smtpgate_tls_sessions", "TLS handshakes completed, by protocol version.",
            ["version"], registry=reg)
        self.tls_failures_total = Counter(
            "smtpgate_tls_handshake_failures", "TLS handshakes that failed.", registry=reg)
        self.auth_total = Counter(
            "smtpgate_auth", "AUTH attempts by result (success, failure, error) and mechanism.",
            ["result", "mechanism"], registry=reg)
        self.plugin_seconds = Histogram(
            "smtpgate_plugin_duration_seconds", "Time one plugin hook took, by plugin and stage.",
            ["plugin", "stage"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.plugin_verdicts_total = Counter(
            "smtpgate_plugin_verdicts", "Plugin hook verdicts, by plugin, stage and verdict.",
            ["plugin", "stage", "verdict"], registry=reg)
        self.scanner_seconds = Histogram(
            "smtpgate_scanner_duration_seconds", "Time waiting on a content scanner.",
            ["scanner"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.scanner_verdicts_total = Counter(
            "smtpgate_scanner_verdicts",
            "Scanner verdicts (clean, spam, infected, skipped, error), by scanner.",
            ["scanner", "verdict"], registry=reg)
        self.delivery_attempts_total = Counter(
            "smtpgate_delivery_attempts",
            "Delivery attempts per recipient, by destination (next hop) and outcome "
            "(delivered, deferred, failed).",
            ["destination", "outcome"], registry=reg)
        # Hot path: the value objects behind the label children, cached, incremented
        # directly (prometheus-client's ``inc`` adds argument checks around the same call).
        self._sessions_total = _value_of(self.sessions_total)
        self._sessions_open = _value_of(self.sessions_open)
        self._bytes = _value_of(self.received_bytes_total)
        self._outcomes: dict[str, _Value] = {}
        self._replies: dict[tuple[str, int], _Value] = {}
        self._plugins: dict[tuple[str, object], tuple[list[float], list[_Value], _Value,
                                                   dict[str, _Value]]] = {}
        self._destinations: set[str] = set()
        self._lock = threading.Lock()

    def session_started(self) -> None:
        """A session started: ``smtpgate_sessions_total`` and ``smtpgate_sessions_open`` + 1."""
        self._sessions_total.inc(1)
        self._sessions_open.inc(1)

    def session_ended(self) -> None:
        """A session ended: ``smtpgate_sessions_open`` - 1."""
        self._sessions_open.inc(-1)

    def transaction(self, outcome: str, size: int = 0) -> None:
        """Count one transaction's ``outcome`` and ``size`` message bytes received."""
        v = self._outcomes.get(outcome)
        if v is None:
            v = self._outcomes[outcome] = _value_of(self.transactions_total.labels(outcome))
        v.inc(1)
        if size:
            self._bytes.inc(size)

    def reply(self, stage: str, code: int) -> None:
        """Count one reply of ``code`` (100-599) sent at ``stage`` (e.g. ``"rcpt"``)."""
        key = (stage, code // 100)
        v = self._replies.get(key)
        if v is None:
            v = self._replies[key] = _value_of(self.replies_total.labels(
                stage, _REPLY_CLASSES.get(code // 100, "other")))
        v.inc(1)

    def plugin(self, plugin: str, stage: object, verdict: str, seconds: float) -> None:
        """Record one hook call: its duration (seconds) and verdict (``"CONT"``, ``"DENY"``
        ...). ``stage`` is a stage name or a :class:`~smtpgate.hooks.Stage` (its value is
        the label)."""
        key = (plugin, stage)
        entry = self._plugins.get(key)
        if entry is None:
            stage = str(getattr(stage, "value", stage))
            child = self.plugin_seconds.labels(plugin, stage)
            entry = self._plugins[key] = (
                list(child._upper_bounds), list(child._buckets), child._sum, {})
        bounds, buckets, total, verdicts = entry
        buckets[bisect_left(bounds, seconds)].inc(1)  # the first bucket with le >= seconds
        total.inc(seconds)
        v = verdicts.get(verdict)
        if v is None:
            v = verdicts[verdict] = _value_of(
                self.plugin_verdicts_total.labels(plugin, str(getattr(stage, "value", stage)),
                                                  verdict))
        v.inc(1)

    def scanner(self, scanner: str, verdict: str, seconds: float) -> None:
        """Record one scanner result: its verdict and the seconds spent waiting (not
        observed for ``"skipped"``: the scanner was not asked)."""
        if verdict != "skipped":
            self.scanner_seconds.labels(scanner).observe(seconds)
        self.scanner_verdicts_total.labels(scanner, verdict).inc()

    def delivery(self, destination: str, code: int) -> None:
        """Count one recipient's delivery attempt to ``destination`` with reply ``code``
        (< 400 delivered, 4xx deferred, 5xx failed)."""
        with self._lock:
            if destination not in self._destinations:
                if len(self._destinations) >= MAX_DESTINATIONS:
                    destination = "other"
                else:
                    self._destinations.add(destination)
        outcome = "delivered" if code < 400 else "deferred" if code < 500 else "failed"
        self.delivery_attempts_total.labels(destination or "-", outcome).inc()


class _SpoolCollector(Collector):
    """``smtpgate_queue_messages{state}``: messages in the spool by state, counted from
    the directory at scrape time (``incoming`` = queue files without a changed envelope in
    ``deferred/`` or ``hold/``)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "smtpgate_queue_messages", "Messages in the queue, by state (read at scrape time).",
            labels=["state"])
        total = _count(self.path / "messages", "")
        deferred = _count(self.path / "deferred", ".json")
        hold = _count(self.path / "hold", ".json")
        family.add_metric(["incoming"], max(0, total - deferred - hold))
        family.add_metric(["deferred"], deferred)
        family.add_metric(["hold"], hold)
        yield family


def _count(path: Path, suffix: str) -> int:
    try:
        with os.scandir(path) as it:
            return sum(1 for e in it if e.name.endswith(suffix) and not e.name.startswith("."))
    except OSError:
        return 0


_spools: dict[str, _SpoolCollector] = {}
_state: dict[str, str] = {}


def _new_private_dir() -> str:
    path = tempfile.mkdtemp(prefix="smtpgate-metrics-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


#: Seconds between two writes of this process's changed values to its files.
FLUSH_INTERVAL = 1.0


class _Buffered:
    """A metric value kept in memory and written to the multiprocess file by
    :func:`flush` (every :data:`FLUSH_INTERVAL` seconds from a daemon thread, before
    :func:`exposition` and at exit), not at every change.

    prometheus-client's multiprocess value writes its memory-mapped file at every
    increment (a lock, a pid check and a struct write: a few microseconds); a session
    makes a dozen increments, which measurably slowed the discard path. Here an increment
    is one addition (no lock: values change on the event loop's thread only, and the
    flusher only reads them); the file trails by at most the flush interval.
    """

    __slots__ = ("_inner", "_value", "_written")

    _lock = threading.Lock()  # guards _all
    _all: list[_Buffered] = []
    _mmaped: type | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        mmaped = _Buffered._mmaped
        assert mmaped is not None
        self._inner = mmaped(*args, **kwargs)
        self._value: float = self._inner.get()  # a pid reused: its file's value goes on
        self._written = self._value
        with self._lock:
            self._all.append(self)
        if not _flusher:
            _start_flusher()

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: object) -> None:
        return None

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> None:
        return None


def flush() -> None:
    """Write every value changed since the last flush to this process's metric files."""
    with _Buffered._lock:
        values_now = list(_Buffered._all)
    for v in values_now:
        current = v._value
        if current != v._written:
            v._inner.set(current)
            v._written = current


_flusher: list[threading.Thread] = []


def _start_flusher() -> None:
    with _Buffered._lock:
        if _flusher:
            return

        def run() -> None:
            while True:
                time.sleep(FLUSH_INTERVAL)
                try:
                    flush()
                except Exception:  # a full disk must not end the thread
                    pass

        thread = threading.Thread(target=run, name="smtpgate-metrics-flush", daemon=True)
        _flusher[:] = [thread]
        thread.start()


def _activate(path: str) -> Metrics:
    """Point prometheus-client at ``path`` (multiprocess mode) and build the metrics."""
    if _Buffered._mmaped is not None:
        flush()
        close = getattr(_Buffered._mmaped, "close_all_files", None)
        if close is not None:
            close()
    os.environ[_ENV] = path
    # A new value class: its files are opened in the directory named by the environment.
    _Buffered._mmaped = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    with _Buffered._lock:
        _Buffered._all = []
    values.ValueClass = _Buffered
    _state["dir"] = path
    return Metrics()


def _join_or_create() -> Metrics:
    path = os.environ.get(_ENV, "")
    if not path or not os.path.isdir(path):
        path = _new_private_dir()
        os.environ[_ENV_PRIVATE] = path
    return _activate(path)


def setup() -> str:
    """Choose the metrics directory of a server (``smtpgate serve``, before it starts its
    worker or delivery processes, which inherit it) and rebuild :data:`M` there.

    ``PROMETHEUS_MULTIPROC_DIR`` set by the operator: that directory, created if missing
    and emptied of ``*.db`` files (values of an earlier run must not count). Otherwise (or
    when the variable names a private directory made by a parent smtpgate process) a fresh
    private directory, removed when this process exits.

    Returns:
        The directory.

    Raises:
        OSError: the directory cannot be created or emptied.
    """
    global M
    path = os.environ.get(_ENV, "")
    if path and path != os.environ.get(_ENV_PRIVATE):
        os.makedirs(path, exist_ok=True)
        for entry in os.listdir(path):
            if entry.endswith(".db"):
                os.unlink(os.path.join(path, entry))
        os.environ.pop(_ENV_PRIVATE, None)
    else:
        path = _new_private_dir()
        os.environ[_ENV_PRIVATE] = path
    M = _activate(path)
    return path


def directory() -> str:
    """The multiprocess directory this process writes its metric values to."""
    return _state["dir"]


def watch_spool(path: str) -> None:
    """Report the queue at ``path`` as ``smtpgate_queue_messages{state}`` in
    :func:`exposition` (called by the process that owns the spool). Idempotent."""
    key = os.path.abspath(path)
    if key not in _spools:
        _spools[key] = _SpoolCollector(key)


def _collectors() -> Iterator[Collector]:
    yield from _spools.values()


def exposition() -> tuple[bytes, str]:
    """The metrics of every smtpgate process sharing this directory, added up, in the
    Prometheus text format: ``(body, content type)``.

    Counters and histograms are summed over processes (those that ended included); the
    ``smtpgate_sessions_open`` gauge over live processes; queue gauges are read from the
    spool now.
    """
    flush()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=_state["dir"])  # type: ignore[no-untyped-call]
    for collector in _collectors():
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


#: This process's metrics (rebuilt by :func:`setup`).
M: Metrics = _join_or_create()

atexit.register(flush)
# A multiprocessing child (worker, delivery process) leaves through os._exit, after the
# finalizers: write what it counted last.
multiprocessing.util.Finalize(None, flush, exitpriority=100)


"""``smtpgate serve`` with a timing probe: per-message data-phase and clamd scan times.

Entry point: ``python bench/smtpgate_probe.py PROBE_FILE serve -c CONFIG`` (everything after
PROBE_FILE goes to ``smtpgate.cli.main``), and :func:`read_probe` for the harness. Only the
logging set-up differs from ``python -m smtpgate serve``; the server code is untouched.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


class _ProbeHandler(logging.Handler):
    """Writes one line per finished transaction and per clamd scan, full precision.

    ``tx <monotonic end> <data-phase seconds> <outcome> <scan summary>`` from the
    ``smtpgate.session`` INFO record "transaction ... time=" (its last argument is
    ``time.monotonic() - started``, the whole data phase: scanners, headers, delivery);
    ``scan <monotonic end> <seconds>`` from the ``smtpgate.scanners.clamd`` DEBUG record
    "clamav: N bytes -> REPLY in T" (``ScanResult.elapsed``: connect, INSTREAM, verdict).
    """

    def __init__(self, out: TextIO) -> None:
        super().__init__(logging.DEBUG)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.msg if isinstance(record.msg, str) else ""
        args = record.args if isinstance(record.args, tuple) else ()
        seconds = args[-1] if args else None
        if not isinstance(seconds, (int, float)):
            return
        try:
            now = time.monotonic()
            if msg.startswith("transaction id=") and len(args) >= 3:
                self.out.write(f"tx {now:.6f} {seconds:.6f} {args[-3]} {args[-2]}\n")
            elif msg.startswith("clamav: %d bytes"):
                self.out.write(f"scan {now:.6f} {seconds:.6f}\n")
        except OSError:
            self.handleError(record)


def install(probe_path: str) -> None:
    """Logging as smtpgate's own (WARNING and up to stderr) plus the probe handler."""
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(stderr)  # smtpgate's basicConfig() is a no-op once root has a handler
    root.setLevel(logging.WARNING)
    out = open(probe_path, "a", buffering=1)  # line-buffered: the harness reads after each run
    probe = _ProbeHandler(out)
    for name, level in (("smtpgate.session", logging.INFO),
                        ("smtpgate.scanners.clamd", logging.DEBUG)):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(probe)
    import atexit

    atexit.register(out.close)


@dataclass
class Probe:
    """Probe lines of one timed run.

    Attributes:
        tx: data-phase seconds per transaction, in order.
        outcomes: ``outcome=``/``scan=`` text per transaction (e.g. ``delivered clamav=clean``).
        scans: clamd exchange seconds per scan (``ScanResult.elapsed``).
        first / last: monotonic time of the first and last line (``nan`` if none).
    """

    tx: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    scans: list[float] = field(default_factory=list)
    first: float = float("nan")
    last: float = float("nan")


def read_probe(path: Path, offset: int) -> tuple[Probe, int]:
    """Parse the probe file from byte ``offset``; return the lines and the new offset.

    Only complete lines are consumed (a partial last line is left for the next call).
    """
    probe = Probe()
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return probe, offset
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        parts = line.split(" ", 4)
        if len(parts) < 3:
            continue
        t = float(parts[1])
        if probe.first != probe.first:  # nan
            probe.first = t
        probe.last = t
        if parts[0] == "tx":
            probe.tx.append(float(parts[2]))
            probe.outcomes.append(" ".join(parts[3:]))
        elif parts[0] == "scan":
            probe.scans.append(float(parts[2]))
    return probe, offset + end


def main(argv: list[str]) -> int:
    """Install the probe, then run the smtpgate CLI with the remaining arguments."""
    if len(argv) < 2:
        print("usage: smtpgate_probe.py PROBE_FILE serve -c CONFIG", file=sys.stderr)
        return 2
    install(argv[0])
    from smtpgate.cli import main as smtpgate_main

    return smtpgate_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

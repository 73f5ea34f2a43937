"""Shared by bench/filters.py and bench/auth.py: run ``smtpgate serve`` with a configuration
text on a free loopback port, and drive it with Postfix's ``smtp-source``.

Entry points: :func:`free_port`, :func:`serve` (context manager yielding the port),
:func:`source` (msgs/s of one smtp-source run).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def source(port: int, messages: int, sessions: int) -> float:
    """Run ``smtp-source -d -s SESSIONS -l 4096 -m MESSAGES`` (a@example.com to
    b@example.com); returns msgs/s. Raises CalledProcessError on an unexpected reply."""
    start = time.monotonic()
    subprocess.run([SMTP_SOURCE, "-d", "-s", str(sessions), "-l", "4096", "-m", str(messages),
                    "-f", "a@example.com", "-t", "b@example.com", f"127.0.0.1:{port}"],
                   check=True, capture_output=True, timeout=600)
    return messages / (time.monotonic() - start)


@contextmanager
def serve(wd: Path, name: str, config: Callable[[int], str],
          warm: Callable[[int], None] | None = None) -> Iterator[int]:
    """Start ``smtpgate serve -c WD/NAME.toml`` (``config(port)`` is its text), wait until
    it answers, run ``warm(port)`` if given and a 300-message warm-up, yield the port;
    stop it afterwards. Its log is ``WD/NAME.log``.

    Raises:
        RuntimeError: the server did not start within 30 seconds.
    """
    port = free_port()
    cfg = wd / f"{name}.toml"
    cfg.write_text(config(port))
    log = open(wd / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([PYTHON, "-m", "smtpgate", "serve", "-c", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=wd)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{name} did not start: see {wd / (name + '.log')}") from None
                time.sleep(0.1)
        if warm is not None:
            warm(port)
        source(port, 300, 10)  # warm-up
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

"""A private clamd for the benchmark: own config, tiny signature database, loopback TCP only.

Entry points: :class:`Clamd` (``start``, ``stop``, ``pid``, ``address``, ``scan``) and
``python bench/clamd_proc.py`` (start one, print its address, stop on Ctrl-C). Same
configuration approach as tests/scanners/clamd_fixture.py; protocol: clamd(8) "COMMANDS"
(``zPING``, ``zINSTREAM``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The 68-byte EICAR anti-virus test string.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# clam.exe bytes 0xC0..0xF3 (as in the test fixture).
_CLAM_EXE_BODY = ("4b45524e454c33322e444c4c00004578697450726f63657373"
                  "005553455233322e444c4c00434c414d657373616765426f7841")
#: The whole database (.ndb "Name:TargetType:Offset:HexSignature", clamav signatures.md).
SIGNATURES_NDB = (f"Smtpgate.Test.EICAR:0:*:{EICAR.hex()}\n"
                  f"Smtpgate.Test.ClamAV-Test-File:0:*:{_CLAM_EXE_BODY}\n")


def clamd_binary() -> str | None:
    """Path of ``clamd`` (Debian clamav-daemon puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("clamd")
    if found:
        return found
    for candidate in ("/usr/sbin/clamd", "/usr/local/sbin/clamd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM clamd if the harness dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Clamd:
    """One private clamd process (``Foreground yes``), TCP on a free 127.0.0.1 port.

    Args:
        workdir: parent directory; a ``clamd-*`` directory with the config, the database
            (``bench.ndb``, two signatures), the log and clamd's temporary files is made in it.
        threads: clamd ``MaxThreads`` (concurrent scans; clamd's own default is 10).
    """

    def __init__(self, workdir: Path, threads: int = 10) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="clamd-", dir=workdir))
        self.threads = threads
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"`` for ``[[scanner]] address``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """clamd's process id."""
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        """clamd's log file and stderr so far (for error messages)."""
        out = []
        for name in ("clamd.log", "stderr.log"):
            try:
                out.append((self.dir / name).read_text(errors="replace")[-2000:])
            except OSError:
                pass
        return "\n".join(out)

    def start(self, timeout: float = 60.0) -> Clamd:
        """Write the config and database, start clamd, wait until it answers PING.

        Raises:
            RuntimeError: no clamd binary, or clamd exited / did not answer in ``timeout`` s.
        """
        binary = clamd_binary()
        if binary is None:
            raise RuntimeError("clamd not found (Debian package clamav-daemon)")
        self.port = _free_port()
        (self.dir / "bench.ndb").write_text(SIGNATURES_NDB)
        conf = self.dir / "clamd.conf"
        conf.write_text("\n".join([
            "Foreground yes",
            f"LogFile {self.dir / 'clamd.log'}",
            "LogTime yes",
            f"PidFile {self.dir / 'clamd.pid'}",
            f"TemporaryDirectory {self.dir}",
            f"DatabaseDirectory {self.dir}",
            "TCPAddr 127.0.0.1",
            f"TCPSocket {self.port}",
            "StreamMaxLength 30M",
            f"MaxThreads {self.threads}",
            "SelfCheck 3600",
            "",
        ]))
        # No "User": clamd keeps running as whoever starts it, like the test fixture.
        with open(self.dir / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"clamd did not become ready (exit={self.proc.poll()}):\n"
                                   + self.log_text())
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        """True when clamd answers ``zPING`` with ``PONG``."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.sendall(b"zPING\0")
                return s.recv(64).rstrip(b"\0") == b"PONG"
        except OSError:
            return False

    def _command(self, command: bytes) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10.0) as s:
            s.sendall(command)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        return reply.rstrip(b"\0").decode(errors="replace")

    def scan(self, data: bytes) -> str:
        """INSTREAM ``data`` directly (no smtpgate); return clamd's reply, e.g. ``stream: OK``.

        Raises:
            OSError: clamd unreachable.
        """
        return self._command(b"zINSTREAM\0" + struct.pack("!I", len(data)) + data + b"\0\0\0\0")

    def version(self) -> str:
        """clamd's ``zVERSION`` answer, e.g. ``ClamAV 1.4.6`` (no database version: private DB).

        Raises:
            OSError: clamd unreachable.
        """
        return self._command(b"zVERSION\0")

    def check_alive(self) -> None:
        """Raise RuntimeError when clamd has exited."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("clamd died:\n" + self.log_text())

    def stop(self, keep_log: Path | None = None) -> None:
        """SIGTERM (SIGKILL after 10 s); copy the log to ``keep_log``; remove the directory."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if keep_log is not None:
            keep_log.write_text(self.log_text())
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    """Start a private clamd in a temporary directory; print its address; wait for Ctrl-C."""
    with tempfile.TemporaryDirectory(prefix="smtpgate-clamd-") as tmp:
        clamd = Clamd(Path(tmp)).start()
        try:
            print(f"clamd pid {clamd.pid} at {clamd.address}; EICAR -> {clamd.scan(EICAR)}",
                  flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            clamd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

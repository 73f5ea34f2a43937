"""A real, private clamd for tests: own config, own signature database, loopback only.

Entry points: :func:`start_clamd` (context manager), the session fixture :func:`clamd_server`,
and the constants :data:`EICAR`, :data:`EICAR_SIGNATURE`, :data:`TESTFILE_SIGNATURE`.
Skips (never fails) when the ``clamd`` binary (Debian ``clamav-daemon``) is missing.

The official ClamAV databases cannot be downloaded here, so the fixture writes its own
``smtpgate-test.ndb`` (body signatures, clamav signatures.md "Extended signature format"):
one for the EICAR string and one for a byte run of ClamAV's test program ``clam.exe``
(Debian ``clamav-testfiles``). ClamAV decodes MIME, archives, PDF and OLE itself and scans
every extracted object, so these two signatures make clamd report FOUND for every corpus
message carrying EICAR or a ClamAV test file as an attachment. clamd appends
``.UNOFFICIAL`` to names from unsigned databases.

Use from another test package::

    from tests.scanners.clamd_fixture import ClamdProcess, clamd_server  # noqa: F401

    async def test_x(clamd_server: ClamdProcess) -> None:
        scanner = ClamdScanner(clamd_server.tcp_address)  # or clamd_server.unix_address
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The 68-byte EICAR anti-virus test string.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: What clamd reports for EICAR (our signature name + clamd's ``.UNOFFICIAL`` suffix).
EICAR_SIGNATURE = "Smtpgate.Test.EICAR.UNOFFICIAL"
#: What clamd reports for ClamAV's test program clam.exe, wherever it is embedded.
TESTFILE_SIGNATURE = "Smtpgate.Test.ClamAV-Test-File.UNOFFICIAL"

# clam.exe bytes 0xC0..0xF3: "KERNEL32.DLL\0\0ExitProcess\0USER32.DLL\0CLAMessageBoxA"
_CLAM_EXE_BODY = (
    "4b45524e454c33322e444c4c00004578697450726f63657373"
    "005553455233322e444c4c00434c414d657373616765426f7841"
)
#: The database written for every instance (.ndb: Name:TargetType:Offset:HexSignature).
SIGNATURES_NDB = (
    f"Smtpgate.Test.EICAR:0:*:{EICAR.hex()}\nSmtpgate.Test.ClamAV-Test-File:0:*:{_CLAM_EXE_BODY}\n"
)

#: Debian clamav-testfiles.
TESTFILES_DIR = Path("/usr/share/clamav-testfiles")
#: The shared mail corpus (``MAIL_CORPUS`` overrides; default: ``shared/`` beside the repo).
CORPUS_DIR = Path(
    os.environ.get("MAIL_CORPUS", str(Path(__file__).resolve().parents[3] / "shared" / "corpus"))
)

READY_TIMEOUT = 30.0


def clamd_binary() -> str | None:
    """Path of the ``clamd`` executable (it lives in /usr/sbin, often not on PATH)."""
    found = shutil.which("clamd")
    if found:
        return found
    for candidate in ("/usr/sbin/clamd", "/usr/local/sbin/clamd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True)
class ClamdProcess:
    """A running private clamd.

    Attributes:
        host: always ``"127.0.0.1"``.
        port: its TCP port (chosen free at start).
        socket_path: its Unix socket.
        workdir: config, database, log and temp files.
        stream_max_length: the ``StreamMaxLength`` it runs with, in bytes.
        process: the ``clamd`` process (``Foreground yes``).
    """

    host: str
    port: int
    socket_path: Path
    workdir: Path
    stream_max_length: int
    process: subprocess.Popen[bytes]

    @property
    def tcp_address(self) -> str:
        """``"127.0.0.1:<port>"`` for :class:`~smtpgate.scanners.clamd.ClamdScanner`."""
        return f"{self.host}:{self.port}"

    @property
    def unix_address(self) -> str:
        """``"unix:<socket_path>"``."""
        return f"unix:{self.socket_path}"

    def log_text(self) -> str:
        """clamd's log so far (for assertion messages)."""
        try:
            return (self.workdir / "clamd.log").read_text(errors="replace")
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(b"zPING\0")
            return s.recv(64).rstrip(b"\0") == b"PONG"
    except OSError:
        return False


@contextlib.contextmanager
def start_clamd(stream_max_length: int = 30 * 1024 * 1024) -> Iterator[ClamdProcess]:
    """Start clamd with a private config and database; stop it on exit.

    Args:
        stream_max_length: clamd's ``StreamMaxLength`` in bytes (INSTREAM limit).

    Yields:
        the running :class:`ClamdProcess`, answering PING on TCP.

    Raises:
        pytest.skip.Exception: no ``clamd`` binary.
        RuntimeError: clamd exited or did not answer PING within 30 s (log attached).
    """
    binary = clamd_binary()
    if binary is None:
        pytest.skip("clamd not installed (Debian package clamav-daemon)")
    # Short path: Unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-clamd-"))
    port = _free_port()
    sock = workdir / "clamd.sock"
    (workdir / "smtpgate-test.ndb").write_text(SIGNATURES_NDB)
    conf = workdir / "clamd.conf"
    conf.write_text(
        "\n".join(
            [
                "Foreground yes",
                f"LogFile {workdir / 'clamd.log'}",
                "LogTime yes",
                f"PidFile {workdir / 'clamd.pid'}",
                f"TemporaryDirectory {workdir}",
                f"DatabaseDirectory {workdir}",
                f"LocalSocket {sock}",
                "FixStaleSocket yes",
                "TCPAddr 127.0.0.1",
                f"TCPSocket {port}",
                f"StreamMaxLength {stream_max_length}",
                "MaxThreads 4",
                "SelfCheck 3600",
                "",
            ]
        )
    )
    # No "User": clamd keeps running as whoever starts it (root in CI, or the developer).
    with open(workdir / "stderr.log", "wb") as stderr_file:
        proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
        )
    instance = ClamdProcess("127.0.0.1", port, sock, workdir, stream_max_length, proc)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ping("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                stderr = (workdir / "stderr.log").read_text(errors="replace")
                raise RuntimeError(
                    f"clamd did not become ready (exit={proc.poll()}):\n{stderr}\n"
                    f"{instance.log_text()}"
                )
            time.sleep(0.05)
        deadline = time.monotonic() + READY_TIMEOUT
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield instance
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def clamd_server() -> Iterator[ClamdProcess]:
    """Session-wide private clamd (StreamMaxLength 30 MiB); skips if clamd is missing."""
    with start_clamd() as instance:
        yield instance

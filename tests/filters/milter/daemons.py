"""Real milter daemons from Debian for the tests: each started with its own temporary
configuration on a private Unix socket, in the foreground, stopped at the end.

Daemons that would look names up in DNS (opendkim, opendmarc) run in a network namespace
of their own (``unshare --net``: only a down loopback interface), so no query can leave
the host; their Unix socket is reachable from smtpgate all the same. Skips (never fails)
when a binary is missing.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 60.0


def find(binary: str) -> str | None:
    """Path of a daemon (they live in /usr/sbin, often not on PATH)."""
    found = shutil.which(binary)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin"):
        if os.access(f"{d}/{binary}", os.X_OK):
            return f"{d}/{binary}"
    return None


def need(binary: str, package: str) -> str:
    path = find(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (Debian package {package})")
    return path


def _connectable(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(str(path))
            return True
    except OSError:
        return False


@dataclass
class Daemon:
    """A running daemon: its process (own process group), socket and work directory."""

    name: str
    process: subprocess.Popen[bytes]
    socket_path: Path
    workdir: Path

    @property
    def socket(self) -> str:
        """The milter socket in smtpgate's notation."""
        return f"unix:{self.socket_path}"

    def log(self) -> str:
        try:
            return (self.workdir / "output.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def workdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"sg-{prefix}-"))  # short: socket paths <= 107 bytes
    d.chmod(0o755)
    return d


def can_unshare() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    return subprocess.run([unshare, "--net", "true"], capture_output=True).returncode == 0


def start(name: str, argv: Sequence[str], wd: Path, socket_path: Path, *,
          isolate_network: bool = False, env: dict[str, str] | None = None) -> Daemon:
    """Start ``argv`` (foreground) and wait until ``socket_path`` accepts connections.

    Raises:
        RuntimeError: the daemon exited or its socket did not answer in time (log attached).
    """
    cmd = list(argv)
    if isolate_network:
        if not can_unshare():
            pytest.skip("unshare --net is not permitted here (needed to keep DNS off the net)")
        cmd = ["unshare", "--net", *cmd]
    with open(wd / "output.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=wd, start_new_session=True,
                                env={**os.environ, **(env or {})})
    d = Daemon(name, proc, socket_path, wd)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not _connectable(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            log = d.log()
            d.stop()
            raise RuntimeError(f"{name} did not start (exit={proc.poll()}):\n{log}")
        time.sleep(0.05)
    return d


@dataclass
class DkimKey:
    """An RSA key for DKIM tests: PEM private key and the DNS TXT record."""

    domain: str
    selector: str
    private_pem: bytes
    txt: bytes

    @property
    def dns_name(self) -> bytes:
        return f"{self.selector}._domainkey.{self.domain}.".encode()

    def dnsfunc(self, name: bytes | str, timeout: int = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the test key's TXT record, nothing else."""
        n = name.decode() if isinstance(name, bytes) else name
        return self.txt if n.rstrip(".") == self.dns_name.decode().rstrip(".") else None


def make_key(domain: str = "example.com", selector: str = "test") -> DkimKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    return DkimKey(domain, selector, pem, txt)


@contextlib.contextmanager
def opendkim(key: DkimKey, *, mode: str = "sv", internal: str = "127.0.0.1",
             canonicalization: str = "relaxed/relaxed") -> Iterator[Daemon]:
    """OpenDKIM signing mail of ``key.domain`` from ``internal`` hosts and verifying
    the rest against ``key`` (``TestPublicKeys``: no DNS)."""
    binary = need("opendkim", "opendkim")
    wd = workdir("opendkim")
    (wd / "key.pem").write_bytes(key.private_pem)
    (wd / "key.pem").chmod(0o600)
    (wd / "testkeys").write_bytes(key.dns_name.rstrip(b".") + b" " + key.txt + b"\n")
    sock = wd / "opendkim.sock"
    (wd / "opendkim.conf").write_text(f"""\
Syslog no
LogWhy yes
Background no
Mode {mode}
Socket local:{sock}
PidFile {wd}/opendkim.pid
Domain {key.domain}
Selector {key.selector}
KeyFile {wd}/key.pem
Canonicalization {canonicalization}
InternalHosts {internal}
TestPublicKeys {wd}/testkeys
AuthservID mx.test
RequireSafeKeys no
UMask 000
""")
    d = start("opendkim", [binary, "-f", "-x", str(wd / "opendkim.conf")], wd, sock,
              isolate_network=True)
    try:
        yield d
    finally:
        d.stop()


@contextlib.contextmanager
def opendmarc(*, reject_failures: bool = True) -> Iterator[Daemon]:
    """OpenDMARC trusting ``mx.test``'s Authentication-Results, checking mail from
    127.0.0.1 (not in its IgnoreHosts), rejecting multi-address From fields; in its own
    network namespace (its DMARC record lookups fail at once, none leaves the host)."""
    binary = need("opendmarc", "opendmarc")
    wd = workdir("opendmarc")
    sock = wd / "opendmarc.sock"
    (wd / "ignore").write_text("192.0.2.1\n")
    (wd / "opendmarc.conf").write_text(f"""\
Syslog false
Background false
Socket local:{sock}
PidFile {wd}/opendmarc.pid
AuthservID mx.test
TrustedAuthservIDs mx.test
IgnoreHosts {wd}/ignore
RejectFailures {"true" if reject_failures else "false"}
RejectMultiValueFrom true
RequiredHeaders true
SPFIgnoreResults false
SPFSelfValidate false
DNSTimeout 1
UMask 000
""")
    d = start("opendmarc", [binary, "-f", "-c", str(wd / "opendmarc.conf")], wd, sock,
              isolate_network=True)
    try:
        yield d
    finally:
        d.stop()


@contextlib.contextmanager
def clamav_milter(clamd_socket: Path, *, on_infected: str = "Reject") -> Iterator[Daemon]:
    """clamav-milter in the foreground asking the given clamd (its own test signatures)."""
    binary = need("clamav-milter", "clamav-milter")
    wd = workdir("clamilt")
    sock = wd / "clamav-milter.sock"
    (wd / "clamav-milter.conf").write_text(f"""\
MilterSocket unix:{sock}
MilterSocketMode 666
FixStaleSocket yes
Foreground yes
PidFile {wd}/clamav-milter.pid
TemporaryDirectory {wd}
ClamdSocket unix:{clamd_socket}
OnClean Accept
OnInfected {on_infected}
OnFail Defer
RejectMsg Virus found: %v
AddHeader Replace
LogFile {wd}/clamav-milter.log
LogVerbose yes
LogInfected Full
LogClean Full
MaxFileSize 25M
""")
    d = start("clamav-milter", [binary, "-c", str(wd / "clamav-milter.conf")], wd, sock)
    try:
        yield d
    finally:
        d.stop()


@contextlib.contextmanager
def spamass_milter(spamd_socket: str, *, reject_score: int = 15) -> Iterator[Daemon]:
    """spamass-milter in the foreground asking the given spamd through spamc (Unix socket),
    rejecting from ``reject_score`` points."""
    binary = need("spamass-milter", "spamass-milter")
    need("spamc", "spamc")
    wd = workdir("spamass")
    sock = wd / "spamass.sock"
    d = start("spamass-milter",
              [binary, "-p", str(sock), "-r", str(reject_score), "-P", str(wd / "pid"),
               "--", "-U", spamd_socket], wd, sock)
    try:
        yield d
    finally:
        d.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def rspamd_milter() -> Iterator[Daemon]:
    """rspamd with its proxy worker in milter mode (``milter = yes``, self-scan) on a Unix
    socket; the rest of the configuration is the scanner tests' private one (no DNS, no
    network modules, loopback only)."""
    from tests.scanners.rspamd_fixture import RSPAMD_CONFDIR, _write_config, find_rspamd

    binary = find_rspamd()
    if binary is None:
        pytest.skip("rspamd not installed (Debian package 'rspamd')")
    if not (RSPAMD_CONFDIR / "common.conf").is_file():
        pytest.skip(f"rspamd's packaged config {RSPAMD_CONFDIR}/common.conf is missing")
    wd = workdir("rspamd")
    conf = _write_config(wd, _free_port(), _free_port(), None)
    sock = wd / "run" / "milter.sock"
    with conf.open("a") as f:
        f.write(f"""\
worker "rspamd_proxy" {{
  bind_socket = "{sock} mode=0666";
  milter = yes;
  timeout = 60s;
  count = 1;
  upstream "local" {{
    default = yes;
    self_scan = yes;
  }}
}}
""")
    cmd = [binary, "-f", "-c", str(conf)]
    for var, sub in (("DBDIR", "db"), ("RUNDIR", "run"), ("LOGDIR", "."),
                     ("LOCAL_CONFDIR", "local")):
        cmd.append(f"--var={var}={wd / sub}")
    if os.geteuid() == 0:
        cmd.append("-i")
    d = start("rspamd", cmd, wd, sock)
    try:
        yield d
    finally:
        d.stop()

"""A real SpamAssassin ``spamd`` on loopback for tests, started once per session.

Entry points: the session-scoped fixture ``spamd_server`` (yields ``"127.0.0.1:PORT"``;
``from tests.scanners.spamd_fixture import spamd_server_fixture  # noqa: F401``, then take
``spamd_server`` as an argument), :func:`spamd_instance`
(the running :class:`SpamdInstance` for an address: Unix socket path, log), and
:func:`start_spamd`. Skips when ``spamd`` (Debian ``spamassassin``) is not installed.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "SPAMD_TEST_RULE",
    "SPAMD_TEST_RULE_SCORE",
    "SPAMD_TEST_TOKEN",
    "SPAMD_TEST_USER",
    "SPAMD_TEST_USER_THRESHOLD",
    "SpamdInstance",
    "find_spamd",
    "spamd_instance",
    "spamd_server",
    "spamd_server_fixture",
    "start_spamd",
]

#: A virtual user with its own ``user_prefs`` (``required_score 2.5``): send it in
#: ``User:`` and spamd's threshold becomes 2.5 instead of the default 5.0.
SPAMD_TEST_USER = "alice@example.com"
SPAMD_TEST_USER_THRESHOLD = 2.5
#: A local rule in the fixture's local.cf: a body line containing SPAMD_TEST_TOKEN
#: adds SPAMD_TEST_RULE_SCORE points (a score between the two thresholds above).
SPAMD_TEST_RULE = "SMTPGATE_TEST_3"
SPAMD_TEST_TOKEN = "smtpgate-test-three-points"
SPAMD_TEST_RULE_SCORE = 3.0
#: Seconds allowed for spamd to compile its rules and answer PING.
STARTUP_TIMEOUT = 90.0

#: Used when the host has no ``*.pre`` files to copy (they load the plugins,
#: Bayes among them, that the rules and TELL need).
_FALLBACK_PLUGINS = (
    "Check",
    "HTTPSMismatch",
    "URIDetail",
    "Bayes",
    "BodyEval",
    "DNSEval",
    "HTMLEval",
    "HeaderEval",
    "MIMEEval",
    "RelayEval",
    "URIEval",
    "WLBLEval",
    "VBounce",
    "ImageInfo",
    "FreeMail",
    "MIMEHeader",
    "ReplaceTags",
)


@dataclass
class SpamdInstance:
    """One spamd process started by :func:`start_spamd`.

    Attributes:
        address: ``"127.0.0.1:PORT"`` (TCP listener).
        socket_path: its Unix-socket listener (use as ``"unix:" + socket_path``).
        workdir: private directory (site config, Bayes DB, user prefs, log).
        log_path: spamd's log (``--syslog=stderr`` redirected here).
        bayes_path: the ``bayes_path`` prefix of the Bayes database.
        process: the spamd parent process (its own process group).
    """

    address: str
    socket_path: str
    workdir: Path
    log_path: Path
    bayes_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of spamd's log (for failure messages)."""
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(line.strip() for line in text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate spamd (its process group: parent and children), wait, clean up."""
        _kill_group(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)


def find_spamd() -> str | None:
    """Path of the ``spamd`` executable, ``None`` if not installed."""
    found = shutil.which("spamd")
    if found:
        return found
    for candidate in ("/usr/sbin/spamd", "/usr/local/sbin/spamd", "/usr/bin/spamd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    """True if a spamd on 127.0.0.1:``port`` answers PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return False
    return data.startswith(b"SPAMD/") and b"PONG" in data


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def _write_config(workdir: Path) -> Path:
    """Write the private site config; return the bayes_path prefix."""
    site = workdir / "site"
    site.mkdir()
    pre_files: list[str] = []
    for confdir in ("/etc/spamassassin", "/etc/mail/spamassassin"):
        pre_files = sorted(glob.glob(os.path.join(confdir, "*.pre")))
        if pre_files:
            break
    for pre in pre_files:
        shutil.copy(pre, site)
    if not pre_files:
        (site / "init.pre").write_text(
            "".join(f"loadplugin Mail::SpamAssassin::Plugin::{p}\n" for p in _FALLBACK_PLUGINS)
        )
    bayes_path = workdir / "bayes" / "bayes"
    (site / "local.cf").write_text(
        "# smtpgate test spamd: local rules only, Bayes for TELL\n"
        "dns_available no\n"
        "skip_rbl_checks 1\n"
        "use_bayes 1\n"
        "bayes_auto_learn 0\n"
        f"bayes_path {bayes_path}\n"
        "bayes_file_mode 0777\n"
        "lock_method flock\n"
        f"body {SPAMD_TEST_RULE} /{SPAMD_TEST_TOKEN}/\n"
        f"score {SPAMD_TEST_RULE} {SPAMD_TEST_RULE_SCORE}\n"
        f"describe {SPAMD_TEST_RULE} smtpgate test rule\n"
    )
    user_dir = workdir / "users" / SPAMD_TEST_USER
    user_dir.mkdir(parents=True)
    (user_dir / "user_prefs").write_text(f"required_score {SPAMD_TEST_USER_THRESHOLD}\n")
    return bayes_path


def start_spamd(spamd: str, *, timeout: float = STARTUP_TIMEOUT) -> SpamdInstance:
    """Start spamd on a free loopback port and a Unix socket, wait for PING.

    spamd runs with ``--local`` (no network tests), ``-x`` plus
    ``--virtual-config-dir WORKDIR/users/%u`` (per-user prefs without Unix accounts),
    ``--allow-tell`` and a private ``--siteconfigpath``. As root it drops to ``nobody``
    (``-u nobody``), so the directories it writes are handed to that user.

    Args:
        spamd: path of the spamd executable.
        timeout: seconds allowed for start-up (rule compilation).

    Returns:
        The running instance; call :meth:`SpamdInstance.stop` when done.

    Raises:
        RuntimeError: spamd exited or did not answer PING in time (message has its log).
    """
    last_error = ""
    for _attempt in range(3):
        workdir = Path(tempfile.mkdtemp(prefix="smtpgate-spamd-"))
        workdir.chmod(0o755)
        bayes_path = _write_config(workdir)
        for sub in ("bayes", "home"):
            (workdir / sub).mkdir(exist_ok=True)
        port = _free_port()
        sock_path = str(workdir / "spamd.sock")
        log_path = workdir / "spamd.log"
        cmd = [
            spamd,
            "--local",
            f"--listen=127.0.0.1:{port}",
            f"--listen={sock_path}",
            "--allow-tell",
            "--max-children=2",
            "--min-children=1",
            "--nouser-config",
            f"--virtual-config-dir={workdir}/users/%u",
            f"--siteconfigpath={workdir / 'site'}",
            f"--helper-home-dir={workdir / 'home'}",
            f"--pidfile={workdir / 'spamd.pid'}",
            "--syslog=stderr",
        ]
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for sub in ("bayes", "home", "users", "users/" + SPAMD_TEST_USER):
                os.chown(workdir / sub, nobody.pw_uid, nobody.pw_gid)
            cmd.append("--username=nobody")
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
            )
        instance = SpamdInstance(
            f"127.0.0.1:{port}", sock_path, workdir, log_path, bayes_path, process
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if "Address already in use" in instance.log_tail(5):
                break  # lost the port race: retry on another port
            if _ping(port):
                atexit.register(_kill_group, process)
                return instance
            time.sleep(0.1)
        last_error = (
            f"spamd did not answer PING on 127.0.0.1:{port} within {timeout:g}s "
            f"(exit status {process.poll()}); log:\n{instance.log_tail()}"
        )
        instance.stop()
        if "Address already in use" not in last_error:
            break
    raise RuntimeError(last_error)


_INSTANCES: dict[str, SpamdInstance] = {}


def spamd_instance(address: str) -> SpamdInstance:
    """The :class:`SpamdInstance` that the ``spamd_server`` fixture yielded ``address`` for."""
    return _INSTANCES[address]


@pytest.fixture(scope="session", name="spamd_server")
def spamd_server_fixture() -> Iterator[str]:
    """A real spamd for the whole session; yields its address ``"127.0.0.1:PORT"``.

    Skips the requesting tests when spamd is not installed (CI installs Debian's
    ``spamassassin`` package). Extra facts (Unix socket, log) via :func:`spamd_instance`.
    """
    spamd = find_spamd()
    if spamd is None:
        pytest.skip("spamd not installed (Debian package 'spamassassin')")
    instance = start_spamd(spamd)
    _INSTANCES[instance.address] = instance
    try:
        yield instance.address
    finally:
        _INSTANCES.pop(instance.address, None)
        instance.stop()


#: The same fixture under its fixture name, for ``import spamd_server`` (ruff then
#: reports F811 where a test takes it as an argument; importing
#: ``spamd_server_fixture`` instead, marked as an intentionally unused import
#: for F401, avoids that).
spamd_server = spamd_server_fixture

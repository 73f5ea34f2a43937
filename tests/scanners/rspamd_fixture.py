"""A real rspamd on loopback for tests, started once per session with a private config.

Entry points: the session-scoped fixture :func:`rspamd_server` (yields a
:class:`RspamdInstance`: ``.address`` normal worker, ``.controller``, ``.password``...;
``from tests.scanners.rspamd_fixture import rspamd_server``), :func:`start_rspamd`.
Skips when ``rspamd`` (Debian ``rspamd``) is not installed; Bayes learning also needs
Debian ``redis-server`` (a private one is started), else ``learning`` is False.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
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
    "RSPAMD_PASSWORD",
    "RSPAMD_REWRITE_SETTINGS_ID",
    "RspamdInstance",
    "find_rspamd",
    "rspamd_server",
    "start_rspamd",
]

#: Controller password of the test instance (``Password:`` header).
RSPAMD_PASSWORD = "smtpgate-test-pw"
#: A settings id (``Settings-ID:``) that turns on ``rewrite subject`` from score 0.01, so a
#: clean message with any positive score gets a rewritten subject.
RSPAMD_REWRITE_SETTINGS_ID = "smtpgate-rewrite"
#: Seconds allowed for rspamd (and redis) to start answering ``GET /ping``.
STARTUP_TIMEOUT = 60.0
#: Config directory of the packaged rspamd (holds ``common.conf`` and the modules).
RSPAMD_CONFDIR = Path("/etc/rspamd")

#: Modules that query DNS, Redis or the network, or whose state makes results depend on
#: earlier tests (greylist, ratelimit, reputation...): disabled in the test instance.
_DISABLED_MODULES = (
    "arc",
    "asn",
    "dcc",
    "dkim",
    "dkim_signing",
    "dmarc",
    "emails",
    "fuzzy_check",
    "greylist",
    "history_redis",
    "metadata_exporter",
    "mx_check",
    "neural",
    "phishing",
    "ratelimit",
    "rbl",
    "replies",
    "reputation",
    "rspamd_update",
    "spf",
    "url_redirector",
    "whitelist",
)
#: A tiny public-suffix list: rspamd compiles the packaged one (~10 000 suffixes) at every
#: start, which takes 10-20 s.
_TLDS = ("com", "net", "org", "de", "uk", "co.uk", "info", "io", "ru", "example", "test")


@dataclass
class RspamdInstance:
    """One rspamd (plus optional redis) started by :func:`start_rspamd`.

    Unpacks as ``address, controller = instance``.

    Attributes:
        address: normal worker, ``"127.0.0.1:PORT"`` (``/checkv2``, ``/ping``).
        controller: controller worker, ``"127.0.0.1:PORT"`` (``/learnspam``, ``/stat``);
            requires :attr:`password` (no IP is trusted without one).
        password: the controller password (:data:`RSPAMD_PASSWORD`).
        unix_address: the normal worker's Unix socket, ``"unix:/path"``.
        learning: True when Bayes has a Redis backend, i.e. ``/learnspam`` works.
        version: rspamd's version as ``rspamd --version`` prints it (``"3.4"``).
        workdir: private directory (config, databases, sockets, logs).
        log_path: rspamd's log file (one line per scanned message, with qid/ip/user/from).
        process: the rspamd main process (its own process group).
        redis: the private redis-server process, if any.
    """

    address: str
    controller: str
    password: str
    unix_address: str
    learning: bool
    version: str
    workdir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    redis: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        yield self.address
        yield self.controller

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of rspamd's log and stdout (for failure messages)."""
        out: list[str] = []
        for path in (self.log_path, self.workdir / "stdout.log"):
            with contextlib.suppress(OSError):
                text = path.read_text("utf-8", "replace")
                out.extend(line.rstrip() for line in text.splitlines()[-lines:])
        return "\n".join(out)

    def log_lines(self, needle: str, timeout: float = 3.0) -> list[str]:
        """Lines of rspamd's log containing ``needle``, waiting up to ``timeout`` s for one."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                found = [
                    ln
                    for ln in self.log_path.read_text("utf-8", "replace").splitlines()
                    if needle in ln
                ]
                if found or time.monotonic() > deadline:
                    return found
            if time.monotonic() > deadline:
                return []
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate rspamd (its process group) and redis, wait, remove the directory."""
        _kill_group(self.process)
        if self.redis is not None:
            _kill_group(self.redis)
        shutil.rmtree(self.workdir, ignore_errors=True)


def find_rspamd() -> str | None:
    """Path of the ``rspamd`` executable, ``None`` if not installed."""
    found = shutil.which("rspamd")
    if found:
        return found
    for candidate in ("/usr/bin/rspamd", "/usr/sbin/rspamd", "/usr/local/bin/rspamd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_ping(port: int) -> bool:
    """True if an rspamd worker on 127.0.0.1:``port`` answers ``GET /ping`` with pong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return False
    return data.startswith(b"HTTP/1.1 200") and data.rstrip().endswith(b"pong")


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group led by ``process`` (which we started), then SIGKILL."""
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


def _rspamd_version(rspamd: str) -> str:
    out = subprocess.run([rspamd, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version\s+(\S+)", out.stdout + out.stderr)
    return m.group(1) if m else ""


def _write_config(workdir: Path, normal: int, controller: int, redis: int | None) -> Path:
    """Write ``rspamd.conf`` and ``local/local.d``; return the config path.

    The top-level file replaces the packaged ``rspamd.conf`` (so no proxy/fuzzy workers
    and no default ports) but includes the packaged ``common.conf`` for rules and modules.
    """
    for sub in ("db", "run", "tmp", "local/local.d"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    (workdir / "tld.dat").write_text("".join(f"{t}\n" for t in _TLDS))
    w = str(workdir)
    conf = workdir / "rspamd.conf"
    conf.write_text(f"""\
# smtpgate test rspamd: loopback only, no DNS (dead resolver), private directories
.include "$CONFDIR/common.conf"
options {{
  pidfile = "{w}/run/rspamd.pid";
  cache_file = "{w}/db/symbols.cache";
  dynamic_conf = "{w}/db/rspamd_dynamic";
  history_file = "{w}/db/rspamd.history";
  stats_file = "{w}/db/stats.ucl";
  hs_cache_dir = "{w}/db/";
  control_socket = "{w}/run/rspamd.sock mode=0600";
  tempdir = "{w}/tmp";
  explicit_modules = ["settings", "bayes_expiry"];
  allow_raw_input = true;
  check_all_filters = false;
  task_timeout = 8s;
  local_addrs = [];
  disable_hyperscan = true;
  url_tld = "{w}/tld.dat";
  # a resolver on a closed loopback port: every lookup fails fast, nothing leaves the host
  dns {{ nameserver = ["127.0.0.1:1"]; timeout = 0.2s; retransmits = 1; }}
}}
logging {{
  type = "file";
  filename = "{w}/rspamd.log";
  level = "info";
}}
worker "normal" {{
  bind_socket = "127.0.0.1:{normal}";
  bind_socket = "{w}/run/normal.sock mode=0666";
  count = 1;
  mime = true;
}}
worker "controller" {{
  bind_socket = "127.0.0.1:{controller}";
  count = 1;
  password = "{RSPAMD_PASSWORD}";
  enable_password = "{RSPAMD_PASSWORD}";
  # trust no source address: every privileged command needs the password
  secure_ip = "192.0.2.254";
}}
""")
    local = workdir / "local" / "local.d"
    for module in _DISABLED_MODULES:
        (local / f"{module}.conf").write_text("enabled = false;\n")
    (local / "milter_headers.conf").write_text(
        "extended_spam_headers = true;\n"
        "skip_local = false;\n"
        "skip_authenticated = false;\n"
        'use = ["x-spamd-result", "x-rspamd-queue-id", "x-spam-status"];\n'
    )
    # Bayes keeps rspamd's default min_learns (200), so learning in one test never
    # changes the scores another test sees.
    if redis is not None:
        (local / "classifier-bayes.conf").write_text(f'servers = "127.0.0.1:{redis}";\n')
    (local / "settings.conf").write_text(f"""\
{RSPAMD_REWRITE_SETTINGS_ID} {{
  id = "{RSPAMD_REWRITE_SETTINGS_ID}";
  apply {{
    actions {{
      "rewrite subject" = 0.01;
      "add header" = 1000;
      greylist = 1000;
      reject = 2000;
    }}
  }}
}}
""")
    return conf


def _start_redis(
    redis_server: str, workdir: Path, timeout: float
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a private redis-server (loopback, no persistence); return it and its port."""
    last = ""
    for _attempt in range(3):
        port = _free_port()
        with open(workdir / "redis.log", "wb") as log:
            process = subprocess.Popen(
                [
                    redis_server,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir / "db"),
                    "--daemonize",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _redis_ping(port):
                atexit.register(_kill_group, process)
                return process, port
            time.sleep(0.05)
        _kill_group(process)
        last = (workdir / "redis.log").read_text("utf-8", "replace")[-2000:]
    raise RuntimeError(f"redis-server did not start; log:\n{last}")


def start_rspamd(rspamd: str, *, timeout: float = STARTUP_TIMEOUT) -> RspamdInstance:
    """Start rspamd in the foreground on free loopback ports and a Unix socket.

    Runs ``rspamd -f -c WORKDIR/rspamd.conf --var=DBDIR=... --var=LOCAL_CONFDIR=...``
    (plus ``-i``, "insecure", when run as root: rspamd refuses root workers otherwise)
    and waits until both workers answer ``GET /ping``. When ``redis-server`` is on PATH a
    private one is started first and used as the Bayes backend.

    Args:
        rspamd: path of the rspamd executable.
        timeout: seconds allowed for start-up.

    Returns:
        The running instance; call :meth:`RspamdInstance.stop` when done.

    Raises:
        RuntimeError: rspamd (or redis) exited or did not answer in time; has the log.
    """
    version = _rspamd_version(rspamd)
    last_error = ""
    for _attempt in range(3):
        workdir = Path(tempfile.mkdtemp(prefix="smtpgate-rspamd-"))
        redis_proc: subprocess.Popen[bytes] | None = None
        redis_port: int | None = None
        redis_server = shutil.which("redis-server")
        if redis_server:
            (workdir / "db").mkdir()
            redis_proc, redis_port = _start_redis(redis_server, workdir, timeout)
        normal, controller = _free_port(), _free_port()
        conf = _write_config(workdir, normal, controller, redis_port)
        cmd = [rspamd, "-f", "-c", str(conf)]
        for var, sub in (
            ("DBDIR", "db"),
            ("RUNDIR", "run"),
            ("LOGDIR", "."),
            ("LOCAL_CONFDIR", "local"),
        ):
            cmd.append(f"--var={var}={workdir / sub}")
        if os.geteuid() == 0:
            cmd.append("-i")
        with open(workdir / "stdout.log", "wb") as out:
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
            )
        instance = RspamdInstance(
            address=f"127.0.0.1:{normal}",
            controller=f"127.0.0.1:{controller}",
            password=RSPAMD_PASSWORD,
            unix_address=f"unix:{workdir / 'run' / 'normal.sock'}",
            learning=redis_port is not None,
            version=version,
            workdir=workdir,
            log_path=workdir / "rspamd.log",
            process=process,
            redis=redis_proc,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _http_ping(normal) and _http_ping(controller):
                atexit.register(_kill_group, process)
                return instance
            time.sleep(0.1)
        tail = instance.log_tail()
        last_error = (
            f"rspamd did not answer /ping on 127.0.0.1:{normal} and :{controller} within "
            f"{timeout:g}s (exit status {process.poll()}); log:\n{tail}"
        )
        instance.stop()
        if "in use" not in tail:  # retry only a lost port race
            break
    raise RuntimeError(last_error)


@pytest.fixture(scope="session")
def rspamd_server() -> Iterator[RspamdInstance]:
    """A real rspamd for the whole session; yields the :class:`RspamdInstance`.

    ``instance.address`` is the normal worker, ``instance.controller`` the controller
    (password ``instance.password``); ``address, controller = instance`` also works.
    Skips the requesting tests when rspamd is not installed (CI installs Debian's
    ``rspamd``; ``redis-server`` too, for learning).
    """
    rspamd = find_rspamd()
    if rspamd is None:
        pytest.skip("rspamd not installed (Debian package 'rspamd')")
    if not (RSPAMD_CONFDIR / "common.conf").is_file():
        pytest.skip(f"rspamd's packaged config {RSPAMD_CONFDIR}/common.conf is missing")
    instance = start_rspamd(rspamd)
    try:
        yield instance
    finally:
        instance.stop()

"""A private Postfix instance for the tests (the ``postfix`` fixture, registered in
tests/conftest.py): its own config_directory, queue directory and loopback ports, run in
the foreground (``master -d``) and stopped after the test; no system mail configuration
is read or touched. Needs Debian's postfix and root (Postfix's master refuses to run
otherwise); skipped with the reason when either is missing. Used by tests/postfix
(smtpgate as Postfix's milter and policy server) and tests/e2e (Postfix as smtpgate's
client)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import free_port

MASTER = Path("/usr/lib/postfix/sbin/master")

_MASTER_CF = """\
{smtp_port}  inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""




@dataclass
class Postfix:
    """A running private Postfix: its SMTP port and its log file."""

    root: Path
    smtp_port: int
    process: subprocess.Popen[bytes]

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def wait_log(self, text: str, timeout: float = 30.0) -> str:
        """Wait until ``text`` is in the log (Postfix logs asynchronously); return the line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if text in line:
                    return line
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the Postfix log:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


StartPostfix = Callable[..., Postfix]


@pytest.fixture
def postfix() -> Iterator[StartPostfix]:
    """A factory: ``start(relay_port=..., **main_cf)`` starts a private Postfix relaying
    everything to ``[127.0.0.1]:relay_port``, with the extra ``main.cf`` settings given."""
    if not MASTER.exists() or shutil.which("postfix") is None:
        pytest.skip("Debian's postfix is not installed (scripts/setup.sh installs it)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root (its master runs as root)")
    started: list[Postfix] = []
    roots: list[Path] = []

    def start(*, relay_port: int, **main_cf: str) -> Postfix:
        # Postfix's unprivileged daemons must reach the queue and the log: pytest's own
        # temporary directories are private to root, so use one of our own under /tmp.
        root = Path(tempfile.mkdtemp(prefix="smtpgate-postfix-"))
        roots.append(root)
        root.chmod(0o755)
        conf, queue, data = root / "conf", root / "queue", root / "data"
        for d in (conf, queue, data):
            d.mkdir()
        shutil.chown(data, "postfix")
        smtp_port = free_port()
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(queue), "data_directory": str(data),
            "command_directory": "/usr/sbin", "daemon_directory": "/usr/lib/postfix/sbin",
            "meta_directory": "/etc/postfix", "shlib_directory": "/usr/lib/postfix",
            "mail_owner": "postfix", "setgid_group": "postdrop",
            "myhostname": "postfix.test", "mydomain": "test", "myorigin": "postfix.test",
            "mydestination": "", "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8", "relayhost": f"[127.0.0.1]:{relay_port}",
            "smtp_dns_support_level": "disabled", "smtp_host_lookup": "native",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "alias_maps": "", "alias_database": "", "local_recipient_maps": "",
            "maillog_file": str(root / "maillog"), "maillog_file_prefixes": str(root),
            "smtpd_banner": "$myhostname ESMTP Postfix", "queue_run_delay": "1s",
            "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
        }
        settings.update(main_cf)
        (conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (conf / "master.cf").write_text(_MASTER_CF.format(smtp_port=f"127.0.0.1:{smtp_port}"))
        subprocess.run(["postfix", "-c", str(conf), "check"], check=False,
                       capture_output=True, timeout=60)
        process = subprocess.Popen([str(MASTER), "-c", str(conf), "-d"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        instance = Postfix(root, smtp_port, process)
        started.append(instance)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", smtp_port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the private Postfix did not start:\n"
                                         + instance.log()[-3000:]) from None
                time.sleep(0.1)
        return instance

    try:
        yield start
    finally:
        for instance in started:
            instance.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)

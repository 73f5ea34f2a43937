"""A real Postfix as smtpgate's client in proxy mode (issue 8, finding 15).

Debian's Postfix runs as a private instance (``postfix -c DIR``: its own main.cf/master.cf,
queue and data directories in a temporary directory, loopback only) whose relayhost is
smtpgate in proxy mode; smtpgate relays to an aiosmtpd upstream that refuses
``bounce-me@``. Only ``bounce-me`` bounces; ``ok7`` is delivered once. Before per-recipient
proxying, both bounced and ``ok7`` was never delivered.
"""

from __future__ import annotations

import email
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
MSG = (b"From: sender@client.test\r\nTo: bounce-me@example.net, ok7@example.net\r\n"
       b"Subject: through postfix\r\nMessage-Id: <pf1@client.test>\r\n\r\nhello\r\n")

pytestmark = pytest.mark.skipif(
    not Path(POSTFIX).exists() or not Path("/usr/lib/postfix/sbin/master").exists(),
    reason="Debian postfix not installed",
)

MASTER_CF = """\
{smtpd} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file_prefixes = {base}
maillog_file = {base}/maillog
myhostname = client.test
mydomain = client.test
myorigin = client.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{gate}
smtp_tls_security_level = none
smtp_dns_support_level = disabled
alias_maps =
alias_database =
local_recipient_maps =
delay_warning_time = 0
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""


class Upstream:
    """Refuses bounce-me@, records every message."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("bounce-me@"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok: queued"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def refusing_upstream() -> Iterator[tuple[Upstream, int]]:
    handler = Upstream()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="upstream.test",
                     decode_data=False)
    ctl.start()
    yield handler, port
    ctl.stop()


def start_postfix(gate_port: int) -> tuple[Path, int]:
    # Postfix's daemons run as user postfix: the directory must be reachable for it.
    base = Path(tempfile.mkdtemp(prefix="smtpgate-postfix-", dir="/tmp"))
    base.chmod(0o755)
    (base / "conf").mkdir()
    (base / "queue").mkdir()
    (base / "data").mkdir()
    shutil.chown(base / "data", "postfix")
    smtpd = free_port()
    (base / "conf" / "main.cf").write_text(MAIN_CF.format(base=base, gate=gate_port))
    (base / "conf" / "master.cf").write_text(MASTER_CF.format(smtpd=f"127.0.0.1:{smtpd}"))
    out = subprocess.run([POSTFIX, "-c", str(base / "conf"), "start"], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        log = (base / "maillog").read_text() if (base / "maillog").exists() else ""
        raise AssertionError(f"postfix start failed: {out.stderr}\n{log}")
    return base, smtpd


def test_postfix_client_only_refused_recipient_bounces(run_app, refusing_upstream) -> None:
    handler, up_port = refusing_upstream
    app = run_app({"relay": {"url": f"smtp://127.0.0.1:{up_port}", "timeout": 10},
                   "delivery": {"mode": "proxy"}})
    base, smtpd = start_postfix(app.port)
    try:
        assert wait_for(lambda: _listening(smtpd), timeout=30)
        with smtplib.SMTP("127.0.0.1", smtpd, timeout=30) as s:
            refused = s.sendmail("sender@client.test",
                                 ["bounce-me@example.net", "ok7@example.net"], MSG)
        assert refused == {}  # Postfix queued both; smtpgate sees them as Postfix relays

        def bounce_arrived() -> bool:
            return any(m[0] in ("", "<>") for m in handler.messages)

        assert wait_for(bounce_arrived, timeout=90), (base / "maillog").read_text()
        assert wait_for(lambda: "removed" in (base / "maillog").read_text(), timeout=30)
        maillog = (base / "maillog").read_text()
    finally:
        subprocess.run([POSTFIX, "-c", str(base / "conf"), "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)

    delivered = [m for m in handler.messages if m[0] == "sender@client.test"]
    assert [m[1] for m in delivered] == [["ok7@example.net"]], handler.messages
    assert delivered[0][2].endswith(MSG.split(b"\r\n\r\n", 1)[1])

    bounces = [m for m in handler.messages if m[0] in ("", "<>")]
    assert len(bounces) == 1 and bounces[0][1] == ["sender@client.test"]
    report = email.message_from_bytes(bounces[0][2])
    status = next(p for p in report.walk()
                  if p.get_content_type() == "message/delivery-status").as_string()
    assert "Final-Recipient: rfc822; bounce-me@example.net" in status
    assert "ok7@example.net" not in status
    assert "Status: 5.1.1" in status

    bounced = [line for line in maillog.splitlines() if "status=bounced" in line]
    sent = [line for line in maillog.splitlines()
            if "status=sent" in line and "to=<ok7@example.net>" in line]
    assert len(bounced) == 1 and "to=<bounce-me@example.net>" in bounced[0], maillog
    assert len(sent) == 1, maillog


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False

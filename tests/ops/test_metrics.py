"""Prometheus metrics (issue 12, "Prometheus metrics"): known traffic from real SMTP
clients over loopback, then ``/metrics`` scraped over HTTP from the admin listener and
parsed with prometheus-client's parser; every counter is compared with its exact
expected change. Servers run in their own thread under each event loop (``run_app``);
the queue test has the delivery process (its own process) relay to an aiosmtpd upstream;
the workers test runs ``smtpgate serve`` with two worker processes."""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from smtpgate.app import Smtpgate
from smtpgate.hooks import Stage
from smtpgate.reply import Reply

from ..scanners.spamd_fixture import spamd_server_fixture  # noqa: F401
from ..support import CORPUS, Capture, RawClient, free_port, wait_for

MSG = (b"From: ann@example.org\r\nTo: bob@example.com\r\nSubject: metrics\r\n"
       b"Message-ID: <m1@example.org>\r\n\r\nHello.\r\n")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape: ``(name, labels) -> value`` (prometheus-client parser)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(app: Smtpgate) -> Samples:
    """GET /metrics from the admin listener with a real HTTP client."""
    assert app.admin is not None
    host, port = app.admin.address[:2]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)






def test_counters_after_known_traffic(run_app: Callable[..., Smtpgate],
                                      cert_files: dict[str, str],
                                      client_tls: ssl.SSLContext) -> None:
    """Three sessions: (1) STARTTLS, AUTH ok, one recipient accepted and one refused by a
    plugin, a message accepted; (2) AUTH failed, a transaction abandoned by RSET; (3) an
    unknown command. Every counter moves by exactly what was sent."""
    capture = Capture()

    def check(user: str, password: str) -> bool:
        return (user, password) == ("ann", "secret")

    app = run_app({"admin": {"listen": "127.0.0.1:0"},
                   "tls": {"certificate": cert_files["chain"], "key": cert_files["key"]}},
                  deliver=capture, authenticator=check)

    def blocklist(session: Any, tx: Any, rcpt: Any) -> Reply | None:
        if rcpt.address == "bad@example.com":
            return Reply(554, "5.7.1", "<bad@example.com>: Recipient address rejected")
        return None

    app.hooks.register(Stage.RCPT, blocklist, name="blocklist", plugin="blocklist")
    before = scrape(app)

    with smtplib.SMTP("127.0.0.1", app.port, timeout=10) as s:
        s.ehlo("client.test")
        s.starttls(context=client_tls)
        s.ehlo("client.test")
        s.login("ann", "secret")
        s.mail("ann@example.org")
        assert s.rcpt("bob@example.com")[0] == 250
        assert s.rcpt("bad@example.com")[0] == 554
        assert s.data(MSG)[0] == 250
    with smtplib.SMTP("127.0.0.1", app.port, timeout=10) as s:
        s.ehlo("client2.test")
        s.starttls(context=client_tls)
        s.ehlo("client2.test")
        s.user, s.password = "ann", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.auth("PLAIN", s.auth_plain)  # one attempt (login() would try LOGIN next)
        s.mail("ann@example.org")
        assert s.rcpt("carl@example.com")[0] == 250
        s.rset()
    c = RawClient(app.port)
    c.send(b"HELO raw.test\r\n")
    assert c.read_reply().startswith(b"250")
    c.send(b"FOO bar\r\n")
    assert c.read_reply().startswith(b"500")
    c.send(b"QUIT\r\n")
    assert c.read_reply().startswith(b"221")
    c.close()

    # (deltas: other processes of this test run may have left values in the directory)
    assert wait_for(lambda: delta(before, scrape(app), "smtpgate_sessions_open") == 0
                    and delta(before, scrape(app), "smtpgate_sessions_total") == 3)
    after = scrape(app)
    assert len(capture.messages) == 1

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    assert d("smtpgate_sessions_total") == 3
    assert d("smtpgate_sessions_open") == 0
    assert d("smtpgate_transactions_total", outcome="accepted") == 1
    assert d("smtpgate_transactions_total", outcome="aborted") == 1
    assert d("smtpgate_transactions_total", outcome="rejected") == 0
    assert d("smtpgate_received_bytes_total") == len(MSG)
    replies = {
        ("connect", "2xx"): 3, ("helo", "2xx"): 5, ("auth", "2xx"): 1, ("auth", "5xx"): 1,
        ("mail", "2xx"): 2, ("rcpt", "2xx"): 2, ("rcpt", "5xx"): 1, ("data", "3xx"): 1,
        ("message", "2xx"): 1, ("rset", "2xx"): 1, ("quit", "2xx"): 3, ("unknown", "5xx"): 1,
        ("starttls", "2xx"): 2,
    }
    for (stage, cls), n in replies.items():
        assert d("smtpgate_replies_total", stage=stage, **{"class": cls}) == n, (stage, cls)
    total = sum(v for (name, _), v in after.items() if name == "smtpgate_replies_total") - sum(
        v for (name, _), v in before.items() if name == "smtpgate_replies_total")
    assert total == sum(replies.values())
    assert d("smtpgate_tls_sessions_total", version="TLSv1.3") == 2
    assert d("smtpgate_auth_total", result="success", mechanism="PLAIN") == 1
    assert d("smtpgate_auth_total", result="failure", mechanism="PLAIN") == 1
    assert d("smtpgate_plugin_verdicts_total", plugin="blocklist", stage="rcpt",
             verdict="CONT") == 2
    assert d("smtpgate_plugin_verdicts_total", plugin="blocklist", stage="rcpt",
             verdict="DENY") == 1
    assert d("smtpgate_plugin_duration_seconds_count", plugin="blocklist", stage="rcpt") == 3
    assert d("smtpgate_plugin_duration_seconds_bucket", plugin="blocklist", stage="rcpt",
             le="+Inf") == 3


def gtube() -> bytes:
    """The GTUBE test message of the corpus, with CRLF line ends."""
    raw = (CORPUS / "rspamd__functional_messages_gtube.eml").read_bytes()
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_scanner_metrics_with_spamd(run_app: Callable[..., Smtpgate],
                                    spamd_server: str) -> None:
    """A real spamd in the data phase: one clean message and GTUBE (refused as spam);
    the scanner's verdicts and latency observations, and the transactions' outcomes."""
    app = run_app({"admin": {"listen": "127.0.0.1:0"},
                   "scanner": [{"type": "spamassassin", "address": spamd_server}]},
                  deliver=Capture())
    before = scrape(app)
    for message, expected in ((MSG, 250), (gtube(), 550)):
        with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("ann@example.org")
            s.rcpt("bob@example.com")
            assert s.data(message)[0] == expected
    after = scrape(app)
    assert delta(before, after, "smtpgate_scanner_verdicts_total", scanner="spamassassin",
                 verdict="clean") == 1
    assert delta(before, after, "smtpgate_scanner_verdicts_total", scanner="spamassassin",
                 verdict="spam") == 1
    assert delta(before, after, "smtpgate_scanner_duration_seconds_count",
                 scanner="spamassassin") == 2
    assert delta(before, after, "smtpgate_scanner_duration_seconds_sum",
                 scanner="spamassassin") > 0
    assert delta(before, after, "smtpgate_transactions_total", outcome="accepted") == 1
    assert delta(before, after, "smtpgate_transactions_total", outcome="rejected") == 1
    assert delta(before, after, "smtpgate_replies_total", stage="message",
                 **{"class": "5xx"}) == 1


# ------------------------------------------------------------------ queue mode


class Upstream:
    """aiosmtpd handler: records messages, refuses the recipients in ``reject``."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.reject = {"gone@example.com"}

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        if address in self.reject:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 OK queued upstream"


@pytest.fixture
def upstream_port() -> int:
    return free_port()


def test_queue_delivery_process_counts_and_send_log(
        run_app: Callable[..., Smtpgate], tmp_path: Path, upstream_port: int) -> None:
    """Queue mode with the delivery process (a separate process): while the upstream is
    down the message is counted in ``smtpgate_queue_messages{state="deferred"}``; once it
    is up, one recipient is delivered and one refused (5xx, NOTIFY=NEVER: no bounce),
    counted by the delivery process and seen in the server's /metrics; the send log has
    one line per outcome."""
    spool = tmp_path / "spool"
    send_log = tmp_path / "send.log"
    app = run_app({
        "admin": {"listen": "127.0.0.1:0"},
        "relay": {"url": f"smtp://127.0.0.1:{upstream_port}", "timeout": 3},
        "delivery": {"mode": "queue"},
        "queue": {"path": str(spool), "min_backoff": 0.3, "max_backoff": 1,
                  "scan_interval": 0.05, "delivery_process": True},
        "log": {"send_log": str(send_log)},
    })
    before = scrape(app)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("ann@example.org")
        s.rcpt("bob@example.com")
        s.rcpt("gone@example.com", ["NOTIFY=NEVER"])
        code, text = s.data(MSG)
    assert code == 250
    qid = text.split()[-1].decode()
    assert wait_for(lambda: (spool / "deferred" / f"{qid}.json").exists())
    mid = scrape(app)
    assert value(mid, "smtpgate_queue_messages", state="deferred") == 1
    assert value(mid, "smtpgate_queue_messages", state="incoming") == 0
    assert value(mid, "smtpgate_queue_messages", state="hold") == 0
    # The delivery process writes its counts within a second (metrics.FLUSH_INTERVAL).
    assert wait_for(lambda: delta(before, scrape(app), "smtpgate_delivery_attempts_total",
                                  destination="relay", outcome="deferred") >= 2)
    handler = Upstream()
    ctl = Controller(handler, hostname="127.0.0.1", port=upstream_port,
                     server_hostname="upstream.test", decode_data=False)
    ctl.start()
    try:
        assert wait_for(lambda: len(handler.messages) == 1)
        assert wait_for(lambda: value(scrape(app), "smtpgate_queue_messages",
                                      state="deferred") == 0)
        assert wait_for(lambda: delta(before, scrape(app), "smtpgate_delivery_attempts_total",
                                      destination="relay", outcome="failed") == 1)
    finally:
        ctl.stop()
    after = scrape(app)
    assert handler.messages[0][1] == ["bob@example.com"]
    assert delta(before, after, "smtpgate_delivery_attempts_total", destination="relay",
                 outcome="delivered") == 1
    assert delta(before, after, "smtpgate_delivery_attempts_total", destination="relay",
                 outcome="failed") == 1
    assert delta(before, after, "smtpgate_transactions_total", outcome="accepted") == 1
    assert value(after, "smtpgate_queue_messages", state="deferred") == 0
    lines = [ln for ln in send_log.read_text().splitlines() if f"id={qid}" in ln]
    sent = [ln for ln in lines if "status=sent" in ln]
    bounced = [ln for ln in lines if "status=bounced" in ln]
    assert len(sent) == 1 and len(bounced) == 1, lines
    assert "from=<ann@example.org> to=<bob@example.com> upstream=127.0.0.1" in sent[0]
    assert "reply='250 2.0.0 OK queued upstream'" in sent[0]
    assert "to=<gone@example.com>" in bounced[0]
    assert "reply='550 5.1.1 No such user here'" in bounced[0]


# ------------------------------------------------------------ worker processes


def test_workers_write_one_aggregate(tmp_path: Path) -> None:
    """``smtpgate serve`` with ``server.workers = 2``: sessions handled by either worker
    process add up in the metrics directory (PROMETHEUS_MULTIPROC_DIR, set by the
    operator, emptied at start), read here with prometheus-client's collector."""
    port = free_port()
    mdir = tmp_path / "metrics"
    mdir.mkdir()
    (mdir / "counter_999999.db").write_bytes(b"stale")  # an earlier run's file: removed
    config = tmp_path / "smtpgate.toml"
    config.write_text(
        f'[server]\nhostname = "mx.test"\nlisten = ["127.0.0.1:{port}"]\nworkers = 2\n'
        f'[maildir]\npath = "{tmp_path / "mail"}"\n')
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(mdir))
    env.pop("SMTPGATE_METRICS_PRIVATE_DIR", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        assert wait_for(lambda: b"listening on" in log.read_bytes()), log.read_text()
        assert not (mdir / "counter_999999.db").exists()
        sessions = 12
        for _ in range(sessions):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("client.test")
                s.mail("ann@example.org")
                s.rcpt("bob@example.org")
                s.data(MSG)

        def aggregate() -> Samples:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(mdir))
            return parse(generate_latest(registry).decode())

        assert wait_for(lambda: value(aggregate(), "smtpgate_sessions_total") == sessions)
        agg = aggregate()
        assert value(agg, "smtpgate_transactions_total", outcome="accepted") == sessions
        assert value(agg, "smtpgate_sessions_open") == 0
        assert value(agg, "smtpgate_replies_total", stage="quit", **{"class": "2xx"}) \
            == sessions
        pids = {p.name.rsplit("_", 1)[1] for p in mdir.glob("counter_*.db")}
        assert len(pids) >= 3  # the supervisor and both workers write their own files
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()

"""What sender authentication costs (issue 11): msgs/s of smtpgate (discard delivery) with
no plugins, and with spf + dkim + dmarc + dnsbl + greylist (the client whitelisted), all
against a DNS server on loopback; and how many DNS queries the cache leaves.

Entry point: ``.venv/bin/python bench/auth.py`` (``ROUNDS``, ``MESSAGES``, ``SESSIONS`` in
the environment). Load: Postfix ``smtp-source -d -s SESSIONS -l 4096 -m MESSAGES`` (scenario
a of bench/METHOD.md), sender ``a@example.com``, recipient ``b@example.com``, after a warm-up
of 300 messages; the two servers alternate, ROUNDS times; medians [min-max]. The test DNS
server (tests/delivery/dns_server.py) publishes an SPF record that passes 127.0.0.1, a
DMARC record (p=none), and an empty DNSBL zone; the greylist is warmed by a first attempt
and its retry (``delay = 0``, ``auto_whitelist = 1``), so the client is whitelisted.
"""

from __future__ import annotations

import functools
import os
import shutil
import smtplib
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_run import serve, source  # noqa: E402  (bench/ is the script's directory)
from tests.policy_auth.support import ThreadedDns  # noqa: E402

ZONE = {
    ("example.com", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
    ("_dmarc.example.com", "TXT"): ['"v=DMARC1; p=none"'],
    ("example.com", "MX"): ["10 mx.example.com."],
}


def config(port: int, dns_port: int, plugins: bool, wd: Path) -> str:
    text = (f'[server]\nhostname = "bench.test"\nlisten = ["127.0.0.1:{port}"]\n'
            "max_connections = 5000\nmax_connections_per_ip = 5000\n"
            '[relay]\nurl = "discard:"\nrelay_domains = ["example.com"]\n'
            "local_networks = []\n"
            f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
            '[log]\nlevel = "WARNING"\n')
    if plugins:
        text += ('[[plugin]]\nuse = "spf"\n[[plugin]]\nuse = "dkim"\n'
                 '[[plugin]]\nuse = "dmarc"\n'
                 '[[plugin]]\nuse = "dnsbl"\nzones = ["bl.example.com"]\n'
                 f'[[plugin]]\nuse = "greylist"\ndelay = 0\nauto_whitelist = 1\n'
                 f'store = "{wd / "greylist.sqlite"}"\n'
                 '[[plugin]]\nuse = "authentication-results"\n')
    return text


def warm_greylist(port: int) -> None:
    """Greylisting: the first attempt, then its retry (delay 0): the client is whitelisted."""
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("bench.client")
            c.mail("a@example.com")
            c.rcpt("b@example.com")


def main() -> int:
    rounds = int(os.environ.get("ROUNDS", "3"))
    messages = int(os.environ.get("MESSAGES", "3000"))
    sessions = int(os.environ.get("SESSIONS", "20"))
    wd = Path(tempfile.mkdtemp(prefix="smtpgate-bench-auth-"))
    rates: dict[str, list[float]] = {"none": [], "auth": []}
    queries: list[float] = []
    with ThreadedDns(dict(ZONE), zone="com") as dns:
        for r in range(rounds):
            for name in (["none", "auth"] if r % 2 == 0 else ["auth", "none"]):
                with serve(wd, name, functools.partial(
                        config, dns_port=dns.port, plugins=name == "auth", wd=wd),
                        warm_greylist) as port:
                    before = len(dns.server.queries)
                    rates[name].append(source(port, messages, sessions))
                    if name == "auth":
                        queries.append((len(dns.server.queries) - before) / messages)
            print(f"round {r + 1}: none {rates['none'][-1]:.0f} msg/s, "
                  f"auth {rates['auth'][-1]:.0f} msg/s", flush=True)
    ratio = [a / n for a, n in zip(rates["auth"], rates["none"], strict=True)]
    print(f"\nsmtpgate, discard, smtp-source -d -s {sessions} -l 4096 -m {messages}, {rounds} "
          "rounds (median [min-max])")
    for name, label in (("none", "no plugins"),
                        ("auth", "spf+dkim+dmarc+dnsbl+greylist+authentication-results")):
        v = rates[name]
        print(f"  {label:52s} {statistics.median(v):6.0f} msg/s [{min(v):.0f}-{max(v):.0f}]")
    print(f"  ratio {statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}]; "
          f"DNS queries per message in the timed runs: {statistics.median(queries):.3f}")
    shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

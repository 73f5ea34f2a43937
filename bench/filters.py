"""What external filters cost (issue 10): msgs/s of smtpgate (discard delivery) with no
filter, with one qmail-spp shell plugin at rcpt, and with OpenDKIM signing as a milter.

Entry point: ``.venv/bin/python bench/filters.py`` (options: ``ROUNDS``, ``MESSAGES``,
``SESSIONS`` in the environment). Load: Postfix ``smtp-source -d -s SESSIONS -l 4096 -m
MESSAGES`` (persistent sessions, scenario a of bench/METHOD.md) on loopback, after a warm-up
of 300 messages; the three servers run in a rotating order, ROUNDS times; medians
[min-max] of msgs/s, and each filter's ratio to no filter in the same round. OpenDKIM is
started the way the test suite starts it (tests/filters/milter/daemons.py: its own key,
its own configuration, no network). With 20 sessions a milter client that serialised the
sessions would show as a throughput close to one session's.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_run import serve, source  # noqa: E402  (bench/ is the script's directory)
from tests.filters.milter.daemons import make_key, opendkim  # noqa: E402


def config(port: int, extra: str) -> str:
    return (f'[server]\nhostname = "bench.test"\nlisten = ["127.0.0.1:{port}"]\n'
            "max_connections = 5000\nmax_connections_per_ip = 5000\n"
            '[relay]\nurl = "discard:"\n[log]\nlevel = "WARNING"\n' + extra)


def main() -> int:
    rounds = int(os.environ.get("ROUNDS", "3"))
    messages = int(os.environ.get("MESSAGES", "3000"))
    sessions = int(os.environ.get("SESSIONS", "20"))
    wd = Path(tempfile.mkdtemp(prefix="smtpgate-bench-filters-"))
    spp = wd / "smtpplugins"
    plugin = wd / "rcpt-ok.sh"
    plugin.write_text("#!/bin/sh\n# accept every recipient, like most rcpt plugins do\nexit 0\n")
    plugin.chmod(0o755)
    spp.write_text(f"[rcpt]\n{plugin}\n")
    rates: dict[str, list[float]] = {"none": [], "qmail-spp": [], "milter-opendkim": []}
    ratios: dict[str, list[float]] = {"qmail-spp": [], "milter-opendkim": []}
    with ExitStack() as stack:
        dkim = stack.enter_context(opendkim(make_key(), mode="s", internal="127.0.0.1"))
        extras = {
            "none": "",
            "qmail-spp": f'[[plugin]]\nuse = "qmail-spp"\nplugins_file = "{spp}"\n',
            "milter-opendkim": f'[[plugin]]\nuse = "milter"\nname = "opendkim"\n'
                               f'socket = "{dkim.socket}"\n',
        }
        names = list(extras)
        for r in range(rounds):
            order = names[r % 3:] + names[: r % 3]
            got: dict[str, float] = {}
            for name in order:
                with serve(wd, name, lambda p, e=extras[name]: config(p, e)) as port:
                    got[name] = source(port, messages, sessions)
                rates[name].append(got[name])
            for name in ratios:
                ratios[name].append(got[name] / got["none"])
            print(f"round {r + 1}: " + ", ".join(f"{n} {got[n]:.0f} msg/s" for n in names),
                  flush=True)
    print(f"\nsmtpgate, discard delivery, smtp-source -d -s {sessions} -l 4096 -m {messages}, "
          f"{rounds} rounds (median [min-max])")
    for name in names:
        vals = rates[name]
        line = (f"  {name:16s} {statistics.median(vals):7.0f} msg/s "
                f"[{min(vals):.0f}-{max(vals):.0f}]")
        if name in ratios:
            rv = ratios[name]
            line += f"   vs none {statistics.median(rv):.2f} [{min(rv):.2f}-{max(rv):.2f}]"
        print(line)
    shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

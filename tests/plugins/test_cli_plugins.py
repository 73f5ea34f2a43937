"""``smtpgate plugins -c FILE [--json]`` as a real subprocess: the chain of every stage,
built-ins (relay, HELO rules, scanners, tarpit, load average) and user plugins, with
name, priority, timeout and on_error, in run order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import EXAMPLES, REPO

CONFIG = """
[server]
hostname = "mx.test"
listen = ["127.0.0.1:0"]
max_load_average = 8
tarpit_initial = 1
tarpit_max = 4

[maildir]
path = "{tmp}/mail"

[hooks]
timeout = 20

[relay]
relay_domains = ["example.com"]
local_networks = []

[[scanner]]
type = "spamassassin"
address = "127.0.0.1:1"
timeout = 10

[[helo_rule]]
pattern = "*.example.org"
flags = "ftRh"

[[plugin]]
module = "sender_blocklist"
name = "blocklist"
timeout = 5
blocked_senders = ["spam@bad.example"]

[[plugin]]
module = "tests.plugins.probe"
name = "probe"
priority = 20
on_error = "accept"
stages = ["delivered", "queue", "headers", "data_start", "rcpt"]
"""

#: (priority, plugin, hook, timeout in s, on_error) per stage, in run order.
EXPECTED: dict[str, list[tuple[int, str, str, float, str]]] = {
    "connect": [(-100, "load_average", "load_average:connect", 20, "tempfail")],
    "helo": [(-80, "helo_rules", "helo_rules:helo", 20, "tempfail")],
    "mail": [(-80, "helo_rules", "helo_rules:mail", 20, "tempfail"),
             (-10, "blocklist", "blocklist:mail", 5, "tempfail")],
    "rcpt": [(-90, "relay", "relay:rcpt", 20, "tempfail"),
             (-80, "helo_rules", "helo_rules:rcpt", 20, "tempfail"),
             (20, "probe", "probe:rcpt", 20, "accept")],
    "data_start": [(20, "probe", "probe:data_start", 20, "accept")],
    "headers": [(20, "probe", "probe:headers", 20, "accept")],
    "data": [(-50, "scanners", "scanners:scan", 15, "tempfail"),
             (-10, "blocklist", "blocklist:data", 5, "tempfail"),
             (90, "scanners", "scanners:enforce", 20, "tempfail")],
    "queue": [(20, "probe", "probe:queue", 20, "accept")],
    "delivered": [(20, "probe", "probe:delivered", 20, "accept")],
    "vrfy": [(-80, "helo_rules", "helo_rules:vrfy", 20, "tempfail")],
    "error": [(0, "tarpit", "tarpit:error", 9, "tempfail")],
}


def smtpgate(tmp_path: Path, *args: str, config: str = CONFIG
             ) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "smtpgate.toml"
    path.write_text(config.replace("{tmp}", str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "smtpgate", "plugins", "-c", str(path), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def parse_text(stdout: str) -> dict[str, list[tuple[int, str, str, float, str]]]:
    """``stage:`` headings, then ``PRIORITY PLUGIN HOOK timeout=Ns on_error=X`` lines."""
    chains: dict[str, list[tuple[int, str, str, float, str]]] = {}
    stage = ""
    for line in stdout.splitlines():
        if not line.startswith(" "):
            assert line.endswith(":"), line
            stage = line[:-1]
            assert stage not in chains, f"{stage} listed twice"
            chains[stage] = []
            continue
        priority, plugin, hook, timeout, on_error = line.split()
        assert timeout.startswith("timeout=") and timeout.endswith("s"), line
        assert on_error.startswith("on_error="), line
        chains[stage].append((int(priority), plugin, hook, float(timeout[8:-1]),
                              on_error[9:]))
    return chains


def test_plugins_text(tmp_path: Path) -> None:
    out = smtpgate(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    chains = parse_text(out.stdout)
    assert chains == EXPECTED
    for hooks in chains.values():  # run order: by priority
        assert [h[0] for h in hooks] == sorted(h[0] for h in hooks)


def test_plugins_json(tmp_path: Path) -> None:
    out = smtpgate(tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    chains: dict[str, list[dict[str, Any]]] = json.loads(out.stdout)
    assert {stage: [(h["priority"], h["plugin"], h["hook"], h["timeout"], h["on_error"])
                    for h in hooks] for stage, hooks in chains.items()} == EXPECTED
    assert set(chains["rcpt"][0]) == {"hook", "plugin", "priority", "timeout", "on_error"}


def test_plugins_stages_in_session_order(tmp_path: Path) -> None:
    """The stages are listed in the order a session meets them ("the whole chain, in
    order"): data_start and headers before data, queue and delivered after it.

    Failed before 2b41e9f: the stages were listed in the old declaration order of
    ``Stage`` (connect, helo, mail, rcpt, data, quit, error, auth, data_start, ...).
    """
    out = smtpgate(tmp_path)
    assert out.returncode == 0, out.stderr
    listed = list(parse_text(out.stdout))
    assert listed == ["connect", "helo", "mail", "rcpt", "data_start", "headers", "data",
                      "queue", "delivered", "vrfy", "error"]


def test_plugins_without_config_lists_the_default_chain(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "smtpgate", "plugins"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert parse_text(out.stdout) == {"rcpt": [(-90, "relay", "relay:rcpt", 30, "tempfail")]}


@pytest.mark.parametrize(("table", "problem"), [
    ('module = "sender_blocklist"\nblocked_senders = ["nope"]',
     "plugin[0].blocked_senders: must be e-mail addresses (local@domain), got 'nope'"),
    ('use = "relay"\nenabled = false',
     "relay control is disabled and no other plugin decides at rcpt"),
])
def test_plugins_config_error(tmp_path: Path, table: str, problem: str) -> None:
    config = f'[maildir]\npath = "{tmp_path}/mail"\n[[plugin]]\n{table}\n'
    out = smtpgate(tmp_path, config=config)
    assert "Traceback" not in out.stderr
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    [line] = out.stderr.splitlines()
    assert line.startswith(f"smtpgate: {tmp_path / 'smtpgate.toml'}: ") and problem in line, line

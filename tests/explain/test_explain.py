"""``smtpgate explain``'s dry run on corpus messages: every plugin and verdict listed in
order, nothing delivered, no greylisting or rate-limit state created; and the decision
record as the hook runner keeps and logs it."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from smtpgate.config import config_from_mapping
from smtpgate.explain import explain
from smtpgate.testing import PluginHarness, make_session, make_transaction

from ..support import CORPUS as CORPUS_DIR

CORPUS = ["cpython__msg_25.eml", "mimekit__messages_simple-multipart.eml",
          "rubymail__fixtures_emails_rfc6532_utf8_headers.eml"]


def _config(tmp_path: Path, maildir: Path) -> dict[str, object]:
    return {
        "maildir": {"path": str(maildir)},
        "relay": {"relay_domains": ["example.com"], "local_networks": ["127.0.0.0/8"]},
        "plugin": [
            {"use": "greylist", "mode": "warn", "store": str(tmp_path / "grey.sqlite")},
            {"use": "ratelimit", "messages_per_client": 1, "window": 60},
            {"use": "authentication-results"},
        ],
    }


@pytest.mark.parametrize("name", CORPUS)
def test_dry_run_lists_every_plugin_and_delivers_nothing(tmp_path: Path, name: str) -> None:
    maildir = tmp_path / "mail"
    cfg = config_from_mapping(_config(tmp_path, maildir))
    message = (CORPUS_DIR / name).read_bytes()
    for _ in range(2):  # the rate limit of 1 message would refuse a second counted run
        result = asyncio.run(explain(cfg, message, client_ip="192.0.2.9",
                                     mail_from="ann@example.org",
                                     recipients=["bob@example.com"], helo="mx.example.org"))
        assert result.outcome == "accepted (dry run: not delivered)", result.text()
    commands = [s.command for s in result.steps]
    assert commands == ["(connect)", "EHLO mx.example.org",
                        f"MAIL FROM:<ann@example.org> SIZE={len(message)}"
                        + (" BODY=8BITMIME" if any(b > 127 for b in message) else ""),
                        "RCPT TO:<bob@example.com>", "DATA", "(message)"]
    by_command = {s.command.split(":")[0].split(" ")[0]: s for s in result.steps}
    assert [(d.stage, d.plugin, d.verdict) for d in by_command["MAIL"].decisions] == [
        ("mail", "ratelimit", "CONT")]
    assert [(d.stage, d.plugin, d.verdict) for d in by_command["RCPT"].decisions] == [
        ("rcpt", "relay", "CONT"), ("rcpt", "greylist", "CONT")]
    assert by_command["RCPT"].decisions[1].findings[0].startswith("greylist=greylisted")
    message_decisions = [(d.stage, d.plugin) for d in by_command["(message)"].decisions]
    assert ("data", "authentication-results") in message_decisions
    assert by_command["(message)"].reply == "250 2.0.0 Dry run: not delivered"
    # nothing delivered, no greylisting triplet stored
    assert not maildir.exists() or not any(maildir.rglob("*/new/*"))
    with sqlite3.connect(tmp_path / "grey.sqlite") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert all(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] == 0 for t in tables)
    text = result.text()
    assert "rcpt       greylist" in text and "outcome: accepted" in text
    assert result.as_dict()["steps"][3]["decisions"][1]["plugin"] == "greylist"  # type: ignore[index]


def test_refusal_is_explained_by_the_plugin_that_made_it(tmp_path: Path) -> None:
    cfg = config_from_mapping(_config(tmp_path, tmp_path / "mail"))
    result = asyncio.run(explain(cfg, b"Subject: x\r\n\r\nbody\r\n", client_ip="192.0.2.9",
                                 mail_from="ann@example.org",
                                 recipients=["bob@elsewhere.example"]))
    assert result.outcome == "refused at RCPT (every recipient)"
    (rcpt,) = [s for s in result.steps if s.command.startswith("RCPT")]
    assert rcpt.reply == "550 5.7.1 Relaying denied"
    assert [(d.plugin, d.verdict, d.reply) for d in rcpt.decisions] == [
        ("relay", "DENY", "550 5.7.1 Relaying denied")]


def test_decision_record_kept_and_logged_at_the_configured_level(
        caplog: pytest.LogCaptureFixture) -> None:
    chain = PluginHarness({"log": {"decisions": "INFO"},
                           "relay": {"relay_domains": ["example.com"]}})
    session = make_session("192.0.2.7")
    tx = make_transaction("a@example.org")
    with caplog.at_level(logging.INFO, logger="smtpgate.hooks"):
        chain.run("rcpt", session, tx, "b@elsewhere.example")
    (decision,) = session.decisions
    assert (decision.stage, decision.plugin, decision.verdict, decision.reply,
            decision.transaction) == ("rcpt", "relay", "DENY", "550 5.7.1 Relaying denied",
                                      tx.id)
    (line,) = [r.getMessage() for r in caplog.records if "hook decision" in r.getMessage()]
    assert "plugin=relay" in line and "verdict=DENY" in line and f"tx={tx.id}" in line


def test_cli_prints_the_decisions_and_exits_by_outcome(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    conf = tmp_path / "smtpgate.toml"
    conf.write_text(f'[maildir]\npath = "{tmp_path / "mail"}"\n'
                    '[relay]\nrelay_domains = ["example.com"]\n')
    msg = tmp_path / "msg.eml"
    msg.write_bytes((CORPUS_DIR / CORPUS[0]).read_bytes())
    smtpgate = [sys.executable, "-m", "smtpgate", "explain", "-c", str(conf), str(msg),
                "--client-ip", "192.0.2.9", "--from", "ann@example.org"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    refused = subprocess.run([*smtpgate, "--to", "bob@elsewhere.example"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1, refused.stderr
    assert "    rcpt       relay                    DENY 550 5.7.1 Relaying denied" \
        in refused.stdout
    assert refused.stdout.endswith("outcome: refused at RCPT (every recipient)\n")
    accepted = subprocess.run([*smtpgate, "--to", "bob@example.com", "--json"],
                              capture_output=True, text=True, timeout=60, env=env)
    assert accepted.returncode == 0, accepted.stderr
    report = json.loads(accepted.stdout)
    assert report["outcome"] == "accepted (dry run: not delivered)"
    assert [s["command"][:4] for s in report["steps"]] == ["(con", "EHLO", "MAIL", "RCPT",
                                                           "DATA", "(mes"]
    assert not (tmp_path / "mail").exists() or not any((tmp_path / "mail").rglob("new/*"))
    bad = subprocess.run([*smtpgate[:-4], "--client-ip", "300.1.1.1", "--from", "a@b",
                          "--to", "c@d"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2
    assert bad.stderr == "smtpgate: --client-ip: not an IP address: '300.1.1.1'\n"

"""``smtpgate scan|train|scanner versions`` against the real daemons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import CORPUS


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], capture_output=True,
                          text=True, timeout=120)


def config(tmp_path: Path, body: str) -> str:
    p = tmp_path / "smtpgate.toml"
    p.write_text(body)
    return str(p)


def test_scan_spam_and_versions(tmp_path: Path, spamd_server: str, clamd_server) -> None:
    cfg = config(tmp_path, f"""
[[scanner]]
type = "spamassassin"
address = "{spamd_server}"

[[scanner]]
type = "clamav"
address = "{clamd_server.host}:{clamd_server.port}"
""")
    gtube = CORPUS / "rspamd__functional_messages_gtube.eml"
    out = run("scan", "spam", str(gtube), "-c", cfg)
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith("spamassassin: spam score=1000.00 required=5.00")
    assert "GTUBE" in out.stdout
    clean = run("scan", "spam", str(CORPUS / "debian-sa__sample-nonspam.eml"), "-c", cfg)
    assert clean.returncode == 0 and clean.stdout.startswith("spamassassin: clean")
    virus = run("scan", "virus", str(CORPUS / "eicar__built_attachment.eml"), "-c", cfg)
    assert virus.returncode == 1
    assert "clamav: infected symbols=Smtpgate.Test.EICAR.UNOFFICIAL" in virus.stdout
    versions = run("scanner", "versions", "-c", cfg)
    assert versions.returncode == 0
    assert "spamassassin: SpamAssassin" in versions.stdout
    assert "clamav: ClamAV" in versions.stdout
    msg = tmp_path / "ham.eml"
    msg.write_bytes(b"Subject: cli train\n\nthe cli trains this message 7311\n")
    trained = run("train", "ham", str(msg), "-c", cfg)
    assert trained.returncode == 0
    assert trained.stdout.strip() in ("spamassassin: DidSet: local", "spamassassin: unchanged")


def test_scan_without_scanner_or_daemon(tmp_path: Path) -> None:
    empty = config(tmp_path, "")
    out = run("scan", "spam", str(CORPUS / "debian-sa__sample-nonspam.eml"), "-c", empty)
    assert out.returncode == 2 and "no [[scanner]]" in out.stderr
    down = config(tmp_path, '[[scanner]]\ntype = "spamassassin"\naddress = "127.0.0.1:9"\n')
    out = run("scan", "spam", str(CORPUS / "debian-sa__sample-nonspam.eml"), "-c", down)
    assert out.returncode == 3 and "scanner error" in out.stderr

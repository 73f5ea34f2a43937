"""The ``dkim`` plugin (RFC 6376, RFC 8463) and ``smtpgate dkim keygen``: keys the tests
generate, published by a real DNS server on loopback (tests/delivery/dns_server.py), mail
signed by smtpgate verified by dkimpy, mail signed by dkimpy verified by smtpgate."""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import dkim
import pytest

from smtpgate.dkimkeys import generate_key, load_key
from smtpgate.envelope import Envelope
from tests.policy_auth.support import ThreadedDns
from tests.support import CORPUS

MSG = (b"From: Ann <ann@example.org>\r\nTo: bob@example.net\r\nSubject: dkim test\r\n"
       b"Message-ID: <dkim1@example.org>\r\n\r\nHello Bob,\r\n\r\nsee you.\r\n")
TXT_RE = re.compile(r'^(\S+)\. IN TXT (.*)$')


def _txt_value(record: str) -> tuple[str, str]:
    m = TXT_RE.match(record)
    assert m, record
    return m.group(1), m.group(2)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    key_dir = tmp_path / "keys"
    _, rsa_rec = generate_key(key_dir, "example.org", "rsa1", bits=1024)
    _, ed_rec = generate_key(key_dir, "example.org", "ed1", algorithm="ed25519")
    records = dict(_txt_value(r) for r in (rsa_rec, ed_rec))
    return {"dir": key_dir, "records": records}


def _dnsfunc(records: dict[str, str]) -> Any:
    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        value = records.get(name.decode().rstrip("."))
        return None if value is None else "".join(re.findall(r'"([^"]*)"', value)).encode()
    return txt


def _zone(records: dict[str, str]) -> dict[tuple[str, str], list[str]]:
    return {(name, "TXT"): [value] for name, value in records.items()}


def _send(port: int, msg: bytes, sender: str = "ann@example.org") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        assert c.sendmail(sender, ["bob@example.net"], msg) == {}


def test_keygen_cli(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "smtpgate", "dkim", "keygen", "example.org", "sel",
           "--key-dir", str(tmp_path), "--bits", "1024"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    name, value = _txt_value(out.stdout.strip())
    assert name == "sel._domainkey.example.org" and value.startswith('"v=DKIM1; k=rsa; p=')
    key = tmp_path / "example.org" / "sel.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert load_key(tmp_path, "example.org", "sel").algorithm == b"rsa-sha256"
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    ed = subprocess.run([sys.executable, "-m", "smtpgate", "dkim", "keygen", "example.org",
                         "ed", "--key-dir", str(tmp_path), "--algorithm", "ed25519"],
                        capture_output=True, text=True, timeout=60)
    assert ed.returncode == 0 and "k=ed25519; p=" in ed.stdout
    assert load_key(tmp_path, "example.org", "ed").algorithm == b"ed25519-sha256"


@pytest.mark.parametrize("selector", ["rsa1", "ed1"])
def test_signed_by_smtpgate_verifies(run_app, keys: dict[str, Any], selector: str) -> None:
    got: list[bytes] = []

    def deliver(envelope: Envelope, message: bytes) -> None:
        got.append(message)

    app = run_app({"plugin": [{"use": "dkim", "verify": False, "sign_domains": ["example.org"],
                               "key_dir": str(keys["dir"]), "selector": selector}]},
                  deliver=deliver)
    _send(app.port, MSG)
    [delivered] = got
    body = re.sub(rb"^Received:.*?\r\n(?![ \t])", b"", delivered, count=1, flags=re.S)
    assert body.startswith(b"DKIM-Signature:"), body[:200]
    assert f"s={selector}".encode() in body and b"d=example.org" in body
    assert dkim.verify(body, dnsfunc=_dnsfunc(keys["records"]))


def test_not_signed_for_outside_clients_or_other_domains(run_app, keys: dict[str, Any]) -> None:
    got: list[bytes] = []
    table = {"use": "dkim", "verify": False, "sign_domains": ["example.org"],
             "key_dir": str(keys["dir"]), "selector": "rsa1"}
    app = run_app({"relay": {"local_networks": ["192.0.2.0/24"],
                             "relay_domains": ["example.net"]}, "plugin": [table]},
                  deliver=lambda e, m: got.append(m))
    _send(app.port, MSG)  # 127.0.0.1 is not a local network here, and not authenticated
    other = run_app({"plugin": [table]}, deliver=lambda e, m: got.append(m))
    _send(other.port, MSG.replace(b"ann@example.org", b"ann@example.com"))
    assert len(got) == 2 and all(b"DKIM-Signature" not in m for m in got)


def _capture_results(app: Any) -> list[Any]:
    seen: list[Any] = []

    def hook(session: Any, tx: Any) -> None:
        seen.append(tx.results.get("dkim"))

    app.hooks.register("data", hook)
    return seen


def test_verify_pass_fail_none_temperror(run_app, keys: dict[str, Any]) -> None:
    key = load_key(keys["dir"], "example.org", "rsa1")
    sig = dkim.sign(MSG, b"rsa1", b"example.org", key.private)
    signed = sig + MSG
    with ThreadedDns(_zone(keys["records"]), drop=["slow._domainkey.example.org"]) as dns:
        app = run_app({"dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 0.5,
                               "lifetime": 1},
                       "plugin": [{"use": "dkim"}]}, deliver=lambda e, m: None)
        seen = _capture_results(app)
        _send(app.port, signed)
        _send(app.port, signed.replace(b"see you.", b"see you!"))
        _send(app.port, MSG)
        slow = dkim.sign(MSG, b"slow", b"example.org", key.private)
        _send(app.port, slow + MSG)
    assert [f.result for f in seen] == ["pass", "fail", "none", "temperror"]
    assert seen[0].details["pass_domains"] == ["example.org"]
    assert seen[1].details["signatures"] == ["example.org:rsa1=fail"]


def _corpus_signed() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    out = []
    for p in sorted(CORPUS.glob("*.eml")):
        head = p.read_bytes()[:20000]
        if re.search(rb"(?im)^DKIM-Signature:", head):
            out.append(p)
    return out[:8]


@pytest.mark.skipif(not _corpus_signed(), reason="no DKIM-signed corpus message")
def test_corpus_results_match_dkimpy(run_app) -> None:
    """Real signed messages, their keys absent from the test DNS: smtpgate's result per
    signature (through the server and the DNS) is what the verification gives directly
    without any DNS; none of them can pass."""
    from smtpgate.plugins.dkim import _verify

    with ThreadedDns({("nothing.org", "TXT"): ['"x"']}) as dns:
        app = run_app({"dns": {"nameservers": [f"127.0.0.1:{dns.port}"]},
                       "plugin": [{"use": "dkim"}]}, deliver=lambda e, m: None)
        seen = _capture_results(app)
        for path in _corpus_signed():
            msg = re.sub(rb"\r?\n", b"\r\n", path.read_bytes())
            if not msg.endswith(b"\r\n"):
                msg += b"\r\n"
            with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
                c.sendmail("a@example.org", ["b@example.net"], msg,
                           mail_options=[] if msg.isascii() else ["BODY=8BITMIME"])
            count = len(re.findall(rb"(?im)^DKIM-Signature:", msg.split(b"\r\n\r\n")[0]))
            direct = _verify(msg, count, None)
            assert seen[-1].details["signatures"] == [f"{d}:{s}={r}" for d, s, r in direct]
            assert seen[-1].result != "pass"


def test_bad_options(run_app, tmp_path: Path) -> None:
    from smtpgate.errors import ConfigError

    with pytest.raises(ConfigError, match="signing needs key_dir and selector"):
        run_app({"plugin": [{"use": "dkim", "sign_domains": ["example.org"]}]})
    with pytest.raises(ConfigError, match="cannot read the DKIM key"):
        run_app({"plugin": [{"use": "dkim", "sign_domains": ["example.org"],
                             "key_dir": str(tmp_path), "selector": "none"}]})



def test_messages_dkimpy_cannot_parse_are_delivered(run_app, keys: dict[str, Any]) -> None:
    """Bad input is normal input: a header block dkimpy cannot parse neither fails the
    transaction nor stops delivery (verify: permerror; sign: delivered unsigned)."""
    got: list[bytes] = []
    odd = b" folded first line\r\n" + MSG
    app = run_app({"plugin": [{"use": "dkim", "sign_domains": ["example.org"],
                               "key_dir": str(keys["dir"]), "selector": "rsa1"}]},
                  deliver=lambda e, m: got.append(m))
    seen = _capture_results(app)
    signed = dkim.sign(MSG, b"rsa1", b"example.org",
                       load_key(keys["dir"], "example.org", "rsa1").private)
    _send(app.port, signed + odd)
    assert len(got) == 1
    assert seen[0].result == "permerror"

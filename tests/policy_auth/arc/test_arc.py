"""The ``arc`` plugin (RFC 8617): a message sealed by smtpgate verifies with dkimpy; a
chain sealed by dkimpy verifies in smtpgate (keys published by a loopback DNS server)."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import dkim
import pytest

from smtpgate.dkimkeys import generate_key, load_key
from tests.policy_auth.support import ThreadedDns

MSG = (b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: arc\r\n"
       b"Message-ID: <arc@example.org>\r\n\r\nbody\r\n")


@pytest.fixture
def sealer(tmp_path: Path) -> dict[str, Any]:
    _, record = generate_key(tmp_path / "keys", "example.org", "arc1", bits=1024)
    name, value = record.split(" IN TXT ", 1)
    return {"dir": tmp_path / "keys", "zone": {(name.rstrip("."), "TXT"): [value]},
            "txt": "".join(value.split('"')[1::2]).encode()}


def _dnsfunc(sealer: dict[str, Any]) -> Any:
    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        return sealer["txt"] if name.decode().rstrip(".") == "arc1._domainkey.example.org" \
            else None
    return txt


def test_sealed_by_smtpgate_verifies(run_app, sealer: dict[str, Any]) -> None:
    got: list[bytes] = []
    with ThreadedDns(sealer["zone"]) as dns:
        app = run_app({"dns": {"nameservers": [f"127.0.0.1:{dns.port}"]},
                       "plugin": [{"use": "authentication-results"},
                                  {"use": "arc", "seal": True, "domain": "example.org",
                                   "selector": "arc1", "key_dir": str(sealer["dir"])}]},
                      deliver=lambda e, m: got.append(m))
        seen: list[Any] = []
        app.hooks.register("data", lambda s, tx: seen.append(tx.results.get("arc")))
        with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
            assert c.sendmail("a@example.org", ["b@example.net"], MSG) == {}
    assert seen[0].result == "none"
    delivered = got[0].split(b"\r\n", 1)[1]  # without smtpgate's Received line
    while delivered.startswith((b"\t", b" ")):
        delivered = delivered.split(b"\r\n", 1)[1]
    assert delivered.startswith(b"ARC-Seal: i=1;"), delivered[:100]
    cv, _, reason = dkim.arc_verify(delivered, dnsfunc=_dnsfunc(sealer))
    assert cv == b"pass", reason


def test_chain_sealed_elsewhere_verifies_and_shows_in_ar(run_app, sealer: dict[str, Any]
                                                        ) -> None:
    key = load_key(sealer["dir"], "example.org", "arc1")
    first = b"Authentication-Results: relay.example.org; spf=pass smtp.mailfrom=example.org\r\n"
    sealed = b"".join(dkim.arc_sign(first + MSG, b"arc1", b"example.org", key.private,
                                    b"relay.example.org")) + first + MSG
    got: list[bytes] = []
    with ThreadedDns(sealer["zone"]) as dns:
        app = run_app({"dns": {"nameservers": [f"127.0.0.1:{dns.port}"]},
                       "plugin": [{"use": "authentication-results"}, {"use": "arc"}]},
                      deliver=lambda e, m: got.append(m))
        with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
            assert c.sendmail("a@example.org", ["b@example.net"], sealed) == {}
            broken = sealed.replace(b"\r\n\r\nbody", b"\r\n\r\nchanged body")
            assert c.sendmail("a@example.org", ["b@example.net"], broken) == {}
    assert b"arc=pass" in got[0] and b"arc=fail" in got[1]


def test_sealing_needs_its_parts(run_app, sealer: dict[str, Any]) -> None:
    from smtpgate.errors import ConfigError

    with pytest.raises(ConfigError, match="authentication-results"):
        run_app({"plugin": [{"use": "arc", "seal": True, "domain": "example.org",
                             "selector": "arc1", "key_dir": str(sealer["dir"])}]})
    with pytest.raises(ConfigError, match="needed to seal"):
        run_app({"plugin": [{"use": "authentication-results"}, {"use": "arc", "seal": True}]})

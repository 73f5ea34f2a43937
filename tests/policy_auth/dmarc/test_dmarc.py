"""The ``dmarc`` plugin (RFC 7489) against DMARC records served by a real DNS server on
loopback: alignment with the SPF finding and with a DKIM signature the ``dkim`` plugin
verified, p/sp/pct, strict alignment, the local override, hyphenated domains."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import dkim
import pytest

from smtpgate.dkimkeys import generate_key, load_key
from smtpgate.plugins.dmarc import aligned, organizational_domain, parse_record
from tests.policy_auth.support import ThreadedDns

ZONE = {
    ("_dmarc.example.org", "TXT"): ['"v=DMARC1; p=reject; sp=none"'],
    ("_dmarc.strict.org", "TXT"): ['"v=DMARC1; p=reject; aspf=s; adkim=s"'],
    ("_dmarc.dmarc-reject.test", "TXT"): ['"v=DMARC1; p=reject"'],
    ("_dmarc.sampled.org", "TXT"): ['"v=DMARC1; p=quarantine; pct=0"'],
    ("_dmarc.broken.org", "TXT"): ['"v=spf1 -all"'],
}


def message(from_: str) -> bytes:
    return (f"From: {from_}\r\nTo: bob@example.net\r\nSubject: dmarc\r\n"
            "Message-ID: <d@x>\r\n\r\nbody\r\n").encode()


@pytest.fixture
def dns_server() -> Any:
    with ThreadedDns(dict(ZONE), zone="test") as server:
        yield server


def start(run_app: Any, dns_server: Any, tmp_path: Path, spf: tuple[str, str] | None,
          **options: Any) -> tuple[Any, list[bytes], list[Any]]:
    got: list[bytes] = []
    seen: list[Any] = []
    app = run_app({"dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 1},
                   "plugin": [{"use": "dkim"}, {"use": "dmarc", **options}]},
                  deliver=lambda e, m: got.append(m))
    if spf is not None:  # what the spf plugin records (result, identity domain)
        def mail(session: Any, tx: Any) -> None:
            tx.results.add("spf", spf[0], identity="mailfrom", domain=spf[1])

        app.hooks.register("mail", mail)
    app.hooks.register("data", lambda s, tx: seen.append(tx.results.get("dmarc")))
    return app, got, seen


def send(app: Any, msg: bytes, sender: str = "bounce@bounce.example.org") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail(sender)
        c.rcpt("bob@example.net")
        return c.data(msg)


def test_record_parsing_and_alignment() -> None:
    assert parse_record("v=DMARC1; p=reject; pct=50") == {"v": "DMARC1", "p": "reject",
                                                          "pct": "50"}
    assert parse_record("v=spf1 -all") is None
    assert organizational_domain("mail.dmarc-reject.test") == "dmarc-reject.test"
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert aligned("bounce.example.org", "example.org", strict=False)
    assert not aligned("bounce.example.org", "example.org", strict=True)
    assert not aligned("example.com", "example.org", strict=False)


def test_aligned_spf_pass(run_app, dns_server, tmp_path: Path) -> None:
    app, got, seen = start(run_app, dns_server, tmp_path, ("pass", "bounce.example.org"))
    assert send(app, message("Ann <ann@example.org>"))[0] == 250
    assert seen[0].result == "pass" and seen[0].details["spf_aligned"] is True
    assert len(got) == 1


def test_unaligned_fail_with_p_reject(run_app, dns_server, tmp_path: Path) -> None:
    app, got, seen = start(run_app, dns_server, tmp_path, ("pass", "elsewhere.com"))
    code, text = send(app, message("ann@example.org"), sender="x@elsewhere.com")
    assert (code, text[:5]) == (550, b"5.7.1") and b"example.org" in text
    assert got == [] and seen == []  # refused before the later data hooks


def test_hyphenated_domain_is_not_cut(run_app, dns_server, tmp_path: Path) -> None:
    """authheaders 0.16.3 takes x@dmarc-reject.test for the domain "dmarc" (no record:
    none); the whole domain must be used."""
    app, got, seen = start(run_app, dns_server, tmp_path, ("fail", "dmarc-reject.test"))
    code, text = send(app, message("x@dmarc-reject.test"), sender="x@dmarc-reject.test")
    assert code == 550 and b"policy of dmarc-reject.test" in text


def test_subdomain_policy_sp(run_app, dns_server, tmp_path: Path) -> None:
    app, got, seen = start(run_app, dns_server, tmp_path, ("fail", "sub.example.org"))
    assert send(app, message("ann@sub.example.org"), sender="a@sub.example.org")[0] == 250
    assert (seen[0].result, seen[0].details["policy"]) == ("fail", "none")


def test_pct_zero_steps_down(run_app, dns_server, tmp_path: Path) -> None:
    app, got, seen = start(run_app, dns_server, tmp_path, ("fail", "sampled.org"))
    assert send(app, message("ann@sampled.org"), sender="a@sampled.org")[0] == 250
    assert (seen[0].details["policy"], seen[0].details["disposition"]) == ("quarantine", "none")


def test_strict_alignment(run_app, dns_server, tmp_path: Path) -> None:
    app, got, seen = start(run_app, dns_server, tmp_path, ("pass", "bounce.strict.org"))
    assert send(app, message("ann@strict.org"), sender="a@bounce.strict.org")[0] == 550


def test_local_override_tag_and_quarantine(run_app, dns_server, tmp_path: Path) -> None:
    app, got, seen = start(run_app, dns_server, tmp_path, ("fail", "example.org"),
                           on_reject="tag")
    assert send(app, message("ann@example.org"), sender="a@example.org")[0] == 250
    assert seen[0].details["action"] == "tag" and len(got) == 1
    qdir = tmp_path / "quarantine"
    app, got, seen = start(run_app, dns_server, tmp_path, ("fail", "example.org"),
                           on_reject="quarantine", quarantine_path=str(qdir))
    assert send(app, message("ann@example.org"), sender="a@example.org")[0] == 250
    assert got == [] and len(list((qdir / "new").iterdir())) == 1


def test_dkim_aligned_pass(run_app, dns_server, tmp_path: Path) -> None:
    _, record = generate_key(tmp_path / "k", "example.org", "s1", bits=1024)
    value = record.split(" IN TXT ", 1)[1]
    dns_server.server.records[("s1._domainkey.example.org", "TXT")] = [value]
    dns_server.server.names.add("s1._domainkey.example.org")
    key = load_key(tmp_path / "k", "example.org", "s1")
    app, got, seen = start(run_app, dns_server, tmp_path, ("fail", "elsewhere.com"))
    msg = message("ann@example.org")
    signed = dkim.sign(msg, b"s1", b"example.org", key.private) + msg
    assert send(app, signed, sender="a@elsewhere.com")[0] == 250
    assert seen[0].result == "pass" and seen[0].details["dkim_aligned"] is True


@pytest.mark.parametrize("from_,result", [
    ("", "permerror"),
    ("a@example.org, b@example.com", "permerror"),
    ("ann@norecord.org", "none"),
    ("ann@broken.org", "none"),
])
def test_no_policy_cases_deliver(run_app, dns_server, tmp_path: Path, from_: str,
                                 result: str) -> None:
    app, got, seen = start(run_app, dns_server, tmp_path, ("fail", "x.org"))
    msg = message(from_) if from_ else b"To: bob@example.net\r\nSubject: x\r\n\r\nbody\r\n"
    assert send(app, msg)[0] == 250
    assert seen[0].result == result and len(got) == 1


def test_quarantine_needs_a_path(run_app) -> None:
    from smtpgate.errors import ConfigError

    with pytest.raises(ConfigError, match="quarantine_path"):
        run_app({"plugin": [{"use": "dmarc", "on_reject": "quarantine"}]})


def test_warn_mode_refuses_nothing(run_app, dns_server, tmp_path: Path) -> None:
    app, got, seen = start(run_app, dns_server, tmp_path, ("fail", "example.org"), mode="warn")
    assert send(app, message("ann@example.org"), sender="a@example.org")[0] == 250
    assert (seen[0].result, seen[0].details["disposition"]) == ("fail", "reject")


def test_international_domains_align_in_a_label_form() -> None:
    from smtpgate.plugins.dmarc import a_label

    assert a_label("bücher.example") == "xn--bcher-kva.example"
    assert aligned("xn--bcher-kva.example", "Bücher.example", strict=True)

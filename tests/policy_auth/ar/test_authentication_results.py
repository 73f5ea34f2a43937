"""``authentication-results`` (RFC 8601): one header with every method's result under this
host's authserv-id; forged headers claiming our authserv-id removed, others kept in place."""

from __future__ import annotations

import re
import smtplib
from typing import Any

from smtpgate.hooks import Transaction
from smtpgate.results import Results

MSG = (b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=evil.example\r\n"
       b"From: ann@example.org\r\n"
       b"Authentication-Results: other.example; dkim=pass header.d=example.org\r\n"
       b"authentication-results: MX.TEST;\r\n dkim=pass\r\n"
       b"Subject: ar\r\n\r\nbody\r\n")


def _record(spf: bool = True) -> Any:
    def data(session: Any, tx: Transaction) -> None:
        if spf:
            tx.results.add("spf", "pass", identity="mailfrom", domain="bounce.example.org")
        tx.results.add("dkim", "pass", signatures=["example.org:s1=pass", "x.example:s=fail"],
                       pass_domains=["example.org"])
        tx.results.add("dmarc", "pass", header_from="example.org", policy="reject")
    return data


def test_one_header_with_every_method_and_no_forged_ones(run_app) -> None:
    got: list[bytes] = []
    app = run_app({"plugin": [{"use": "authentication-results"}]},
                  deliver=lambda e, m: got.append(m))
    app.hooks.register("data", _record())
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        assert c.sendmail("a@bounce.example.org", ["b@example.net"], MSG) == {}
    [msg] = got
    head = msg.split(b"\r\n\r\n", 1)[0]
    fields = re.findall(rb"(?im)^authentication-results:.*?(?=\r\n(?![ \t]))", head, re.S)
    assert len(fields) == 2, fields  # ours, and other.example's (kept)
    ours = fields[0].decode()
    assert ours.startswith("Authentication-Results: mx.test;")
    flat = re.sub(r"\s+", " ", ours)
    assert "spf=pass smtp.mailfrom=bounce.example.org" in flat
    assert "dkim=pass header.d=example.org header.s=s1" in flat
    assert "dkim=fail header.d=x.example header.s=s" in flat
    assert "dmarc=pass (p=reject) header.from=example.org" in flat
    assert b"other.example; dkim=pass" in fields[1]
    assert b"evil.example" not in head and b"MX.TEST" not in head
    # the kept foreign header did not move: still after From
    assert head.index(b"From: ann@example.org") < head.index(b"other.example")


def test_none_without_findings(run_app) -> None:
    got: list[bytes] = []
    app = run_app({"plugin": [{"use": "authentication-results", "authserv_id": "gw.example"}]},
                  deliver=lambda e, m: got.append(m))
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        c.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nbody\r\n")
    assert b"Authentication-Results: gw.example;\r\n\tnone\r\n" in got[0]


def test_remove_header_where_keeps_the_others_in_place() -> None:
    from smtpgate.envelope import Envelope

    tx = Transaction(Envelope("a@example.org"), "T1")
    tx.message = b"X-A: 1\r\nX-B: keep\r\nX-A: 2\r\nX-B: drop\r\nX-C: 3\r\n\r\nbody\r\n"
    assert tx.remove_header("X-B", where=lambda v: v == "drop") == 1
    assert tx.raw == b"X-A: 1\r\nX-B: keep\r\nX-A: 2\r\nX-C: 3\r\n\r\nbody\r\n"
    assert isinstance(tx.results, Results)


def test_results_that_are_not_rfc_8601_results_are_left_out(run_app) -> None:
    got: list[bytes] = []
    app = run_app({"plugin": [{"use": "authentication-results"}]},
                  deliver=lambda e, m: got.append(m))

    def data(session: Any, tx: Transaction) -> None:
        tx.results.add("spf", "skipped", reason="local-network")

    app.hooks.register("data", data)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        c.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nbody\r\n")
    assert b"Authentication-Results: mx.test;\r\n\tnone\r\n" in got[0]

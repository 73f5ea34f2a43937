"""Every stage a plugin can hook, over real sockets (issue 9, "Stages"): data_start (DATA
and BDAT), headers, rset, auth, vrfy/expn, unknown, queue (a plugin taking the message)
and delivered (per-recipient outcomes in local, proxy and queue mode).

The plugin is tests/plugins/probe.py, enabled with a ``[[plugin]]`` table; it records
every call in a JSON-lines file and answers as its options say.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from smtpgate.auth.users import add_user
from tests.support import Capture

from .conftest import Records, probe

MSG = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: stages\r\n\r\nbody\r\n"


def plugins(*tables: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {"plugin": list(tables), **sections}


def start_tx(c: Any, sender: str = "a@example.org", *rcpts: str) -> None:
    c.cmd("EHLO client.test")
    assert c.cmd(f"MAIL FROM:<{sender}>").startswith(b"250")
    for rcpt in rcpts or ("b@example.com",):
        assert c.cmd(f"RCPT TO:<{rcpt}>").startswith(b"250")


def data(c: Any, message: bytes = MSG) -> bytes:
    assert c.cmd("DATA").startswith(b"354")
    c.send(message + b".\r\n")
    return bytes(c.read_reply())


# ---------------------------------------------------------------- data_start


@pytest.mark.parametrize("answer", ["554 5.7.1 No DATA from you", "451 4.7.1 Not now"])
def test_data_start_refuses_data(run_app, raw, capture: Capture, records: Records,
                                 answer: str) -> None:
    app = run_app(plugins(probe(records, stages=["data_start"],
                                answers={"data_start": answer},
                                when={"data_start": "nodata@"})), deliver=capture)
    c = raw(app.port)
    start_tx(c, "nodata@example.org", "b@example.com", "c@example.com")
    assert c.cmd("DATA") == answer.encode()
    [seen] = records.all("data_start")
    assert (seen["subject"], seen["rcpts"]) == ("nodata@example.org",
                                                ["b@example.com", "c@example.com"])
    assert c.cmd("RSET").startswith(b"250")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<b@example.com>").startswith(b"250")
    assert data(c).startswith(b"250 ")  # not this sender: 354 and delivered
    assert [env.mail_from for env, _ in capture.messages] == ["a@example.org"]
    assert len(records.all("data_start")) == 2


def test_data_start_refuses_bdat(run_app, raw, capture: Capture, records: Records) -> None:
    """The stage runs at the first BDAT of a transaction too (Stage.DATA_START: "at DATA
    or the first BDAT"); otherwise a client skips the check by using CHUNKING.

    Failed before d42d73b: the core answered BDAT itself (no event for the driver), so
    data_start never ran for BDAT and the message was delivered.
    """
    app = run_app(plugins(probe(records, stages=["data_start"],
                                answers={"data_start": "554 5.7.1 No DATA from you"})),
                  deliver=capture)
    c = raw(app.port)
    start_tx(c)
    body = MSG
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    reply = c.read_reply()
    assert len(records.all("data_start")) == 1
    assert reply == b"554 5.7.1 No DATA from you"
    assert capture.messages == []
    assert c.cmd("RSET").startswith(b"250")  # in step: the chunk was consumed


# ------------------------------------------------------------------- headers


def test_headers_stage_rejects_on_a_header(run_app, raw, capture: Capture,
                                           records: Records) -> None:
    app = run_app(plugins(probe(records, stages=["headers", "data"],
                                answers={"headers": "550 5.7.1 X-Bad messages refused"},
                                when={"headers": "X-Bad: yes"})), deliver=capture)
    c = raw(app.port)
    start_tx(c)
    bad = MSG.replace(b"Subject:", b"X-Bad: yes\r\nSubject:")
    assert data(c, bad) == b"550 5.7.1 X-Bad messages refused"
    assert capture.messages == []
    # the header block only (the body is not part of it); the data stage did not run
    assert [r["stage"] for r in records.all()] == ["headers"]
    block = records.all("headers")[0]["subject"]
    assert "X-Bad: yes\r\n" in block and "body" not in block
    start_tx(c)
    assert data(c).startswith(b"250 ")
    assert len(capture.messages) == 1
    assert [r["stage"] for r in records.all()] == ["headers", "headers", "data"]


def test_ok_skips_the_rest_of_that_stage_only(run_app, raw, capture: Capture,
                                              records: Records) -> None:
    """OK at headers ends the headers chain; the data chain still runs (and may refuse)."""
    app = run_app(plugins(
        probe(records, name="early", stages=["headers"],
              answers={"headers": "250 2.0.0 headers fine"}, priority=-10),
        probe(records, name="late", stages=["headers", "data"],
              answers={"data": "550 5.7.1 refused at data"}, priority=10),
    ), deliver=capture)
    c = raw(app.port)
    start_tx(c)
    assert data(c) == b"550 5.7.1 refused at data"
    assert [(r["plugin"], r["stage"]) for r in records.all()] == [
        ("early", "headers"), ("late", "data")]
    assert capture.messages == []


# ---------------------------------------------------------------------- rset


def test_rset_notification(run_app, raw, records: Records) -> None:
    # the verdict of a notification stage is ignored: RSET still succeeds
    app = run_app(plugins(probe(records, stages=["rset"],
                                answers={"rset": "550 5.7.1 ignored"})))
    c = raw(app.port)
    start_tx(c)
    assert c.cmd("RSET") == b"250 2.0.0 Reset OK"
    assert c.cmd("RSET") == b"250 2.0.0 Reset OK"
    seen = records.all("rset")
    assert len(seen) == 2 and seen[0]["session"] == seen[1]["session"]


# ---------------------------------------------------------------------- auth


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    path = tmp_path / "users.txt"
    add_user(path, "alice", "s3cret!")
    add_user(path, "bob", "hunter2!")
    return str(path)


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_auth_plugin_refuses_a_correct_login(run_app, raw, records: Records,
                                             users_file: str) -> None:
    app = run_app(plugins(
        probe(records, stages=["auth", "rcpt"], priorities={"rcpt": -100},
              answers={"auth": "535 5.7.8 Not today, alice"}, when={"auth": "alice"}),
        auth={"users_file": users_file, "require_tls": False},
        relay={"local_networks": [], "relay_domains": ["example.com"]},
    ))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd(plain("alice", "s3cret!")) == b"535 5.7.8 Not today, alice"
    [seen] = records.all("auth")
    assert (seen["username"], seen["mechanism"], seen["success"]) == ("alice", "PLAIN", True)
    # not authenticated: relaying is still refused
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<x@elsewhere.example>") == b"550 5.7.1 Relaying denied"
    assert records.all("rcpt")[-1]["auth_user"] is None

    c2 = raw(app.port)
    c2.cmd("EHLO client.test")
    assert c2.cmd(plain("bob", "wrong")) == b"535 5.7.8 Authentication credentials invalid"
    assert records.all("auth")[-1]["success"] is False
    assert c2.cmd(plain("bob", "hunter2!")) == b"235 2.7.0 Authentication successful"
    assert records.all("auth")[-1]["success"] is True
    assert c2.cmd("MAIL FROM:<bob@example.org>").startswith(b"250")
    assert c2.cmd("RCPT TO:<x@elsewhere.example>").startswith(b"250")
    assert records.all("rcpt")[-1]["auth_user"] == "bob"


# ---------------------------------------------------------------- vrfy / expn


def test_vrfy_and_expn_answered_by_a_plugin(run_app, raw, records: Records) -> None:
    app = run_app(plugins(
        probe(records, name="directory", stages=["vrfy"],
              answers={"vrfy": "250 2.1.5 Alice <alice@example.com>"},
              when={"vrfy": "alice"}),
        probe(records, name="refuser", stages=["vrfy"],
              answers={"vrfy": "550 5.1.1 No such user here"}, when={"vrfy": "nobody"}),
        server={"vrfy": True, "expn": True},
    ))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("VRFY <alice@example.com>") == b"250 2.1.5 Alice <alice@example.com>"
    assert c.cmd("VRFY nobody@example.com") == b"550 5.1.1 No such user here"
    assert c.cmd("VRFY carol@example.com").startswith(b"252 2.5.0 ")  # no opinion
    assert c.cmd("EXPN alice-list").startswith(b"250 2.1.5 Alice")
    seen = [(r["plugin"], r["subject"], r["kind"]) for r in records.all("vrfy")]
    assert seen == [
        ("directory", "alice@example.com", "vrfy"),
        ("directory", "nobody@example.com", "vrfy"), ("refuser", "nobody@example.com", "vrfy"),
        ("directory", "carol@example.com", "vrfy"), ("refuser", "carol@example.com", "vrfy"),
        ("directory", "alice-list", "expn"),
    ]


def test_vrfy_disabled_does_not_ask_plugins(run_app, raw, records: Records) -> None:
    app = run_app(plugins(probe(records, stages=["vrfy"],
                                answers={"vrfy": "250 2.1.5 Alice <alice@example.com>"})))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("VRFY alice@example.com").startswith(b"252 2.5.0 ")
    assert records.all("vrfy") == []


# ------------------------------------------------------------------- unknown


def test_unknown_command_answered_by_a_plugin(run_app, raw, records: Records) -> None:
    """Needs the ``unknown`` stage wired in the driver (protocol event UnknownCommand)."""
    app = run_app(plugins(probe(records, stages=["unknown"],
                                answers={"unknown": "250 2.0.0 XFOO done"},
                                when={"unknown": "XFOO"})))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("XFOO bar baz") == b"250 2.0.0 XFOO done"
    assert c.cmd("XBAR") == b"500 5.5.1 Command unrecognized"
    assert [(r["verb"], r["subject"]) for r in records.all("unknown")] == [
        ("XFOO", "XFOO bar baz"), ("XBAR", "XBAR")]
    assert c.cmd("NOOP").startswith(b"250")  # the session goes on


# --------------------------------------------------------------------- queue


def test_queue_plugin_takes_the_message(run_app, raw, capture: Capture,
                                        records: Records) -> None:
    app = run_app(plugins(probe(records, stages=["queue", "delivered"],
                                answers={"queue": "250 2.0.0 Taken by the archive"},
                                when={"queue": "archive@"})), deliver=capture)
    c = raw(app.port)
    start_tx(c, "archive@example.org")
    assert data(c) == b"250 2.0.0 Taken by the archive"
    assert capture.messages == []
    assert records.all("delivered") == []  # nothing was delivered
    start_tx(c, "a@example.org")
    assert data(c).startswith(b"250 ")
    assert [env.mail_from for env, _ in capture.messages] == ["a@example.org"]
    assert [r["subject"] for r in records.all("queue")] == ["archive@example.org",
                                                           "a@example.org"]


def test_queue_plugin_refuses(run_app, raw, capture: Capture, records: Records) -> None:
    app = run_app(plugins(probe(records, stages=["queue"],
                                answers={"queue": "452 4.3.1 Archive full"})), deliver=capture)
    c = raw(app.port)
    start_tx(c)
    assert data(c) == b"452 4.3.1 Archive full"
    assert capture.messages == []


# ----------------------------------------------------------------- delivered


def delivered(records: Records) -> list[tuple[str, str]]:
    return [(r["subject"], r["reply"]) for r in records.all("delivered")]


def test_delivered_local_maildir(run_app, raw, records: Records, tmp_path: Path) -> None:
    app = run_app(plugins(probe(records, stages=["delivered"])))
    c = raw(app.port)
    start_tx(c, "a@example.org", "b@example.com", "c@example.com")
    reply = data(c)
    assert reply.startswith(b"250 ")
    assert os.listdir(tmp_path / "mail" / "new")
    outcomes = delivered(records)
    assert [rcpt for rcpt, _ in outcomes] == ["b@example.com", "c@example.com"]
    assert all(text == reply.decode()[:len(text)] for _, text in outcomes), outcomes
    assert len({r["transaction"] for r in records.all("delivered")}) == 1


def proxy(port: int) -> dict[str, Any]:
    return {"relay": {"url": f"smtp://127.0.0.1:{port}", "timeout": 5},
            "delivery": {"mode": "proxy"}}


def test_delivered_proxy_mode_per_recipient(run_app, raw, records: Records,
                                            start_upstream) -> None:
    up = start_upstream(refuse_rcpt={"gone@example.net": "550 5.1.1 <gone@example.net>: "
                                                         "no such user"})
    app = run_app(plugins(probe(records, stages=["delivered"]), **proxy(up.port)))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<x@example.net>").startswith(b"250")
    assert c.cmd("RCPT TO:<gone@example.net>") == b"550 5.1.1 <gone@example.net>: no such user"
    assert c.cmd("RCPT TO:<y@example.net>").startswith(b"250")
    assert data(c) == b"250 2.0.0 Ok: queued upstream"
    assert [m[1] for m in up.handler.messages] == [["x@example.net", "y@example.net"]]
    assert delivered(records) == [("x@example.net", "250 2.0.0 Ok: queued upstream"),
                                  ("y@example.net", "250 2.0.0 Ok: queued upstream")]


def test_delivered_told_a_refused_delivery(run_app, raw, records: Records,
                                           start_upstream) -> None:
    """A delivery refused by the next hop is an outcome too (as in queue mode, where the
    stage is told 4xx/5xx attempts).

    Failed before 2b41e9f: ``Session._message`` returned before the delivered stage
    when the reply was not positive (and on DeliveryError).
    """
    up = start_upstream(data_reply="554 5.6.0 Content refused upstream")
    app = run_app(plugins(probe(records, stages=["delivered"]), **proxy(up.port)))
    c = raw(app.port)
    start_tx(c, "a@example.org", "x@example.net", "y@example.net")
    assert data(c) == b"554 5.6.0 Content refused upstream"
    assert delivered(records) == [("x@example.net", "554 5.6.0 Content refused upstream"),
                                  ("y@example.net", "554 5.6.0 Content refused upstream")]


def queue(spool: Path, port: int, delivery_process: bool) -> dict[str, Any]:
    return {"relay": {"url": f"smtp://127.0.0.1:{port}", "timeout": 5},
            "delivery": {"mode": "queue"},
            "queue": {"path": str(spool), "min_backoff": 60, "max_backoff": 60,
                      "scan_interval": 0.05, "delivery_process": delivery_process}}


@pytest.mark.parametrize("delivery_process", [True, False],
                         ids=["delivery-process", "in-process"])
def test_delivered_queue_mode_per_recipient(run_app, raw, records: Records, start_upstream,
                                            tmp_path: Path, delivery_process: bool) -> None:
    """Queue mode: the delivery (in the delivery process by default) tells the stage each
    recipient's outcome at the next hop. Needs the ``delivered`` stage wired in queue
    mode (queue/runner.py)."""
    up = start_upstream(refuse_rcpt={"gone@example.net": "550 5.1.1 no such user"})
    app = run_app(plugins(probe(records, stages=["delivered"]),
                          **queue(tmp_path / "spool", up.port, delivery_process)))
    c = raw(app.port)
    start_tx(c, "a@example.org", "x@example.net", "gone@example.net")
    assert data(c).startswith(b"250 2.0.0 Queued as ")

    def outcomes(recs: list[dict[str, Any]]) -> dict[str, str]:
        # (the bounce for gone@ to a@example.org is delivered, and told, too)
        return {r["subject"]: r["reply"] for r in recs
                if r["stage"] == "delivered" and "Queued as" not in r["reply"]
                and r["subject"] != "a@example.org"}

    done = records.wait(lambda recs: len(outcomes(recs)) == 2)
    assert outcomes(done) == {"x@example.net": "250 2.0.0 Ok: queued upstream",
                              "gone@example.net": "550 5.1.1 no such user"}
    assert [m[1] for m in up.handler.messages][:1] == [["x@example.net"]]


def test_delivered_queue_mode_not_told_at_acceptance(run_app, raw, records: Records,
                                                     start_upstream, tmp_path: Path) -> None:
    """In queue mode the stage reports delivery outcomes (Stage.DELIVERED: "queue mode: in
    the delivery process"), not the ``250 Queued as`` of the acceptance: a plugin that
    counts deliveries would count each message twice.

    Failed before 2b41e9f: ``Session._message`` ran the delivered stage after every
    positive delivery reply, the queue's included.
    """
    up = start_upstream()
    app = run_app(plugins(probe(records, stages=["delivered"]),
                          **queue(tmp_path / "spool", up.port, True)))
    c = raw(app.port)
    start_tx(c, "a@example.org", "x@example.net")
    assert data(c).startswith(b"250 2.0.0 Queued as ")
    done = records.wait(lambda recs: any("queued upstream" in r.get("reply", "")
                                         for r in recs))
    assert [(r["subject"], r["reply"]) for r in done if r["stage"] == "delivered"] == [
        ("x@example.net", "250 2.0.0 Ok: queued upstream")]


# ---------------------------------------------------------------- quarantine


@pytest.mark.parametrize("stage", ["headers", "data"])
def test_quarantine_at_data(run_app, raw, capture: Capture, records: Records, tmp_path: Path,
                            stage: str) -> None:
    """QUARANTINE (data and headers): the message goes to the quarantine Maildir instead
    of delivery, the result's reply is sent; the later hooks and delivered do not run."""
    qdir = tmp_path / "quarantine"
    app = run_app(plugins(probe(records, stages=[stage, "delivered"],
                                answers={stage: "quarantine"}, quarantine_path=str(qdir))),
                  deliver=capture)
    c = raw(app.port)
    start_tx(c)
    assert data(c) == b"250 2.0.0 Quarantined"
    assert capture.messages == []
    [name] = os.listdir(qdir / "new")
    stored = (qdir / "new" / name).read_bytes()
    assert stored.startswith(b"Received: ") and stored.endswith(MSG)
    assert records.all("delivered") == []


def test_quarantine_outside_data_does_not_accept(run_app, raw, records: Records,
                                                 tmp_path: Path) -> None:
    """QUARANTINE is a data-stage verdict. At rcpt it must not act as an OK that skips
    relay control.

    Failed before 2b41e9f: HookRunner.run stopped at the first non-CONT result,
    QUARANTINE included, and Session._on_rcpt took anything that is not a denial as an
    acceptance, so the recipient was accepted without the relay check. Now it is an
    error of that hook: 451 4.3.0.
    """
    app = run_app(plugins(probe(records, stages=["rcpt"], answers={"rcpt": "quarantine"},
                                priorities={"rcpt": -100},
                                quarantine_path=str(tmp_path / "q")),
                          relay={"local_networks": [], "relay_domains": []}))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
    assert not c.cmd("RCPT TO:<x@elsewhere.example>").startswith(b"250")


# ------------------------------------------------------------------- connect


@pytest.mark.parametrize("answer", ["sleep", "raise"])
def test_connect_hook_failure_gives_421(run_app, raw, answer: str) -> None:
    """A timeout or an exception at connect: RFC 5321 §3.1 allows no 4xx greeting but 421,
    which closes the connection (§3.8; hooks/verdict.py says so for the DENYSOFT default).

    Failed before 2b41e9f: the runner's ``451 4.3.0`` became the greeting and the
    session went on (``Session._run`` closed only for a DISCONNECT verdict or a 421).
    """
    app = run_app(plugins(probe(stages=["connect"], answers={"connect": answer},
                                timeout=0.2)))
    c = raw(app.port)
    assert c.greeting.startswith(b"421 4.3.0 "), c.greeting
    assert c.closed_by_peer()


def test_connect_deny_and_denysoft(run_app, raw) -> None:
    app = run_app(plugins(probe(stages=["connect"], answers={"connect": "554 5.7.1 Go away"})))
    c = raw(app.port)
    assert c.greeting == b"554 5.7.1 Go away"
    app2 = run_app(plugins(probe(stages=["connect"],
                                 answers={"connect": "421 4.7.0 Busy, closing"})))
    c2 = raw(app2.port)
    assert c2.greeting == b"421 4.7.0 Busy, closing"
    assert c2.closed_by_peer()

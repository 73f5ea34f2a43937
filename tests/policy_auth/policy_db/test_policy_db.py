"""The ``policy-db`` plugin (ZMailer's smtp-policy database): each attribute, the most
specific key winning, and MX/DNS checks against a loopback DNS server."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import pytest

from smtpgate.errors import ConfigError
from tests.policy_auth.support import ThreadedDns

POLICY = """
["[127.0.0.0]/8"]
trustrecipient = false

["spam.example"]
rejectsource = true

["ok@spam.example"]
freeze = false

["checked.example"]
senderokwithdns = true

[".sub.checked.example"]
senderokwithdns = false

["ours.example"]
relaytarget = true

["mxed.example"]
acceptifmx = true

["other-mx.example"]
acceptifmx = true

["blocked@ours.example"]
rejectrecipient = true

["frozen.example"]
freeze = true
"""

ZONE = {
    ("checked.example", "MX"): ["10 mx.checked.example."],
    ("mxed.example", "MX"): ["10 mx.test."],
    ("other-mx.example", "MX"): ["10 mx.elsewhere.example."],
}


@pytest.fixture
def dns_server() -> Any:
    with ThreadedDns(dict(ZONE), zone="example", servfail=["broken.checked.example"]) as s:
        yield s


def start(run_app: Any, tmp_path: Path, dns_server: Any, policy: str = POLICY,
          **extra: Any) -> Any:
    (tmp_path / "policy.toml").write_text(policy)
    return run_app({
        "relay": {"relay_domains": [], "local_networks": []},
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 1, "lifetime": 2},
        "plugin": [{"use": "policy-db", "file": str(tmp_path / "policy.toml"),
                    "quarantine_path": str(tmp_path / "frozen"), **extra}],
    })


def session(port: int, sender: str, *rcpts: str) -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        out = [c.mail(sender)]
        if out[0][0] == 250:
            out += [c.rcpt(r) for r in rcpts]
        return out


def codes(replies: list[tuple[int, bytes]]) -> list[int]:
    return [code for code, _ in replies]


def test_relaytarget_and_rejectrecipient(run_app, tmp_path, dns_server) -> None:
    app = start(run_app, tmp_path, dns_server)
    got = session(app.port, "a@example.org", "bob@ours.example", "bob@elsewhere.example",
                  "blocked@ours.example")
    assert codes(got) == [250, 250, 550, 550]
    assert got[3][1].startswith(b"5.7.1 Recipient address rejected by local policy")


def test_rejectsource_most_specific_key_wins(run_app, tmp_path, dns_server) -> None:
    app = start(run_app, tmp_path, dns_server)
    assert session(app.port, "x@spam.example")[0][0] == 553
    assert session(app.port, "x@deep.sub.spam.example")[0][0] == 553  # parent domain
    assert session(app.port, "ok@spam.example")[0][0] == 250  # the address entry wins


def test_senderokwithdns(run_app, tmp_path, dns_server) -> None:
    app = start(run_app, tmp_path, dns_server)
    assert session(app.port, "a@checked.example")[0][0] == 250
    code, text = session(app.port, "a@nowhere.checked.example")[0]
    assert (code, text[:5]) == (553, b"5.1.8")
    assert session(app.port, "a@broken.checked.example")[0][:1] == (450,)
    assert session(app.port, "a@x.sub.checked.example")[0][0] == 250  # .sub: off


def test_acceptifmx(run_app, tmp_path, dns_server) -> None:
    app = start(run_app, tmp_path, dns_server)
    assert codes(session(app.port, "a@example.org", "b@mxed.example",
                         "b@other-mx.example")) == [250, 250, 550]


@pytest.mark.parametrize("attribute", ["fulltrustnet", "relaycustomer", "trustrecipient"])
def test_client_trust(run_app, tmp_path, dns_server, attribute: str) -> None:
    app = start(run_app, tmp_path, dns_server,
                POLICY.replace("trustrecipient = false", f"{attribute} = true"))
    assert codes(session(app.port, "a@example.org", "b@anywhere.example")) == [250, 250]
    sender = codes(session(app.port, "x@spam.example", "b@anywhere.example"))
    assert sender == ([250, 250] if attribute == "fulltrustnet" else [553])


def test_rejectnet(run_app, tmp_path, dns_server) -> None:
    app = start(run_app, tmp_path, dns_server,
                POLICY.replace("trustrecipient = false", "rejectnet = true"))
    with pytest.raises(smtplib.SMTPConnectError) as info:
        smtplib.SMTP("127.0.0.1", app.port, timeout=30)
    assert info.value.smtp_code == 554


def test_freeze(run_app, tmp_path, dns_server) -> None:
    app = start(run_app, tmp_path, dns_server)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        assert c.sendmail("a@frozen.example", ["b@ours.example"],
                          b"Subject: x\r\n\r\nbody\r\n") == {}
    assert len(list((tmp_path / "frozen" / "new").iterdir())) == 1


def test_bad_files(run_app, tmp_path: Path, dns_server) -> None:
    for text, why in (('["x.example"]\nnosuch = true\n', "unknown attribute"),
                      ('["x.example"]\nrelaytarget = 1\n', "not true/false"),
                      ("not toml [", "policy.toml")):
        with pytest.raises(ConfigError, match=why):
            start(run_app, tmp_path, dns_server, text)
    with pytest.raises(ConfigError, match="quarantine_path"):
        (tmp_path / "p2.toml").write_text('["a.example"]\nfreeze = true\n')
        run_app({"plugin": [{"use": "policy-db", "file": str(tmp_path / "p2.toml")}]})


def test_warn_mode_refuses_nothing(run_app, tmp_path, dns_server) -> None:
    app = start(run_app, tmp_path, dns_server, mode="warn")
    got = session(app.port, "x@spam.example", "blocked@ours.example")
    assert got[0][0] == 250  # rejectsource: only logged
    # rejectrecipient: only logged; relay control then decides (the address entry has no
    # relaytarget), so the refusal is relay control's, not the policy's
    assert b"local policy" not in got[1][1] and b"Relaying denied" in got[1][1]

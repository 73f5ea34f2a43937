"""The shipped ``results_header`` plugin: the findings recorded in ``transaction.results``
reach the delivered message as one header, over a real socket."""

from __future__ import annotations

import smtplib

import pytest

from smtpgate.errors import ConfigError
from smtpgate.hooks import Stage

from ..support import Capture


def test_findings_reach_the_message(run_app, capture: Capture) -> None:
    app = run_app({"plugin": [{"use": "results_header", "header": "X-Findings"}]},
                  deliver=capture)

    def data(session, transaction):
        transaction.results.add("sitecheck", "pass", score=1.5)

    app.hooks.register(Stage.DATA, data)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=10) as client:
        client.sendmail("a@client.test", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
    message = Capture.strip_received(capture.messages[0][1])
    assert message.startswith(b"X-Findings: mx.test; sitecheck=pass (score=1.5)\r\n")


def test_no_findings_no_header(run_app, capture: Capture) -> None:
    app = run_app({"plugin": [{"use": "results_header"}]}, deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=10) as client:
        client.sendmail("a@client.test", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
    assert b"X-Smtpgate-Results" not in capture.messages[0][1]


def test_bad_header_name_names_the_key(run_app) -> None:
    with pytest.raises(ConfigError) as exc:
        run_app({"plugin": [{"use": "results_header", "header": "Bad: name"}]})
    assert exc.value.problems[0].startswith("plugin[0].header: must be a header field name")

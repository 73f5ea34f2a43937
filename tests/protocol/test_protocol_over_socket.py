"""The protocol core's line framing and error counting through the real session
driver, over a loopback socket (issue 8, findings 3, 13, 14).

The byte tables live in test_protocol_line_endings.py / test_protocol_error_counting.py;
these check that the server sends exactly what the core decided.
"""

from __future__ import annotations

from smtpgate.protocol.connection import OVERLONG_LINE_BOUND


def test_bare_lf_command_gets_one_reply(run_app, raw) -> None:
    app = run_app()
    c = raw(app.port)
    c.send(b"NOOP\nNOOP\r\n")
    assert c.read_reply().startswith(b"500 5.5.2 Bare <LF>")
    # The next reply is HELP's own: nothing else was queued for the first line.
    assert c.cmd("HELP").startswith(b"214")


def test_rcpt_lf_data_does_not_start_data(run_app, raw) -> None:
    app = run_app()
    c = raw(app.port)
    assert c.cmd("EHLO client.test").startswith(b"250")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<b@example.com>").startswith(b"250")
    c.send(b"RCPT TO:<c@example.com>\nDATA\r\n")
    assert c.read_reply().startswith(b"500 5.5.2")
    # DATA was not run: no 354 is queued, and RSET is a command, not message text.
    assert c.cmd("RSET").startswith(b"250 ")
    assert c.cmd("HELP").startswith(b"214")


def test_overlong_line_is_answered_before_its_end_and_session_goes_on(run_app, raw) -> None:
    app = run_app()
    c = raw(app.port)
    c.send(b"NOOP " + b"x" * 600)  # no CRLF
    assert c.read_reply() == b"500 5.5.2 Line too long"
    c.send(b"x" * 30_000 + b"\r\n")
    assert c.cmd("NOOP").startswith(b"250 ")


def test_line_without_crlf_past_the_bound_is_closed(run_app, raw) -> None:
    app = run_app()
    c = raw(app.port)
    # Exactly enough octets that a CRLF can no longer end the line within the bound
    # (no surplus bytes, so the server's close does not turn into a reset).
    c.send(b"NOOP " + b"x" * (512 + OVERLONG_LINE_BOUND - 1 - 5))
    assert c.read_reply() == b"500 5.5.2 Line too long"
    assert c.read_reply().startswith(b"421 4.5.0 ")
    assert c.closed_by_peer()


def test_recipient_overshoot_then_421_over_the_socket(run_app, raw) -> None:
    app = run_app({"server": {"max_errors": 3, "max_recipients": 1,
                              "recipient_overshoot_limit": 2}})
    c = raw(app.port)
    assert c.cmd("EHLO client.test").startswith(b"250")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<b@example.com>").startswith(b"250")
    for _ in range(2 + 2):  # the allowance, then two counted
        assert c.cmd("RCPT TO:<c@example.com>").startswith(b"452 4.5.3")
    c.send(b"RCPT TO:<c@example.com>\r\n")
    assert c.read_reply().startswith(b"452 4.5.3")
    assert c.read_reply().startswith(b"421 4.7.0")
    assert c.closed_by_peer()

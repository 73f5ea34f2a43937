"""Tests for the rspamd client against a real rspamd and against scripted HTTP peers.

Real rspamd (session fixture ``rspamd_server``): GTUBE, a clean message, request headers
as rspamd logged them, milter headers, Settings-ID / rewrite subject, learn round trip,
version, Unix socket. Scripted loopback HTTP servers: exact request bytes, error replies,
hangs, early close, reply framings and JSON shapes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from smtpgate.envelope import Envelope, Recipient, SessionInfo
from smtpgate.errors import ScannerError, ScannerTimeout, ScannerUnavailable
from smtpgate.scanners.base import Scanner, ScanResult, SpamLearner
from smtpgate.scanners.rspamd import RspamdScanner
from tests.support import CORPUS  # noqa: E402

from .rspamd_fixture import (
    RSPAMD_REWRITE_SETTINGS_ID,
    RspamdInstance,
)

GTUBE = CORPUS / "rspamd__functional_messages_gtube.eml"
CLEAN = CORPUS / "rspamd__functional_messages_transactional.eml"  # "Password Reset Request"
SPAM_TO_LEARN = CORPUS / "rspamd__functional_messages_btc2.eml"
HAM_TO_LEARN = CORPUS / "spamassassin__nice_004.eml"


def _read(path: Path) -> bytes:
    if not path.is_file():
        pytest.skip(f"corpus file {path} missing")
    return path.read_bytes()


def _scanner(inst: RspamdInstance, **kw: object) -> RspamdScanner:
    return RspamdScanner(
        inst.address, controller=inst.controller, password=inst.password, timeout=20, **kw  # type: ignore[arg-type]
    )


def _session(**kw: object) -> SessionInfo:
    base: dict[str, object] = {
        "session_id": "S1", "peer_ip": "192.0.2.10", "peer_port": 40000,
        "hostname": "gate.example.net", "helo_name": "mail.example.com",
    }
    base.update(kw)
    return SessionInfo(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- scripted peer

Responder = Callable[[bytes], Awaitable[bytes | None]]


class FakeRspamd:
    """A loopback HTTP server that records each request and answers with ``responder``.

    ``responder(request) -> reply bytes`` (``None``: close without answering); the
    ``hang`` mode accepts, reads and never answers.
    """

    def __init__(self, reply: bytes | Responder | None = None, *, hang: bool = False) -> None:
        self.reply = reply
        self.hang = hang
        self.requests: list[bytes] = []
        self.connections = 0
        self.address = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeRspamd:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
            body = await reader.readexactly(int(m.group(1))) if m else b""
            request = head + body
            self.requests.append(request)
            if self.hang:
                await asyncio.sleep(3600)
            if callable(self.reply):
                answer = await self.reply(request)
            else:
                answer = self.reply
            if answer is not None:
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


def http_reply(status: str, body: bytes | dict[str, object], **headers: str) -> bytes:
    """An HTTP/1.1 reply with Content-Length (``body`` dict: JSON)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    head = f"HTTP/1.1 {status}\r\nServer: rspamd/9.9\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return (head + "Connection: close\r\n\r\n").encode() + body


CANNED = {
    "is_skipped": False, "score": 7.5, "required_score": 15.0, "action": "add header",
    "symbols": {
        "LOW": {"name": "LOW", "score": 0.5}, "NEG": {"name": "NEG", "score": -1.0},
        "HIGH": {"name": "HIGH", "score": 5.0}, "ZERO_B": {"name": "ZERO_B", "score": 0.0},
        "ZERO_A": {"name": "ZERO_A", "score": 0.0},
    },
    "milter": {
        "add_headers": {
            "X-Plain": "plain value",
            "X-Ordered": {"value": "ordered value", "order": 0},
            "X-Multi": [{"value": "one", "order": -1}, "two"],
            "X-Folded": {"value": "first line\n\tsecond line\nthird", "order": -1},
            "Bad Name": "dropped",
        },
        "remove_headers": {"X-Spam": 0},
    },
    "messages": {"smtp_message": "try later"},
}


# ----------------------------------------------------------------------- protocol conformance


def test_implements_the_protocols() -> None:
    s = RspamdScanner("127.0.0.1:11333")
    scanner: Scanner = s
    learner: SpamLearner = s
    assert (scanner.name, scanner.kind) == ("rspamd", "spam")
    assert learner is s
    assert s.controller == "127.0.0.1:11334"  # default controller: same host, port 11334
    assert RspamdScanner("[::1]:11333").controller == "[::1]:11334"
    assert RspamdScanner("unix:/run/rspamd/normal.sock").controller is None


def test_repr_hides_password() -> None:
    s = RspamdScanner("127.0.0.1:11333", password="hunter2-secret")
    assert "hunter2-secret" not in repr(s)
    assert "<set>" in repr(s)


@pytest.mark.parametrize(
    "kwargs",
    [{"address": "nohost"}, {"timeout": 0}, {"max_size": 0}, {"settings_id": "a\r\nb"},
     {"password": "pw\r\nX: y"}, {"controller": "bad"}],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"address": "127.0.0.1:11333"} | kwargs
    address = args.pop("address")
    with pytest.raises(ValueError):
        RspamdScanner(address, **args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real rspamd


async def test_gtube_is_rejected(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    result = await _scanner(rspamd_server).scan(
        _read(GTUBE), envelope=Envelope("sender@example.net", rcpt_to=[Recipient("r@example.com")]),
        session=_session(),
    )
    assert result.scanner == "rspamd" and result.kind == "spam"
    assert result.action == "reject"
    assert result.verdict == "spam" and not result.is_clean
    assert "GTUBE" in result.symbols
    assert result.score is not None and result.threshold is not None
    assert result.score >= result.threshold
    assert "Gtube pattern" in result.detail  # rspamd's messages.smtp_message
    assert result.elapsed > 0


async def test_clean_message_gets_no_action(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    env = Envelope("noreply@example.com", rcpt_to=[Recipient("user@example.org")])
    result = await _scanner(rspamd_server).scan(
        _read(CLEAN), envelope=env, session=_session(notes={"peer_hostname": "mail.example.com"}),
        queue_id="QID-CLEAN-1",
    )
    assert result.action == "no action", result
    assert result.verdict == "clean" and result.is_clean
    assert result.score is not None and result.threshold is not None
    assert result.score < result.threshold
    assert "FROM_EQ_ENVFROM" in result.symbols  # rspamd compared From: with our From
    assert "TO_MATCH_ENVRCPT_ALL" in result.symbols  # ... and To: with our Rcpt
    # symbols are sorted by score, highest first
    scores = _symbol_scores(rspamd_server, result, "QID-CLEAN-1")
    assert len(scores) == len(result.symbols)
    assert scores == sorted(scores, reverse=True)


def _symbol_scores(inst: RspamdInstance, result: ScanResult, qid: str) -> list[float]:
    """Scores of result.symbols as rspamd's log line for the task gives them."""
    line = [ln for ln in inst.log_lines(f"qid: <{qid}>") if "rspamd_task_write_log" in ln]
    assert line, inst.log_tail()
    found = dict(re.findall(r"([A-Z0-9_]+)\((-?\d+\.\d+)\)", line[-1]))
    return [float(found[s]) for s in result.symbols if s in found]


async def test_rspamd_receives_envelope_and_session(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    env = Envelope(
        "noreply@example.com",
        rcpt_to=[Recipient("user@example.org"), Recipient("second@example.org")],
    )
    session = _session(session_id="SESS-77", auth_user="alice@example.com")
    result = await _scanner(rspamd_server).scan(
        _read(CLEAN), envelope=env, session=session, queue_id="QID-HDR-1"
    )
    # rspamd's own log line for the task (log_format: qid, ip, user, from, rcpts)
    lines = rspamd_server.log_lines("qid: <QID-HDR-1>")
    summary = [ln for ln in lines if "rspamd_task_write_log" in ln]
    assert summary, rspamd_server.log_tail()
    line = summary[-1]
    assert "ip: 192.0.2.10" in line
    assert "user: alice@example.com" in line
    assert "from: <noreply@example.com>" in line
    assert "rcpts: <user@example.org,second@example.org>" in line
    # milter_headers echoes the Queue-Id; values come back folded with CRLF + TAB
    headers = dict(result.headers)
    assert headers["X-Rspamd-Queue-Id"] == "QID-HDR-1"
    assert headers["X-Spamd-Result"].startswith("default: False [")
    assert "\r\n\t" in headers["X-Spamd-Result"]
    assert not re.search(r"\r(?!\n\t)|(?<!\r)\n", headers["X-Spamd-Result"])
    assert headers["X-Spam-Status"].startswith("No, score=")


async def test_hostname_reaches_rspamd(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    # without the client's rDNS name rspamd's hfilter adds HFILTER_HOSTNAME_UNKNOWN (2.5)
    env = Envelope("noreply@example.com", rcpt_to=[Recipient("user@example.org")])
    scanner = _scanner(rspamd_server)
    known = await scanner.scan(_read(CLEAN), envelope=env,
                               session=_session(notes={"peer_hostname": "mail.example.com"}))
    unknown = await scanner.scan(_read(CLEAN), envelope=env, session=_session())
    assert "HFILTER_HOSTNAME_UNKNOWN" not in known.symbols
    assert "HFILTER_HOSTNAME_UNKNOWN" in unknown.symbols
    assert unknown.score is not None and known.score is not None
    assert unknown.score > known.score


async def test_null_sender_is_sent_as_empty_path(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    await _scanner(rspamd_server).scan(
        _read(CLEAN), envelope=Envelope("", rcpt_to=[Recipient("user@example.org")]),
        session=_session(), queue_id="QID-NULL-1",
    )
    line = [ln for ln in rspamd_server.log_lines("qid: <QID-NULL-1>")
            if "rspamd_task_write_log" in ln][-1]
    assert "from: <" not in line  # rspamd saw the null reverse-path, not a bogus address
    assert "rcpts: <user@example.org>" in line


async def test_settings_id_rewrites_subject(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    scanner = _scanner(rspamd_server, settings_id=RSPAMD_REWRITE_SETTINGS_ID)
    env = Envelope("noreply@example.com", rcpt_to=[Recipient("user@example.org")])
    result = await scanner.scan(_read(CLEAN), envelope=env, session=_session())
    assert result.action == "rewrite subject", result
    assert result.verdict == "spam"
    assert result.threshold == pytest.approx(0.01)  # the settings' threshold came back
    assert result.subject is not None
    assert result.subject.endswith("Password Reset Request")
    assert result.subject != "Password Reset Request"  # rspamd's "*** SPAM *** %s"


async def test_unix_socket(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    scanner = RspamdScanner(rspamd_server.unix_address, timeout=20)
    result = await scanner.scan(_read(GTUBE))
    assert result.action == "reject" and "GTUBE" in result.symbols
    assert await scanner.version() == f"rspamd {rspamd_server.version}"


async def test_version(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    version = await _scanner(rspamd_server).version()
    assert re.fullmatch(r"rspamd \d+\.\d+(\.\d+)?", version)
    assert version == f"rspamd {rspamd_server.version}"  # same as `rspamd --version`


async def test_learn_round_trip(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    if not rspamd_server.learning:
        pytest.skip("no redis-server: rspamd's Bayes has no backend")
    scanner = _scanner(rspamd_server)
    spam, ham = _read(SPAM_TO_LEARN), _read(HAM_TO_LEARN)
    assert await scanner.learn(spam, True) == "success: learned as spam"
    again = await scanner.learn(spam, True)
    assert again.startswith("already learned: ")
    assert "already learned as spam" in again
    assert await scanner.learn(ham, False, user="user@example.org") == "success: learned as ham"
    # learning as the other class moves the message (rspamd's only way to "unlearn")
    assert await scanner.learn(spam, False) == "success: learned as ham"


async def test_learn_too_short_is_not_learned(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    if not rspamd_server.learning:
        pytest.skip("no redis-server: rspamd's Bayes has no backend")
    answer = await _scanner(rspamd_server).learn(b"Subject: hi\r\n\r\nshort\r\n", True)
    assert answer.startswith("not learned: ")
    assert "tokens" in answer


async def test_learn_wrong_password(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    scanner = RspamdScanner(
        rspamd_server.address, controller=rspamd_server.controller, password="wrong-pw-x"
    )
    with pytest.raises(ScannerError) as info:
        await scanner.learn(_read(HAM_TO_LEARN), False)
    assert type(info.value) is ScannerError
    assert "refused the password" in str(info.value) and "401" in str(info.value)
    assert "wrong-pw-x" not in str(info.value)
    nopw = RspamdScanner(rspamd_server.address, controller=rspamd_server.controller)
    with pytest.raises(ScannerError, match="no password configured"):
        await nopw.learn(_read(HAM_TO_LEARN), False)


async def test_learn_on_normal_worker_is_an_error(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    # the normal worker has no /learnham: rspamd answers "500 invalid command"
    scanner = RspamdScanner(rspamd_server.address, controller=rspamd_server.address)
    with pytest.raises(ScannerError, match=r"HTTP 500: invalid command"):
        await scanner.learn(_read(HAM_TO_LEARN), False)


async def test_forget_is_not_supported(rspamd_server: RspamdInstance) -> None:  # noqa: F811
    with pytest.raises(ScannerError, match="cannot forget"):
        await _scanner(rspamd_server).learn(_read(HAM_TO_LEARN), None)
    with pytest.raises(ScannerError, match="no controller"):
        await RspamdScanner(rspamd_server.unix_address).learn(b"x", True)


# ---------------------------------------------------------------------- scripted peers


async def test_request_bytes() -> None:
    async with FakeRspamd(http_reply("200 OK", CANNED)) as fake:
        scanner = RspamdScanner(fake.address, settings_id="inbound", timeout=5)
        env = Envelope("a@example.net", rcpt_to=[Recipient("b@example.org"), Recipient("c@example.org")])
        session = _session(
            session_id="SID9", auth_user="alice", tls_version="TLSv1.3",
            tls_cipher="TLS_AES_256_GCM_SHA384", notes={"peer_hostname": "mx.example.net"},
        )
        message = b"Subject: t\r\n\r\nbody\r\n"
        await scanner.scan(message, envelope=env, session=session, user="b@example.org")
    (request,) = fake.requests
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /checkv2 HTTP/1.1"
    assert f"Host: {fake.address}" in lines
    for expected in (
        "From: a@example.net", "IP: 192.0.2.10", "Helo: mail.example.com", "User: alice",
        "Queue-Id: SID9", "Hostname: mx.example.net", "MTA-Name: gate.example.net",
        "TLS-Version: TLSv1.3", "TLS-Cipher: TLS_AES_256_GCM_SHA384",
        "Deliver-To: b@example.org", "Settings-ID: inbound",
        f"Content-Length: {len(message)}", "Connection: close",
    ):
        assert expected in lines, expected
    assert [ln for ln in lines if ln.startswith("Rcpt:")] == [
        "Rcpt: b@example.org", "Rcpt: c@example.org"
    ]
    assert not any(ln.startswith("Password:") for ln in lines)  # never sent to the worker
    assert body == message


async def test_request_minimal_and_sanitised() -> None:
    async with FakeRspamd(http_reply("200 OK", CANNED)) as fake:
        scanner = RspamdScanner(fake.address, timeout=5)
        await scanner.scan(b"x")
        await scanner.scan(
            b"x", envelope=Envelope("", rcpt_to=[Recipient("evil@example.org\r\nX-Injected: 1")]),
            session=_session(peer_ip="not-an-ip", helo_name="h\r\nX-Injected: 2"),
        )
    first = fake.requests[0].decode()
    for name in ("From", "Rcpt", "IP", "Helo", "User", "Queue-Id", "Settings-ID"):
        assert f"\r\n{name}:" not in first
    second = fake.requests[1].decode()
    assert "\r\nFrom: <>\r\n" in second
    assert "\r\nX-Injected" not in second
    assert "\r\nRcpt: evil@example.orgX-Injected: 1\r\n" in second
    assert "\r\nIP:" not in second


async def test_learn_request_bytes() -> None:
    async with FakeRspamd(http_reply("200 OK", {"success": True})) as fake:
        scanner = RspamdScanner("127.0.0.1:1", controller=fake.address, password="pw-123")
        assert await scanner.learn(b"msg", True, user="u@example.org") == "success: learned as spam"
        assert await scanner.learn(b"msg", False) == "success: learned as ham"
    spam_req, ham_req = (r.decode() for r in fake.requests)
    assert spam_req.startswith("POST /learnspam HTTP/1.1\r\n")
    assert "\r\nPassword: pw-123\r\n" in spam_req and "\r\nDeliver-To: u@example.org\r\n" in spam_req
    assert ham_req.startswith("POST /learnham HTTP/1.1\r\n")
    assert spam_req.endswith("\r\n\r\nmsg")


async def test_reply_parsing() -> None:
    async with FakeRspamd(http_reply("200 OK", CANNED)) as fake:
        result = await RspamdScanner(fake.address, timeout=5).scan(b"x")
    assert result.verdict == "spam" and result.action == "add header"
    assert result.score == 7.5 and result.threshold == 15.0
    assert result.symbols == ("HIGH", "LOW", "ZERO_A", "ZERO_B", "NEG")
    assert result.headers == (
        ("X-Plain", "plain value"),
        ("X-Ordered", "ordered value"),
        ("X-Multi", "one"),
        ("X-Multi", "two"),
        ("X-Folded", "first line\r\n\tsecond line\r\n\tthird"),
    )
    assert result.subject is None
    assert result.detail == "add header (score 7.50/15.00): try later"


@pytest.mark.parametrize(
    ("action", "is_skipped", "verdict"),
    [
        ("no action", False, "clean"),
        ("no action", True, "skipped"),
        ("greylist", False, "spam"),
        ("soft reject", False, "spam"),
        ("rewrite subject", False, "spam"),
        ("reject", True, "spam"),  # GTUBE comes back with is_skipped: true
        ("discard", False, "spam"),  # custom actions count as spam
    ],
)
async def test_verdict_mapping(action: str, is_skipped: bool, verdict: str) -> None:
    reply = {"is_skipped": is_skipped, "score": 1.0, "required_score": 15.0, "action": action,
             "symbols": {}, "subject": "[SPAM] hello"}
    async with FakeRspamd(http_reply("200 OK", reply)) as fake:
        result = await RspamdScanner(fake.address, timeout=5).scan(b"x")
    assert result.verdict == verdict and result.action == action
    assert result.subject == "[SPAM] hello"


async def test_chunked_and_eof_framed_replies() -> None:
    payload = json.dumps(CANNED).encode()
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:10], payload[10:]))
               + b"0\r\n\r\n")
    eof = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + payload
    for raw in (chunked, eof):
        async with FakeRspamd(raw) as fake:
            result = await RspamdScanner(fake.address, timeout=5).scan(b"x")
        assert result.action == "add header" and result.symbols[0] == "HIGH"


async def test_max_size_skips_without_connecting() -> None:
    async with FakeRspamd(http_reply("200 OK", CANNED)) as fake:
        scanner = RspamdScanner(fake.address, max_size=100)
        result = await scanner.scan(b"x" * 101)
        assert (await scanner.scan(b"x" * 100)).verdict == "spam"  # exactly max_size: scanned
    assert result.verdict == "skipped" and result.is_clean
    assert "101 bytes" in result.detail
    assert fake.connections == 1


async def test_down_is_unavailable(tmp_path: Path) -> None:
    async with FakeRspamd() as fake:
        address = fake.address
    # the listener is closed now: connection refused
    with pytest.raises(ScannerUnavailable):
        await RspamdScanner(address, timeout=5).scan(b"x")
    with pytest.raises(ScannerUnavailable):
        await RspamdScanner(address, timeout=5).version()
    with pytest.raises(ScannerUnavailable):
        await RspamdScanner("127.0.0.1:1", controller=address, timeout=5).learn(b"x", True)
    with pytest.raises(ScannerUnavailable):
        await RspamdScanner(f"unix:{tmp_path}/missing.sock", timeout=5).scan(b"x")


async def test_closed_without_reply_is_unavailable() -> None:
    async def close(_request: bytes) -> bytes | None:
        return None

    async def half(_request: bytes) -> bytes:
        return http_reply("200 OK", CANNED)[:-10]

    for responder in (close, half):
        async with FakeRspamd(responder) as fake:
            with pytest.raises(ScannerUnavailable):
                await RspamdScanner(fake.address, timeout=5).scan(b"x")


async def test_hanging_server_times_out() -> None:
    async with FakeRspamd(hang=True) as fake:
        started = time.monotonic()
        with pytest.raises(ScannerTimeout, match=r"within 0\.3s"):
            await RspamdScanner(fake.address, timeout=0.3).scan(b"x" * 1000)
        assert time.monotonic() - started < 2.0
        assert len(fake.requests) == 1  # the request was sent, rspamd just never answered
        with pytest.raises(ScannerTimeout):
            await RspamdScanner("127.0.0.1:1", controller=fake.address, timeout=0.3).learn(
                b"x", True
            )


async def test_large_body_to_a_server_that_does_not_read() -> None:
    # the server accepts but never reads: the send itself must be bounded by the timeout
    never_read: list[asyncio.StreamWriter] = []

    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        never_read.append(w)
        await asyncio.sleep(3600)

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ScannerTimeout):
            await RspamdScanner(f"127.0.0.1:{port}", timeout=0.5, max_size=64 << 20).scan(
                b"x" * (32 << 20)
            )
    finally:
        server.close()
        for w in never_read:
            w.transport.abort()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (http_reply("500 Internal Server Error", {"error": "boom"}), r"HTTP 500: boom"),
        (http_reply("400 Bad Request", b""), r"HTTP 400: Bad Request"),
        (http_reply("200 OK", b"{not json"), r"not JSON"),
        (http_reply("200 OK", b"[1, 2]"), r"not a JSON object"),
        (http_reply("200 OK", {"score": 1.0}), r"no action"),
        (http_reply("200 OK", {"action": "reject", "score": "high"}), r"no numeric score"),
        (b"SPAMD/1.1 0 EX_OK\r\n\r\n", r"not an HTTP reply"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", r"bad Content-Length"),
    ],
)
async def test_error_replies_are_scanner_errors(raw: bytes, match: str) -> None:
    async with FakeRspamd(raw) as fake:
        with pytest.raises(ScannerError, match=match) as info:
            await RspamdScanner(fake.address, timeout=5).scan(b"x")
    assert type(info.value) is ScannerError  # not Unavailable / Timeout


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (http_reply("208 <m@x> has been already learned as spam, ignore it",
                    {"error": "<m@x> has been already learned as spam, ignore it"}),
         "already learned: <m@x> has been already learned as spam, ignore it"),
        # rspamd 4.x answers 404 for the same condition
        (http_reply("404 Not Found", {"error": "<m@x> has been already learned as spam, ignore it"}),
         "already learned: <m@x> has been already learned as spam, ignore it"),
        (b"HTTP/1.1 204 <m@x> contains less tokens than required for bayes classifier: 3 < 11\r\n"
         b"Connection: close\r\n\r\n",
         "not learned: <m@x> contains less tokens than required for bayes classifier: 3 < 11"),
    ],
)
async def test_learn_answers(raw: bytes, expected: str) -> None:
    async with FakeRspamd(raw) as fake:
        answer = await RspamdScanner("127.0.0.1:1", controller=fake.address, timeout=5).learn(
            b"x", True
        )
    assert answer == expected


async def test_learn_error_answers() -> None:
    for raw, match in (
        (http_reply("200 OK", {"success": False}), "unexpected answer"),
        (http_reply("500 Internal Server Error", {"error": "redis down"}), "HTTP 500: redis down"),
        (http_reply("403 Forbidden", {"error": "Forbidden"}), "refused"),
    ):
        async with FakeRspamd(raw) as fake:
            scanner = RspamdScanner("127.0.0.1:1", controller=fake.address, timeout=5)
            with pytest.raises(ScannerError, match=match):
                await scanner.learn(b"x", True)


async def test_version_fallback_to_controller_stat() -> None:
    async def no_server_header(request: bytes) -> bytes:
        if request.startswith(b"GET /ping "):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npong"
        assert b"\r\nPassword: pw\r\n" in request
        return http_reply("200 OK", {"version": "3.4", "uptime": 5})

    async with FakeRspamd(no_server_header) as fake:
        scanner = RspamdScanner(fake.address, controller=fake.address, password="pw", timeout=5)
        assert await scanner.version() == "rspamd 3.4"
    assert fake.requests[1].startswith(b"GET /stat HTTP/1.1\r\n")

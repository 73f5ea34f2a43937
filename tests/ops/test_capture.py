"""Capture mode (issue 12): messages sent by a real SMTP client over loopback are stored in
the SQLite capture database and served by ``/api/messages`` on the admin listener (both
event loops, via ``run_app``)."""

from __future__ import annotations

import json
import smtplib
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpgate.app import Smtpgate
from smtpgate.delivery.capture import CaptureDelivery
from tests.delivery.conftest import CaptureController, CaptureHandler, free_port
from tests.scanners.spamd_fixture import spamd_server_fixture  # noqa: F401
from tests.support import CORPUS, Capture


def capture_cfg(tmp_path: Path, **capture: Any) -> dict[str, Any]:
    return {"delivery": {"mode": "capture"},
            "capture": {"database": str(tmp_path / "capture.sqlite"), **capture},
            "admin": {"listen": "127.0.0.1:0"}}


def api(app: Smtpgate, method: str, path: str, body: Any = None,
        timeout: float = 60.0) -> tuple[int, Any]:
    """One request to the admin listener; ``(status, parsed JSON or bytes)``."""
    assert app.admin is not None
    host, port = app.admin.address
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, ctype, raw = resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        status, ctype, raw = exc.code, exc.headers.get("Content-Type", ""), exc.read()
    return status, json.loads(raw) if ctype.startswith("application/json") else raw


def send(app: Smtpgate, message: bytes, rcpts: list[str] | None = None,
         sender: str = "dev@app.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail(sender)
        for r in rcpts or ["user@example.com"]:
            s.rcpt(r)
        return s.data(message)


def simple(subject: str, body: str = "hello", to: str = "user@example.com") -> bytes:
    return (f"From: App <dev@app.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@app.test>\r\n\r\n{body}\r\n").encode()


def test_stored_byte_exact_and_listed(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path))
    original = (CORPUS / "debian-sa__sample-nonspam.eml").read_bytes()
    original = original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    code, text = send(app, original, ["a@example.com", "b@example.org"])
    assert code == 250 and text.startswith(b"2.0.0 Message captured as "), (code, text)
    msg_id = text.decode().rsplit(" ", 1)[1]
    status, listing = api(app, "GET", "/api/messages")
    assert status == 200 and listing["total"] == 1
    [item] = listing["messages"]
    assert item["id"] == msg_id and item["source"] == "capture"
    assert item["sender"] == "dev@app.test"
    assert item["recipients"] == ["a@example.com", "b@example.org"]
    status, raw = api(app, "GET", f"/api/messages/{msg_id}/raw")
    assert status == 200 and Capture.strip_received(raw) == original
    assert item["size"] == len(raw)
    status, detail = api(app, "GET", f"/api/messages/{msg_id}")
    assert status == 200
    assert detail["subject"] == item["subject"] and detail["subject"]
    assert ["Subject", detail["subject"]] in detail["headers"]
    assert detail["text"] and detail["html"] is None


def test_search_by_to_from_subject_and_text(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path))
    send(app, simple("Invoice 42", "pay now", to="alice@example.com"), ["alice@example.com"])
    send(app, simple("Welcome", "glad to see you", to="bob@example.com"), ["bob@example.com"],
         sender="noreply@shop.test")
    send(app, simple("Welcome back"), ["carol@example.com"])

    def subjects(query: str) -> list[str]:
        status, body = api(app, "GET", "/api/messages?" + query)
        assert status == 200 and body["total"] == len(body["messages"])
        return [m["subject"] for m in body["messages"]]

    assert subjects("to=ALICE@example.com") == ["Invoice 42"]
    assert subjects("subject=welcome") == ["Welcome back", "Welcome"]  # newest first
    assert subjects("from=shop.test") == ["Welcome"]
    assert subjects("q=glad+to") == ["Welcome"]
    assert subjects("to=bob&subject=invoice") == []
    status, page = api(app, "GET", "/api/messages?limit=1&offset=1")
    assert page["total"] == 3 and [m["subject"] for m in page["messages"]] == ["Welcome"]
    assert api(app, "GET", "/api/messages?limit=x")[0] == 400


def test_wait_returns_the_message_a_concurrent_client_sends(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path))
    send(app, simple("older signup mail", to="new@example.com"), ["new@example.com"])
    result: list[tuple[int, Any]] = []
    waiter = threading.Thread(target=lambda: result.append(
        api(app, "GET", "/api/messages/wait?to=new@example.com&subject=signup&timeout=60")))
    waiter.start()
    delivery = app.delivery
    assert isinstance(delivery, CaptureDelivery)
    while delivery.waiting == 0 and waiter.is_alive():  # the request is waiting now
        time.sleep(0.01)
    send(app, simple("not this one", to="new@example.com"), ["new@example.com"])
    code, text = send(app, simple("Your signup code", to="new@example.com"),
                      ["new@example.com"])
    waiter.join()
    status, found = result[0]
    assert status == 200, found
    assert found["subject"] == "Your signup code"
    assert text.decode().endswith(f" {found['id']}")


def test_wait_since_and_timeout(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path))
    before = time.time() - 1
    send(app, simple("already here"), ["x@example.com"])
    status, found = api(app, "GET", f"/api/messages/wait?subject=already&since={before}")
    assert status == 200 and found["subject"] == "already here"
    # Without since, only messages arriving from now on count: nothing comes.
    status, body = api(app, "GET", "/api/messages/wait?subject=already&timeout=0.2")
    assert status == 408 and "no matching message" in body["error"]


def test_cap_by_count_removes_the_oldest(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path, max_messages=3))
    for i in range(5):
        assert send(app, simple(f"m{i}"))[0] == 250
    status, body = api(app, "GET", "/api/messages")
    assert body["total"] == 3
    assert [m["subject"] for m in body["messages"]] == ["m4", "m3", "m2"]


def test_cap_by_bytes_removes_the_oldest(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path, max_messages=0, max_bytes=5000))
    for i in range(4):
        assert send(app, simple(f"b{i}", ("x" * 78 + "\r\n") * 25))[0] == 250
    status, body = api(app, "GET", "/api/messages")
    sizes = [m["size"] for m in body["messages"]]
    assert [m["subject"] for m in body["messages"]] == ["b3", "b2"], sizes
    assert sum(sizes) <= 5000 < sum(sizes) + min(sizes)
    # A message larger than the whole cap is still kept (the newest is never removed).
    assert send(app, simple("huge", ("y" * 78 + "\r\n") * 75))[0] == 250
    status, body = api(app, "GET", "/api/messages")
    assert [m["subject"] for m in body["messages"]] == ["huge"]


def test_delete_one_and_all(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path))
    ids = [send(app, simple(f"d{i}"))[1].decode().rsplit(" ", 1)[1] for i in range(3)]
    assert api(app, "DELETE", f"/api/messages/{ids[0]}") == (200, {"deleted": ids[0]})
    assert api(app, "GET", f"/api/messages/{ids[0]}")[0] == 404
    assert api(app, "DELETE", f"/api/messages/{ids[0]}")[0] == 404
    assert api(app, "GET", "/api/messages")[1]["total"] == 2
    assert api(app, "DELETE", "/api/messages") == (200, {"deleted": 2})
    assert api(app, "GET", "/api/messages")[1] == {"messages": [], "total": 0}


def test_html_part_is_sanitised(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path))
    html = ('<p onclick="x()">Hi <b>there</b></p><script>document.title="pwned"</script>'
            '<img src="http://127.0.0.1:9/remote.png" onerror="document.title=\'pwned\'">'
            '<img src="cid:logo@app.test"><a href="javascript:alert(1)">j</a>'
            '<a href="https://example.com/">link</a>')
    message = ("From: dev@app.test\r\nTo: user@example.com\r\nSubject: html\r\n"
               "MIME-Version: 1.0\r\nContent-Type: multipart/related; boundary=B\r\n\r\n"
               "--B\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n"
               "--B\r\nContent-Type: image/png\r\nContent-ID: <logo@app.test>\r\n"
               "Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--B--\r\n").encode()
    msg_id = send(app, message)[1].decode().rsplit(" ", 1)[1]
    status, detail = api(app, "GET", f"/api/messages/{msg_id}")
    assert status == 200
    safe = detail["html"]
    for bad in ("<script", "pwned", "onerror", "onclick", "javascript:", "127.0.0.1:9"):
        assert bad not in safe, (bad, safe)
    assert "<b>there</b>" in safe and 'href="https://example.com/"' in safe
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in safe  # cid: made inline
    assert detail["remote_images_blocked"] == 1


@pytest.fixture
def upstream() -> Iterator[tuple[CaptureHandler, int]]:
    handler = CaptureHandler()
    controller = CaptureController(handler, port=free_port())
    controller.start()
    yield handler, int(controller.port)
    controller.stop(no_assert=True)


def test_relay_to_upstream_byte_exact(run_app, tmp_path: Path,
                                      upstream: tuple[CaptureHandler, int]) -> None:
    handler, port = upstream
    app = run_app(capture_cfg(tmp_path, relay_url=f"smtp://127.0.0.1:{port}"))
    msg_id = send(app, simple("relay me"), ["r1@example.com", "r2@example.com"])[1]
    msg_id = msg_id.decode().rsplit(" ", 1)[1]
    stored = api(app, "GET", f"/api/messages/{msg_id}/raw")[1]
    status, body = api(app, "POST", f"/api/messages/{msg_id}/relay")
    assert status == 200 and body["relayed"] == msg_id and body["reply"].startswith("250")
    [got] = handler.messages
    assert got.content == stored
    assert (got.mail_from, got.rcpt_tos) == ("dev@app.test", ["r1@example.com", "r2@example.com"])
    status, body = api(app, "POST", f"/api/messages/{msg_id}/relay", {"to": ["o@example.net"]})
    assert status == 200 and handler.messages[1].rcpt_tos == ["o@example.net"]


def test_relay_without_upstream_is_409(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path))
    msg_id = send(app, simple("nowhere"))[1].decode().rsplit(" ", 1)[1]
    status, body = api(app, "POST", f"/api/messages/{msg_id}/relay")
    assert status == 409 and "relay_url" in body["error"]


def test_train_with_spamd(run_app, tmp_path: Path, spamd_server: str) -> None:
    app = run_app({**capture_cfg(tmp_path),
                   "scanner": [{"type": "spamassassin", "address": spamd_server}]})
    token = uuid.uuid4().hex
    msg_id = send(app, simple(f"cheap pills {token}", f"buy {token} now " * 20))[1]
    msg_id = msg_id.decode().rsplit(" ", 1)[1]
    status, body = api(app, "POST", f"/api/messages/{msg_id}/train", {"as": "spam"})
    assert status == 200, body
    assert body["as"] == "spam" and body["answers"] == ["spamassassin: DidSet: local"]
    assert api(app, "POST", f"/api/messages/{msg_id}/train", {"as": "eggs"})[0] == 400


def test_train_without_scanner_is_409(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path))
    msg_id = send(app, simple("x"))[1].decode().rsplit(" ", 1)[1]
    status, body = api(app, "POST", f"/api/messages/{msg_id}/train", {"as": "ham"})
    assert status == 409 and "no trainable" in body["error"]


def test_quarantine_listed_read_only(run_app, tmp_path: Path, spamd_server: str) -> None:
    quarantine = tmp_path / "quarantine"
    app = run_app({**capture_cfg(tmp_path),
                   "scanner": [{"type": "spamassassin", "address": spamd_server,
                                "reject_score": 0, "quarantine_score": 100,
                                "quarantine_path": str(quarantine)}]})
    gtube = (CORPUS / "rspamd__functional_messages_gtube.eml").read_bytes()
    gtube = gtube.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert send(app, gtube)[0] == 250
    assert send(app, simple("clean one"))[0] == 250
    [qfile] = list((quarantine / "new").iterdir())
    status, body = api(app, "GET", "/api/messages")
    assert body["total"] == 2
    sources = {m["source"]: m for m in body["messages"]}
    q = sources["quarantine"]
    assert q["id"] == f"q0-{qfile.name}" and q["size"] == qfile.stat().st_size
    assert api(app, "GET", "/api/messages?source=quarantine")[1]["total"] == 1
    status, raw = api(app, "GET", f"/api/messages/{q['id']}/raw")
    assert status == 200 and raw == qfile.read_bytes()
    assert api(app, "DELETE", f"/api/messages/{q['id']}")[0] == 409
    assert qfile.exists()
    status, body = api(app, "POST", f"/api/messages/{q['id']}/train", {"as": "spam"})
    assert status == 200 and body["answers"][0].startswith("spamassassin: ")



def test_stop_ends_a_pending_wait(run_app, tmp_path: Path) -> None:
    app = run_app(capture_cfg(tmp_path))
    result: list[tuple[int, Any]] = []
    waiter = threading.Thread(target=lambda: result.append(
        api(app, "GET", "/api/messages/wait?subject=never&timeout=3600")))
    waiter.start()
    delivery = app.delivery
    assert isinstance(delivery, CaptureDelivery)
    while delivery.waiting == 0 and waiter.is_alive():
        time.sleep(0.01)
    app.stop_thread(timeout=2)
    waiter.join()
    assert result[0] == (503, {"error": "the server is shutting down"})

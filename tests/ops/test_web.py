"""The admin web page in a real browser (issue 12): Debian's headless Chromium driven by
Selenium against smtpgate running in a thread, real peers on loopback (an SMTP client
holding a session open, an aiosmtpd upstream that defers, a real spamd, an HTTP listener
that must never be contacted by the HTML preview).

Screenshots are saved in ``$SMTPGATE_ARTIFACTS`` or ``test-artifacts/`` at the repo root.
Skips when /usr/bin/chromium or /usr/bin/chromedriver is missing (scripts/setup.sh installs
them).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import smtplib
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpgate.app import Smtpgate
from tests.delivery.conftest import CaptureController, CaptureHandler, free_port
from tests.scanners.spamd_fixture import spamd_server_fixture  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Seconds the browser waits for a page change (a wait, not an assertion on time).
WAIT = 60

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="Debian's chromium and chromium-driver are not installed (scripts/setup.sh)")

ARTIFACTS = Path(os.environ.get("SMTPGATE_ARTIFACTS")
                 or Path(__file__).resolve().parents[2] / "test-artifacts")


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="smtpgate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


@pytest.fixture
def start_gate() -> Iterator[Callable[[dict[str, Any]], Smtpgate]]:
    apps: list[Smtpgate] = []

    def start(cfg: dict[str, Any]) -> Smtpgate:
        base: dict[str, Any] = {"server": {"hostname": "mx.test", "listen": ["127.0.0.1:0"]},
                                "admin": {"listen": "127.0.0.1:0"}}
        app = Smtpgate({**base, **cfg})
        app.start_thread()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop_thread(timeout=2)


def base_url(app: Smtpgate) -> str:
    assert app.admin is not None
    host, port = app.admin.address
    return f"http://{host}:{port}"


def api(app: Smtpgate, path: str) -> Any:
    with urllib.request.urlopen(base_url(app) + path, timeout=30) as resp:
        return json.loads(resp.read())


def wait_until(driver: Any, condition: Callable[[Any], Any]) -> Any:
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # The page reloads after an action: an element read meanwhile may go stale.
    return WebDriverWait(driver, WAIT, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(condition)


def hold_session_open(port: int) -> socket.socket:
    """Connect, read the greeting, EHLO; the session stays open until closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    buf = b""
    while not buf.endswith(b"\r\n"):
        buf += sock.recv(4096)
    sock.sendall(b"EHLO browser-test.example\r\n")
    buf = b""
    while not (b"\r\n250 " in b"\r\n" + buf and buf.endswith(b"\r\n")):
        buf += sock.recv(4096)
    return sock


def test_dashboard_session_and_queue_hold_release(browser: Any, start_gate: Any,
                                                  tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    handler = CaptureHandler(data_reply="451 4.3.0 Upstream busy, try later")
    upstream = CaptureController(handler, port=free_port())
    upstream.start()
    try:
        app = start_gate({
            "relay": {"url": f"smtp://127.0.0.1:{upstream.port}"},
            "delivery": {"mode": "queue"},
            "queue": {"path": str(tmp_path / "spool"), "delivery_process": False,
                      "min_free_space": 0},
        })
        with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as s:
            s.sendmail("sender@example.org", ["rcpt@example.com"],
                       b"Subject: stays queued\r\n\r\nbody\r\n")
        while True:  # the upstream deferred it: it stays in the queue
            queue = api(app, "/api/queue")
            if queue["total"] == 1 and queue["messages"][0]["state"] == "deferred":
                break
            time.sleep(0.05)
        qid = queue["messages"][0]["id"]

        held = hold_session_open(app.port)
        try:
            client_port = held.getsockname()[1]
            browser.get(base_url(app) + "/")
            row = browser.find_element(
                By.CSS_SELECTOR, f'#sessions tr[data-client-port="{client_port}"]')
            assert "browser-test.example" in row.text
            assert browser.find_element(By.ID, "queue-total").text == "1"
            screenshot(browser, "dashboard")
        finally:
            held.close()

        browser.get(base_url(app) + "/queue")

        def state() -> str:
            return str(browser.find_element(
                By.CSS_SELECTOR, f'#queue tr[data-id="{qid}"] td.state').text)

        assert state() == "deferred"
        browser.find_element(By.CSS_SELECTOR, f'#queue tr[data-id="{qid}"]') \
            .find_element(By.XPATH, ".//button[text()='Hold']").click()
        wait_until(browser, lambda _: state() == "hold")
        assert api(app, f"/api/queue/{qid}")["state"] == "hold"
        screenshot(browser, "queue-held")
        browser.find_element(By.CSS_SELECTOR, f'#queue tr[data-id="{qid}"]') \
            .find_element(By.XPATH, ".//button[text()='Release']").click()
        wait_until(browser, lambda _: state() != "hold")
        assert api(app, f"/api/queue/{qid}")["state"] != "hold"
        screenshot(browser, "queue-released")
    finally:
        upstream.stop(no_assert=True)


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/gif")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_listener() -> Iterator[tuple[int, list[str]]]:
    class Handler(_Recorder):
        requests: list[str] = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], Handler.requests
    server.shutdown()
    server.server_close()


def test_message_preview_runs_no_script_and_loads_nothing_remote(
        browser: Any, start_gate: Any, tmp_path: Path, spamd_server: str,
        http_listener: tuple[int, list[str]]) -> None:
    from selenium.webdriver.common.by import By

    port, requests = http_listener
    remote = f"http://127.0.0.1:{port}"
    app = start_gate({
        "delivery": {"mode": "capture"},
        "capture": {"database": str(tmp_path / "capture.sqlite")},
        "scanner": [{"type": "spamassassin", "address": spamd_server}],
    })
    token = os.urandom(8).hex()
    html = (
        "<html><head><title>pwned</title>"
        f'<link rel="stylesheet" href="{remote}/style.css">'
        f"<style>body {{ background: url({remote}/css-bg.png) }}</style></head><body>"
        f'<p id="hello" style="color: green; background-image: url({remote}/inline-bg.png)">'
        "Hello from the preview</p>"
        "<script>document.title='pwned'; "
        f"new Image().src='{remote}/script-ran';</script>"
        f'<img src="{remote}/x" onerror="document.title=\'pwned\'">'
        f'<img src="x" onerror="new Image().src=\'{remote}/onerror-ran\'">'
        f'<iframe src="{remote}/frame"></iframe>'
        f'<object data="{remote}/object"></object>'
        f'<svg><image href="{remote}/svg-image"/></svg>'
        f"<p>{token}</p></body></html>")
    message = ("From: App <dev@app.test>\r\nTo: user@example.com\r\n"
               f"Subject: Preview test {token}\r\nMIME-Version: 1.0\r\n"
               "Content-Type: multipart/alternative; boundary=ALT\r\n\r\n"
               "--ALT\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
               f"Plain text part {token}\r\n"
               "--ALT\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
               f"{html}\r\n--ALT--\r\n").encode()
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as s:
        s.sendmail("dev@app.test", ["user@example.com"], message)

    browser.get(base_url(app) + "/messages")
    browser.find_element(By.PARTIAL_LINK_TEXT, f"Preview test {token}").click()
    wait_until(browser, lambda d: d.find_elements(By.ID, "preview"))
    assert browser.title == f"Preview test {token} · smtpgate"
    frame = browser.find_element(By.ID, "preview")
    # The frame is sandboxed with no permission at all (no allow-scripts).
    assert frame.get_dom_attribute("sandbox") == ""
    assert f"Plain text part {token}" in browser.find_element(By.ID, "text").text
    assert browser.find_element(By.ID, "blocked").text == "2 remote image(s) blocked."
    screenshot(browser, "message")

    browser.switch_to.frame(frame)
    assert browser.find_elements(By.TAG_NAME, "p")[0].text == "Hello from the preview"
    assert token in browser.find_element(By.TAG_NAME, "body").text
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_elements(By.TAG_NAME, "iframe") == []
    assert browser.find_elements(By.TAG_NAME, "object") == []
    for img in browser.find_elements(By.TAG_NAME, "img"):
        assert img.get_dom_attribute("onerror") is None
        assert not (img.get_dom_attribute("src") or "").startswith("http")
    browser.switch_to.default_content()
    assert browser.title == f"Preview test {token} · smtpgate"  # not "pwned"

    # The preview document itself carries the strict policy (the second layer).
    msg_id = api(app, "/api/messages")["messages"][0]["id"]
    with urllib.request.urlopen(f"{base_url(app)}/messages/{msg_id}/preview") as resp:
        csp = resp.headers["Content-Security-Policy"]
        doc = resp.read().decode()
    assert csp.startswith("default-src 'none'; img-src data: cid:; style-src 'unsafe-inline'")
    assert "<script" not in doc and "onerror" not in doc and remote not in doc

    # Train as spam with spamd behind it; the page shows spamd's answer.
    browser.find_element(By.ID, "train-spam").click()
    result = wait_until(browser, lambda d: d.find_element(By.ID, "train-result")
                        if d.find_element(By.ID, "train-result").text else False)
    assert result.text == "spamassassin: DidSet: local"
    screenshot(browser, "message-trained")

    # Nothing was requested from the remote listener, which does answer (control).
    assert requests == []
    with urllib.request.urlopen(f"{remote}/control") as resp:
        assert resp.status == 200
    assert requests == ["/control"]


def test_login_form_sets_the_token_cookie(browser: Any, start_gate: Any,
                                          tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    app = start_gate({"admin": {"listen": "127.0.0.1:0", "token_file": str(token_file)}})
    browser.get(base_url(app) + "/messages")
    assert browser.current_url.endswith("/login")
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.ID, "login").click()
    error = wait_until(browser, lambda d: d.find_element(By.ID, "login-error"))
    assert error.text == "Wrong token."
    browser.find_element(By.ID, "token").send_keys("s3cret-token")
    browser.find_element(By.ID, "login").click()
    wait_until(browser, lambda d: d.find_elements(By.ID, "sessions"))
    assert browser.current_url == base_url(app) + "/"
    assert browser.get_cookie("smtpgate_token")["value"] == "s3cret-token"
    screenshot(browser, "dashboard-after-login")
    # Without the cookie the API refuses.
    try:
        urllib.request.urlopen(base_url(app) + "/api/messages")
        raise AssertionError("the API answered without a token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401

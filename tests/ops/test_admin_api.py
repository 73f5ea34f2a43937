"""The admin JSON API (issue 12, "Admin HTTP API" and "Graceful reload"), through a real
aiohttp client over loopback, against a server started from a configuration file in its
own thread under each event loop (``loop_kind``)."""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiosmtpd.controller import Controller

from smtpgate.admin.openapi import document, served_operations
from smtpgate.admin.server import make_app
from smtpgate.app import Smtpgate
from smtpgate.config import load_config
from smtpgate.hooks import Stage

from ..support import RawClient, free_port, wait_for

MSG = b"From: a@example.org\r\nSubject: queued\r\nMessage-Id: <adm1@example.org>\r\n\r\nbody\r\n"






class Api:
    """A real aiohttp client (a fresh ClientSession per call) for one admin listener."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        self.token = token

    def __call__(self, method: str, path: str, body: Any = None, *,
                 token: str | None = None, raw: bytes | None = None
                 ) -> tuple[int, Any, dict[str, str]]:
        async def go() -> tuple[int, Any, dict[str, str]]:
            headers: dict[str, str] = {}
            tok = token if token is not None else self.token
            if tok:
                headers["Authorization"] = f"Bearer {tok}"
            async with aiohttp.ClientSession() as s, s.request(
                method, self.base + path, json=body, data=raw, headers=headers
            ) as r:
                data = await r.read()
                parsed: Any = (json.loads(data) if r.content_type == "application/json"
                               else data.decode())
                return r.status, parsed, dict(r.headers)

        return asyncio.run(go())


BASE = """
[server]
hostname = "mx.test"
listen = ["127.0.0.1:0"]
use_uvloop = {uvloop}
greeting = "{greeting}"

[maildir]
path = "{mail}"

[admin]
listen = "127.0.0.1:0"
"""


@pytest.fixture
def start(tmp_path: Path, loop_kind: str) -> Iterator[Callable[..., tuple[Smtpgate, Api, Path]]]:
    """``start(extra_toml, greeting=...)``: write smtpgate.toml, start smtpgate from it in a
    thread (asyncio or uvloop), return the app, an API client and the file."""
    apps: list[Smtpgate] = []

    def run(extra: str = "", *, greeting: str = "%H ESMTP smtpgate",
            token: str | None = None) -> tuple[Smtpgate, Api, Path]:
        path = tmp_path / "smtpgate.toml"
        path.write_text(config_text(extra, greeting=greeting))
        app = Smtpgate(load_config(path))
        app.start_thread()
        apps.append(app)
        host, port = app.admin.address if app.admin else ("", 0)
        assert port
        return app, Api(f"http://{host}:{port}", token), path

    def config_text(extra: str = "", *, greeting: str = "%H ESMTP smtpgate") -> str:
        return BASE.format(uvloop=str(loop_kind == "uvloop").lower(), greeting=greeting,
                           mail=tmp_path / "mail") + extra

    run.config_text = config_text  # type: ignore[attr-defined]
    yield run
    for app in apps:
        app.stop_thread(timeout=2)


# ----------------------------------------------------------------------- info


def test_info(start: Callable[..., tuple[Smtpgate, Api, Path]]) -> None:
    app, api, path = start()
    status, info, _ = api("GET", "/api/info")
    assert status == 200
    assert info["version"] == __import__("smtpgate").__version__
    assert info["config_file"] == str(path)
    assert info["delivery_mode"] == "local"
    assert info["listeners"] == [{"address": f"127.0.0.1:{app.port}", "protocol": "smtp",
                                  "tls": "none"}]
    assert app.admin is not None
    host, port = app.admin.address
    assert info["admin"] == f"{host}:{port}"
    assert info["started"] == app.started and info["uptime"] >= 0


# ------------------------------------------------------------------- sessions


def test_session_listed_then_killed(start: Callable[..., tuple[Smtpgate, Api, Path]]) -> None:
    app, api, _ = start()
    client = RawClient(app.port)
    try:
        assert client.cmd("EHLO client.example").startswith(b"250")
        status, sessions, _ = api("GET", "/api/sessions")
        assert status == 200
        (s,) = sessions
        assert s["helo"] == "client.example"
        assert s["client"] == "127.0.0.1"
        assert s["client_port"] == client.sock.getsockname()[1]
        assert s["state"] == "ready"
        assert s["tls"] is None and s["auth_user"] is None
        assert s["listener"] == f"127.0.0.1:{app.port}"
        assert s["bytes_in"] == len(b"EHLO client.example\r\n")
        assert s["bytes_out"] > len(client.greeting)
        status, body, _ = api("DELETE", f"/api/sessions/{s['id']}")
        assert (status, body) == (200, {"killed": s["id"]})
        assert client.read_line().startswith(b"421 4.3.2 ")
        assert client.sock.recv(1) == b""  # EOF (a timeout would raise)
        assert api("GET", "/api/sessions")[1] == []
        status, body, _ = api("DELETE", f"/api/sessions/{s['id']}")
        assert status == 404 and "no such session" in body["error"]
    finally:
        client.close()


# ---------------------------------------------------------------------- queue


class Upstream:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str]]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 OK"


def _send(port: int, sender: str, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.sendmail(sender, [rcpt], MSG)


def test_queue_actions_on_the_delivery_process(
    start: Callable[..., tuple[Smtpgate, Api, Path]], tmp_path: Path
) -> None:
    upstream = free_port()  # nothing listens there yet: every attempt is deferred
    spool = tmp_path / "spool"
    app, api, _ = start(f"""
[relay]
url = "smtp://127.0.0.1:{upstream}"
timeout = 3

[delivery]
mode = "queue"

[queue]
path = "{spool}"
min_backoff = 3600
max_backoff = 3600
scan_interval = 0.05
""")
    assert app.config.queue.delivery_process  # actions must reach the delivery process
    for n in range(3):
        _send(app.port, f"s{n}@example.org", f"r{n}@remote.test")

    def deferred() -> list[dict[str, Any]]:
        return [m for m in api("GET", "/api/queue")[1]["messages"] if m["state"] == "deferred"]

    assert wait_for(lambda: len(deferred()) == 3)
    status, queue, _ = api("GET", "/api/queue")
    assert status == 200 and queue["total"] == 3
    ids = {m["sender"]: m["id"] for m in queue["messages"]}
    a, b, c = ids["s0@example.org"], ids["s1@example.org"], ids["s2@example.org"]
    first = next(m for m in queue["messages"] if m["id"] == a)
    assert first["recipients"] == ["r0@remote.test"] and first["attempts"] == 1
    assert first["size"] > 0 and first["last_reply"]

    status, shown, _ = api("GET", f"/api/queue/{a}")
    assert status == 200 and shown["id"] == a
    assert ["Subject", "queued"] in shown["headers"]
    assert shown["recipients_detail"][0]["address"] == "r0@remote.test"
    assert api("GET", "/api/queue/NOSUCHID")[0] == 404

    status, held, _ = api("POST", f"/api/queue/{a}/hold")
    assert status == 200 and held["message"]["state"] == "hold"
    assert (spool / "hold" / f"{a}.json").exists()
    assert not (spool / "deferred" / f"{a}.json").exists()
    status, released, _ = api("POST", f"/api/queue/{a}/release")
    assert status == 200 and released["message"]["state"] == "deferred"
    assert (spool / "deferred" / f"{a}.json").exists()
    assert not (spool / "hold" / f"{a}.json").exists()

    status, body, _ = api("DELETE", f"/api/queue/{c}")
    assert (status, body) == (200, {"deleted": c})
    assert not (spool / "messages" / c).exists()
    assert api("DELETE", f"/api/queue/{c}")[0] == 404

    # bounce: the delivery process returns it to its sender (a DSN from <>) at once
    assert api("POST", f"/api/queue/{b}/bounce")[0] == 200
    assert wait_for(lambda: not (spool / "messages" / b).exists())
    dsn = [m for m in api("GET", "/api/queue")[1]["messages"] if m["sender"] == ""]
    assert dsn and dsn[0]["recipients"] == ["s1@example.org"]

    # flush: with the upstream up, the delivery process delivers everything now
    handler = Upstream()
    ctl = Controller(handler, hostname="127.0.0.1", port=upstream)
    ctl.start()
    try:
        status, body, _ = api("POST", "/api/queue/flush")
        assert status == 200 and set(body["flushed"]) == {a, dsn[0]["id"]}
        assert wait_for(lambda: not any((spool / "messages").iterdir()))
        assert ("s0@example.org", ["r0@remote.test"]) in handler.messages
        assert api("GET", "/api/queue")[1] == {"messages": [], "total": 0}
    finally:
        ctl.stop()
    assert api("POST", f"/api/queue/{a}/frobnicate")[0] == 404


def test_queue_routes_outside_queue_mode(start: Callable[..., tuple[Smtpgate, Api, Path]]
                                         ) -> None:
    _, api, _ = start()
    assert api("GET", "/api/queue")[1] == {"messages": [], "total": 0}
    status, body, _ = api("POST", "/api/queue/X/hold")
    assert status == 409 and "queue" in body["error"]


# ---------------------------------------------------------------------- relay


def test_relay_domain_added_through_the_api(
    start: Callable[..., tuple[Smtpgate, Api, Path]]
) -> None:
    app, api, _ = start("""
[relay]
relay_domains = ["local.test"]
local_networks = ["192.0.2.0/24"]
""")
    client = RawClient(app.port)
    try:
        client.cmd("EHLO client.example")
        assert client.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        assert client.cmd("RCPT TO:<u@other.test>").startswith(b"550 5.7.1")
        status, relay, _ = api("POST", "/api/relay/domains", {"domain": "Other.Test"})
        assert status == 200 and "other.test" in relay["relay_domains"]
        assert client.cmd("RCPT TO:<u@other.test>").startswith(b"250")
        assert api("GET", "/api/relay")[1] == {
            "relay_domains": ["local.test", "other.test"], "local_networks": ["192.0.2.0/24"]}
        assert api("DELETE", "/api/relay/domains/other.test")[0] == 200
        assert client.cmd("RCPT TO:<v@other.test>").startswith(b"550 5.7.1")
        assert api("DELETE", "/api/relay/domains/other.test")[0] == 404
    finally:
        client.close()
    status, body, _ = api("POST", "/api/relay/domains", {"domain": "bad domain!"})
    assert status == 422 and "invalid relay domain" in body["error"]
    status, body, _ = api("POST", "/api/relay/domains", raw=b"{not json")
    assert status == 400 and "domain" in body["error"]
    status, relay, _ = api("POST", "/api/relay/networks", {"network": "198.51.100.7/24"})
    assert status == 200 and relay["local_networks"] == ["192.0.2.0/24", "198.51.100.0/24"]
    assert api("POST", "/api/relay/networks", {"network": "300.1.1.1"})[0] == 422
    assert api("DELETE", "/api/relay/networks/198.51.100.0%2F24")[0] == 200
    assert api("GET", "/api/relay")[1]["local_networks"] == ["192.0.2.0/24"]
    assert api("DELETE", "/api/relay/networks/198.51.100.0%2F24")[0] == 404
    status, body, headers = api("PUT", "/api/relay")
    assert status == 405 and body["error"] and "GET" in headers["Allow"]
    status, body, _ = api("GET", "/api/no/such/route")
    assert status == 404 and body == {"error": "Not Found"}


# -------------------------------------------------------------------- plugins


def test_plugins_chain(start: Callable[..., tuple[Smtpgate, Api, Path]]) -> None:
    app, api, _ = start()
    status, chain, _ = api("GET", "/api/plugins")
    assert status == 200
    expected = [(st.value, h.name, h.priority) for st in Stage for h in app.hooks.hooks(st)]
    assert [(h["stage"], h["hook"], h["priority"]) for h in chain] == expected
    relay = [h for h in chain if h["name"] == "relay"]
    assert relay == [{"stage": "rcpt", "position": relay[0]["position"], "name": "relay",
                      "plugin": "relay", "hook": relay[0]["hook"], "priority": -90,
                      "timeout": app.hooks.timeout, "on_error": "tempfail",
                      "blocking": False}]


# --------------------------------------------------------------------- reload


def test_reload_valid_then_invalid(start: Callable[..., tuple[Smtpgate, Api, Path]],
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpgate")
    app, api, path = start(greeting="old banner")
    before = RawClient(app.port)
    clients = [before]
    try:
        assert before.greeting == b"220 old banner"
        text = start.config_text(greeting="new banner")  # type: ignore[attr-defined]
        path.write_text(text.replace('hostname = "mx.test"', 'hostname = "new.test"'))
        status, body, _ = api("POST", "/api/reload")
        assert (status, body) == (200, {"reloaded": True, "restart_needed": []})
        after = RawClient(app.port)
        clients.append(after)
        assert after.greeting == b"220 new banner"
        assert after.cmd("EHLO c.example").startswith(b"250-new.test")
        # the session opened before keeps the settings it started with
        assert before.cmd("EHLO c.example").startswith(b"250-mx.test")

        # a setting bound at start: applied after a restart only, and said so
        path.write_text(text.replace('greeting = "new banner"',
                                     'greeting = "new banner"\nmax_connections = 7'))
        status, body, _ = api("POST", "/api/reload")
        assert (status, body) == (200, {"reloaded": True,
                                        "restart_needed": ["server.max_connections"]})

        # an invalid file: refused with the error, the running configuration kept
        path.write_text(text.replace('greeting = "new banner"',
                                     'greeting = "broken banner"\nmax_recipients = "lots"'))
        status, body, _ = api("POST", "/api/reload")
        assert status == 422 and body["reloaded"] is False
        assert "server.max_recipients" in body["error"]
        assert any(r.levelno == logging.ERROR and "reload failed, keeping the running "
                   "configuration" in r.getMessage() and "server.max_recipients"
                   in r.getMessage() for r in caplog.records)
        path.write_text("[server\n")
        status, body, _ = api("POST", "/api/reload")
        assert status == 422 and "line 1" in body["error"]
        third = RawClient(app.port)
        clients.append(third)
        assert third.greeting == b"220 new banner"  # still the last good configuration
        assert api("GET", "/api/info")[0] == 200
    finally:
        for c in clients:
            c.close()


def test_reload_without_a_file_is_409(tmp_path: Path, loop_kind: str) -> None:
    app = Smtpgate({"server": {"listen": ["127.0.0.1:0"], "use_uvloop": loop_kind == "uvloop"},
                    "maildir": {"path": str(tmp_path / "mail")},
                    "admin": {"listen": "127.0.0.1:0"}})
    app.start_thread()
    try:
        assert app.admin is not None
        host, port = app.admin.address
        api = Api(f"http://{host}:{port}")
        status, body, _ = api("POST", "/api/reload")
        assert status == 409 and body["reloaded"] is False and "<mapping>" in body["error"]
    finally:
        app.stop_thread(timeout=2)


# ---------------------------------------------------------------------- token


def test_token_required_but_not_for_metrics(
    start: Callable[..., tuple[Smtpgate, Api, Path]], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    _, api, _ = start(f'token_file = "{token_file}"\n')
    status, body, headers = api("GET", "/api/info")
    assert status == 401 and "token" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert api("GET", "/api/info", token="wrong")[0] == 401
    assert api("POST", "/api/reload", token="wrong")[0] == 401
    assert api("GET", "/api/info", token="s3cret-token")[0] == 200
    assert api("GET", "/api/openapi.json", token="s3cret-token")[0] == 200
    status, text, _ = api("GET", "/metrics")
    assert status == 200 and isinstance(text, str)


# -------------------------------------------------------------------- openapi


def test_openapi_lists_every_route(start: Callable[..., tuple[Smtpgate, Api, Path]]) -> None:
    app, api, _ = start()
    status, doc, _ = api("GET", "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    listed = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert listed == served_operations(make_app(app))
    assert document(make_app(app))["paths"] == doc["paths"]
    mine = {
        ("/api/info", "get"), ("/api/sessions", "get"), ("/api/sessions/{id}", "delete"),
        ("/api/queue", "get"), ("/api/queue/flush", "post"), ("/api/queue/{id}", "get"),
        ("/api/queue/{id}", "delete"), ("/api/queue/{id}/hold", "post"),
        ("/api/queue/{id}/release", "post"), ("/api/queue/{id}/flush", "post"),
        ("/api/queue/{id}/bounce", "post"), ("/api/relay", "get"),
        ("/api/relay/domains", "post"), ("/api/relay/domains/{domain}", "delete"),
        ("/api/relay/networks", "post"), ("/api/relay/networks/{network}", "delete"),
        ("/api/plugins", "get"), ("/api/reload", "post"), ("/api/openapi.json", "get"),
        ("/metrics", "get"),
    }
    assert mine <= listed
    for path, method in listed:
        op = doc["paths"][path][method]
        assert op["responses"], (path, method)
        if path.startswith("/api/"):
            assert not op.get("x-smtpgate-page"), f"{method} {path} is not described"
    assert doc["paths"]["/metrics"]["get"]["security"] == []


# -------------------------------------------------------------------- workers


def _workers_config(tmp_path: Path, port: int, admin_port: int,
                    hostname: str = "mx.test") -> str:
    """Two workers, Maildir delivery, loopback not a local network (relay control
    refuses it), the admin listener on ``admin_port``."""
    return f"""
[server]
hostname = "{hostname}"
listen = ["127.0.0.1:{port}"]
workers = 2

[maildir]
path = "{tmp_path / "mail"}"

[relay]
local_networks = ["192.0.2.0/24"]

[admin]
listen = "127.0.0.1:{admin_port}"
"""


def _api_call(base: str, method: str, path: str,
              body: dict[str, str] | None = None) -> tuple[int, Any]:
    """One admin API request (JSON body), without a token: (status, decoded JSON)."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_admin_api_with_workers(tmp_path: Path) -> None:
    """``server.workers = 2``: the supervisor serves the admin API; sessions come from
    every worker (each with its number) and are killed where they run; a relay domain
    added through the API applies in every worker; /metrics adds the workers up."""
    import subprocess
    import sys
    import urllib.request

    port, admin_port = free_port(), free_port()
    conf = tmp_path / "smtpgate.toml"
    conf.write_text(_workers_config(tmp_path, port, admin_port))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "-c", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{admin_port}"

    def call(method: str, path: str, body: dict[str, str] | None = None) -> tuple[int, Any]:
        return _api_call(base, method, path, body)

    clients: list[RawClient] = []
    try:
        # the supervisor's line, once every worker runs (theirs come first)
        assert wait_for(lambda: b"with 2 workers" in log_path.read_bytes(), 60), \
            log_path.read_text()
        for i in range(6):  # the kernel spreads them over both workers
            c = RawClient(port)
            assert c.cmd(f"EHLO held{i}.test").startswith(b"250")
            clients.append(c)
        status, sessions = call("GET", "/api/sessions")
        assert status == 200
        assert sorted(s["helo"] for s in sessions) == [f"held{i}.test" for i in range(6)]
        assert {s["worker"] for s in sessions} <= {1, 2}
        victim = next(s for s in sessions if s["helo"] == "held0.test")
        assert call("DELETE", f"/api/sessions/{victim['id']}") == (200, {"killed": victim["id"]})
        assert clients[0].read_reply().startswith(b"421 4.3.2")
        assert call("DELETE", f"/api/sessions/{victim['id']}")[0] == 404
        # relay control in every worker follows the API
        for c in clients[1:]:
            c.cmd("MAIL FROM:<a@example.org>")
            assert c.cmd("RCPT TO:<b@added.example>").startswith(b"550 5.7.1")
        assert call("POST", "/api/relay/domains", {"domain": "added.example"})[0] == 200
        for c in clients[1:]:
            assert c.cmd("RCPT TO:<b@added.example>").startswith(b"250"), "in every worker"
        assert call("DELETE", "/api/relay/domains/added.example")[0] == 200
        for c in clients[1:]:
            assert c.cmd("RCPT TO:<c@added.example>").startswith(b"550 5.7.1")
        for c in clients[1:]:
            c.cmd("QUIT")
            c.close()

        def sessions_total() -> float:
            with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("smtpgate_sessions_total"))

        assert wait_for(lambda: sessions_total() == 6)
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(timeout=60)


def test_replaced_worker_gets_the_reloaded_configuration_and_relay_changes(
        tmp_path: Path) -> None:
    """``server.workers = 2``: after a reload (SIGHUP) and a relay domain added through the
    API, a worker that dies (kill -9) is replaced by one that runs the reloaded
    configuration and has the API's change too."""
    import os
    import re
    import signal
    import subprocess
    import sys

    port, admin_port = free_port(), free_port()
    conf = tmp_path / "smtpgate.toml"

    def write_config(hostname: str) -> None:
        conf.write_text(_workers_config(tmp_path, port, admin_port, hostname))

    write_config("mx.test")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "-c", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{admin_port}"

    def call(method: str, path: str, body: dict[str, str] | None = None) -> tuple[int, Any]:
        return _api_call(base, method, path, body)

    def text() -> str:
        return log_path.read_text(errors="replace")

    clients: list[RawClient] = []
    try:
        assert wait_for(lambda: "with 2 workers" in text(), 60), text()
        write_config("mx2.test")
        proc.send_signal(signal.SIGHUP)
        # the supervisor and both workers
        assert wait_for(lambda: text().count("configuration reloaded") == 3, 30), text()
        assert call("POST", "/api/relay/domains", {"domain": "added.example"})[0] == 200
        [victim] = re.findall(r"worker 1 started \(pid (\d+)\)", text())
        os.kill(int(victim), signal.SIGKILL)
        assert wait_for(lambda: len(re.findall(r"worker 1 started", text())) == 2, 30), text()

        def both_workers_held() -> bool:
            c = RawClient(port)
            clients.append(c)
            assert c.cmd("EHLO client.test").startswith(b"250")
            status, sessions = call("GET", "/api/sessions")
            return status == 200 and {s["worker"] for s in sessions} == {1, 2}

        assert wait_for(both_workers_held, 30)
        for c in clients:
            assert b"mx2.test" in c.greeting, "the reloaded host name in every worker"
            assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
            assert c.cmd("RCPT TO:<b@added.example>").startswith(b"250"), "every worker"
            c.cmd("RSET")
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(timeout=60)

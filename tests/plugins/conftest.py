"""Fixtures for the plugin tests: docs/examples on ``sys.path``, a recording file for the
probe plugin, an aiosmtpd upstream on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from .probe import read_records

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"


@pytest.fixture
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    """docs/examples first on ``sys.path`` (as ``PYTHONPATH`` would put it)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return EXAMPLES


class Records:
    """The probe plugin's recording file (option ``record``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self, stage: str | None = None) -> list[dict[str, Any]]:
        return [r for r in read_records(self.path) if stage is None or r["stage"] == stage]

    def wait(self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
             ) -> list[dict[str, Any]]:
        """The records once ``pred(records)`` holds (polling; fails after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.all()
            if pred(records):
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met; records: {records}")
            time.sleep(0.05)


@pytest.fixture
def records(tmp_path: Path) -> Records:
    return Records(tmp_path / "probe.jsonl")


def probe(records: Records | None = None, **options: Any) -> dict[str, Any]:
    """A ``[[plugin]]`` table for the probe plugin (tests/plugins/probe.py)."""
    table: dict[str, Any] = {"module": "tests.plugins.probe", **options}
    if records is not None:
        table["record"] = str(records.path)
    return table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Handler:
    """aiosmtpd handler: records messages; refuses listed recipients or the data."""

    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                  bytes(envelope.original_content)))
        return "250 2.0.0 Ok: queued upstream"


@dataclass
class Upstream:
    handler: Handler
    port: int


@pytest.fixture
def start_upstream() -> Iterator[Callable[..., Upstream]]:
    """``start_upstream(refuse_rcpt={...}, data_reply=...)``: an aiosmtpd upstream."""
    started: list[Controller] = []

    def start(**kwargs: Any) -> Upstream:
        handler = Handler(**kwargs)
        port = free_port()
        ctl = Controller(handler, hostname="127.0.0.1", port=port,
                         server_hostname="upstream.test")
        ctl.start()
        started.append(ctl)
        return Upstream(handler, port)

    yield start
    for ctl in started:
        ctl.stop(no_assert=True)

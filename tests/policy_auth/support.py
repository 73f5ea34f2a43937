"""Helpers of the sender-authentication tests: the test DNS server in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tests.delivery.dns_server import DnsServer


class ThreadedDns:
    """The test DNS server in a thread of its own (smtpgate resolves from worker threads)."""

    def __init__(self, records: dict[tuple[str, str], list[str]], **kw: Any) -> None:
        self.server = DnsServer(records, **{"zone": "org", **kw})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedDns:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def port(self) -> int:
        return self.server.port

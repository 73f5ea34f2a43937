"""Baseline server for the benchmark: aiosmtpd with a handler that discards each message.

Entry point: ``python bench/aiosmtpd_discard.py --port PORT [--uvloop]``. Listens on
127.0.0.1 only, one process, one event loop, like ``smtpgate serve``. Prints
``ready PORT`` on stdout once listening; SIGTERM/SIGINT stop it and print the message
and byte counts received (so the harness can cross-check what smtp-source sent).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class DiscardHandler:
    """aiosmtpd handler: accept every recipient, drop every message (counts them)."""

    def __init__(self) -> None:
        self.messages = 0
        self.octets = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count the message (bytes after dot-unstuffing) and answer 250."""
        self.messages += 1
        content = envelope.original_content or b""
        self.octets += len(content)
        return "250 OK"


async def serve(port: int) -> DiscardHandler:
    """Serve on 127.0.0.1:port until SIGTERM/SIGINT; return the handler (with counts)."""
    loop = asyncio.get_running_loop()
    handler = DiscardHandler()

    def factory() -> SMTP:
        # hostname= avoids socket.getfqdn() (DNS) per connection.
        return SMTP(handler, hostname="bench.local", ident="aiosmtpd-bench", loop=loop)

    server = await loop.create_server(factory, host="127.0.0.1", port=port, backlog=1024,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"ready {bound}", flush=True)
    await stop.wait()
    server.close()
    return handler


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the server, print the counters on exit."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = ap.parse_args(argv)
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    handler: Any = asyncio.run(serve(args.port))
    print(f"messages {handler.messages} octets {handler.octets}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

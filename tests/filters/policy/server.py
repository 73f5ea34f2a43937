"""A small Postfix policy server for the tests, written with asyncio in a thread of its own:
it records every request (and the connection it came on) and answers what the test's
``respond`` function returns (``None``: close the connection without replying)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from smtpgate.plugins.policy_codec import AttributeReader, encode_response


@dataclass
class Request:
    attrs: dict[str, str]
    pairs: list[tuple[str, str]]
    conn: int


Respond = Callable[[dict[str, str]], "str | None"]


@dataclass
class PolicyServer:
    """``PolicyServer(respond).start()``; ``address`` is ``127.0.0.1:PORT`` or
    ``unix:PATH``. ``requests``: every request; ``connections``: accepted so far."""

    respond: Respond
    unix_path: str | None = None
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    address: str = ""
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.AbstractServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
            conn = self.connections
        parser = AttributeReader()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for record in parser.feed(data):
                    req = Request(dict(record), record, conn)
                    with self.lock:
                        self.requests.append(req)
                    action = await asyncio.get_running_loop().run_in_executor(
                        None, self.respond, req.attrs)
                    if action is None:
                        writer.close()
                        return
                    if action.startswith("\0"):  # raw bytes, for protocol errors
                        writer.write(action[1:].encode())
                    elif not action:
                        writer.write(b"action=\n\n")
                    else:
                        writer.write(encode_response(action))
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def start(self) -> PolicyServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                if self.unix_path:
                    self._server = await asyncio.start_unix_server(self._handle, self.unix_path)
                    self.address = f"unix:{self.unix_path}"
                else:
                    self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
                    self.port = self._server.sockets[0].getsockname()[1]
                    self.address = f"127.0.0.1:{self.port}"
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def states(self) -> list[str]:
        with self.lock:
            return [r.attrs.get("protocol_state", "") for r in self.requests]

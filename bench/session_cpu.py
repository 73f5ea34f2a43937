"""CPU per message of the session and the protocol core alone: no sockets, no kernel.

Entry point: ``python bench/session_cpu.py [-c CONFIG] [--sessions N] [--messages M]
[--rounds R] [--loop uvloop|asyncio]``. It starts smtpgate from CONFIG (default: the
discard configuration of the shared rig, ``bench/peers_discard.toml``, on a free loopback
port that is never used), then drives N sessions at once through an in-memory transport:
each sends EHLO once, then M times MAIL, RCPT, DATA and the 4 KiB text of scenario a (the
message Postfix's ``smtp-source -l 4096`` sends), each command only after the reply to
the previous one, as ``smtp-source`` does. The figure is the process CPU time
(:func:`time.process_time`) per message, the best of R rounds.

What it leaves out is exactly what the shared rig adds: the socket reads and writes, the
kernel's loopback path and the event loop's polling. So it isolates the Python work per
message (session, protocol core, hooks, Received header, metrics) with a few percent of
noise, where a loopback run on this 2-core VM varies by 5 % or more. It is a tool for
deciding between two versions of the code (run it against both trees with PYTHONPATH),
not a figure to report against a target: those come from the shared rig (METHOD.md).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from smtpgate.app import Smtpgate
from smtpgate.config import load_config
from smtpgate.server.session import Session

HERE = Path(__file__).resolve().parent
#: What Postfix's ``smtp-source -l 4096`` sends: 4 header fields, then about 4 KiB of
#: 78-character lines that start with their number, then the final dot.
_HEADERS = (b"From: <foo@vm>\r\nTo: <foo@vm>\r\nDate: Sat,  5 Dec 2026 01:46:10 +0000 (UTC)\r\n"
            b"Message-Id: <5130.0003.0000@vm>\r\n\r\n")
_BODY = b"".join(b"%d" % i + b"X" * (78 - len(b"%d" % i)) + b"\r\n" for i in range(1, 52)) \
    + b"X" * 16 + b"\r\n"
_COMMANDS = (b"MAIL FROM:<foo@vm>\r\n", b"RCPT TO:<foo@vm>\r\n", b"DATA\r\n",
             _HEADERS + _BODY + b".\r\n")


class _Transport:
    """The parts of an asyncio transport a :class:`Session` uses, in memory: every
    write is taken as the reply the client waits for."""

    def __init__(self, on_reply: Callable[[], None]) -> None:
        self._on_reply = on_reply
        self._closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(
            name, default)

    def write(self, data: bytes) -> None:
        self._on_reply()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Client:
    """One scripted client: EHLO, then ``messages`` transactions, one command per reply.
    The next command is fed on the loop's next turn, as a socket read would be."""

    def __init__(self, loop: asyncio.AbstractEventLoop, session: Session, messages: int,
                 done: Callable[[], None]) -> None:
        self.loop = loop
        self.session = session
        self.left = messages
        self.done = done
        self.step = -1  # -1: the greeting came, EHLO is next

    def reply(self) -> None:
        self.loop.call_soon(self.send)

    def send(self) -> None:
        if self.step < 0:
            self.step = 0
            self.session.data_received(b"EHLO vm\r\n")
            return
        if self.step == 0:
            if not self.left:
                self.done()
                return
            self.left -= 1
        self.session.data_received(_COMMANDS[self.step])
        self.step = (self.step + 1) % len(_COMMANDS)


class _Countdown:
    """A future that is done once :meth:`done` was called ``count`` times."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.future: asyncio.Future[None] = loop.create_future()
        self.left = count

    def done(self) -> None:
        self.left -= 1
        if not self.left:
            self.future.set_result(None)


async def _measure(config: Path, sessions: int, messages: int, rounds: int) -> list[float]:
    app = Smtpgate(load_config(config))
    await app.start()
    try:
        server = app.server
        assert server is not None
        ctx = server.listeners[0][2]
        loop = asyncio.get_running_loop()
        results: list[float] = []
        for _ in range(rounds):
            finished = _Countdown(loop, sessions)
            started = time.process_time()
            for _ in range(sessions):
                session = Session(server, ctx)
                client = _Client(loop, session, messages, finished.done)
                session.connection_made(_Transport(client.reply))  # type: ignore[arg-type]
            await finished.future
            results.append((time.process_time() - started) / (sessions * messages) * 1e6)
        return results
    finally:
        await app.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, default=HERE / "peers_discard.toml")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=1000, help="per session and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # The configuration's listener is opened (the app needs one) on an unused port.
        text = args.config.read_text()
        config = Path(tmp) / "config.toml"
        config.write_text(text.replace("[server]\n", "[server]\nlisten = [\"127.0.0.1:"
                                       f"{_free_port()}\"]\n", 1))
        coro = _measure(config, args.sessions, args.messages, args.rounds)
        if args.loop == "uvloop":
            import uvloop

            results = uvloop.run(coro)
        else:
            results = asyncio.run(coro)
    print(f"session CPU per message (scenario a's commands, {args.sessions} sessions, "
          f"{args.loop}): best {min(results):.1f} us, rounds "
          + " ".join(f"{r:.1f}" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small milter written for the tests with smtpgate's own codec (the server side).

:class:`ScriptedMilter` listens on a private Unix socket (or a loopback port), records
every command it receives per connection, and answers with what its ``script`` says:
``script(conn, command)`` returns the responses to send for that command (``None``: the
default, ``Continue`` for the commands that expect a reply). It negotiates the given
actions, protocol flags and macro lists. ``"close"`` in a script's answer closes the
connection (a milter that goes away).
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smtpgate.milter import codec
from smtpgate.milter.codec import SMFIP

# Commands that never get a reply (plus those an NR_* flag silences).
_NO_REPLY = (codec.Macro, codec.Abort, codec.Quit, codec.QuitNewConnection)
_NR_FLAG: dict[type, int] = {
    codec.Connect: SMFIP.NR_CONN, codec.Helo: SMFIP.NR_HELO, codec.Mail: SMFIP.NR_MAIL,
    codec.Rcpt: SMFIP.NR_RCPT, codec.Data: SMFIP.NR_DATA, codec.Unknown: SMFIP.NR_UNKN,
    codec.Header: SMFIP.NR_HDR, codec.EndOfHeaders: SMFIP.NR_EOH, codec.Body: SMFIP.NR_BODY,
}


@dataclass
class MilterConn:
    """One MTA connection as the scripted milter saw it."""

    commands: list[Any] = field(default_factory=list)
    macros: dict[str, dict[str, str]] = field(default_factory=dict)
    offered: codec.OptNeg | None = None
    closed: bool = False

    def of(self, kind: type) -> list[Any]:
        return [c for c in self.commands if isinstance(c, kind)]

    @property
    def kinds(self) -> list[str]:
        return [type(c).__name__ for c in self.commands if not isinstance(c, codec.Macro)]


Script = Callable[[MilterConn, Any], Sequence[Any] | None]


class ScriptedMilter:
    """A milter in a background thread.

    Args:
        script: the answers (see the module docstring).
        actions / protocol / macros: what it asks for in OPTNEG.
        tcp: listen on 127.0.0.1:free port instead of a Unix socket.
    """

    def __init__(self, script: Script | None = None, *, actions: int = codec.ACTIONS_ALL,
                 protocol: int = 0, macros: dict[int, tuple[str, ...]] | None = None,
                 tcp: bool = False) -> None:
        self.script = script or (lambda conn, cmd: None)
        self.optneg = codec.OptNeg(6, actions, protocol, macros or {})
        self.conns: list[MilterConn] = []
        self._lock = threading.Condition()
        self._dir = tempfile.mkdtemp(prefix="smtpgate-milter-")
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        if tcp:
            class TCP(socketserver.ThreadingTCPServer):
                daemon_threads = True
                allow_reuse_address = True
            self.server: socketserver.BaseServer = TCP(("127.0.0.1", 0), Handler)
            port = self.server.server_address[1]  # type: ignore[index]
            self.socket = f"inet:{port}@127.0.0.1"
        else:
            self.path = os.path.join(self._dir, "milter.sock")

            class Unix(socketserver.ThreadingUnixStreamServer):
                daemon_threads = True
            self.server = Unix(self.path, Handler)
            self.socket = f"unix:{self.path}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def settle(self, timeout: float = 20.0) -> None:
        """Wait until every connection so far was closed (the MTA sent QUIT or hung up)."""
        with self._lock:
            self._lock.wait_for(lambda: all(c.closed for c in self.conns), timeout)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(OSError):
            for p in Path(self._dir).iterdir():
                p.unlink()
            os.rmdir(self._dir)

    def _serve(self, sock: socket.socket) -> None:
        conn = MilterConn()
        with self._lock:
            self.conns.append(conn)
        decoder = codec.FrameDecoder()
        protocol = 0
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                for frame in decoder.feed(data):
                    cmd = codec.decode_command(frame)
                    conn.commands.append(cmd)
                    if isinstance(cmd, codec.Macro):
                        conn.macros.setdefault(cmd.stage, {}).update(cmd.macros)
                    if isinstance(cmd, codec.OptNeg):
                        conn.offered = cmd
                        protocol = self.optneg.protocol
                        sock.sendall(codec.encode(self.optneg))
                        continue
                    answer = self.script(conn, cmd)
                    if answer is None:
                        if isinstance(cmd, _NO_REPLY) or protocol & _NR_FLAG.get(type(cmd), 0):
                            answer = []
                        else:
                            answer = [codec.Continue()]
                    for item in answer:
                        if item == "close":
                            return
                        sock.sendall(codec.encode(item))
                    if isinstance(cmd, codec.Quit):
                        return
        finally:
            sock.close()
            with self._lock:
                conn.closed = True
                self._lock.notify_all()

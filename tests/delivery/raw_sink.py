"""A minimal SMTP sink run as its own process (``python raw_sink.py OUT_DIR``): prints its
loopback port, answers EHLO/MAIL/RCPT/RSET/QUIT with 2xx, and writes the DATA section of
each transaction *as it came over the wire* (dot-stuffed, with the final ``.CRLF``) to
``OUT_DIR/<n>.raw``. Used to check the exact bytes smtpgate sends (no un-stuffing here)."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path


def serve(conn: socket.socket, out: Path, counter: list[int], lock: threading.Lock) -> None:
    f = conn.makefile("rb")
    conn.sendall(b"220 raw-sink ESMTP\r\n")
    while True:
        line = f.readline(8192)
        if not line:
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            conn.sendall(b"250-raw-sink\r\n250-SIZE 1000000000\r\n250 8BITMIME\r\n")
        elif verb == b"DATA":
            conn.sendall(b"354 go ahead\r\n")
            with lock:
                counter[0] += 1
                n = counter[0]
            tail = b""
            with open(out / f"{n}.raw.part", "wb") as w:
                while True:
                    chunk = f.read1(1 << 16)
                    if not chunk:
                        return
                    w.write(chunk)
                    tail = (tail + chunk)[-5:]
                    if tail == b"\r\n.\r\n":
                        break
            (out / f"{n}.raw.part").rename(out / f"{n}.raw")
            conn.sendall(b"250 2.0.0 stored\r\n")
        elif verb == b"QUIT":
            conn.sendall(b"221 2.0.0 bye\r\n")
            return
        else:
            conn.sendall(b"250 2.0.0 OK\r\n")


def main() -> None:
    out = Path(sys.argv[1])
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    counter = [0]
    lock = threading.Lock()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, out, counter, lock), daemon=True).start()


if __name__ == "__main__":
    main()

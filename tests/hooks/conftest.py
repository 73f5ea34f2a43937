"""Shared fixtures for the hooks tests: a session, corpus access, transactions."""

from __future__ import annotations

import csv
import os
import pathlib
import re
from collections.abc import Callable

import pytest

from smtpgate.envelope import Envelope, SessionInfo
from smtpgate.hooks import Transaction

CORPUS = pathlib.Path(os.environ.get("MAIL_CORPUS", "/work/shared/corpus"))


def corpus_rows() -> list[dict[str, str]]:
    """The corpus manifest rows (empty when the corpus is not available)."""
    manifest = CORPUS / "MANIFEST.tsv"
    if not manifest.exists():
        return []
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def to_crlf(data: bytes) -> bytes:
    """Normalise every line ending (LF, CRLF) to CRLF, as the protocol core delivers."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def corpus_bytes(name: str, crlf: bool = True) -> bytes:
    path = CORPUS / name
    if not path.exists():
        pytest.skip(f"corpus file {name} not available")
    data = path.read_bytes()
    return to_crlf(data) if crlf else data


@pytest.fixture
def session() -> SessionInfo:
    return SessionInfo(session_id="S1", peer_ip="127.0.0.1", peer_port=40000)


@pytest.fixture
def make_txn() -> Callable[..., Transaction]:
    def make(message: bytes | None = None, smtputf8: bool = False) -> Transaction:
        params: dict[str, str | None] = {"SMTPUTF8": None} if smtputf8 else {}
        txn = Transaction(Envelope("sender@example.org", params), "T1")
        if message is not None:
            txn.message = message
        return txn

    return make

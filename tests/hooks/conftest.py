"""Shared fixtures for the hooks tests: a session and transactions."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from smtpgate.envelope import Envelope, SessionInfo
from smtpgate.hooks import Transaction


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

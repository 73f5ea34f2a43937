"""Fixtures for the policy-client tests: the test policy server, free ports."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .server import PolicyServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def policy_server() -> Iterator[Callable[..., PolicyServer]]:
    """``policy_server(respond, unix_path=None)``: a started :class:`PolicyServer`."""
    started: list[PolicyServer] = []

    def start(respond: Any, unix_path: str | None = None) -> PolicyServer:
        server = PolicyServer(respond, unix_path=unix_path).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()

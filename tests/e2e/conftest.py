"""Fixtures of the real-input end-to-end tests (helpers live in ``e2e_support``).

Entry points: the module-scoped ``upstream`` fixture, an aiosmtpd capture upstream; every
test runs under both event loops (the autouse ``_gate_loop`` fixture).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import e2e_support
from .e2e_support import CaptureUpstream, capture_upstream


@pytest.fixture(autouse=True)
def _gate_loop(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every e2e test under both event loops (``[asyncio]`` / ``[uvloop]`` ids):
    :func:`~tests.e2e.e2e_support.running_gate` starts smtpgate in ``loop_kind``."""
    monkeypatch.setattr(e2e_support, "LOOP_KIND", loop_kind)


@pytest.fixture(scope="module")
def upstream() -> Iterator[CaptureUpstream]:
    """A module-wide aiosmtpd capture upstream (see :func:`capture_upstream`)."""
    with capture_upstream() as up:
        yield up

"""Fixtures of the real-input end-to-end tests (helpers live in ``e2e_support``).

Entry point: the module-scoped ``upstream`` fixture, an aiosmtpd capture upstream.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .e2e_support import CaptureUpstream, capture_upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[CaptureUpstream]:
    """A module-wide aiosmtpd capture upstream (see :func:`capture_upstream`)."""
    with capture_upstream() as up:
        yield up

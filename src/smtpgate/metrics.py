"""Prometheus metrics (docs/operations.md): names with the ``smtpgate_`` prefix,
served at ``/metrics`` on the admin listener."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


def exposition() -> tuple[bytes, str]:
    """The current metrics in the Prometheus text format: ``(body, content type)``."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

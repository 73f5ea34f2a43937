"""Admin routes: api (docs/operations.md)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Add this module's routes to the admin application app."""

"""Fixtures shared by the sender-authentication and policy tests (see support.py)."""

from __future__ import annotations

from tests.policy_auth.support import redis_url

__all__ = ["redis_url"]

"""Shipped plugin ``arc`` (RFC 8617, dkimpy): verify the ARC chain of incoming mail;
seal relayed mail when configured.

Entry point: :func:`register`. Verification at the ``data`` stage (priority -35) records
``arc`` = ``pass``, ``fail`` or ``none`` (no chain) in ``transaction.results``; the
``authentication-results`` plugin writes it as ``arc=...``. Sealing (``seal = true``) runs
late (priority 92): after the ``authentication-results`` plugin (priority 90) wrote this
host's Authentication-Results header, from which the ARC-Authentication-Results header and
the chain validation status are taken, so that plugin is required; before DKIM signing
(95). Keys as the ``dkim`` plugin's (``KEY_DIR/DOMAIN/SELECTOR.key``, RSA: ARC has no
Ed25519). dkimpy runs in a worker thread, its DNS through the ``[dns]`` resolvers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import dkim

from ..dkimkeys import load_key
from ..dns import sync_resolver
from ..envelope import SessionInfo
from ..errors import ConfigError
from ..hooks import Transaction
from . import Option, OptionError, PluginRegistry
from .dkim import _Lookups

log = logging.getLogger("smtpgate.plugins.arc")

PRIORITY = -35
OPTIONS: dict[str, Option] = {
    "verify": Option(bool, default=True, help="verify the ARC chain of incoming mail"),
    "seal": Option(bool, default=False, help="add an ARC set to every message"),
    "domain": Option(str, default="", help="the sealing domain (d=)"),
    "selector": Option(str, default="", help="the sealing key's selector (s=)"),
    "key_dir": Option(str, default="", help="KEY_DIR/DOMAIN/SELECTOR.key"),
    "authserv_id": Option(str, default="",
                          help="as the authentication-results plugin's (default: hostname)"),
}


def _verify(message: bytes, lookups: _Lookups) -> tuple[str, str]:
    """(chain validation status, reason) of ``message`` (blocking; dkimpy)."""
    try:
        cv, _, reason = dkim.arc_verify(message, dnsfunc=lookups, minkey=1024)
    except Exception as exc:  # dkimpy on input it cannot parse: bad input is normal
        return "fail", f"{type(exc).__name__}: {exc}"[:200]
    text = cv.decode("ascii", "replace") if isinstance(cv, bytes) else str(cv)
    return text.lower(), str(reason)[:200]


def register(registry: PluginRegistry, options: dict[str, Any]) -> None:
    """Register the verifying and (``seal``) the sealing hook.

    Raises:
        OptionError: sealing without domain, selector, key_dir, a readable RSA key, or
            without the ``authentication-results`` plugin.
    """
    name = registry.name
    registry.decides_relay = False
    lookups = _Lookups(sync_resolver(registry.config.dns))
    authserv_id = str(options["authserv_id"] or registry.config.server.hostname)

    async def verify(session: SessionInfo, tx: Transaction) -> None:
        if not tx.get_headers("ARC-Seal"):
            tx.results.add(name, "none")
            return
        cv, reason = await asyncio.to_thread(_verify, tx.raw, lookups)
        tx.results.add(name, cv, reason=reason)

    if options["verify"]:
        registry.on("data", verify)
    if not options["seal"]:
        return
    for option in ("domain", "selector", "key_dir"):
        if not options[option]:
            raise OptionError(option, "needed to seal")
    if not any(t.use == "authentication-results" and t.enabled
               for t in registry.config.plugins):
        raise OptionError("seal", "sealing needs the authentication-results plugin "
                                  "(its header carries the results being sealed)")
    key_dir = registry.path(options["key_dir"])
    try:
        key = load_key(key_dir, options["domain"], options["selector"])
    except ConfigError as exc:
        raise OptionError("key_dir", "; ".join(exc.problems)) from None
    if key.algorithm != b"rsa-sha256":
        raise OptionError("key_dir", "ARC seals with RSA keys only (RFC 8617 §4.1.3)")

    async def seal(session: SessionInfo, tx: Transaction) -> None:
        try:
            headers = await asyncio.to_thread(
                dkim.arc_sign, tx.raw, key.selector.encode(), key.domain.encode(),
                key.private, authserv_id.encode())
        except Exception as exc:  # a message dkimpy cannot seal is delivered unsealed
            log.warning("transaction %s: ARC sealing failed: %s", tx.id, exc)
            tx.results.add(f"{name}-seal", "error", reason=str(exc)[:200])
            return
        for line in reversed(headers):  # ARC-Seal first, as dkimpy returns them
            field, _, value = line.decode("ascii").partition(":")
            tx.add_header(field, value.strip(" \t").rstrip("\r\n"), prepend=True)
        if headers:
            tx.results.add(f"{name}-seal", "sealed", domain=key.domain,
                           instances=len(tx.get_headers("ARC-Seal")))

    registry.on("data", seal, priority=92)

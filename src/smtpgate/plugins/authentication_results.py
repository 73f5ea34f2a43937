"""Shipped plugin ``authentication-results`` (RFC 8601): one ``Authentication-Results``
header with every method's result, under this host's authserv-id, and no forged one.

Entry point: :func:`register`. At the ``data`` stage: first (priority -100) it removes every
``Authentication-Results`` header whose authserv-id is ours (§5: a message must not arrive
carrying results that claim to be ours); late (priority 90, after the checks, before DKIM
signing) it prepends one header built from the findings in ``transaction.results``: ``spf``
and ``spf_helo`` (the ``spf`` plugin), ``dkim`` (one result per signature), ``dmarc``,
``arc`` when present. Without any of them it writes ``none`` (§2.2).
"""

from __future__ import annotations

import re

from ..envelope import SessionInfo
from ..hooks import Transaction
from ..results import Results
from . import Option, PluginRegistry

PRIORITY = -100
OPTIONS: dict[str, Option] = {
    "authserv_id": Option(str, default="",
                          help="this host's authserv-id (default: [server] hostname)"),
}

_TOKEN = re.compile(r"^[\x21-\x7e]+$")
# The result values each method may report (RFC 8601 §2.7, RFC 8617 §4.4); a finding with
# another word (an SPF check "skipped" for a local client) is left out.
_RESULTS = {
    "spf": {"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror",
            "policy"},
    "dkim": {"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"},
    "dmarc": {"none", "pass", "fail", "temperror", "permerror"},
    "arc": {"none", "pass", "fail"},
}


def _value(text: object) -> str:
    """A property value: a token as it is, anything else quoted (RFC 8601 §2.2)."""
    s = str(text)
    if _TOKEN.match(s) and not any(c in s for c in '()<>@,;:\\"/[]?='):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _methods(results: Results) -> list[str]:
    out: list[str] = []
    spf = results.get("spf")
    if spf is not None and spf.result in _RESULTS["spf"]:
        domain = spf.details.get("domain") or ""
        prop = "smtp.helo" if spf.details.get("identity") == "helo" else "smtp.mailfrom"
        out.append(f"spf={spf.result} {prop}={_value(domain)}" if domain
                   else f"spf={spf.result}")
    helo = results.get("spf_helo")
    if helo is not None and helo.result in _RESULTS["spf"] and helo.details.get("domain"):
        out.append(f"spf={helo.result} smtp.helo={_value(helo.details['domain'])}")
    dkim = results.get("dkim")
    if dkim is not None:
        sigs = dkim.details.get("signatures")
        if isinstance(sigs, list | tuple) and sigs:
            for sig in sigs:
                where, _, result = str(sig).rpartition("=")
                if result not in _RESULTS["dkim"]:
                    continue
                domain, _, selector = where.partition(":")
                props = f" header.d={_value(domain)}" if domain else ""
                props += f" header.s={_value(selector)}" if selector else ""
                out.append(f"dkim={result}{props}")
        elif dkim.result in _RESULTS["dkim"]:
            out.append(f"dkim={dkim.result}")
    dmarc = results.get("dmarc")
    if dmarc is not None and dmarc.result in _RESULTS["dmarc"]:
        frm = dmarc.details.get("header_from")
        policy = dmarc.details.get("policy")
        comment = f" (p={policy})" if policy else ""
        out.append(f"dmarc={dmarc.result}{comment}" +
                   (f" header.from={_value(frm)}" if frm else ""))
    arc = results.get("arc")
    if arc is not None and arc.result in _RESULTS["arc"]:
        out.append(f"arc={arc.result}")
    return out


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the two data hooks (remove forged headers; add ours)."""
    authserv_id = str(options["authserv_id"] or registry.config.server.hostname)
    ours = authserv_id.lower()
    registry.decides_relay = False

    def claims_ours(value: str) -> bool:
        head = value.split(";", 1)[0].strip().split()
        return bool(head) and head[0].lower() == ours

    def remove_forged(session: SessionInfo, tx: Transaction) -> None:
        # RFC 8601 §5: only the ones claiming to be ours go; the others keep their place.
        count = tx.remove_header("Authentication-Results", where=claims_ours)
        if count:
            tx.results.add(f"{registry.name}-removed", "removed", count=count)

    def add(session: SessionInfo, tx: Transaction) -> None:
        methods = _methods(tx.results) or ["none"]
        value = f"{authserv_id};\r\n\t" + ";\r\n\t".join(methods)
        tx.add_header("Authentication-Results", value, prepend=True)

    registry.on("data", remove_forged)
    registry.on("data", add, priority=90)

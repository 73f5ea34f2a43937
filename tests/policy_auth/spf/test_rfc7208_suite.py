"""The RFC 7208 test suite (the SPF council's ``rfc7208-tests.yml``, shipped in pyspf's
source distribution, converted to JSON unchanged in data/; licence in
data/rfc7208-tests.LICENSE), run through the plugin's path: each scenario's zone is served
by a real DNS server on a loopback port and :func:`check_spf` looks everything up through
the plugin's resolver (never pyspf's own lookup, never /etc/resolv.conf).

Zone data conventions of the suite (as pyspf's testspf.py reads them): ``SPF`` records are
also served as ``TXT`` when a name has no ``TXT`` given; ``TXT: NONE`` means no TXT
record; an entry ``TIMEOUT`` makes queries of types not listed before it time out;
``{TYPE: TIMEOUT}`` makes that type time out. CNAMEs are followed by the server, as a
recursive resolver would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from smtpgate.dns import sync_resolver
from smtpgate.plugins.spf import check_spf

from ...delivery.dns_server import DnsServer
from .conftest import ThreadedDns, dns_config

SUITE = json.loads((Path(__file__).parent / "data" / "rfc7208-tests.json").read_text())
SCENARIOS: list[dict[str, Any]] = SUITE["scenarios"]

_TYPES = ("A", "AAAA", "MX", "PTR", "TXT", "SPF", "CNAME")


def _rdata(rtype: str, value: Any) -> dns.rdata.Rdata:
    rdtype = dns.rdatatype.from_text(rtype)
    if rtype in ("TXT", "SPF"):
        strings = [value] if isinstance(value, str) else list(value)
        cls = dns.rdata.get_rdata_class(dns.rdataclass.IN, rdtype)
        return cls(dns.rdataclass.IN, rdtype, [s.encode() for s in strings])
    if rtype == "MX":
        text = f"{value[0]} {str(value[1]).rstrip('.')}."
    elif rtype in ("PTR", "CNAME"):
        text = f"{str(value).rstrip('.')}."
    else:
        text = str(value)
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


class SuiteZone:
    """One scenario's zone data: ``answers(name, type)`` -> rdatas, or ``None`` (timeout)."""

    def __init__(self, zonedata: dict[str, list[Any]]) -> None:
        self.entries: dict[dns.name.Name, list[tuple[str, Any] | str]] = {}
        for name, items in zonedata.items():
            flat: list[tuple[str, Any] | str] = []
            has_txt = any(isinstance(i, dict) and "TXT" in i for i in items)
            spf_as_txt: list[tuple[str, Any] | str] = []
            for item in items:
                if item == "TIMEOUT":
                    flat.append("TIMEOUT")
                    continue
                for rtype, value in item.items():
                    if value == "NONE" or value == ["NONE"] or value == []:
                        continue  # no record (a TXT without strings cannot be sent)
                    flat.append((rtype, value))
                    if rtype == "SPF" and not has_txt:
                        spf_as_txt.append(("TXT", value))
            self.entries[dns.name.from_text(name)] = flat + spf_as_txt

    def answers(self, name: dns.name.Name, rtype: str) -> list[Any] | None:
        """The values of ``name``/``rtype``; ``[]`` for none; ``None``: time out."""
        out = []
        for entry in self.entries.get(name, []):
            if entry == "TIMEOUT":
                return out or None
            t, value = entry
            if t == rtype:
                if value == "TIMEOUT":
                    return None
                out.append(value)
        return out

    def exists(self, name: dns.name.Name) -> bool:
        return name in self.entries


class SuiteDnsServer(DnsServer):
    """The test DNS server answering from a :class:`SuiteZone` (CNAMEs chased)."""

    def __init__(self, zone: SuiteZone) -> None:
        super().__init__({})
        self.zone_data = zone

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        if not query.question:
            return None
        question = query.question[0]
        rtype = dns.rdatatype.to_text(question.rdtype)
        qname = question.name
        self.queries.append((qname.to_text(True).lower(), rtype))
        response = dns.message.make_response(query)
        seen: set[dns.name.Name] = set()
        for _ in range(12):
            name = qname
            if name in seen:
                break
            seen.add(name)
            values = self.zone_data.answers(name, rtype)
            if values is None:
                return None  # time out
            if values:
                response.answer.append(dns.rrset.from_rdata_list(
                    qname, 300, [_rdata(rtype, v) for v in values]))
                return response
            cname = self.zone_data.answers(name, "CNAME") if rtype != "CNAME" else []
            if not cname:
                if not self.zone_data.exists(name) and not response.answer:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return response
            target = _rdata("CNAME", cname[0])
            response.answer.append(dns.rrset.from_rdata_list(qname, 300, [target]))
            qname = target.target  # type: ignore[attr-defined]
        return response


def _cases() -> Iterator[Any]:
    for scenario in SCENARIOS:
        for test_id, test in scenario["tests"].items():
            yield pytest.param(scenario, test, id=test_id)


def _usable(name: str) -> bool:
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException:
        return False
    return True


@pytest.mark.parametrize(("scenario", "test"), list(_cases()))
def test_rfc7208(scenario: dict[str, Any], test: dict[str, Any]) -> None:
    zonedata = {n: r for n, r in scenario["zonedata"].items() if _usable(n)}
    server = ThreadedDns({}, server=SuiteDnsServer(SuiteZone(zonedata)))
    try:
        resolver = sync_resolver(dns_config(server.port, timeout=0.3, lifetime=0.6))
        outcome = check_spf(resolver, test["host"], test["mailfrom"], test["helo"])
    finally:
        server.close()
    expected = test["result"]
    allowed = [expected] if isinstance(expected, str) else list(expected)
    assert outcome.result in allowed, (test.get("description"), test.get("spec"), outcome)
    exp = test.get("explanation")
    if outcome.result == "fail" and exp is not None:
        if exp == "DEFAULT":
            assert not outcome.from_record
        else:
            assert outcome.explanation == exp


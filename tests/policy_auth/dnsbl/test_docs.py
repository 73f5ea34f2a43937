"""docs/policy.md's "DNSBL and RHSBL" section says what the code does: each of its TOML
examples is a configuration smtpgate accepts, and its option table names exactly the
plugin's options."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from smtpgate.app import Smtpgate
from smtpgate.plugins.dnsbl import OPTIONS

DOC = Path(__file__).resolve().parents[3] / "docs" / "policy.md"


def section() -> str:
    text = DOC.read_text()
    start = text.index("\n## DNSBL and RHSBL\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def toml_blocks() -> list[str]:
    parts = section().split("```")
    return [p.partition("\n")[2] for p in parts[1::2] if p.startswith("toml\n")]


@pytest.mark.parametrize("block", toml_blocks())
def test_examples_are_accepted(block: str) -> None:
    cfg = tomllib.loads(block)
    cfg.setdefault("dns", {"nameservers": ["127.0.0.1"]})
    app = Smtpgate(cfg)
    assert "dnsbl" in [h.plugin for h in app.hooks.hooks("rcpt")]


def test_option_table_matches_the_code() -> None:
    table = section().split("### Options", 1)[1].split("###", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert sorted(documented) == sorted(OPTIONS)

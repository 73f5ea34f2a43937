"""Corpus helpers for the hooks tests (imported by conftest and test modules)."""

from __future__ import annotations

import csv
import re

import pytest

from tests.support import CORPUS  # noqa: E402


def corpus_rows() -> list[dict[str, str]]:
    """The corpus manifest rows (empty when the corpus is not available)."""
    manifest = CORPUS / "MANIFEST.tsv"
    if not manifest.exists():
        return []
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def to_crlf(data: bytes) -> bytes:
    """Normalise every line ending (LF, CRLF) to CRLF, as the protocol core delivers."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def corpus_bytes(name: str, crlf: bool = True) -> bytes:
    path = CORPUS / name
    if not path.exists():
        pytest.skip(f"corpus file {name} not available")
    data = path.read_bytes()
    return to_crlf(data) if crlf else data

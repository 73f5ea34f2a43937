"""The text check's search for a bare CR or LF (two regular expressions) finds one
exactly when counting CR, LF and CRLF says there is one (RFC 5321 §2.3.8): property test
against the plain definition, and the message checks built on it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.protocol import ProtocolConfig
from smtpgate.protocol.connection import _BARE_CR, _BARE_LF, _TextCheck
from smtpgate.reply import R


def _bare_by_counting(data: bytes) -> int:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") - crlf + data.count(b"\n") - crlf


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"abc", b"."]), max_size=30))
def test_search_agrees_with_counting(parts: list[bytes]) -> None:
    data = b"".join(parts)
    found = _BARE_CR.search(data) is not None or _BARE_LF.search(data) is not None
    assert found == (_bare_by_counting(data) > 0)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"line", b"x" * 40]), max_size=20),
       st.booleans())
def test_text_check_verdict_and_normalised_size(parts: list[bytes], normalize: bool) -> None:
    data = b"".join(parts) + b"\r\n"
    check = _TextCheck(ProtocolConfig(normalize_bare_line_endings=normalize), binary=False)
    out = check.feed(data)
    bare = _bare_by_counting(data)
    if not normalize:
        assert check.verdict() == (R.BARE_LF if bare else None)
        assert out == (b"" if bare else data)
    else:
        assert check.verdict() is None
        assert check.size == len(data) + bare == len(out)
        assert _bare_by_counting(out) == 0

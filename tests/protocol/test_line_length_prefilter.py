"""The line-length check's quick test (an LF in every block of a grid) never changes the
verdict: property test against the plain definition (RFC 5321 §4.5.3.1.6)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.protocol.connection import _line_longer_than


@settings(max_examples=500, deadline=None)
@given(longest=st.sampled_from([126, 200, 998]),
       lengths=st.lists(st.integers(min_value=0, max_value=2500), min_size=1, max_size=12),
       final_crlf=st.booleans(), skip_first=st.booleans())
def test_same_verdict_as_splitting(longest: int, lengths: list[int], final_crlf: bool,
                                   skip_first: bool) -> None:
    lines = [b"a" * n for n in lengths]
    data = b"\r\n".join(lines) + (b"\r\n" if final_crlf else b"")
    pos = len(lines[0]) + 2 if skip_first and len(lines) > 1 else 0
    expected = any(len(line) > longest for line in data[pos:].split(b"\r\n"))
    assert _line_longer_than(data, longest, pos) == expected

"""The line-length check of a complete message works a window at a time (bounded memory
for large messages); whatever the window, it agrees with splitting the whole text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.protocol import connection

lines = st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                 max_size=40)


@given(lines, st.integers(min_value=1, max_value=25), st.integers(min_value=1, max_value=40),
       st.booleans())
def test_windowed_check_agrees_with_a_whole_split(
    parts: list[bytes], longest: int, window: int, trailing: bool
) -> None:
    data = b"\r\n".join(parts) + (b"\r\n" if trailing else b"")
    expected = max(map(len, data.split(b"\r\n"))) > longest
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(connection, "_LINE_WINDOW", window)
        assert connection._line_longer_than(data, longest) is expected


def test_large_message_lines_checked_without_a_list_of_every_line() -> None:
    line = b"x" * 76 + b"\r\n"
    data = line * 200_000 + b"y" * 1200 + b"\r\n" + line * 10
    assert connection._line_longer_than(data, 998)
    assert not connection._line_longer_than(line * 200_000, 998)

"""Tests for the load-average reader (smtpgate.policy.loadavg).

The kernel's load cannot be set from a test, so the limit logic is driven through
``LoadAverage(reader=...)``; the real reader is checked against the kernel's own files.
"""

from __future__ import annotations

import math
import os

import pytest

from smtpgate.policy.helo_rules import HeloRules
from smtpgate.policy.loadavg import (
    TOO_LOADED,
    LoadAverage,
    parse_proc_loadavg,
    read_system_load,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reader:
    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.values[min(self.calls, len(self.values)) - 1]


def test_real_reader_matches_the_kernel() -> None:
    value = read_system_load()
    assert math.isfinite(value) and value >= 0
    assert LoadAverage().current() >= 0
    if hasattr(os, "getloadavg"):
        # The 1-minute figure moves slowly; two reads a moment apart agree closely.
        assert abs(value - os.getloadavg()[0]) < 5
    if os.path.exists("/proc/loadavg"):
        with open("/proc/loadavg") as fh:
            assert abs(value - parse_proc_loadavg(fh.read())) < 5


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0.52 0.58 0.59 1/467 12345\n", 0.52),
        ("12.00 3.1 1.0 7/900 1", 12.0),
        ("0 0 0", 0.0),
    ],
)
def test_parse_proc_loadavg(text: str, value: float) -> None:
    assert parse_proc_loadavg(text) == value


@pytest.mark.parametrize("text", ["", "   \n", "abc 1 2", "-1 0 0", "nan 0 0", "inf 1 1"])
def test_parse_proc_loadavg_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_proc_loadavg(text)


def test_cache_reuses_one_reading_for_cache_seconds() -> None:
    clock, reader = Clock(), Reader(1.5, 7.0, 0.25)
    load = LoadAverage(reader, cache_seconds=1.0, clock=clock)
    assert load.current() == 1.5
    clock.now += 0.5
    assert load.current() == 1.5
    assert reader.calls == 1
    clock.now += 0.5  # exactly 1 s later: stale
    assert load.current() == 7.0
    assert reader.calls == 2
    clock.now += 10
    assert load.current() == 0.25


def test_no_cache_reads_every_time() -> None:
    reader = Reader(1.0, 2.0, 3.0)
    load = LoadAverage(reader, cache_seconds=0)
    assert [load.current() for _ in range(3)] == [1.0, 2.0, 3.0]


def test_over_is_strict_and_none_never_reads() -> None:
    reader = Reader(10.0)
    load = LoadAverage(reader)
    assert load.over(None) is False
    assert load.over(0) is False  # server.max_load_average = 0 means off
    assert load.over(-1.0) is False
    assert reader.calls == 0
    assert load.over(9.99) is True
    assert load.over(10.0) is False  # ZMailer: maxloadavg < load
    assert load.over(11) is False


def test_unavailable_or_bad_readings_fail_open() -> None:
    def broken() -> float:
        raise OSError("no /proc here")

    assert LoadAverage(broken).current() == 0.0
    assert LoadAverage(broken).over(0.5) is False
    assert LoadAverage(lambda: float("nan")).current() == 0.0
    assert LoadAverage(lambda: -3.0).current() == 0.0


def test_other_reader_errors_propagate() -> None:
    def buggy() -> float:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        LoadAverage(buggy).current()


def test_bad_cache_seconds() -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            LoadAverage(lambda: 0.0, cache_seconds=bad)


def test_helo_rule_limits_with_the_load_hook() -> None:
    """The way the session combines -L, the per-rule limit and the reply."""
    rules = HeloRules.from_config(
        [
            {"pattern": "*.busy.example", "max_load_average": 4},
            {"pattern": "*", "flags": "ve"},
        ]
    )
    load = LoadAverage(lambda: 5.0)
    assert load.over(rules.match("mx.busy.example", "192.0.2.1").max_load_average)
    assert not load.over(rules.match("mx.other.example", "192.0.2.1").max_load_average)
    assert not LoadAverage(lambda: 3.9).over(rules.match("a.busy.example").max_load_average)
    assert TOO_LOADED.to_bytes() == (
        b"421 4.3.2 Sorry, the system is too loaded for email reception at the moment\r\n"
    )

"""Tests for the failed-AUTH limiter (smtpgate.auth.ratelimit)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.auth import FailureLimiter, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_blocked_after_n_failures_and_unblocked_after_window(clock: Clock) -> None:
    lim = FailureLimiter(max_failures=3, window=60.0, clock=clock)
    ip = "192.0.2.1"
    for _ in range(2):
        lim.record_failure(ip)
        assert not lim.is_blocked(ip)
    lim.record_failure(ip)
    assert lim.is_blocked(ip)
    assert not lim.is_blocked("192.0.2.2")
    clock.now += 59.9
    assert lim.is_blocked(ip)
    clock.now += 0.2
    assert not lim.is_blocked(ip)


def test_window_slides(clock: Clock) -> None:
    lim = FailureLimiter(max_failures=3, window=100.0, clock=clock)
    ip = "198.51.100.7"
    start = clock.now
    for offset in (0, 50, 90):
        clock.now = start + offset
        lim.record_failure(ip)
    assert lim.is_blocked(ip)
    clock.now = start + 100.5  # the failure at 0 left the window; 50 and 90 remain
    assert not lim.is_blocked(ip)
    lim.record_failure(ip)  # 50, 90, 100.5 -> blocked again
    assert lim.is_blocked(ip)
    clock.now = start + 150.5
    assert not lim.is_blocked(ip)


def test_success_clears(clock: Clock) -> None:
    lim = FailureLimiter(max_failures=2, window=300.0, clock=clock)
    lim.record_failure("192.0.2.1")
    lim.record_success("192.0.2.1")
    lim.record_failure("192.0.2.1")
    assert not lim.is_blocked("192.0.2.1")
    lim.record_failure("192.0.2.1")
    assert lim.is_blocked("192.0.2.1")
    lim.record_success("192.0.2.1")
    assert not lim.is_blocked("192.0.2.1")
    assert len(lim) == 0
    lim.record_success("203.0.113.9")  # unknown: no-op


def test_ipv6_grouped_by_64(clock: Clock) -> None:
    lim = FailureLimiter(max_failures=3, window=300.0, clock=clock)
    lim.record_failure("2001:db8:0:1::1")
    lim.record_failure("2001:db8:0:1:ffff:ffff:ffff:ffff")
    lim.record_failure("[2001:DB8:0:1::abcd]")
    assert lim.is_blocked("2001:db8:0:1::9999")
    assert not lim.is_blocked("2001:db8:0:2::1")
    assert not lim.is_blocked("2001:db8:0:0::1")
    assert len(lim) == 1


def test_ipv4_mapped_counts_as_ipv4(clock: Clock) -> None:
    lim = FailureLimiter(max_failures=2, window=300.0, clock=clock)
    lim.record_failure("::ffff:192.0.2.1")
    lim.record_failure("192.0.2.1")
    assert lim.is_blocked("192.0.2.1")
    assert lim.is_blocked("::ffff:192.0.2.1")
    assert not lim.is_blocked("::ffff:192.0.2.2")
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1")


def test_table_cap_evicts_oldest(clock: Clock) -> None:
    lim = FailureLimiter(max_failures=2, window=300.0, clock=clock, max_entries=3)
    for i in range(1, 4):
        clock.now += 1
        lim.record_failure(f"10.0.0.{i}")
        lim.record_failure(f"10.0.0.{i}")
    assert all(lim.is_blocked(f"10.0.0.{i}") for i in range(1, 4))
    clock.now += 1
    lim.record_failure("10.0.0.1")  # refreshes 10.0.0.1: now 10.0.0.2 is the oldest
    lim.record_failure("10.0.0.4")
    assert len(lim) == 3
    assert not lim.is_blocked("10.0.0.2")  # evicted
    assert lim.is_blocked("10.0.0.1")
    assert lim.is_blocked("10.0.0.3")


def test_expired_entries_are_dropped(clock: Clock) -> None:
    lim = FailureLimiter(max_failures=5, window=10.0, clock=clock)
    for i in range(1000):
        lim.record_failure(f"10.1.{i // 256}.{i % 256}")
    assert len(lim) == 1000
    clock.now += 11
    lim.record_failure("192.0.2.99")
    assert len(lim) == 1


def test_many_failures_keep_bounded_memory(clock: Clock) -> None:
    lim = FailureLimiter(max_failures=4, window=300.0, clock=clock)
    for _ in range(10_000):
        lim.record_failure("192.0.2.1")
    assert len(lim._table[client_key("192.0.2.1")]) == 4


def test_unparsable_addresses_are_their_own_bucket(clock: Clock) -> None:
    lim = FailureLimiter(max_failures=1, window=300.0, clock=clock)
    lim.record_failure("unix:/run/smtp.sock")
    assert lim.is_blocked("UNIX:/run/smtp.sock")
    assert not lim.is_blocked("")


@pytest.mark.parametrize(
    "kwargs",
    [{"max_failures": 0}, {"window": 0}, {"max_entries": 0}, {"ipv6_prefix": 0}],
)
def test_invalid_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FailureLimiter(**kwargs)  # type: ignore[arg-type]


@given(st.lists(st.text(max_size=50), max_size=20))
def test_never_raises_on_arbitrary_strings(ips: list[str]) -> None:
    lim = FailureLimiter(max_failures=2, window=1.0, max_entries=5)
    for ip in ips:
        lim.record_failure(ip)
        lim.is_blocked(ip)
    for ip in ips:
        lim.record_success(ip)
    assert len(lim) == 0

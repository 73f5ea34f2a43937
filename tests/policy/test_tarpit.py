"""Tests for the ZMailer-style tarpit (smtpgate.policy.tarpit)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import ConfigError
from smtpgate.policy.tarpit import DEFAULT_TOPLIMIT, Tarpit


@pytest.mark.parametrize(
    ("args", "delays"),
    [
        # The man page's sample: "tarpit 20 2 300", next = prev + (prev * 2).
        ((20, 2, 300), [0.0, 20.0, 60.0, 180.0, 300.0, 300.0, 300.0]),
        ((1, 1, 10), [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]),
        ((5, 0, 250), [0.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]),  # exponent 0: constant
        ((0.5, 0.5, 100), [0.0, 0.5, 0.75, 1.125, 1.6875, 2.53125, 3.796875]),
        ((30, 1, 10), [0.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]),  # initial over the cap
        ((0, 0, 0), [0.0] * 7),  # ZMailer's default: disabled
        ((0, 5, 250), [0.0] * 7),  # initial 0 disables whatever the rest says
    ],
)
def test_delay_table(args: tuple[float, float, float], delays: list[float]) -> None:
    tarpit = Tarpit(*args)
    assert [tarpit.delay(n) for n in range(len(delays))] == delays
    assert tarpit.enabled is (args[0] > 0)


def test_defaults_and_repr() -> None:
    t = Tarpit()
    assert (t.initial, t.exponent, t.toplimit, t.enabled) == (0.0, 0.0, DEFAULT_TOPLIMIT, False)
    assert DEFAULT_TOPLIMIT == 250.0
    assert repr(Tarpit(20, 2, 300)) == "Tarpit(initial=20.0, exponent=2.0, toplimit=300.0)"


def test_zero_toplimit_means_zmailers_250_seconds() -> None:
    t = Tarpit(20, 2, 0)
    assert t.toplimit == 250.0
    assert [t.delay(n) for n in range(1, 6)] == [20.0, 60.0, 180.0, 250.0, 250.0]
    assert Tarpit(0, 0, 0).delay(3) == 0.0


def test_huge_error_counts_stay_capped() -> None:
    t = Tarpit(1, 3, 120)
    assert t.delay(10_000) == 120.0  # (1+3)**9999 overflows a float
    assert t.delay(10**30) == 120.0
    tiny = Tarpit(1e-300, 1e-12, 5)
    assert 0 < tiny.delay(10**6) < 5


def test_negative_error_count() -> None:
    with pytest.raises(ValueError, match="error_count"):
        Tarpit(1, 1, 10).delay(-1)


@pytest.mark.parametrize(
    ("args", "problems"),
    [
        ((-1, 0, 10), ["server.tarpit_initial: must be a finite number >= 0, got -1"]),
        ((1, -0.5, 10), ["server.tarpit_exponent: must be a finite number >= 0, got -0.5"]),
        ((1, 1, float("inf")), ["server.tarpit_max: must be a finite number >= 0, got inf"]),
        ((float("nan"), 1, 5), ["server.tarpit_initial: must be a finite number >= 0, got nan"]),
        (
            ("20", True, None),
            [
                "server.tarpit_initial: expected a number of seconds, got '20'",
                "server.tarpit_exponent: expected a number of seconds, got True",
                "server.tarpit_max: expected a number of seconds, got None",
            ],
        ),
    ],
)
def test_invalid_settings(args: tuple[object, object, object], problems: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        Tarpit(*args)  # type: ignore[arg-type]
    assert exc.value.problems == problems


_settings = st.tuples(
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.floats(min_value=0, max_value=1e3, allow_nan=False),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
)


@given(_settings, st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=50))
def test_monotone_and_capped(settings: tuple[float, float, float], n: int, step: int) -> None:
    tarpit = Tarpit(*settings)
    a, b = tarpit.delay(n), tarpit.delay(n + step)
    assert 0.0 <= a <= b <= tarpit.toplimit
    assert math.isfinite(b)
    if n >= 1 and tarpit.enabled:
        assert a >= min(settings[0], tarpit.toplimit) > 0


@given(_settings)
def test_first_delay_is_initial_capped(settings: tuple[float, float, float]) -> None:
    initial, _, top = settings
    tarpit = Tarpit(*settings)
    cap = top or DEFAULT_TOPLIMIT
    assert tarpit.toplimit == cap
    assert tarpit.delay(1) == (min(initial, cap) if initial > 0 else 0.0)

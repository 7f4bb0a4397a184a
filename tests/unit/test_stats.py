"""Statistics against hand computation, and the t quantiles against the exact t distribution."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokensettle.stats import T975, Stat, describe, t975


def t_within(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3 for odd, 26.7.4 for even df): an independent check."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df == 1:
        return 2 * theta / math.pi
    term = total = 1.0
    if df % 2:
        for k in range(1, (df - 3) // 2 + 1):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    for k in range(1, (df - 2) // 2 + 1):
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return math.sin(theta) * total


@pytest.mark.parametrize("df", range(1, len(T975) + 1))
def test_table_quantiles_leave_five_percent_outside(df: int) -> None:
    assert t_within(t975(df), df) == pytest.approx(0.95, abs=5e-7)


def test_approximation_beyond_the_table_leaves_five_percent_outside() -> None:
    worst = max(abs(t_within(t975(df), df) - 0.95) for df in [*range(31, 1_000), 4_999, 20_000])
    assert worst < 1e-8


def test_quantiles_known_from_printed_tables() -> None:
    assert round(t975(1), 3) == 12.706
    assert round(t975(2), 3) == 4.303
    assert round(t975(10), 3) == 2.228
    assert round(t975(30), 3) == 2.042
    assert round(t975(60), 3) == 2.000
    assert round(t975(120), 3) == 1.980
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_no_values() -> None:
    assert describe([]) == Stat(0)
    assert describe([]).to_json() == {
        "n": 0,
        "mean": None,
        "median": None,
        "sd": None,
        "ci95": None,
        "min": None,
        "max": None,
    }


def test_one_value_has_no_spread_and_no_interval() -> None:
    assert describe([20_150]) == Stat(1, 20_150.0, 20_150.0, None, None, 20_150.0, 20_150.0)


def test_two_values_by_hand() -> None:
    # mean 2000; sd = sqrt(((1000 - 2000)^2 + (3000 - 2000)^2) / (2 - 1)) = 1000 * sqrt(2);
    # ci = 2000 +- t(0.975, 1) * sd / sqrt(2) = 2000 +- 12.706205 * 1000
    s = describe([1_000, 3_000])
    assert (s.n, s.mean, s.median, s.min, s.max) == (2, 2000.0, 2000.0, 1000.0, 3000.0)
    assert s.sd == pytest.approx(1000 * math.sqrt(2), rel=1e-15)
    assert s.ci95 is not None
    assert s.ci95[0] == pytest.approx(2000 - 12_706.205, rel=1e-12)
    assert s.ci95[1] == pytest.approx(2000 + 12_706.205, rel=1e-12)


def test_three_values_by_hand() -> None:
    # 2, 4, 9: mean 5, median 4, variance (9 + 1 + 16) / 2 = 13, ci = 5 +- 4.302653 sqrt(13/3)
    s = describe([2, 4, 9])
    assert (s.mean, s.median) == (5.0, 4.0)
    assert s.sd == pytest.approx(math.sqrt(13), rel=1e-15)
    half = 4.302653 * math.sqrt(13 / 3)
    assert s.ci95 == pytest.approx((5 - half, 5 + half), rel=1e-12)


def test_all_equal_values_have_zero_spread_and_a_point_interval() -> None:
    s = describe([Decimal("0.0054939")] * 4)
    assert s.sd == 0
    assert s.ci95 == (0.0054939, 0.0054939)
    assert s.mean == s.median == s.min == s.max == 0.0054939


def test_exact_inputs_stay_exact_until_the_end() -> None:
    # floats would give 0.30000000000000004 / 3 noise; Decimals and Fractions do not
    s = describe([Decimal("0.1"), Decimal("0.1"), Decimal("0.1")])
    assert s.mean == 0.1
    assert s.sd == 0
    assert describe([Fraction(1, 3), Fraction(2, 3)]).mean == 0.5
    assert describe([1, 2]).median == 1.5


def test_json_keys_are_the_documented_ones() -> None:
    out = describe([1, 2, 4]).to_json()
    assert list(out) == ["n", "mean", "median", "sd", "ci95", "min", "max"]
    assert isinstance(out["ci95"], list)
    assert len(out["ci95"]) == 2


@given(st.lists(st.integers(0, 10**9), min_size=2, max_size=40))
def test_interval_contains_the_mean_and_widens_with_the_spread(values: list[int]) -> None:
    s = describe(values)
    assert s.ci95 is not None
    assert s.mean is not None
    assert s.sd is not None
    assert s.ci95[0] <= s.mean <= s.ci95[1]
    half = t975(len(values) - 1) * s.sd / math.sqrt(len(values))
    assert s.ci95[1] - s.ci95[0] == pytest.approx(2 * half, rel=1e-9, abs=1e-6)
    assert s.median is not None
    assert min(values) <= s.median <= max(values)

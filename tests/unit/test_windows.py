"""Window math: minute rounding, owner windows and weights, merging windows into queries."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.windows import (
    MAX_BUCKETS_PER_PAGE,
    MINUTE,
    Activity,
    Interval,
    ceil_minute,
    floor_minute,
    merge_windows,
    pages_for,
    run_activity,
    total_pages,
)

# Around the recorded runs (October 2025), with sub-second precision.
T0 = 1_760_960_000
times = st.floats(min_value=T0 - 86_400, max_value=T0 + 86_400, allow_nan=False)
int_times = st.integers(min_value=T0 - 86_400, max_value=T0 + 86_400)
graces = st.sampled_from([0, MINUTE, 2 * MINUTE])


@st.composite
def activities(draw: st.DrawFn) -> Activity:
    start = draw(times | int_times.map(float))
    length = draw(
        st.sampled_from([0.0, 0.5, 4.0, 59.0, 60.0, 61.0]) | st.floats(min_value=0, max_value=900)
    )
    return Activity(start=start, end=start + length, grace=draw(graces))


# ------------------------------------------------------------------ rounding


@settings(max_examples=200)
@given(times | int_times)
def test_floor_and_ceil_minute_bracket_the_time(t: float) -> None:
    lo, hi = floor_minute(t), ceil_minute(t)
    assert isinstance(lo, int)
    assert isinstance(hi, int)
    assert lo % MINUTE == 0
    assert hi % MINUTE == 0
    assert lo <= t <= hi
    assert t - lo < MINUTE
    assert hi - t < MINUTE
    assert (lo == hi) == (t == lo)


@pytest.mark.parametrize(
    ("t", "lo", "hi"),
    [
        (1760960219, 1760960160, 1760960220),
        (1760960220, 1760960220, 1760960220),
        (1760960220.001, 1760960220, 1760960280),
        (1760617771.4556596, 1760617740, 1760617800),
        (0, 0, 0),
        (-1, -60, 0),
    ],
)
def test_floor_and_ceil_minute_examples(t: float, lo: int, hi: int) -> None:
    assert floor_minute(t) == lo
    assert ceil_minute(t) == hi


# ------------------------------------------------------------------ Activity


@settings(max_examples=300)
@given(activities())
def test_activity_window_is_floor_start_to_ceil_end_plus_grace(a: Activity) -> None:
    w = a.window
    assert w.start % MINUTE == 0
    assert w.end % MINUTE == 0
    assert w.start == floor_minute(a.start)
    assert w.end == max(ceil_minute(a.end) + a.grace, w.start + MINUTE)
    assert w.minutes >= 1
    # The whole active span is inside the window, plus the grace after it.
    assert w.start <= a.start
    assert a.end + a.grace <= w.end


@settings(max_examples=300)
@given(activities())
def test_activity_weight_is_active_seconds_per_minute(a: Activity) -> None:
    w = a.window
    weights = {m: a.weight(m) for m in w.minute_starts()}
    for m, weight in weights.items():
        assert 0 <= weight <= MINUTE
        exact = max(0.0, min(a.end, m + MINUTE) - max(a.start, m))
        if a.start == a.end:
            assert (weight > 0) == (m <= a.start < m + MINUTE)
        else:
            assert weight == pytest.approx(exact)
        # Minutes after the end (grace) have weight 0.
        if m >= a.end and a.start != a.end:
            assert weight == 0
    if a.end > a.start:
        assert math.fsum(weights.values()) == pytest.approx(a.end - a.start)
    # No weight outside the window.
    assert a.weight(w.start - MINUTE) == 0
    assert a.weight(w.end) == 0


def test_four_second_step_straddling_a_minute_gets_two_minutes_plus_grace() -> None:
    # From the field (run 23f46f6b): a 4-second step 1760960219..1760960223 got 2,174
    # tokens from minute slots on both sides of :00.
    step = Activity(1760960219, 1760960223, grace=MINUTE)
    w = step.window
    assert w == Interval(1760960160, 1760960340)
    assert list(w.minute_starts()) == [1760960160, 1760960220, 1760960280]
    assert step.weight(1760960160) == 1
    assert step.weight(1760960220) == 3
    assert step.weight(1760960280) == 0  # grace minute


def test_activity_without_grace_is_still_at_least_one_minute() -> None:
    a = Activity(1760960220, 1760960220, grace=0)
    assert a.window == Interval(1760960220, 1760960280)
    assert a.weight(1760960220) > 0
    assert a.weight(1760960160) == 0


def test_activity_ending_on_a_minute_boundary() -> None:
    a = Activity(1760960190, 1760960220, grace=MINUTE)
    assert a.window == Interval(1760960160, 1760960280)
    assert a.weight(1760960160) == 30
    assert a.weight(1760960220) == 0


def test_run_activity_refuses_end_before_start() -> None:
    with pytest.raises(ValueError, match="before start"):
        run_activity(100.0, 99.0, MINUTE)
    assert run_activity(100.0, 100.0, MINUTE) == Activity(100.0, 100.0, MINUTE)


# ------------------------------------------------------------------ Interval


def test_interval_refuses_unaligned_or_empty() -> None:
    with pytest.raises(ValueError, match="minute-aligned"):
        Interval(1, 120)
    with pytest.raises(ValueError, match="minute-aligned"):
        Interval(0, 90)
    with pytest.raises(ValueError, match="empty"):
        Interval(120, 120)
    with pytest.raises(ValueError, match="empty"):
        Interval(180, 120)


def test_interval_helpers() -> None:
    i = Interval(120, 300)
    assert i.minutes == 3
    assert list(i.minute_starts()) == [120, 180, 240]
    assert i.contains_minute(120)
    assert i.contains_minute(240)
    assert not i.contains_minute(300)
    assert i.overlaps(Interval(240, 360))
    assert not i.overlaps(Interval(300, 360))  # touching is not overlapping


@pytest.mark.parametrize(
    ("minutes", "pages"),
    [(1, 1), (1440, 1), (1441, 2), (2880, 2), (2881, 3)],
)
def test_pages_for(minutes: int, pages: int) -> None:
    assert MAX_BUCKETS_PER_PAGE == 1440
    assert pages_for(minutes) == pages


# ------------------------------------------------------------------ merge_windows


@st.composite
def intervals(draw: st.DrawFn) -> Interval:
    # Minute indexes over a few days, lengths from 1 minute to beyond one page.
    start = draw(st.integers(min_value=0, max_value=6000))
    length = draw(st.integers(min_value=1, max_value=30) | st.integers(min_value=1, max_value=3000))
    base = T0 - T0 % MINUTE
    return Interval(base + start * MINUTE, base + (start + length) * MINUTE)


@settings(max_examples=200)
@given(st.lists(intervals(), max_size=12))
def test_merge_windows_properties(windows: list[Interval]) -> None:
    merged = merge_windows(windows)
    # Disjoint, sorted, not even touching (touching windows always merge).
    for a, b in itertools.pairwise(merged):
        assert a.end < b.start
    for m in merged:
        assert m.start % MINUTE == 0
        assert m.end % MINUTE == 0
    # Every input window is covered by exactly one output interval.
    for w in windows:
        covering = [m for m in merged if m.start <= w.start and w.end <= m.end]
        assert len(covering) == 1
        assert sum(1 for m in merged if m.overlaps(w)) == 1
    # Every output interval starts and ends at an input window's edge (no padding).
    for m in merged:
        assert any(w.start == m.start for w in windows)
        assert any(w.end == m.end for w in windows)
    # Never more requests than fetching the windows one by one.
    assert total_pages(merged) <= total_pages(windows)
    assert len(merged) <= len(windows)
    # Deterministic and independent of input order.
    assert merge_windows(list(reversed(windows))) == merged


def test_merge_windows_overlapping_and_touching_inputs_merge() -> None:
    a = Interval(0, 600)
    b = Interval(300, 900)  # overlaps a
    c = Interval(900, 1200)  # touches b
    assert merge_windows([c, a, b]) == [Interval(0, 1200)]


def test_merge_windows_contained_window() -> None:
    assert merge_windows([Interval(0, 6000), Interval(600, 1200)]) == [Interval(0, 6000)]


def test_merge_windows_bridges_small_gap_between_small_windows() -> None:
    # Two 3-minute windows an hour apart: one request instead of two.
    a = Interval(0, 180)
    b = Interval(3600, 3780)
    merged = merge_windows([a, b])
    assert merged == [Interval(0, 3780)]
    assert total_pages(merged) == 1 < total_pages([a, b])


def test_merge_windows_keeps_gap_when_bridging_saves_nothing() -> None:
    # Each window is a full page; bridging would need three pages instead of two.
    a = Interval(0, 1440 * MINUTE)
    b = Interval(2000 * MINUTE, 3440 * MINUTE)
    assert merge_windows([a, b]) == [a, b]


def test_merge_windows_empty() -> None:
    assert merge_windows([]) == []
    assert total_pages([]) == 0


def test_merge_windows_finds_the_cheapest_bridge_when_a_later_window_extends_the_last() -> None:
    base = T0 - T0 % MINUTE  # 1760959980
    a = Interval(base, base + MINUTE)  # 1 minute
    b = Interval(base + 2 * MINUTE, base + 1441 * MINUTE)  # 1439 minutes
    c = Interval(base + 2 * MINUTE, base + 1443 * MINUTE)  # 1441 minutes, contains b
    merged = merge_windows([a, b, c])
    # One interval [a.start, c.end) of 1443 minutes costs 2 pages; [a] + [b|c] costs 3.
    assert total_pages(merged) == 2
    assert merge_windows(merged) == merged

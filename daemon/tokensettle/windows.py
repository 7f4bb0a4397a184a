"""Time windows: minute rounding, run windows, and merging many windows into few queries.

The Usage API stores usage per minute slot and a query returns the slots whose start lies
in `[start_time, end_time)`. A window is therefore always a half-open range of whole
minutes, `[floor_minute(start), ceil_minute(end) + grace)`. There is no +-5 minute
padding: that would pull in the neighbouring run on the same key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MINUTE = 60
#: Buckets per page the API allows for `bucket_width=1m`.
MAX_BUCKETS_PER_PAGE = 1440


def floor_minute(t: float) -> int:
    return math.floor(t / MINUTE) * MINUTE


def ceil_minute(t: float) -> int:
    return math.ceil(t / MINUTE) * MINUTE


@dataclass(frozen=True, slots=True, order=True)
class Interval:
    """A half-open range of whole minutes `[start, end)` in Unix seconds."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start % MINUTE or self.end % MINUTE:
            raise ValueError(f"interval {self.start}..{self.end} is not minute-aligned")
        if self.end <= self.start:
            raise ValueError(f"interval {self.start}..{self.end} is empty")

    @property
    def minutes(self) -> int:
        return (self.end - self.start) // MINUTE

    def minute_starts(self) -> range:
        return range(self.start, self.end, MINUTE)

    def contains_minute(self, minute: int) -> bool:
        return self.start <= minute < self.end

    def overlaps(self, other: Interval) -> bool:
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True, slots=True)
class Activity:
    """When an owner (a run or a step) was active, in raw seconds, plus its grace.

    The owner's minutes are `[floor_minute(start), ceil_minute(end) + grace)`, at least
    one minute: the grace minute is fetched because a request may be recorded a little
    after the run's own end timestamp. Its *active weight* in a minute is the seconds of
    `[start, end]` inside it; a grace minute has weight 0, so it is claimed only when no
    owner was actively running in it (see attribution).
    """

    start: float
    end: float
    grace: int = MINUTE

    @property
    def window(self) -> Interval:
        lo = floor_minute(self.start)
        hi = max(ceil_minute(self.end) + self.grace, lo + MINUTE)
        return Interval(lo, hi)

    def weight(self, minute: int) -> float:
        """Active seconds in the minute slot starting at `minute` (0 for grace minutes)."""
        lo = max(self.start, minute)
        hi = min(self.end, minute + MINUTE)
        if hi > lo:
            return hi - lo
        # An instantaneous owner is still active in the minute that holds its instant.
        if self.start == self.end and minute <= self.start < minute + MINUTE:
            return 1e-3
        return 0.0


def run_activity(start: float, end: float, grace: int) -> Activity:
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    return Activity(start=start, end=end, grace=grace)


def pages_for(minutes: int) -> int:
    """Requests needed for a window of `minutes` one-minute buckets."""
    return max(1, math.ceil(minutes / MAX_BUCKETS_PER_PAGE))


def _union(windows: Iterable[Interval]) -> list[Interval]:
    """Overlapping or touching windows joined; the result is sorted and disjoint."""
    out: list[Interval] = []
    for w in sorted(windows):
        if out and w.start <= out[-1].end:
            if w.end > out[-1].end:
                out[-1] = Interval(out[-1].start, w.end)
        else:
            out.append(w)
    return out


def merge_windows(windows: Iterable[Interval]) -> list[Interval]:
    """Merge windows into disjoint intervals that cost the fewest requests.

    Overlapping or touching windows always join. Gaps between the joined windows are
    bridged where that saves requests: a dynamic programme over the sorted windows picks
    the grouping with the fewest pages, then the fewest minutes fetched. No minute is
    fetched twice, and merging the result again changes nothing.
    """
    parts = _union(windows)
    n = len(parts)
    # best[j] = (pages, minutes, start index of the last group) for parts[:j]
    best: list[tuple[int, int, int]] = [(0, 0, 0)]
    for j in range(1, n + 1):
        end = parts[j - 1].end
        choice: tuple[int, int, int] | None = None
        for i in range(j, 0, -1):
            minutes = (end - parts[i - 1].start) // MINUTE
            pages = pages_for(minutes)
            if choice is not None and pages > choice[0]:
                break  # spans only grow further left
            cost = (best[i - 1][0] + pages, best[i - 1][1] + minutes, i - 1)
            if choice is None or cost[:2] < choice[:2]:
                choice = cost
        assert choice is not None
        best.append(choice)
    merged: list[Interval] = []
    j = n
    while j > 0:
        i = best[j][2]
        merged.append(Interval(parts[i].start, parts[j - 1].end))
        j = i
    merged.reverse()
    return merged


def total_pages(intervals: Sequence[Interval]) -> int:
    return sum(pages_for(i.minutes) for i in intervals)

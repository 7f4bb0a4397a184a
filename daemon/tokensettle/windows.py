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


def merge_windows(windows: Iterable[Interval]) -> list[Interval]:
    """Merge windows into the fewest disjoint intervals that cost the fewest requests.

    Overlapping or touching windows always merge. A gap between two windows is bridged
    when that saves a request (the bridged interval needs fewer pages than the two apart),
    so the result never costs more requests than fetching the windows one by one, and no
    minute is fetched twice.
    """
    ordered = sorted(windows)
    merged: list[Interval] = []
    for w in ordered:
        if not merged:
            merged.append(w)
            continue
        last = merged[-1]
        if w.start <= last.end:
            if w.end > last.end:
                merged[-1] = Interval(last.start, w.end)
            continue
        bridged = Interval(last.start, w.end)
        if pages_for(bridged.minutes) <= pages_for(last.minutes) + pages_for(w.minutes) - 1:
            merged[-1] = bridged
        else:
            merged.append(w)
    return merged


def total_pages(intervals: Sequence[Interval]) -> int:
    return sum(pages_for(i.minutes) for i in intervals)

"""When to look at what: a due-time heap, per-path debounce, and tick alignment. Pure:
every method takes `now` (seconds on any monotonic-ish scale the caller chooses)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class DueHeap(Generic[K]):
    """Keys with due times. Setting a key again replaces its due time (lazy deletion)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._due: dict[K, tuple[float, int]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def set(self, key: K, due: float | None) -> None:
        """Schedule `key` at `due`; None unschedules it."""
        if due is None:
            self._due.pop(key, None)
            return
        self._seq += 1
        self._due[key] = (due, self._seq)
        heapq.heappush(self._heap, (due, self._seq, key))

    def due_of(self, key: K) -> float | None:
        entry = self._due.get(key)
        return entry[0] if entry else None

    def _clean(self) -> None:
        while self._heap:
            due, seq, key = self._heap[0]
            if self._due.get(key) == (due, seq):
                return
            heapq.heappop(self._heap)

    def next_due(self) -> float | None:
        self._clean()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[K]:
        """Every key due at or before `now`, earliest first; they are unscheduled."""
        out: list[K] = []
        while True:
            self._clean()
            if not self._heap or self._heap[0][0] > now:
                return out
            _, _, key = heapq.heappop(self._heap)
            del self._due[key]
            out.append(key)


class Debouncer(Generic[K]):
    """Per-key settle: the first event is handled at once (leading edge) so a complete
    file is scheduled within milliseconds; further events within `settle` seconds are
    folded into one more look when the key has been quiet for `settle` (trailing edge)."""

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._quiet_at: dict[K, float] = {}
        self._pending: set[K] = set()

    def touch(self, key: K, now: float) -> bool:
        """Record an event; True if the caller should handle the key now."""
        busy = key in self._quiet_at and now < self._quiet_at[key]
        self._quiet_at[key] = now + self.settle
        if busy:
            self._pending.add(key)
            return False
        return True

    def defer(self, key: K, now: float) -> None:
        """Ask for a trailing look even without another event (e.g. a half-written file)."""
        self._quiet_at[key] = now + self.settle
        self._pending.add(key)

    def due(self, now: float) -> list[K]:
        """Keys whose trailing look is due; forgets keys that have gone quiet."""
        ready = [k for k in self._pending if self._quiet_at[k] <= now]
        self._pending.difference_update(ready)
        for key in [k for k, t in self._quiet_at.items() if t <= now and k not in self._pending]:
            del self._quiet_at[key]
        return ready

    def next_deadline(self) -> float | None:
        times = [self._quiet_at[k] for k in self._pending]
        return min(times) if times else None


def next_tick(t: float, tick: float) -> float:
    """The first tick boundary at or after `t`. Aligning polls to ticks makes runs that
    fall due close together share one batch, so requests grow with ticks, not runs."""
    if tick <= 0:
        return t
    n = math.ceil(t / tick) * tick
    return n if n >= t else n + tick  # t / tick can round down (underflow)


class PollGrid(Generic[K]):
    """Due runs on one shared poll grid of period `tick`: a run is polled at the first
    grid point at or after its due time, and never at a point already reached, so runs
    that fall due between two points (a burst, a restore, a copied tree) share one round
    and one request per merged window. Attempts are stamped with their grid point, so a
    confirming poll `STABILITY_INTERVAL` later lands on a grid point too, not a tick late.

    `hold(key, until)` keeps a key off the grid until then (a failed write backs off like
    a failed request, though the file does not record it); `release` lifts it."""

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self.heap: DueHeap[K] = DueHeap()
        self._held: dict[K, float] = {}

    def __len__(self) -> int:
        return len(self.heap)

    def __contains__(self, key: object) -> bool:
        return key in self.heap

    def point(self, due: float, now: float) -> float:
        """The grid point at which a run due at `due` is polled, seen at `now`."""
        if due > now or self.tick <= 0:
            return next_tick(max(due, now), self.tick)
        at = next_tick(now, self.tick)
        return at if at > now else at + self.tick

    def put(self, key: K, due: float | None, now: float) -> None:
        if due is None:
            self.heap.set(key, None)
            return
        held = self._held.get(key)
        if held is not None:
            due = max(due, held)
        self.heap.set(key, self.point(due, now))

    def hold(self, key: K, until: float, now: float) -> None:
        self._held[key] = until
        if key in self.heap:
            self.put(key, self.heap.due_of(key), now)
        else:
            self.put(key, until, now)

    def release(self, key: K) -> None:
        self._held.pop(key, None)

    def held(self, key: K) -> float | None:
        return self._held.get(key)

    def drop(self, key: K) -> None:
        """Forget the key entirely (the run is gone or settled)."""
        self.heap.set(key, None)
        self._held.pop(key, None)

    def due_of(self, key: K) -> float | None:
        return self.heap.due_of(key)

    def next_point(self) -> float | None:
        return self.heap.next_due()

    def latest_point(self, now: float) -> float:
        """The last grid point at or before `now`: a round that starts late takes every
        run due up to it, instead of leaving the runs of points it slept through to rounds
        of their own."""
        if self.tick <= 0:
            return now
        return math.floor(now / self.tick) * self.tick

    def take(self, point: float) -> list[K]:
        """Every key due at or before `point` (one round)."""
        return self.heap.pop_due(point)

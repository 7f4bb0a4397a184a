"""Deterministic simulation: requests per day and time to `verified` on the shared poll grid.

A fake clock drives the daemon's own scheduling code: `scheduler.PollGrid` (put, take,
latest_point, as `registry` and `poller` call them), `stability.next_due` and
`stability.decide` (the verdict of each attempt) and `windows.merge_windows` /
`pages_for` (the requests a round costs). No files, no network, no sleeps: a day takes
a fraction of a second.

Runs end at a steady pace (N a day, evenly spaced, 60-200 s long); each run's file
appears at its end and is due MIN_AGE later. Its usage reaches the API in two parts,
the first after d1 and the rest after d2 (d2 uniform in 5-60 min, d1 uniform in 5 min-d2:
the Usage API's delay, usage-api-notes.md); a poll before d1 sees nothing, before d2 half.
A round at grid point p takes every run due by p, costs the pages of the merged windows
of those runs (one page holds 1,440 minutes), stamps each attempt with p, and puts each
run back at its next due time, as the daemon does.

Requests per day are counted over the third simulated day (steady state). Latency is
measured from when the run's data is complete *and* the run is due (max(end + d2,
end + MIN_AGE)) to its `verified` round; the grid bound is STABILITY_INTERVAL + TICK for
a run whose data was complete when its first poll came. A run whose data was still
arriving at its first polls waits for polls it had already scheduled (STABILITY_INTERVAL
apart, or backing off up to MAX_BACKOFF while the window is empty) and is shown apart.

`--stamp-delay S` stamps attempts S seconds after their grid point instead (what the
daemon did before the grid: the clock at the end of the round), to show what that costs.

    .venv/bin/python bench/poll_grid.py [--runs 1000,10000] [--ticks 1m,2m,10m]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from common import pct
from tokensettle.durations import parse_duration
from tokensettle.scheduler import PollGrid
from tokensettle.stability import (
    TERMINAL,
    AttemptRecord,
    Policy,
    Status,
    Totals,
    decide,
    next_due,
)
from tokensettle.windows import Activity, merge_windows, pages_for

DAY = 86_400.0
T0 = 1_767_225_600.0  # 2026-01-01T00:00Z, a grid point of every tick


def policy(stability: timedelta) -> Policy:
    """The daemon's defaults (config.Settings)."""
    return Policy(
        min_age=timedelta(minutes=30),
        max_age=timedelta(hours=24),
        stability_interval=stability,
        stable_polls=2,
        max_backoff=timedelta(minutes=30),
        retry_delay=timedelta(minutes=2),
        apportion_tolerance=0.05,
    )


@dataclass
class Run:
    key: int
    activity: Activity
    first_data: float
    complete: float
    tokens: int
    attempts: list[AttemptRecord] = field(default_factory=list)
    status: Status | None = None
    first_poll: float | None = None
    verified_at: float | None = None

    @property
    def end(self) -> float:
        return self.activity.end

    def seen(self, at: float) -> Totals:
        n = 0 if at < self.first_data else self.tokens // 2 if at < self.complete else self.tokens
        return Totals(n, n // 4, 1 if n else 0, 0)


def simulate(
    per_day: int, tick: float, pol: Policy, *, days: int, seed: int, stamp_delay: float
) -> dict[str, Any]:
    rng = random.Random(seed)
    runs: list[Run] = []
    gap = DAY / per_day
    for i in range(per_day * days):
        end = T0 + (i + 0.5) * gap
        d2 = rng.uniform(300, 3600)
        d1 = rng.uniform(300, d2)
        act = Activity(end - rng.uniform(60, 200), end, 60)
        runs.append(Run(i, act, end + d1, end + d2, rng.randint(500, 8000) * 4))
    grid: PollGrid[int] = PollGrid(tick)
    # file appearances, in time order (the bridge's events)
    arrivals = [(r.end, r.key) for r in runs]
    heapq.heapify(arrivals)
    requests: dict[int, int] = {}
    rounds = 0
    stop = T0 + days * DAY + 2 * DAY  # let the last runs settle
    while True:
        point = grid.next_point()
        if arrivals and (point is None or arrivals[0][0] <= point):
            now, key = heapq.heappop(arrivals)
            run = runs[key]
            due = next_due(run.attempts, run.status, _dt(run.end), pol)
            grid.put(key, due.timestamp() if due else None, now)
            continue
        if point is None or point > stop:
            break
        # the daemon wakes at the point and polls everything due by the latest point
        point = max(point, grid.latest_point(point))
        due_keys = grid.take(point)
        if not due_keys:
            continue
        rounds += 1
        day = int((point - T0) // DAY)
        windows = [runs[k].activity.window for k in due_keys]
        requests[day] = requests.get(day, 0) + sum(
            pages_for(w.minutes) for w in merge_windows(windows)
        )
        stamp = point + stamp_delay
        for key in due_keys:
            run = runs[key]
            run.first_poll = run.first_poll if run.first_poll is not None else point
            totals = run.seen(point)
            new = AttemptRecord(_dt(stamp), totals, f"fp{totals.tokens_in}")
            verdict = decide(
                run.attempts, new, previous_status=run.status, run_end=_dt(run.end), policy=pol
            )
            run.attempts.append(new)
            run.status = verdict.status
            if verdict.status in TERMINAL:
                if verdict.status is Status.VERIFIED:
                    run.verified_at = point
                grid.drop(key)
                continue
            due = verdict.next_due
            grid.put(key, due.timestamp() if due else None, stamp)
    # steady state: the runs of the third day, and the requests of it
    measured = [r for r in runs if T0 + 2 * DAY <= r.end < T0 + 3 * DAY]
    unverified = sum(1 for r in measured if r.verified_at is None)
    ready = [r for r in measured if r.first_poll is not None and r.complete <= r.first_poll]
    late = [r for r in measured if r.first_poll is None or r.complete > r.first_poll]

    def latency(group: list[Run]) -> dict[str, float] | None:
        values = [
            (r.verified_at - max(r.complete, r.end + pol.min_age.total_seconds())) / 60
            for r in group
            if r.verified_at is not None
        ]
        if not values:
            return None
        return {
            "runs": len(values),
            "p50_min": round(pct(values, 50), 1),
            "p99_min": round(pct(values, 99), 1),
            "max_min": round(max(values), 1),
        }

    polls = [len(r.attempts) for r in measured]
    tick_min = tick / 60
    bound = pol.stability_interval.total_seconds() / 60 + tick_min
    ready_latency = latency(ready)
    return {
        "runs_per_day": per_day,
        "tick_minutes": tick_min,
        "requests_day3": requests.get(2, 0),
        "request_bound": int(1440 / tick_min),
        "rounds": rounds,
        "polls_per_run": round(sum(polls) / len(polls), 2),
        "unverified": unverified,
        "latency_data_complete_at_first_poll": ready_latency,
        "latency_data_still_arriving": latency(late),
        "latency_bound_min": bound,
        "bounds_hold": requests.get(2, 0) <= 1440 / tick_min
        and ready_latency is not None
        and ready_latency["max_min"] <= bound,
    }


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="1000,10000", help="runs per day, comma-separated")
    parser.add_argument("--ticks", default="1m,2m,10m")
    parser.add_argument("--stability-interval", default="10m")
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stamp-delay", type=float, default=0.0)
    args = parser.parse_args()
    pol = policy(parse_duration(args.stability_interval))
    results = [
        simulate(
            int(n),
            parse_duration(t).total_seconds(),
            pol,
            days=args.days,
            seed=args.seed,
            stamp_delay=args.stamp_delay,
        )
        for n in args.runs.split(",")
        for t in args.ticks.split(",")
    ]
    print(json.dumps({"command": " ".join(["python", *sys.argv]), "results": results}, indent=2))
    return 0 if all(r["bounds_hold"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

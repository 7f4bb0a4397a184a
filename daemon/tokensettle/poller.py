"""The poll room: one round of the poll grid. Takes the runs due at a grid point, makes
one batched attempt for all of them (stamped with the grid point), and puts every run
back where its outcome says: on the grid from what its file now records, off it once
settled, or held back after a failure the file could not record.

Every fault here is bounded and visible: a failed write backs off like a failed request
(`RETRY_DELAY` doubling to `MAX_BACKOFF`), counts in `/metrics` and shows in `/healthz`
until the same run is written again; a refused admin key pauses polling for
`MAX_BACKOFF`, and a failing Usage API shows until a fetch succeeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from tokensettle.health import Faults
from tokensettle.metrics import Metrics
from tokensettle.reconcile import Loaded, Reconciler, RunOutcome, RunRef
from tokensettle.registry import YIELD_EVERY, Registry
from tokensettle.runfile import iso
from tokensettle.scheduler import PollGrid
from tokensettle.stability import Status, backoff

log = structlog.get_logger("tokensettle.daemon")

USAGE_API = "usage_api"


#: Runs settled in one part of a round: a round's memory grows with its runs (~13 KB
#: each: records, shares, the files as written), and a restore of 10,000 runs taken in one
#: part peaked at 239 MB. Parts are cut in window order, so requests stay near the floor.
ROUND_RUNS = 2_000


def round_parts(due: Sequence[Loaded], size: int) -> list[list[Loaded]]:
    """The runs of a round in parts of at most `size`, in the order of their windows'
    starts (runs without a record first). Pure."""

    def start(entry: Loaded) -> float:
        return entry.record.activity.start if entry.record is not None else float("-inf")

    ordered = sorted(due, key=start)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


class Poller:
    def __init__(
        self,
        reconciler: Reconciler,
        registry: Registry,
        grid: PollGrid[Path],
        faults: Faults,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self.reconciler = reconciler
        self.registry = registry
        self.grid = grid
        self.faults = faults
        self.metrics = metrics
        self.clock = clock
        #: provider -> (why its admin key was refused, when to try it again)
        self.paused: dict[str, tuple[str, datetime]] = {}
        self.last_api_success: datetime | None = None

    @property
    def auth_error(self) -> str | None:
        return next((error for error, _ in self.paused.values()), None)

    async def round(self, point: float) -> bool:
        """Poll every run due at grid point `point` (Unix seconds), at most `ROUND_RUNS`
        at a time (in the order of their windows, so each part's merged windows stay
        contiguous and requests stay near the floor). True when a run with a declared
        scope was among those written (its lease may be due for revocation)."""
        at = datetime.fromtimestamp(point, UTC)
        paths = self.grid.take(point)
        due: list[Loaded] = []
        for entry in self.registry.loaded_of(paths):
            pause = self.paused.get(self._provider(entry))
            if pause is not None and at < pause[1]:
                # its provider's key is refused: wait with the others
                self.grid.hold(entry.found.path, pause[1].timestamp(), point)
            else:
                due.append(entry)
        if not due:
            return False
        self.metrics.poll_rounds.inc()
        handled: set[Path] = set()
        declared = False
        # Who may own the round's minutes, once for all its parts (it walks every tracked
        # run and the index rows of the round's span, on the loop).
        owners = self.registry.owners(due)
        for part in round_parts(due, ROUND_RUNS):
            done, seen = await self._part(part, at, owners)
            handled |= done
            declared = declared or seen
        # Runs taken off the grid but not in the report (gone meanwhile): read them again.
        await self.registry.look([p for p in paths if p not in handled], trailing=True)
        return declared

    async def _part(
        self, due: list[Loaded], at: datetime, owners: list[RunRef]
    ) -> tuple[set[Path], bool]:
        """One batch of a round: fetch, settle, write, count; the paths it handled and
        whether a declared run was written."""
        before = self.reconciler.requests_sent
        report = await self.reconciler.run_batch(due, extra_owners=owners, now=at)
        self.metrics.api_requests.inc(self.reconciler.requests_sent - before)
        now = self.clock()
        for provider, error in report.auth_errors.items():
            held = [e.found.path for e in due if self._provider(e) == provider]
            self._auth_failed(provider, error, held, now)
        polled = [o for o in report.outcomes if o.polled]
        for provider in {self._provider_of(o) for o in polled} - set(report.auth_errors):
            if self.paused.pop(provider, None) is not None:
                log.info("daemon.auth_recovered", provider=provider)
            self.faults.clear("auth", provider)
        self.metrics.auth_ok.set(0 if self.paused else 1)
        fetch_failed = [o for o in polled if o.totals is None]
        if any(o.totals is not None for o in polled):
            self.last_api_success = now
            self.metrics.last_api_success.set(now.timestamp())
        if fetch_failed:
            error = next((o.message for o in fetch_failed), "")
            self.faults.raise_("fetch", USAGE_API, error, now)
        elif polled:
            self.faults.clear("fetch")
        handled: set[Path] = {e.found.path for e in due if self._provider(e) in report.auth_errors}
        for n, outcome in enumerate(report.outcomes):
            if n and n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a 10,000-run round must not hold the loop
            handled.add(outcome.path)
            self._count(outcome, now)
            self._put_back(outcome, now)
        self.registry.flush()
        await self.registry.look(
            [o.path for o in report.outcomes if o.after is None and o.write_error is None],
            trailing=True,
        )
        declared = any(
            o.after and o.after.record and o.after.record.declared for o in report.outcomes
        )
        return handled, declared

    def _provider(self, entry: Loaded) -> str:
        record = entry.record
        return self.reconciler.scope_of(record).provider if record is not None else "openai"

    def _provider_of(self, outcome: RunOutcome) -> str:
        tracked = self.registry.tracked.get(outcome.path)
        return self._provider(tracked.loaded) if tracked is not None else "openai"

    def _auth_failed(self, provider: str, error: str, paths: list[Path], now: datetime) -> None:
        retry_at = now + self.reconciler.policy.max_backoff
        self.paused[provider] = (error, retry_at)
        self.faults.raise_("auth", provider, error, now)
        log.error(
            "daemon.auth_failed",
            provider=provider,
            error=error,
            action=f"polling of {provider} runs paused; fix the admin key's usage-read scope",
            retry_at=iso(retry_at),
        )
        for path in paths:
            self.grid.hold(path, retry_at.timestamp(), now.timestamp())

    def paused_until(self) -> datetime | None:
        return min((at for _, at in self.paused.values()), default=None)

    def _put_back(self, outcome: RunOutcome, now: datetime) -> None:
        path = outcome.path
        if outcome.write_error is not None:
            self.metrics.write_failures.inc()
            fault = self.faults.raise_("write", str(path), outcome.write_error, now)
            policy = self.reconciler.policy
            wait = backoff(policy.retry_delay, fault.failures, policy.max_backoff)
            self.grid.hold(path, (now + wait).timestamp(), now.timestamp())
            log.warning(
                "run.write_backoff",
                path=str(path),
                error=outcome.write_error,
                failures=fault.failures,
                retry_at=iso(now + wait),
            )
            self.registry.reschedule(path)
            return
        if outcome.after is not None:
            if self.faults.clear("write", str(path)):
                log.info("run.write_recovered", path=str(path))
            self.grid.release(path)
            self.registry.admit_written(outcome.after)

    def _count(self, outcome: RunOutcome, now: datetime) -> None:
        if outcome.polled:
            self.metrics.attempts.labels(outcome.state).inc()
            if outcome.totals is None:
                self.metrics.api_errors.labels("fetch").inc()
        if outcome.state in (Status.VERIFIED, Status.AMBIGUOUS) and outcome.written:
            if outcome.run_end is not None:
                self.metrics.time_to_verify.observe((now - outcome.run_end).total_seconds())
            if outcome.totals is not None:
                fw = outcome.framework
                self.metrics.tokens.labels(fw, "in").inc(outcome.totals.input_tokens)
                self.metrics.tokens.labels(fw, "out").inc(outcome.totals.output_tokens)
            if outcome.cost_usd is not None:
                self.metrics.cost.labels(outcome.framework).inc(outcome.cost_usd)
            if outcome.local_verdict == "mismatch":
                self.metrics.local_mismatches.labels(outcome.framework).inc()
            after = (now - outcome.run_end) if outcome.run_end else None
            log.info(
                "run.settled",
                run_id=outcome.run_id,
                framework=outcome.framework,
                status=outcome.state,
                tokens_in=outcome.totals.input_tokens if outcome.totals else None,
                tokens_out=outcome.totals.output_tokens if outcome.totals else None,
                attempts=outcome.attempts,
                seconds_after_end=round(after / timedelta(seconds=1)) if after else None,
            )

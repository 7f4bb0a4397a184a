"""The bill room: now and then (`BILL_CHECK_INTERVAL`, default daily) the daemon runs the
bill check (`tokensettle bill`: what OpenAI bills beside our prices, per day) and exports
its verdicts, so an alert can say "the bill is out of tolerance" and a budget owner sees
whether the per-run costs we write can be trusted. A failed check backs off like any
request and shows in `/healthz` (`bill`); a mismatch is data, not a fault: a metric and
a log line."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from tokensettle.bill import compare
from tokensettle.bill_cli import DEFAULT_DAYS, days_window
from tokensettle.billing_api import fetch_bill_data
from tokensettle.config import Settings
from tokensettle.health import Faults
from tokensettle.metrics import Metrics
from tokensettle.stability import backoff
from tokensettle.usage_api import UsageApiError, UsageClient

log = structlog.get_logger("tokensettle.bill")

VERDICTS = ("ok", "mismatch", "incomplete", "not_compared")


class BillWatch:
    def __init__(
        self,
        settings: Callable[[], Settings],
        client: UsageClient,
        metrics: Metrics,
        faults: Faults,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self.client = client
        self.metrics = metrics
        self.faults = faults
        self._monotonic = monotonic
        self.next_at = monotonic()  # the first check soon after start
        self.failures = 0

    def due(self) -> bool:
        interval = self._settings().bill_check_interval.total_seconds()
        return interval > 0 and self._monotonic() >= self.next_at

    async def run(self, now: datetime | None = None) -> None:
        settings = self._settings()
        now = now or datetime.now(UTC)
        start, end = days_window(DEFAULT_DAYS, now)
        try:
            data = await fetch_bill_data(self.client, start, end)
        except UsageApiError as exc:
            self.failures += 1
            wait = backoff(settings.retry_delay, self.failures, settings.max_backoff)
            self.next_at = self._monotonic() + wait.total_seconds()
            self.faults.raise_("bill", "bill", f"the bill check failed: {exc}", now)
            log.warning("bill.check_failed", error=str(exc), retry_in=round(wait.total_seconds()))
            return
        self.failures = 0
        self.faults.clear("bill")
        self.next_at = self._monotonic() + settings.bill_check_interval.total_seconds()
        check = compare(
            data.costs,
            data.usage,
            start=start,
            end=end,
            tolerance=settings.bill_tolerance,
            generated_at=now,
        )
        counts = check.counts
        for verdict in VERDICTS:
            self.metrics.bill_days.labels(verdict).set(counts.get(verdict, 0))
        self.metrics.bill_difference.set(float(check.priced_usd - check.billed_usd))
        self.metrics.bill_checked.set(now.timestamp())
        event = log.info if check.passed else log.warning
        event(
            "bill.checked",
            verdict=check.verdict,
            days=dict(counts),
            billed_usd=str(check.billed_usd),
            priced_usd=str(check.priced_usd),
            tolerance=settings.bill_tolerance,
        )

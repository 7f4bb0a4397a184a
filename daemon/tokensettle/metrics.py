"""Prometheus metrics (prometheus-client), on a registry of our own so tests can read them.

Conventions: served as the Prometheus text format 0.0.4 (`CONTENT_TYPE`, the format
`generate_latest` writes; Prometheus 3 refuses a scrape without a version), with
`tokensettle_build_info{version}` and no `_created` series (prometheus-client's
`disable_created_metrics`: one sample per counter, not two; it is process-wide and done on
import). Names are stable: dashboards and alerts use them.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from tokensettle import __version__

#: The `Content-Type` of `/metrics`: `text/plain; version=0.0.4; charset=utf-8`.
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

_TIME_TO_VERIFY_BUCKETS = (300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 14400, 43200, 86400)

disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Info("tokensettle_build", "The running tokensettle", registry=r).info(
            {"version": __version__}
        )
        self.runs = Gauge("tokensettle_runs", "Known runs by status", ["status"], registry=r)
        self.attempts = Counter(
            "tokensettle_attempts", "Attempts made, by resulting status", ["status"], registry=r
        )
        self.api_requests = Counter(
            "tokensettle_api_requests", "HTTP requests sent to the Usage API", registry=r
        )
        self.api_errors = Counter(
            "tokensettle_api_errors",
            "Usage API fetches that failed after retries",
            ["kind"],
            registry=r,
        )
        self.time_to_verify = Histogram(
            "tokensettle_time_to_verify_seconds",
            "From a run's end to its verification",
            buckets=_TIME_TO_VERIFY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("tokensettle_queue_depth", "Runs waiting for a poll", registry=r)
        self.max_age = Gauge(
            "tokensettle_max_age_seconds",
            "MAX_AGE: how long after its end a run may wait to settle before it expires",
            registry=r,
        )
        self.oldest_waiting = Gauge(
            "tokensettle_oldest_waiting_run_age_seconds",
            "Age from its end of the oldest run not yet settled (pending, data_not_available, "
            "warning); 0 when none waits",
            registry=r,
        )
        self.faults = Gauge(
            "tokensettle_faults",
            "Faults active now, by kind (write, fetch, index, auth, watcher, ...)",
            ["kind"],
            registry=r,
        )
        self.revocations = Counter(
            "tokensettle_lease_revocations",
            "Deletes of leased keys, by result (revoked, already_gone, failed, auth_error)",
            ["result"],
            registry=r,
        )
        self.local_mismatches = Counter(
            "tokensettle_local_mismatches",
            "Settled runs whose framework's own counts differ from the provider's beyond "
            "LOCAL_TOLERANCE",
            ["framework"],
            registry=r,
        )
        self.bill_days = Gauge(
            "tokensettle_bill_days",
            "Days of the last bill check, by verdict (ok, mismatch, incomplete, not_compared)",
            ["verdict"],
            registry=r,
        )
        self.bill_difference = Gauge(
            "tokensettle_bill_difference_usd",
            "Priced usage minus billed cost over the last bill check's days",
            registry=r,
        )
        self.bill_checked = Gauge(
            "tokensettle_bill_last_check_timestamp_seconds",
            "When the bill check last ran to the end",
            registry=r,
        )
        self.poll_rounds = Counter(
            "tokensettle_poll_rounds", "Poll rounds run on the poll grid", registry=r
        )
        self.watcher_alive = Gauge(
            "tokensettle_watcher_alive", "1 while the watcher runs", registry=r
        )
        self.auth_ok = Gauge("tokensettle_auth_ok", "0 after an authentication failure", registry=r)
        self.last_api_success = Gauge(
            "tokensettle_last_api_success_timestamp_seconds", "Last successful fetch", registry=r
        )
        self.tokens = Counter(
            "tokensettle_settled_tokens",
            "Tokens of settled runs, by framework and direction",
            ["framework", "direction"],
            registry=r,
        )

        self.cost = Counter(
            "tokensettle_settled_cost_usd",
            "Cost of settled runs at their own prices, by framework (complete costs only)",
            ["framework"],
            registry=r,
        )

        # Faults: each is counted while it happens and shown while it lasts.
        self.write_failures = Counter(
            "tokensettle_write_failures",
            "Run file writes that failed (nothing of the file changed; retried with backoff)",
            registry=r,
        )
        self.runs_write_failing = Gauge(
            "tokensettle_runs_write_failing",
            "Runs whose latest write failed and that wait for a retry",
            registry=r,
        )
        self.index_available = Gauge(
            "tokensettle_index_available",
            "1 while the state index is in use, 0 while running without it",
            registry=r,
        )
        self.http_rejected = Counter(
            "tokensettle_http_rejected_connections",
            "Status-server connections refused or closed for exceeding a bound",
            ["reason"],
            registry=r,
        )

    def render(self) -> bytes:
        """The exposition, to be served with `CONTENT_TYPE`."""
        return generate_latest(self.registry)

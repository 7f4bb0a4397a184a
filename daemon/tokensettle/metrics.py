"""Prometheus metrics (prometheus-client), on a registry of our own so tests can read them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TIME_TO_VERIFY_BUCKETS = (300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 14400, 43200, 86400)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.write_failures = Counter(
            "tokensettle_write_failures",
            "Writes of a run file that failed (the file is unchanged; retried with backoff)",
            registry=r,
        )
        self.faults = Gauge(
            "tokensettle_faults",
            "Faults active now, by kind (write, fetch, index, auth, watcher, ...)",
            ["kind"],
            registry=r,
        )
        self.http_refused = Counter(
            "tokensettle_http_refused",
            "Status-server connections refused at the connection limit",
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

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""`/metrics` conventions, read from the rendered exposition text (issue 7, item 11)."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from tokensettle import __version__, metrics
from tokensettle.metrics import Metrics

#: Names dashboards and alerts use: renaming one is a breaking change.
STABLE = {
    "tokensettle_runs",
    "tokensettle_attempts_total",
    "tokensettle_api_requests_total",
    "tokensettle_api_errors_total",
    "tokensettle_time_to_verify_seconds",
    "tokensettle_queue_depth",
    "tokensettle_watcher_alive",
    "tokensettle_auth_ok",
    "tokensettle_last_api_success_timestamp_seconds",
    "tokensettle_settled_tokens_total",
    "tokensettle_settled_cost_usd_total",
}
FAULTS = {
    "tokensettle_write_failures_total",
    "tokensettle_runs_write_failing",
    "tokensettle_index_available",
    "tokensettle_http_rejected_connections_total",
}


def rendered() -> str:
    m = Metrics()
    m.attempts.labels("verified").inc()
    m.tokens.labels("baes", "in").inc(120)
    m.cost.labels("baes").inc(0.5)
    m.time_to_verify.observe(700)
    m.write_failures.inc()
    m.http_rejected.labels("too_many_connections").inc()
    return m.render().decode()


def test_content_type_is_the_text_format_0_0_4() -> None:
    # Prometheus 3 refuses a scrape whose Content-Type has no version
    assert metrics.CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_build_info_carries_the_version() -> None:
    text = rendered()
    assert f'tokensettle_build_info{{version="{__version__}"}} 1.0' in text.splitlines()


def test_no_created_series() -> None:
    text = rendered()
    assert "_created" not in text
    assert "tokensettle_attempts_total" in text  # the counters are there, once each


def test_names_are_stable_and_the_fault_metrics_exist() -> None:
    text = rendered()
    declared = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    assert declared >= STABLE | FAULTS | {"tokensettle_build_info"}, (STABLE | FAULTS) - declared
    samples = {(s.name, s.value) for f in text_string_to_metric_families(text) for s in f.samples}
    assert ("tokensettle_write_failures_total", 1.0) in samples  # the text parses

"""Faults raised and cleared by the daemon's rooms, and the /healthz status they make."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tokensettle.health import Faults, status

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_no_faults_is_ok_and_not_ready_is_failing() -> None:
    assert status(Faults(), ready=True) == "ok"
    assert status(Faults(), ready=False) == "failing"


def test_a_failing_write_degrades_until_the_same_run_is_written() -> None:
    faults = Faults()
    first = faults.raise_("write", "/runs/a/1/metrics.json", "Read-only file system", T0)
    again = faults.raise_("write", "/runs/a/1/metrics.json", "Read-only file system", T0)
    assert (first.failures, again.failures) == (1, 2)
    assert again.since == T0
    assert status(faults, ready=True) == "degraded"
    (problem,) = faults.problems()
    assert problem["kind"] == "write" and problem["count"] == 1
    assert problem["severity"] == "degraded" and "Read-only" in problem["message"]
    assert faults.clear("write", "/runs/a/1/metrics.json")
    assert not faults.clear("write", "/runs/a/1/metrics.json")
    assert status(faults, ready=True) == "ok"


def test_auth_and_watcher_faults_fail_the_check_others_degrade_it() -> None:
    faults = Faults()
    faults.raise_("index", "index", "disk full", T0)
    faults.raise_("fetch", "usage_api", "HTTP 503", T0 + timedelta(minutes=1))
    assert status(faults, ready=True) == "degraded"
    faults.raise_("auth", "usage_api", "Missing scopes: api.usage.read", T0)
    assert status(faults, ready=True) == "failing"
    assert [p["kind"] for p in faults.problems()] == ["auth", "fetch", "index"]
    faults.clear("auth")
    assert faults.kinds() == {"fetch": 1, "index": 1}

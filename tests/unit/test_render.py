"""What `list` and `reconcile` print for a run: the detail agrees with the next poll."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tokensettle.reconcile import RunOutcome
from tokensettle.render import detail, list_human, next_poll, outcome_json

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def never_polled(due_in: timedelta) -> RunOutcome:
    """As `reconcile.describe` reports a run without attempts."""
    return RunOutcome(
        path=Path("/runs/chatdev/r1/metrics.json"),
        framework="chatdev",
        run_id="r1",
        state="pending",
        message="waiting for min age",
        next_due=NOW + due_in,
        run_end=NOW + due_in - timedelta(minutes=30),
    )


def test_a_run_past_its_min_age_is_due_not_waiting() -> None:
    run = never_polled(-timedelta(minutes=5))
    assert next_poll(run, NOW) == "due"
    assert detail(run, NOW) == "min age reached: due at the next reconcile or daemon tick"
    (row,) = [line for line in list_human([run], NOW).splitlines() if "r1" in line]
    assert "waiting" not in row and "now" not in row
    assert outcome_json(run, NOW)["message"] == detail(run, NOW)


def test_a_run_before_its_min_age_is_waiting_with_the_time_left() -> None:
    run = never_polled(timedelta(minutes=12))
    assert detail(run, NOW) == "waiting for min age"
    assert next_poll(run, NOW) not in ("due", "-")


def test_other_messages_are_kept_and_no_due_time_is_a_dash() -> None:
    run = never_polled(-timedelta(minutes=1))
    run.message, run.attempts = "1 of 2 agreeing polls", 1
    assert detail(run, NOW) == "1 of 2 agreeing polls" and next_poll(run, NOW) == "due"
    run.next_due = None
    assert next_poll(run, NOW) == "-"

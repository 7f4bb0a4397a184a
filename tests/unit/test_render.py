"""What `list` and `reconcile` print for a run: the message agrees with the next poll."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.support.runs import write_run
from tokensettle.atomic import read_snapshot
from tokensettle.config import load_settings
from tokensettle.discovery import Found
from tokensettle.reconcile import Loaded, RunOutcome, Selection, describe, policy_of
from tokensettle.render import list_human, next_poll, outcome_json
from tokensettle.runfile import parse_run

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def described(tmp_path: Path, ended_ago: timedelta) -> RunOutcome:
    """`reconcile.describe` of a run never polled that ended `ended_ago` before NOW."""
    end = (NOW - ended_ago).timestamp()
    path = write_run(tmp_path, "chatdev", "r1", [(end - 60, end)])
    record = parse_run(read_snapshot(path).raw, path, "chatdev", 60)
    loaded = Loaded(Found(path, tmp_path, "chatdev"), record)
    policy = policy_of(load_settings({"runs_dirs": [tmp_path]}, environ={}))
    (outcome,) = describe([loaded], Selection(), policy, NOW, settled=False)
    return outcome


def test_a_run_past_its_min_age_is_due_not_waiting(tmp_path: Path) -> None:
    run = described(tmp_path, timedelta(minutes=35))  # MIN_AGE 30m
    assert next_poll(run, NOW) == "due"
    assert run.message == "min age reached: due at the next reconcile or daemon tick"
    (row,) = [line for line in list_human([run], NOW).splitlines() if "r1" in line]
    assert "waiting" not in row and "now" not in row
    assert outcome_json(run, NOW)["message"] == run.message


def test_a_run_before_its_min_age_is_waiting_with_the_time_left(tmp_path: Path) -> None:
    run = described(tmp_path, timedelta(minutes=18))
    assert run.message == "waiting for min age"
    assert next_poll(run, NOW) not in ("due", "-")


def test_no_due_time_is_a_dash(tmp_path: Path) -> None:
    run = described(tmp_path, timedelta(minutes=35))
    run.next_due = None
    assert next_poll(run, NOW) == "-"

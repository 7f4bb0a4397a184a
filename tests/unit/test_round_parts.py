"""A big round is settled in parts, in the order of the runs' windows."""

from __future__ import annotations

from pathlib import Path

from tests.support.runs import write_run
from tokensettle.atomic import read_snapshot
from tokensettle.discovery import Found
from tokensettle.poller import round_parts
from tokensettle.reconcile import Loaded
from tokensettle.runfile import parse_run

BASE = 1_764_000_000.0


def test_parts_are_bounded_and_follow_the_windows(tmp_path: Path) -> None:
    order = [4, 0, 3, 1, 2]  # run i starts i hours after BASE
    due = []
    for i in order:
        start = BASE + 3600 * i
        path = write_run(tmp_path, "baes", f"r{i}", [(start, start + 60)])
        record = parse_run(read_snapshot(path).raw, path, "baes", 60)
        due.append(Loaded(Found(path, tmp_path, "baes"), record))
    unreadable = Loaded(Found(tmp_path / "baes" / "bad" / "metrics.json", tmp_path, "baes"))
    parts = round_parts([*due, unreadable], 2)
    names = [[e.found.path.parent.name for e in part] for part in parts]
    assert names == [["bad", "r0"], ["r1", "r2"], ["r3", "r4"]]
    assert round_parts([], 2) == []
    assert [len(p) for p in round_parts(due, 2_000)] == [5]

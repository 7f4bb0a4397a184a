"""The SQLite index of finished runs, on real files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.support.smallfs import fill, read_only, small_filesystem
from tokensettle.index import FileKey, Finished, Index


def _finished(path: Path, start: float, end: float, status: str = "verified") -> Finished:
    return Finished(FileKey.of(path), "baes", path.parent.name, start, end, status, 10, 5)


def test_lookup_matches_only_the_exact_file_version(tmp_path: Path) -> None:
    run = tmp_path / "baes" / "r1" / "metrics.json"
    run.parent.mkdir(parents=True)
    run.write_text("{}")
    index = Index(tmp_path / "state" / "index.sqlite3")
    index.put([_finished(run, 100.0, 200.0)])
    assert index.lookup(FileKey.of(run)) is not None
    run.write_text('{"changed": true}')
    assert index.lookup(FileKey.of(run)) is None  # size/mtime differ: parse it again
    assert index.counts() == {"verified": 1}
    index.forget([str(run)])
    assert index.counts() == {}
    index.close()


def test_overlapping_finds_runs_touching_a_range(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    paths = []
    for i, (s, e) in enumerate([(0, 100), (150, 250), (300, 400)]):
        p = tmp_path / f"r{i}.json"
        p.write_text("{}")
        paths.append(p)
        index.put([_finished(p, s, e)])
    assert {f.run_id for f in index.overlapping(90, 160)} == {tmp_path.name}
    assert [Path(f.key.path).name for f in index.overlapping(90, 160)] == ["r0.json", "r1.json"]
    assert index.overlapping(260, 290) == []
    index.close()


def test_a_damaged_index_is_set_aside_and_rebuilt(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    index = Index(db)
    assert index.counts() == {}
    assert [p.name.startswith("index.sqlite3.broken-") for p in tmp_path.iterdir()].count(True)
    assert index.problem is None
    index.close()
    sqlite3.connect(db).close()


def test_by_framework_sums_settled_runs_and_counts_unpriced(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    rows = [("a", "verified", 0.5), ("b", "verified", None), ("c", "expired", None)]
    for name, status, cost in rows:
        p = tmp_path / f"{name}.json"
        p.write_text("{}")
        index.put([Finished(FileKey.of(p), "baes", name, 0, 1, status, 100, 10, cost)])
    summary = index.by_framework()["baes"]
    assert summary["runs"] == {"verified": 2, "expired": 1}
    assert (summary["tokens_in"], summary["tokens_out"]) == (200, 20)  # settled runs only
    assert summary["cost_usd"] == 0.5
    assert summary["unpriced"] == 1 and summary["cost_complete"] is False
    index.close()


def test_a_framework_whose_every_run_is_unpriced_has_no_cost_rather_than_zero(
    tmp_path: Path,
) -> None:
    index = Index(tmp_path / "index.sqlite3")
    for name, fw, cost in (("a", "acme", None), ("b", "baes", 0.25)):
        p = tmp_path / f"{name}.json"
        p.write_text("{}")
        index.put([Finished(FileKey.of(p), fw, name, 0, 1, "verified", 100, 10, cost)])
    frameworks = index.by_framework()
    assert frameworks["acme"]["cost_usd"] is None and frameworks["acme"]["unpriced"] == 1
    assert frameworks["acme"]["cost_complete"] is False
    assert frameworks["baes"]["cost_usd"] == 0.25 and frameworks["baes"]["cost_complete"]
    index.close()


def test_damage_after_a_set_aside_directory_is_still_replaced(tmp_path: Path) -> None:
    # The harness: once `index.sqlite3` was a directory and was moved aside to
    # `index.sqlite3.broken`, later damage could not be moved onto that directory, and
    # every start exited 1 with sqlite3.DatabaseError (305 of 1,001 starts).
    db = tmp_path / "index.sqlite3"
    db.mkdir()
    Index(db).close()
    for _ in range(3):
        db.write_bytes(b"garbage, not sqlite" * 50)
        index = Index(db)
        assert index.problem is None
        assert index.counts() == {}
        index.close()
    assert len([p for p in tmp_path.iterdir() if ".broken-" in p.name]) >= 1


def test_an_index_that_cannot_be_set_aside_is_bypassed_not_fatal(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "state") as state:
        db = state / "index.sqlite3"
        db.write_bytes(b"garbage, not sqlite" * 50)
        read_only(state)  # neither moved aside nor deleted nor rebuilt
        index = Index(db)
        assert index.problem is not None and str(db) in index.problem
        run = tmp_path / "r.json"
        run.write_text("{}")
        index.put([_finished(run, 1.0, 2.0)])
        assert index.counts() == {"verified": 1}  # in memory, and `problem` says so
        index.close()


def test_a_full_disk_while_running_falls_back_to_memory(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "state") as state:
        index = Index(state / "index.sqlite3")
        problems: list[str] = []
        index.on_problem(problems.append)
        fill(state)
        runs = []
        for i in range(200):  # rows until the disk says no
            run = tmp_path / f"r{i}.json"
            run.write_text("{}")
            runs.append(_finished(run, 1.0, 2.0))
            index.put([runs[-1]])
            if problems:
                break
        assert problems, "the full disk never showed"
        assert index.problem is not None
        assert "full" in index.problem
        index.put(runs)
        assert index.counts() == {"verified": len(runs)}  # in memory from here on
        index.close()


def test_counts_beyond_64_bits_are_stored_as_unknown(tmp_path: Path) -> None:
    # A page saying 10^20 tokens was once written; the index then crashed every start.
    index = Index(tmp_path / "index.sqlite3")
    run = tmp_path / "r.json"
    run.write_text("{}")
    huge = Finished(FileKey.of(run), "baes", "r", 1.0, 2.0, "verified", 10**20, -(10**30))
    index.put([huge])
    (row,) = index.overlapping(0, 3)
    assert (row.tokens_in, row.tokens_out) == (None, None)
    index.close()

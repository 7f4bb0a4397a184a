"""The SQLite index of finished runs, on real files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
    assert (tmp_path / "index.sqlite3.broken").exists()
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
    assert summary["unpriced"] == 1
    index.close()

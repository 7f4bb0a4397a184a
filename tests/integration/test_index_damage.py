"""Index damage found by bench/kill_loop.py: a table of another shape under our version
number, and pages damaged past the first. Both passed the open checks, so the index ran in
memory at every start; now they are set aside and rebuilt."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tokensettle.index import SCHEMA_VERSION, FileKey, Finished, Index


def test_an_index_with_a_table_of_another_shape_is_set_aside_and_rebuilt(
    tmp_path: Path,
) -> None:
    db = tmp_path / "index.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(
        "CREATE TABLE finished (path TEXT PRIMARY KEY, note TEXT);"
        "INSERT INTO finished VALUES ('/nowhere', 'x');"
    )
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")  # the current layout's number
    con.close()
    run = tmp_path / "r.json"
    run.write_text("{}")
    index = Index(db)
    assert index.versions() == {}
    index.put([Finished(FileKey.of(run), "baes", "r", 1.0, 2.0, "verified", 10, 5)])
    assert index.problem is None, index.problem  # today: "no such column: inode"
    index.close()
    assert any(".broken-" in p.name for p in tmp_path.iterdir())
    again = Index(db)  # the next start uses the rebuilt file
    assert set(again.versions()) == {str(run)}
    assert again.problem is None
    again.close()


def test_an_index_damaged_past_its_first_page_is_set_aside_and_rebuilt(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite3"
    index = Index(db)
    index.put(
        Finished(
            FileKey(f"/runs/baes/run-{i:06d}/metrics.json", i, 7000, i),
            "baes",
            f"run-{i:06d}",
            1.0e9 + 60 * i,
            1.0e9 + 60 * i + 50,
            "verified",
            1000 + i,
            100 + i,
        )
        for i in range(3000)
    )
    index.close()
    with open(db, "r+b") as f:  # four pages in the middle of the file overwritten
        f.seek(db.stat().st_size // 2 // 4096 * 4096)
        f.write(bytes(range(256)) * 64)
    run = tmp_path / "r.json"
    run.write_text("{}")
    index = Index(db)
    index.versions()
    index.put([Finished(FileKey.of(run), "baes", "r", 1.0, 2.0, "verified", 10, 5)])
    assert index.problem is None, index.problem  # today: "database disk image is malformed"
    index.close()
    again = Index(db)  # the next start: a sound file, with the row put after the repair
    assert str(run) in again.versions()
    assert again.problem is None, again.problem
    again.close()

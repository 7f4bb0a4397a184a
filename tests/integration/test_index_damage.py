"""Index damage found by bench/kill_loop.py that the index does not repair yet.

Each test is marked xfail(strict=True): it fails on the code as it is (the report of the
kill -9 loop names it), and once the index is fixed it passes, which strict xfail turns
into a failure, so the marker goes with the fix.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tokensettle.index import SCHEMA_VERSION, FileKey, Finished, Index


@pytest.mark.xfail(
    strict=True,
    reason="a `finished` table of another shape under the current user_version passes "
    "_connect (CREATE TABLE IF NOT EXISTS is a no-op; SQLite takes the missing column in "
    "the index on \"end\" for the string 'end'), so the first query fails and the index "
    "falls back to memory at every start instead of being set aside and rebuilt",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="damage past the first page passes _connect (its `SELECT count(*)` reads only "
    "part of the file); the first real query says 'database disk image is malformed' and "
    "the index falls back to memory, at this start and at every later one, never set aside",
)
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

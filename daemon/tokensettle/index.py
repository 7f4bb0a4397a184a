"""The state directory's index of finished runs (SQLite, local disk, never in the roots).

A restart over 100,000 settled runs must not parse 100,000 files: a file whose
(path, inode, size, mtime) matches a finished row is skipped with one `stat`. The rows
also keep each finished run's window, so settled runs still own their minutes when a
neighbour is attributed. The files stay the record: deleting the index costs only time,
and a damaged index is set aside and rebuilt.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("tokensettle.index")

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS finished (
    path TEXT PRIMARY KEY,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    framework TEXT NOT NULL,
    run_id TEXT NOT NULL,
    start REAL NOT NULL,
    "end" REAL NOT NULL,
    status TEXT NOT NULL,
    tokens_in INTEGER,
    tokens_out INTEGER,
    cost_usd REAL
);
CREATE INDEX IF NOT EXISTS finished_end ON finished ("end");
"""


@dataclass(frozen=True, slots=True)
class FileKey:
    path: str
    inode: int
    size: int
    mtime_ns: int

    @staticmethod
    def of(path: Path) -> FileKey:
        st = os.stat(path, follow_symlinks=False)
        return FileKey(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class Finished:
    key: FileKey
    framework: str
    run_id: str
    start: float
    end: float
    status: str
    tokens_in: int | None
    tokens_out: int | None
    cost_usd: float | None = None


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            broken = path.with_name(path.name + ".broken")
            log.warning("index.rebuilt", path=str(path), error=str(exc), moved_to=str(broken))
            with contextlib.suppress(OSError):
                os.replace(path, broken)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # losing the last rows only costs a parse
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version not in (0, SCHEMA_VERSION):
                # An older layout: the files are the record, so start the index afresh.
                db.executescript("DROP TABLE IF EXISTS finished;")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("SELECT count(*) FROM finished").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        self._db.close()

    def lookup(self, key: FileKey) -> Finished | None:
        """The finished row for this exact file version, or None."""
        row = self._db.execute(
            'SELECT framework, run_id, start, "end", status, tokens_in, tokens_out, cost_usd '
            "FROM finished WHERE path=? AND inode=? AND size=? AND mtime_ns=?",
            (key.path, key.inode, key.size, key.mtime_ns),
        ).fetchone()
        return Finished(key, *row) if row else None

    def versions(self) -> dict[str, tuple[int, int, int]]:
        """path -> (inode, size, mtime_ns) of every finished file (cheap to hold for 100k)."""
        rows = self._db.execute("SELECT path, inode, size, mtime_ns FROM finished")
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def put(self, rows: Iterable[Finished]) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO finished VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        f.key.path,
                        f.key.inode,
                        f.key.size,
                        f.key.mtime_ns,
                        f.framework,
                        f.run_id,
                        f.start,
                        f.end,
                        f.status,
                        f.tokens_in,
                        f.tokens_out,
                        f.cost_usd,
                    )
                    for f in rows
                ],
            )

    def forget(self, paths: Iterable[str]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM finished WHERE path=?", [(p,) for p in paths])

    def forget_under(self, directory: str) -> None:
        prefix = directory.rstrip("/") + "/"
        with self._transaction():
            self._db.execute(
                "DELETE FROM finished WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)
            )

    def overlapping(self, start: float, end: float) -> list[Finished]:
        """Finished runs whose [start, end] touches [start, end] (for attribution)."""
        rows = self._db.execute(
            'SELECT path, inode, size, mtime_ns, framework, run_id, start, "end", status, '
            'tokens_in, tokens_out, cost_usd FROM finished WHERE "end" >= ? AND start <= ?',
            (start, end),
        )
        return [Finished(FileKey(*r[:4]), *r[4:]) for r in rows]

    def by_framework(self) -> dict[str, dict[str, Any]]:
        """Settled runs per framework: count, tokens and cost (for /runs)."""
        rows = self._db.execute(
            "SELECT framework, status, count(*), sum(tokens_in), sum(tokens_out), "
            "sum(cost_usd), sum(cost_usd IS NULL) FROM finished GROUP BY framework, status"
        )
        out: dict[str, dict[str, Any]] = {}
        for fw, status, n, tin, tout, cost, unpriced in rows:
            entry = out.setdefault(
                fw, {"runs": {}, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0, "unpriced": 0}
            )
            entry["runs"][status] = n
            if status in ("verified", "ambiguous"):
                entry["tokens_in"] += tin or 0
                entry["tokens_out"] += tout or 0
                entry["cost_usd"] = round(entry["cost_usd"] + (cost or 0.0), 9)
                entry["unpriced"] += unpriced or 0
        return out

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT status, count(*) FROM finished GROUP BY status")
        return {status: n for status, n in rows}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

"""The state directory's index of finished runs (SQLite, local disk, never in the roots).

A restart over 100,000 settled runs must not parse 100,000 files: a file whose
(path, inode, size, mtime) matches a finished row is skipped with one `stat`. The rows
also keep each finished run's window, so settled runs still own their minutes when a
neighbour is attributed. The files stay the record: deleting the index costs only time.

The index is an optimisation, so it can never stop the daemon: a damaged file is set
aside (under a fresh name each time, WAL files with it) and rebuilt; if even that fails,
or the disk fills while running, the index carries on in memory, `problem` says why, and
the owner (the daemon) shows it in `/healthz` and rescans the tree to refill it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from tokensettle.usage import Scope
from tokensettle.usage_scope import LeaseDeclaration, ScopeDeclarationError, lease_from_json

log = structlog.get_logger("tokensettle.index")

T = TypeVar("T")
SCHEMA_VERSION = 3
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
    cost_usd REAL,
    api_key_ids TEXT,
    project_ids TEXT,
    lease TEXT,
    unpriced TEXT,
    model TEXT,
    provider TEXT
);
CREATE INDEX IF NOT EXISTS finished_end ON finished ("end");
"""
_EXPECTED_COLUMNS = [
    line.strip().split()[0].strip('"')
    for line in _SCHEMA.split("(", 1)[1].split(");", 1)[0].strip().splitlines()
]
_INT64 = (-(2**63), 2**63 - 1)
MEMORY = ":memory:"


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
    #: the run's declared scope (None: its framework's), so a settled run keeps owning
    #: exactly its own minutes when a neighbour is attributed
    scope: Scope | None = None
    #: the lease that gave the run its key: revoked once every run declaring it is settled
    lease: LeaseDeclaration | None = None
    unpriced: tuple[str, ...] = ()
    #: the model the run's file names (for the provider of a framework that names none)
    model: str | None = None


def _int64(value: int | None) -> int | None:
    """A count SQLite can store; anything beyond 64 bits (a hostile or broken file) is
    kept as unknown rather than crash every start."""
    if value is None or not _INT64[0] <= value <= _INT64[1]:
        return None
    return value


def _join(values: Iterable[str]) -> str:
    return ",".join(sorted(values))


def _split(text: str | None) -> frozenset[str]:
    return frozenset(v for v in (text or "").split(",") if v)


def _finished(key: FileKey, row: Sequence[Any]) -> Finished:
    """A row of `_COLUMNS` after the file key."""
    (framework, run_id, start, end, status, tin, tout, cost) = row[:8]
    keys, projects, lease, unpriced, model, provider = row[8:]
    scope = (
        Scope(_split(keys), _split(projects), provider or "openai") if keys is not None else None
    )
    leased: LeaseDeclaration | None = None
    if lease:
        with contextlib.suppress(ScopeDeclarationError, ValueError, TypeError):
            leased = lease_from_json(json.loads(lease), source="index")
    return Finished(
        key,
        framework,
        run_id,
        start,
        end,
        status,
        tin,
        tout,
        cost,
        scope,
        leased,
        tuple(sorted(_split(unpriced))),
        model,
    )


_COLUMNS = (
    'framework, run_id, start, "end", status, tokens_in, tokens_out, cost_usd, '
    "api_key_ids, project_ids, lease, unpriced, model, provider"
)


def _row(f: Finished) -> tuple[Any, ...]:
    return (
        f.key.path,
        f.key.inode,
        f.key.size,
        f.key.mtime_ns,
        f.framework,
        f.run_id,
        f.start,
        f.end,
        f.status,
        _int64(f.tokens_in),
        _int64(f.tokens_out),
        f.cost_usd,
        _join(f.scope.api_key_ids) if f.scope is not None else None,
        _join(f.scope.project_ids) if f.scope is not None else None,
        json.dumps(f.lease.to_json()) if f.lease is not None else None,
        _join(f.unpriced) or None,
        f.model,
        f.scope.provider if f.scope is not None else None,
    )


def _connect(target: str) -> sqlite3.Connection:
    db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
    try:
        if target != MEMORY:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # losing the last rows only costs a parse
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version not in (0, SCHEMA_VERSION):
            # An older layout: the files are the record, so start the index afresh.
            db.executescript("DROP TABLE IF EXISTS finished;")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # A table of another shape under our version number, or pages damaged past the
        # first, pass the statements above and fail the first real query: check both now
        # so such a file is set aside and rebuilt instead of bypassed at every start.
        columns = [row[1] for row in db.execute("PRAGMA table_info(finished)")]
        if columns != _EXPECTED_COLUMNS:
            raise sqlite3.DatabaseError(f"table 'finished' has columns {columns}")
        (check,) = db.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
    except BaseException:
        db.close()
        raise
    return db


def _set_aside(path: Path) -> Path | None:
    """Move a damaged database (and its WAL files) to a fresh name; delete it if it
    cannot be moved. None if it is still in the way."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.broken-{stamp}-{os.getpid()}")
    moved: Path | None = target
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if not os.path.lexists(src):
            continue
        try:
            os.replace(src, Path(str(target) + suffix))
        except OSError:
            moved = None
            with contextlib.suppress(OSError):
                if src.is_dir() and not src.is_symlink():
                    os.rmdir(src)  # only an empty one; anything else stays for a human
                else:
                    src.unlink()
    return None if os.path.lexists(path) else (moved or path)


class Index:
    """Thread-safe: the daemon looks files up from worker threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem: str | None = None
        self._lock = threading.Lock()
        self._on_problem: Callable[[str], None] | None = None
        self._db = self._open_file()

    def on_problem(self, callback: Callable[[str], None]) -> None:
        """Called (on the thread that met it) when the index falls back to memory."""
        self._on_problem = callback

    def _open_file(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return _connect(str(self.path))
        except (sqlite3.Error, OSError) as first:
            moved = _set_aside(self.path)
            if moved is not None:
                log.warning(
                    "index.rebuilt", path=str(self.path), error=str(first), moved_to=str(moved)
                )
                with contextlib.suppress(sqlite3.Error, OSError):
                    return _connect(str(self.path))
            return self._memory(f"cannot use {self.path}: {first}")

    def _memory(self, reason: str) -> sqlite3.Connection:
        self.problem = reason
        log.error(
            "index.unavailable",
            path=str(self.path),
            error=reason,
            action="running with an in-memory index; a restart re-reads every run file",
        )
        return _connect(MEMORY)

    def _guard(self, work: Callable[[sqlite3.Connection], T], fallback: T) -> T:
        with self._lock:
            try:
                return work(self._db)
            except (sqlite3.Error, OSError) as exc:
                if self.problem is not None:  # already in memory: nothing left to fall to
                    log.error("index.failed", error=f"{type(exc).__name__}: {exc}")
                    return fallback
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = self._memory(f"{type(exc).__name__}: {exc}")
                problem = self.problem
        if self._on_problem is not None and problem is not None:
            self._on_problem(problem)
        return fallback

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    def lookup(self, key: FileKey) -> Finished | None:
        """The finished row for this exact file version, or None."""

        def work(db: sqlite3.Connection) -> Finished | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM finished "  # noqa: S608 - a constant column list
                "WHERE path=? AND inode=? AND size=? AND mtime_ns=?",
                (key.path, key.inode, key.size, key.mtime_ns),
            ).fetchone()
            return _finished(key, row) if row else None

        return self._guard(work, None)

    def versions(self) -> dict[str, tuple[int, int, int]]:
        """path -> (inode, size, mtime_ns) of every finished file (cheap to hold for 100k)."""

        def work(db: sqlite3.Connection) -> dict[str, tuple[int, int, int]]:
            rows = db.execute("SELECT path, inode, size, mtime_ns FROM finished")
            return {r[0]: (r[1], r[2], r[3]) for r in rows}

        return self._guard(work, {})

    def put(self, rows: Iterable[Finished]) -> None:
        values = [_row(f) for f in rows]
        if not values:
            return

        def work(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.executemany(
                    "INSERT OR REPLACE INTO finished VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    values,
                )

        self._guard(work, None)

    def forget(self, paths: Iterable[str]) -> None:
        values = [(p,) for p in paths]
        if not values:
            return

        def work(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.executemany("DELETE FROM finished WHERE path=?", values)

        self._guard(work, None)

    def forget_under(self, directory: str) -> None:
        prefix = directory.rstrip("/") + "/"

        def work(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "DELETE FROM finished WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)
                )

        self._guard(work, None)

    def overlapping(self, start: float, end: float) -> list[Finished]:
        """Finished runs whose [start, end] touches [start, end] (for attribution)."""

        def work(db: sqlite3.Connection) -> list[Finished]:
            rows = db.execute(
                f"SELECT path, inode, size, mtime_ns, {_COLUMNS} FROM finished "  # noqa: S608
                'WHERE "end" >= ? AND start <= ?',
                (start, end),
            )
            return [_finished(FileKey(*r[:4]), r[4:]) for r in rows]

        return self._guard(work, [])

    def leased(self) -> list[tuple[LeaseDeclaration, str]]:
        """(lease, status) of every finished run a lease gave its key."""

        def work(db: sqlite3.Connection) -> list[tuple[LeaseDeclaration, str]]:
            rows = db.execute("SELECT lease, status FROM finished WHERE lease IS NOT NULL")
            out: list[tuple[LeaseDeclaration, str]] = []
            for text, status in rows:
                with contextlib.suppress(ScopeDeclarationError, ValueError, TypeError):
                    out.append((lease_from_json(json.loads(text), source="index"), status))
            return out

        return self._guard(work, [])

    def by_framework(self) -> dict[str, dict[str, Any]]:
        """Settled runs per framework: count, tokens and cost (for /runs). `cost_usd` sums
        the complete costs only (null when no settled run has one); `unpriced` counts the
        runs without one, `unpriced_models` names the models that could not be priced and
        `cost_complete` is false while any is: an unpriced run is never counted as zero
        without saying so. Tokens of `ambiguous` runs (`runs.ambiguous`) are apportioned."""

        def work(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return db.execute(
                "SELECT framework, status, count(*), sum(tokens_in), sum(tokens_out), "
                "sum(cost_usd), sum(cost_usd IS NULL), group_concat(unpriced) "
                "FROM finished GROUP BY framework, status"
            ).fetchall()

        out: dict[str, dict[str, Any]] = {}
        priced: dict[str, int] = {}
        fallback: list[tuple[Any, ...]] = []
        for fw, status, n, tin, tout, cost, unpriced, models in self._guard(work, fallback):
            entry = out.setdefault(
                fw,
                {
                    "runs": {},
                    "tokens_in": 0,
                    "tokens_out": 0,
                    "cost_usd": 0.0,
                    "unpriced": 0,
                    "unpriced_models": [],
                },
            )
            entry["runs"][status] = n
            if status in ("verified", "ambiguous"):
                entry["tokens_in"] += tin or 0
                entry["tokens_out"] += tout or 0
                entry["cost_usd"] = round(entry["cost_usd"] + (cost or 0.0), 9)
                entry["unpriced"] += unpriced or 0
                entry["unpriced_models"] = sorted(set(entry["unpriced_models"]) | _split(models))
                priced[fw] = priced.get(fw, 0) + n - (unpriced or 0)
        for fw, entry in out.items():
            entry["cost_complete"] = entry["unpriced"] == 0
            if not priced.get(fw):
                entry["cost_usd"] = None
        return out

    def counts(self) -> dict[str, int]:
        def work(db: sqlite3.Connection) -> dict[str, int]:
            rows = db.execute("SELECT status, count(*) FROM finished GROUP BY status")
            return {status: n for status, n in rows}

        return self._guard(work, {})


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")

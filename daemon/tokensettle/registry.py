"""The runs the daemon knows: unfinished ones in memory, finished ones in the index.

Every file operation runs in a worker thread (a FIFO or a slow disk must never stall the
event loop); what comes back is admitted on the loop: tracked and put on the poll grid,
or, once settled, kept only as an index row (its window still owns minutes when a
neighbour is attributed). The files stay the record: state here is only what can be
derived from them again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import Any

import structlog

from tokensettle.atomic import TempSweep, remove_stale_temps
from tokensettle.discovery import RUN_FILE, Found, found_at, found_of, run_entries
from tokensettle.index import FileKey, Finished, Index
from tokensettle.reconcile import Loaded, RunRef, load_runs, window_problem
from tokensettle.runfile import RunRecord, iso
from tokensettle.scheduler import PollGrid
from tokensettle.stability import TERMINAL, Policy, Status, next_due
from tokensettle.states import TOO_OLD, WAITING
from tokensettle.usage import Scope
from tokensettle.windows import Activity

log = structlog.get_logger("tokensettle.daemon")

#: Finished runs this far around a batch's windows are asked for as owners of its minutes.
OWNER_MARGIN = 3600.0
#: Long loops on the event loop hand it back this often, so /healthz answers meanwhile.
YIELD_EVERY = 200


@dataclass
class Tracked:
    """A run the daemon is waiting on (or cannot read): it lives in memory only."""

    loaded: Loaded
    state: str
    due: datetime | None = None
    discovered: datetime = field(default_factory=lambda: datetime.now(UTC))
    digest: str = ""
    ref: RunRef | None = None  # what attribution needs of it, built once

    def __post_init__(self) -> None:
        if self.ref is None and self.loaded.record is not None:
            self.ref = RunRef.of(self.loaded.record)

    def to_json(self, point: float | None = None, write_error: str | None = None) -> dict[str, Any]:
        """What /runs shows; `point`: the grid point it is polled at (holds included);
        `write_error`: why its last write failed, while that fault lasts."""
        record = self.loaded.record
        message = (record.message if record else self.loaded.error) or ""
        if write_error is not None:
            message = f"write failed, file unchanged, retried later: {write_error}"
        due = datetime.fromtimestamp(point, UTC) if point is not None else self.due
        return {
            "path": str(self.loaded.found.path),
            "framework": self.loaded.found.framework,
            "run_id": record.run_id if record else None,
            "status": self.state,
            "message": message,
            "attempts": len(record.attempts) if record else 0,
            "run_end": iso(record.end) if record else None,
            "next_poll_at": iso(due) if due else None,
            "discovered_at": iso(self.discovered),
        }


@dataclass(frozen=True, slots=True)
class _Probe:
    """What a worker thread found at a path."""

    path: Path
    key: FileKey | None = None  # None: the path is gone (or was never a run)
    loaded: Loaded | None = None  # None with a key: an unchanged finished run, or our echo
    ignore: bool = False
    finished: bool = False  # the index knows this very version as settled


@dataclass
class _Scan:
    finished: list[Finished] = field(default_factory=list)
    other: list[tuple[FileKey, Loaded]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    #: what discovery saw but does not yield: FIFOs or directories named metrics.json,
    #: symlinked directories (reported as `skipped`), and our own temp files
    skipped: list[Found] = field(default_factory=list)
    temps: list[str] = field(default_factory=list)
    sweep: TempSweep = field(default_factory=TempSweep)


def finished_row(key: FileKey, record: RunRecord) -> Finished:
    written = record.written
    declared = record.declared
    return Finished(
        key,
        record.framework,
        record.run_id,
        record.activity.start,
        record.activity.end,
        record.status.value if record.status else "",
        written.tokens_in if written else None,
        written.tokens_out if written else None,
        record.cost_usd,
        declared.scope() if declared is not None else None,
        declared.lease if declared is not None else None,
        record.unpriced,
        record.model,
    )


class Registry:
    def __init__(
        self,
        roots: list[Path],
        index: Index,
        grid: PollGrid[Path],
        *,
        policy: Callable[[], Policy],
        scope_for: Callable[[str], Scope],
        grace: Callable[[], int],
        clock: Callable[[], datetime],
    ) -> None:
        self.roots = roots
        self.index = index
        self.grid = grid
        self._policy = policy
        self._scope_for = scope_for
        self._grace = grace
        self.clock = clock
        self.tracked: dict[Path, Tracked] = {}
        #: digest of the bytes we last wrote to a path: its watcher event is our echo
        self.ours: dict[Path, str] = {}
        self._warned_unscoped: set[str] = set()
        #: called with a directory to look at again soon (a file caught mid-write)
        self.defer: Callable[[Path], None] = lambda _path: None
        #: a directory about to be listed (from worker threads): watched first, so what
        #: appears in it after the listing has an event
        self.watch_dir: Callable[[str], None] = lambda _directory: None
        #: a settled run's directory: no watch needed, the periodic rescan stats its file
        self.unwatch_dir: Callable[[str], None] = lambda _directory: None
        #: settled runs admitted since the last flush, put into the index in one transaction
        self._settled: list[Finished] = []
        #: why a run cannot be polled as it stands (None: it can)
        #: why a run's last write failed, while it backs off (the daemon's write faults)
        self.write_error: Callable[[Path], str | None] = lambda _path: None
        self.problem: Callable[[RunRecord], str | None] = lambda record: window_problem(
            record, self._policy()
        )

    # ------------------------------------------------------------------ paths (pure)

    def root_of(self, path: Path) -> Path | None:
        for root in self.roots:
            if path.is_relative_to(root) and path.parent != root:
                return root
        return None

    # ------------------------------------------------------------------ reading (threads)

    def _nested(self, path: Path, root: Path) -> bool:
        """A metrics.json inside another run's directory (older per-sprint layouts)."""
        parent = path.parent.parent
        while parent != root and parent.is_relative_to(root):
            if (parent / RUN_FILE).exists():
                return True
            parent = parent.parent
        return False

    def _probe(self, path: Path, echo: str | None) -> _Probe:
        """Blocking. `echo`: the digest of our own last write, if the tracked run has it."""
        root = self.root_of(path)
        if root is None or self._nested(path, root):
            return _Probe(path, ignore=True)
        try:
            key = FileKey.of(path)
            found = found_at(path, root)
        except OSError:
            return _Probe(path)
        if self.index.lookup(key) is not None:
            return _Probe(path, key, finished=True)
        (loaded,) = load_runs([found], self._grace())
        if echo is not None and loaded.snapshot is not None and loaded.snapshot.digest == echo:
            return _Probe(path, key)  # the event of our own write: nothing new
        return _Probe(path, key, loaded)

    def _scan_blocking(self, known: Mapping[str, tuple[int, int, int]]) -> _Scan:
        """Stat every run file; parse only those the index does not know as finished.
        A finished run whose file is unchanged costs one `stat` of its file: its
        directory is neither listed nor watched (`settled`). Objects are built only for
        files that need parsing, and a finished run is kept as its small index row, not
        its bytes: a restart over 100,000 runs stays cheap."""
        scan = _Scan()
        grace = self._grace()
        seen = scan.seen

        def settled(directory: str) -> bool:
            path = directory + "/" + RUN_FILE
            version = known.get(path)
            if version is None:
                return False
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                return False
            if (st.st_ino, st.st_size, st.st_mtime_ns) != version or not S_ISREG(st.st_mode):
                return False
            seen.add(path)
            return True

        for root in self.roots:
            entries = run_entries(
                root,
                skipped=scan.skipped,
                temps=scan.temps,
                watch=self.watch_dir,
                settled=settled if known else None,
            )
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                seen.add(entry.path)
                if known.get(entry.path) == (st.st_ino, st.st_size, st.st_mtime_ns):
                    self.unwatch_dir(os.path.dirname(entry.path))
                    continue
                key = FileKey(entry.path, st.st_ino, st.st_size, st.st_mtime_ns)
                (loaded,) = load_runs([found_of(entry, root)], grace)
                if loaded.record is not None and loaded.record.status in TERMINAL:
                    scan.finished.append(finished_row(key, loaded.record))
                    self.unwatch_dir(os.path.dirname(entry.path))
                else:
                    scan.other.append((key, loaded))
        for found in scan.skipped:
            try:
                key = FileKey.of(found.path)
            except OSError:
                continue
            scan.seen.add(str(found.path))
            scan.other.append((key, load_runs([found], grace)[0]))
        # A write killed half-way leaves a temp file of ours: only stale ones go (no write
        # of ours holds them, their writer is gone), found in the listing just made.
        scan.sweep = remove_stale_temps(scan.temps)
        return scan

    # ------------------------------------------------------------------ looking (loop)

    def _echo(self, path: Path) -> str | None:
        tracked = self.tracked.get(path)
        ours = self.ours.get(path)
        return ours if tracked is not None and tracked.digest == ours else None

    async def look(
        self, paths: Iterable[Path], *, trailing: bool = False, echo: bool = True
    ) -> None:
        """(Re)read these run files in a worker thread and (re)schedule them. `echo`
        False: admit them even when the run file is the one we last wrote (its scope
        file changed, which the run file's digest does not show)."""
        wanted = [(p, self._echo(p) if echo else None) for p in paths]
        if not wanted:
            return
        probes = await asyncio.to_thread(lambda: [self._probe(p, e) for p, e in wanted])
        for n, probe in enumerate(probes):
            if n and n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a burst of files must not hold the loop
            if probe.ignore:
                continue
            if probe.key is None:
                self.forget(probe.path)
            elif probe.finished:
                self.tracked.pop(probe.path, None)
                self.grid.drop(probe.path)
                self.unwatch_dir(str(probe.path.parent))
            elif probe.loaded is not None:
                self.admit(probe.key, probe.loaded, trailing=trailing)
        self.flush()

    async def look_under(self, directories: Iterable[Path]) -> None:
        """A directory created or moved in: its run files may predate our watch on it."""
        inside = [d for d in directories if any(d.is_relative_to(r) for r in self.roots)]
        if not inside:
            return

        def find() -> list[Path]:
            out: list[Path] = []
            for directory in inside:
                root = next(r for r in self.roots if directory.is_relative_to(r))
                # A metrics.json that is no regular file (a FIFO) is looked at too: the
                # look reports it, and its creation may predate the watch.
                skipped: list[Found] = []
                found = [
                    Path(e.path)
                    for e in run_entries(
                        directory,
                        watch=self.watch_dir,
                        skipped=skipped,
                        top_is_root=directory == root,
                    )
                ]
                found.extend(f.path for f in skipped if f.path.name == RUN_FILE)
                out.extend(p for p in found if self.root_of(p) == root)
            return out

        await self.look(await asyncio.to_thread(find))

    async def rescope(self, paths: list[Path]) -> None:
        """Runs whose declared scope file changed: read them again, settled ones too (the
        index would skip an unchanged metrics.json, and so would the echo check: the run
        file is still the one we last wrote)."""
        self.index.forget([str(p) for p in paths])
        await self.look(paths, trailing=True, echo=False)

    def forget(self, path: Path) -> None:
        self.tracked.pop(path, None)
        self.grid.drop(path)
        self.ours.pop(path, None)
        self.index.forget([str(path)])

    def forget_under(self, directory: Path) -> None:
        """A directory was moved away or deleted: nothing under it exists at that path."""
        for path in [p for p in self.tracked if p.is_relative_to(directory)]:
            self.forget(path)
        self.index.forget_under(str(directory))

    def admit(self, key: FileKey, loaded: Loaded, *, trailing: bool, quiet: bool = False) -> None:
        """Track, schedule or index one parsed file. `quiet`: right after our own poll,
        whose `run.polled` event already told the story."""
        path = loaded.found.path
        digest = loaded.snapshot.digest if loaded.snapshot else ""
        previous = self.tracked.get(path)
        record = loaded.record
        if record is None:
            if not trailing and loaded.found.skip_reason is None:
                # Possibly caught mid-write: look again once the path has been quiet
                # (or at once when its writer closes it: the watcher's close event).
                log.debug("run.deferred", path=str(path), reason=loaded.error)
                self.defer(path)
                return
            state = "skipped" if loaded.found.skip_reason else Status.ERROR.value
            if previous is None or previous.digest != digest or previous.state != state:
                log.warning("run.unreadable", path=str(path), reason=loaded.error)
            self.tracked[path] = Tracked(loaded, state, None, digest=digest)
            self.grid.drop(path)
            return
        self._warn_unscoped(record.framework)
        problem = self.problem(record)
        if problem is not None:
            if previous is None or previous.digest != digest:
                log.warning("run.unreadable", path=str(path), reason=problem)
            self.tracked[path] = Tracked(
                Loaded(loaded.found, None, loaded.snapshot, problem),
                Status.ERROR.value,
                None,
                digest=digest,
            )
            self.grid.drop(path)
            return
        if record.status in TERMINAL:
            self.tracked.pop(path, None)
            self.grid.drop(path)
            self._settled.append(finished_row(key, record))
            self.unwatch_dir(str(path.parent))
            return
        now = self.clock()
        policy = self._policy()
        due = next_due(record.attempts, record.status, record.end, policy)
        state = (record.status or Status.PENDING).value
        if now >= record.end + policy.max_age and not (record.ours and record.attempts):
            state, due = TOO_OLD, None
        tracked = Tracked(loaded, state, due, digest=digest)
        if previous is not None:
            tracked.discovered = previous.discovered
        self.tracked[path] = tracked
        self.grid.put(path, due.timestamp() if due else None, now.timestamp())
        point = self.grid.due_of(path)
        if not quiet and (previous is None or previous.state != state):
            log.info(
                "run.scheduled" if due else "run.too_old",
                path=str(path),
                run_id=record.run_id,
                framework=record.framework,
                status=state,
                attempts=len(record.attempts),
                next_poll_at=iso(datetime.fromtimestamp(point, UTC)) if point else None,
            )

    def flush(self) -> None:
        """Put the runs settled since the last flush into the index (one transaction:
        one per run cost a second after each round of a 10,000-run burst)."""
        rows, self._settled = self._settled, []
        self.index.put(rows)

    def admit_written(self, loaded: Loaded) -> None:
        """The file as our own write left it: no need to read it again."""
        path = loaded.found.path
        snap = loaded.snapshot
        if snap is None:
            return
        self.ours[path] = snap.digest
        key = FileKey(str(path), snap.inode, snap.size, snap.mtime_ns)
        self.admit(key, loaded, trailing=True, quiet=True)

    def reschedule(self, path: Path) -> None:
        """Put a tracked run back on the grid from what its file says (and any hold)."""
        tracked = self.tracked.get(path)
        if tracked is None or tracked.loaded.record is None:
            return
        record = tracked.loaded.record
        due = next_due(record.attempts, record.status, record.end, self._policy())
        self.grid.put(path, due.timestamp() if due else None, self.clock().timestamp())

    def _warn_unscoped(self, framework: str) -> None:
        if framework in self._warned_unscoped:
            return
        self._warned_unscoped.add(framework)
        if self._scope_for(framework).is_organisation:
            log.warning(
                "config.framework_without_scope",
                framework=framework,
                detail="its runs are settled against the whole organisation's usage, so "
                "concurrent traffic counts too; set OPENAI_API_KEY_<FW>_ID or "
                "[frameworks.<fw>] api_key_ids / project_ids",
            )

    def rescoped(self) -> None:
        """Scopes were reloaded: warn again about frameworks that still have none."""
        self._warned_unscoped.clear()

    # ------------------------------------------------------------------ rescans

    async def rescan(self, reason: str) -> dict[str, Any]:
        known = self.index.versions()
        scan = await asyncio.to_thread(self._scan_blocking, known)
        self.index.put(scan.finished)
        for row in scan.finished:
            path = Path(row.key.path)
            self.tracked.pop(path, None)
            self.grid.drop(path)
        for n, (key, loaded) in enumerate(scan.other):
            if n and n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            self.admit(key, loaded, trailing=True)
        self.flush()
        for path in [p for p in self.tracked if str(p) not in scan.seen]:
            self.forget(path)
        missing = [p for p in known if p not in scan.seen]
        if missing:
            self.index.forget(missing)
        for path in scan.sweep.removed:
            log.info("daemon.temp_removed", path=str(path), reason="left by an interrupted write")
        for path, why in scan.sweep.failed:
            log.warning("daemon.temp_not_removed", path=str(path), error=why)
        return {
            "reason": reason,
            "parsed": len(scan.finished) + len(scan.other),
            "skipped_finished": len(known) - len(missing),
            "tracked": len(self.tracked),
            "temps_removed": len(scan.sweep.removed),
        }

    # ------------------------------------------------------------------ for a poll round

    def loaded_of(self, paths: Iterable[Path]) -> list[Loaded]:
        return [
            self.tracked[p].loaded
            for p in paths
            if p in self.tracked and self.tracked[p].loaded.record is not None
        ]

    def owners(self, due: list[Loaded]) -> list[RunRef]:
        """Every run that may own minutes of the batch: tracked ones and finished rows."""
        owners = [t.ref for t in self.tracked.values() if t.ref is not None]
        records = [e.record for e in due if e.record is not None]
        if not records:
            return owners
        lo = min(r.activity.start for r in records) - OWNER_MARGIN
        hi = max(r.activity.end for r in records) + OWNER_MARGIN
        grace = self._grace()
        for row in self.index.overlapping(lo, hi):
            activity = Activity(row.start, row.end, grace)
            owners.append(
                RunRef(
                    Path(row.key.path), row.framework, row.run_id, activity, row.scope, row.model
                )
            )
        return owners

    # ------------------------------------------------------------------ for HTTP

    def runs_json(self, framework: str | None = None) -> dict[str, Any]:
        items = [
            t.to_json(self.grid.due_of(t.loaded.found.path), self.write_error(t.loaded.found.path))
            for t in sorted(self.tracked.values(), key=lambda t: str(t.loaded.found.path))
        ]
        frameworks = self.index.by_framework()
        if framework:
            items = [i for i in items if i["framework"] == framework]
            frameworks = {k: v for k, v in frameworks.items() if k == framework}
        return {"runs": items, "finished": self.index.counts(), "frameworks": frameworks}

    def oldest_waiting_end(self) -> datetime | None:
        """The end of the oldest run still to settle, `too_old` included (None: none)."""
        ends = [
            t.loaded.record.end
            for t in self.tracked.values()
            if t.state in WAITING and t.loaded.record is not None
        ]
        return min(ends, default=None)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tracked in self.tracked.values():
            counts[tracked.state] = counts.get(tracked.state, 0) + 1
        for status, n in self.index.counts().items():
            counts[status] = counts.get(status, 0) + n
        return counts

"""`tokensettle run`: watch, wait, poll until stable, write, on one asyncio loop.

The files are the record: every unfinished run resumes from the attempts in its own file,
so a kill -9 at any moment loses nothing. The index only lets a restart skip finished
files with a stat each. Batches go through the same `Reconciler` as `reconcile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from tokensettle import __version__
from tokensettle.atomic import read_snapshot
from tokensettle.config import ConfigError, Settings, load_settings
from tokensettle.discovery import (
    RUN_FILE,
    SYMLINK_REASON,
    Found,
    found_of,
    framework_of,
    run_entries,
    scan_all,
)
from tokensettle.index import FileKey, Finished, Index
from tokensettle.logs import configure
from tokensettle.metrics import Metrics
from tokensettle.reconcile import (
    Loaded,
    Reconciler,
    RunOutcome,
    RunRef,
    load_runs,
    policy_of,
    utcnow,
)
from tokensettle.runfile import RunFileError, RunRecord, iso, parse_run
from tokensettle.scheduler import Debouncer, DueHeap, next_tick
from tokensettle.sdnotify import notify, watchdog_interval
from tokensettle.stability import TERMINAL, Status, next_due
from tokensettle.usage_api import RetryPolicy, UsageClient
from tokensettle.watcher import Watcher
from tokensettle.windows import Activity

log = structlog.get_logger("tokensettle.daemon")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
INDEX_FILE = "index.sqlite3"


@dataclass
class Tracked:
    """A run the daemon is waiting on (or cannot read): it lives in memory only."""

    loaded: Loaded
    state: str
    due: datetime | None = None
    discovered: datetime = field(default_factory=lambda: datetime.now(UTC))
    digest: str = ""

    def to_json(self) -> dict[str, Any]:
        record = self.loaded.record
        return {
            "path": str(self.loaded.found.path),
            "framework": self.loaded.found.framework,
            "run_id": record.run_id if record else None,
            "status": self.state,
            "message": (record.message if record else self.loaded.error) or "",
            "attempts": len(record.attempts) if record else 0,
            "run_end": iso(record.end) if record else None,
            "next_poll_at": iso(self.due) if self.due else None,
            "discovered_at": iso(self.discovered),
        }


@dataclass
class _Scan:
    finished: list[Finished] = field(default_factory=list)
    other: list[tuple[FileKey, Loaded]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        reload: Callable[[], Settings] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self._reload = reload
        self.clock = clock
        self.metrics = Metrics()
        self.roots = [Path(os.path.abspath(r)) for r in settings.runs_dirs]
        self.heap: DueHeap[Path] = DueHeap()
        self.debounce: Debouncer[Path] = Debouncer(settings.settle_delay.total_seconds())
        self.tracked: dict[Path, Tracked] = {}
        self.ours: dict[Path, str] = {}
        self.written: dict[Path, bytes] = {}
        self.dirty: set[Path] = set()
        self.dirty_dirs: set[Path] = set()
        self.rescan_requested = False
        self.stop_event = asyncio.Event()
        self.wake = asyncio.Event()
        self.auth_error: str | None = None
        self.auth_retry_at: datetime | None = None
        self.last_api_success: datetime | None = None
        self.ready_event = asyncio.Event()
        self.watcher: Watcher | None = None
        self.index: Index | None = None
        self.reconciler: Reconciler | None = None
        self.next_rescan = 0.0
        self.exit_code = EXIT_OK

    # ------------------------------------------------------------------ events (loop)

    def _kick(self) -> None:
        self.wake.set()

    def on_file(self, path: Path) -> None:
        if self.debounce.touch(path, time.monotonic()):
            self.dirty.add(path)
            self._kick()

    def on_dir(self, path: Path) -> None:
        self.dirty_dirs.add(path)
        self._kick()

    def on_gone(self, directory: Path) -> None:
        """A directory was moved away or deleted: nothing under it exists at that path."""
        for path in [p for p in self.tracked if p.is_relative_to(directory)]:
            self._forget(path)
        if self.index is not None:
            self.index.forget_under(str(directory))
        self._kick()

    def on_overflow(self) -> None:
        log.warning("watcher.overflow", action="rescan")
        self.rescan_requested = True
        self._kick()

    def stop(self, signame: str = "SIGTERM") -> None:
        if not self.stop_event.is_set():
            log.info("daemon.stopping", signal=signame)
            notify("STOPPING=1")
        self.stop_event.set()
        self._kick()

    def _on_written(self, path: Path, raw: bytes) -> None:
        self.ours[path] = _digest(raw)
        self.written[path] = raw

    # ------------------------------------------------------------------ looking at files

    def _root_of(self, path: Path) -> Path | None:
        for root in self.roots:
            if path.is_relative_to(root) and path.parent != root:
                return root
        return None

    def _nested(self, path: Path, root: Path) -> bool:
        """A metrics.json inside another run's directory (older per-sprint layouts)."""
        parent = path.parent.parent
        while parent != root and parent.is_relative_to(root):
            if (parent / RUN_FILE).exists():
                return True
            parent = parent.parent
        return False

    def _forget(self, path: Path) -> None:
        self.tracked.pop(path, None)
        self.heap.set(path, None)
        self.ours.pop(path, None)
        if self.index is not None:
            self.index.forget([str(path)])

    def look(
        self, path: Path, *, raw: bytes | None = None, trailing: bool = False, quiet: bool = False
    ) -> None:
        """(Re)read one run file and (re)schedule it. `raw` = bytes we just wrote."""
        root = self._root_of(path)
        if root is None or self._nested(path, root):
            return
        if not os.path.lexists(path):
            self._forget(path)
            return
        assert self.index is not None
        try:
            key = FileKey.of(path)
        except OSError:
            self._forget(path)
            return
        if raw is None and self.index.lookup(key) is not None:
            self.tracked.pop(path, None)
            self.heap.set(path, None)
            return
        found = Found(
            path,
            root,
            framework_of(path),
            SYMLINK_REASON if path.is_symlink() else None,
        )
        if raw is not None:
            loaded = Loaded(found)
            try:
                loaded.snapshot = read_snapshot(path)
                loaded.record = parse_run(loaded.snapshot.raw, path, found.framework, self._grace)
            except (RunFileError, OSError) as exc:
                loaded.error = str(exc)
        else:
            (loaded,) = load_runs([found], self._grace)
            if loaded.snapshot is not None and self.ours.get(path) == loaded.snapshot.digest:
                tracked = self.tracked.get(path)
                if tracked is not None and tracked.digest == loaded.snapshot.digest:
                    return  # the event of our own write: nothing new
        self._admit(key, loaded, trailing=trailing, quiet=quiet)

    @property
    def _grace(self) -> int:
        return int(self.settings.window_grace.total_seconds())

    def _admit(self, key: FileKey, loaded: Loaded, *, trailing: bool, quiet: bool = False) -> None:
        """Track, schedule or index one parsed file. `quiet`: right after our own poll,
        whose `run.polled` event already told the story."""
        path = loaded.found.path
        assert self.index is not None
        assert self.reconciler is not None
        digest = loaded.snapshot.digest if loaded.snapshot else ""
        previous = self.tracked.get(path)
        record = loaded.record
        if record is None:
            if not trailing and loaded.found.skip_reason is None:
                # Possibly caught mid-write: look again once the path has been quiet.
                self.debounce.defer(path, time.monotonic())
                return
            state = "skipped" if loaded.found.skip_reason else Status.ERROR.value
            if previous is None or previous.digest != digest or previous.state != state:
                log.warning("run.unreadable", path=str(path), reason=loaded.error)
            self.tracked[path] = Tracked(loaded, state, None, digest=digest)
            self.heap.set(path, None)
            return
        status = record.status
        if status in TERMINAL:
            self.tracked.pop(path, None)
            self.heap.set(path, None)
            self.index.put([_finished(key, record)])
            return
        now = self.clock()
        policy = self.reconciler.policy
        due = next_due(record.attempts, status, record.end, policy)
        state = (status or Status.PENDING).value
        if now >= record.end + policy.max_age and not (record.ours and record.attempts):
            state, due = "too_old", None
        tracked = Tracked(loaded, state, due, digest=digest)
        if previous is not None:
            tracked.discovered = previous.discovered
        self.tracked[path] = tracked
        self.heap.set(path, next_tick(due.timestamp(), self._tick) if due else None)
        if not quiet and (previous is None or previous.state != state):
            log.info(
                "run.scheduled" if due else "run.too_old",
                path=str(path),
                run_id=record.run_id,
                framework=record.framework,
                status=state,
                attempts=len(record.attempts),
                next_poll_at=iso(due) if due else None,
            )

    @property
    def _tick(self) -> float:
        return self.settings.tick.total_seconds()

    # ------------------------------------------------------------------ scanning

    def _scan_blocking(self, known: Mapping[str, tuple[int, int, int]]) -> _Scan:
        """Stat every run file; parse only those the index does not know as finished.
        Objects are built only for files that need parsing, and a finished run is kept as
        its small index row, not its bytes: a restart over 100,000 runs stays cheap."""
        scan = _Scan()
        for root in self.roots:
            for entry in run_entries(root):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                scan.seen.add(entry.path)
                if known.get(entry.path) == (st.st_ino, st.st_size, st.st_mtime_ns):
                    continue
                key = FileKey(entry.path, st.st_ino, st.st_size, st.st_mtime_ns)
                (loaded,) = load_runs([found_of(entry, root)], self._grace)
                if loaded.record is not None and loaded.record.status in TERMINAL:
                    scan.finished.append(_finished(key, loaded.record))
                else:
                    scan.other.append((key, loaded))
        return scan

    async def rescan(self, reason: str) -> None:
        assert self.index is not None
        started = time.monotonic()
        known = self.index.versions()
        scan = await asyncio.to_thread(self._scan_blocking, known)
        self.index.put(scan.finished)
        for row in scan.finished:
            path = Path(row.key.path)
            self.tracked.pop(path, None)
            self.heap.set(path, None)
        for key, loaded in scan.other:
            self._admit(key, loaded, trailing=True)
        for path in [p for p in self.tracked if str(p) not in scan.seen]:
            self._forget(path)
        missing = [p for p in known if p not in scan.seen]
        if missing:
            self.index.forget(missing)
        self.next_rescan = time.monotonic() + self.settings.rescan_interval.total_seconds()
        self._update_gauges()
        log.info(
            "daemon.rescanned",
            reason=reason,
            parsed=len(scan.finished) + len(scan.other),
            skipped_finished=len(known) - len(missing),
            tracked=len(self.tracked),
            seconds=round(time.monotonic() - started, 3),
        )

    # ------------------------------------------------------------------ polling

    def _owners(self, due: list[Loaded]) -> list[RunRef]:
        assert self.index is not None
        owners = [RunRef.of(t.loaded.record) for t in self.tracked.values() if t.loaded.record]
        lo = min(e.record.activity.start for e in due if e.record) - 3600
        hi = max(e.record.activity.end for e in due if e.record) + 3600
        for row in self.index.overlapping(lo, hi):
            activity = Activity(row.start, row.end, self._grace)
            owners.append(RunRef(Path(row.key.path), row.framework, row.run_id, activity))
        return owners

    async def poll_due(self) -> None:
        assert self.reconciler is not None
        now = self.clock()
        if self.auth_error is not None and self.auth_retry_at and now < self.auth_retry_at:
            return
        paths = self.heap.pop_due(now.timestamp())
        due = [
            self.tracked[p].loaded
            for p in paths
            if p in self.tracked and self.tracked[p].loaded.record
        ]
        if not due:
            return
        before = self.reconciler.client.requests_sent if self.reconciler.client else 0
        report = await self.reconciler.run_batch(due, extra_owners=self._owners(due))
        sent = (self.reconciler.client.requests_sent if self.reconciler.client else 0) - before
        self.metrics.api_requests.inc(sent)
        if report.auth_error:
            self.auth_error = report.auth_error
            self.auth_retry_at = now + self.settings.max_backoff
            self.metrics.auth_ok.set(0)
            log.error(
                "daemon.auth_failed",
                error=report.auth_error,
                action="polling paused; fix the admin key's api.usage.read scope",
                retry_at=iso(self.auth_retry_at),
            )
            for path in paths:
                self.heap.set(path, self.auth_retry_at.timestamp())
            return
        if self.auth_error is not None:
            log.info("daemon.auth_recovered")
        self.auth_error = None
        self.metrics.auth_ok.set(1)
        if any(o.polled and not o.failed for o in report.outcomes):
            self.last_api_success = now
            self.metrics.last_api_success.set(now.timestamp())
        for outcome in report.outcomes:
            self._count(outcome, now)
        for path in paths:
            raw = self.written.pop(path, None)
            self.look(path, raw=raw, trailing=True, quiet=True)
        self._update_gauges()

    def _count(self, outcome: RunOutcome, now: datetime) -> None:
        if outcome.polled:
            self.metrics.attempts.labels(outcome.state).inc()
            if outcome.failed:
                self.metrics.api_errors.labels("fetch").inc()
        if outcome.state in (Status.VERIFIED, Status.AMBIGUOUS) and outcome.written:
            if outcome.run_end is not None:
                self.metrics.time_to_verify.observe((now - outcome.run_end).total_seconds())
            if outcome.totals is not None:
                fw = outcome.framework
                self.metrics.tokens.labels(fw, "in").inc(outcome.totals.input_tokens)
                self.metrics.tokens.labels(fw, "out").inc(outcome.totals.output_tokens)
            if outcome.cost_usd is not None:
                self.metrics.cost.labels(outcome.framework).inc(outcome.cost_usd)
            log.info(
                "run.settled",
                run_id=outcome.run_id,
                framework=outcome.framework,
                status=outcome.state,
                tokens_in=outcome.totals.input_tokens if outcome.totals else None,
                tokens_out=outcome.totals.output_tokens if outcome.totals else None,
                attempts=outcome.attempts,
                seconds_after_end=round((now - outcome.run_end).total_seconds())
                if outcome.run_end
                else None,
            )

    def _update_gauges(self) -> None:
        counts: dict[str, int] = {}
        for tracked in self.tracked.values():
            counts[tracked.state] = counts.get(tracked.state, 0) + 1
        if self.index is not None:
            for status, n in self.index.counts().items():
                counts[status] = counts.get(status, 0) + n
        for status in {*counts, *(s.value for s in Status), "too_old", "skipped"}:
            self.metrics.runs.labels(status).set(counts.get(status, 0))
        self.metrics.queue_depth.set(len(self.heap))

    # ------------------------------------------------------------------ health and HTTP

    @property
    def ready(self) -> bool:
        """True once the first scan is done and READY=1 was sent."""
        return self.ready_event.is_set()

    def health(self) -> dict[str, Any]:
        watcher_ok = self.watcher is not None and self.watcher.alive()
        self.metrics.watcher_alive.set(1 if watcher_ok else 0)
        healthy = self.ready and watcher_ok and self.auth_error is None
        return {
            "status": "ok" if healthy else "failing",
            "ready": self.ready,
            "watcher_alive": watcher_ok,
            "auth_ok": self.auth_error is None,
            "auth_error": self.auth_error,
            "last_api_success": iso(self.last_api_success) if self.last_api_success else None,
            "tracked_runs": len(self.tracked),
            "queue_depth": len(self.heap),
            "version": __version__,
        }

    def _app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            body = self.health()
            return web.json_response(body, status=200 if body["status"] == "ok" else 503)

        async def metrics(_: web.Request) -> web.Response:
            self._update_gauges()
            self.health()
            return web.Response(
                body=self.metrics.render(), content_type="text/plain", charset="utf-8"
            )

        async def runs(request: web.Request) -> web.Response:
            items = [
                t.to_json()
                for t in sorted(self.tracked.values(), key=lambda t: str(t.loaded.found.path))
            ]
            fw = request.query.get("framework")
            if fw:
                items = [i for i in items if i["framework"] == fw]
            finished = self.index.counts() if self.index is not None else {}
            frameworks = self.index.by_framework() if self.index is not None else {}
            if fw:
                frameworks = {k: v for k, v in frameworks.items() if k == fw}
            return web.json_response(
                {"runs": items, "finished": finished, "frameworks": frameworks}
            )

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/runs", runs)
        return app

    async def _serve_http(self) -> web.AppRunner | None:
        addr = self.settings.http_addr
        if not addr:
            return None
        host, _, port = addr.rpartition(":")
        runner = web.AppRunner(self._app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port))
        await site.start()
        log.info("http.listening", addr=addr)
        return runner

    async def _watchdog_pings(self, period: float) -> None:
        while not self.stop_event.is_set():
            if self.health()["watcher_alive"]:
                notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=period)

    # ------------------------------------------------------------------ reload

    def reload(self) -> None:
        if self._reload is None:
            log.warning("daemon.reload_unsupported")
            return
        try:
            fresh = self._reload()
        except ConfigError as exc:
            log.error(
                "daemon.reload_failed", error=str(exc), action="keeping the running configuration"
            )
            return
        needs_restart = [
            name
            for name in (
                "runs_dirs",
                "http_addr",
                "state_dir",
                "api_base_url",
                "admin_key",
                "watch_mode",
            )
            if getattr(fresh, name) != getattr(self.settings, name)
        ]
        self.settings = fresh
        assert self.reconciler is not None
        self.reconciler.settings = fresh
        self.reconciler.policy = policy_of(fresh)
        self.reconciler.grace = self._grace
        for path in list(self.tracked):
            self.look(path, trailing=True)
        log.info("daemon.reloaded", restart_needed_for=needs_restart or None)

    # ------------------------------------------------------------------ main loop

    def _next_wake(self) -> float:
        now_mono = time.monotonic()
        candidates = [self.next_rescan - now_mono]
        nd = self.heap.next_due()
        if nd is not None:
            candidates.append(nd - self.clock().timestamp())
        dd = self.debounce.next_deadline()
        if dd is not None:
            candidates.append(dd - now_mono)
        return max(0.0, min(candidates))

    async def _step(self) -> None:
        for path in self.debounce.due(time.monotonic()):
            self.look(path, trailing=True)
        dirty, self.dirty = self.dirty, set()
        for path in dirty:
            self.look(path)
        dirs, self.dirty_dirs = self.dirty_dirs, set()
        if dirs:
            # A directory created or moved in: its run files may predate our watch on it.
            inside = [d for d in dirs if any(d.is_relative_to(r) for r in self.roots)]
            for found in await asyncio.to_thread(scan_all, inside):
                self.look(found.path)
        if self.rescan_requested or time.monotonic() >= self.next_rescan:
            reason = "overflow" if self.rescan_requested else "interval"
            self.rescan_requested = False
            await self.rescan(reason)
        await self.poll_due()

    async def run(self) -> int:
        for root in self.roots:
            if not root.is_dir():
                log.error(
                    "daemon.bad_root", root=str(root), error="does not exist or is not a directory"
                )
                return EXIT_CONFIG
        key = self.settings.secret_key()
        if not key:
            log.error(
                "daemon.no_admin_key",
                error="set TOKENSETTLE_ADMIN_KEY (or a credential file admin_key)",
            )
            return EXIT_CONFIG
        loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.stop, name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.index = Index(Path(self.settings.state_dir) / INDEX_FILE)
        runner: web.AppRunner | None = None
        ping: asyncio.Task[None] | None = None
        try:
            async with aiohttp.ClientSession() as session:
                client = UsageClient(
                    base_url=self.settings.api_base_url,
                    admin_key=key,
                    session=session,
                    rate_limit_per_min=self.settings.rate_limit_per_min,
                    request_timeout=self.settings.request_timeout.total_seconds(),
                    retry=RetryPolicy(attempts=self.settings.request_attempts),
                )
                self.reconciler = Reconciler(
                    self.settings, client, clock=self.clock, on_written=self._on_written
                )
                runner = await self._serve_http()
                self.watcher = Watcher(
                    self.roots,
                    mode=self.settings.watch_mode,
                    loop=loop,
                    on_file=self.on_file,
                    on_dir=self.on_dir,
                    on_overflow=self.on_overflow,
                    on_gone=self.on_gone,
                    poll_interval=self.settings.poll_interval.total_seconds(),
                )
                # Watch first, then scan: a file written in between is seen by both, never
                # by neither. (watchdog adds one inotify watch per directory in start().)
                await asyncio.to_thread(self.watcher.start)
                await self.rescan("start")
                self.ready_event.set()
                notify(
                    f"READY=1\nSTATUS=watching {len(self.roots)} root(s), "
                    f"{len(self.tracked)} run(s) pending"
                )
                log.info(
                    "daemon.ready",
                    roots=[str(r) for r in self.roots],
                    tracked=len(self.tracked),
                    version=__version__,
                )
                period = watchdog_interval()
                if period:
                    ping = asyncio.create_task(self._watchdog_pings(period))
                while not self.stop_event.is_set():
                    if not self.watcher.alive():
                        log.error("watcher.died", action="exiting so the supervisor restarts us")
                        self.exit_code = EXIT_FAILED
                        break
                    # Cleared before the step: an event arriving during it keeps `wake` set,
                    # so the wait below returns at once instead of sleeping on a dirty path.
                    self.wake.clear()
                    step = asyncio.create_task(self._step())
                    stopper = asyncio.create_task(self.stop_event.wait())
                    await asyncio.wait({step, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    if not step.done():
                        # A fetch may hang for a while; a write already under way finishes
                        # in its thread (the rename is atomic), the rest waits for restart.
                        step.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await step
                        break
                    step.result()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self.wake.wait(), timeout=min(self._next_wake(), 30.0)
                        )
        finally:
            if ping is not None:
                ping.cancel()
            if self.watcher is not None:
                self.watcher.stop()
            if runner is not None:
                await runner.cleanup()
            self.index.close()
            log.info("daemon.stopped", exit_code=self.exit_code)
        return self.exit_code


def _finished(key: FileKey, record: RunRecord) -> Finished:
    written = record.written
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
    )


def run_daemon(overrides: Mapping[str, Any], config_file: Path | None) -> int:
    settings = load_settings(overrides, config_file=config_file)
    configure(
        level=settings.log_level,
        fmt=settings.log_format,
        stream=sys.stdout,
        secrets=[settings.secret_key() or ""],
    )

    def reload() -> Settings:
        return load_settings(overrides, config_file=config_file)

    return asyncio.run(Daemon(settings, reload=reload).run())

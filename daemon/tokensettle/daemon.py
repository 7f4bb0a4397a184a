"""`tokensettle run`: watch, wait, poll until stable, write, on one asyncio loop.

The daemon is a composition of rooms, each in its own module:

* `bridge.WatchBridge` — watcher events in, debounced paths out;
* `registry.Registry` — the runs it knows (reads files in worker threads, the index);
* `scheduler.PollGrid` — when each run is polled: one shared grid of period `TICK`;
* `poller.Poller` — one round of the grid: a batched attempt, then each run put back;
* `serve.StatusServer` — `/healthz`, `/metrics`, `/runs`, bounded;
* `health.Faults` — what is wrong right now, raised and cleared by the rooms.

The files are the record: every unfinished run resumes from the attempts in its own file,
so a kill -9 at any moment loses nothing. The index only lets a restart skip finished
files with a stat each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from tokensettle import __version__, keyids
from tokensettle.billwatch import BillWatch
from tokensettle.bridge import WatchBridge
from tokensettle.config import (
    ENV_PREFIX,
    ConfigError,
    Settings,
    http_addr_problem,
    load_settings,
    roots_problem,
    state_dir_problem,
)
from tokensettle.health import Faults, status
from tokensettle.index import Index
from tokensettle.keyids import Resolution
from tokensettle.leasekeeper import LeaseKeeper, admin_client, leased_runs
from tokensettle.leases import RevokeOutcome
from tokensettle.live import LiveReport
from tokensettle.logs import configure
from tokensettle.metrics import CONTENT_TYPE, Metrics
from tokensettle.poller import Poller
from tokensettle.reconcile import Reconciler, utcnow
from tokensettle.registry import Registry
from tokensettle.runfile import iso
from tokensettle.scheduler import PollGrid
from tokensettle.sdnotify import notify, watchdog_interval
from tokensettle.serve import BindError, StatusServer, probe_bind
from tokensettle.sources import NO_KEY, providers, usage_sources
from tokensettle.stability import Status
from tokensettle.usage import OPENAI, Scope
from tokensettle.usage_api import UsageClient

log = structlog.get_logger("tokensettle.daemon")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
INDEX_FILE = "index.sqlite3"
#: The longest a round waits for a busy tree (a copy under way) to go quiet: one tick.
MAX_QUIET_WAIT_TICKS = 1.0


class StartError(Exception):
    """A problem found before the daemon starts anything. One line, exit 2."""


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
        self.faults = Faults()
        self.roots = [Path(os.path.abspath(r)) for r in settings.runs_dirs]
        self.grid: PollGrid[Path] = PollGrid(self._tick)
        self.bridge = WatchBridge(
            self.roots,
            settle_delay=settings.settle_delay.total_seconds(),
            mode=settings.watch_mode,
            poll_interval=settings.poll_interval.total_seconds(),
        )
        self.stop_event = asyncio.Event()
        self.ready_event = asyncio.Event()
        self.registry: Registry | None = None
        self.poller: Poller | None = None
        self.reconciler: Reconciler | None = None
        self.server: StatusServer | None = None
        self.live = LiveReport(lambda: self.settings, self.roots)
        self.keeper: LeaseKeeper | None = None
        self.bills: BillWatch | None = None
        #: the bill check under way: it runs beside the steps, never inside one
        self._bill_task: asyncio.Task[None] | None = None
        self.next_rescan = 0.0
        self.next_revoke = 0.0
        self.exit_code = EXIT_OK
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resolved: list[Resolution] = []

    def _scope_for(self, framework: str) -> Scope:
        return self.settings.scope_for(framework)  # the settings in force (SIGHUP)

    @property
    def _tick(self) -> float:
        return self.settings.tick.total_seconds()

    # ------------------------------------------------------------------ signals

    def stop(self, signame: str = "SIGTERM") -> None:
        if not self.stop_event.is_set():
            log.info("daemon.stopping", signal=signame)
            notify("STOPPING=1")
        self.stop_event.set()
        self.bridge.wake.set()

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
        restart = (
            "runs_dirs",
            "http_addr",
            "http_token",
            "state_dir",
            "api_base_url",
            "admin_key",
            "watch_mode",
        )
        needs_restart = [n for n in restart if getattr(fresh, n) != getattr(self.settings, n)]
        keyids.apply(fresh, [r for r in self._resolved if r.key_id is not None])
        self.settings = fresh
        self.grid.tick = self._tick
        self.bridge.debounce.settle = fresh.settle_delay.total_seconds()
        if self.reconciler is not None:
            self.reconciler.reconfigure(fresh)
        if self.registry is not None:
            self.registry.rescoped()
            for path in list(self.registry.tracked):
                self.registry.reschedule(path)
        log.info("daemon.reloaded", restart_needed_for=needs_restart or None)
        self.bridge.wake.set()

    # ------------------------------------------------------------------ health

    @property
    def ready(self) -> bool:
        """True once the first scan is done and READY=1 was sent."""
        return self.ready_event.is_set()

    def health(self) -> dict[str, Any]:
        watcher_ok = self.bridge.alive()
        self.metrics.watcher_alive.set(1 if watcher_ok else 0)
        if self.ready and not watcher_ok:
            self.faults.raise_("watcher", "observer", "the watchdog thread died", self.clock())
        poller, registry = self.poller, self.registry
        kinds = self.faults.kinds()
        for kind in {
            *kinds,
            "write",
            "fetch",
            "index",
            "auth",
            "watcher",
            "http",
            "revoke",
            "bill",
        }:
            self.metrics.faults.labels(kind).set(kinds.get(kind, 0))
        self.metrics.runs_write_failing.set(kinds.get("write", 0))
        self.metrics.index_available.set(0 if "index" in kinds else 1)
        auth_error = poller.auth_error if poller else None
        last = poller.last_api_success if poller else None
        return {
            "status": status(self.faults, ready=self.ready),
            "ready": self.ready,
            "watcher_alive": watcher_ok,
            "auth_ok": auth_error is None,
            "auth_error": auth_error,
            "last_api_success": iso(last) if last else None,
            "problems": self.faults.problems(),
            "tracked_runs": len(registry.tracked) if registry else 0,
            "queue_depth": len(self.grid),
            "next_poll_at": _iso_ts(self.grid.next_point()),
            "version": __version__,
        }

    def _write_error(self, path: Path) -> str | None:
        fault = self.faults.get("write", str(path))
        return fault.message if fault is not None else None

    def _update_gauges(self) -> None:
        counts = self.registry.counts() if self.registry else {}
        for status_name in {*counts, *(s.value for s in Status), "too_old", "skipped"}:
            self.metrics.runs.labels(status_name).set(counts.get(status_name, 0))
        self.metrics.queue_depth.set(len(self.grid))
        oldest = self.registry.oldest_waiting_end() if self.registry else None
        age = (self.clock() - oldest).total_seconds() if oldest is not None else 0.0
        self.metrics.oldest_waiting.set(max(age, 0.0))
        self.metrics.max_age.set(self.settings.max_age.total_seconds())

    def _routes(self) -> dict[str, Callable[[web.Request], Any]]:
        async def healthz(_: web.Request) -> web.Response:
            body = self.health()
            return web.json_response(body, status=503 if body["status"] == "failing" else 200)

        async def metrics(_: web.Request) -> web.Response:
            self._update_gauges()
            self.health()
            return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

        async def runs(request: web.Request) -> web.Response:
            assert self.registry is not None
            return web.json_response(self.registry.runs_json(request.query.get("framework")))

        async def page(_: web.Request) -> web.Response:
            built = await self.live.get()
            return web.Response(text=built.html, content_type="text/html", charset="utf-8")

        async def report(_: web.Request) -> web.Response:
            return web.json_response((await self.live.get()).json)

        return {
            "/healthz": healthz,
            "/metrics": metrics,
            "/runs": runs,
            "/": page,
            "/report.json": report,
        }

    async def _watchdog_pings(self, period: float) -> None:
        while not self.stop_event.is_set():
            if self.bridge.alive():
                notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=period)

    # ------------------------------------------------------------------ the loop

    def _due_point(self) -> float | None:
        """The grid point of the next round, or None if no run waits."""
        return self.grid.next_point()

    def _round_ready(self, point: float) -> bool:
        """A round runs once its grid point is reached and the tree is quiet (a copy in
        progress is waited for, for at most one tick, so it shares the round)."""
        now = self.clock().timestamp()
        if now < point:
            return False
        settle = self.settings.settle_delay.total_seconds()
        late = now - point
        return self.bridge.quiet_for() >= settle or late >= self._tick * MAX_QUIET_WAIT_TICKS

    def _next_wake(self) -> float:
        now_mono = time.monotonic()
        candidates = [self.next_rescan - now_mono, self.next_revoke - now_mono, 30.0]
        if (
            self.bills is not None
            and self.settings.bill_check_interval.total_seconds() > 0
            and not self._bill_running()
        ):
            candidates.append(self.bills.next_at - now_mono)
        point = self._due_point()
        if point is not None:
            wait = point - self.clock().timestamp()
            if wait <= 0:  # due but the tree is busy: look again once it may be quiet
                settle = self.settings.settle_delay.total_seconds()
                wait = max(0.05, settle - self.bridge.quiet_for())
            candidates.append(wait)
        deadline = self.bridge.next_deadline()
        if deadline is not None:
            candidates.append(deadline - now_mono)
        return max(0.0, min(candidates))

    async def _step(self) -> None:
        assert self.registry is not None
        assert self.poller is not None
        changes = self.bridge.take()
        for directory in changes.gone:
            self.registry.forget_under(directory)
        if changes.trailing:
            await self.registry.look(sorted(changes.trailing), trailing=True)
        if changes.files:
            await self.registry.look(sorted(changes.files))
        if changes.scopes:
            await self.registry.rescope(sorted(changes.scopes))
        if changes.dirs:
            await self.registry.look_under(sorted(changes.dirs))
        if changes.rescan or time.monotonic() >= self.next_rescan:
            await self._rescan(changes.rescan or "interval")
        point = self._due_point()
        if point is not None and self._round_ready(point):
            latest = self.grid.latest_point(self.clock().timestamp())
            declared = await self.poller.round(max(point, latest))
            self._update_gauges()
            if declared:
                self.next_revoke = 0.0  # a run with a declared scope was written: look now
        if time.monotonic() >= self.next_revoke:
            await self._revoke()
        if self.bills is not None:
            self._check_bill(self.bills)

    def _bill_running(self) -> bool:
        return self._bill_task is not None and not self._bill_task.done()

    def _check_bill(self, bills: BillWatch) -> None:
        """Start the bill check when due, as a task of its own: it reads two endpoints
        with retries, and a slow or unreachable API held every file event and round
        behind it for seconds. A check that raised fails the daemon, as inline."""
        task = self._bill_task
        if task is not None and task.done():
            self._bill_task = None
            task.result()
        if self._bill_task is None and bills.due():
            self._bill_task = asyncio.create_task(bills.run())
            self._bill_task.add_done_callback(lambda _task: self.bridge.wake.set())

    async def _revoke(self) -> None:
        """Delete leased keys whose runs are all settled (see leasekeeper)."""
        assert self.registry is not None
        assert self.keeper is not None
        records = [t.loaded.record for t in self.registry.tracked.values() if t.loaded.record]
        runs = leased_runs(records, self.registry.index.leased())
        await self.keeper.revoke(runs, self.clock())
        self.next_revoke = time.monotonic() + self.settings.retry_delay.total_seconds()

    def _count_revoke(self, outcome: RevokeOutcome) -> None:
        if outcome.revoked:
            result = "already_gone" if outcome.already_gone else "revoked"
        else:
            result = "auth_error" if outcome.auth_error else "failed"
        self.metrics.revocations.labels(result).inc()

    async def _rescan(self, reason: str) -> None:
        assert self.registry is not None
        started = time.monotonic()
        summary = await self.registry.rescan(reason)
        self.next_rescan = time.monotonic() + self.settings.rescan_interval.total_seconds()
        self._update_gauges()
        log.info("daemon.rescanned", **summary, seconds=round(time.monotonic() - started, 3))

    async def _resolve_key_ids(self, session: aiohttp.ClientSession) -> list[Resolution]:
        """Frameworks with a secret key in the environment and no key id get their id from
        the project key lists (keyids), once at start; a reload keeps what was found."""
        wanted = keyids.unresolved_secrets(os.environ, self.settings)
        admin = admin_client(self.settings, session) if wanted else None
        if admin is None:
            return []
        resolved = await keyids.resolve(admin, keyids.search_projects(self.settings), wanted)
        keyids.apply(self.settings, resolved)
        return resolved

    def _index_problem(self, problem: str) -> None:
        """The index fell back to memory (from any thread): refill it from the files."""
        loop = self._loop

        def on_loop() -> None:
            self.faults.raise_("index", "index", problem, self.clock())
            self.bridge.request_rescan("index_unavailable")

        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_loop)

    # ------------------------------------------------------------------ starting

    def check(self) -> None:
        """What must hold before anything starts; raises StartError with one line."""
        problem = roots_problem(self.roots)
        if problem is not None:
            raise StartError(str(problem))
        if not providers(self.settings):
            raise StartError(NO_KEY)
        state = Path(os.path.abspath(self.settings.state_dir))
        problem = state_dir_problem(state, self.roots)
        if problem is not None:
            raise StartError(str(problem))
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartError(
                f"state_dir ({ENV_PREFIX}STATE_DIR): cannot create {state}: {exc.strerror or exc}"
            ) from None
        bind = self.settings.http_bind()
        if bind is not None:
            error = probe_bind(*bind)
            if error is not None:
                raise StartError(str(http_addr_problem(self.settings.http_addr, error)))

    async def run(self) -> int:
        try:
            self.check()
        except StartError as exc:
            log.error("daemon.config_error", error=str(exc))
            self.exit_code = EXIT_CONFIG
            log.info("daemon.stopped", exit_code=self.exit_code)
            return self.exit_code
        _raise_file_limit()
        self._loop = loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.stop, name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        index = Index(Path(self.settings.state_dir) / INDEX_FILE)
        index.on_problem(self._index_problem)
        if index.problem is not None:
            self.faults.raise_("index", "index", index.problem, self.clock())
        ping: asyncio.Task[None] | None = None
        try:
            async with aiohttp.ClientSession() as session:
                sources = usage_sources(self.settings, session)
                self._resolved = await self._resolve_key_ids(session)
                self.reconciler = Reconciler(self.settings, None, clients=sources, clock=self.clock)
                reconciler = self.reconciler
                self.registry = Registry(
                    self.roots,
                    index,
                    self.grid,
                    policy=lambda: reconciler.policy,
                    scope_for=self._scope_for,
                    grace=lambda: reconciler.grace,
                    clock=self.clock,
                )
                self.registry.defer = self.bridge.defer
                self.registry.watch_dir = self.bridge.watch
                self.registry.unwatch_dir = self.bridge.unwatch
                self.registry.problem = reconciler.run_problem
                self.registry.write_error = self._write_error
                openai = sources.get(OPENAI)
                if isinstance(openai, UsageClient):  # the bill is OpenAI's only
                    self.bills = BillWatch(lambda: self.settings, openai, self.metrics, self.faults)
                self.keeper = LeaseKeeper(
                    lambda: self.settings,
                    admin_client(self.settings, session),
                    faults=self.faults,
                    on_outcome=self._count_revoke,
                )
                self.poller = Poller(
                    self.reconciler,
                    self.registry,
                    self.grid,
                    self.faults,
                    self.metrics,
                    clock=self.clock,
                )
                bind = self.settings.http_bind()
                if bind is not None:
                    self.server = StatusServer(
                        self.settings.http_addr,
                        bind,
                        self._routes(),
                        token=self.settings.http_secret(),
                    )
                    refused = self.metrics.http_rejected.labels("connection_limit")
                    self.server.on_refused = refused.inc
                    await self.server.start()
                # Watch first, then scan: a file written in between is seen by both, never
                # by neither. (The scan watches each directory before listing it; a settled
                # run's directory is only stat'ed, never watched.)
                await asyncio.to_thread(self.bridge.start, loop)
                await self._rescan("start")
                self.ready_event.set()
                notify(
                    f"READY=1\nSTATUS=watching {len(self.roots)} root(s), "
                    f"{len(self.registry.tracked)} run(s) pending"
                )
                log.info(
                    "daemon.ready",
                    roots=[str(r) for r in self.roots],
                    tracked=len(self.registry.tracked),
                    watches=self.bridge.watches(),
                    version=__version__,
                )
                period = watchdog_interval()
                if period:
                    ping = asyncio.create_task(self._watchdog_pings(period))
                await self._loop_until_stopped()
        except BindError as exc:
            log.error("daemon.config_error", error=str(exc))
            self.exit_code = EXIT_CONFIG
        finally:
            if ping is not None:
                ping.cancel()
            if self._bill_task is not None:
                self._bill_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._bill_task
            self.bridge.stop()
            if self.server is not None:
                await self.server.stop()
            index.close()
            log.info("daemon.stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _loop_until_stopped(self) -> None:
        wake = self.bridge.wake
        while not self.stop_event.is_set():
            if not self.bridge.alive():
                log.error("watcher.died", action="exiting so the supervisor restarts us")
                self.exit_code = EXIT_FAILED
                return
            # Cleared before the step: an event arriving during it keeps `wake` set, so the
            # wait below returns at once instead of sleeping on a dirty path.
            wake.clear()
            step = asyncio.create_task(self._step())
            stopper = asyncio.create_task(self.stop_event.wait())
            await asyncio.wait({step, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not step.done():
                # A fetch may hang for a while; a write already under way finishes in its
                # thread (the rename is atomic), the rest waits for the restart.
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await step
                return
            step.result()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=self._next_wake())


def _iso_ts(ts: float | None) -> str | None:
    return iso(datetime.fromtimestamp(ts, UTC)) if ts is not None else None


def _raise_file_limit() -> None:
    """Use the hard limit on open files: 1,024 is little for a watcher, a status server
    and the files of a burst (connections are bounded too, see serve.py)."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run_daemon(overrides: Mapping[str, Any], config_file: Path | None) -> int:
    try:
        settings = load_settings(overrides, config_file=config_file)
    except ConfigError as exc:
        # The same two lines as a mistake the daemon finds itself, in the format asked
        # for if that much can be read.
        fmt = os.environ.get(f"{ENV_PREFIX}LOG_FORMAT", "auto").strip().lower()
        configure(fmt=fmt if fmt in ("json", "console") else "auto", stream=sys.stdout)
        log.error("daemon.config_error", error=str(exc))
        log.info("daemon.stopped", exit_code=EXIT_CONFIG)
        return EXIT_CONFIG
    configure(
        level=settings.log_level,
        fmt=settings.log_format,
        stream=sys.stdout,
        secrets=settings.secrets(),
    )

    def reload() -> Settings:
        return load_settings(overrides, config_file=config_file)

    return asyncio.run(Daemon(settings, reload=reload).run())

"""One attempt for a batch of runs: query, attribute, decide, write.

Shared by `tokensettle reconcile` and the daemon. The batch costs requests per merged
window, not per run: every due run's window is merged into the fewest disjoint intervals,
each fetched once (paginated) with `group_by=api_key_id,project_id,model`, and the rows
are shared out locally among *all* known runs (due or not), so a run that is not due
still keeps its minutes from a neighbour that is.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from tokensettle import TOOL_NAME, __version__
from tokensettle.atomic import (
    Snapshot,
    UnsafeFileError,
    check_inside,
    read_snapshot,
    remove_stale_temps,
)
from tokensettle.attribution import Attribution, Owner, Share, attribute, rows_of
from tokensettle.config import Settings
from tokensettle.discovery import Found, scan_all
from tokensettle.durations import format_duration
from tokensettle.runfile import (
    Patch,
    RunFileError,
    RunRecord,
    iso,
    parse_run,
)
from tokensettle.settle import Observation, settle
from tokensettle.stability import (
    TERMINAL,
    Policy,
    Status,
    Verdict,
    next_due,
)
from tokensettle.states import NOT_DUE, SKIPPED, TOO_OLD, shown_state
from tokensettle.usage import ANTHROPIC, OPENAI, Scope, Usage, UsageRow, is_claude
from tokensettle.usage_api import (
    USAGE_PATH,
    AuthError,
    FetchResult,
    Filters,
    UsageApiError,
    UsageSource,
)
from tokensettle.usage_scope import (
    MAX_SCOPE_BYTES,
    SCOPE_FILE,
    ScopeDeclarationError,
    load_declaration,
)
from tokensettle.windows import Activity, Interval, merge_windows
from tokensettle.writeback import RunWriter, Written

log = structlog.get_logger("tokensettle.reconcile")


#: Runs settled per worker-thread hop: one hop per run cost ~5% of a batch in the hop
#: itself, and a stop (SIGTERM) waits for at most one chunk's writes.
SETTLE_CHUNK = 32
ANTHROPIC_KEY_PREFIX = "apikey_"
ANTHROPIC_USAGE_PATH = "/v1/organizations/usage_report/messages"


def utcnow() -> datetime:
    return datetime.now(UTC)


def policy_of(settings: Settings) -> Policy:
    return Policy(
        min_age=settings.min_age,
        max_age=settings.max_age,
        stability_interval=settings.stability_interval,
        stable_polls=settings.stable_polls,
        max_backoff=settings.max_backoff,
        retry_delay=settings.retry_delay,
        apportion_tolerance=settings.apportion_tolerance,
        max_window=settings.max_window,
    )


@dataclass(frozen=True, slots=True)
class Selection:
    framework: str | None = None
    run_id: str | None = None
    force: bool = False

    def wants(self, framework: str, run_id: str | None, path: Path) -> bool:
        if self.framework is not None and framework != self.framework:
            return False
        return self.run_id is None or self.run_id in (run_id, path.parent.name)


@dataclass
class Loaded:
    found: Found
    record: RunRecord | None = None
    snapshot: Snapshot | None = None
    error: str | None = None


@dataclass
class RunOutcome:
    path: Path
    framework: str
    run_id: str | None
    state: str
    message: str
    attempts: int = 0
    next_due: datetime | None = None
    run_end: datetime | None = None
    totals: Usage | None = None
    polled: bool = False
    written: bool = False
    failed: bool = False
    apportioned_fraction: float = 0.0
    cost_usd: float | None = None
    #: why the write of this attempt failed (the file is unchanged); None when it did not
    write_error: str | None = None
    #: the file as this attempt left it, when it was written (the daemon re-admits it
    #: from here instead of reading it again)
    after: Loaded | None = None
    #: the framework's own counts against ours, once settled (`match`, `mismatch`, ...)
    local_verdict: str | None = None

    def age(self, now: datetime) -> timedelta | None:
        return now - self.run_end if self.run_end is not None else None


@dataclass
class BatchReport:
    outcomes: list[RunOutcome] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)
    requests: int = 0
    #: provider -> why its admin key was refused (its runs were not polled)
    auth_errors: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    #: every readable run of the batch as it stands after it (written ones as written)
    records: list[RunRecord] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(o.failed for o in self.outcomes)

    @property
    def auth_error(self) -> str | None:
        """The first refused admin key's message (exit 3), if any."""
        return next(iter(self.auth_errors.values()), None)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for o in self.outcomes:
            out[o.state] += 1
        return dict(out)


# ------------------------------------------------------------------- reading the tree


def load_runs(found: Iterable[Found], grace: int) -> list[Loaded]:
    loaded: list[Loaded] = []
    for item in found:
        entry = Loaded(item)
        loaded.append(entry)
        if item.skip_reason is not None:
            entry.error = item.skip_reason
            continue
        try:
            check_inside(item.path, item.root)
            entry.snapshot = read_snapshot(item.path)
            record = parse_run(entry.snapshot.raw, item.path, item.framework, grace)
            entry.record = with_declared_scope(record)
        except (RunFileError, UnsafeFileError) as exc:
            entry.error = str(exc) if isinstance(exc, RunFileError) else exc.strerror
        except OSError as exc:
            entry.error = f"cannot read: {exc.strerror or exc}"
    return loaded


def with_declared_scope(record: RunRecord) -> RunRecord:
    """The record with the scope `usage_scope.json` beside it declares, if there is one.
    Blocking (reads the file). A declaration that cannot be read or parsed, or that
    differs from the one inside metrics.json, is a RunFileError: the run is `error`."""
    path = record.path.with_name(SCOPE_FILE)
    try:
        raw = read_snapshot(path, MAX_SCOPE_BYTES).raw
    except FileNotFoundError:
        return record
    except OSError as exc:
        raise RunFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        declared = load_declaration(raw, source=str(path))
    except ScopeDeclarationError as exc:
        raise RunFileError(str(exc)) from None
    if record.declared is not None and record.declared.to_json() != declared.to_json():
        raise RunFileError(
            f"{path} and the usage_scope field of metrics.json declare different scopes; "
            "keep one of them"
        )
    return replace(record, declared=declared)


# ------------------------------------------------------------------- planning (pure)


@dataclass
class Plan:
    due: list[Loaded] = field(default_factory=list)
    expire: list[Loaded] = field(default_factory=list)
    outcomes: list[RunOutcome] = field(default_factory=list)


def _outcome(entry: Loaded, state: str, message: str, **kw: Any) -> RunOutcome:
    record = entry.record
    return RunOutcome(
        path=entry.found.path,
        framework=entry.found.framework,
        run_id=record.run_id if record else None,
        state=state,
        message=message,
        attempts=len(record.attempts) if record else 0,
        run_end=record.end if record else None,
        **kw,
    )


def window_problem(record: RunRecord, policy: Policy) -> str | None:
    """A window longer than `max_window` is a mistake in the file (a step dated 2001), and
    merged with the batch it would make every due run's fetch span decades."""
    seconds = record.window.end - record.window.start
    if policy.max_window is None or seconds <= policy.max_window.total_seconds():
        return None
    return (
        f"run window is {format_duration(timedelta(seconds=seconds))} long, over MAX_WINDOW "
        f"({format_duration(policy.max_window)}): check the steps' timestamps"
    )


def plan(loaded: Sequence[Loaded], selection: Selection, policy: Policy, now: datetime) -> Plan:
    result = Plan()
    for entry in loaded:
        record = entry.record
        run_id = record.run_id if record else None
        if not selection.wants(entry.found.framework, run_id, entry.found.path):
            continue
        if record is None:
            state = SKIPPED if entry.found.skip_reason else Status.ERROR.value
            result.outcomes.append(
                _outcome(entry, state, entry.error or "", failed=state != SKIPPED)
            )
            continue
        too_long = window_problem(record, policy)
        if too_long is not None:
            result.outcomes.append(_outcome(entry, Status.ERROR.value, too_long, failed=True))
            continue
        if selection.force:
            result.due.append(entry)
            continue
        if record.status in TERMINAL:
            result.outcomes.append(
                _outcome(entry, record.status.value if record.status else "", "already settled")
            )
            continue
        deadline = record.end + policy.max_age
        if now >= deadline:
            if record.ours and record.attempts:
                result.expire.append(entry)
            else:
                result.outcomes.append(
                    _outcome(
                        entry,
                        TOO_OLD,
                        f"ended more than {format_duration(policy.max_age)} ago; not polled "
                        "(use --max-age or --force to settle it)",
                    )
                )
            continue
        due = next_due(record.attempts, record.status, record.end, policy)
        if due is not None and due > now:
            result.outcomes.append(
                _outcome(entry, NOT_DUE, f"next poll at {iso(due)}", next_due=due)
            )
            continue
        result.due.append(entry)
    return result


def describe(
    loaded: Sequence[Loaded], selection: Selection, policy: Policy, now: datetime, *, settled: bool
) -> list[RunOutcome]:
    """What `list` shows: every selected run's state and next due time, without polling."""
    out: list[RunOutcome] = []
    for entry in loaded:
        record = entry.record
        run_id = record.run_id if record else None
        if not selection.wants(entry.found.framework, run_id, entry.found.path):
            continue
        if record is None:
            state = SKIPPED if entry.found.skip_reason else Status.ERROR.value
            out.append(_outcome(entry, state, entry.error or ""))
            continue
        state = shown_state(record, now, policy.max_age)
        if record.status in TERMINAL:
            if settled:
                out.append(_outcome(entry, state, record.message or ""))
            continue
        if state == TOO_OLD:
            out.append(
                _outcome(entry, TOO_OLD, f"ended more than {format_duration(policy.max_age)} ago")
            )
            continue
        status = record.status or Status.PENDING
        due = next_due(record.attempts, record.status, record.end, policy)
        if record.message:
            message = record.message
        elif record.attempts:
            message = ""
        elif due is not None and due <= now:
            message = "min age reached: due at the next reconcile or daemon tick"
        else:
            message = "waiting for min age"
        out.append(_outcome(entry, status.value, message, next_due=due))
    return out


def filters_for(scopes: Iterable[Scope]) -> Filters:
    """The server-side filter for a batch: on each dimension (keys, projects) that every
    scope sets, the union of their ids. The server ANDs the two, and every scope is within
    both unions, so no row a scope owns is left out; rows are matched to scopes locally
    as well. A batch of leases (key and project each) is filtered by all its keys."""
    scopes = list(scopes)
    if not scopes:
        return Filters()
    keys = frozenset().union(*(s.api_key_ids for s in scopes))
    projects = frozenset().union(*(s.project_ids for s in scopes))
    return Filters(
        api_key_ids=keys if all(s.api_key_ids for s in scopes) else frozenset(),
        project_ids=projects if all(s.project_ids for s in scopes) else frozenset(),
    )


# ------------------------------------------------------------------- one attempt


@dataclass
class Fetched:
    interval: Interval
    result: FetchResult | None
    error: str | None


@dataclass
class PollResult:
    """One due run's part of a batch. The overlap report is built from `names` in the
    worker thread that settles the run, not on the event loop."""

    entry: Loaded
    share: Share | None
    fetched: Fetched
    names: Mapping[str, RunRef] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunRef:
    """What attribution needs to know of a run that may own minutes: where and when."""

    path: Path
    framework: str
    run_id: str
    activity: Activity
    #: the run's declared scope; None: its framework's
    scope: Scope | None = None
    #: the model the run's file names (a Claude model may route it to Anthropic)
    model: str | None = None

    @staticmethod
    def of(record: RunRecord) -> RunRef:
        declared = record.declared.scope() if record.declared is not None else None
        return RunRef(
            record.path, record.framework, record.run_id, record.activity, declared, record.model
        )


def _record(entry: Loaded) -> RunRecord:
    assert entry.record is not None
    return entry.record


class Reconciler:
    """Runs one attempt over a batch. The client is the only network I/O; files are read
    and written in worker threads (attribution and pricing too, so a daemon's event loop
    stays responsive during a large batch); `clock` makes time injectable."""

    def __init__(
        self,
        settings: Settings,
        client: UsageSource | None,
        *,
        clients: Mapping[str, UsageSource] | None = None,
        clock: Callable[[], datetime] = utcnow,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings
        #: provider -> the client of its usage report (`client` is OpenAI's)
        self.clients: dict[str, UsageSource] = {OPENAI: client} if client is not None else {}
        self.clients.update(clients or {})
        self.clock = clock
        self.policy = policy or policy_of(settings)
        self.grace = int(settings.window_grace.total_seconds())
        self.writer = RunWriter(self.grace, secrets=settings.secrets())
        self._routed: set[str] = set()
        self._framework_scopes: dict[str, Scope] = {}

    @property
    def requests_sent(self) -> int:
        """HTTP requests sent to every provider's usage report so far."""
        return sum(c.requests_sent for c in self.clients.values())

    def endpoint(self, provider: str) -> str:
        if provider == ANTHROPIC:
            return f"{self.settings.anthropic_api_base_url}{ANTHROPIC_USAGE_PATH}"
        return f"{self.settings.api_base_url}{USAGE_PATH}"

    def run_problem(self, record: RunRecord) -> str | None:
        """Why the run cannot be polled as it stands (an error of the run, shown, not
        retried until its file or the configuration changes)."""
        problem = window_problem(record, self.policy)
        if problem is not None:
            return problem
        provider = self.scope_of(record).provider
        if provider not in self.clients:
            key = "TOKENSETTLE_ANTHROPIC_ADMIN_KEY" if provider == ANTHROPIC else "ADMIN_KEY"
            return f"its usage is {provider}'s and no {provider} admin key is configured ({key})"
        return None

    def reconfigure(self, settings: Settings) -> None:
        """New timings and scopes (SIGHUP); the client stays."""
        self.settings = settings
        self._framework_scopes.clear()
        self.policy = policy_of(settings)
        self.grace = int(settings.window_grace.total_seconds())
        self.writer = RunWriter(self.grace, secrets=settings.secrets())

    def scope_of(self, record: RunRecord | RunRef) -> Scope:
        """A run's declared scope replaces its framework's. A framework that names no
        provider is OpenAI's, except for a run whose model is a Claude model while an
        Anthropic admin key is configured: that run is settled against Anthropic."""
        if isinstance(record, RunRef):
            declared = record.scope
        else:
            declared = record.declared.scope() if record.declared is not None else None
        if declared is not None:
            return declared
        scope = self._framework_scopes.get(record.framework)
        if scope is None:
            scope = self._framework_scopes[record.framework] = self.settings.scope_for(
                record.framework
            )
        if (
            self.settings.provider_named(record.framework) is None
            and is_claude(record.model)
            and self.settings.anthropic_key()
        ):
            if record.framework not in self._routed:
                self._routed.add(record.framework)
                log.info(
                    "run.provider_from_model",
                    framework=record.framework,
                    model=record.model,
                    provider=ANTHROPIC,
                    detail="the framework names no provider and its runs use a Claude model; "
                    "set [frameworks.<fw>] provider to say so",
                )
            keys = frozenset(k for k in scope.api_key_ids if k.startswith(ANTHROPIC_KEY_PREFIX))
            return Scope(keys, frozenset(), ANTHROPIC)
        return scope

    def survey(self) -> list[Loaded]:
        return load_runs(scan_all(list(self.settings.runs_dirs)), self.grace)

    def list_runs(
        self, selection: Selection = Selection(), *, settled: bool = False
    ) -> list[RunOutcome]:
        return describe(self.survey(), selection, self.policy, self.clock(), settled=settled)

    async def run_once(
        self, selection: Selection = Selection(), *, dry_run: bool = False
    ) -> BatchReport:
        """Survey the roots and make one attempt for every due run (the cron command).
        Temp files left by an interrupted write of ours are removed on the way (not by
        `list`, which only reads)."""

        def survey_and_sweep() -> list[Loaded]:
            temps: list[str] = []
            found = scan_all(list(self.settings.runs_dirs), temps=temps)
            if not dry_run:
                sweep = remove_stale_temps(temps)
                for path in sweep.removed:
                    log.info("run.temp_removed", path=str(path))
                for path, why in sweep.failed:
                    log.warning("run.temp_not_removed", path=str(path), error=why)
            return load_runs(found, self.grace)

        loaded = await asyncio.to_thread(survey_and_sweep)
        return await self.run_batch(loaded, selection, dry_run=dry_run)

    async def run_batch(
        self,
        loaded: Sequence[Loaded],
        selection: Selection = Selection(),
        *,
        dry_run: bool = False,
        extra_owners: Sequence[RunRef] = (),
        now: datetime | None = None,
    ) -> BatchReport:
        """One attempt for every due run of `loaded`. Minutes are shared with every run of
        `loaded` and with `extra_owners` (settled runs the caller keeps elsewhere). `now`
        stamps the attempts (the daemon passes its poll-grid time); default: the clock."""
        now = now or self.clock()
        policy = self.policy
        if selection.force:
            policy = replace(policy, max_age=timedelta(days=36500))
        the_plan = plan(loaded, selection, policy, now)
        for entry in list(the_plan.due):
            problem = self.run_problem(_record(entry))
            if problem is not None:
                the_plan.due.remove(entry)
                the_plan.outcomes.append(_outcome(entry, Status.ERROR.value, problem, failed=True))
        report = BatchReport(outcomes=list(the_plan.outcomes), dry_run=dry_run)
        for outcome in the_plan.outcomes:
            if outcome.state == Status.ERROR.value:
                log.warning("run.unreadable", path=str(outcome.path), reason=outcome.message)
            elif outcome.state == SKIPPED:
                log.warning("run.skipped", path=str(outcome.path), reason=outcome.message)
        for entry in the_plan.expire:
            report.outcomes.append(
                await asyncio.to_thread(self._expire, entry, policy, now, dry_run)
            )
        if the_plan.due:
            owners = [RunRef.of(e.record) for e in loaded if e.record is not None]
            known = {o.path for o in owners}
            owners += [o for o in extra_owners if o.path not in known]
            results = await self.poll(the_plan.due, owners, report)
            for i in range(0, len(results), SETTLE_CHUNK):
                chunk = results[i : i + SETTLE_CHUNK]
                report.outcomes += await asyncio.to_thread(
                    self._settle_all, chunk, policy, now, dry_run
                )
        after = {o.path: o.after.record for o in report.outcomes if o.after and o.after.record}
        report.records = [after.get(e.found.path, e.record) for e in loaded if e.record is not None]
        return report

    async def poll(
        self, due: Sequence[Loaded], owners: Sequence[RunRef], report: BatchReport
    ) -> list[PollResult]:
        """Fetch the merged windows of `due` once each, per provider, and share each
        provider's rows among the owners whose usage is in that provider's report. A
        refused admin key stops its provider's runs (no outcome: nothing is written) and
        is in `report.auth_errors`; the other providers' runs go on."""
        by_provider: dict[str, list[Loaded]] = defaultdict(list)
        for entry in due:
            by_provider[self.scope_of(_record(entry)).provider].append(entry)
        results: list[PollResult] = []
        for provider, entries in sorted(by_provider.items()):
            client = self.clients.get(provider)
            if client is None:
                raise RuntimeError(f"no usage client for {provider}")
            mine = [o for o in owners if self.scope_of(o).provider == provider]
            try:
                results += await self._poll_provider(client, entries, mine, report)
            except AuthError as exc:
                report.auth_errors[provider] = str(exc)
                log.error("usage_api.auth_failed", provider=provider, error=str(exc))
        return results

    async def _poll_provider(
        self,
        client: UsageSource,
        due: Sequence[Loaded],
        owners: Sequence[RunRef],
        report: BatchReport,
    ) -> list[PollResult]:
        intervals = merge_windows(_record(e).window for e in due)
        report.intervals += intervals
        by_interval: dict[Interval, list[Loaded]] = defaultdict(list)
        for entry in due:
            window = _record(entry).window
            home = next(i for i in intervals if i.start <= window.start and window.end <= i.end)
            by_interval[home].append(entry)
        fetched: dict[Interval, Fetched] = {}
        rows: list[UsageRow] = []
        before = client.requests_sent
        try:
            for interval in intervals:
                members = by_interval[interval]
                filters = filters_for(self.scope_of(_record(e)) for e in members)
                try:
                    result = await client.fetch(interval, filters)
                except AuthError:
                    raise
                except UsageApiError as exc:
                    log.warning(
                        "usage_api.fetch_failed",
                        start=interval.start,
                        end=interval.end,
                        error=str(exc),
                    )
                    fetched[interval] = Fetched(interval, None, str(exc))
                    continue
                fetched[interval] = Fetched(interval, result, None)
                rows.extend(result.rows)
                log.info(
                    "usage_api.fetched",
                    start=iso(datetime.fromtimestamp(interval.start, UTC)),
                    minutes=interval.minutes,
                    rows=len(result.rows),
                    requests=result.requests,
                    runs=len(members),
                )
        finally:
            report.requests += client.requests_sent - before
        shares = await asyncio.to_thread(self._attribute, rows, owners, list(fetched.values()))
        names = {str(o.path): o for o in owners}
        results: list[PollResult] = []
        for interval in intervals:
            for entry in by_interval[interval]:
                record = _record(entry)
                f = fetched[interval]
                if f.result is None:
                    results.append(PollResult(entry, None, f))
                    continue
                share = shares.share(str(record.path))
                results.append(PollResult(entry, share, f, names))
        return results

    def _attribute(
        self, rows: list[UsageRow], owners: Sequence[RunRef], fetched: Sequence[Fetched]
    ) -> Attribution:
        ok = sorted(f.interval for f in fetched if f.result is not None)
        owner_list = [
            Owner(str(o.path), o.activity, self.scope_of(o))
            for o in owners
            if any(o.activity.window.overlaps(i) for i in ok)
        ]
        return attribute(rows, owner_list)

    def _steps(self, record: RunRecord, share: Share) -> tuple[dict[int, Usage], Usage]:
        timed = [s for s in record.steps if s.activity is not None]
        if not timed:
            return {}, Usage()
        owners = [Owner(str(s.index), s.activity) for s in timed if s.activity is not None]
        split = attribute(rows_of(share.per_minute), owners)
        return {int(k): v.usage for k, v in split.shares.items()}, split.unowned

    # ------------------------------------------------------------------- deciding

    def _provenance(self, record: RunRecord, fetched: Fetched) -> dict[str, Any]:
        scope = self.scope_of(record)
        prov: dict[str, Any] = {
            "tool": TOOL_NAME,
            "version": __version__,
            "provider": scope.provider,
            "endpoint": self.endpoint(scope.provider),
            "scope": {
                **scope.to_json(),
                "framework": record.framework,
                "declared": record.declared.to_json() if record.declared else None,
                "declared_in": record.declared.source if record.declared else None,
            },
            "window_source": record.window_source,
        }
        if fetched.result is not None:
            prov["query"] = _own_query(fetched.result.params, scope)
            prov["requests"] = fetched.result.requests
        return prov

    def _settle_all(
        self, results: Sequence[PollResult], policy: Policy, now: datetime, dry_run: bool
    ) -> list[RunOutcome]:
        """Blocking: one worker-thread hop for a chunk of runs."""
        return [self._settle(result, policy, now, dry_run) for result in results]

    def _settle(
        self, result: PollResult, policy: Policy, now: datetime, dry_run: bool
    ) -> RunOutcome:
        """Decide and write one run's attempt. Blocking: runs in a worker thread."""
        entry = result.entry
        record = _record(entry)
        share = result.share
        step_values, step_unowned = self._steps(record, share) if share else ({}, Usage())
        overlaps = _overlaps(share, result.names) if share is not None else []
        seen = Observation(share, result.fetched.error, step_values, step_unowned, overlaps)
        settled = settle(
            record,
            seen,
            policy=policy,
            now=now,
            grace=self.grace,
            provenance=self._provenance(record, result.fetched),
            local_tolerance=self.settings.local_tolerance,
            provider=self.scope_of(record).provider,
            scope=self.scope_of(record),
        )
        verdict, usage = settled.verdict, settled.totals
        written = self._write(entry, settled.patch, dry_run)
        if not dry_run and not written.failed and verdict.writes_tokens and usage is not None:
            self.writer.manifest(record, verdict, usage, now)
        common = {"run_id": record.run_id, "framework": record.framework}
        for kind, message in settled.findings:
            log.warning(f"run.{kind}", **common, detail=message)
        if share is None or usage is None:
            log.warning(
                "run.attempt_failed", **common, status=verdict.status.value, error=seen.error
            )
        else:
            changed = verdict.status != record.status
            (log.info if changed or verdict.writes_tokens else log.debug)(
                "run.polled",
                **common,
                status=verdict.status.value,
                previous=record.status.value if record.status else None,
                tokens_in=usage.input_tokens,
                tokens_out=usage.output_tokens,
                api_calls=usage.num_model_requests,
                attempt=len(record.attempts) + 1,
                apportioned=round(share.apportioned_fraction, 4),
                written=written.written,
                next_poll_at=iso(verdict.next_due) if verdict.next_due else None,
            )
        return replace(
            _outcome(
                entry,
                verdict.status.value,
                verdict.message,
                next_due=verdict.next_due,
                totals=usage,
                polled=True,
                written=written.written,
                failed=usage is None or written.failed,
                apportioned_fraction=share.apportioned_fraction if share else 0.0,
                cost_usd=settled.patch.cost_usd,
                write_error=written.error,
                after=_after(entry, written),
                local_verdict=settled.local_verdict,
            ),
            attempts=len(record.attempts) + 1,
        )

    def _expire(self, entry: Loaded, policy: Policy, now: datetime, dry_run: bool) -> RunOutcome:
        """Blocking: runs in a worker thread."""
        record = _record(entry)
        verdict = Verdict(
            Status.EXPIRED,
            f"max age ({format_duration(policy.max_age)}) passed without verification; "
            "token fields untouched",
            None,
        )
        patch = Patch(verdict, {}, now, {"tool": TOOL_NAME, "version": __version__})
        written = self._write(entry, patch, dry_run, append_attempt=False)
        if not dry_run and not written.failed:
            self.writer.manifest(record, verdict, None, now)
        log.info(
            "run.expired", run_id=record.run_id, framework=record.framework, written=written.written
        )
        return _outcome(
            entry,
            Status.EXPIRED.value,
            verdict.message,
            written=written.written,
            failed=written.failed,
            write_error=written.error,
            after=_after(entry, written),
        )

    def _write(
        self, entry: Loaded, patch: Patch, dry_run: bool, *, append_attempt: bool = True
    ) -> Written:
        if dry_run:
            return Written(False)
        record = _record(entry)
        written = self.writer.write(
            record, patch, first=entry.snapshot, append_attempt=append_attempt
        )
        if written.failed:
            log.warning("run.write_failed", path=str(record.path), error=written.error)
        return written


def _after(entry: Loaded, written: Written) -> Loaded | None:
    if not written.written or written.after is None:
        return None
    return Loaded(entry.found, written.record, written.after, None if written.record else "")


def _own_query(params: dict[str, str | list[str]], scope: Scope) -> dict[str, Any]:
    """The query as far as it concerns this run: a batched filter lists every due
    framework's ids, which do not belong in this run's provenance."""
    out: dict[str, Any] = dict(params)
    for name, mine in (("api_key_ids", scope.api_key_ids), ("project_ids", scope.project_ids)):
        values = params.get(name)
        if isinstance(values, list):
            own = sorted(v for v in values if v in mine)
            out[name] = own
            if len(own) < len(values):
                out[f"{name}_of_other_runs"] = len(values) - len(own)
    return out


def _overlaps(share: Share, names: Mapping[str, RunRef]) -> list[dict[str, Any]]:
    by_other: dict[str, list[int]] = defaultdict(list)
    for minute, keys in sorted(share.shared_with.items()):
        for key in keys:
            by_other[key].append(minute)
    out: list[dict[str, Any]] = []
    for key, minutes in sorted(by_other.items()):
        other = names.get(key)
        out.append(
            {
                "run_id": other.run_id if other else None,
                "framework": other.framework if other else None,
                "path": key,
                "minutes": [iso(datetime.fromtimestamp(m, UTC)) for m in minutes],
            }
        )
    return out

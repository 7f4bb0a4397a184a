"""Per-framework figures over run summaries: what is counted, the statistics, the provenance.

Pure: summaries in, a `Report` out; every renderer (text, CSV, JSON, Markdown, LaTeX, HTML,
SVG) formats the same `Report`, so they cannot disagree.

* **Counted runs** are the statistics' population: `verified` runs, plus `ambiguous` ones
  with `include_ambiguous` (their tokens are partly apportioned, an estimate). Every other
  run is *left out* with its reason (ambiguous, unsettled, error, skipped).
* Per metric, a counted run without a value is left out of that metric with its reason;
  for the cost that is `unpriced` (a model the price table does not know: never a zero) or
  `no cost` (settled by another tool and not priced yet).
* The sums (`tokens_in`, ..., `cost_usd`) are today's fields: over settled runs (verified
  and ambiguous), costs only where complete; `estimated` says how much of them is apportioned.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal
from urllib.parse import urlsplit

from tokensettle import TOOL_NAME, __version__
from tokensettle.stats import Number, Stat, describe
from tokensettle.summary import SETTLED, UNREADABLE, RunSummary, iso
from tokensettle.usage import counts_requests

Kind = Literal["count", "share", "usd"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    #: axis title with the unit
    axis: str
    kind: Kind
    value: Callable[[RunSummary], Number | None]


def _cached_share(r: RunSummary) -> Fraction | None:
    if r.cached_tokens is None or not r.tokens_in:
        return None
    return Fraction(r.cached_tokens, r.tokens_in)


METRICS: tuple[Metric, ...] = (
    Metric("tokens_in", "Input tokens", "Input tokens per run", "count", lambda r: r.tokens_in),
    Metric("tokens_out", "Output tokens", "Output tokens per run", "count", lambda r: r.tokens_out),
    Metric(
        "total_tokens",
        "Total tokens",
        "Total tokens per run (input + output)",
        "count",
        lambda r: r.total_tokens,
    ),
    Metric(
        "cached_tokens",
        "Cached tokens",
        "Cached input tokens per run",
        "count",
        lambda r: r.cached_tokens,
    ),
    Metric(
        "cached_share",
        "Cached share",
        "Cached share of input tokens per run (%)",
        "share",
        _cached_share,
    ),
    Metric("api_calls", "API calls", "API calls per run", "count", lambda r: r.api_calls),
    Metric("cost_usd", "Cost (USD)", "Cost per run (USD)", "usd", lambda r: r.cost),
)
METRIC_BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}

Reason = Literal["ambiguous", "unsettled", "error", "skipped", "unpriced", "no cost", "missing"]


@dataclass(frozen=True)
class LeftOut:
    """A run that is not in a statistic, and why."""

    run_id: str
    status: str
    reason: Reason
    detail: str
    #: the models that could not be priced, for `unpriced`
    models: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
        }
        if self.models:
            out["models"] = list(self.models)
        return out


def counted_statuses(include_ambiguous: bool) -> tuple[str, ...]:
    return SETTLED if include_ambiguous else ("verified",)


def left_out_reason(run: RunSummary) -> LeftOut:
    """Why a run is not counted at all (it is not one of the counted statuses)."""
    if run.status == "ambiguous":
        return LeftOut(
            run.run_id,
            run.status,
            "ambiguous",
            "ambiguous: tokens partly apportioned with another run (--include-ambiguous counts it)",
        )
    if run.status in UNREADABLE:
        reason: Reason = "error" if run.status == "error" else "skipped"
        return LeftOut(run.run_id, run.status, reason, f"{run.status}: {run.message or '-'}")
    return LeftOut(run.run_id, run.status, "unsettled", f"unsettled ({run.status})")


def missing_reason(run: RunSummary, metric: Metric) -> LeftOut:
    """Why a counted run has no value for `metric`."""
    if metric.key == "cost_usd":
        if run.cost_state == "unpriced":
            models = ", ".join(run.unpriced_names)
            return LeftOut(
                run.run_id, run.status, "unpriced", f"unpriced: {models}", run.unpriced_names
            )
        return LeftOut(
            run.run_id,
            run.status,
            "no cost",
            "no cost recorded (settled by another tool; `tokensettle reprice` prices it)",
        )
    if metric.key == "api_calls" and run.provider and not counts_requests(run.provider):
        return LeftOut(run.run_id, run.status, "missing", f"not counted by {run.provider}")
    return LeftOut(run.run_id, run.status, "missing", f"no {metric.label.lower()} recorded")


# ------------------------------------------------------------------ per framework


@dataclass(frozen=True)
class FrameworkAggregate:
    framework: str
    runs: int
    by_status: Mapping[str, int]
    tokens_in: int
    tokens_out: int
    cached_tokens: int
    #: input tokens of the runs that report cached tokens (the share's denominator)
    cached_basis: int
    api_calls: int
    cost_usd: Decimal
    cost_runs: int
    cost_incomplete: int
    median_time_to_verify: timedelta | None
    times_to_verify: tuple[timedelta, ...]
    verdicts: Mapping[str, int] = field(default_factory=dict)
    statuses_counted: tuple[str, ...] = ("verified",)
    counted: tuple[str, ...] = ()
    left_out: tuple[LeftOut, ...] = ()
    stats: Mapping[str, Stat] = field(default_factory=dict)
    #: counted runs without a value for a metric, per metric key
    missing: Mapping[str, tuple[LeftOut, ...]] = field(default_factory=dict)
    #: counted runs whose tokens are (partly) apportioned
    estimated_counted: int = 0
    #: over the settled runs the sums cover
    ambiguous_runs: int = 0
    apportioned_tokens: int = 0

    @property
    def cached_share(self) -> float | None:
        return self.cached_tokens / self.cached_basis if self.cached_basis else None

    @property
    def n(self) -> int:
        return len(self.counted)

    def to_json(self) -> dict[str, Any]:
        share = self.cached_share
        median = self.median_time_to_verify
        return {
            "framework": self.framework,
            "runs": self.runs,
            "by_status": dict(self.by_status),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cached_tokens": self.cached_tokens,
            "cached_share": None if share is None else round(share, 6),
            "api_calls": self.api_calls,
            "cost_usd": float(self.cost_usd),
            "cost_runs": self.cost_runs,
            "cost_incomplete": self.cost_incomplete,
            "median_time_to_verify_s": None if median is None else median.total_seconds(),
            "local_vs_provider": dict(self.verdicts),
            "estimated": {
                "ambiguous_runs": self.ambiguous_runs,
                "apportioned_tokens": self.apportioned_tokens,
                "counted_runs_estimated": self.estimated_counted,
            },
            "counted": {
                "statuses": list(self.statuses_counted),
                "runs": list(self.counted),
                "left_out": [x.to_json() for x in self.left_out],
                "missing": {
                    key: [x.to_json() for x in runs] for key, runs in self.missing.items() if runs
                },
            },
            "stats": {key: stat.to_json() for key, stat in self.stats.items()},
        }


def _median(values: Sequence[timedelta]) -> timedelta | None:
    if not values:
        return None
    return timedelta(seconds=statistics.median(v.total_seconds() for v in values))


def _one(name: str, group: Sequence[RunSummary], statuses: tuple[str, ...]) -> FrameworkAggregate:
    settled = [r for r in group if r.settled]
    with_cached = [r for r in group if r.cached_tokens is not None and r.tokens_in is not None]
    priced = [r for r in group if r.cost is not None]
    times = tuple(sorted(t for r in group if (t := r.time_to_verify) is not None))
    counted = [r for r in group if r.status in statuses]
    stats: dict[str, Stat] = {}
    missing: dict[str, tuple[LeftOut, ...]] = {}
    for metric in METRICS:
        values = [(r, metric.value(r)) for r in counted]
        stats[metric.key] = describe([v for _, v in values if v is not None])
        missing[metric.key] = tuple(missing_reason(r, metric) for r, v in values if v is None)
    return FrameworkAggregate(
        framework=name,
        runs=len(group),
        by_status=dict(sorted(Counter(r.status for r in group).items())),
        tokens_in=sum(r.tokens_in or 0 for r in group),
        tokens_out=sum(r.tokens_out or 0 for r in group),
        cached_tokens=sum(r.cached_tokens or 0 for r in with_cached),
        cached_basis=sum(r.tokens_in or 0 for r in with_cached),
        api_calls=sum(r.api_calls or 0 for r in group),
        cost_usd=sum((r.cost for r in priced if r.cost is not None), Decimal(0)),
        cost_runs=len(priced),
        cost_incomplete=sum(1 for r in settled if r.cost is None),
        median_time_to_verify=_median(times),
        times_to_verify=times,
        verdicts=dict(
            sorted(Counter(r.local_vs_provider for r in group if r.local_vs_provider).items())
        ),
        statuses_counted=statuses,
        counted=tuple(r.run_id for r in counted),
        left_out=tuple(left_out_reason(r) for r in group if r.status not in statuses),
        stats=stats,
        missing=missing,
        estimated_counted=sum(1 for r in counted if r.estimated),
        ambiguous_runs=sum(1 for r in settled if r.status == "ambiguous"),
        apportioned_tokens=sum(r.apportioned_tokens or 0 for r in settled),
    )


def _by_framework(runs: Iterable[RunSummary]) -> dict[str, list[RunSummary]]:
    groups: dict[str, list[RunSummary]] = {}
    for run in ordered(runs):
        groups.setdefault(run.framework, []).append(run)
    return groups


def aggregate(
    runs: Iterable[RunSummary], *, include_ambiguous: bool = False
) -> list[FrameworkAggregate]:
    """Per-framework figures, frameworks in name order."""
    statuses = counted_statuses(include_ambiguous)
    return [_one(name, group, statuses) for name, group in _by_framework(runs).items()]


def ordered(runs: Iterable[RunSummary]) -> list[RunSummary]:
    return sorted(
        runs,
        key=lambda r: (r.framework, r.run_end or datetime.min.replace(tzinfo=UTC), r.run_id),
    )


# ------------------------------------------------------------------ provenance


def data_source(endpoint: str | None) -> str:
    """Where a run's tokens come from, without a URL scheme (reports fetch nothing)."""
    if endpoint is None:
        return "Usage API (settled by another tool; endpoint not recorded)"
    parts = urlsplit(endpoint)
    where = (parts.netloc + parts.path) or endpoint
    anthropic = parts.path.endswith("/usage_report/messages")
    name, host = (
        ("Anthropic usage report", "api.anthropic.com")
        if anthropic
        else ("OpenAI Usage API", "api.openai.com")
    )
    if parts.hostname == host:
        return f"{name} ({where})"
    return f"{name} at {where} (not {host})"


@dataclass(frozen=True)
class Provenance:
    """Where the counted numbers come from, for captions and the report's header."""

    tool: str
    generated_at: datetime | None
    statuses: tuple[str, ...]
    runs: int
    counted: int
    left_out: Mapping[str, int]
    data_sources: tuple[str, ...]
    settled_by: tuple[str, ...]
    price_sources: tuple[str, ...]
    priced_from: date | None
    priced_to: date | None
    window_start: datetime | None
    window_end: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "generated_at": iso(self.generated_at),
            "statuses_counted": list(self.statuses),
            "runs": self.runs,
            "counted": self.counted,
            "left_out": dict(self.left_out),
            "data_sources": list(self.data_sources),
            "settled_by": list(self.settled_by),
            "price_sources": list(self.price_sources),
            "prices_as_of": None
            if self.priced_from is None or self.priced_to is None
            else [self.priced_from.isoformat(), self.priced_to.isoformat()],
            "query_windows": None
            if self.window_start is None or self.window_end is None
            else [iso(self.window_start), iso(self.window_end)],
        }


def provenance(
    runs: Sequence[RunSummary],
    aggs: Sequence[FrameworkAggregate],
    statuses: tuple[str, ...],
    generated_at: datetime | None,
) -> Provenance:
    counted = [r for r in runs if r.status in statuses]
    left: Counter[str] = Counter(x.reason for a in aggs for x in a.left_out)
    left.update(x.reason for a in aggs for x in a.missing.get("cost_usd", ()))
    windows = [r.window for r in counted if r.window is not None]
    priced = [r.priced_at.astimezone(UTC).date() for r in counted if r.priced_at and r.cost]
    return Provenance(
        tool=f"{TOOL_NAME} {__version__}",
        generated_at=generated_at,
        statuses=statuses,
        runs=len(runs),
        counted=len(counted),
        left_out=dict(sorted(left.items())),
        data_sources=tuple(sorted({data_source(r.endpoint) for r in counted})),
        settled_by=tuple(sorted({r.settled_by or "another tool" for r in counted})),
        price_sources=tuple(sorted({r.price_source for r in counted if r.price_source and r.cost})),
        priced_from=min(priced, default=None),
        priced_to=max(priced, default=None),
        window_start=min((w[0] for w in windows), default=None),
        window_end=max((w[1] for w in windows), default=None),
    )


@dataclass(frozen=True)
class Report:
    """Everything a rendering shows."""

    runs: tuple[RunSummary, ...]
    frameworks: tuple[FrameworkAggregate, ...]
    provenance: Provenance
    include_ambiguous: bool = False

    def counted_runs(self, framework: str) -> list[RunSummary]:
        statuses = counted_statuses(self.include_ambiguous)
        return [r for r in self.runs if r.framework == framework and r.status in statuses]


def build(
    runs: Iterable[RunSummary],
    *,
    include_ambiguous: bool = False,
    generated_at: datetime | None = None,
) -> Report:
    everything = tuple(ordered(runs))
    aggs = tuple(aggregate(everything, include_ambiguous=include_ambiguous))
    statuses = counted_statuses(include_ambiguous)
    prov = provenance(everything, aggs, statuses, generated_at)
    return Report(everything, aggs, prov, include_ambiguous)

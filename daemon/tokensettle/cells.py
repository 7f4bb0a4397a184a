"""The text of report cells, shared by every rendering so they read the same.

Estimates say so: `~` before token counts that are (partly) apportioned between runs; a cost
that could not be priced reads `unpriced (<model>)`, never a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from tokensettle.aggregates import (
    METRIC_BY_KEY,
    METRICS,
    FrameworkAggregate,
    Kind,
    Provenance,
    Report,
)
from tokensettle.durations import human_duration as fmt_duration
from tokensettle.stats import Stat
from tokensettle.summary import RunSummary

__all__ = ["fmt_duration"]

ESTIMATE = "~"
LEGEND_ESTIMATE = (
    "~ estimated: tokens partly apportioned between runs that share minutes on one key, "
    "and the cached share, API calls and cost that follow from them (ambiguous runs, and "
    "verified runs within APPORTION_TOLERANCE)"
)
LEGEND_UNPRICED = (
    "unpriced (model): the price table has no price for that model; the run has no cost "
    "and is left out of cost figures (never counted as 0)"
)


def fmt_int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def fmt_cost(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def fmt_statuses(by_status: Mapping[str, int]) -> str:
    return ", ".join(
        f"{n} {s}" for s, n in sorted(by_status.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def decimals(kind: Kind, ref: float) -> int:
    """Decimals for a value of `kind` near `ref`: about four significant digits."""
    size = abs(ref)
    if kind == "share":
        return 1
    if kind == "usd":
        return 2 if size == 0 else min(8, max(2, 3 - math.floor(math.log10(size))))
    return 0 if size >= 100 else 1


def fmt_number(value: float, kind: Kind, ref: float | None = None) -> str:
    """A statistic's value; `ref` (the mean) sets the decimals so mean and sd align."""
    places = decimals(kind, value if ref is None else ref)
    if kind == "share":
        return f"{value * 100:.{places}f}%"
    if kind == "count" and float(value).is_integer() and ref is None:
        return f"{int(value):,}"
    return f"{value:,.{places}f}"


def mean_sd(stat: Stat, kind: Kind, pm: str = "±") -> str:
    """`mean ± sd`; the mean alone for n = 1; `-` for n = 0."""
    if stat.mean is None:
        return "-"
    if stat.sd is None:
        return fmt_number(stat.mean, kind, stat.mean)
    return f"{fmt_number(stat.mean, kind, stat.mean)} {pm} {fmt_number(stat.sd, kind, stat.mean)}"


def ci_text(stat: Stat, kind: Kind) -> str:
    if stat.ci95 is None or stat.mean is None:
        return "-"
    low, high = stat.ci95
    return f"[{fmt_number(low, kind, stat.mean)}, {fmt_number(high, kind, stat.mean)}]"


def stat_value(stat: Stat, kind: Kind, value: float | None, *, run_value: bool = False) -> str:
    """A statistic in the decimals of its mean; `run_value` (min, max): one run's own value,
    which for a count is a whole number."""
    if value is None:
        return "-"
    return fmt_number(value, kind, None if run_value and kind == "count" else stat.mean)


@dataclass(frozen=True)
class MetricCell:
    """A framework's figure for one metric, in parts each rendering joins its own way."""

    #: "mean ± sd" (the `pm` given), the mean alone for n = 1, "-" without values
    value: str
    #: the runs behind it when fewer than the framework's n (some unpriced or not recorded)
    n: int | None = None
    estimated: bool = False
    #: models that could not be priced, when no run of the framework has a cost
    unpriced: tuple[str, ...] = ()

    def text(self) -> str:
        if self.unpriced:
            return f"unpriced ({', '.join(self.unpriced)})"
        text = (ESTIMATE if self.estimated else "") + self.value
        return text + (f" (n={self.n})" if self.n is not None else "")


def metric_parts(agg: FrameworkAggregate, key: str, pm: str = "±") -> MetricCell:
    metric = METRIC_BY_KEY[key]
    stat = agg.stats[key]
    unpriced = sorted(
        {m for x in agg.missing.get(key, ()) if x.reason == "unpriced" for m in x.models}
    )
    if stat.n == 0 and unpriced:
        return MetricCell("-", unpriced=tuple(unpriced))
    return MetricCell(
        mean_sd(stat, metric.kind, pm),
        stat.n if 0 < stat.n < agg.n else None,
        bool(stat.n and agg.estimated_counted),
    )


def metric_cell(agg: FrameworkAggregate, key: str) -> str:
    """A framework's `mean ± sd` of one metric, with `(n=k)` when fewer runs than the
    framework's n have a value, `~` when estimates are among them, `unpriced (model)` when
    none could be priced."""
    return metric_parts(agg, key).text()


def run_tokens(run: RunSummary, value: int | None) -> str:
    text = fmt_int(value)
    return ESTIMATE + text if value is not None and run.estimated else text


def run_estimate(run: RunSummary, text: str) -> str:
    """Any figure of an estimated run (its cached share, its API calls: they are split
    with the tokens) carries the mark, as its tokens do."""
    return ESTIMATE + text if run.estimated and text != "-" else text


def run_cost(run: RunSummary) -> str:
    state = run.cost_state
    if state == "unpriced":
        return f"unpriced ({', '.join(run.unpriced_names)})"
    if state == "none":
        return "-"
    return (ESTIMATE if run.estimated else "") + fmt_cost(run.cost)


def fmt_when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def window_span(prov: Provenance) -> str | None:
    """From the earliest query window's start to the latest one's end."""
    if prov.window_start is None or prov.window_end is None:
        return None
    return f"{fmt_when(prov.window_start)} to {fmt_when(prov.window_end)}"


def price_dates(prov: Provenance) -> str | None:
    """The dates whose prices apply: the counted runs' start dates."""
    if prov.priced_from is None or prov.priced_to is None:
        return None
    dates = prov.priced_from.isoformat()
    if prov.priced_to != prov.priced_from:
        dates += f" to {prov.priced_to.isoformat()}"
    return dates


def provenance_items(prov: Provenance) -> list[tuple[str, str]]:
    """(label, text) pairs: the report's header and the captions."""
    dates = price_dates(prov)
    prices = (
        f"{', '.join(prov.price_sources)}; prices in force at each run's start ({dates})"
        if dates
        else "-"
    )
    left = ", ".join(f"{n} {reason}" for reason, n in prov.left_out.items()) or "none"
    return [
        (
            "generated by",
            prov.tool + (f" at {fmt_when(prov.generated_at)}" if prov.generated_at else ""),
        ),
        ("token source", "; ".join(prov.data_sources) or "-"),
        ("settled by", ", ".join(prov.settled_by) or "-"),
        ("prices", prices),
        ("statuses counted", ", ".join(prov.statuses)),
        ("runs counted", f"{prov.counted} of {prov.runs}; left out: {left}"),
        ("query windows", window_span(prov) or "-"),
    ]


def left_out_lines(report: Report) -> list[str]:
    """One line per run that is not in the statistics (or not in the cost's), and why."""
    lines: list[str] = []
    for agg in report.frameworks:
        for item in agg.left_out:
            lines.append(f"{agg.framework} / {item.run_id}: {item.detail}")
        for key, items in agg.missing.items():
            label = METRIC_BY_KEY[key].label.lower()
            for item in items:
                lines.append(f"{agg.framework} / {item.run_id}: not in {label}: {item.detail}")
    return lines


def counted_line(report: Report) -> str:
    statuses = " and ".join(report.provenance.statuses)
    parts = [f"{a.framework} {a.n}" for a in report.frameworks]
    return f"Counted ({statuses} runs): " + (", ".join(parts) if parts else "none")


def needs_estimate_legend(report: Report) -> bool:
    return any(r.estimated for r in report.runs)


def needs_unpriced_legend(report: Report) -> bool:
    return any(r.cost_state == "unpriced" for r in report.runs)


def legend_lines(report: Report) -> Sequence[str]:
    out = []
    if needs_estimate_legend(report):
        out.append(LEGEND_ESTIMATE)
    if needs_unpriced_legend(report):
        out.append(LEGEND_UNPRICED)
    return out


# ------------------------------------------------------------------ table rows

FW_HEADERS = (
    "framework",
    "runs",
    "status",
    "n",
    "tokens in",
    "tokens out",
    "cached share",
    "API calls",
    "cost USD",
    "median verify",
    "local vs provider",
)
RUN_HEADERS = (
    "framework",
    "run id",
    "status",
    "tokens in",
    "tokens out",
    "cached",
    "API calls",
    "cost USD",
    "verify",
    "local vs provider",
    "models",
)
STATS_HEADERS = ("framework", "metric", "n", "mean", "sd", "95% CI", "median", "min", "max")

FW_NUMERIC = frozenset({1, 3, 4, 5, 6, 7, 8, 9})
RUN_NUMERIC = frozenset({3, 4, 5, 6, 7, 8})
STATS_NUMERIC = frozenset({2, 3, 4, 5, 6, 7, 8})


def fw_row(a: FrameworkAggregate) -> list[str]:
    return [
        a.framework,
        str(a.runs),
        fmt_statuses(a.by_status),
        str(a.n),
        metric_cell(a, "tokens_in"),
        metric_cell(a, "tokens_out"),
        metric_cell(a, "cached_share"),
        metric_cell(a, "api_calls"),
        metric_cell(a, "cost_usd"),
        fmt_duration(a.median_time_to_verify),
        fmt_statuses(a.verdicts) or "-",
    ]


def run_row(r: RunSummary) -> list[str]:
    return [
        r.framework,
        r.run_id,
        r.status,
        run_tokens(r, r.tokens_in),
        run_tokens(r, r.tokens_out),
        run_estimate(r, fmt_share(r.cached_share)),
        run_estimate(r, fmt_int(r.api_calls)),
        run_cost(r),
        fmt_duration(r.time_to_verify),
        r.local_vs_provider or "-",
        ", ".join(r.models) or "-",
    ]


def stats_rows(aggs: Sequence[FrameworkAggregate]) -> list[list[str]]:
    """framework, metric, n, mean, sd, 95% CI, median, min, max: one row per metric."""
    rows: list[list[str]] = []
    for agg in aggs:
        for metric in METRICS:
            stat = agg.stats[metric.key]
            mean = stat_value(stat, metric.kind, stat.mean)
            if stat.n and agg.estimated_counted:
                mean = ESTIMATE + mean
            rows.append(
                [
                    agg.framework,
                    metric.label,
                    str(stat.n),
                    mean,
                    stat_value(stat, metric.kind, stat.sd),
                    ci_text(stat, metric.kind),
                    stat_value(stat, metric.kind, stat.median),
                    stat_value(stat, metric.kind, stat.min, run_value=True),
                    stat_value(stat, metric.kind, stat.max, run_value=True),
                ]
            )
    return rows

"""`tokensettle report`: per framework and per run, as a table, CSV, JSON or one HTML file.

Pure renderers: a list of `RunSummary` in, a string out. Times are passed in (`generated_at`).

What counts where:

* Token counts, cached tokens, API calls are those the provider confirmed: a summary carries
  them only for `verified`/`ambiguous` runs (see `summary_from_document`); other runs show "-"
  and add nothing to their framework's totals.
* Cost adds up only runs whose cost is complete (every model priced); runs with a partial
  cost are counted in `cost_incomplete` and marked with `*` in the tables.
* Cached share = cached tokens / input tokens over the runs that report both.
* Time to verify = `verified_at - run_end`; the framework figure is the median.

The HTML report is one self-contained file: inline CSS and inline SVG (no scripts, fonts,
images or URLs, not even an SVG namespace: inline `<svg>` in HTML needs none), so it opens
offline. Every text that comes from data (framework names and run ids come from file paths)
is escaped.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from tokensettle.durations import human_duration as fmt_duration

Format = Literal["table", "csv", "json", "html"]
FORMATS: tuple[Format, ...] = ("table", "csv", "json", "html")
BLOCK = "usage_api_reconciliation"
SETTLED = ("verified", "ambiguous")

CSV_HEADER: tuple[str, ...] = (
    "framework",
    "run_id",
    "status",
    "tokens_in",
    "tokens_out",
    "cached_tokens",
    "cached_share",
    "api_calls",
    "cost_usd",
    "cost_complete",
    "run_end",
    "verified_at",
    "time_to_verify_s",
    "local_vs_provider",
    "models",
)


# ------------------------------------------------------------------ data


@dataclass(frozen=True)
class RunSummary:
    framework: str
    run_id: str
    status: str
    tokens_in: int | None = None
    tokens_out: int | None = None
    cached_tokens: int | None = None
    api_calls: int | None = None
    cost_usd: Decimal | None = None
    #: False when a cost is recorded but some model could not be priced (partial sum)
    cost_complete: bool = True
    run_end: datetime | None = None
    verified_at: datetime | None = None
    local_vs_provider: str | None = None
    models: tuple[str, ...] = ()

    @property
    def time_to_verify(self) -> timedelta | None:
        if self.run_end is None or self.verified_at is None:
            return None
        return self.verified_at - self.run_end

    @property
    def cached_share(self) -> float | None:
        if self.cached_tokens is None or not self.tokens_in:
            return None
        return self.cached_tokens / self.tokens_in

    @property
    def total_tokens(self) -> int | None:
        if self.tokens_in is None and self.tokens_out is None:
            return None
        return (self.tokens_in or 0) + (self.tokens_out or 0)

    def to_json(self) -> dict[str, Any]:
        ttv = self.time_to_verify
        share = self.cached_share
        return {
            "framework": self.framework,
            "run_id": self.run_id,
            "status": self.status,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cached_tokens": self.cached_tokens,
            "cached_share": None if share is None else round(share, 6),
            "api_calls": self.api_calls,
            "cost_usd": None if self.cost_usd is None else float(self.cost_usd),
            "cost_complete": self.cost_complete if self.cost_usd is not None else None,
            "run_end": _iso(self.run_end),
            "verified_at": _iso(self.verified_at),
            "time_to_verify_s": None if ttv is None else round(ttv.total_seconds(), 3),
            "local_vs_provider": self.local_vs_provider,
            "models": list(self.models),
        }


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

    @property
    def cached_share(self) -> float | None:
        return self.cached_tokens / self.cached_basis if self.cached_basis else None

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
        }


def _median(values: Sequence[timedelta]) -> timedelta | None:
    if not values:
        return None
    return timedelta(seconds=statistics.median(v.total_seconds() for v in values))


def aggregate(runs: Iterable[RunSummary]) -> list[FrameworkAggregate]:
    """Per-framework figures, frameworks in name order."""
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.framework, []).append(run)
    out: list[FrameworkAggregate] = []
    for name in sorted(groups):
        group = groups[name]
        with_cached = [r for r in group if r.cached_tokens is not None and r.tokens_in is not None]
        priced = [r for r in group if r.cost_usd is not None and r.cost_complete]
        times = tuple(sorted(t for r in group if (t := r.time_to_verify) is not None))
        out.append(
            FrameworkAggregate(
                framework=name,
                runs=len(group),
                by_status=dict(sorted(Counter(r.status for r in group).items())),
                tokens_in=sum(r.tokens_in or 0 for r in group),
                tokens_out=sum(r.tokens_out or 0 for r in group),
                cached_tokens=sum(r.cached_tokens or 0 for r in with_cached),
                cached_basis=sum(r.tokens_in or 0 for r in with_cached),
                api_calls=sum(r.api_calls or 0 for r in group),
                cost_usd=sum((r.cost_usd for r in priced if r.cost_usd is not None), Decimal(0)),
                cost_runs=len(priced),
                cost_incomplete=sum(
                    1
                    for r in group
                    if r.status in SETTLED and not (r.cost_usd is not None and r.cost_complete)
                ),
                median_time_to_verify=_median(times),
                times_to_verify=times,
                verdicts=dict(
                    sorted(
                        Counter(r.local_vs_provider for r in group if r.local_vs_provider).items()
                    )
                ),
            )
        )
    return out


# ------------------------------------------------------------------ reading metrics.json


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _decimal(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, str):
            result = Decimal(value)
        elif isinstance(value, int | float):
            result = Decimal(repr(value))
        else:
            return None
    except InvalidOperation:
        return None
    return result if result.is_finite() and result >= 0 else None


def _when(value: object) -> datetime | None:
    """ISO 8601 (naive = UTC, as the seed writes) or Unix seconds; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return None
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            try:
                return _when(float(value))
            except ValueError:
                return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _run_end(doc: Mapping[str, Any]) -> datetime | None:
    end = _when(doc.get("end_timestamp"))
    if end is not None:
        return end
    steps = doc.get("steps")
    if isinstance(steps, list):
        ends = [e for s in steps if isinstance(s, Mapping) and (e := _when(s.get("end_timestamp")))]
        if ends:
            return max(ends)
    return None


def _last_attempt(block: Mapping[str, Any]) -> Mapping[str, Any]:
    attempts = block.get("attempts")
    if isinstance(attempts, list):
        for attempt in reversed(attempts):
            if isinstance(attempt, Mapping) and _int(attempt.get("total_tokens_in")) is not None:
                return attempt
    return {}


def _first(*values: object) -> int | None:
    for value in values:
        found = _int(value)
        if found is not None:
            return found
    return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def summary_from_document(
    doc: Mapping[str, Any], framework: str, *, run_id: str | None = None
) -> RunSummary:
    """A run's summary from its metrics.json (any schema in the field; never raises).

    Token figures come from the reconciliation block of a verified/ambiguous run: its
    totals, else its last attempt with totals, else `aggregate_metrics` (which such a run's
    reconciler wrote). Other runs carry none. The cost, breakdown and local-vs-provider
    verdict come from the block's `cost`, `token_breakdown` and `local_vs_provider` keys.
    """
    block = _mapping(doc.get(BLOCK))
    raw_status = block.get("verification_status") or doc.get("verification_status") or "pending"
    status = str(raw_status)
    name = doc.get("run_id")
    rid = name if isinstance(name, str) and name else (run_id or "?")

    tokens_in = tokens_out = cached = calls = None
    if status in SETTLED:
        attempt = _last_attempt(block)
        agg = _mapping(doc.get("aggregate_metrics"))
        breakdown_input = _mapping(
            _mapping(_mapping(block.get("token_breakdown")).get("total")).get("input")
        )
        tokens_in = _first(
            block.get("total_tokens_in"), attempt.get("total_tokens_in"), agg.get("TOK_IN")
        )
        tokens_out = _first(
            block.get("total_tokens_out"), attempt.get("total_tokens_out"), agg.get("TOK_OUT")
        )
        calls = _first(
            block.get("total_api_calls"), attempt.get("total_api_calls"), agg.get("API_CALLS")
        )
        cached = _first(
            breakdown_input.get("cached"),
            block.get("total_cached_tokens"),
            attempt.get("total_cached_tokens"),
            agg.get("CACHED_TOKENS"),
        )

    cost_block = _mapping(block.get("cost"))
    cost = _decimal(cost_block.get("total_usd_exact"))
    if cost is None:
        cost = _decimal(cost_block.get("total_usd"))
    complete = cost_block.get("complete") is not False

    verdict = _mapping(block.get("local_vs_provider")).get("verdict")
    models: list[str] = []
    for source in (
        _mapping(block.get("token_breakdown")).get("models"),
        _mapping(block.get("attribution")).get("models"),
    ):
        if isinstance(source, Mapping) and source:
            models = sorted(str(m) for m in source)
            break
    if not models and isinstance(doc.get("model"), str):
        models = [doc["model"]]

    return RunSummary(
        framework=framework,
        run_id=rid,
        status=status,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        cached_tokens=cached,
        api_calls=calls,
        cost_usd=cost,
        cost_complete=complete,
        run_end=_run_end(doc),
        verified_at=_when(block.get("verified_at")),
        local_vs_provider=str(verdict) if isinstance(verdict, str) else None,
        models=tuple(models),
    )


# ------------------------------------------------------------------ formatting helpers


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).isoformat()


def fmt_int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def fmt_cost(value: Decimal | None, complete: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:.6f}" + ("" if complete else "*")


def fmt_statuses(by_status: Mapping[str, int]) -> str:
    return ", ".join(
        f"{n} {s}" for s, n in sorted(by_status.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def _text_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int]
) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


_FW_HEADERS = (
    "framework",
    "runs",
    "status",
    "tokens in",
    "tokens out",
    "cached",
    "API calls",
    "cost USD",
    "median verify",
    "local vs provider",
)
_RUN_HEADERS = (
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

_FW_NUMERIC = frozenset({1, 3, 4, 5, 6, 7, 8})
_RUN_NUMERIC = frozenset({3, 4, 5, 6, 7, 8})


def _fw_row(a: FrameworkAggregate) -> list[str]:
    return [
        a.framework,
        str(a.runs),
        fmt_statuses(a.by_status),
        fmt_int(a.tokens_in),
        fmt_int(a.tokens_out),
        fmt_share(a.cached_share),
        fmt_int(a.api_calls),
        fmt_cost(a.cost_usd, a.cost_incomplete == 0) if a.cost_runs else "-",
        fmt_duration(a.median_time_to_verify),
        fmt_statuses(a.verdicts) or "-",
    ]


def _run_row(r: RunSummary) -> list[str]:
    return [
        r.framework,
        r.run_id,
        r.status,
        fmt_int(r.tokens_in),
        fmt_int(r.tokens_out),
        fmt_share(r.cached_share),
        fmt_int(r.api_calls),
        fmt_cost(r.cost_usd, r.cost_complete),
        fmt_duration(r.time_to_verify),
        r.local_vs_provider or "-",
        ", ".join(r.models) or "-",
    ]


def _ordered(runs: Iterable[RunSummary]) -> list[RunSummary]:
    return sorted(
        runs,
        key=lambda r: (r.framework, r.run_end or datetime.min.replace(tzinfo=UTC), r.run_id),
    )


_FOOTNOTE = (
    "* cost incomplete: a model of the run could not be priced, or a settled run has no cost "
    "yet; framework costs add up the runs with a complete cost only."
)


def _needs_footnote(runs: Sequence[RunSummary], aggs: Sequence[FrameworkAggregate]) -> bool:
    partial_run = any(r.cost_usd is not None and not r.cost_complete for r in runs)
    partial_fw = any(a.cost_incomplete and a.cost_runs for a in aggs)
    return partial_run or partial_fw


# ------------------------------------------------------------------ text, CSV, JSON


def render_table(runs: Sequence[RunSummary]) -> str:
    if not runs:
        return "no runs"
    aggs = aggregate(runs)
    ordered = _ordered(runs)
    parts = [
        "Frameworks",
        _text_table(_FW_HEADERS, [_fw_row(a) for a in aggs], _FW_NUMERIC),
        "",
        "Runs",
        _text_table(_RUN_HEADERS, [_run_row(r) for r in ordered], _RUN_NUMERIC),
    ]
    if _needs_footnote(runs, aggs):
        parts += ["", _FOOTNOTE]
    return "\n".join(parts) + "\n"


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_csv(runs: Sequence[RunSummary]) -> str:
    """One row per run under a stable header; empty cells for unknown values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in _ordered(runs):
        data = r.to_json()
        data["cost_usd"] = None if r.cost_usd is None else format(r.cost_usd, "f")
        data["models"] = ";".join(r.models)
        writer.writerow([_csv_cell(data[k]) for k in CSV_HEADER])
    return buffer.getvalue()


def render_json(runs: Sequence[RunSummary], *, generated_at: datetime | None = None) -> str:
    doc = {
        "generated_at": _iso(generated_at),
        "frameworks": [a.to_json() for a in aggregate(runs)],
        "runs": [r.to_json() for r in _ordered(runs)],
    }
    return json.dumps(doc, indent=2) + "\n"


# ------------------------------------------------------------------ HTML and SVG


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float) -> str:
    """Compact SVG coordinate."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 covering `top` (1/2/5 x 10^k steps)."""
    if not math.isfinite(top) or top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    ticks = [0.0]
    while ticks[-1] < top:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def short_number(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            text = f"{value / size:.1f}".removesuffix(".0")
            return text + suffix
    if value and abs(value) < 1:
        return f"{value:.4g}"
    return f"{value:g}"


def _label(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_W = 760
_LEFT = 150
_RIGHT = 70
_PLOT = _W - _LEFT - _RIGHT


def _x(value: float, top: float) -> float:
    """x of `value` on a 0..top axis; values outside it are drawn at its ends."""
    return _LEFT + (min(max(value, 0.0), top) / top) * _PLOT if top > 0 else _LEFT


def _axis(ticks: Sequence[float], top: float, y0: float, y1: float, fmt: Any) -> list[str]:
    out: list[str] = []
    for t in ticks:
        x = _num(_x(t, top))
        out.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{_num(y0)}" y2="{_num(y1)}"/>')
        ty = _num(y1 + 14)
        out.append(f'<text class="tick" x="{x}" y="{ty}" text-anchor="middle">{_e(fmt(t))}</text>')
    return out


def _svg(chart_id: str, title: str, height: float, body: Sequence[str]) -> str:
    return (
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {_W} {_num(height)}" '
        f'width="{_W}" height="{_num(height)}" role="img" aria-labelledby="{chart_id}-title">'
        f'<title id="{chart_id}-title">{_e(title)}</title>' + "".join(body) + "</svg>"
    )


def _empty(chart_id: str, title: str) -> str:
    return _svg(
        chart_id,
        title,
        60,
        [f'<text class="empty" x="{_W // 2}" y="34" text-anchor="middle">no data</text>'],
    )


def chart_bars(
    chart_id: str,
    title: str,
    rows: Sequence[tuple[str, Sequence[tuple[str, float]]]],
    fmt: Any = short_number,
) -> str:
    """Horizontal grouped bars: rows of (label, [(series, value), ...])."""
    values = [v for _, series in rows for _, v in series]
    if not rows or not any(v > 0 for v in values):
        return _empty(chart_id, title)
    n_series = max(len(s) for _, s in rows)
    bar, gap = 14, 12
    group = n_series * bar + gap
    top_pad = 28
    height = top_pad + len(rows) * group + 24
    ticks = nice_ticks(max(values))
    top = ticks[-1]
    body = _axis(ticks, top, top_pad - 6, height - 24, fmt)
    names = [name for name, _ in rows[0][1]]
    for i, name in enumerate(names):
        lx = _LEFT + i * 140
        body.append(f'<rect class="s{i}" x="{lx}" y="6" width="10" height="10"/>')
        body.append(f'<text class="legend" x="{lx + 14}" y="15">{_e(name)}</text>')
    for r, (label, series) in enumerate(rows):
        y = top_pad + r * group
        body.append(
            f'<text class="label" x="{_LEFT - 8}" y="{_num(y + n_series * bar / 2 + 4)}" '
            f'text-anchor="end"><title>{_e(label)}</title>{_e(_label(label))}</text>'
        )
        for s, (name, value) in enumerate(series):
            width = max(_x(value, top) - _LEFT, 0.0)
            by = y + s * bar
            body.append(
                f'<rect class="bar s{s}" x="{_LEFT}" y="{_num(by)}" width="{_num(width)}" '
                f'height="{bar - 2}"><title>{_e(label)} {_e(name)}: {_e(fmt(value))}</title></rect>'
            )
            body.append(
                f'<text class="value" x="{_num(_LEFT + width + 4)}" y="{_num(by + bar - 4)}">'
                f"{_e(fmt(value))}</text>"
            )
    return _svg(chart_id, title, height, body)


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def chart_strips(
    chart_id: str,
    title: str,
    rows: Sequence[tuple[str, Sequence[tuple[str, float]]]],
    fmt: Any = short_number,
) -> str:
    """Per-row dot plot with a box (quartiles) and a median tick: the spread across runs.
    rows: (label, [(point title, value), ...])."""
    values = [v for _, points in rows for _, v in points]
    if not values:
        return _empty(chart_id, title)
    lane = 34
    top_pad = 12
    height = top_pad + len(rows) * lane + 24
    ticks = nice_ticks(max(*values, 0.0) or 1.0)
    top = ticks[-1]
    body = _axis(ticks, top, top_pad - 4, height - 24, fmt)
    for r, (label, points) in enumerate(rows):
        mid = top_pad + r * lane + lane / 2
        body.append(
            f'<text class="label" x="{_LEFT - 8}" y="{_num(mid + 4)}" text-anchor="end">'
            f"<title>{_e(label)}</title>{_e(_label(label))}</text>"
        )
        data = sorted(v for _, v in points)
        if not data:
            continue
        q1, q2, q3 = _quartiles(data)
        body.append(
            f'<rect class="box" x="{_num(_x(q1, top))}" y="{_num(mid - 9)}" '
            f'width="{_num(max(_x(q3, top) - _x(q1, top), 1.0))}" height="18">'
            f"<title>{_e(label)}: quartiles {_e(fmt(q1))} / {_e(fmt(q2))} / {_e(fmt(q3))}"
            "</title></rect>"
        )
        mx, y0, y1 = _num(_x(q2, top)), _num(mid - 11), _num(mid + 11)
        body.append(f'<line class="median" x1="{mx}" x2="{mx}" y1="{y0}" y2="{y1}"/>')
        for i, (name, value) in enumerate(points):
            jitter = ((i * 7) % 11 - 5) * 1.2  # deterministic spread of equal values
            cx, cy = _num(_x(value, top)), _num(mid + jitter)
            body.append(
                f'<circle class="dot" cx="{cx}" cy="{cy}" r="3.5">'
                f"<title>{_e(name)}: {_e(fmt(value))}</title></circle>"
            )
    return _svg(chart_id, title, height, body)


_CSS = """
:root { color-scheme: light; --ink: #1f2328; --muted: #656d76; --line: #d0d7de;
  --s0: #2f6fb3; --s1: #e08a2e; --box: #dbe7f5; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  margin: 24px auto; max-width: 1100px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
p.meta, p.note { color: var(--muted); margin: 4px 0; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left;
  white-space: nowrap; }
td.num, th.num { text-align: right; }
td.wrap { white-space: normal; min-width: 12em; }
.scroll { overflow-x: auto; }
td.id { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
.charts { display: flex; flex-direction: column; gap: 18px; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { max-width: 100%; height: auto; background: #fff; }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg .tick, svg .value, svg .legend, svg .empty { fill: var(--muted); font-size: 11px; }
svg .label { fill: var(--ink); font-size: 12px; }
svg .s0 { fill: var(--s0); } svg .s1 { fill: var(--s1); }
svg .box { fill: var(--box); stroke: var(--s0); stroke-width: 1; }
svg .median { stroke: var(--ink); stroke-width: 2; }
svg .dot { fill: var(--s1); fill-opacity: .8; stroke: #fff; stroke-width: .5; }
.verdict-mismatch, .verdict-invalid_local_counts { color: #b42318; font-weight: 600; }
.verdict-match { color: #1a7f37; }
"""


def _html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    numeric: frozenset[int],
    classes: Callable[[int, str], str],
) -> str:
    head = "".join(
        f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers)
    )
    body: list[str] = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            css = classes(i, cell)
            attr = f' class="{_e(css)}"' if css else ""
            cells.append(f"<td{attr}>{_e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _minutes(td: timedelta) -> float:
    return td.total_seconds() / 60


def render_html(
    runs: Sequence[RunSummary],
    *,
    generated_at: datetime | None = None,
    title: str = "tokensettle report",
) -> str:
    aggs = aggregate(runs)
    ordered = _ordered(runs)
    by_fw: dict[str, list[RunSummary]] = {}
    for r in ordered:
        by_fw.setdefault(r.framework, []).append(r)

    tokens = chart_bars(
        "chart-tokens",
        "Tokens per framework (verified and ambiguous runs)",
        [
            (a.framework, [("input", float(a.tokens_in)), ("output", float(a.tokens_out))])
            for a in aggs
        ],
    )
    cost = chart_bars(
        "chart-cost",
        "Cost per framework (USD, runs with a complete cost; unpriced frameworks left out)",
        [(a.framework, [("cost USD", float(a.cost_usd))]) for a in aggs if a.cost_runs],
        fmt=lambda v: f"${v:.4g}" if v else "$0",
    )
    spread = chart_strips(
        "chart-spread",
        "Tokens per run (input + output), spread across runs",
        [
            (fw, [(r.run_id, float(t)) for r in rs if (t := r.total_tokens) is not None])
            for fw, rs in by_fw.items()
        ],
    )
    verify = chart_strips(
        "chart-verify",
        "Time to verify (minutes from run end to verification)",
        [
            (fw, [(r.run_id, _minutes(tv)) for r in rs if (tv := r.time_to_verify) is not None])
            for fw, rs in by_fw.items()
        ],
        fmt=lambda v: fmt_duration(timedelta(minutes=v)),
    )

    def fw_classes(i: int, cell: str) -> str:
        if i in (2, 9):
            return "wrap"
        return "num" if i in _FW_NUMERIC else ""

    def run_classes(i: int, cell: str) -> str:
        if i == 1:
            return "id"
        if i == 9:
            return f"verdict-{cell}"
        if i == 10:
            return "wrap"
        return "num" if i in _RUN_NUMERIC else ""

    meta = f"{len(runs)} runs in {len(aggs)} frameworks"
    if generated_at is not None:
        meta += f" · generated {_iso(generated_at)}"
    footnote = f'<p class="note">{_e(_FOOTNOTE)}</p>' if _needs_footnote(runs, aggs) else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{_e(meta)}</p>',
        '<p class="note">Token counts are the provider\'s (OpenAI Usage API) for verified and '
        "ambiguous runs; other runs show “-”.</p>",
        "<h2>Per framework</h2>",
        _html_table(_FW_HEADERS, [_fw_row(a) for a in aggs], _FW_NUMERIC, fw_classes),
        '<h2>Charts</h2><div class="charts">',
        f"<figure><figcaption>Tokens per framework</figcaption>{tokens}</figure>",
        f"<figure><figcaption>Cost per framework</figcaption>{cost}</figure>",
        f"<figure><figcaption>Tokens per run</figcaption>{spread}</figure>",
        f"<figure><figcaption>Time to verify</figcaption>{verify}</figure>",
        "</div>",
        "<h2>Runs</h2>",
        _html_table(_RUN_HEADERS, [_run_row(r) for r in ordered], _RUN_NUMERIC, run_classes),
        footnote,
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def render(
    runs: Sequence[RunSummary],
    fmt: Format = "table",
    *,
    generated_at: datetime | None = None,
    title: str = "tokensettle report",
) -> str:
    """Dispatch on `fmt` ("table", "csv", "json", "html")."""
    if fmt == "table":
        return render_table(runs)
    if fmt == "csv":
        return render_csv(runs)
    if fmt == "json":
        return render_json(runs, generated_at=generated_at)
    if fmt == "html":
        return render_html(runs, generated_at=generated_at, title=title)
    raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")

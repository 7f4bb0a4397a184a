"""SVG charts of per-run distributions: every run a point, the mean and its 95% interval.

Pure: a `Report` in, SVG text out. One chart per metric, one lane per framework, drawn from
the counted runs (the statistics' population), so a chart and its table agree. No box plots:
with the few runs per framework a benchmark has, quartiles are not worth drawing; points, the
mean and the Student-t interval are (the interval is absent for n < 2, and says so).

Styling is by presentation attributes, not CSS, so a standalone file renders the same in a
browser, Inkscape (LaTeX `svg` package) and slide tools. A standalone file has the SVG
namespace and an XML declaration; the copy inlined in the HTML report has neither (inline
`<svg>` in HTML needs no namespace, and the report holds no URL). Text from data is escaped
and stripped of characters XML does not allow.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from tokensettle.aggregates import METRICS, Kind, Report
from tokensettle.cells import fmt_duration, fmt_number
from tokensettle.stats import Stat, describe

SVG_NS = "http://www.w3.org/2000/svg"
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
INK, MUTED, GRID = "#1f2328", "#57606a", "#d0d7de"
POINT, ESTIMATE, MEAN = "#2f6fb3", "#c4640a", "#1f2328"

_XML_BAD = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def esc(value: object) -> str:
    """Text for HTML or XML: escaped, without characters XML 1.0 forbids."""
    return html.escape(_XML_BAD.sub("\ufffd", str(value)), quote=True)


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


def _label(text: str, limit: int = 14) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Point:
    run_id: str
    value: float
    estimated: bool = False


@dataclass(frozen=True)
class Lane:
    label: str
    points: Sequence[Point]
    stat: Stat


@dataclass(frozen=True)
class Chart:
    """One figure: `name` is its file stem (`--figures DIR` writes `<name>.svg`)."""

    name: str
    title: str
    svg: str


WIDTH = 560
LEFT, RIGHT = 118, 52
PLOT = WIDTH - LEFT - RIGHT
TOP, LANE, BOTTOM = 62, 40, 58


def _x(value: float, top: float) -> float:
    """x of `value` on a 0..top axis; values outside it are drawn at its ends."""
    return LEFT + (min(max(value, 0.0), top) / top) * PLOT if top > 0 else LEFT


def _text(x: float, y: float, text: str, size: int = 13, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{esc(v)}"' for k, v in attrs.items())
    fill = attrs.get("fill", INK)
    extra = extra if "fill" in attrs else extra + f' fill="{fill}"'
    return f'<text x="{_num(x)}" y="{_num(y)}" font-size="{size}"{extra}>{esc(text)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, *, stroke: str, width: float = 1) -> str:
    return (
        f'<line x1="{_num(x1)}" y1="{_num(y1)}" x2="{_num(x2)}" y2="{_num(y2)}" '
        f'stroke="{stroke}" stroke-width="{_num(width)}"/>'
    )


def _legend(y: float) -> list[str]:
    x = LEFT
    out = [
        f'<circle cx="{x + 4}" cy="{_num(y - 4)}" r="4" fill="{POINT}"/>',
        _text(x + 12, y, "run", 12, fill=MUTED),
        f'<circle cx="{x + 52}" cy="{_num(y - 4)}" r="4" fill="#fff" stroke="{ESTIMATE}" '
        'stroke-width="1.5"/>',
        _text(x + 60, y, "estimated", 12, fill=MUTED),
        _line(x + 138, y - 10, x + 138, y + 2, stroke=MEAN, width=2.5),
        _text(x + 144, y, "mean", 12, fill=MUTED),
        _line(x + 186, y - 4, x + 206, y - 4, stroke=MEAN, width=1.5),
        _line(x + 186, y - 8, x + 186, y, stroke=MEAN, width=1.5),
        _line(x + 206, y - 8, x + 206, y, stroke=MEAN, width=1.5),
        _text(x + 212, y, "95% CI of the mean (Student t)", 12, fill=MUTED),
    ]
    return out


def distribution(
    chart_id: str,
    title: str,
    axis_title: str,
    lanes: Sequence[Lane],
    fmt: Callable[[float], str] = short_number,
    *,
    value_fmt: Callable[[float], str] | None = None,
    standalone: bool = False,
) -> str:
    """Per-lane points with the mean and its 95% interval, on a shared axis from 0.
    `fmt` labels the ticks, `value_fmt` (default `fmt`) the hover text of points and means."""
    show = value_fmt or fmt
    values = [p.value for lane in lanes for p in lane.points]
    height = TOP + max(len(lanes), 1) * LANE + BOTTOM
    body: list[str] = [_text(8, 20, title, 15, font_weight="bold")]
    if not values:
        body.append(_text(WIDTH / 2, TOP + 24, "no data", 13, fill=MUTED, text_anchor="middle"))
        return _svg(
            chart_id, title, desc=axis_title, height=TOP + 60, body=body, standalone=standalone
        )
    body += _legend(44)
    plot_top, plot_bottom = TOP - 6, TOP + len(lanes) * LANE
    highs = [lane.stat.ci95[1] for lane in lanes if lane.stat.ci95]
    ticks = nice_ticks(max(*values, *highs, 0.0) or 1.0)
    top = ticks[-1]
    for t in ticks:
        x = _x(t, top)
        body.append(_line(x, plot_top, x, plot_bottom, stroke=GRID))
        body.append(_text(x, plot_bottom + 16, fmt(t), 12, fill=MUTED, text_anchor="middle"))
    body.append(_line(LEFT, plot_bottom, LEFT + PLOT, plot_bottom, stroke=MUTED))
    body.append(_text(LEFT + PLOT / 2, plot_bottom + 40, axis_title, 13, text_anchor="middle"))
    for r, lane in enumerate(lanes):
        mid = TOP + r * LANE + LANE / 2
        body.append(
            f'<text x="{LEFT - 8}" y="{_num(mid + 5)}" font-size="14" fill="{INK}" '
            f'text-anchor="end">{esc(_label(lane.label))}<title>{esc(lane.label)}</title></text>'
        )
        stat = lane.stat
        body.append(_text(LEFT + PLOT + 8, mid + 5, f"n={stat.n}", 12, fill=MUTED))
        for i, point in enumerate(lane.points):
            jitter = ((i * 7) % 11 - 5) * 1.0  # deterministic spread of equal values
            cx, cy = _num(_x(point.value, top)), _num(mid - 6 + jitter)
            paint = (
                f'fill="#fff" stroke="{ESTIMATE}" stroke-width="1.5"'
                if point.estimated
                else f'fill="{POINT}" fill-opacity="0.8"'
            )
            note = " (estimated)" if point.estimated else ""
            body.append(
                f'<circle cx="{cx}" cy="{cy}" r="4" {paint}>'
                f"<title>{esc(point.run_id)}: {esc(show(point.value))}{note}</title></circle>"
            )
        if stat.mean is None:
            continue
        y = mid + 11
        if stat.ci95 is not None:
            low, high = (_x(v, top) for v in stat.ci95)
            body.append(_line(low, y, high, y, stroke=MEAN, width=1.5))
            # a cap marks an end inside the axis; an interval reaching below 0 runs open
            body += [
                _line(x, y - 4, x, y + 4, stroke=MEAN, width=1.5)
                for x, v in ((low, stat.ci95[0]), (high, stat.ci95[1]))
                if 0 <= v <= top
            ]
        mx = _x(stat.mean, top)
        ci = (
            f"95% CI {show(stat.ci95[0])} to {show(stat.ci95[1])}"
            if stat.ci95
            else "no interval for n = 1"
        )
        body.append(
            f'<line x1="{_num(mx)}" y1="{_num(y - 7)}" x2="{_num(mx)}" y2="{_num(y + 7)}" '
            f'stroke="{MEAN}" stroke-width="2.5"><title>{esc(lane.label)}: mean '
            f"{esc(show(stat.mean))}, {esc(ci)}</title></line>"
        )
    return _svg(chart_id, title, desc=axis_title, height=height, body=body, standalone=standalone)


def _svg(
    chart_id: str,
    title: str,
    *,
    desc: str,
    height: float,
    body: Sequence[str],
    standalone: bool,
) -> str:
    ns = f' xmlns="{SVG_NS}"' if standalone else ""
    head = '<?xml version="1.0" encoding="UTF-8"?>\n' if standalone else ""
    return (
        f'{head}<svg{ns} id="{esc(chart_id)}" class="chart" viewBox="0 0 {WIDTH} {_num(height)}" '
        f'width="{WIDTH}" height="{_num(height)}" font-family="{FONT}" role="img" '
        f'aria-labelledby="{esc(chart_id)}-title">'
        f'<title id="{esc(chart_id)}-title">{esc(title)}</title><desc>{esc(desc)}</desc>'
        f'<rect x="0" y="0" width="{WIDTH}" height="{_num(height)}" fill="#fff"/>'
        + "".join(body)
        + "</svg>"
    )


def _axis_format(kind: Kind) -> Callable[[float], str]:
    if kind == "share":
        return lambda v: f"{v * 100:.0f}%"
    if kind == "usd":
        return lambda v: "$0" if v == 0 else f"${v:.3g}"
    return short_number


def _value_format(kind: Kind) -> Callable[[float], str]:
    """Hover text of a value: in full (the axis uses the shorter `_axis_format`)."""
    return lambda v: fmt_number(v, kind)


def charts(report: Report, *, standalone: bool = False) -> list[Chart]:
    """One chart per metric and one of the time to verify, over the counted runs."""
    groups = {a.framework: report.counted_runs(a.framework) for a in report.frameworks}
    statuses = " and ".join(report.provenance.statuses)
    out: list[Chart] = []
    for metric in METRICS:
        lanes = []
        for agg in report.frameworks:
            points = [
                Point(r.run_id, float(v), r.estimated)
                for r in groups[agg.framework]
                if (v := metric.value(r)) is not None
            ]
            lanes.append(Lane(agg.framework, points, agg.stats[metric.key]))
        title = f"{metric.label} per run ({statuses} runs)"
        svg = distribution(
            f"chart-{metric.key}",
            title,
            metric.axis,
            lanes,
            _axis_format(metric.kind),
            value_fmt=_value_format(metric.kind),
            standalone=standalone,
        )
        out.append(Chart(metric.key, title, svg))
    verify_lanes = []
    for agg in report.frameworks:
        minutes = [
            Point(r.run_id, t.total_seconds() / 60, r.estimated)
            for r in groups[agg.framework]
            if (t := r.time_to_verify) is not None
        ]
        verify_lanes.append(Lane(agg.framework, minutes, describe([p.value for p in minutes])))
    title = f"Time to verify ({statuses} runs)"
    out.append(
        Chart(
            "time_to_verify",
            title,
            distribution(
                "chart-time_to_verify",
                title,
                "Minutes from the run's end to verification",
                verify_lanes,
                lambda v: fmt_duration(timedelta(minutes=v)),
                standalone=standalone,
            ),
        )
    )
    return out

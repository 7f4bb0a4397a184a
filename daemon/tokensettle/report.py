"""`tokensettle report`: per framework and per run, as a table, CSV, JSON, Markdown, LaTeX
or one HTML file, and the charts as standalone SVG files.

Pure renderers: a list of `RunSummary` in, a string out; times are passed in
(`generated_at`), so the daemon can serve the same report. The parts:

* `summary` reads a run file into a `RunSummary`, with the status `list` shows;
* `aggregates` decides what is counted (verified runs; `include_ambiguous` adds ambiguous
  ones), computes the per-framework statistics (`stats`) and sums, and the provenance;
* `cells` formats values the same way everywhere; `paper` renders Markdown and LaTeX,
  `report_html` the HTML page, `figures` the SVG charts.

What counts where:

* Token counts, cached tokens, API calls are those the provider confirmed: a summary carries
  them only for `verified`/`ambiguous` runs; other runs show "-".
* Framework rows give `mean ± sd` over the counted runs (n). The sums kept in JSON
  (`tokens_in`, ...) cover settled runs, ambiguous ones included, as before, and say how
  much of them is estimated.
* A cost is a run's only when every model was priced; otherwise the run reads
  `unpriced (<model>)` and is left out of cost figures, never counted as 0.
* Cached share: per run, cached / input tokens; the JSON `cached_share` of a framework is
  the pooled one (sum of cached / sum of input over the runs that report both).
* Time to verify = `verified_at - run_end`; the framework figure is the median.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from tokensettle.aggregates import FrameworkAggregate, Report, aggregate, build
from tokensettle.cells import (
    FW_HEADERS,
    FW_NUMERIC,
    RUN_HEADERS,
    RUN_NUMERIC,
    STATS_HEADERS,
    STATS_NUMERIC,
    counted_line,
    fmt_duration,
    fw_row,
    left_out_lines,
    legend_lines,
    provenance_items,
    run_row,
    stats_rows,
)
from tokensettle.figures import charts, nice_ticks
from tokensettle.paper import render_latex, render_markdown
from tokensettle.report_html import render_report_html
from tokensettle.summary import RunSummary, iso, summary_from_document, summary_of_file, unreadable

Format = Literal["table", "csv", "json", "markdown", "latex", "html"]
FORMATS: tuple[Format, ...] = ("table", "csv", "json", "markdown", "latex", "html")

__all__ = [
    "CSV_HEADER",
    "FORMATS",
    "Format",
    "FrameworkAggregate",
    "RunSummary",
    "aggregate",
    "build",
    "figure_files",
    "fmt_duration",
    "nice_ticks",
    "render",
    "render_csv",
    "render_html",
    "render_json",
    "render_latex",
    "render_markdown",
    "render_table",
    "summary_from_document",
    "summary_of_file",
    "unreadable",
]

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
    "cost_status",
    "unpriced_models",
    "tokens_estimated",
    "apportioned_tokens",
    "message",
)


# ------------------------------------------------------------------ text


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


def notes(report: Report) -> list[str]:
    """The lines under every table: what was counted and left out, legends, provenance."""
    lines = [counted_line(report)]
    left = left_out_lines(report)
    if left:
        lines += ["Left out:", *(f"  {line}" for line in left)]
    lines += legend_lines(report)
    lines += [f"{label}: {text}" for label, text in provenance_items(report.provenance)]
    return lines


def render_table(
    runs: Sequence[RunSummary],
    *,
    include_ambiguous: bool = False,
    generated_at: datetime | None = None,
) -> str:
    if not runs:
        return "no runs"
    report = build(runs, include_ambiguous=include_ambiguous, generated_at=generated_at)
    parts = [
        "Frameworks (mean ± sd over the n counted runs)",
        _text_table(FW_HEADERS, [fw_row(a) for a in report.frameworks], FW_NUMERIC),
        "",
        "Statistics",
        _text_table(STATS_HEADERS, stats_rows(report.frameworks), STATS_NUMERIC),
        "",
        "Runs",
        _text_table(RUN_HEADERS, [run_row(r) for r in report.runs], RUN_NUMERIC),
        "",
        *notes(report),
    ]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ CSV, JSON


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_csv(runs: Sequence[RunSummary]) -> str:
    """One row per run under a stable header; empty cells for unknown values. `cost_usd` is
    empty unless the run's cost is complete (`cost_status`, `unpriced_models` say why)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in build(runs).runs:
        data = r.to_json()
        cost = r.cost
        data["cost_usd"] = None if cost is None else format(cost, "f")
        data["models"] = ";".join(r.models)
        data["unpriced_models"] = ";".join(r.unpriced_models)
        writer.writerow([_csv_cell(data[k]) for k in CSV_HEADER])
    return buffer.getvalue()


def report_json(report: Report) -> dict[str, Any]:
    """The JSON document (also what a daemon would serve as /report.json)."""
    return {
        "generated_at": iso(report.provenance.generated_at),
        "provenance": report.provenance.to_json(),
        "frameworks": [a.to_json() for a in report.frameworks],
        "runs": [r.to_json() for r in report.runs],
    }


def render_json(
    runs: Sequence[RunSummary],
    *,
    generated_at: datetime | None = None,
    include_ambiguous: bool = False,
) -> str:
    report = build(runs, include_ambiguous=include_ambiguous, generated_at=generated_at)
    return json.dumps(report_json(report), indent=2) + "\n"


# ------------------------------------------------------------------ HTML, figures, dispatch


def render_html(
    runs: Sequence[RunSummary],
    *,
    generated_at: datetime | None = None,
    title: str = "tokensettle report",
    include_ambiguous: bool = False,
) -> str:
    report = build(runs, include_ambiguous=include_ambiguous, generated_at=generated_at)
    return render_report_html(report, title=title)


def figure_files(runs: Sequence[RunSummary], *, include_ambiguous: bool = False) -> dict[str, str]:
    """`{file name: standalone SVG}` for `--figures DIR`: one chart per metric."""
    report = build(runs, include_ambiguous=include_ambiguous)
    return {f"{c.name}.svg": c.svg for c in charts(report, standalone=True)}


def render(
    runs: Sequence[RunSummary],
    fmt: Format = "table",
    *,
    generated_at: datetime | None = None,
    title: str = "tokensettle report",
    include_ambiguous: bool = False,
) -> str:
    """Dispatch on `fmt` (one of `FORMATS`)."""
    if fmt == "table":
        return render_table(runs, include_ambiguous=include_ambiguous, generated_at=generated_at)
    if fmt == "csv":
        return render_csv(runs)
    if fmt == "json":
        return render_json(runs, generated_at=generated_at, include_ambiguous=include_ambiguous)
    if fmt == "html":
        return render_html(
            runs, generated_at=generated_at, title=title, include_ambiguous=include_ambiguous
        )
    if fmt in ("markdown", "latex"):
        report = build(runs, include_ambiguous=include_ambiguous, generated_at=generated_at)
        return render_markdown(report) if fmt == "markdown" else render_latex(report)
    raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


#: Formats the bill check can be a section of (`report --bill`).
BILL_FORMATS: tuple[str, ...] = ("table", "markdown", "html", "json")


def with_section(text: str, fmt: Format, section: str | dict[str, Any], key: str = "bill") -> str:
    """The rendered report with a section added: under `key` of the JSON object, before
    the end of the HTML body, or after the text of a table or markdown report."""
    if fmt == "json":
        doc = json.loads(text)
        doc[key] = section if isinstance(section, dict) else json.loads(section)
        return json.dumps(doc, indent=2) + "\n"
    if not isinstance(section, str):
        raise ValueError(f"a {fmt} section is text")
    if fmt == "html":
        end = text.rfind("</body>")
        if end < 0:
            raise ValueError("the HTML report has no body to add a section to")
        return text[:end] + section + text[end:]
    if fmt in ("table", "markdown"):
        return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    raise ValueError(f"no sections in the {fmt} format")

"""The HTML report: one self-contained file. Pure: a `Report` in, the page out.

Inline CSS and inline SVG only (no scripts, fonts, images or URLs, not even an SVG namespace:
inline `<svg>` in HTML needs none), so it opens offline and can be served by a daemon as is.
Every text that comes from data (framework names and run ids come from file paths, messages
and endpoints from files) is escaped.

Tables never hide a column: cells wrap (run ids break anywhere), and below 900 px each row
becomes a card whose cells carry their column's name, instead of a table cut off at the edge.
Estimated values are marked (`≈`, tinted) and unpriced costs say so, with a legend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokensettle.aggregates import Report
from tokensettle.cells import (
    ESTIMATE,
    FW_HEADERS,
    FW_NUMERIC,
    LEGEND_ESTIMATE,
    LEGEND_UNPRICED,
    RUN_HEADERS,
    RUN_NUMERIC,
    STATS_HEADERS,
    STATS_NUMERIC,
    counted_line,
    fmt_when,
    fw_row,
    left_out_lines,
    provenance_items,
    run_row,
    stats_rows,
)
from tokensettle.figures import charts, esc

_CSS = """
:root { color-scheme: light; --ink: #1f2328; --muted: #57606a; --line: #d0d7de;
  --est: #fff4e5; --est-ink: #9a4d00; --bad: #b42318; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  margin: 24px auto; max-width: 1400px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
p.meta, p.note, li.note { color: var(--muted); margin: 4px 0; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.prov dt { font-weight: 600; } dl.prov dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; margin: 8px 0;
  font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 6px; text-align: left;
  vertical-align: top; }
th { font-size: 13px; } td { overflow-wrap: anywhere; }
td.num, th.num { text-align: right; }
td.id { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px;
  word-break: break-all; min-width: 8em; }
td.estimated { background: var(--est); }
.est { color: var(--est-ink); font-weight: 700; }
td.unpriced { color: var(--est-ink); font-style: italic; text-align: right; }
tr.status-error td, tr.status-skipped td { color: var(--bad); }
.verdict-mismatch, .verdict-invalid_local_counts { color: var(--bad); font-weight: 600; }
.verdict-match { color: #1a7f37; }
ul.legend { padding-left: 18px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr));
  gap: 18px; }
figure { margin: 0; min-width: 0; }
svg.chart { width: 100%; max-width: 720px; height: auto; }
@media (max-width: 900px) {
  .charts { grid-template-columns: 1fr; }
  table.cards, table.cards tbody, table.cards tr { display: block; width: 100%; }
  table.cards thead { position: absolute; width: 1px; height: 1px; overflow: hidden;
    clip: rect(0 0 0 0); }
  table.cards tr { border: 1px solid var(--line); border-radius: 6px; margin: 0 0 10px;
    padding: 4px 8px; }
  table.cards td { display: grid; grid-template-columns: minmax(7em, 38%) 1fr; gap: 8px;
    border: 0; padding: 2px 0; text-align: left; }
  table.cards td::before { content: attr(data-label); font-weight: 600; color: var(--muted);
    font-family: system-ui, sans-serif; font-size: 13px; }
}
"""


def _cell(label: str, text: str, css: str) -> str:
    classes = [css] if css else []
    body = esc(text)
    if "num" in classes and text.startswith(ESTIMATE):
        classes.append("estimated")
        body = f'<span class="est" title="estimated">≈</span>{esc(text.removeprefix(ESTIMATE))}'
    if text.startswith("unpriced ("):
        classes.append("unpriced")
    attr = f' class="{esc(" ".join(classes))}"' if classes else ""
    return f'<td data-label="{esc(label)}"{attr}>{body}</td>'


def html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    numeric: frozenset[int],
    classes: Callable[[int, str], str] = lambda i, c: "",
    row_class: Callable[[Sequence[str]], str] = lambda row: "",
) -> str:
    head = "".join(
        f'<th class="num">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>"
        for i, h in enumerate(headers)
    )
    body: list[str] = []
    for row in rows:
        cells = "".join(
            _cell(
                headers[i],
                cell,
                " ".join(c for c in (classes(i, cell), "num") if c)
                if i in numeric
                else classes(i, cell),
            )
            for i, cell in enumerate(row)
        )
        css = row_class(row)
        body.append(f'<tr class="{esc(css)}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return (
        f'<table class="cards"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def render_report_html(report: Report, *, title: str = "tokensettle report") -> str:
    prov = report.provenance
    figures = charts(report)

    def run_classes(i: int, cell: str) -> str:
        if i == 1:
            return "id"
        return f"verdict-{cell}" if i == 9 else ""

    meta = f"{len(report.runs)} runs in {len(report.frameworks)} frameworks"
    if prov.generated_at is not None:
        meta += f" · generated {fmt_when(prov.generated_at)}"
    left = left_out_lines(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">{esc(meta)}</p>',
        "<h2>Provenance</h2>",
        '<dl class="prov">'
        + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in provenance_items(prov))
        + "</dl>",
        '<p class="note">Token counts are the provider\'s (the Usage API) for verified and '
        "ambiguous runs; other runs show “-”. Statuses are those `tokensettle list` "
        "shows.</p>",
        "<h2>Legend</h2>",
        '<ul class="legend">'
        f'<li><span class="est">≈</span> {esc(LEGEND_ESTIMATE.removeprefix("~ "))}</li>'
        f"<li>{esc(LEGEND_UNPRICED)}</li>"
        "<li>(n=k): a framework's figure over k of its n counted runs (the others are listed "
        "under “Left out”)</li></ul>",
        "<h2>Per framework</h2>",
        f'<p class="note">Mean ± sd over the n counted runs. {esc(counted_line(report))}</p>',
        html_table(FW_HEADERS, [fw_row(a) for a in report.frameworks], FW_NUMERIC),
        "<h2>Statistics</h2>",
        '<p class="note">Sample sd (n − 1); 95% CI: Student-t interval of the mean, none for '
        "n &lt; 2.</p>",
        html_table(STATS_HEADERS, stats_rows(report.frameworks), STATS_NUMERIC),
        "<h2>Left out</h2>",
        "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in left) + "</ul>"
        if left
        else '<p class="note">No run was left out.</p>',
        '<h2>Charts</h2><div class="charts">',
        *(f"<figure>{c.svg}</figure>" for c in figures),
        "</div>",
        "<h2>Runs</h2>",
        html_table(
            RUN_HEADERS,
            [run_row(r) for r in report.runs],
            RUN_NUMERIC,
            run_classes,
            lambda row: f"status-{row[2]}",
        ),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"

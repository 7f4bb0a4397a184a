"""Reports for papers: a GitHub Markdown table and a LaTeX booktabs table. Pure: a `Report`
in, text out.

Both give per framework `mean ± sd` over the counted runs, n, and say which runs were left
out and why. The LaTeX table is a `table` float with a `tabular` needing only `booktabs`; its
caption names the token source, the query windows' span, the price table (genai-prices
version and data) and the dates whose prices apply, and the tool version. The run ids counted
and left out are listed in `%` comments above it, so the paper's source records them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from tokensettle.aggregates import METRIC_BY_KEY, FrameworkAggregate, Report
from tokensettle.cells import (
    LEGEND_ESTIMATE,
    LEGEND_UNPRICED,
    counted_line,
    fmt_when,
    left_out_lines,
    metric_cell,
    metric_parts,
    needs_estimate_legend,
    needs_unpriced_legend,
    price_dates,
    provenance_items,
    stats_rows,
    window_span,
)

#: the columns of the papers' table (total tokens and cached share are what papers compare)
TABLE_METRICS = (
    "tokens_in",
    "tokens_out",
    "total_tokens",
    "cached_share",
    "api_calls",
    "cost_usd",
)


# ------------------------------------------------------------------ Markdown


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~])")


def md(text: object) -> str:
    """Text for a Markdown table cell: specials escaped, on one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    head = "| " + " | ".join(headers) + " |"
    rule = "|" + "|".join("--:" if i in right else ":--" for i in range(len(headers))) + "|"
    body = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def render_markdown(report: Report) -> str:
    prov = report.provenance
    statuses = " and ".join(prov.statuses)
    headers = ["Framework", "n", *(METRIC_BY_KEY[k].label for k in TABLE_METRICS)]
    rows = [
        [md(a.framework), str(a.n), *(md(metric_cell(a, k)) for k in TABLE_METRICS)]
        for a in report.frameworks
    ]
    parts = [
        "## Tokens and cost per run, by framework",
        "",
        f"Mean ± sd over the n {statuses} runs of each framework; (n=k): a value over k of "
        "them (the others are listed below).",
        "",
        _md_table(headers, rows, set(range(1, len(headers)))) if rows else "No runs.",
        "",
        "### Statistics",
        "",
        _md_table(
            ["Framework", "Metric", "n", "Mean", "SD", "95% CI", "Median", "Min", "Max"],
            [[md(r[0]), md(r[1]), *r[2:]] for r in stats_rows(report.frameworks)],
            {2, 3, 4, 5, 6, 7, 8},
        )
        if report.frameworks
        else "No runs.",
        "",
        md(counted_line(report)),
        "",
    ]
    left = left_out_lines(report)
    if left:
        parts += ["Left out:", "", *(f"- {md(line)}" for line in left), ""]
    legends = [
        *([LEGEND_ESTIMATE] if needs_estimate_legend(report) else []),
        *([LEGEND_UNPRICED] if needs_unpriced_legend(report) else []),
    ]
    if legends:
        parts += [*(f"- {md(line)}" for line in legends), ""]
    parts += ["Provenance:", ""]
    parts += [f"- {md(label)}: {md(text)}" for label, text in provenance_items(prov)]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ LaTeX

_TEX = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "$": r"\$",
    "&": r"\&",
    "#": r"\#",
    "^": r"\textasciicircum{}",
    "_": r"\_",
    "%": r"\%",
    "~": r"\textasciitilde{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}


def tex(text: object) -> str:
    """Text for LaTeX: specials escaped, on one line, characters pdflatex's default
    encodings cannot typeset replaced by `?`."""
    flat = " ".join(str(text).split())
    return "".join(
        _TEX.get(c, c) if ord(c) < 0x100 and (c.isprintable() or c == " ") else "?" for c in flat
    )


def tex_comment(text: str) -> str:
    """A `%` comment line: one line, no `^^` (TeX reads it as a character code)."""
    flat = " ".join(text.split()).replace("^^", "^ ^")
    return "% " + "".join(c if c.isprintable() else "?" for c in flat)


#: what a LaTeX cell shows per unit of the metric: tokens in thousands, shares in percent
_TEX_SCALE = {"count": 1.0, "share": 100.0, "usd": 1.0}
_TEX_TOKENS = ("tokens_in", "tokens_out", "total_tokens")


def paper_decimals(sd: float | None, mean: float) -> int:
    """Decimals for `mean ± sd` in a paper: the sd to two significant digits and the mean
    to the same place; without a spread, the mean to three significant digits."""
    ref = sd if sd else mean
    digits = 2 if sd else 3
    if not ref:
        return 1
    return min(8, max(0, digits - 1 - math.floor(math.log10(abs(ref)))))


def _tex_value(value: float, places: int) -> str:
    return f"{value:,.{places}f}".replace(",", "{,}")


def _tex_cell(agg: FrameworkAggregate, key: str) -> str:
    cell = metric_parts(agg, key)
    if cell.unpriced:
        return tex(cell.text())
    stat = agg.stats[key]
    if stat.mean is None:
        return "--"
    scale = 1e-3 if key in _TEX_TOKENS else _TEX_SCALE[METRIC_BY_KEY[key].kind]
    mean = stat.mean * scale
    sd = None if stat.sd is None else stat.sd * scale
    places = paper_decimals(sd, mean)
    out = _tex_value(mean, places)
    if sd is not None:
        out += r"\,$\pm$\," + _tex_value(sd, places)
    if cell.estimated:
        out = r"$\approx$" + out
    if cell.n is not None:
        out += rf" ($n{{=}}{cell.n}$)"
    return out


def _caption(report: Report) -> str:
    prov = report.provenance
    statuses = " and ".join(prov.statuses)
    sources = "; ".join(prov.data_sources) or "none"
    span = window_span(prov)
    windows = f", query windows {span}" if span else ""
    dates = price_dates(prov)
    if prov.price_sources and dates:
        prices = f"Prices: {', '.join(prov.price_sources)}, in force at each run's start ({dates})."
    else:
        prices = "Prices: none recorded."
    return " ".join(
        [
            r"Tokens, API calls and cost per run, by framework: mean $\pm$ sd over the $n$",
            tex(f"{statuses} runs. Tokens: {sources}{windows}."),
            tex(prices),
            tex(f"Computed by {prov.tool}."),
        ]
    )


def missing_notes(report: Report) -> tuple[str, str]:
    """Why values are missing, one entry per framework, metric and reason (with how many
    runs): those of cells shown over fewer runs (`(n=k)`), and those of empty cells."""
    partial: dict[str, int] = {}
    none: dict[str, int] = {}
    for a in report.frameworks:
        for key, runs in a.missing.items():
            if not runs:
                continue
            empty = a.stats[key].n == 0
            for x in runs:
                entry = f"{a.framework}: {METRIC_BY_KEY[key].label.lower()} {x.detail}"
                target = none if empty else partial
                target[entry] = target.get(entry, 0) + 1

    def joined(entries: dict[str, int]) -> str:
        return "; ".join(f"{e} ({n} runs)" if n > 1 else e for e, n in entries.items())

    return joined(partial), joined(none)


def _notes(report: Report) -> list[str]:
    notes: list[str] = []
    left = [x for a in report.frameworks for x in a.left_out]
    if left:
        kinds: dict[str, int] = {}
        for x in left:
            kinds[x.reason] = kinds.get(x.reason, 0) + 1
        notes.append(
            "Left out: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + " run(s)."
        )
    partial, none = missing_notes(report)
    if partial:
        notes.append("($n{=}k$): over $k$ of the framework's $n$ runs; " + tex(partial) + ".")
    if none:
        notes.append("--: " + tex(none) + ".")
    if needs_estimate_legend(report) and any(a.estimated_counted for a in report.frameworks):
        notes.append(r"$\approx$: " + tex(LEGEND_ESTIMATE.removeprefix("~ ")) + ".")
    single = [a.framework for a in report.frameworks if a.n == 1]
    if single:
        notes.append(tex(f"n = 1 (no sd): {', '.join(single)}."))
    return notes


def render_latex(report: Report) -> str:
    prov = report.provenance
    header = ["Framework", "$n$", "Input", "Output", "Total", r"(\%)", "calls", "(USD)"]
    lines = [
        tex_comment(
            f"{prov.tool}: report --format latex"
            + (f", generated {fmt_when(prov.generated_at)}" if prov.generated_at else "")
        ),
        r"% needs \usepackage{booktabs}; about 390 pt wide: table* spans both columns of a",
        r"% two-column class (and is a plain table in a one-column one)",
        tex_comment(counted_line(report)),
    ]
    for agg in report.frameworks:
        lines.append(tex_comment(f"counted {agg.framework}: {', '.join(agg.counted) or '-'}"))
    lines += [tex_comment(f"left out {line}") for line in left_out_lines(report)]
    lines += [
        r"\begin{table*}[htbp]",
        r"  \centering\small\setlength{\tabcolsep}{4pt}",
        r"  \caption[Tokens and cost per run, by framework]{" + _caption(report) + "}",
        r"  \label{tab:tokensettle}",
        r"  \begin{tabular}{@{}l" + "r" * (len(header) - 1) + "@{}}",
        r"    \toprule",
        r"    & & \multicolumn{3}{c}{Tokens (thousands)} & Cached & API & Cost \\",
        r"    \cmidrule(lr){3-5}",
        "    " + " & ".join(header) + r" \\",
        r"    \midrule",
    ]
    for agg in report.frameworks:
        cells = [tex(agg.framework), str(agg.n)]
        cells += [_tex_cell(agg, key) for key in TABLE_METRICS]
        lines.append("    " + " & ".join(cells) + r" \\")
    if not report.frameworks:
        lines.append(r"    \multicolumn{" + str(len(header)) + r"}{c}{no runs} \\")
    lines += [r"    \bottomrule", r"  \end{tabular}"]
    notes = _notes(report)
    if notes:
        lines.append(r"  \par\smallskip\footnotesize " + " ".join(notes))
    lines.append(r"\end{table*}")
    return "\n".join(lines) + "\n"

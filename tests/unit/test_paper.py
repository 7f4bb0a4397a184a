"""Markdown and LaTeX tables: content, escaping, and what they say about left-out runs."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from tokensettle.aggregates import build
from tokensettle.paper import md, paper_decimals, render_latex, render_markdown, tex, tex_comment
from tokensettle.report import render
from tokensettle.summary import RunSummary

END = datetime(2025, 10, 19, 10, 41, 18, tzinfo=UTC)


def run(
    framework: str,
    run_id: str,
    tokens: tuple[int, int],
    cost: str | None,
    status: str = "verified",
    **extra: object,
) -> RunSummary:
    return RunSummary(
        framework,
        run_id,
        status,
        tokens_in=tokens[0],
        tokens_out=tokens[1],
        cached_tokens=tokens[0] // 4,
        api_calls=10,
        cost_usd=None if cost is None else Decimal(cost),
        run_end=END,
        verified_at=END + timedelta(minutes=30),
        **extra,  # type: ignore[arg-type]
    )


RUNS = [
    run("baes", "b1", (47_486, 13_028), "0.014181"),
    run("baes", "b2", (53_633, 15_602), "0.016869"),
    run("chatdev", "c1", (40_183, 16_267), "0.015578"),
    run("chatdev", "c2", (48_161, 14_784), "0.015285", "ambiguous", apportioned_tokens=38_000),
    run("ghspec", "g1", (54_590, 12_845), None, unpriced_models=("acme-1",)),
    RunSummary("ghspec", "g2", "pending"),
]


def _rows(latex: str) -> dict[str, list[str]]:
    body = latex[latex.index(r"\midrule") : latex.index(r"\bottomrule")]
    rows = [line.strip().removesuffix(r"\\").strip() for line in body.splitlines()[1:]]
    return {r.split(" & ")[0]: r.split(" & ") for r in rows if r}


def test_latex_is_a_booktabs_table_with_mean_sd_and_n() -> None:
    latex = render_latex(build(RUNS, generated_at=END))
    assert r"\begin{tabular}{@{}lrrrrrrr@{}}" in latex
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){3-5}"):
        assert latex.count(rule) == 1
    rows = _rows(latex)
    # baes: input tokens 47,486 and 53,633 -> mean 50,559.5, sd 4,346.5 -> 50.6 +- 4.3 (k)
    assert rows["baes"][:3] == ["baes", "2", r"50.6\,$\pm$\,4.3"]
    assert rows["baes"][7] == r"0.0155\,$\pm$\,0.0019"
    assert rows["chatdev"][1] == "1"  # the ambiguous run is left out by default
    assert rows["chatdev"][2] == "40.2"  # n = 1: the mean alone, three significant digits
    assert rows["ghspec"][7] == "unpriced (acme-1)"  # never 0
    assert "±" not in latex.split(r"\begin{table*}")[1]  # plain ASCII LaTeX in the table


def test_latex_caption_names_source_prices_and_tool() -> None:
    priced = run(
        "baes",
        "b1",
        (1_000, 100),
        "0.001",
        endpoint="https://api.openai.com/v1/organization/usage/completions",
        price_source="genai-prices 0.2.3 (bundled)",
        priced_at=END - timedelta(hours=1),
        settled_by="tokensettle 0.1.0",
        window=(END - timedelta(hours=1), END + timedelta(minutes=1)),
    )
    latex = render_latex(build([priced], generated_at=END))
    caption = re.search(r"\\caption\[[^]]*\]\{(.*)\}\n", latex)
    assert caption is not None
    text = caption.group(1)
    assert "OpenAI Usage API (api.openai.com/v1/organization/usage/completions)" in text
    assert "query windows 2025-10-19 09:41 UTC to 2025-10-19 10:42 UTC" in text
    assert "genai-prices 0.2.3 (bundled), in force at each run's start (2025-10-19)" in text
    assert "Computed by tokensettle " in text
    assert r"mean $\pm$ sd over the $n$ verified runs" in text


def test_latex_says_which_runs_were_counted_and_left_out() -> None:
    latex = render_latex(build(RUNS, generated_at=END))
    assert "% counted baes: b1, b2" in latex
    assert "% left out chatdev / c2: ambiguous" in latex
    assert "% left out ghspec / g2: unsettled (pending)" in latex
    assert "% left out ghspec / g1: not in cost (usd): unpriced: acme-1" in latex
    assert "Left out: 1 ambiguous, 1 unsettled run(s)." in latex
    with_ambiguous = render_latex(build(RUNS, include_ambiguous=True))
    assert _rows(with_ambiguous)["chatdev"][1] == "2"
    assert _rows(with_ambiguous)["chatdev"][2].startswith(r"$\approx$")  # an estimate inside


def test_latex_escapes_names_and_keeps_comments_on_one_line() -> None:
    hostile = run("a_b&c%$#{}~^\\", "x\n\\input{/etc/passwd}", (10, 1), "0.1")
    latex = render_latex(build([hostile]))
    assert r"a\_b\&c\%\$\#\{\}\textasciitilde{}\textasciicircum{}\textbackslash{}" in latex
    for line in latex.splitlines():
        if "passwd" in line:
            assert line.startswith("%")  # the id only ever sits inside a comment
    assert tex("naïve ∑") == "naïve ?"
    assert tex_comment("a\nb^^Mc") == "% a b^ ^Mc"


@pytest.mark.parametrize(
    ("sd", "mean", "places"),
    [
        (4.3465, 50.5595, 1),
        (0.97, 53.9, 2),
        (13.5, 36.7, 0),
        (0.0019, 0.0155, 4),
        (None, 40.183, 1),
    ],
)
def test_paper_rounding_gives_the_sd_two_significant_digits(
    sd: float | None, mean: float, places: int
) -> None:
    assert paper_decimals(sd, mean) == places


def test_markdown_is_a_github_table_with_the_statistics() -> None:
    text = render_markdown(build(RUNS, generated_at=END))
    lines = text.splitlines()
    head = lines.index(
        "| Framework | n | Input tokens | Output tokens | Total tokens | Cached share | "
        "API calls | Cost (USD) |"
    )
    assert lines[head + 1] == "|:--|--:|--:|--:|--:|--:|--:|--:|"
    assert lines[head + 2].startswith("| baes | 2 | 50,560 ± 4,347 | ")
    assert "| ghspec | 1 | " in text
    assert "unpriced (acme-1)" in text
    assert "| baes | Input tokens | 2 | 50,560 | 4,347 | [11,507, 89,612] |" in text
    assert "- chatdev / c2: ambiguous" in text
    assert "- statuses counted: verified" in text


def test_markdown_escapes_what_would_break_a_table_or_render_as_markup() -> None:
    text = render_markdown(build([run("a|b<script>*x*", "r", (1, 1), "0.1")]))
    assert r"a\|b\<script\>\*x\*" in text
    assert "<script>" not in text
    assert md("a\nb|c") == r"a b\|c"


def test_dispatch_knows_the_paper_formats() -> None:
    assert render(RUNS, "markdown", generated_at=END) == render_markdown(
        build(RUNS, generated_at=END)
    )
    assert render(RUNS, "latex", generated_at=END) == render_latex(build(RUNS, generated_at=END))


def test_a_metric_no_run_has_is_one_note_per_reason_not_a_partial_one() -> None:
    """Anthropic counts no requests: the API calls cell is empty, and the note said
    '(n=k): ...; claudebench: api calls no api calls recorded' once per run."""
    claude = [
        replace(
            run("claude", f"k{i}", (10_000 + i, 900), "0.01"), api_calls=None, provider="anthropic"
        )
        for i in range(2)
    ]
    latex = render_latex(build([*RUNS[:2], *claude]))
    notes = latex.split(r"\footnotesize", 1)[1]
    assert "--: claude: api calls not counted by anthropic (2 runs)." in notes, notes
    assert "($n{=}k$)" not in notes, notes

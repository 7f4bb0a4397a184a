"""Report: aggregates, reading metrics.json, and the four renderings."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.aggregates import METRICS, data_source
from tokensettle.breakdown import build_breakdown
from tokensettle.cells import run_row
from tokensettle.compare import compare, local_counts
from tokensettle.pricing import price_models
from tokensettle.report import (
    CSV_HEADER,
    RunSummary,
    aggregate,
    fmt_duration,
    nice_ticks,
    render,
    render_csv,
    render_html,
    render_json,
    render_table,
    summary_from_document,
    summary_of_file,
)
from tokensettle.runfile import BLOCK
from tokensettle.usage import Usage

END = datetime(2025, 10, 19, 10, 41, 18, tzinfo=UTC)
CHARTS = tuple(f"chart-{m}" for m in (*(m.key for m in METRICS), "time_to_verify"))
BAES_FILE = "runs__baes__6f0b2490-1548-4b4f-a943-a688ec972355__metrics@427bd02.json"
PENDING_FILE = "runs__ghspec__a1b3972f-f772-4a7c-956e-1828a8db7a7d__metrics@342cda3.json"


def run(
    framework: str = "baes",
    run_id: str = "r1",
    status: str = "verified",
    *,
    tokens: tuple[int, int] | None = (1_000, 100),
    cached: int | None = 200,
    calls: int | None = 3,
    cost: str | None = "0.001",
    complete: bool = True,
    verify_minutes: float | None = 30,
    verdict: str | None = None,
    models: tuple[str, ...] = ("gpt-4o-mini-2024-07-18",),
) -> RunSummary:
    return RunSummary(
        framework=framework,
        run_id=run_id,
        status=status,
        tokens_in=tokens[0] if tokens else None,
        tokens_out=tokens[1] if tokens else None,
        cached_tokens=cached,
        api_calls=calls,
        cost_usd=Decimal(cost) if cost is not None else None,
        cost_complete=complete,
        run_end=END,
        verified_at=END + timedelta(minutes=verify_minutes) if verify_minutes is not None else None,
        local_vs_provider=verdict,
        models=models,
    )


RUNS = [
    run("baes", "b1", verify_minutes=10, verdict="match"),
    run("baes", "b2", tokens=(3_000, 300), cached=0, cost="0.002", verify_minutes=20),
    run(
        "baes",
        "b3",
        "pending",
        tokens=None,
        cached=None,
        calls=None,
        cost=None,
        verify_minutes=None,
    ),
    run("chatdev", "c1", tokens=(200_000, 70_000), cached=20_000, cost="0.05", verify_minutes=60),
    run(
        "chatdev",
        "c2",
        "ambiguous",
        cost="0.9",
        complete=False,
        verify_minutes=120,
        verdict="mismatch",
    ),
]


# ------------------------------------------------------------------ aggregates


def test_aggregate_per_framework() -> None:
    baes, chatdev = aggregate(RUNS)
    assert baes.framework == "baes"
    assert baes.runs == 3
    assert baes.by_status == {"pending": 1, "verified": 2}
    assert (baes.tokens_in, baes.tokens_out, baes.api_calls) == (4_000, 400, 6)
    assert baes.cached_tokens == 200
    assert baes.cached_share == pytest.approx(200 / 4_000)
    assert baes.cost_usd == Decimal("0.003")
    assert (baes.cost_runs, baes.cost_incomplete) == (2, 0)
    assert baes.median_time_to_verify == timedelta(minutes=15)  # median of 10 and 20
    assert baes.verdicts == {"match": 1}
    assert chatdev.cost_usd == Decimal("0.05")  # the incomplete run's partial cost is left out
    assert (chatdev.cost_runs, chatdev.cost_incomplete) == (1, 1)
    assert chatdev.median_time_to_verify == timedelta(minutes=90)


def test_cached_share_only_over_runs_that_report_cached_tokens() -> None:
    (agg,) = aggregate([run(tokens=(1_000, 0), cached=500), run(tokens=(9_000, 0), cached=None)])
    assert agg.tokens_in == 10_000
    assert agg.cached_share == 0.5


def test_cost_sums_are_exact_decimals() -> None:
    (agg,) = aggregate([run(cost="0.1") for _ in range(3)])
    assert agg.cost_usd == Decimal("0.3")  # 0.1 + 0.1 + 0.1 != 0.3 in floats


# ------------------------------------------------------------------ reading metrics.json


def test_summary_of_a_seed_verified_file(fixtures_dir: Path) -> None:
    doc = json.loads((fixtures_dir / BAES_FILE).read_text())
    summary = summary_from_document(doc, "baes")
    assert summary.run_id == "6f0b2490-1548-4b4f-a943-a688ec972355"
    assert summary.status == "verified"
    assert (summary.tokens_in, summary.tokens_out) == (20_150, 5_335)
    assert (summary.cached_tokens, summary.api_calls) == (9_728, 12)
    assert summary.cost_usd is None  # the seed's 0.0 is not a cost
    assert summary.run_end == datetime(2025, 10, 19, 10, 41, 18, 574_869, tzinfo=UTC)
    assert summary.verified_at == datetime(2025, 10, 19, 14, 24, 50, 650_916, tzinfo=UTC)
    assert summary.time_to_verify == summary.verified_at - summary.run_end
    assert summary.models == ("gpt-4o-mini",)  # the configured model: no usage models recorded


def test_summary_of_a_pending_file_carries_no_tokens(fixtures_dir: Path) -> None:
    doc = json.loads((fixtures_dir / PENDING_FILE).read_text())
    summary = summary_from_document(doc, "ghspec")
    assert summary.status == "pending"
    assert summary.tokens_in is None
    assert summary.total_tokens is None
    assert summary.run_end is not None  # from the steps' integer timestamps
    assert summary.time_to_verify is None


def test_summary_reads_our_block_with_cost_breakdown_and_verdict() -> None:
    snapshot = "gpt-4o-mini-2024-07-18"
    usage = Usage(20_150, 5_335, 12, input_cached_tokens=9_728)
    cost = price_models({snapshot: usage}, END)
    comparison = compare(local_counts({"TOK_IN": 20_000, "TOK_OUT": 5_300}), usage, cost.total_usd)
    doc: dict[str, Any] = {
        "run_id": "ours-1",
        "model": "gpt-4o-mini",
        "end_timestamp": END.isoformat(),
        "aggregate_metrics": {"TOK_IN": 20_150},
        "usage_api_reconciliation": {
            "verification_status": "verified",
            "verified_at": (END + timedelta(minutes=42)).isoformat(),
            "total_tokens_in": 20_150,
            "total_tokens_out": 5_335,
            "total_api_calls": 12,
            "total_cached_tokens": 9_728,
            "cost": cost.to_json(),
            "token_breakdown": build_breakdown(usage, {snapshot: usage}).to_json(),
            "local_vs_provider": comparison.to_json(),
        },
    }
    doc = json.loads(json.dumps(doc))  # exactly what a file would hold
    summary = summary_from_document(doc, "baes")
    assert summary.cost_usd == Decimal("0.0054939") == cost.total_usd
    assert summary.cost_complete
    assert summary.local_vs_provider == "match"
    assert summary.models == (snapshot,)
    assert summary.cached_tokens == 9_728
    assert summary.time_to_verify == timedelta(minutes=42)


def test_a_claude_run_has_no_api_call_count_rather_than_the_files_zero() -> None:
    """Anthropic counts no requests: the file's API_CALLS (the framework's 0) is not shown
    as the provider's count, so statistics leave the run out of API calls."""
    block = {
        "verification_status": "verified",
        "total_tokens_in": 3_200,
        "total_tokens_out": 500,
        "total_api_calls": None,
        "provenance": {"provider": "anthropic"},
    }
    doc = {"aggregate_metrics": {"TOK_IN": 3_200, "API_CALLS": 0}, BLOCK: block}
    summary = summary_from_document(doc, "claudebench", run_id="c-1")
    assert summary.tokens_in == 3_200 and summary.api_calls is None
    openai = summary_from_document(
        {BLOCK: {**block, "total_api_calls": 4, "provenance": {"provider": "openai"}}}, "baes"
    )
    assert openai.api_calls == 4


def test_incomplete_cost_is_read_as_such() -> None:
    cost = price_models({"acme-1": Usage(10, 1, 1)}, END).to_json()
    doc = {"usage_api_reconciliation": {"verification_status": "verified", "cost": cost}}
    summary = summary_from_document(doc, "x", run_id="dir-name")
    assert summary.run_id == "dir-name"
    assert summary.cost_usd == 0
    assert summary.cost_complete is False


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"usage_api_reconciliation": "not an object"},
        {"usage_api_reconciliation": {"verification_status": "verified", "attempts": "x"}},
        {
            "end_timestamp": "yesterday",
            "steps": [None, {"end_timestamp": True}],
            "usage_api_reconciliation": {
                "verification_status": "verified",
                "total_tokens_in": -3,
                "total_tokens_out": "5",
                "verified_at": 12,
                "cost": {"total_usd": "NaN", "total_usd_exact": None},
                "local_vs_provider": ["match"],
                "token_breakdown": {"models": "gpt"},
            },
            "aggregate_metrics": [],
        },
    ],
)
def test_summary_never_raises_on_odd_documents(doc: dict[str, Any]) -> None:
    summary = summary_from_document(doc, "fw")
    assert summary.framework == "fw"
    assert summary.tokens_in is None
    assert summary.cost_usd is None
    assert summary.local_vs_provider is None


# ------------------------------------------------------------------ renderings


def test_table_shows_framework_means_statistics_and_runs() -> None:
    text = render_table(RUNS)
    assert text.startswith("Frameworks (mean ± sd over the n counted runs)\n")
    assert "\nStatistics\n" in text
    assert "\nRuns\n" in text
    baes_line = next(
        line for line in text.splitlines() if line.startswith("baes ") and "verified," in line
    )
    # means over the 2 verified runs, not the sums a framework with more runs would win
    assert "2,000 ± 1,414" in baes_line
    assert "4,000" not in baes_line
    assert "0.001500 ± 0.000707" in baes_line
    assert "15m00s" in baes_line
    pending = next(line for line in text.splitlines() if " b3 " in line)
    assert pending.split()[3] == "-"
    assert "unpriced (model not recorded)" in text  # c2's partial cost is not a cost
    assert "0.900000" not in text
    assert "baes / b3: unsettled (pending)" in text
    assert "chatdev / c2: ambiguous" in text
    assert "statuses counted: verified" in text
    assert render_table([]) == "no runs"


def test_csv_has_a_stable_header_and_round_trips() -> None:
    tricky = run('fw,"quoted"', "id\nwith newline", cost="0.0054939", models=("a", "b"))
    text = render_csv([*RUNS, tricky])
    assert text.splitlines()[0] == ",".join(CSV_HEADER)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(RUNS) + 1
    by_id = {r["run_id"]: r for r in rows}
    assert by_id["id\nwith newline"]["framework"] == 'fw,"quoted"'
    assert by_id["id\nwith newline"]["cost_usd"] == "0.0054939"
    assert by_id["id\nwith newline"]["models"] == "a;b"
    assert by_id["b3"]["tokens_in"] == ""
    assert by_id["b1"]["time_to_verify_s"] == "600.0"
    assert by_id["c2"]["cost_complete"] == "false"


def test_json_rendering() -> None:
    doc = json.loads(render_json(RUNS, generated_at=END))
    assert doc["generated_at"] == END.isoformat()
    assert [f["framework"] for f in doc["frameworks"]] == ["baes", "chatdev"]
    assert doc["frameworks"][0]["median_time_to_verify_s"] == 900.0
    assert doc["frameworks"][0]["cost_usd"] == 0.003
    assert len(doc["runs"]) == len(RUNS)
    assert doc["runs"][0]["run_id"] == "b1"


def test_html_is_self_contained_and_escaped() -> None:
    evil = run('<script>alert("x")</script>', 'id"><img src=x onerror=alert(1)>', verdict="<b>")
    page = render_html([*RUNS, evil], generated_at=END)
    assert page.startswith("<!DOCTYPE html>")
    for chart in CHARTS:
        assert f'<svg id="{chart}"' in page
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert not re.search(r"https?://", page)
    assert "url(" not in page
    assert "@import" not in page
    tags = _tags(page)
    names = {name for name, _ in tags}
    assert names.isdisjoint({"script", "img", "link", "iframe", "object", "embed", "image", "use"})
    attributes = {attr for _, attrs in tags for attr in attrs}
    assert attributes.isdisjoint({"src", "href", "xlink:href", "srcset", "action"})
    assert not any(a.startswith("on") for a in attributes)


class _TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, set[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {name for name, _ in attrs}))


def _tags(page: str) -> list[tuple[str, set[str]]]:
    """Every element the browser will build, with its attribute names."""
    collector = _TagCollector()
    collector.feed(page)
    collector.close()
    return collector.tags


def test_html_of_nothing_still_renders() -> None:
    page = render_html([])
    assert page.count("no data") == len(CHARTS)
    assert "0 runs in 0 frameworks" in page


def test_render_dispatch() -> None:
    assert render(RUNS, "csv") == render_csv(RUNS)
    assert render(RUNS, "table") == render_table(RUNS)
    assert json.loads(render(RUNS, "json"))["runs"]
    assert render(RUNS, "html").startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError, match="unknown report format"):
        render(RUNS, "xml")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (90, "1m30s"), (3_600, "1h00m"), (90_000, "1d01h"), (-120, "-2m00s")],
)
def test_fmt_duration(seconds: int, text: str) -> None:
    assert fmt_duration(timedelta(seconds=seconds)) == text


@settings(max_examples=300)
@given(st.floats(min_value=1e-6, max_value=1e12, allow_nan=False))
def test_nice_ticks_cover_the_data_in_few_round_steps(top: float) -> None:
    ticks = nice_ticks(top)
    assert ticks[0] == 0
    assert ticks[-1] >= top
    assert 2 <= len(ticks) <= 12
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) <= 2  # equal steps (up to float noise in the last digit)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.builds(
            run,
            framework=st.sampled_from(["baes", "chatdev", "<g&h>"]),
            run_id=st.text(min_size=1, max_size=12)
            | st.text(alphabet="xyz", max_size=5).map(lambda t: f"<b{t}>"),
            tokens=st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)) | st.none(),
            verify_minutes=st.floats(-10, 5_000) | st.none(),
        ),
        max_size=12,
    )
)
def test_html_never_leaks_markup_from_data(runs: list[RunSummary]) -> None:
    page = render_html(runs)
    assert "<g&h>" not in page
    assert page.count("<svg ") == len(CHARTS)
    assert page.count("</svg>") == len(CHARTS)
    for r in runs:
        if r.run_id.startswith("<b"):  # a tag-shaped id must appear escaped only
            assert r.run_id not in page
    assert {name for name, _ in _tags(page)} <= _ALLOWED_TAGS


_ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "div", "table",
    "thead", "tbody", "tr", "th", "td", "figure", "svg", "line", "text", "desc",
    "rect", "circle", "dl", "dt", "dd", "ul", "li", "span",
}  # fmt: skip


def test_cost_chart_draws_no_point_for_a_framework_without_any_priced_run() -> None:
    runs = [
        RunSummary("alpha", "a", "verified", 100, 10, cost_usd=Decimal("0.5")),
        RunSummary("omega", "b", "verified", 100, 10),
    ]
    page = render_html(runs)
    cost_chart = page[page.index('id="chart-cost_usd"') :]
    cost_chart = cost_chart[: cost_chart.index("</svg>")]
    assert "alpha" in cost_chart
    assert cost_chart.count("<circle") == 2 + 1  # the legend's two, alpha's run
    assert "n=0" in cost_chart  # omega's lane is empty: an unknown cost is never drawn as $0


# ------------------------------------------------------------------ statistics in the report


def test_json_stats_match_a_hand_computation() -> None:
    doc = json.loads(render_json(RUNS, generated_at=END))
    baes = doc["frameworks"][0]
    # today's fields stay
    assert (baes["tokens_in"], baes["runs"], baes["cost_usd"]) == (4_000, 3, 0.003)
    # verified runs b1 (1000 in, 100 out, 200 cached, 0.001 USD) and b2 (3000, 300, 0, 0.002)
    stats = baes["stats"]
    assert set(stats) == {
        "tokens_in",
        "tokens_out",
        "total_tokens",
        "cached_tokens",
        "cached_share",
        "api_calls",
        "cost_usd",
    }
    sd = 1000 * 2**0.5
    t1 = 12.706205
    assert stats["tokens_in"] == {
        "n": 2,
        "mean": 2000,
        "median": 2000,
        "sd": pytest.approx(sd),
        "ci95": [pytest.approx(2000 - t1 * 1000), pytest.approx(2000 + t1 * 1000)],
        "min": 1000,
        "max": 3000,
    }
    assert stats["total_tokens"]["mean"] == 2200  # (1100 + 3300) / 2
    assert stats["cached_share"]["mean"] == pytest.approx(0.1)  # (0.2 + 0.0) / 2, per run
    assert stats["api_calls"]["sd"] == 0
    assert stats["api_calls"]["ci95"] == [3, 3]
    assert stats["cost_usd"]["mean"] == pytest.approx(0.0015)
    assert stats["cost_usd"]["sd"] == pytest.approx(0.001 / 2**0.5)
    assert baes["counted"]["statuses"] == ["verified"]
    assert baes["counted"]["runs"] == ["b1", "b2"]
    assert baes["counted"]["left_out"] == [
        {
            "run_id": "b3",
            "status": "pending",
            "reason": "unsettled",
            "detail": "unsettled (pending)",
        }
    ]
    chatdev = doc["frameworks"][1]
    assert chatdev["stats"]["tokens_in"]["n"] == 1  # c2 is ambiguous: left out by default
    assert chatdev["stats"]["tokens_in"]["sd"] is None
    assert chatdev["stats"]["tokens_in"]["ci95"] is None
    assert [x["reason"] for x in chatdev["counted"]["left_out"]] == ["ambiguous"]
    assert doc["provenance"]["statuses_counted"] == ["verified"]
    assert doc["provenance"]["left_out"] == {"ambiguous": 1, "unsettled": 1}


def test_include_ambiguous_counts_ambiguous_runs_and_says_they_are_estimates() -> None:
    doc = json.loads(render_json(RUNS, include_ambiguous=True))
    chatdev = doc["frameworks"][1]
    assert chatdev["counted"]["statuses"] == ["verified", "ambiguous"]
    assert chatdev["counted"]["runs"] == ["c1", "c2"]
    assert chatdev["stats"]["tokens_in"]["n"] == 2
    assert chatdev["stats"]["tokens_in"]["mean"] == (200_000 + 1_000) / 2
    # c2's cost is incomplete: the cost statistics leave it out, with the reason
    assert chatdev["stats"]["cost_usd"]["n"] == 1
    assert chatdev["counted"]["missing"]["cost_usd"][0]["reason"] == "unpriced"
    assert chatdev["estimated"]["counted_runs_estimated"] == 1
    table = render_table(RUNS, include_ambiguous=True)
    line = next(x for x in table.splitlines() if x.startswith("chatdev ") and "ambiguous," in x)
    assert "~100,500 ± " in line  # the mean includes an estimate
    assert "(n=1)" in line  # the cost is over one of the two runs


def test_cost_statistics_use_only_complete_costs() -> None:
    runs = [
        run(run_id="a", cost="0.002"),
        run(run_id="b", cost="0.004"),
        run(run_id="c", cost="0.5", complete=False),
        run(run_id="d", cost=None),
    ]
    (agg,) = aggregate(runs)
    cost = agg.stats["cost_usd"]
    assert (cost.n, cost.mean) == (2, pytest.approx(0.003))
    assert agg.stats["tokens_in"].n == 4
    assert [(x.run_id, x.reason) for x in agg.missing["cost_usd"]] == [
        ("c", "unpriced"),
        ("d", "no cost"),
    ]


# ------------------------------------------------------------------ unpriced is not zero


def _unpriced_run(framework: str = "baes", run_id: str = "u1") -> RunSummary:
    cost = price_models({"acme-1": Usage(1_000, 100, 2)}, END).to_json()
    doc = {
        "run_id": run_id,
        "usage_api_reconciliation": {
            "verification_status": "verified",
            "total_tokens_in": 1_000,
            "total_tokens_out": 100,
            "total_api_calls": 2,
            "cost": cost,
        },
    }
    return summary_from_document(json.loads(json.dumps(doc)), framework)


def test_an_unpriced_run_says_unpriced_with_its_model_and_never_zero() -> None:
    runs = [_unpriced_run(), run("baes", "p1", cost="0.25")]
    for fmt in ("table", "csv", "json", "html"):
        text = render(runs, fmt)  # type: ignore[arg-type]
        assert "0.000000" not in text, fmt
    table = render(runs, "table")
    u1 = next(line for line in table.splitlines() if " u1 " in line)
    assert "unpriced (acme-1)" in u1
    assert "unpriced (acme-1)" in render(runs, "html")
    doc = json.loads(render(runs, "json"))
    (u1_json,) = [r for r in doc["runs"] if r["run_id"] == "u1"]
    assert u1_json["cost_usd"] is None
    assert u1_json["cost_status"] == "unpriced"
    assert u1_json["unpriced_models"] == ["acme-1"]
    rows = {r["run_id"]: r for r in csv.DictReader(io.StringIO(render(runs, "csv")))}
    assert rows["u1"]["cost_usd"] == ""
    assert rows["u1"]["cost_status"] == "unpriced"
    assert rows["u1"]["unpriced_models"] == "acme-1"
    assert rows["p1"]["cost_usd"] == "0.25"


def test_a_framework_with_no_priced_run_reads_unpriced() -> None:
    (agg,) = aggregate([_unpriced_run("x", "u1"), _unpriced_run("x", "u2")])
    assert agg.stats["cost_usd"].n == 0
    text = render_table([_unpriced_run("x", "u1")])
    line = next(x for x in text.splitlines() if x.startswith("x "))
    assert "unpriced (acme-1)" in line
    assert "0.000000" not in text


# ------------------------------------------------------------------ statuses as `list` shows them


def _file(doc: dict[str, Any] | str, tmp_path: Path) -> tuple[bytes, Path]:
    raw = doc.encode() if isinstance(doc, str) else json.dumps(doc, indent=2).encode()
    return raw, tmp_path / "baes" / "r1" / "metrics.json"


def _window(**block: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "run_id": "r1",
        "start_timestamp": (END - timedelta(minutes=20)).isoformat(),
        "end_timestamp": END.isoformat(),
    }
    if block:
        doc["usage_api_reconciliation"] = block
    return doc


@pytest.mark.parametrize(
    ("doc", "status"),
    [
        ("{not json", "error"),
        ({"run_id": "r1"}, "error"),  # JSON, but no window: `list` says error, not pending
        (_window(), "pending"),
        (_window(verification_status="bogus"), "pending"),  # `list` reads unknown as pending
        (_window(verification_status="warning"), "warning"),
        (_window(verification_status="verified"), "verified"),
    ],
)
def test_summary_of_file_has_the_status_list_shows(
    doc: dict[str, Any] | str, status: str, tmp_path: Path
) -> None:
    raw, path = _file(doc, tmp_path)
    summary = summary_of_file(raw, path, "baes", grace=60, now=END, max_age=timedelta(hours=24))
    assert summary.status == status
    assert summary.run_id == "r1"
    if status == "error":
        assert summary.message


def test_an_unsettled_run_past_max_age_is_too_old_and_a_settled_one_stays(
    tmp_path: Path,
) -> None:
    later = END + timedelta(hours=25)
    for block, status in (({}, "too_old"), ({"verification_status": "verified"}, "verified")):
        raw, path = _file(_window(**block), tmp_path)
        got = summary_of_file(raw, path, "baes", grace=60, now=later, max_age=timedelta(hours=24))
        assert got.status == status


def test_apportioned_tokens_of_a_verified_run_are_marked_estimated(tmp_path: Path) -> None:
    block = {
        "verification_status": "verified",
        "total_tokens_in": 1_000,
        "total_tokens_out": 100,
        "attribution": {"apportioned": {"input_tokens": 8, "output_tokens": 1}},
    }
    raw, path = _file(_window(**block), tmp_path)
    summary = summary_of_file(raw, path, "baes", grace=60)
    assert summary.apportioned_tokens == 9
    assert summary.estimated
    # the query window: whole minutes, plus the grace minute
    assert summary.window == (
        datetime(2025, 10, 19, 10, 21, tzinfo=UTC),
        datetime(2025, 10, 19, 10, 43, tzinfo=UTC),
    )
    text = render_table([summary])
    assert "~1,000" in text
    assert "~ estimated" in text
    page = render_html([summary])
    assert '<span class="est" title="estimated">≈</span>1,000' in page


def test_every_figure_of_an_ambiguous_run_is_marked_as_an_estimate() -> None:
    """Its cached share and API calls are split with its tokens: they were shown bare."""
    row = run_row(run(status="ambiguous", tokens=(1_000, 100), cached=250, calls=4))
    assert row[3:7] == ["~1,000", "~100", "~25.0%", "~4"], row
    exact = run_row(run(status="verified", tokens=(1_000, 100), cached=250, calls=4))
    assert exact[3:7] == ["1,000", "100", "25.0%", "4"], exact


# ------------------------------------------------------------------ provenance


def test_provenance_names_the_source_prices_and_windows() -> None:
    snapshot = "gpt-4o-mini-2024-07-18"
    usage = Usage(20_150, 5_335, 12)
    start = END - timedelta(hours=2)
    doc = {
        "run_id": "p",
        "usage_api_reconciliation": {
            "verification_status": "verified",
            "total_tokens_in": 20_150,
            "total_tokens_out": 5_335,
            "cost": price_models({snapshot: usage}, start).to_json(),
            "provenance": {
                "tool": "tokensettle",
                "version": "0.1.0",
                "endpoint": "https://api.openai.com/v1/organization/usage/completions",
            },
            "attempts": [
                {
                    "timestamp": END.isoformat(),
                    "total_tokens_in": 20_150,
                    "query_window": {"start": start.timestamp(), "end": END.timestamp()},
                }
            ],
        },
    }
    summary = summary_from_document(doc, "baes")
    prov = json.loads(render_json([summary], generated_at=END))["provenance"]
    assert prov["data_sources"] == [
        "OpenAI Usage API (api.openai.com/v1/organization/usage/completions)"
    ]
    assert prov["settled_by"] == ["tokensettle 0.1.0"]
    assert prov["price_sources"][0].startswith("genai-prices ")
    assert prov["prices_as_of"] == ["2025-10-19", "2025-10-19"]
    assert prov["query_windows"] == [start.isoformat(), END.isoformat()]
    assert prov["tool"].startswith("tokensettle ")
    page = render_html([summary], generated_at=END)
    assert "api.openai.com/v1/organization/usage/completions" in page
    assert "https:" not in page  # shown without a scheme: the page holds no URL


def test_hostile_text_from_files_is_escaped_everywhere_in_the_page() -> None:
    evil = "<img src=x onerror=alert(1)>"
    runs = [
        RunSummary("baes", evil, "error", message=evil),
        RunSummary(
            evil,
            "r2",
            "verified",
            1,
            1,
            cost_usd=Decimal(0),
            cost_complete=False,
            unpriced_models=(evil,),
            endpoint=f"http://{evil}/v1",
            price_source=evil,
        ),
    ]
    page = render_html(runs, include_ambiguous=True)
    assert evil not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert {name for name, _ in _tags(page)} <= _ALLOWED_TAGS
    attributes = {attr for _, attrs in _tags(page) for attr in attrs}
    assert not any(a.startswith("on") for a in attributes)


def test_each_providers_report_is_named_as_the_data_source() -> None:
    anthropic = "https://api.anthropic.com/v1/organizations/usage_report/messages"
    assert data_source(anthropic) == (
        "Anthropic usage report (api.anthropic.com/v1/organizations/usage_report/messages)"
    )
    assert data_source("https://api.openai.com/v1/organization/usage/completions").startswith(
        "OpenAI Usage API (api.openai.com"
    )
    local = data_source("http://127.0.0.1:8787/v1/organizations/usage_report/messages")
    assert local.endswith("(not api.anthropic.com)") and local.startswith("Anthropic")

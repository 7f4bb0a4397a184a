"""The bill check's comparison, by hand-computed numbers.

Prices (genai-prices 0.2.3, USD per million tokens, in force in November 2026):
gpt-4o-mini 0.15 input / 0.075 cached / 0.60 output, batch 0.075 / (0.075) / 0.30;
gpt-5-mini flex 0.125 / 0.0125 / 1.00; gpt-4o 2.50 / 1.25 / 10.00.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from tokensettle.bill import (
    DAY,
    BillCheck,
    BillUnavailable,
    CostLine,
    DailyUsage,
    compare,
    line_item_model,
    render_json,
    render_table,
    report_section,
    section_json,
)
from tokensettle.usage import Usage

D1 = date(2026, 11, 2)
T1 = int(datetime(2026, 11, 2, tzinfo=UTC).timestamp())
T2 = T1 + DAY
MINI = "gpt-4o-mini-2024-07-18"
G5MINI = "gpt-5-mini-2025-08-07"
G4O = "gpt-4o-2024-08-06"
P = "proj_a"


def usage(
    model: str | None,
    tin: int,
    tout: int,
    *,
    day: int = T1,
    project: str | None = P,
    tier: str | None = "default",
    batch: bool | None = False,
    cached: int | None = None,
) -> DailyUsage:
    return DailyUsage(
        day, project, model, tier, batch, Usage(tin, tout, 3, input_cached_tokens=cached)
    )


def cost(item: str | None, amount: str, *, day: int = T1, project: str | None = P) -> CostLine:
    return CostLine(day, project, item, Decimal(amount))


def check(
    costs: list[CostLine], rows: list[DailyUsage], *, tolerance: float = 0.02, days: int = 1
) -> BillCheck:
    end = date.fromordinal(D1.toordinal() + days)
    return compare(costs, rows, start=D1, end=end, tolerance=tolerance)


def test_exact_prices_pass() -> None:
    # 2M input * 0.15 = 0.30; 1M output * 0.60 = 0.60
    result = check(
        [cost(f"{MINI}, input", "0.30"), cost(f"{MINI}, output", "0.60")],
        [usage(MINI, 2_000_000, 1_000_000)],
    )
    (day,) = result.days
    assert day.billed_usd == Decimal("0.90")
    assert day.priced_usd == Decimal("0.90")
    assert day.diff_usd == 0 and day.diff_pct == 0
    assert day.verdict == "ok" and result.verdict == "ok" and result.passed


def test_a_ten_percent_price_error_is_a_mismatch() -> None:
    result = check(
        [cost(f"{MINI}, input", "0.33"), cost(f"{MINI}, output", "0.66")],
        [usage(MINI, 2_000_000, 1_000_000)],
    )
    (day,) = result.days
    assert day.diff_usd == Decimal("-0.09")  # priced 0.90 - billed 0.99
    assert day.diff_pct is not None
    assert round(day.diff_pct, 4) == Decimal("-9.0909")
    assert day.verdict == "mismatch" and result.verdict == "mismatch" and not result.passed
    text = render_table(result)
    assert "-9.09%" in text and "mismatch" in text


@pytest.mark.parametrize(
    ("billed", "verdict"),
    [
        ("0.918", "ok"),  # priced 0.90: diff -0.018 <= 2% of 0.918 (0.01836)
        ("0.919", "mismatch"),  # diff -0.019 > 2% of 0.919 (0.01838)
        ("0.8825", "ok"),  # diff +0.0175 <= 2% of 0.8825 (0.01765)
        ("0.882", "mismatch"),  # diff +0.018 > 2% of 0.882 (0.01764): of the bill, not ours
    ],
)
def test_tolerance_is_a_fraction_of_the_billed_amount(billed: str, verdict: str) -> None:
    result = check([cost(f"{MINI}, input", billed)], [usage(MINI, 6_000_000, 0)])  # 0.90
    assert result.days[0].priced_usd == Decimal("0.90")
    assert result.days[0].verdict == verdict


def test_the_tolerance_setting_moves_the_line() -> None:
    costs = [cost(f"{MINI}, input", "0.95")]  # priced 0.90: -5.26%
    assert check(costs, [usage(MINI, 6_000_000, 0)], tolerance=0.02).verdict == "mismatch"
    assert check(costs, [usage(MINI, 6_000_000, 0)], tolerance=0.06).verdict == "ok"


def test_differences_under_a_cent_always_pass() -> None:
    # 20,000 input tokens * 0.15 = 0.003, billed 0.004: a third off, but under a cent
    result = check([cost(f"{MINI}, input", "0.004")], [usage(MINI, 20_000, 0)])
    assert result.days[0].diff_usd == Decimal("-0.001")
    assert result.verdict == "ok"


def test_batch_usage_is_priced_at_batch_prices() -> None:
    # 2M * 0.075 + 1M * 0.30 = 0.45 (standard would be 0.90)
    result = check(
        [cost(f"{MINI}, input, batch", "0.15"), cost(f"{MINI}, output, batch", "0.30")],
        [usage(MINI, 2_000_000, 1_000_000, batch=True)],
    )
    assert result.days[0].priced_usd == Decimal("0.45")
    assert result.verdict == "ok"


def test_flex_usage_is_priced_at_flex_prices() -> None:
    # 0.8M * 0.125 + 0.2M * 0.0125 + 1M * 1.00 = 1.1025 (standard: 2.205)
    result = check(
        [cost(f"{G5MINI}, input, flex", "1.1025")],
        [usage(G5MINI, 1_000_000, 1_000_000, tier="flex", cached=200_000)],
    )
    assert result.days[0].priced_usd == Decimal("1.1025")
    assert result.verdict == "ok"


def test_tiers_of_one_model_add_up_within_its_group() -> None:
    # standard 0.90 + batch 0.45 = 1.35, billed as one model
    result = check(
        [
            cost(f"{MINI}, input", "0.30"),
            cost(f"{MINI}, output", "0.60"),
            cost(f"{MINI}, input, batch", "0.15"),
            cost(f"{MINI}, output, batch", "0.30"),
        ],
        [usage(MINI, 2_000_000, 1_000_000), usage(MINI, 2_000_000, 1_000_000, batch=True)],
    )
    (group,) = result.days[0].models
    assert group.models == (MINI,) and len(group.priced) == 2 and len(group.billed) == 4
    assert group.priced_usd == Decimal("1.35") == group.billed_usd


def test_line_items_the_completions_usage_does_not_cover_are_shown_apart() -> None:
    result = check(
        [
            cost(f"{MINI}, input", "0.30"),
            cost(f"{MINI}, output", "0.60"),
            cost("text-embedding-3-small, input", "0.42"),
            cost("web search tool calls", "2.50"),
            cost(f"{G4O}, input", "5.00"),  # a model this day's usage does not show
            cost(None, "0.07"),
        ],
        [usage(MINI, 2_000_000, 1_000_000)],
    )
    (day,) = result.days
    assert day.billed_usd == Decimal("0.90")  # never mixed in
    assert day.uncovered_usd == Decimal("7.99")  # 0.42 + 2.50 + 5.00 + 0.07
    assert [c.line_item for c in day.uncovered] == [
        None,
        f"{G4O}, input",
        "text-embedding-3-small, input",
        "web search tool calls",
    ]
    assert result.verdict == "ok"
    text = render_table(result)
    assert "Not covered by completions usage" in text and "text-embedding-3-small" in text
    assert "(no line item)" in text


def test_a_cost_in_another_currency_is_not_compared() -> None:
    line = CostLine(T1, P, f"{MINI}, input", Decimal("0.30"), currency="eur")
    result = check([line], [usage(MINI, 2_000_000, 0)])
    assert result.days[0].uncovered == (line,)
    assert result.days[0].uncovered_usd == 0
    assert result.verdict == "mismatch"  # 0.30 priced, nothing billed in USD


def test_an_unpriced_model_makes_the_day_incomplete_never_zero() -> None:
    result = check(
        [cost(f"{MINI}, input", "0.30"), cost("acme-secret-model, input", "1.00")],
        [usage(MINI, 2_000_000, 0), usage("acme-secret-model", 1_000, 1_000)],
    )
    (day,) = result.days
    assert day.verdict == "incomplete" and result.verdict == "incomplete"
    assert not day.complete and day.diff_usd is None and day.diff_pct is None
    acme = next(m for m in day.models if m.models == ("acme-secret-model",))
    assert acme.verdict == "incomplete" and acme.billed_usd == Decimal("1.00")
    assert acme.priced_usd == 0 and acme.diff_usd is None
    doc = result.to_json()["checks"][0]
    assert doc["unpriced"] == ["acme-secret-model"] and doc["diff_usd"] is None
    text = render_table(result)
    assert "unpriced (acme-secret-model)" in text
    assert "partial $0.300000; unpriced (acme-secret-model)" in text
    assert "never a pass" in text


def test_usage_without_a_model_is_unpriced() -> None:
    result = check([], [usage(None, 1_000, 10)])
    assert result.days[0].verdict == "incomplete"
    assert result.days[0].models[0].models == ("(no model)",)


def test_a_priced_mismatch_wins_over_incomplete() -> None:
    result = check(
        [cost(f"{MINI}, input", "0.50")],
        [usage(MINI, 2_000_000, 0), usage("acme-secret-model", 1_000, 1_000)],
    )
    assert result.days[0].verdict == "mismatch"


def test_opposite_errors_of_two_models_cannot_hide_in_the_total() -> None:
    # gpt-4o-mini: 2M * 0.15 = 0.30 billed 0.40; gpt-4o: 0.04M * 2.5 = 0.10 billed 0.00
    result = check(
        [cost(f"{MINI}, input", "0.40"), cost(f"{G4O}, input", "0.00")],
        [usage(MINI, 2_000_000, 0), usage(G4O, 40_000, 0)],
    )
    (day,) = result.days
    assert day.diff_usd == 0  # the totals agree
    assert {m.models[0]: m.verdict for m in day.models} == {MINI: "mismatch", G4O: "mismatch"}
    assert day.verdict == "mismatch"
    assert "(all models)" in render_table(result)


def test_a_line_item_naming_the_alias_bills_the_snapshot() -> None:
    assert line_item_model("gpt-4o-mini, cached input") == "gpt-4o-mini"
    assert line_item_model("  ") is None and line_item_model(None) is None
    result = check([cost("gpt-4o-mini, input", "0.30")], [usage(MINI, 2_000_000, 0)])
    assert result.days[0].models[0].billed_usd == Decimal("0.30")
    assert result.verdict == "ok"


def test_usage_nothing_bills_is_a_mismatch() -> None:
    result = check([], [usage(MINI, 2_000_000, 0)])
    (day,) = result.days
    assert day.billed_usd == 0 and day.diff_usd == Decimal("0.30")
    assert day.diff_pct is None and day.verdict == "mismatch"


def test_a_day_of_uncovered_costs_only_is_not_compared() -> None:
    result = check([cost("dall-e-3, image", "4.00")], [])
    assert result.days[0].verdict == "not_compared"
    assert result.verdict == "ok"
    assert "1 with no completions usage" in render_table(result)


def test_days_and_projects_are_separate_and_outside_days_ignored() -> None:
    result = check(
        [
            cost(f"{MINI}, input", "0.30"),
            cost(f"{MINI}, input", "0.15", project="proj_b"),
            cost(f"{MINI}, input", "0.15", day=T2),
            cost(f"{MINI}, input", "9.00", day=T1 - DAY),  # before the window
        ],
        [
            usage(MINI, 2_000_000, 0),
            usage(MINI, 1_000_000, 0, project="proj_b"),
            usage(MINI, 1_000_000, 0, day=T2),
            DailyUsage(T2, "proj_c", MINI, "default", False, Usage()),  # nothing: dropped
        ],
        days=2,
    )
    keys = [(d.day.isoformat(), d.project_id) for d in result.days]
    assert keys == [("2026-11-02", "proj_a"), ("2026-11-02", "proj_b"), ("2026-11-03", "proj_a")]
    assert result.verdict == "ok" and result.billed_usd == Decimal("0.60")


def test_json_carries_every_figure() -> None:
    result = check(
        [cost(f"{MINI}, input", "0.33"), cost("text-embedding-3-small, input", "0.42")],
        [usage(MINI, 2_000_000, 0)],
    )
    doc = json.loads(render_json(result))
    assert doc["verdict"] == "mismatch" and doc["tolerance"] == 0.02
    assert doc["counts"] == {"ok": 0, "mismatch": 1, "incomplete": 0, "not_compared": 0}
    (day,) = doc["checks"]
    assert day["billed_usd"] == 0.33 and day["priced_usd"] == 0.3
    assert day["diff_usd"] == pytest.approx(-0.03)
    assert day["uncovered"][0]["line_item"] == "text-embedding-3-small, input"
    (model,) = day["models"]
    assert model["usage"][0]["priced_usd"] == 0.3 and model["usage"][0]["batch"] is False
    assert section_json(result) == result.to_json()


def test_report_sections() -> None:
    result = check(
        [cost(f"{MINI}, input", "0.33"), cost("<b>embeddings</b>", "0.42")],
        [usage(MINI, 2_000_000, 0, project="proj_<x>")],
    )
    html = report_section(result, "html")
    assert "<h2>Bill check</h2>" in html and "verdict-mismatch" in html
    assert "<b>" not in html and "&lt;b&gt;embeddings" in html
    markdown = report_section(result, "markdown")
    assert markdown.startswith("### Bill check") and "| DAY |" in markdown
    assert report_section(result, "table") == render_table(result)
    assert json.loads(report_section(result, "json"))["verdict"] == "mismatch"
    missing = BillUnavailable("no admin key")
    assert "not available (no admin key)" in report_section(missing, "table")
    assert section_json(missing) == {
        "check": "bill",
        "verdict": None,
        "unavailable": "no admin key",
    }


def test_nothing_at_all() -> None:
    result = check([], [])
    assert result.days == () and result.verdict == "ok"
    assert "No completions usage or cost" in render_table(result)


def test_bill_tolerance_is_a_fraction_setting() -> None:
    from tokensettle.config import ConfigError, load_settings

    assert load_settings({}, environ={}).bill_tolerance == 0.02
    assert load_settings({}, environ={"TOKENSETTLE_BILL_TOLERANCE": "0.1"}).bill_tolerance == 0.1
    for bad in ("2", "-0.01", "2%"):
        with pytest.raises(ConfigError, match="bill_tolerance"):
            load_settings({}, environ={"TOKENSETTLE_BILL_TOLERANCE": bad})

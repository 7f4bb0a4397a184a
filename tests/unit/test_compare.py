"""Local vs provider: differences, percent, verdicts, invalid local counts."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.compare import (
    DEFAULT_TOLERANCE,
    FIELDS,
    LocalCounts,
    compare,
    local_counts,
    local_counts_from_document,
)
from tokensettle.usage import Usage

CHATDEV = "runs__chatdev__4df331a3-1d72-4154-8a6a-c61f80ef2228__metrics@{}.json"


def _json(value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(value, allow_nan=False))
    return out


def test_the_seed_immediate_query_undercounted_chatdev_by_nine_tenths(fixtures_dir: Path) -> None:
    early = json.loads((fixtures_dir / CHATDEV.format("90bbb51")).read_text())
    settled = json.loads((fixtures_dir / CHATDEV.format("3618a19")).read_text())
    local = local_counts_from_document(early)
    assert local.values == {"TOK_IN": 27_068, "TOK_OUT": 12_335, "API_CALLS": 13}
    assert local.not_counted == ("COST_USD",)  # absent from this older file
    agg = settled["aggregate_metrics"]
    provider = Usage(agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"])
    result = compare(local, provider, None)
    assert result.verdict == "mismatch"
    block = _json(result.to_json())
    tok_in = block["fields"]["TOK_IN"]
    assert tok_in["diff"] == 27_068 - 258_207
    assert tok_in["diff_pct"] == pytest.approx(-89.517, abs=0.001)
    assert tok_in["within_tolerance"] is False
    assert block["fields"]["API_CALLS"]["diff"] == 13 - 162
    assert "TOK_IN: local 27068 is 89.5% below the provider's 258207" in block["message"]


def test_reconciled_seed_file_has_lost_its_local_counts(fixtures_dir: Path) -> None:
    settled = json.loads((fixtures_dir / CHATDEV.format("3618a19")).read_text())
    local = local_counts_from_document(settled)
    assert local.values == {}
    assert local.note is not None
    assert "overwrote" in local.note
    result = compare(local, Usage(1, 1, 1), None)
    assert result.verdict == "no_local_counts"
    assert "overwrote" in result.message


def test_within_tolerance_is_a_match_and_the_boundary_is_inclusive() -> None:
    provider = Usage(input_tokens=1_000, output_tokens=200, num_model_requests=10)
    exact_five = local_counts({"TOK_IN": 1_050, "TOK_OUT": 190, "API_CALLS": 10})
    result = compare(exact_five, provider, None)
    assert result.verdict == "match"
    assert result.to_json()["fields"]["TOK_IN"]["diff_pct"] == 5.0
    just_over = local_counts({"TOK_IN": 1_051})
    assert compare(just_over, provider, None).verdict == "mismatch"
    assert compare(just_over, provider, None, tolerance=0.06).verdict == "match"


def test_zero_local_counts_are_not_counted() -> None:
    local = local_counts({"TOK_IN": 0, "TOK_OUT": 0, "API_CALLS": 0, "COST_USD": 0.0})
    assert local.values == {}
    assert local.not_counted == FIELDS
    result = compare(local, Usage(100, 10, 1), Decimal("0.01"))
    assert result.verdict == "no_local_counts"
    assert result.not_compared["TOK_IN"] == "not counted locally (0 or absent)"


def test_no_aggregate_metrics_at_all() -> None:
    assert compare(local_counts(None), Usage(1, 1, 1), None).verdict == "no_local_counts"
    assert local_counts_from_document({"run_id": "x"}).values == {}


def test_provider_zero_gives_no_percent_and_a_mismatch() -> None:
    result = compare(local_counts({"TOK_IN": 500}), Usage(0, 0, 0), None)
    assert result.verdict == "mismatch"
    field = _json(result.to_json())["fields"]["TOK_IN"]
    assert field == {
        "local": 500,
        "provider": 0,
        "diff": 500,
        "diff_pct": None,
        "within_tolerance": False,
    }
    assert "where the provider has 0" in result.message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-5, "TOK_IN is negative (-5)"),
        (12.5, "TOK_IN is 12.5, not a whole number of tokens"),
        ("1200", "TOK_IN is a str, expected a non-negative integer"),
        (True, "TOK_IN is a boolean, expected a non-negative integer"),
        (math.nan, "TOK_IN is nan, expected a non-negative integer"),
        (math.inf, "TOK_IN is inf, expected a non-negative integer"),
        ([1], "TOK_IN is a list, expected a non-negative integer"),
    ],
)
def test_invalid_local_counts_are_reported_and_excluded(value: object, reason: str) -> None:
    local = local_counts({"TOK_IN": value, "TOK_OUT": 200})
    assert "TOK_IN" not in local.values
    assert [i.reason for i in local.invalid] == [reason]
    result = compare(local, Usage(1_000, 200, 3), None)
    assert result.verdict == "invalid_local_counts"
    assert reason in result.message
    block = _json(result.to_json())  # NaN/inf become text, still valid JSON
    assert block["invalid"][0]["field"] == "TOK_IN"
    assert block["invalid"][0]["reason"] == reason
    assert "TOK_IN" not in block["fields"]
    assert block["fields"]["TOK_OUT"]["within_tolerance"] is True  # the valid ones still shown
    assert block["not_compared"]["TOK_IN"].startswith("invalid local value")


def test_invalid_cost() -> None:
    local = local_counts({"TOK_IN": 10, "COST_USD": -0.5})
    assert [i.reason for i in local.invalid] == ["COST_USD is negative (-0.5)"]
    local = local_counts({"COST_USD": "cheap"})
    assert [i.reason for i in local.invalid] == [
        "COST_USD is a str, expected a non-negative number"
    ]


def test_integer_valued_float_is_a_count() -> None:
    local = local_counts({"TOK_IN": 1200.0})
    assert local.values == {"TOK_IN": 1200}
    assert isinstance(local.values["TOK_IN"], int)


def test_cost_is_compared_exactly_when_the_provider_cost_is_known() -> None:
    local = local_counts({"TOK_IN": 20_150, "TOK_OUT": 5_335, "API_CALLS": 12, "COST_USD": 0.0055})
    assert local.values["COST_USD"] == Decimal("0.0055")  # what the JSON said, not binary
    provider = Usage(20_150, 5_335, 12)
    result = compare(local, provider, Decimal("0.0054939"))
    assert result.verdict == "match"
    cost = result.to_json()["fields"]["COST_USD"]
    assert cost["diff"] == pytest.approx(0.0000061)
    assert cost["diff_pct"] == pytest.approx(0.111, abs=0.001)
    unknown = compare(local, provider, None)
    assert unknown.verdict == "match"
    assert "COST_USD" not in unknown.to_json()["fields"]
    assert "not priced" in unknown.not_compared["COST_USD"]


def test_cost_mismatch_counts_in_the_verdict() -> None:
    local = local_counts({"TOK_IN": 1_000, "COST_USD": 1.0})
    assert compare(local, Usage(1_000, 0, 1), Decimal("0.5")).verdict == "mismatch"


@pytest.mark.parametrize("tolerance", [-0.1, math.nan, math.inf])
def test_bad_tolerance_is_refused(tolerance: float) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        compare(LocalCounts(), Usage(), None, tolerance=tolerance)


def test_block_layout() -> None:
    local = local_counts({"TOK_IN": 900, "TOK_OUT": 100, "API_CALLS": 0})
    block = _json(compare(local, Usage(1_000, 100, 4), Decimal("0.01")).to_json())
    assert block["verdict"] == "mismatch"
    assert block["tolerance"] == DEFAULT_TOLERANCE
    assert block["local"] == {"TOK_IN": 900, "TOK_OUT": 100}
    assert block["local_source"] == "aggregate_metrics"
    assert block["provider"] == {"TOK_IN": 1_000, "TOK_OUT": 100, "API_CALLS": 4, "COST_USD": 0.01}
    assert block["fields"]["TOK_IN"]["diff"] == -100
    assert block["fields"]["TOK_IN"]["diff_pct"] == -10.0
    assert set(block["not_compared"]) == {"API_CALLS", "COST_USD"}
    assert block["invalid"] == []


# ------------------------------------------------------------------ where local counts live


def _ours(status: str, **block: Any) -> dict[str, Any]:
    return {
        "aggregate_metrics": {"TOK_IN": 777, "TOK_OUT": 77, "API_CALLS": 7},
        "usage_api_reconciliation": {
            "verification_status": status,
            "provenance": {"tool": "tokensettle"},
            "attempts": [{"total_tokens_in": 1, "total_tokens_out": 1}],
            **block,
        },
    }


def test_our_pending_block_leaves_aggregates_local() -> None:
    assert local_counts_from_document(_ours("pending")).values["TOK_IN"] == 777


def test_our_verified_block_reads_the_kept_local_counts() -> None:
    kept = {"local_vs_provider": {"local": {"TOK_IN": 500, "TOK_OUT": 50}}}
    local = local_counts_from_document(_ours("verified", **kept))
    assert local.values == {"TOK_IN": 500, "TOK_OUT": 50}
    assert local.source == "usage_api_reconciliation.local_vs_provider.local"
    lost = local_counts_from_document(_ours("verified"))
    assert lost.values == {}
    assert lost.note is not None
    assert "provider's counts" in lost.note


def test_kept_local_counts_round_trip_through_the_block() -> None:
    first = compare(local_counts({"TOK_IN": 950, "TOK_OUT": 100}), Usage(1_000, 100, 2), None)
    doc = _ours("verified", local_vs_provider=_json(first.to_json()))
    again = compare(local_counts_from_document(doc), Usage(1_000, 100, 2), None)
    assert again.verdict == first.verdict == "match"
    assert again.local.values == first.local.values


def test_seed_block_without_attempts_leaves_aggregates_local() -> None:
    doc = {
        "aggregate_metrics": {"TOK_IN": 5},
        "usage_api_reconciliation": {"verification_status": "pending", "attempts": []},
    }
    assert local_counts_from_document(doc).values == {"TOK_IN": 5}


# ------------------------------------------------------------------ properties


counts = st.integers(min_value=1, max_value=10**9)


@settings(max_examples=300)
@given(counts, counts, st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.5]))
def test_verdict_is_the_relative_difference_against_the_tolerance(
    local: int, provider: int, tolerance: float
) -> None:
    result = compare(
        local_counts({"TOK_IN": local}), Usage(provider, 0, 0), None, tolerance=tolerance
    )
    inside = abs(local - provider) * 1000 <= round(tolerance * 1000) * provider
    assert result.verdict == ("match" if inside else "mismatch")
    field = result.to_json()["fields"]["TOK_IN"]
    assert field["diff"] == local - provider
    exact_pct = Fraction(local - provider, provider) * 100
    # Rounded to 3 decimals, then held in a float: half a unit of the third decimal plus
    # the float's own relative error (large percentages lose the last bits).
    slack = Fraction(1, 2000) + abs(exact_pct) * Fraction(1, 10**15) + Fraction(1, 10**9)
    assert abs(Fraction(field["diff_pct"]) - exact_pct) <= slack


@settings(max_examples=100)
@given(counts, counts, counts)
def test_equal_counts_always_match_even_at_zero_tolerance(tin: int, tout: int, calls: int) -> None:
    local = local_counts({"TOK_IN": tin, "TOK_OUT": tout, "API_CALLS": calls})
    assert compare(local, Usage(tin, tout, calls), None, tolerance=0).verdict == "match"

"""The simulator's costs model and its service tiers and batches, without sockets."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tokensettle.simulator.costs import (
    Billing,
    billed_lines,
    costs_page,
    parse_costs_query,
    request_lines,
    respond_costs,
)
from tokensettle.simulator.scenario import (
    ApiError,
    Scenario,
    ScenarioError,
    parse_query,
    request_from_json,
)
from tokensettle.usage import Usage

DAY = 86_400
T0 = 1_795_910_400  # 2026-11-29 00:00 UTC
NOW = T0 + 3 * DAY
MINI = "gpt-4o-mini-2024-07-18"


def req(**extra: Any) -> dict[str, Any]:
    usage = {"input_tokens": 2_000_000, "output_tokens": 1_000_000, "num_model_requests": 2}
    base = {"time": T0 + 3600, "api_key_id": "key_a", "project_id": "proj_a", "model": MINI}
    return {**base, "usage": usage, **extra}


def scenario(*requests: dict[str, Any]) -> Scenario:
    return Scenario.from_json({"requests": list(requests)})


def test_requests_carry_a_tier_and_batch_flag() -> None:
    plain = request_from_json(req(), registered_at=0)
    assert (plain.service_tier, plain.batch) == ("default", False)
    assert "service_tier" not in plain.to_json() and "batch" not in plain.to_json()
    flex = request_from_json(req(service_tier="flex", batch=True), registered_at=0)
    assert (flex.service_tier, flex.batch) == ("flex", True)
    assert request_from_json(flex.to_json(), registered_at=5) == flex
    for bad in ({"service_tier": ""}, {"service_tier": 3}, {"batch": "yes"}):
        with pytest.raises(ScenarioError):
            request_from_json(req(**bad), registered_at=0)


def test_the_usage_answer_groups_and_filters_by_tier_and_batch() -> None:
    s = scenario(req(), req(batch=True), req(service_tier="flex"))
    pairs = [("start_time", str(T0)), ("bucket_width", "1d")]
    grouped = s.respond([*pairs, ("group_by", "service_tier"), ("group_by", "batch")], NOW)
    results = grouped["data"][0]["results"]
    assert sorted((r["service_tier"], r["batch"]) for r in results) == [
        ("default", False),
        ("default", True),
        ("flex", False),
    ]
    only_batch = s.respond([*pairs, ("batch", "true")], NOW)["data"][0]["results"]
    assert only_batch[0]["input_tokens"] == 2_000_000
    no_batch = s.respond([*pairs, ("batch", "false")], NOW)["data"][0]["results"]
    assert no_batch[0]["input_tokens"] == 4_000_000
    ungrouped = s.respond(pairs, NOW)["data"][0]["results"]
    assert ungrouped[0]["service_tier"] is None and ungrouped[0]["batch"] is None
    assert parse_query(pairs).batch is None


def test_line_items_are_named_per_part_tier_and_batch() -> None:
    lines = request_lines(
        request_from_json(req(batch=True), registered_at=0),
        Usage(2_000_000, 1_000_000, 2, input_cached_tokens=500_000),
        Billing(),
    )
    assert {(line.line_item, line.amount, line.quantity) for line in lines} == {
        (f"{MINI}, input, batch", Decimal("0.1125"), Decimal(1_500_000)),  # 1.5M * 0.075
        (f"{MINI}, cached input, batch", Decimal("0.0375"), Decimal(500_000)),
        (f"{MINI}, output, batch", Decimal("0.3"), Decimal(1_000_000)),
    }


def test_price_factors_list_prices_and_extra_line_items() -> None:
    billing = Billing.from_json(
        {
            "price_factors": {MINI: 2},
            "list_prices": {"acme-1": {"input": 1, "output": 3}},
            "line_items": [
                {"time": T0 + 5, "project_id": "proj_a", "line_item": "web search", "amount": 1.5}
            ],
        }
    )
    s = scenario(req(), req(model="acme-1"), req(model="acme-2"))  # acme-2: not billed
    lines = billed_lines(s, billing, NOW)
    by_item = {line.line_item: line.amount for line in lines}
    assert by_item[f"{MINI}, input"] == Decimal("0.60")  # 2M * 0.15 * 2
    assert by_item["acme-1, input"] == Decimal(2) and by_item["acme-1, output"] == Decimal(3)
    assert by_item["web search"] == Decimal("1.5")
    assert not any(item.startswith("acme-2") for item in by_item)
    assert Billing.from_json(billing.to_json()) == billing


@pytest.mark.parametrize(
    "bad",
    [
        {"price_factor": {}},
        {"price_factors": {MINI: "x"}},
        {"price_factors": {MINI: -1}},
        {"list_prices": {"m": {"input": 1}}},
        {"line_items": [{"time": 1, "project_id": "p", "amount": 1}]},
        {"line_items": [{"time": 1, "project_id": "p", "line_item": "x", "amount": "NaN"}]},
        {"line_items": {}},
    ],
)
def test_bad_billing_knobs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ScenarioError):
        Billing.from_json(bad)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ([("bucket_width", "1d")], "start_time"),
        ([("start_time", str(T0)), ("bucket_width", "1m")], "bucket_width"),
        ([("start_time", str(T0)), ("limit", "181")], "limit"),
        ([("start_time", str(T0)), ("group_by", "model")], "group_by"),
        ([("start_time", str(T0)), ("start_time", str(T0))], "start_time"),
    ],
)
def test_costs_queries_are_validated(query: list[tuple[str, str]], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_costs_query(query)
    assert caught.value.status == 400 and caught.value.param == param


def test_costs_pages_group_page_and_filter() -> None:
    s = scenario(req(), req(project_id="proj_b", time=T0 + DAY + 60, api_key_id="key_b"))
    base = [("start_time", str(T0)), ("end_time", str(T0 + 3 * DAY))]
    ungrouped = respond_costs(s, Billing(), base, NOW)
    assert [len(b["results"]) for b in ungrouped["data"]] == [1, 1, 0]
    first = ungrouped["data"][0]["results"][0]
    assert first["amount"] == {"value": 0.9, "currency": "usd"}  # 0.30 + 0.60
    assert first["line_item"] is None and first["quantity"] is None
    by_key = respond_costs(s, Billing(), [*base, ("api_key_ids[]", "key_b")], NOW)
    assert [len(b["results"]) for b in by_key["data"]] == [0, 1, 0]
    query = parse_costs_query([*base, ("limit", "2"), ("group_by", "project_id,line_item")])
    page = costs_page(query, billed_lines(s, Billing(), NOW), NOW)
    assert page["has_more"] and len(page["data"]) == 2
    assert [r["line_item"] for r in page["data"][1]["results"]] == [
        f"{MINI}, input",
        f"{MINI}, output",
    ]
    rest = respond_costs(s, Billing(), [*base, ("limit", "2"), ("page", page["next_page"])], NOW)
    assert not rest["has_more"] and rest["data"][0]["start_time"] == T0 + 2 * DAY

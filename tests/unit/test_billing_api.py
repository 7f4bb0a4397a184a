"""The bill check's queries and page parsers: pure, no sockets."""

from __future__ import annotations

import copy
from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from tokensettle.billing_api import (
    costs_query,
    daily_usage_query,
    day_range,
    parse_costs_page,
    parse_daily_usage_page,
)
from tokensettle.usage_api import MalformedResponseError

T0 = 1_795_824_000  # 2026-11-28 00:00 UTC
DAY = 86_400


def test_queries_cover_whole_utc_days() -> None:
    assert day_range(date(2026, 11, 28), date(2026, 11, 30)) == (T0, T0 + 2 * DAY)
    with pytest.raises(ValueError, match="empty"):
        day_range(date(2026, 11, 28), date(2026, 11, 28))
    assert costs_query(date(2026, 11, 28), date(2026, 11, 29), ["p2", "p1", "p1"]) == [
        ("start_time", str(T0)),
        ("end_time", str(T0 + DAY)),
        ("bucket_width", "1d"),
        ("group_by", "project_id"),
        ("group_by", "line_item"),
        ("project_ids", "p1"),
        ("project_ids", "p2"),
    ]
    usage = dict(daily_usage_query(date(2026, 11, 28), date(2026, 11, 29)))
    assert usage["bucket_width"] == "1d" and "limit" not in usage  # the API's page size
    groups = [
        v for k, v in daily_usage_query(date(2026, 11, 28), date(2026, 11, 29)) if k == "group_by"
    ]
    assert groups == ["project_id", "model", "service_tier", "batch"]


def costs_body(**result: Any) -> dict[str, Any]:
    base = {
        "object": "organization.costs.result",
        "amount": {"value": 0.06, "currency": "usd"},
        "line_item": "gpt-4o-mini-2024-07-18, input",
        "project_id": "proj_a",
        "api_key_id": None,
        "quantity": 400000.0,
        "quantity_unit": "tokens",
    }
    bucket = {
        "object": "bucket",
        "start_time": T0,
        "end_time": T0 + DAY,
        "results": [{**base, **result}],
    }
    return {"object": "page", "data": [bucket], "has_more": False, "next_page": None}


def test_a_costs_page() -> None:
    page = parse_costs_page(costs_body())
    (line,) = page.lines
    assert line.amount == Decimal("0.06")  # the float's shortest form, exactly
    assert (line.day, line.project_id, line.currency) == (T0, "proj_a", "usd")
    assert line.quantity == Decimal(400000) and page.bucket_starts == (T0,)
    text = parse_costs_page(costs_body(amount={"value": "0.8958740000000000", "currency": "USD"}))
    assert text.lines[0].amount == Decimal("0.8958740000000000")
    assert text.lines[0].currency == "usd"


@pytest.mark.parametrize(
    "result",
    [
        {"object": "organization.usage.completions.result"},
        {"amount": 0.06},
        {"amount": {"value": True, "currency": "usd"}},
        {"amount": {"value": "lots", "currency": "usd"}},
        {"amount": {"value": "Infinity", "currency": "usd"}},
        {"amount": {"value": 0.06}},
        {"line_item": 7},
        {"quantity": "many"},
        {"quantity_unit": 3},
    ],
)
def test_malformed_costs_are_refused(result: dict[str, Any]) -> None:
    with pytest.raises(MalformedResponseError):
        parse_costs_page(costs_body(**result))


def usage_body(**result: Any) -> dict[str, Any]:
    base = {
        "object": "organization.usage.completions.result",
        "input_tokens": 1000,
        "output_tokens": 10,
        "num_model_requests": 1,
        "project_id": "proj_a",
        "model": "gpt-5-mini-2025-08-07",
        "service_tier": "flex",
        "batch": False,
    }
    bucket = {
        "object": "bucket",
        "start_time": T0,
        "end_time": T0 + DAY,
        "results": [{**base, **result}],
    }
    return {"object": "page", "data": [bucket], "has_more": False, "next_page": None}


def test_a_daily_usage_page() -> None:
    (row,) = parse_daily_usage_page(usage_body()).rows
    assert (row.day, row.model, row.service_tier, row.batch) == (
        T0,
        "gpt-5-mini-2025-08-07",
        "flex",
        False,
    )
    assert row.usage.input_tokens == 1000
    # a day may hold far more than a minute's plausible tokens
    big = parse_daily_usage_page(usage_body(input_tokens=10**12, num_model_requests=10**5))
    assert big.rows[0].usage.input_tokens == 10**12


@pytest.mark.parametrize(
    "result",
    [{"batch": "false"}, {"service_tier": 1}, {"input_tokens": -1}, {"input_tokens": 10**20}],
)
def test_malformed_daily_usage_is_refused(result: dict[str, Any]) -> None:
    with pytest.raises(MalformedResponseError):
        parse_daily_usage_page(usage_body(**result))


def test_the_shared_page_checks_apply() -> None:
    body = costs_body()
    body["data"].append(copy.deepcopy(body["data"][0]))  # the same bucket twice
    with pytest.raises(MalformedResponseError, match="does not follow"):
        parse_costs_page(body)
    with pytest.raises(MalformedResponseError, match="has_more"):
        parse_costs_page({**costs_body(), "has_more": "no"})

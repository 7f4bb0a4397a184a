"""Batch and service-tier prices: genai-prices' price variants chosen by a price context.

Numbers are hand-computed from the table genai-prices 0.2.3 bundles (USD per million tokens):
gpt-4o-mini standard 0.15 in / 0.075 cached / 0.60 out, batch 0.075 in / 0.30 out (cached
stays 0.075: the batch variant does not override it), from 2026-10-14; gpt-5-mini standard
0.25 / 0.025 / 2.00, flex 0.125 / 0.0125 / 1.00.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tokensettle.pricing import Priced, Unpriced, price, price_context
from tokensettle.usage import Usage

AT = datetime(2026, 11, 2, 12, tzinfo=UTC)
BEFORE_BATCH_PRICES = datetime(2026, 10, 13, 12, tzinfo=UTC)  # gpt-4o-mini's batch: 10-14
MINI = "gpt-4o-mini-2024-07-18"
G5MINI = "gpt-5-mini-2025-08-07"
#: 1M input of which 200k cached, 1M output, over 10 requests
USAGE = Usage(1_000_000, 1_000_000, 10, input_cached_tokens=200_000)


def priced(model: str, context: dict[str, str], at: datetime = AT) -> Priced:
    result = price(model, USAGE, at, context=context)
    assert isinstance(result, Priced), result
    return result


def test_the_context_of_usage_dimensions() -> None:
    assert price_context(None, None) == {}
    assert price_context("default", False) == {}
    assert price_context("flex", False) == {"service_tier": "flex"}
    assert price_context("default", True) == {"processing": "batch"}
    assert price_context("priority", True) == {"processing": "batch", "service_tier": "priority"}


def test_standard_prices_without_a_context() -> None:
    p = priced(MINI, {})
    # 0.8M * 0.15 + 0.2M * 0.075 + 1M * 0.60
    assert p.total_usd == Decimal("0.735")
    assert p.context == ()
    assert "price_context" not in p.to_json()


def test_batch_prices() -> None:
    p = priced(MINI, price_context(None, True))
    # 0.8M * 0.075 + 0.2M * 0.075 + 1M * 0.30
    assert p.total_usd == Decimal("0.375")
    assert p.component("uncached_input") == Decimal("0.06")
    assert p.component("cached_input") == Decimal("0.015")
    assert p.component("output") == Decimal("0.3")
    assert p.to_json()["price_context"] == {"processing": "batch"}


def test_flex_prices() -> None:
    p = priced(G5MINI, price_context("flex", False))
    # 0.8M * 0.125 + 0.2M * 0.0125 + 1M * 1.00
    assert p.total_usd == Decimal("1.1025")
    assert p.context == (("service_tier", "flex"),)


def test_a_tier_the_table_does_not_price_is_unpriced_not_standard() -> None:
    """genai-prices itself answers the standard price for a context no variant matches;
    a flex request billed at the standard price would be a silent 2x error."""
    result = price(MINI, USAGE, AT, context=price_context("flex", False))
    assert isinstance(result, Unpriced)
    assert result.kind == "no_variant_price"
    assert "service tier 'flex'" in result.reason and "gpt-4o-mini" in result.reason


def test_a_variant_not_yet_in_force_is_unpriced() -> None:
    result = price(MINI, USAGE, BEFORE_BATCH_PRICES, context=price_context(None, True))
    assert isinstance(result, Unpriced)
    assert result.kind == "no_variant_price" and "batch" in result.reason


@pytest.mark.parametrize("context", [{}, {"service_tier": "default"}])
def test_the_default_tier_is_standard(context: dict[str, str]) -> None:
    assert priced(MINI, context).total_usd == Decimal("0.735")

"""Claude models priced by the same pricer: cache reads, 5-minute and 1-hour cache writes at
their own prices, web searches, and what a report without request counts cannot price."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tokensettle.pricing import Priced, Unpriced, genai_usage_values, price, price_models
from tokensettle.usage import Usage, usage_from_anthropic

HAIKU = "claude-haiku-4-5-20251001"
AT = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)
MTOK = Decimal(1_000_000)
# Claude Haiku 4.5, USD per 1M tokens (Anthropic's pricing page; genai-prices 0.2.3 agrees):
# input 1, output 5, cache read 0.10, cache write 1.25 (5 minutes) or 2 (1 hour); web search
# 10 USD per 1,000 searches.
HAIKU_IN, HAIKU_OUT, HAIKU_READ = Decimal(1), Decimal(5), Decimal("0.10")
HAIKU_WRITE_5M, HAIKU_WRITE_1H, SEARCH = Decimal("1.25"), Decimal(2), Decimal("0.01")


def _anthropic(
    uncached: int, read: int, write_5m: int, write_1h: int, out: int, searches: int = 0
) -> Usage:
    return usage_from_anthropic(
        {
            "uncached_input_tokens": uncached,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": write_5m,
                "ephemeral_1h_input_tokens": write_1h,
            },
            "output_tokens": out,
            "server_tool_use": {"web_search_requests": searches},
        }
    )


def _priced(result: Priced | Unpriced) -> Priced:
    assert isinstance(result, Priced), result
    return result


def _unpriced(result: Priced | Unpriced) -> Unpriced:
    assert isinstance(result, Unpriced), result
    return result


USAGE = _anthropic(1_000_000, 200_000, 300_000, 100_000, 50_000, searches=7)
# by hand: 1,000,000 x 1 + 200,000 x 0.10 + 300,000 x 1.25 + 100,000 x 2 (all / 1M)
#        = 1.00 + 0.02 + 0.375 + 0.20 = 1.595 input; 50,000 x 5 / 1M = 0.25 output;
#          7 searches x 10 / 1,000 = 0.07.  Total 1.915 USD.
HAND_INPUT = (
    1_000_000 * HAIKU_IN
    + 200_000 * HAIKU_READ
    + 300_000 * HAIKU_WRITE_5M
    + 100_000 * HAIKU_WRITE_1H
) / MTOK
HAND_OUTPUT = 50_000 * HAIKU_OUT / MTOK
HAND_SEARCH = 7 * SEARCH


def test_the_anthropic_usage_keys_given_to_genai_prices() -> None:
    assert genai_usage_values(USAGE) == {
        "input_tokens": 1_600_000,  # all input: genai-prices' key includes its parts
        "output_tokens": 50_000,
        "cache_read_tokens": 200_000,
        "cache_write_tokens": 400_000,
        "cache_write_5m_tokens": 300_000,
        "cache_write_1h_tokens": 100_000,
        "web_searches": 7,
    }


def test_a_claude_model_at_hand_computed_prices() -> None:
    p = _priced(price(HAIKU, USAGE, AT, provider_id="anthropic"))
    assert (p.input_usd, p.output_usd) == (HAND_INPUT, HAND_OUTPUT)
    assert p.total_usd == HAND_INPUT + HAND_OUTPUT + HAND_SEARCH == Decimal("1.915")
    assert (p.priced_as, p.provider, p.matched) == ("claude-haiku-4-5", "anthropic", "table")
    parts = {c.name: (c.count, c.usd) for c in p.components}
    assert parts == {
        "uncached_input": (1_000_000, Decimal("1")),
        "cached_input": (200_000, Decimal("0.02")),
        "cache_write": (300_000, Decimal("0.375")),  # the 5-minute writes
        "cache_write_1h": (100_000, Decimal("0.2")),
        "output": (50_000, Decimal("0.25")),
        "web_search": (7, Decimal("0.07")),
    }
    # reading 200,000 tokens from the cache saved 0.9 USD per 1M on them
    assert p.cache_savings_usd == 200_000 * (HAIKU_IN - HAIKU_READ) / MTOK
    assert p.to_json()["components"]["web_search"] == {
        "count": 7,
        "usd_per": 10.0,
        "per": 1000,
        "usd": 0.07,
    }


def test_one_hour_writes_cost_more_than_five_minute_writes() -> None:
    five = _priced(price(HAIKU, _anthropic(0, 0, 100_000, 0, 0), AT, provider_id="anthropic"))
    hour = _priced(price(HAIKU, _anthropic(0, 0, 0, 100_000, 0), AT, provider_id="anthropic"))
    assert five.total_usd == 100_000 * HAIKU_WRITE_5M / MTOK == Decimal("0.125")
    assert hour.total_usd == 100_000 * HAIKU_WRITE_1H / MTOK == Decimal("0.2")


def test_the_run_cost_block_and_the_seed_breakdown_keep_searches_apart() -> None:
    cost = price_models({HAIKU: USAGE}, AT, total=USAGE, provider_id="anthropic")
    assert cost.complete and cost.total_usd == Decimal("1.915")
    block = cost.to_json()
    assert block["source"]["provider"] == "anthropic"
    assert block["unpriced"] == {}
    seed = cost.seed_cost_breakdown()
    assert seed is not None
    # searches are neither input nor output tokens: only in the total
    assert seed["uncached_input_cost"] == pytest.approx(float(HAND_INPUT - Decimal("0.02")))
    assert seed["cached_input_cost"] == pytest.approx(0.02)
    assert seed["output_cost"] == pytest.approx(0.25)


def test_an_unknown_claude_model_is_unpriced_never_zero() -> None:
    for model in ("claude-nonexistent-9", "claude-opus-9-20300101"):
        u = _unpriced(price(model, USAGE, AT, provider_id="anthropic"))
        assert u.kind == "unknown_model" and "anthropic" in u.reason
    cost = price_models({"claude-nonexistent-9": USAGE}, AT, provider_id="anthropic")
    assert not cost.complete and cost.cost_usd_value() is None
    assert cost.seed_cost_breakdown() is None


def test_a_claude_model_is_not_looked_up_in_openais_table() -> None:
    assert _unpriced(price(HAIKU, USAGE, AT)).kind == "unknown_model"


SONNET = "claude-sonnet-4-5-20250929"  # prices tiered above 200,000 input tokens a request


def test_tiered_prices_are_exact_below_the_first_tier_without_a_request_count() -> None:
    small = _anthropic(150_000, 0, 0, 0, 1_000)
    p = _priced(price(SONNET, small, AT, provider_id="anthropic"))
    assert p.total_usd == (150_000 * Decimal(3) + 1_000 * Decimal(15)) / MTOK


def test_tiered_prices_above_the_tier_are_unpriced_without_a_request_count() -> None:
    big = _anthropic(250_000, 0, 0, 0, 1_000)
    u = _unpriced(price(SONNET, big, AT, provider_id="anthropic"))
    assert u.kind == "tiered_price"
    assert "counts no requests" in u.reason and "200,000" in u.reason
    # the same tokens known to be one request are priced, at the tier that request passed
    one = big.replace(requests_counted=True, num_model_requests=1)
    p = _priced(price(SONNET, one, AT, provider_id="anthropic"))
    assert p.total_usd == (250_000 * Decimal(6) + 1_000 * Decimal("22.5")) / MTOK

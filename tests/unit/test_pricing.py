"""Pricing with genai-prices: the hand-checked gpt-4o-mini figure, snapshots, dates, bad input."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path

import pytest
from genai_prices import data_snapshot
from genai_prices.data import providers as bundled_providers
from genai_prices.types import (
    ClauseEquals,
    ConditionalPrice,
    ModelInfo,
    ModelPrice,
    StartDateConstraint,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.pricing import (
    PRICE_SOURCE,
    Priced,
    Unpriced,
    decimal_text,
    genai_usage_values,
    price,
    price_models,
)
from tokensettle.usage import Usage

SNAPSHOT = "gpt-4o-mini-2024-07-18"
RUN_TIME = datetime(2025, 10, 19, 10, 39, 29, tzinfo=UTC)  # baes 6f0b2490 started then
MTOK = Decimal(1_000_000)
# Published gpt-4o-mini prices, USD per 1M tokens (OpenAI pricing page; the seed's config
# prices it the same: input 0.150, cached 0.075, output 0.600).
GPT4O_MINI_IN, GPT4O_MINI_CACHED, GPT4O_MINI_OUT = (
    Decimal("0.15"),
    Decimal("0.075"),
    Decimal("0.60"),
)
BAES = Usage(
    input_tokens=20_150, output_tokens=5_335, num_model_requests=12, input_cached_tokens=9_728
)


def _priced(result: Priced | Unpriced) -> Priced:
    assert isinstance(result, Priced), result
    return result


def _unpriced(result: Priced | Unpriced) -> Unpriced:
    assert isinstance(result, Unpriced), result
    return result


def _by_hand(tokens_in: int, cached: int, tokens_out: int) -> Decimal:
    uncached = tokens_in - cached
    return (
        uncached * GPT4O_MINI_IN + cached * GPT4O_MINI_CACHED + tokens_out * GPT4O_MINI_OUT
    ) / MTOK


# ------------------------------------------------------------------ the hand-checked figure


def test_gpt4o_mini_run_costs_what_the_published_prices_say() -> None:
    # 10,422 x 0.15 + 9,728 x 0.075 + 5,335 x 0.60 = 1,563.3 + 729.6 + 3,201 = 5,493.9 per 1M
    expected = Decimal("5493.9") / MTOK
    assert _by_hand(20_150, 9_728, 5_335) == expected
    priced = _priced(price(SNAPSHOT, BAES, RUN_TIME))
    assert priced.total_usd == expected == Decimal("0.0054939")
    assert decimal_text(priced.total_usd) == "0.0054939"
    assert priced.component("uncached_input") == 10_422 * GPT4O_MINI_IN / MTOK
    assert priced.component("cached_input") == 9_728 * GPT4O_MINI_CACHED / MTOK
    assert priced.component("output") == 5_335 * GPT4O_MINI_OUT / MTOK
    counts = {c.name: c.count for c in priced.components}
    assert counts == {"uncached_input": 10_422, "cached_input": 9_728, "output": 5_335}
    assert priced.cache_savings_usd == 9_728 * (GPT4O_MINI_IN - GPT4O_MINI_CACHED) / MTOK
    assert priced.input_usd + priced.output_usd == priced.total_usd


def test_price_records_model_source_version_and_date() -> None:
    priced = _priced(price(SNAPSHOT, BAES, RUN_TIME))
    assert priced.model == SNAPSHOT
    assert priced.priced_as == "gpt-4o-mini"
    assert priced.matched == "table"
    assert priced.provider == "openai"
    assert priced.source == PRICE_SOURCE == "genai-prices"
    assert priced.source_version == version("genai-prices")
    assert priced.data_snapshot == "bundled"
    assert priced.at == RUN_TIME
    assert priced.notes == ()


def test_the_fixture_run_is_priced_from_its_own_file(fixtures_dir: Path) -> None:
    doc = json.loads(
        (
            fixtures_dir / "runs__baes__6f0b2490-1548-4b4f-a943-a688ec972355__metrics@427bd02.json"
        ).read_text()
    )
    agg = doc["aggregate_metrics"]
    assert agg["COST_USD"] == 0.0  # what the seed left behind
    usage = Usage(
        input_tokens=agg["TOK_IN"],
        output_tokens=agg["TOK_OUT"],
        num_model_requests=agg["API_CALLS"],
        input_cached_tokens=agg["CACHED_TOKENS"],
    )
    at = datetime.fromisoformat(doc["start_timestamp"].replace("Z", "+00:00"))
    cost = price_models({SNAPSHOT: usage}, at, total=usage)
    assert cost.complete
    assert cost.total_usd == _by_hand(agg["TOK_IN"], agg["CACHED_TOKENS"], agg["TOK_OUT"])
    assert cost.cost_usd_value() == pytest.approx(0.0054939, abs=1e-12)
    breakdown = cost.seed_cost_breakdown()
    assert breakdown is not None
    assert set(breakdown) == set(doc["cost_breakdown"])  # the seed's own keys
    assert breakdown["uncached_input_cost"] == pytest.approx(0.0015633, abs=1e-12)
    assert breakdown["cached_input_cost"] == pytest.approx(0.0007296, abs=1e-12)
    assert breakdown["output_cost"] == pytest.approx(0.003201, abs=1e-12)
    assert breakdown["cache_savings"] == pytest.approx(0.0007296, abs=1e-12)
    assert breakdown["model"] == SNAPSHOT


def test_alias_and_snapshot_cost_the_same() -> None:
    alias = _priced(price("gpt-4o-mini", BAES, RUN_TIME))
    snap = _priced(price(SNAPSHOT, BAES, RUN_TIME))
    assert alias.total_usd == snap.total_usd
    assert alias.priced_as == snap.priced_as == "gpt-4o-mini"


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=10**9).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(min_value=0, max_value=n))
    ),
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**5),
)
def test_gpt4o_mini_matches_the_formula_for_any_usage(
    inputs: tuple[int, int], tokens_out: int, requests: int
) -> None:
    tokens_in, cached = inputs
    usage = Usage(tokens_in, tokens_out, requests, input_cached_tokens=cached)
    priced = _priced(price(SNAPSHOT, usage, RUN_TIME))
    assert priced.total_usd == _by_hand(tokens_in, cached, tokens_out)
    assert sum(c.usd for c in priced.components) == priced.total_usd
    assert sum(c.count for c in priced.components if c.name != "output") == tokens_in
    assert priced.cache_savings_usd == cached * (GPT4O_MINI_IN - GPT4O_MINI_CACHED) / MTOK
    assert not any("add up" in n for n in priced.notes)


usage_parts = st.builds(
    Usage,
    input_tokens=st.integers(0, 10**7),
    output_tokens=st.integers(0, 10**7),
    num_model_requests=st.integers(0, 1000),
).flatmap(
    lambda u: st.builds(
        lambda cached: u.replace(input_cached_tokens=cached),
        st.integers(0, u.input_tokens),
    )
)


@settings(max_examples=100, deadline=None)
@given(usage_parts, usage_parts)
def test_prices_add_up_over_usage_for_linear_prices(a: Usage, b: Usage) -> None:
    # gpt-4o-mini has flat prices, so pricing the sum equals summing the prices exactly:
    # no float rounding anywhere.
    whole = _priced(price(SNAPSHOT, a + b, RUN_TIME)).total_usd
    parts = (
        _priced(price(SNAPSHOT, a, RUN_TIME)).total_usd
        + _priced(price(SNAPSHOT, b, RUN_TIME)).total_usd
    )
    assert whole == parts


def test_absent_cached_field_means_every_input_token_at_the_input_price() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=0, num_model_requests=1)
    priced = _priced(price(SNAPSHOT, usage, RUN_TIME))
    assert priced.total_usd == GPT4O_MINI_IN
    assert priced.cache_savings_usd == 0


# ------------------------------------------------------------------ snapshots and dates


def test_unknown_snapshot_of_a_known_model_is_priced_as_its_base_and_says_so() -> None:
    priced = _priced(price("gpt-4o-mini-2099-01-01", BAES, RUN_TIME))
    assert priced.matched == "base_model"
    assert priced.lookup == "gpt-4o-mini"
    assert priced.total_usd == Decimal("0.0054939")
    assert any("base model 'gpt-4o-mini'" in n for n in priced.notes)
    assert priced.to_json()["matched"] == "base_model"


def test_known_snapshot_keeps_its_own_price_rather_than_the_alias() -> None:
    # gpt-4o-2024-05-13 is listed at $5/$15 without cache discount; the gpt-4o alias is cheaper
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, num_model_requests=1)
    old = _priced(price("gpt-4o-2024-05-13", usage, RUN_TIME))
    alias = _priced(price("gpt-4o", usage, RUN_TIME))
    assert old.matched == "table"
    assert old.total_usd == Decimal(20)
    assert alias.total_usd < old.total_usd


def test_prices_are_those_in_force_at_the_run_time() -> None:
    # o3's price was cut on 2025-06-10 (input 10 -> 2, output 40 -> 8 USD per 1M tokens)
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, num_model_requests=1)
    before = _priced(price("o3-2025-04-16", usage, datetime(2025, 6, 9, 23, 59, tzinfo=UTC)))
    after = _priced(price("o3-2025-04-16", usage, datetime(2025, 6, 10, 0, 0, tzinfo=UTC)))
    assert before.total_usd == Decimal(50)
    assert after.total_usd == Decimal(10)
    assert before.effective_from is None
    assert before.effective_until == date(2025, 6, 10)
    assert after.effective_from == date(2025, 6, 10)
    assert after.to_json()["price_effective_from"] == "2025-06-10"


def test_price_dates_follow_utc_not_the_local_offset() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=0, num_model_requests=1)
    # 01:00 on the 10th at UTC+2 is still the 9th in UTC: the old price
    east = datetime(2025, 6, 10, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    # 23:00 on the 9th at UTC-2 is already the 10th in UTC: the new price
    west = datetime(2025, 6, 9, 23, 0, tzinfo=timezone(timedelta(hours=-2)))
    assert _priced(price("o3", usage, east)).total_usd == Decimal(10)
    assert _priced(price("o3", usage, west)).total_usd == Decimal(2)


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        price(SNAPSHOT, BAES, datetime(2025, 10, 19, 10, 39))
    with pytest.raises(ValueError, match="timezone-aware"):
        price_models({SNAPSHOT: BAES}, datetime(2025, 10, 19))


# ------------------------------------------------------------------ what cannot be priced


def test_unknown_model_is_unpriced_never_zero() -> None:
    result = _unpriced(price("acme-llm-7", BAES, RUN_TIME))
    assert result.kind == "unknown_model"
    assert "acme-llm-7" in result.reason
    assert result.to_json() == {"kind": "unknown_model", "reason": result.reason}


def test_unknown_dated_model_whose_base_is_unknown_too_is_unpriced() -> None:
    result = _unpriced(price("acme-llm-2025-01-01", BAES, RUN_TIME))
    assert "base model" in result.reason


def test_cached_above_input_is_a_data_problem_not_clamped() -> None:
    bad = Usage(input_tokens=100, output_tokens=5, num_model_requests=1, input_cached_tokens=250)
    result = _unpriced(price(SNAPSHOT, bad, RUN_TIME))
    assert result.kind == "invalid_usage"
    assert "input_cached_tokens (250) exceeds input_tokens (100)" in result.reason


def test_a_price_table_without_the_model_gives_unpriced_and_reports_its_data() -> None:
    openai = next(p for p in bundled_providers if p.id == "openai")
    trimmed = dataclasses.replace(
        openai, models=[m for m in openai.models if m.id != "gpt-4o-mini"]
    )
    fetched = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    snapshot = data_snapshot.DataSnapshot(
        providers=[trimmed], from_auto_update=True, timestamp=fetched
    )
    with _custom_snapshot(snapshot):
        missing = _unpriced(price(SNAPSHOT, BAES, RUN_TIME))
        assert missing.kind == "unknown_model"
        cost = price_models({SNAPSHOT: BAES}, RUN_TIME)
        assert not cost.complete
        assert cost.total_usd == 0
        assert cost.cost_usd_value() is None
        assert cost.seed_cost_breakdown() is None
        other = _priced(price("o3", BAES, RUN_TIME))
        assert other.data_snapshot == f"auto-update {fetched.isoformat()}"
    assert isinstance(price(SNAPSHOT, BAES, RUN_TIME), Priced)


@contextmanager
def _custom_snapshot(snapshot: data_snapshot.DataSnapshot) -> Iterator[None]:
    """Install a price table the way genai-prices' updater does, and always remove it."""
    data_snapshot.set_custom_snapshot(snapshot)
    try:
        yield
    finally:
        data_snapshot.set_custom_snapshot(None)


def test_tiered_prices_over_many_requests_are_not_guessed() -> None:
    # gpt-5.4 charges more for prompts above 272k tokens, per request
    many = Usage(input_tokens=300_000, output_tokens=10, num_model_requests=2)
    result = _unpriced(price("gpt-5.4", many, RUN_TIME))
    assert result.kind == "tiered_price"
    assert "272,000" in result.reason
    # below the first tier every request was below it: base price, exact
    small = Usage(input_tokens=272_000, output_tokens=10, num_model_requests=50)
    assert _priced(price("gpt-5.4", small, RUN_TIME)).component("uncached_input") == Decimal("0.68")
    # one request: the tier is known
    one = Usage(input_tokens=300_000, output_tokens=0, num_model_requests=1)
    single = _priced(price("gpt-5.4", one, RUN_TIME))
    assert single.components[0].unit_price > Decimal("2.5")


def test_cache_writes_are_priced_at_the_cache_write_price() -> None:
    usage = Usage(
        input_tokens=100_000,
        output_tokens=0,
        num_model_requests=3,
        input_cached_tokens=20_000,
        input_cache_write_tokens=30_000,
        input_uncached_tokens=50_000,
    )
    priced = _priced(price("gpt-6-luna", usage, RUN_TIME))
    parts = {c.name: c for c in priced.components}
    assert parts["cache_write"].count == 30_000
    assert parts["cached_input"].count == 20_000
    assert parts["uncached_input"].count == 50_000
    assert parts["cache_write"].unit_price != parts["uncached_input"].unit_price
    assert sum(c.usd for c in priced.components) == priced.total_usd


def test_audio_is_priced_at_audio_rates_with_cached_audio_discounted() -> None:
    model = "gpt-4o-mini-realtime-preview"
    usage = Usage(
        input_tokens=3_000,
        output_tokens=5,
        num_model_requests=2,
        input_cached_tokens=100,
        input_audio_tokens=1_000,  # uncached audio
        input_cached_audio_tokens=50,
        output_audio_tokens=3,
    )
    priced = _priced(price(model, usage, RUN_TIME))
    counts = {c.name: c.count for c in priced.components}
    assert counts == {
        "uncached_input": 1_900,
        "cached_input": 50,  # cached text
        "input_audio": 1_000,
        "cached_input_audio": 50,
        "output": 2,
        "output_audio": 3,
    }
    expected = (
        1_900 * Decimal("0.6")
        + 50 * Decimal("0.3")
        + 1_000 * Decimal(10)
        + 50 * Decimal("0.3")
        + 2 * Decimal("2.4")
        + 3 * Decimal(20)
    ) / MTOK
    assert priced.total_usd == expected
    # cached audio saves against the audio price, cached text against the text price
    assert priced.cache_savings_usd == (50 * Decimal("9.7") + 50 * Decimal("0.3")) / MTOK


def test_audio_without_the_cached_audio_split_is_unpriced_with_the_reason() -> None:
    usage = Usage(
        input_tokens=3_000,
        output_tokens=5,
        num_model_requests=2,
        input_cached_tokens=100,
        input_audio_tokens=1_000,
    )
    result = _unpriced(price("gpt-4o-mini-realtime-preview", usage, RUN_TIME))
    assert result.kind == "invalid_usage"
    assert "cache_audio_read_tokens" in result.reason


def test_usage_mapping_adds_cached_modality_tokens_to_the_modality_total() -> None:
    usage = Usage(
        input_tokens=10,
        output_tokens=4,
        num_model_requests=1,
        input_cached_tokens=3,
        input_text_tokens=5,
        input_cached_text_tokens=3,
        output_text_tokens=4,
    )
    assert genai_usage_values(usage) == {
        "input_tokens": 10,
        "output_tokens": 4,
        "cache_read_tokens": 3,
        "input_text_tokens": 8,
        "cache_text_read_tokens": 3,
        "output_text_tokens": 4,
    }
    assert genai_usage_values(Usage(1, 2, 3)) == {"input_tokens": 1, "output_tokens": 2}


# ------------------------------------------------------------------ a run of several models


def test_run_total_is_complete_only_if_every_model_priced() -> None:
    other = Usage(input_tokens=1_000_000, output_tokens=0, num_model_requests=1)
    both = price_models({SNAPSHOT: BAES, "o3-2025-04-16": other}, RUN_TIME)
    assert both.complete
    assert both.total_usd == Decimal("0.0054939") + Decimal(2)
    assert set(both.priced) == {SNAPSHOT, "o3-2025-04-16"}

    partial = price_models({SNAPSHOT: BAES, "acme-llm-7": other}, RUN_TIME)
    assert not partial.complete
    assert partial.total_usd == Decimal("0.0054939")  # the priced part only
    assert set(partial.unpriced) == {"acme-llm-7"}
    assert partial.cost_usd_value() is None
    block = partial.to_json()
    assert block["complete"] is False
    assert block["unpriced"]["acme-llm-7"]["kind"] == "unknown_model"


def test_empty_usage_of_an_unknown_model_costs_nothing_and_is_not_listed() -> None:
    cost = price_models({SNAPSHOT: BAES, "acme-llm-7": Usage()}, RUN_TIME)
    assert cost.complete
    assert "acme-llm-7" not in cost.unpriced


def test_usage_without_a_model_is_reported_unpriced() -> None:
    total = BAES + Usage(input_tokens=500, output_tokens=20, num_model_requests=1)
    cost = price_models({SNAPSHOT: BAES}, RUN_TIME, total=total)
    assert not cost.complete
    assert cost.unpriced["(no model)"].kind == "no_model"
    assert "500 input / 20 output" in cost.unpriced["(no model)"].reason
    assert price_models({}, RUN_TIME, total=BAES).unpriced["(no model)"].kind == "no_model"
    assert price_models({}, RUN_TIME, total=Usage()).complete


def test_cost_block_is_json_and_exact() -> None:
    cost = price_models({SNAPSHOT: BAES}, RUN_TIME)
    block = json.loads(json.dumps(cost.to_json(), allow_nan=False))
    assert block["currency"] == "USD"
    assert block["complete"] is True
    assert block["total_usd_exact"] == "0.0054939"
    assert Decimal(block["total_usd_exact"]) == cost.total_usd
    assert block["total_usd"] == 0.0054939
    assert block["priced_at"] == RUN_TIME.isoformat()
    assert block["source"] == {
        "name": "genai-prices",
        "version": version("genai-prices"),
        "data": "bundled",
        "provider": "openai",
    }
    model = block["models"][SNAPSHOT]
    assert model["priced_as"] == "gpt-4o-mini"
    assert model["components"]["cached_input"] == {
        "tokens": 9_728,
        "usd_per_mtok": 0.075,
        "usd": 0.0007296,
    }
    assert block["components_usd"] == {
        "uncached_input": 0.0015633,
        "cached_input": 0.0007296,
        "output": 0.003201,
    }
    assert block["cache_savings_usd"] == 0.0007296
    assert block["unpriced"] == {}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0.0054939000"), "0.0054939"),
        (Decimal("5.4939E-3"), "0.0054939"),
        (Decimal("0E-10"), "0"),
        (Decimal(20), "20"),
        (Decimal("1E+2"), "100"),
    ],
)
def test_decimal_text_is_plain(value: Decimal, text: str) -> None:
    assert decimal_text(value) == text


def test_effective_dates_and_a_time_before_the_table_history() -> None:
    openai = next(p for p in bundled_providers if p.id == "openai")
    dated = ModelInfo(
        id="acme-dated",
        match=ClauseEquals(equals="acme-dated"),
        prices=[
            ConditionalPrice(
                constraint=StartDateConstraint(start_date=date(2025, 1, 1)),
                prices=ModelPrice(input_mtok=Decimal(1), output_mtok=Decimal(2)),
            ),
            ConditionalPrice(
                constraint=StartDateConstraint(start_date=date(2025, 6, 1)),
                prices=ModelPrice(input_mtok=Decimal("0.5"), output_mtok=Decimal(1)),
            ),
        ],
    )
    table = data_snapshot.DataSnapshot(
        providers=[dataclasses.replace(openai, models=[dated])], from_auto_update=False
    )
    usage = Usage(input_tokens=1_000_000, output_tokens=0, num_model_requests=1)
    with _custom_snapshot(table):
        early = _priced(price("acme-dated", usage, datetime(2024, 12, 31, 12, tzinfo=UTC)))
        middle = _priced(price("acme-dated", usage, datetime(2025, 3, 1, tzinfo=UTC)))
        # 2025-06-01 00:30 at UTC+1 is still May in UTC: the first price
        edge = _priced(
            price(
                "acme-dated",
                usage,
                datetime(2025, 6, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
            )
        )
    assert early.total_usd == Decimal(1)
    assert any("no price for acme-dated before 2025-01-01" in n for n in early.notes)
    assert (middle.effective_from, middle.effective_until) == (date(2025, 1, 1), date(2025, 6, 1))
    assert middle.notes == ()
    assert edge.total_usd == Decimal(1)
    assert edge.effective_until == date(2025, 6, 1)

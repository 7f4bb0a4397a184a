"""One normalised schema: Anthropic's disjoint usage mapped onto it, and what "no request
count" does to sums, splits and the breakdown."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.attribution import split_usage
from tokensettle.breakdown import (
    build_breakdown,
    cached_share,
    cached_tokens_value,
    counts_json,
    not_carried,
    usage_notes,
    usage_problems,
)
from tokensettle.usage import (
    MAX_REQUESTS_PER_MINUTE,
    Usage,
    UsageRowError,
    counts_requests,
    implausibility,
    usage_from_anthropic,
    usage_to_anthropic,
)


def _report_result(**changes: Any) -> dict[str, Any]:
    """The result of Anthropic's documented example answer (API reference, Get Messages
    Usage Report), dimension fields included."""
    result: dict[str, Any] = {
        "api_key_id": "apikey_01Rj2N8SVvo6BePZj99NhmiT",
        "cache_creation": {"ephemeral_1h_input_tokens": 1000, "ephemeral_5m_input_tokens": 500},
        "cache_read_input_tokens": 200,
        "context_window": "0-200k",
        "model": "claude-sonnet-4-20250514",
        "output_tokens": 500,
        "server_tool_use": {"web_search_requests": 10},
        "service_tier": "standard",
        "uncached_input_tokens": 1500,
        "workspace_id": "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ",
    }
    result.update(changes)
    return result


def test_the_worked_example_total_input_is_the_sum_of_the_disjoint_parts() -> None:
    """The bug peers make: Anthropic's uncached input (1,500) taken for TOK_IN. The run used
    1,500 uncached + 200 read from the cache + 500 + 1,000 written to it = 3,200 input
    tokens, 200 of them cached: what OpenAI would have called input_tokens and
    input_cached_tokens."""
    u = usage_from_anthropic(_report_result())
    assert u.input_tokens == 3_200  # TOK_IN, not 1,500
    assert u.input_cached_tokens == 200  # CACHED_TOKENS: cache reads only
    assert u.input_cache_write_tokens == 1_500  # 5m + 1h
    assert (u.input_cache_write_5m_tokens, u.input_cache_write_1h_tokens) == (500, 1_000)
    assert u.input_uncached_tokens == 1_500
    assert u.output_tokens == 500
    assert u.web_search_requests == 10
    assert u.total_tokens == 3_700
    # no request count in the report: 0 that means "not reported"
    assert u.num_model_requests == 0
    assert not u.requests_counted
    # what is written: the cached share of all input, and the breakdown adds up exactly
    assert cached_tokens_value(u) == 200
    assert cached_share(u) == pytest.approx(200 / 3_200)
    assert usage_problems(u) == [] and usage_notes(u) == []


def test_zero_cache_fields_are_carried_zeros() -> None:
    u = usage_from_anthropic(
        _report_result(
            cache_creation={"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
            cache_read_input_tokens=0,
            server_tool_use={"web_search_requests": 0},
        )
    )
    assert (u.input_tokens, u.input_cached_tokens, u.input_cache_write_tokens) == (1_500, 0, 0)
    assert u.web_search_requests == 0


@pytest.mark.parametrize("absent", [None, "missing"])
def test_web_searches_may_be_absent_and_are_then_not_carried(absent: str | None) -> None:
    result = _report_result(server_tool_use=absent)
    if absent == "missing":
        del result["server_tool_use"]
    u = usage_from_anthropic(result)
    assert u.web_search_requests is None
    assert u.input_tokens == 3_200
    assert usage_from_anthropic(_report_result(server_tool_use={})).web_search_requests is None


@pytest.mark.parametrize(
    "name", ["uncached_input_tokens", "cache_read_input_tokens", "output_tokens", "cache_creation"]
)
def test_a_missing_part_of_the_input_is_refused_not_taken_as_zero(name: str) -> None:
    result = _report_result()
    del result[name]
    with pytest.raises(UsageRowError, match=name):
        usage_from_anthropic(result)
    with pytest.raises(UsageRowError, match=name):
        usage_from_anthropic(_report_result(**{name: None}))


@pytest.mark.parametrize("ttl", ["ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"])
def test_cache_creation_needs_both_ttls(ttl: str) -> None:
    creation = {"ephemeral_1h_input_tokens": 1, "ephemeral_5m_input_tokens": 1}
    del creation[ttl]
    with pytest.raises(UsageRowError, match=rf"cache_creation: .*{ttl}"):
        usage_from_anthropic(_report_result(cache_creation=creation))


@pytest.mark.parametrize("bad", [1.0, 12.5, True, False, "12", [1], -1])
@pytest.mark.parametrize(
    "where",
    [
        "uncached_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
        "cache_creation.ephemeral_5m_input_tokens",
        "cache_creation.ephemeral_1h_input_tokens",
        "server_tool_use.web_search_requests",
    ],
)
def test_counters_must_be_non_negative_integers(where: str, bad: object) -> None:
    result = _report_result()
    outer, _, inner = where.partition(".")
    if inner:
        result[outer] = {**result[outer], inner: bad}
    else:
        result[outer] = bad
    with pytest.raises(UsageRowError, match=inner or outer):
        usage_from_anthropic(result)


@pytest.mark.parametrize("name", ["cache_creation", "server_tool_use"])
def test_nested_objects_must_be_objects(name: str) -> None:
    with pytest.raises(UsageRowError, match=f"{name!r} is list, expected object"):
        usage_from_anthropic(_report_result(**{name: [1]}))


def test_web_searches_are_bounded_like_requests_not_tokens() -> None:
    at_bound = Usage(input_tokens=10, web_search_requests=MAX_REQUESTS_PER_MINUTE)
    assert implausibility(at_bound) is None
    too_many = at_bound.replace(web_search_requests=MAX_REQUESTS_PER_MINUTE + 1)
    assert "web_search_requests" in str(implausibility(too_many))


# ------------------------------------------------------------------ the inverse


counter = st.integers(min_value=0, max_value=10**9)


@st.composite
def report_results(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "uncached_input_tokens": draw(counter),
        "cache_read_input_tokens": draw(counter),
        "cache_creation": {
            "ephemeral_5m_input_tokens": draw(counter),
            "ephemeral_1h_input_tokens": draw(counter),
        },
        "output_tokens": draw(counter),
        "server_tool_use": {"web_search_requests": draw(st.integers(0, 10**4))},
    }


@settings(max_examples=60)
@given(report_results())
def test_usage_to_anthropic_inverts_the_mapping(result: dict[str, Any]) -> None:
    usage = usage_from_anthropic(result)
    assert usage_to_anthropic(usage) == result
    assert usage_from_anthropic(usage_to_anthropic(usage)) == usage


@settings(max_examples=40)
@given(report_results(), report_results())
def test_the_mapping_is_additive(a: dict[str, Any], b: dict[str, Any]) -> None:
    summed = usage_from_anthropic(a) + usage_from_anthropic(b)
    assert usage_from_anthropic(usage_to_anthropic(summed)) == summed
    assert summed.input_tokens == sum(
        r["uncached_input_tokens"]
        + r["cache_read_input_tokens"]
        + sum(r["cache_creation"].values())
        for r in (a, b)
    )


def test_usage_to_anthropic_refuses_what_no_report_says() -> None:
    openai_style = Usage(input_tokens=100, output_tokens=1, num_model_requests=1)
    with pytest.raises(ValueError, match="lacks what Anthropic reports"):
        usage_to_anthropic(openai_style)
    parts = usage_from_anthropic(_report_result())
    with pytest.raises(ValueError, match="not its total"):
        usage_to_anthropic(parts.replace(input_tokens=parts.input_tokens + 1))


# ------------------------------------------------------------------ no request count


def test_providers_say_whether_they_count_requests() -> None:
    assert counts_requests("openai")
    assert not counts_requests("anthropic")
    assert not counts_requests("someone-else")  # unknown: never claim a count


def test_an_uncounted_part_makes_the_sum_uncounted() -> None:
    anthropic = usage_from_anthropic(_report_result())
    counted = Usage(input_tokens=5, output_tokens=1, num_model_requests=1)
    assert not (anthropic + counted).requests_counted
    assert not (counted + anthropic).requests_counted
    assert (counted + counted).requests_counted
    assert (Usage() + anthropic) == anthropic  # the empty usage is still the identity
    assert not Usage.total([anthropic, anthropic]).requests_counted


def test_present_and_from_fields_keep_the_flag_and_openai_output_unchanged() -> None:
    anthropic = usage_from_anthropic(_report_result())
    assert anthropic.present()["requests_counted"] is False
    assert Usage.from_fields(anthropic.present()) == anthropic
    counted = Usage(input_tokens=5, output_tokens=1, num_model_requests=1)
    assert "requests_counted" not in counted.present()
    assert Usage.from_fields(counted.present()) == counted


@settings(max_examples=40)
@given(report_results(), st.lists(st.integers(1, 1000), min_size=1, max_size=6))
def test_a_split_keeps_the_count_uncounted_in_every_part(
    result: dict[str, Any], weights: list[int]
) -> None:
    usage = usage_from_anthropic(result)
    parts = split_usage(usage, weights)
    assert all(not p.requests_counted for p in parts)
    assert Usage.total(parts) == usage


# ------------------------------------------------------------------ the breakdown


def test_the_breakdown_shows_cache_writes_by_ttl_and_web_searches_and_no_requests() -> None:
    u = usage_from_anthropic(_report_result())
    counts = counts_json(u)
    assert counts == {
        "input": {
            "total": 3_200,
            "cached": 200,
            "cache_write": 1_500,
            "cache_write_5m": 500,
            "cache_write_1h": 1_000,
            "uncached": 1_500,
        },
        "output": {"total": 500},
        "tools": {"web_search_requests": 10},
        "cached_share": round(200 / 3_200, 6),
    }
    assert "requests" not in counts  # not reported is absent, never 0
    assert not_carried(u, "anthropic") == ["requests"]
    without_searches = u.replace(web_search_requests=None)
    assert not_carried(without_searches, "anthropic") == ["tools.web_search_requests", "requests"]


def test_cache_writes_above_their_ttl_parts_or_below_are_reported() -> None:
    u = usage_from_anthropic(_report_result())
    over = u.replace(input_cache_write_1h_tokens=1_100)
    assert any("input_cache_write_tokens (1,500)" in p for p in usage_problems(over))
    under = u.replace(input_cache_write_tokens=1_600, input_tokens=3_300)
    assert any("input_cache_write_5m_tokens" in n for n in usage_notes(under))


def test_a_run_block_of_anthropic_usage() -> None:
    total = usage_from_anthropic(_report_result())
    block = build_breakdown(
        total,
        {"claude-sonnet-4-20250514": total},
        configured_model="claude-sonnet-4",
        provider="anthropic",
    ).to_json()
    assert block["problems"] == [] and block["notes"] == []
    assert block["not_carried"] == ["requests"]
    assert "requests" not in block["total"]
    assert block["models"]["claude-sonnet-4-20250514"]["tools"] == {"web_search_requests": 10}
    assert block["model_warning"] is None  # the alias of its dated snapshot
    assert "without_model" not in block


def test_an_openai_block_does_not_list_what_only_anthropic_reports() -> None:
    u = Usage(input_tokens=100, output_tokens=1, num_model_requests=1, input_cached_tokens=0)
    absent = build_breakdown(u, {}).to_json()["not_carried"]
    assert "input.cache_write_5m" not in absent and "tools.web_search_requests" not in absent
    assert "requests" not in absent
    assert "tools" not in counts_json(u)

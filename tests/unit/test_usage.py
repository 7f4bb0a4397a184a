"""Usage: exact additive counters, and parsing of Usage API result objects."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.usage import (
    ALL_OPTIONAL_FIELDS,
    INT64_MAX,
    MAX_REQUESTS_PER_MINUTE,
    MAX_TOKENS_PER_MINUTE,
    MAX_TOKENS_PER_REQUEST,
    OPENAI_OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    SDK_OPTIONAL_FIELDS,
    Scope,
    Usage,
    UsageRow,
    UsageRowError,
    implausibility,
    usage_from_result,
)

counts = st.integers(min_value=0, max_value=10**9)
small = st.integers(min_value=0, max_value=10**6)
OPENAI_FIELDS = REQUIRED_FIELDS + OPENAI_OPTIONAL_FIELDS


@st.composite
def usages(draw: st.DrawFn, *, fields: tuple[str, ...] = ALL_OPTIONAL_FIELDS) -> Usage:
    values: dict[str, Any] = {name: draw(counts) for name in REQUIRED_FIELDS}
    for name in fields:
        # web searches are calls, not tokens: a real minute has far fewer
        values[name] = draw(st.none() | (counts if name != "web_search_requests" else small))
    if fields is ALL_OPTIONAL_FIELDS:
        values["requests_counted"] = draw(st.booleans())
    return Usage(**values)


def _field_sum(items: list[Usage], name: str) -> int | None:
    present = [getattr(u, name) for u in items if getattr(u, name) is not None]
    return sum(present) if present else None


@settings(max_examples=60)
@given(usages(), usages())
def test_addition_is_commutative(a: Usage, b: Usage) -> None:
    assert a + b == b + a


@settings(max_examples=60)
@given(usages(), usages(), usages())
def test_addition_is_associative(a: Usage, b: Usage, c: Usage) -> None:
    assert (a + b) + c == a + (b + c)


@settings(max_examples=40)
@given(st.lists(usages(), max_size=5))
def test_total_is_field_wise_sum_and_none_only_when_absent_everywhere(items: list[Usage]) -> None:
    total = Usage.total(items)
    for name in REQUIRED_FIELDS:
        assert getattr(total, name) == sum(getattr(u, name) for u in items)
    for name in ALL_OPTIONAL_FIELDS:
        assert getattr(total, name) == _field_sum(items, name)


@settings(max_examples=40)
@given(usages())
def test_empty_usage_is_the_identity(a: Usage) -> None:
    assert a + Usage() == a
    assert Usage() + a == a


def test_none_plus_value_keeps_value_and_none_plus_none_stays_none() -> None:
    a = Usage(input_tokens=5, input_cached_tokens=None, output_audio_tokens=None)
    b = Usage(input_tokens=7, input_cached_tokens=3, output_audio_tokens=None)
    s = a + b
    assert s.input_tokens == 12
    assert s.input_cached_tokens == 3
    assert s.output_audio_tokens is None


def test_zero_optional_is_not_none() -> None:
    s = Usage(input_cached_tokens=0) + Usage()
    assert s.input_cached_tokens == 0
    assert "input_cached_tokens" in s.present()


def test_cached_tokens_and_total_tokens() -> None:
    assert Usage(input_tokens=10, output_tokens=4).cached_tokens == 0
    u = Usage(input_tokens=10, output_tokens=4, input_cached_tokens=6)
    assert u.cached_tokens == 6
    assert u.total_tokens == 14
    assert not u.is_empty
    assert Usage().is_empty
    assert not Usage(num_model_requests=1).is_empty


@settings(max_examples=40)
@given(usages())
def test_present_lists_required_fields_and_only_present_optional_ones(u: Usage) -> None:
    out = u.present()
    for name in REQUIRED_FIELDS:
        assert out[name] == getattr(u, name)
    for name in ALL_OPTIONAL_FIELDS:
        assert (name in out) == (getattr(u, name) is not None)
    assert Usage.from_fields(out) == u


# ------------------------------------------------------------------ usage_from_result


def _result(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "object": "organization.usage.completions.result",
        "input_tokens": 1200,
        "output_tokens": 300,
        "num_model_requests": 4,
        "input_cached_tokens": 256,
        "api_key_id": None,
        "project_id": None,
        "model": None,
        "batch": None,
    }
    base.update(extra)
    return base


def test_usage_from_result_reads_counters_and_ignores_unknown_keys() -> None:
    u = usage_from_result(_result(some_new_field="x", input_audio_tokens=0))
    assert u.input_tokens == 1200
    assert u.output_tokens == 300
    assert u.num_model_requests == 4
    assert u.input_cached_tokens == 256
    assert u.input_audio_tokens == 0
    assert u.output_audio_tokens is None


def test_usage_from_result_optional_null_is_none() -> None:
    u = usage_from_result(_result(input_cached_tokens=None))
    assert u.input_cached_tokens is None


@pytest.mark.parametrize("name", REQUIRED_FIELDS)
def test_usage_from_result_rejects_missing_required_field(name: str) -> None:
    result = _result()
    del result[name]
    with pytest.raises(UsageRowError, match=name):
        usage_from_result(result)


@pytest.mark.parametrize("name", REQUIRED_FIELDS)
def test_usage_from_result_rejects_null_required_field(name: str) -> None:
    with pytest.raises(UsageRowError, match=name):
        usage_from_result(_result(**{name: None}))


@pytest.mark.parametrize("name", OPENAI_FIELDS)
@pytest.mark.parametrize("bad", [1.0, 12.5, True, False, "12", [1], -1])
def test_usage_from_result_rejects_floats_booleans_strings_negatives(
    name: str, bad: object
) -> None:
    with pytest.raises(UsageRowError, match=name):
        usage_from_result(_result(**{name: bad}))


@settings(max_examples=40)
@given(usages(fields=OPENAI_OPTIONAL_FIELDS))
def test_usage_from_result_round_trips_present(u: Usage) -> None:
    assert usage_from_result(u.present()) == u


def test_usage_from_result_reads_no_anthropic_field() -> None:
    u = usage_from_result(_result(web_search_requests=3, input_cache_write_5m_tokens=9))
    assert u.web_search_requests is None
    assert u.input_cache_write_5m_tokens is None
    assert u.requests_counted


def test_sdk_cache_write_retention_fields_are_read_and_added() -> None:
    u = usage_from_result(_result(input_cache_write_30m_tokens=70, input_cache_write_12h_tokens=30))
    assert (u.input_cache_write_30m_tokens, u.input_cache_write_12h_tokens) == (70, 30)
    assert set(SDK_OPTIONAL_FIELDS) <= set(OPENAI_FIELDS)
    assert (u + usage_from_result(_result())).input_cache_write_30m_tokens == 70


# ------------------------------------------------------------------ plausibility


@settings(max_examples=60)
@given(usages())
def test_counts_of_real_magnitude_are_plausible(u: Usage) -> None:
    # up to 1e9 per token counter over a thousand requests: far below every bound
    assert implausibility(u.replace(num_model_requests=1000)) is None


def test_each_bound_is_the_edge() -> None:
    at_minute = Usage(MAX_TOKENS_PER_MINUTE, 0, MAX_REQUESTS_PER_MINUTE)
    assert implausibility(at_minute) is None
    assert "per minute" in str(implausibility(at_minute.replace(output_tokens=1)))
    assert "model requests" in str(implausibility(Usage(1, 0, MAX_REQUESTS_PER_MINUTE + 1)))
    one = Usage(MAX_TOKENS_PER_REQUEST, 0, 1)
    assert implausibility(one) is None
    assert "per model request" in str(
        implausibility(one.replace(input_tokens=one.input_tokens + 1))
    )
    # tokens without requests are held by the per-minute bound only
    assert implausibility(Usage(10**9, 0, 0)) is None
    assert "64-bit" in str(implausibility(Usage(0, 0, 0, input_audio_tokens=INT64_MAX + 1)))


def test_wider_buckets_scale_the_per_minute_bounds() -> None:
    hour = Usage(MAX_TOKENS_PER_MINUTE * 60, 0, MAX_REQUESTS_PER_MINUTE * 60)
    assert implausibility(hour, bucket_seconds=3600) is None
    assert implausibility(hour, bucket_seconds=60) is not None


def test_a_day_of_rows_at_the_bounds_still_fits_64_bits() -> None:
    # why the bounds are what they are: 10,000 results a minute for a whole day at the
    # per-minute bound sum to less than a signed 64-bit integer holds
    assert MAX_TOKENS_PER_MINUTE * 10_000 * 1_440 < INT64_MAX


def test_a_huge_count_is_described_without_float_overflow() -> None:
    message = implausibility(Usage(10**400, 0, 1))
    assert message is not None and "~1e400" in message


# ------------------------------------------------------------------ Scope


def _row(key: str | None, project: str | None) -> UsageRow:
    return UsageRow(minute=0, usage=Usage(input_tokens=1), api_key_id=key, project_id=project)


def test_empty_scope_is_the_organisation_and_matches_everything() -> None:
    scope = Scope()
    assert scope.is_organisation
    assert scope.to_json()["organisation_wide"] is True
    for key in ("key_a", None):
        for project in ("proj_a", None):
            assert scope.matches(_row(key, project))


def test_scope_dimensions_are_anded() -> None:
    scope = Scope(frozenset({"key_a"}), frozenset({"proj_a"}))
    assert not scope.is_organisation
    assert scope.matches(_row("key_a", "proj_a"))
    assert not scope.matches(_row("key_a", "proj_b"))
    assert not scope.matches(_row("key_b", "proj_a"))
    assert not scope.matches(_row(None, "proj_a"))
    assert not scope.matches(_row("key_a", None))


def test_scope_with_one_dimension_ignores_the_other() -> None:
    scope = Scope(api_key_ids=frozenset({"key_a", "key_b"}))
    assert scope.matches(_row("key_b", "anything"))
    assert scope.matches(_row("key_a", None))
    assert not scope.matches(_row("key_c", "anything"))
    assert scope.to_json() == {
        "provider": "openai",
        "api_key_ids": ["key_a", "key_b"],
        "project_ids": [],
        "organisation_wide": False,
    }

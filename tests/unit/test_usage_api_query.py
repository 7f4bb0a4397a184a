"""Pure parts of the Usage API client: the query it sends and how it reads a page."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokensettle.usage import Usage, UsageRow
from tokensettle.usage_api import (
    AuthError,
    Filters,
    MalformedResponseError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    build_query,
    decode_page,
    parse_page,
    parse_retry_after,
    query_params,
)
from tokensettle.windows import Interval

T0 = 1_760_612_520  # 2025-10-16 11:02 UTC, minute-aligned
RESULT = "organization.usage.completions.result"


def _result(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "object": RESULT,
        "input_tokens": 10,
        "output_tokens": 5,
        "num_model_requests": 1,
        "project_id": None,
        "user_id": None,
        "api_key_id": None,
        "model": None,
        "batch": None,
        "service_tier": None,
    }
    base.update(fields)
    return base


def _bucket(start: int, results: list[dict[str, Any]], end: int | None = None) -> dict[str, Any]:
    return {
        "object": "bucket",
        "start_time": start,
        "end_time": start + 60 if end is None else end,
        "results": results,
    }


def _page(
    buckets: list[dict[str, Any]], has_more: bool = False, next_page: str | None = None
) -> dict[str, Any]:
    return {"object": "page", "data": buckets, "has_more": has_more, "next_page": next_page}


# ---------------------------------------------------------------------------- build_query


def test_query_has_integer_times_width_limit_and_grouping_as_repeated_keys() -> None:
    interval = Interval(T0, T0 + 90 * 60)
    assert build_query(interval) == [
        ("start_time", str(T0)),
        ("end_time", str(T0 + 5400)),
        ("bucket_width", "1m"),
        ("limit", "90"),
        ("group_by", "api_key_id"),
        ("group_by", "project_id"),
        ("group_by", "model"),
    ]


def test_limit_is_capped_at_1440_buckets() -> None:
    pairs = dict(build_query(Interval(T0, T0 + 3000 * 60)))
    assert pairs["limit"] == "1440"
    assert dict(build_query(Interval(T0, T0 + 1440 * 60)))["limit"] == "1440"
    assert dict(build_query(Interval(T0, T0 + 60)))["limit"] == "1"


def test_filters_are_sorted_repeated_keys_and_page_comes_last() -> None:
    filters = Filters(api_key_ids=frozenset({"key_b", "key_a"}), project_ids=frozenset({"proj_z"}))
    pairs = build_query(Interval(T0, T0 + 60), filters, page="page_abc=")
    assert [p for p in pairs if p[0] == "api_key_ids"] == [
        ("api_key_ids", "key_a"),
        ("api_key_ids", "key_b"),
    ]
    assert [p for p in pairs if p[0] == "project_ids"] == [("project_ids", "proj_z")]
    assert pairs[-1] == ("page", "page_abc=")
    # every pair except the page is the base query, unchanged
    assert pairs[:-1] == build_query(Interval(T0, T0 + 60), filters)


def test_empty_filters_send_no_filter_keys() -> None:
    keys = {k for k, _ in build_query(Interval(T0, T0 + 60), Filters())}
    assert keys == {"start_time", "end_time", "bucket_width", "limit", "group_by"}


def test_query_params_lists_arrays() -> None:
    filters = Filters(api_key_ids=frozenset({"key_a"}))
    params = query_params(build_query(Interval(T0, T0 + 120), filters))
    assert params == {
        "start_time": str(T0),
        "end_time": str(T0 + 120),
        "bucket_width": "1m",
        "limit": "2",
        "group_by": ["api_key_id", "project_id", "model"],
        "api_key_ids": ["key_a"],
    }


@given(
    start_minute=st.integers(min_value=0, max_value=40_000_000),
    minutes=st.integers(min_value=1, max_value=20_000),
)
def test_times_are_always_plain_integers(start_minute: int, minutes: int) -> None:
    interval = Interval(start_minute * 60, (start_minute + minutes) * 60)
    pairs = dict(build_query(interval))
    assert pairs["start_time"].isdigit() and int(pairs["start_time"]) == interval.start
    assert pairs["end_time"].isdigit() and int(pairs["end_time"]) == interval.end
    assert 1 <= int(pairs["limit"]) <= 1440
    assert int(pairs["limit"]) == min(minutes, 1440)


# ---------------------------------------------------------------------------- parse_page


def test_page_rows_use_the_bucket_minute_and_keep_optional_fields() -> None:
    interval = Interval(T0, T0 + 180)
    body = _page(
        [
            _bucket(
                T0,
                [_result(api_key_id="key_a", project_id="proj_a", model="gpt-4o-mini-2024-07-18")],
            ),
            _bucket(T0 + 60, []),
            _bucket(
                T0 + 120,
                [
                    _result(input_tokens=7, input_cached_tokens=3, api_key_id="key_b"),
                    _result(input_tokens=1, output_tokens=0, num_model_requests=2),
                ],
            ),
        ]
    )
    page = parse_page(body, interval)
    assert page.has_more is False and page.next_page is None
    assert page.bucket_starts == (T0, T0 + 60, T0 + 120)
    assert page.rows == (
        UsageRow(T0, Usage(10, 5, 1), "key_a", "proj_a", "gpt-4o-mini-2024-07-18"),
        UsageRow(T0 + 120, Usage(7, 5, 1, input_cached_tokens=3), "key_b", None, None),
        UsageRow(T0 + 120, Usage(1, 0, 2), None, None, None),
    )


def test_clipped_first_bucket_maps_to_its_minute_slot() -> None:
    # A server may clip the first bucket to an unaligned requested start.
    page = parse_page(_page([_bucket(T0 + 17, [_result()], end=T0 + 60)]), Interval(T0, T0 + 60))
    assert [r.minute for r in page.rows] == [T0]


def test_buckets_outside_the_interval_are_ignored() -> None:
    body = _page(
        [
            _bucket(T0 - 60, [_result(input_tokens=999)]),
            _bucket(T0, [_result(input_tokens=1)]),
            _bucket(T0 + 60, [_result(input_tokens=999)]),
        ]
    )
    page = parse_page(body, Interval(T0, T0 + 60))
    assert [r.usage.input_tokens for r in page.rows] == [1]
    assert page.bucket_starts == (T0,)


def test_unknown_result_fields_are_ignored_and_cursor_is_kept() -> None:
    body = _page([_bucket(T0, [_result(api_source="agents_api", input_future_tokens=4)])])
    body["has_more"], body["next_page"] = True, "page_AAAA"
    page = parse_page(body, Interval(T0, T0 + 60))
    assert page.has_more and page.next_page == "page_AAAA"
    assert page.rows[0].usage == Usage(10, 5, 1)


def test_sdk_cache_write_fields_are_carried_into_usage() -> None:
    result = _result(
        input_cache_write_tokens=9, input_cache_write_30m_tokens=4, input_cache_write_12h_tokens=5
    )
    (row,) = parse_page(_page([_bucket(T0, [result])]), Interval(T0, T0 + 60)).rows
    usage = row.usage
    assert (usage.input_cache_write_30m_tokens, usage.input_cache_write_12h_tokens) == (4, 5)
    assert usage.present()["input_cache_write_30m_tokens"] == 4
    # absent in an older row: not carried, and a sum keeps the carried part
    older = parse_page(_page([_bucket(T0, [_result()])]), Interval(T0, T0 + 60)).rows[0].usage
    assert older.input_cache_write_12h_tokens is None
    assert (usage + older).input_cache_write_12h_tokens == 5


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"input_tokens": 10**15}, "plausible"),  # the torture harness's page
        ({"input_tokens": 10**20}, "64-bit"),  # crashed the index at every start
        ({"output_tokens": 2 * 10**11}, "plausible"),
        ({"input_cached_tokens": 2**63}, "64-bit"),  # an optional counter too
        ({"input_tokens": 5 * 10**8, "num_model_requests": 2}, "per model request"),
        ({"num_model_requests": 10**9}, "model requests"),
    ],
)
def test_implausible_counts_are_a_malformed_page(fields: dict[str, int], needle: str) -> None:
    body = _page([_bucket(T0, [_result(**fields)])])
    with pytest.raises(MalformedResponseError, match="implausible counts") as info:
        parse_page(body, Interval(T0, T0 + 60))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_large_but_real_counts_are_data() -> None:
    # a minute of a busy Tier 5 key: 150M tokens over 30,000 requests, some at full context
    busy = _result(input_tokens=140_000_000, output_tokens=10_000_000, num_model_requests=30_000)
    full_context = _result(input_tokens=1_015_000, output_tokens=32_768, num_model_requests=1)
    page = parse_page(_page([_bucket(T0, [busy, full_context])]), Interval(T0, T0 + 60))
    assert [r.usage.input_tokens for r in page.rows] == [140_000_000, 1_015_000]


def _mutate(path: str, value: Any) -> dict[str, Any]:
    body = _page([_bucket(T0, [_result()]), _bucket(T0 + 60, [])])
    target: Any = body
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last = parts[-1]
    if value is _DELETE:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return body


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("object", "list"),
        ("data", {"0": 1}),
        ("has_more", _DELETE),
        ("has_more", "false"),
        ("next_page", 5),
        ("data.0", "bucket"),
        ("data.0.start_time", 1760612520.5),
        ("data.0.start_time", True),
        ("data.0.start_time", _DELETE),
        ("data.0.end_time", "x"),
        ("data.0.results", None),
        ("data.0.results.0", 17),
        ("data.0.results.0.object", "organization.usage.embeddings.result"),
        ("data.0.results.0.input_tokens", _DELETE),
        ("data.0.results.0.output_tokens", "5"),
        ("data.0.results.0.num_model_requests", -1),
        ("data.0.results.0.input_cached_tokens", 1.5),
        ("data.0.results.0.api_key_id", 12),
        ("data.1.start_time", T0),  # bucket repeated inside a page
    ],
)
def test_malformed_pages_are_rejected(path: str, value: Any) -> None:
    with pytest.raises(MalformedResponseError, match="malformed Usage API page"):
        parse_page(_mutate(path, value), Interval(T0, T0 + 120))


@pytest.mark.parametrize("body", [[], "page", None, 3])
def test_non_object_bodies_are_rejected(body: Any) -> None:
    with pytest.raises(MalformedResponseError):
        parse_page(body, Interval(T0, T0 + 60))


@pytest.mark.parametrize(
    "raw", [b'{"object": "page", "data": [', b"", b"\xff\xfe", b"<html>502</html>"]
)
def test_decode_page_rejects_bodies_that_are_not_json(raw: bytes) -> None:
    with pytest.raises(MalformedResponseError, match="not JSON"):
        decode_page(raw, Interval(T0, T0 + 60))


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"nested": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"object": "page", "count": ' + b"9" * 5_000 + b"}", "integer too long"),
        (json.dumps(_page([_bucket(T0, [_result(input_tokens=10**4000)])])).encode(), "64-bit"),
    ],
)
def test_hostile_json_is_a_malformed_page_not_a_crash(raw: bytes, needle: str) -> None:
    """A 100k-deep body raised RecursionError and a 5,000-digit integer ValueError, both
    out of the client (issue 7, item 15); each is now that page's one-line failure."""
    with pytest.raises(MalformedResponseError, match="malformed Usage API page") as info:
        decode_page(raw, Interval(T0, T0 + 60))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_decode_page_round_trip() -> None:
    raw = json.dumps(_page([_bucket(T0, [_result(model="gpt-4o-mini-2024-07-18")])])).encode()
    page = decode_page(raw, Interval(T0, T0 + 60))
    assert page.rows == (UsageRow(T0, Usage(10, 5, 1), None, None, "gpt-4o-mini-2024-07-18"),)


# ---------------------------------------------------------------------------- retry pieces


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "1"}, 1.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "bogus", "Retry-After": "3"}, 3.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-4"}, None),
        ({"Retry-After": "nan"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, 0.0) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_760_612_520.0
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert parse_retry_after({"retry-after": date}, now) == pytest.approx(30.0)


@given(
    attempt=st.integers(min_value=1, max_value=40),
    base=st.floats(min_value=0.0, max_value=5.0),
    cap=st.floats(min_value=0.0, max_value=60.0),
    seed=st.integers(),
)
def test_backoff_is_full_jitter_under_the_exponential_ceiling(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    policy = RetryPolicy(base=base, cap=cap)
    delay = policy.backoff(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** (attempt - 1))


def test_backoff_jitters() -> None:
    rng = random.Random(7)
    delays = {RetryPolicy(base=1.0).backoff(3, rng) for _ in range(20)}
    assert len(delays) == 20 and max(delays) <= 4.0


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(base=-1)


def test_errors_carry_status_and_readable_text() -> None:
    err = AuthError("Usage API answered HTTP 403: Missing scopes: api.usage.read.", status=403)
    assert err.status == 403 and not err.retryable
    assert str(err) == "Usage API answered HTTP 403: Missing scopes: api.usage.read."
    assert repr(err).startswith("AuthError(") and "403" in repr(err)
    assert RateLimitedError("x").retryable and ServerError("x").retryable

"""The simulator's pure model: visibility, revisions, buckets, grouping, pages, validation."""

from __future__ import annotations

import base64
import itertools
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.simulator.scenario import (
    MISSING_SCOPE_MESSAGE,
    RESULT_DIMENSIONS,
    SIMULATOR_ADMIN_KEY,
    ApiError,
    BucketGrid,
    Fault,
    Revision,
    Scenario,
    ScenarioError,
    UsageQuery,
    VirtualRequest,
    build_page,
    check_auth,
    parse_query,
    request_from_json,
)
from tokensettle.usage import Usage, UsageRow

DAY = 86_400
T0 = 1_760_572_800  # 2025-10-16 00:00:00 UTC (a UTC midnight)
NOW = T0 + DAY  # "now" for most tests: a day after T0
MINI = "gpt-4o-mini-2024-07-18"
FOUR_O = "gpt-4o-2024-08-06"


def vreq(
    time: float,
    usage: Usage,
    *,
    key: str = "key_a",
    project: str = "proj_a",
    model: str = MINI,
    after: float = 0.0,
    registered_at: float = 0.0,
    more: Sequence[Revision] = (),
) -> VirtualRequest:
    return VirtualRequest(
        time=time,
        api_key_id=key,
        project_id=project,
        model=model,
        revisions=(Revision(after, usage), *more),
        registered_at=registered_at,
    )


def q(**params: str | list[str]) -> UsageQuery:
    pairs: list[tuple[str, str]] = []
    for k, v in params.items():
        pairs.extend((k, x) for x in v) if isinstance(v, list) else pairs.append((k, v))
    return parse_query(pairs)


def page(scenario: Scenario, now: float = NOW, **params: str | list[str]) -> dict[str, Any]:
    return build_page(q(**params), scenario.visible_rows(now), now, seed=None)


def all_results(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for b in body["data"] for r in b["results"]]


# ---------------------------------------------------------------------------- visibility


def test_request_is_invisible_until_its_first_revision() -> None:
    s = Scenario([vreq(T0 + 5, Usage(10, 2, 1), after=300, registered_at=1000.0)])
    assert s.visible_rows(1000.0 + 299.9) == []
    assert s.visible_rows(1000.0 + 300) == [UsageRow(T0, Usage(10, 2, 1), "key_a", "proj_a", MINI)]


def test_later_revisions_replace_the_usage_and_truth_is_the_last() -> None:
    r = vreq(
        T0 + 5,
        Usage(10, 2, 1),
        registered_at=0.0,
        more=(Revision(600, Usage(40, 9, 1)), Revision(120, Usage(25, 5, 1))),
    )
    s = Scenario([r])
    assert [x.after for x in r.revisions] == [0.0, 120.0, 600.0]  # sorted by time
    assert s.visible_rows(60)[0].usage == Usage(10, 2, 1)
    assert s.visible_rows(120)[0].usage == Usage(25, 5, 1)
    assert s.visible_rows(10_000)[0].usage == Usage(40, 9, 1)
    assert s.truth() == [UsageRow(T0, Usage(40, 9, 1), "key_a", "proj_a", MINI)]


def test_rows_are_summed_per_minute_key_project_model() -> None:
    s = Scenario(
        [
            vreq(T0 + 1, Usage(1, 1, 1, input_cached_tokens=1)),
            vreq(T0 + 59.9, Usage(2, 2, 1)),
            vreq(T0 + 60, Usage(4, 4, 1)),
            vreq(T0 + 2, Usage(8, 8, 1), key="key_b"),
            vreq(T0 + 3, Usage(16, 16, 1), model=FOUR_O),
        ]
    )
    assert s.truth() == [
        UsageRow(T0, Usage(16, 16, 1), "key_a", "proj_a", FOUR_O),
        UsageRow(T0, Usage(3, 3, 2, input_cached_tokens=1), "key_a", "proj_a", MINI),
        UsageRow(T0, Usage(8, 8, 1), "key_b", "proj_a", MINI),
        UsageRow(T0 + 60, Usage(4, 4, 1), "key_a", "proj_a", MINI),
    ]


def test_virtual_request_needs_a_revision_and_no_negative_delay() -> None:
    with pytest.raises(ScenarioError):
        VirtualRequest(T0, "k", "p", MINI, ())
    with pytest.raises(ScenarioError):
        vreq(T0, Usage(), after=-1)


# ---------------------------------------------------------------------------- buckets


def test_one_minute_buckets_with_empty_ones_present() -> None:
    s = Scenario([vreq(T0 + 70, Usage(5, 1, 1))])
    body = page(s, start_time=str(T0), end_time=str(T0 + 180), bucket_width="1m")
    assert [(b["start_time"], b["end_time"]) for b in body["data"]] == [
        (T0, T0 + 60),
        (T0 + 60, T0 + 120),
        (T0 + 120, T0 + 180),
    ]
    assert [len(b["results"]) for b in body["data"]] == [0, 1, 0]
    assert all(b["object"] == "bucket" for b in body["data"])
    assert body["object"] == "page" and body["has_more"] is False and body["next_page"] is None


def test_mid_minute_start_drops_that_minute() -> None:
    s = Scenario([vreq(T0 + 45, Usage(5, 1, 1)), vreq(T0 + 65, Usage(7, 1, 1))])
    aligned = page(s, start_time=str(T0), end_time=str(T0 + 120), bucket_width="1m")
    assert [r["input_tokens"] for r in all_results(aligned)] == [5, 7]
    mid = page(s, start_time=str(T0 + 30), end_time=str(T0 + 120), bucket_width="1m")
    # the first bucket is clipped to the requested start and the T0 slot is not in it
    assert mid["data"][0]["start_time"] == T0 + 30 and mid["data"][0]["end_time"] == T0 + 60
    assert mid["data"][0]["results"] == []
    assert [r["input_tokens"] for r in all_results(mid)] == [7]


def test_slot_starting_before_end_time_is_included_even_if_end_is_mid_minute() -> None:
    s = Scenario([vreq(T0 + 65, Usage(7, 1, 1))])
    body = page(s, start_time=str(T0), end_time=str(T0 + 61), bucket_width="1m")
    assert body["data"][-1]["start_time"] == T0 + 60 and body["data"][-1]["end_time"] == T0 + 61
    assert [r["input_tokens"] for r in all_results(body)] == [7]
    body = page(s, start_time=str(T0), end_time=str(T0 + 60), bucket_width="1m")
    assert all_results(body) == []


def test_last_bucket_is_clipped_to_now_and_end_time_defaults_to_now() -> None:
    now = T0 + 150.7
    s = Scenario([vreq(T0 + 130, Usage(3, 1, 1))])
    body = page(s, now, start_time=str(T0), bucket_width="1m")
    assert [(b["start_time"], b["end_time"]) for b in body["data"]][-1] == (T0 + 120, T0 + 150)
    assert [r["input_tokens"] for r in all_results(body)] == [3]
    future_end = page(s, now, start_time=str(T0), end_time=str(T0 + 3600), bucket_width="1m")
    assert future_end["data"] == body["data"]


def test_start_in_the_future_gives_no_buckets() -> None:
    body = page(Scenario(), NOW, start_time=str(NOW + 600), bucket_width="1m")
    assert body == {"object": "page", "data": [], "has_more": False, "next_page": None}


def test_day_buckets_align_to_utc_midnight_after_a_clipped_first_bucket() -> None:
    start = T0 + 5 * 3600 + 17  # 05:00:17 UTC
    s = Scenario([vreq(T0 + DAY + 10, Usage(2, 2, 1))])
    body = page(s, T0 + 3 * DAY + 99, start_time=str(start), bucket_width="1d")
    spans = [(b["start_time"], b["end_time"]) for b in body["data"]]
    assert spans == [
        (start, T0 + DAY),
        (T0 + DAY, T0 + 2 * DAY),
        (T0 + 2 * DAY, T0 + 3 * DAY),
        (T0 + 3 * DAY, T0 + 3 * DAY + 99),
    ]
    assert [len(b["results"]) for b in body["data"]] == [0, 1, 0, 0]


def test_hour_buckets_and_default_limits() -> None:
    body = page(Scenario(), T0 + 30 * 3600, start_time=str(T0), bucket_width="1h")
    assert len(body["data"]) == 24 and body["has_more"] is True  # default 24 per page
    assert all(b["end_time"] - b["start_time"] == 3600 for b in body["data"])
    body = page(Scenario(), T0 + 10 * DAY, start_time=str(T0))  # default width 1d, limit 7
    assert len(body["data"]) == 7 and body["data"][0]["end_time"] == T0 + DAY
    body = page(Scenario(), T0 + DAY, start_time=str(T0), bucket_width="1m")
    assert len(body["data"]) == 60


@given(
    start=st.integers(min_value=0, max_value=4 * DAY),
    length=st.integers(min_value=1, max_value=5 * DAY),
    width=st.sampled_from([60, 3600, DAY]),
)
def test_bucket_grid_tiles_the_range(start: int, length: int, width: int) -> None:
    grid = BucketGrid(start, start + length, width)
    spans = [grid.bucket(k) for k in range(len(grid))]
    assert spans[0][0] == start and spans[-1][1] == start + length
    for (_, e1), (s2, _) in itertools.pairwise(spans):
        assert e1 == s2 and s2 % width == 0
    assert all(e - s <= width for s, e in spans)
    for k, (s, _) in enumerate(spans):
        assert grid.index_of(s) == k and grid.index_starting_at(s) == k


# ---------------------------------------------------------------------------- grouping


def _mixed() -> Scenario:
    return Scenario(
        [
            vreq(T0 + 1, Usage(1, 10, 1), key="key_a", project="proj_a", model=MINI),
            vreq(T0 + 2, Usage(2, 20, 1, input_cached_tokens=2), key="key_b", project="proj_a"),
            vreq(T0 + 3, Usage(4, 40, 1), key="key_b", project="proj_b", model=FOUR_O),
        ]
    )


def test_without_group_by_one_result_with_all_six_dimensions_null() -> None:
    body = page(_mixed(), start_time=str(T0), end_time=str(T0 + 120), bucket_width="1m")
    assert [len(b["results"]) for b in body["data"]] == [1, 0]
    result = body["data"][0]["results"][0]
    assert result == {
        "object": "organization.usage.completions.result",
        "input_tokens": 7,
        "output_tokens": 70,
        "num_model_requests": 3,
        "input_cached_tokens": 2,
        **dict.fromkeys(RESULT_DIMENSIONS),
    }


def test_group_by_fills_only_the_grouped_fields() -> None:
    body = page(
        _mixed(), start_time=str(T0), end_time=str(T0 + 60), bucket_width="1m", group_by=["model"]
    )
    results = body["data"][0]["results"]
    by_model = {r["model"]: r for r in results}
    assert set(by_model) == {MINI, FOUR_O}
    assert by_model[MINI]["input_tokens"] == 3 and by_model[FOUR_O]["input_tokens"] == 4
    for r in results:
        assert all(r[d] is None for d in RESULT_DIMENSIONS if d != "model")


def test_group_by_all_three_dims_gives_one_result_per_combination() -> None:
    body = page(
        _mixed(),
        start_time=str(T0),
        end_time=str(T0 + 60),
        bucket_width="1m",
        group_by=["api_key_id", "project_id", "model"],
    )
    combos = {(r["api_key_id"], r["project_id"], r["model"]) for r in all_results(body)}
    assert combos == {
        ("key_a", "proj_a", MINI),
        ("key_b", "proj_a", MINI),
        ("key_b", "proj_b", FOUR_O),
    }


def test_group_by_unmodelled_dimension_is_null() -> None:
    body = page(
        _mixed(), start_time=str(T0), end_time=str(T0 + 60), bucket_width="1m", group_by="user_id"
    )
    assert [(r["user_id"], r["input_tokens"]) for r in all_results(body)] == [(None, 7)]


#: The `group_by` enum of the official SDK for usage/completions (openai 3.57.0,
#: `types/admin/organization/usage_completions_params.py`): the spec's six + api_source.
SDK_GROUP_BY = (
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
    "service_tier",
    "api_source",
)


@pytest.mark.parametrize("value", SDK_GROUP_BY)
def test_every_group_by_value_the_sdk_sends_is_accepted(value: str) -> None:
    # `group_by[]=` as the SDK encodes arrays; api_source gave 400 before (issue 7, item 10)
    query = parse_query([("start_time", str(T0)), ("group_by[]", value)])
    assert query.group_by == (value,)


def test_group_by_api_source_says_unlabeled_and_ungrouped_it_is_null() -> None:
    grouped = page(
        _mixed(),
        start_time=str(T0),
        end_time=str(T0 + 60),
        bucket_width="1m",
        group_by=["api_source", "model"],
    )
    assert sorted((r["api_source"], r["model"]) for r in all_results(grouped)) == [
        ("unlabeled", FOUR_O),
        ("unlabeled", MINI),
    ]
    plain = page(_mixed(), start_time=str(T0), end_time=str(T0 + 60), bucket_width="1m")
    assert [r["api_source"] for r in all_results(plain)] == [None]


def test_sdk_cache_write_fields_are_served_where_registered() -> None:
    usage = Usage(
        1000,
        10,
        1,
        input_cache_write_tokens=300,
        input_cache_write_30m_tokens=200,
        input_cache_write_12h_tokens=100,
    )
    body = page(Scenario([vreq(T0 + 1, usage)]), start_time=str(T0), bucket_width="1m", limit="1")
    (result,) = all_results(body)
    assert (result["input_cache_write_30m_tokens"], result["input_cache_write_12h_tokens"]) == (
        200,
        100,
    )
    registered = request_from_json(
        {
            "time": T0,
            "api_key_id": "k",
            "project_id": "p",
            "model": MINI,
            "usage": {"input_tokens": 5, "input_cache_write_12h_tokens": 5},
        },
        registered_at=0,
    )
    assert registered.final_usage.input_cache_write_12h_tokens == 5


def test_optional_token_fields_only_where_the_source_carried_them() -> None:
    body = page(
        _mixed(),
        start_time=str(T0),
        end_time=str(T0 + 60),
        bucket_width="1m",
        group_by="api_key_id",
    )
    by_key = {r["api_key_id"]: r for r in all_results(body)}
    assert "input_cached_tokens" not in by_key["key_a"]
    assert by_key["key_b"]["input_cached_tokens"] == 2


@pytest.mark.parametrize(
    ("params", "expected_input"),
    [
        ({"api_key_ids": ["key_b"]}, 6),
        ({"project_ids": ["proj_a"]}, 3),
        ({"models": [FOUR_O]}, 4),
        ({"api_key_ids": ["key_b"], "project_ids": ["proj_a"]}, 2),
        ({"api_key_ids": ["key_zzz"]}, None),
        ({"user_ids": ["user-abc"]}, None),
        ({"batch": "true"}, None),
        ({"batch": "false"}, 7),
    ],
)
def test_filters(params: dict[str, Any], expected_input: int | None) -> None:
    body = page(_mixed(), start_time=str(T0), end_time=str(T0 + 60), bucket_width="1m", **params)
    results = all_results(body)
    assert len(body["data"]) == 1  # filtering never removes buckets
    assert [r["input_tokens"] for r in results] == (
        [] if expected_input is None else [expected_input]
    )
    assert all(r["api_key_id"] is None for r in results)  # a filter does not group


def test_key_order_is_shuffled_reproducibly() -> None:
    query = q(start_time=str(T0), end_time=str(T0 + 60), bucket_width="1m")
    rows = _mixed().visible_rows(NOW)
    orders = {
        seed: tuple(build_page(query, rows, NOW, seed=seed)["data"][0]["results"][0])
        for seed in range(8)
    }
    again = tuple(build_page(query, rows, NOW, seed=3)["data"][0]["results"][0])
    assert again == orders[3]
    assert len(set(orders.values())) > 1
    fixed = tuple(build_page(query, rows, NOW, seed=None)["data"][0]["results"][0])
    assert fixed[0] == "object"


# ---------------------------------------------------------------------------- pages


def test_pages_chain_through_cursors() -> None:
    s = Scenario([vreq(T0 + 60 * m + 1, Usage(m, 0, 1)) for m in range(10)])
    base = {"start_time": str(T0), "end_time": str(T0 + 600), "bucket_width": "1m", "limit": "4"}
    first = page(s, **base)
    assert len(first["data"]) == 4 and first["has_more"] is True
    assert first["next_page"].startswith("page_")
    second = page(s, **base, page=first["next_page"])
    assert second["data"][0]["start_time"] == T0 + 240
    third = page(s, **base, page=second["next_page"])
    assert len(third["data"]) == 2 and third["has_more"] is False and third["next_page"] is None
    seen = [r["input_tokens"] for p in (first, second, third) for r in all_results(p)]
    assert seen == list(range(10))


def _cursor(start: int, width: int, bucket: int) -> str:
    return "page_" + base64.urlsafe_b64encode(struct.pack(">qqq", start, width, bucket)).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "page_not-base64!!",
        "AAAAAGdGxdEiJdKOAAAAAGcqsYA=",  # no page_ prefix
        "page_" + base64.urlsafe_b64encode(b"short").decode(),
        _cursor(T0 + 60, 60, T0 + 240),  # another query's start
        _cursor(T0, 3600, T0 + 3600),  # another width
        _cursor(T0, 60, T0 + 250),  # not a bucket start
        _cursor(T0, 60, T0),  # the first page is never a cursor
        _cursor(T0, 60, T0 + 600),  # past the range
    ],
)
def test_foreign_or_broken_cursors_are_rejected(cursor: str) -> None:
    base = {"start_time": str(T0), "end_time": str(T0 + 600), "bucket_width": "1m", "limit": "4"}
    with pytest.raises(ApiError) as info:
        page(Scenario(), **base, page=cursor)
    assert info.value.status == 400 and info.value.param == "page"
    assert info.value.envelope()["error"]["type"] == "invalid_request_error"


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    width=st.sampled_from(["1m", "1h", "1d"]),
    start=st.integers(min_value=T0, max_value=T0 + 2 * DAY),
)
def test_paging_any_range_returns_every_bucket_once_and_sums_to_truth(
    data: st.DataObject, width: str, start: int
) -> None:
    max_limit = {"1m": 1440, "1h": 168, "1d": 31}[width]
    span = {"1m": 600 * 60, "1h": 200 * 3600, "1d": 40 * DAY}[width]
    end = data.draw(st.integers(min_value=start + 1, max_value=start + span), label="end")
    limit = data.draw(st.integers(min_value=1, max_value=max_limit), label="limit")
    minutes = data.draw(
        st.lists(
            st.integers(min_value=(start - 600) // 60, max_value=(end + 600) // 60), max_size=25
        ),
        label="minutes",
    )
    s = Scenario(
        [vreq(m * 60 + 7, Usage(i + 1, 1, 1), key=f"key_{i % 3}") for i, m in enumerate(minutes)]
    )
    now = end + 60
    params = {"start_time": str(start), "end_time": str(end), "bucket_width": width}
    buckets: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10_000):
        extra = {"page": cursor} if cursor else {}
        body = page(s, now, **params, limit=str(limit), **extra)
        assert 1 <= len(body["data"]) <= limit
        buckets.extend(body["data"])
        if not body["has_more"]:
            assert body["next_page"] is None
            break
        cursor = body["next_page"]
    starts = [b["start_time"] for b in buckets]
    assert starts[0] == start and buckets[-1]["end_time"] == end
    assert len(set(starts)) == len(starts)  # every bucket exactly once
    for a, b in itertools.pairwise(buckets):
        assert a["end_time"] == b["start_time"]  # contiguous
    expected = sum(r.usage.input_tokens for r in s.truth() if start <= r.minute < end)
    assert sum(r["input_tokens"] for b in buckets for r in b["results"]) == expected


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("pairs", "param"),
    [
        ([], "start_time"),
        ([("end_time", str(T0))], "start_time"),
        ([("start_time", "1760612579.93")], "start_time"),  # the field bug: float seconds
        ([("start_time", "1e9")], "start_time"),
        ([("start_time", "-60")], "start_time"),
        ([("start_time", "")], "start_time"),
        ([("start_time", str(T0)), ("start_time", str(T0))], "start_time"),
        ([("start_time", str(T0)), ("end_time", "1760612640.0")], "end_time"),
        ([("start_time", str(T0)), ("end_time", str(T0))], "end_time"),
        ([("start_time", str(T0)), ("bucket_width", "5m")], "bucket_width"),
        ([("start_time", str(T0)), ("bucket_width", "1m"), ("limit", "1441")], "limit"),
        ([("start_time", str(T0)), ("bucket_width", "1h"), ("limit", "169")], "limit"),
        ([("start_time", str(T0)), ("limit", "32")], "limit"),  # default width 1d
        ([("start_time", str(T0)), ("limit", "0")], "limit"),
        ([("start_time", str(T0)), ("limit", "ten")], "limit"),
        ([("start_time", str(T0)), ("group_by", "model,region")], "group_by"),
        ([("start_time", str(T0)), ("group_by[]", "line_item")], "group_by"),
        ([("start_time", str(T0)), ("batch", "maybe")], "batch"),
    ],
)
def test_invalid_queries_are_400_with_the_param_named(
    pairs: list[tuple[str, str]], param: str
) -> None:
    with pytest.raises(ApiError) as info:
        parse_query(pairs)
    err = info.value
    assert err.status == 400 and err.param == param
    envelope = err.envelope()["error"]
    assert set(envelope) == {"message", "type", "param", "code"}
    assert envelope["type"] == "invalid_request_error" and envelope["message"]


def test_limit_maxima_are_accepted() -> None:
    for width, top in (("1m", 1440), ("1h", 168), ("1d", 31)):
        assert (
            parse_query([("start_time", "0"), ("bucket_width", width), ("limit", str(top))]).limit
            == top
        )


@pytest.mark.parametrize(
    "pairs",
    [
        [("group_by", "model"), ("group_by", "api_key_id")],
        [("group_by[]", "model"), ("group_by[]", "api_key_id")],
        [("group_by", "model,api_key_id")],
        [("group_by[]", "model"), ("group_by", "api_key_id")],
    ],
)
def test_all_three_array_encodings_are_accepted(pairs: list[tuple[str, str]]) -> None:
    query = parse_query([("start_time", str(T0)), *pairs])
    assert query.group_by == ("model", "api_key_id")


def test_array_filters_accept_every_encoding() -> None:
    query = parse_query(
        [("start_time", "0"), ("api_key_ids", "a,b"), ("api_key_ids[]", "c"), ("project_ids", "p")]
    )
    assert query.api_key_ids == frozenset({"a", "b", "c"}) and query.project_ids == frozenset({"p"})


def test_unknown_parameters_are_ignored() -> None:
    assert parse_query([("start_time", "60"), ("foo", "bar")]).start_time == 60


# ---------------------------------------------------------------------------- auth


def test_auth_decisions() -> None:
    accepted, unscoped = frozenset({"sk-admin-good"}), frozenset({"sk-proj-noscope"})
    assert check_auth("Bearer sk-admin-good", accepted, unscoped) is None
    assert check_auth("bearer sk-admin-good", accepted, unscoped) is None
    for header in (
        None,
        "",
        "sk-admin-good",
        "Basic sk-admin-good",
        "Bearer ",
        "Bearer sk-admin-bad",
    ):
        err = check_auth(header, accepted, unscoped)
        assert err is not None and err.status == 401, header
        assert "sk-admin" not in err.message  # never echo a key
    err = check_auth("Bearer sk-proj-noscope", accepted, unscoped)
    assert err is not None and err.status == 403
    assert err.message == MISSING_SCOPE_MESSAGE and "Missing scopes: api.usage.read" in err.message
    assert "sk-proj-noscope" not in err.message


def test_default_key_only_without_configured_keys() -> None:
    assert Scenario().check_auth(f"Bearer {SIMULATOR_ADMIN_KEY}") is None
    configured = Scenario(admin_keys={"sk-admin-real"})
    assert configured.check_auth("Bearer sk-admin-real") is None
    refused = configured.check_auth(f"Bearer {SIMULATOR_ADMIN_KEY}")
    assert refused is not None and refused.status == 401
    assert "sk-admin-real" not in repr(configured)


# ---------------------------------------------------------------------------- JSON


def test_registration_json_with_visible_after_and_revisions() -> None:
    req = request_from_json(
        {
            "time": T0 + 5,
            "api_key_id": "key_a",
            "project_id": "proj_a",
            "model": MINI,
            "usage": {"input_tokens": 10, "output_tokens": 1, "num_model_requests": 1},
            "visible_after": 30,
            "revisions": [{"after": 90, "usage": {"input_tokens": 15, "input_cached_tokens": 5}}],
        },
        registered_at=1000.0,
    )
    assert req.registered_at == 1000.0
    assert req.usage_at(1029.0) is None
    assert req.usage_at(1030.0) == Usage(10, 1, 1)
    assert req.usage_at(1090.0) == Usage(15, 0, 0, input_cached_tokens=5)


@pytest.mark.parametrize(
    "obj",
    [
        {"time": T0, "api_key_id": "k", "project_id": "p", "model": MINI},  # no usage
        {
            "time": T0,
            "api_key_id": "k",
            "project_id": "p",
            "model": MINI,
            "usage": {"input_tokenz": 1},
        },
        {
            "time": T0,
            "api_key_id": "k",
            "project_id": "p",
            "model": MINI,
            "usage": {"input_tokens": -1},
        },
        {
            "time": T0,
            "api_key_id": "k",
            "project_id": "p",
            "model": MINI,
            "usage": {"input_tokens": 1.5},
        },
        {"time": "now", "api_key_id": "k", "project_id": "p", "model": MINI, "usage": {}},
        {"time": T0, "api_key_id": "", "project_id": "p", "model": MINI, "usage": {}},
        {"time": T0, "api_key_id": "k", "project_id": "p", "model": MINI, "usage": {}, "colour": 1},
        {"time": T0, "api_key_id": "k", "project_id": "p", "model": MINI, "visible_after": 5},
        {
            "time": T0,
            "api_key_id": "k",
            "project_id": "p",
            "model": MINI,
            "revisions": [{"after": 1}],
        },
        [1, 2],
    ],
)
def test_bad_registrations_are_refused(obj: Any) -> None:
    with pytest.raises((ScenarioError, KeyError)):
        request_from_json(obj, registered_at=0.0)


def test_scenario_json_round_trip() -> None:
    s = Scenario(
        [
            vreq(T0 + 5, Usage(10, 2, 1, input_cached_tokens=4), registered_at=50.0),
            vreq(T0 + 65, Usage(1, 1, 1), key="key_b", more=(Revision(300, Usage(3, 3, 1)),)),
        ],
        admin_keys={"sk-admin-x"},
        unscoped_keys={"sk-proj-y"},
        faults=[Fault("429", retry_after=2), Fault("hang", seconds=1.5), Fault("bad_json")],
        seed=42,
    )
    again = Scenario.from_json(s.to_json())
    assert again.to_json() == s.to_json()
    assert again.truth() == s.truth()
    assert again.visible_rows(100.0) == s.visible_rows(100.0)
    assert list(again.faults) == list(s.faults)


def test_scenario_file_requests_default_to_the_given_registration_time() -> None:
    s = Scenario.from_json(
        {
            "requests": [
                {
                    "time": T0,
                    "api_key_id": "k",
                    "project_id": "p",
                    "model": MINI,
                    "usage": {"input_tokens": 1},
                    "visible_after": 60,
                }
            ]
        },
        registered_at=5000.0,
    )
    assert s.requests[0].registered_at == 5000.0
    assert s.visible_rows(5059.0) == [] and len(s.visible_rows(5060.0)) == 1


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"requests": {}},
        {"admin_keys": "k"},
        {"seed": "x"},
        {"extra": 1},
        {"faults": [{"kind": "418"}]},
    ],
)
def test_bad_scenarios_are_refused(obj: Any) -> None:
    with pytest.raises(ScenarioError):
        Scenario.from_json(obj)


@pytest.mark.parametrize(
    "obj",
    [
        {"kind": "teapot"},
        {"kind": "429", "retry_after": 0},
        {"kind": "429", "retry_after": 1.5},
        {"kind": "500", "retry_after": 3},
        {"kind": "hang"},
        {"kind": "hang", "seconds": -1},
        {"kind": "429", "colour": "red"},
        {"kind": "500", "size": 10},  # size is for the hostile-body kinds only
        {"kind": "huge_page", "size": 0.5},
        {"kind": "huge_page", "size": -1},
        {"kind": "deep_json", "size": 10**9},  # above the kind's maximum
    ],
)
def test_bad_faults_are_refused(obj: dict[str, Any]) -> None:
    with pytest.raises(ScenarioError):
        Fault.from_json(obj)


def test_faults_are_fifo_and_numeric_kinds_accepted() -> None:
    s = Scenario()
    for f in ({"kind": 429, "retry_after": 1}, {"kind": "503"}, {"kind": "hang", "seconds": 2}):
        s.add_fault(Fault.from_json(f))
    assert [s.next_fault() for _ in range(4)] == [
        Fault("429", retry_after=1),
        Fault("503"),
        Fault("hang", seconds=2.0),
        None,
    ]


def test_hostile_body_faults_take_a_size_or_their_default() -> None:
    assert Fault.from_json({"kind": "gzip_bomb"}).effective_size == 2**30
    assert Fault.from_json({"kind": "huge_page", "size": 4096}).effective_size == 4096
    assert Fault.from_json({"kind": "deep_json"}).effective_size == 100_000
    assert Fault.from_json({"kind": "huge_int", "size": 400}).to_json() == {
        "kind": "huge_int",
        "size": 400,
    }

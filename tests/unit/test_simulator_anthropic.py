"""The simulator's Anthropic usage report, pure: requests, headers, queries, pages, faults."""

from __future__ import annotations

import calendar
from typing import Any

import pytest

from tokensettle.anthropic_api import ANTHROPIC_VERSION, format_rfc3339
from tokensettle.simulator.anthropic import (
    SPEED_BETA,
    AnthropicError,
    bucket_count,
    build_report,
    check_headers,
    encode_cursor,
    fault_error,
    parse_report_query,
    respond,
    truth_rows,
    visible_rows,
)
from tokensettle.simulator.costs import Billing, billed_lines
from tokensettle.simulator.scenario import (
    SIMULATOR_ANTHROPIC_ADMIN_KEY,
    Fault,
    Scenario,
    ScenarioError,
    request_from_json,
)

T0 = calendar.timegm((2025, 8, 1, 0, 0, 0))
NOW = T0 + 86_400
HAIKU = "claude-haiku-4-5-20251001"
KEY = "sk-ant-admin01-unit"


def claude(t: float, uncached: int, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "anthropic",
        "time": t,
        "api_key_id": extra.pop("key", "apikey_a"),
        "workspace_id": extra.pop("workspace", "wrkspc_a"),
        "model": HAIKU,
        "usage": {"uncached_input_tokens": uncached, "output_tokens": 1, **extra.pop("usage", {})},
        **extra,
    }


def scenario(*requests: dict[str, Any]) -> Scenario:
    return Scenario.from_json({"requests": list(requests)}, registered_at=T0)


def query(**params: str | list[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = [("starting_at", format_rfc3339(T0))]
    for name, value in params.items():
        pairs += [(name, v) for v in value] if isinstance(value, list) else [(name, value)]
    return pairs


# ---------------------------------------------------------------------------- requests


def test_an_anthropic_request_takes_the_reports_usage_shape() -> None:
    req = request_from_json(
        claude(
            T0 + 5,
            1000,
            usage={
                "cache_read_input_tokens": 200,
                "cache_creation": {"ephemeral_1h_input_tokens": 100},
                "server_tool_use": {"web_search_requests": 3},
            },
        ),
        registered_at=T0,
    )
    assert req.provider == "anthropic" and req.project_id == "wrkspc_a"
    assert req.service_tier == "standard" and not req.batch
    u = req.final_usage
    assert (u.input_tokens, u.input_cached_tokens, u.input_cache_write_tokens) == (1300, 200, 100)
    assert (u.input_cache_write_5m_tokens, u.web_search_requests) == (0, 3)  # missing: 0
    assert not u.requests_counted


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"project_id": "proj_a"}, "unknown anthropic request fields: ['project_id']"),
        ({"batch": True}, "unknown anthropic request fields: ['batch']"),
        ({"usage": {"input_tokens": 5}}, "unknown Anthropic usage fields: ['input_tokens']"),
        ({"usage": {"uncached_input_tokns": 5}}, "unknown Anthropic usage fields"),
        ({"usage": {"cache_creation": {"ephemeral_5m": 1}}}, "'cache_creation' must be"),
        ({"usage": {"output_tokens": -1}}, "non-negative integers"),
        ({"usage": {"output_tokens": 1.5}}, "non-negative integers"),
        ({"provider": "gemini"}, "unknown provider 'gemini'"),
        ({"workspace_id": ""}, "'workspace_id' must be a non-empty string"),
    ],
)
def test_anthropic_requests_are_checked(change: dict[str, Any], needle: str) -> None:
    obj = {**claude(T0, 1), **change}
    with pytest.raises(ScenarioError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        request_from_json(obj, registered_at=T0)


def test_openai_requests_refuse_the_fields_only_anthropic_reports() -> None:
    with pytest.raises(ScenarioError, match="unknown usage field 'web_search_requests'"):
        request_from_json(
            {
                "time": T0,
                "api_key_id": "key_a",
                "project_id": "proj_a",
                "model": "gpt-4o-mini",
                "usage": {"input_tokens": 1, "web_search_requests": 1},
            },
            registered_at=T0,
        )


def test_each_provider_keeps_its_own_requests() -> None:
    openai = {
        "time": T0 + 1,
        "api_key_id": "key_o",
        "project_id": "proj_o",
        "model": "gpt-4o-mini-2024-07-18",
        "usage": {"input_tokens": 5, "output_tokens": 1, "num_model_requests": 1},
    }
    s = scenario(openai, claude(T0 + 2, 7))
    assert [r.provider for r in s.requests] == ["openai"]
    assert [r.provider for r in s.anthropic_requests] == ["anthropic"]
    # nothing that reads OpenAI's requests (usage, costs, truth) sees Anthropic's
    assert [r.usage.input_tokens for r in s.visible_tiered_rows(NOW)] == [5]
    assert [r.usage.input_tokens for r in s.truth()] == [5]
    assert {line.api_key_id for line in billed_lines(s, Billing(), NOW)} == {"key_o"}
    assert [r.usage.input_tokens for r in visible_rows(s, NOW)] == [7]
    s.reset()
    assert s.requests == [] and s.anthropic_requests == []


def test_scenario_json_round_trips_anthropic_requests_and_keys() -> None:
    obj = {
        "anthropic_admin_keys": [KEY],
        "anthropic_unscoped_keys": ["sk-ant-api03-x"],
        "requests": [
            claude(T0 + 1, 5, workspace=None, service_tier="batch", registered_at=T0),
            claude(
                T0 + 2,
                6,
                revisions=[{"after": 60, "usage": {"uncached_input_tokens": 7}}],
                registered_at=T0,
            ),
        ],
    }
    s = Scenario.from_json(obj)
    assert s.anthropic_accepted_keys == {KEY}
    again = Scenario.from_json(s.to_json())
    assert again.to_json() == s.to_json()
    first = s.to_json()["requests"][0]
    assert first["workspace_id"] is None and first["service_tier"] == "batch"
    assert first["revisions"][0]["usage"]["uncached_input_tokens"] == 5
    assert Scenario().anthropic_accepted_keys == {SIMULATOR_ANTHROPIC_ADMIN_KEY}
    assert "sk-ant" not in repr(s)


# ---------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("headers", "status", "needle"),
    [
        ({}, 401, "x-api-key header is required"),
        ({"authorization": f"Bearer {KEY}"}, 401, "not how Anthropic authenticates"),
        ({"x-api-key": "sk-ant-admin01-other"}, 401, "invalid x-api-key"),
        ({"x-api-key": "sk-ant-api03-x"}, 403, "cannot use the Admin API"),
        ({"x-api-key": KEY}, 400, "anthropic-version: header is required"),
        ({"x-api-key": KEY, "anthropic-version": "2024-99-99"}, 400, "not a valid version"),
    ],
)
def test_headers_are_checked(headers: dict[str, str], status: int, needle: str) -> None:
    err = check_headers(headers, {KEY}, {"sk-ant-api03-x"})
    assert err is not None and err.status == status and needle in err.message
    assert KEY not in err.message
    assert err.envelope()["type"] == "error"
    assert (
        err.envelope()["error"]["type"]
        == {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
        }[status]
    )


def test_good_headers_pass() -> None:
    assert (
        check_headers({"x-api-key": KEY, "anthropic-version": ANTHROPIC_VERSION}, {KEY}, ()) is None
    )


# ---------------------------------------------------------------------------- queries


@pytest.mark.parametrize(
    ("pairs", "needle"),
    [
        ([], "starting_at: field required"),
        ([("starting_at", str(T0))], "expected an RFC 3339 date-time"),  # Unix seconds
        ([("starting_at", "2025-08-01")], "RFC 3339"),
        ([("starting_at", "2025-08-01T00:00:00")], "RFC 3339"),  # no offset
        (query(ending_at=format_rfc3339(T0)), "ending_at: must be after starting_at"),
        (query(ending_at=str(T0 + 60)), "ending_at: expected an RFC 3339"),
        (query(bucket_width="5m"), "bucket_width: '5m'"),
        (query(bucket_width="1m", limit="1441"), "between 1 and 1440"),
        (query(bucket_width="1h", limit="169"), "between 1 and 168"),
        (query(limit="32"), "between 1 and 31"),  # 1d by default
        (query(limit="0"), "between 1"),
        (query(group_by="model"), "group_by: an array parameter is sent as group_by[]"),
        (query(api_key_ids="apikey_a"), "api_key_ids[]"),
        (query(**{"group_by[]": "region"}), "Invalid value for 'group_by': 'region'"),
        (query(**{"group_by[]": "model,api_key_id"}), "'model,api_key_id'"),  # not split
        (query(**{"group_by[]": "speed"}), SPEED_BETA),
        (query(**{"context_window[]": "1M+"}), "context_window: '1M+'"),
        (query(**{"inference_geos[]": "mars"}), "inference_geos"),
        (query(**{"limit[]": "3"}), "limit: is not an array parameter"),
        ([*query(), ("starting_at", format_rfc3339(T0))], "given more than once"),
    ],
)
def test_bad_queries_are_400_in_anthropics_envelope(
    pairs: list[tuple[str, str]], needle: str
) -> None:
    with pytest.raises(AnthropicError) as info:
        parse_report_query(pairs)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    assert needle in info.value.message


def test_a_good_query() -> None:
    pairs = [
        ("starting_at", "2025-08-01T02:00:00+02:00"),  # an offset is RFC 3339 too: T0
        ("ending_at", format_rfc3339(T0 + 600)),
        ("bucket_width", "1m"),
        ("limit", "1440"),
        *[("group_by[]", g) for g in ("api_key_id", "workspace_id", "model", "speed")],
        ("api_key_ids[]", "apikey_a"),
        ("api_key_ids[]", "apikey_b"),
        ("workspace_ids[]", "wrkspc_a"),
        ("context_window[]", "0-200k"),
        ("unknown_param", "ignored"),
    ]
    q = parse_report_query(pairs, beta=frozenset({SPEED_BETA}))
    assert (q.starting_at, q.ending_at, q.bucket_width, q.limit) == (T0, T0 + 600, "1m", 1440)
    assert q.group_by == ("api_key_id", "workspace_id", "model", "speed")
    assert q.filters == {
        "api_key_ids": {"apikey_a", "apikey_b"},
        "workspace_ids": {"wrkspc_a"},
        "context_window": {"0-200k"},
    }
    assert parse_report_query(query()).bucket_width == "1d"
    assert parse_report_query(query()).limit == 7


# ---------------------------------------------------------------------------- pages


def test_buckets_are_whole_snapped_and_end_by_ending_at_and_start_before_now() -> None:
    def count(**params: str) -> tuple[int, int]:
        return bucket_count(parse_report_query(query(**params)), NOW)

    assert count(bucket_width="1m", ending_at=format_rfc3339(T0 + 600)) == (T0, 10)
    # an unaligned end: the bucket it cuts does not end before it
    assert count(bucket_width="1m", ending_at=format_rfc3339(T0 + 630)) == (T0, 10)
    # an unaligned start: snapped to its minute's start
    q = parse_report_query([("starting_at", format_rfc3339(T0 + 30)), ("bucket_width", "1m")])
    assert bucket_count(q, T0 + 600)[0] == T0
    # without ending_at (or one in the future): up to the bucket that holds now
    assert count(bucket_width="1h") == (T0, 24)
    assert bucket_count(parse_report_query(query(bucket_width="1h")), NOW + 1) == (T0, 25)
    assert count(bucket_width="1d", ending_at=format_rfc3339(NOW + 10 * 86_400)) == (T0, 1)


def test_a_page_groups_filters_and_nulls_what_is_not_grouped() -> None:
    s = scenario(
        claude(T0 + 5, 10, usage={"cache_read_input_tokens": 4}),
        claude(T0 + 50, 20),  # same minute, key and workspace
        claude(T0 + 70, 30, key="apikey_b", workspace=None),
        claude(T0 + 130, 40, service_tier="priority"),
    )
    grouped = respond(
        s,
        query(
            ending_at=format_rfc3339(T0 + 240),
            bucket_width="1m",
            **{"group_by[]": ["api_key_id", "workspace_id", "model"]},
        ),
        NOW,
    )
    assert grouped["has_more"] is False and grouped["next_page"] is None
    assert [b["starting_at"] for b in grouped["data"]] == [
        format_rfc3339(T0 + 60 * m) for m in range(4)
    ]
    assert all(
        b["ending_at"] == format_rfc3339(T0 + 60 * m + 60) for m, b in enumerate(grouped["data"])
    )
    first = grouped["data"][0]["results"]
    assert len(first) == 1
    assert first[0]["uncached_input_tokens"] == 30 and first[0]["cache_read_input_tokens"] == 4
    assert first[0]["api_key_id"] == "apikey_a" and first[0]["workspace_id"] == "wrkspc_a"
    assert first[0]["service_tier"] is None and first[0]["context_window"] is None  # ungrouped
    assert grouped["data"][1]["results"][0]["workspace_id"] is None  # the Default workspace
    assert grouped["data"][2]["results"][0]["uncached_input_tokens"] == 40
    assert grouped["data"][3]["results"] == []  # empty buckets are present
    assert "num_model_requests" not in first[0] and "object" not in first[0]

    ungrouped = respond(s, query(ending_at=format_rfc3339(T0 + 240), bucket_width="1h"), NOW)
    assert ungrouped["data"] == []  # the hour has not ended by ending_at
    day = respond(s, query(bucket_width="1d", limit="1"), NOW)
    (only,) = day["data"][0]["results"]
    assert only["uncached_input_tokens"] == 100 and only["output_tokens"] == 4
    assert all(only[d] is None for d in ("api_key_id", "workspace_id", "model"))

    tiers = respond(
        s,
        query(bucket_width="1d", **{"group_by[]": ["service_tier", "context_window"]}),
        NOW,
    )["data"][0]["results"]
    assert {(r["service_tier"], r["context_window"]) for r in tiers} == {
        ("standard", "0-200k"),
        ("priority", "0-200k"),
    }
    filtered = respond(
        s,
        query(bucket_width="1d", **{"api_key_ids[]": ["apikey_b"], "workspace_ids[]": ["x"]}),
        NOW,
    )
    assert filtered["data"][0]["results"] == []  # AND: apikey_b is not in workspace x
    by_tier = respond(s, query(bucket_width="1d", **{"service_tiers[]": ["priority"]}), NOW)
    assert by_tier["data"][0]["results"][0]["uncached_input_tokens"] == 40
    nobody = respond(s, query(bucket_width="1d", **{"account_ids[]": ["user_1"]}), NOW)
    assert nobody["data"][0]["results"] == []


def test_pages_follow_cursors_and_foreign_cursors_are_refused() -> None:
    s = scenario(*(claude(T0 + 60 * m + 1, m + 1) for m in range(5)))
    base = query(ending_at=format_rfc3339(T0 + 300), bucket_width="1m", limit="2")
    seen: list[int] = []
    pages = 0
    cursor: str | None = None
    while True:
        page = respond(s, base + ([("page", cursor)] if cursor else []), NOW)
        pages += 1
        seen += [r["uncached_input_tokens"] for b in page["data"] for r in b["results"]]
        if not page["has_more"]:
            assert page["next_page"] is None
            break
        cursor = page["next_page"]
        assert isinstance(cursor, str) and cursor.startswith("page_")
    assert (seen, pages) == ([1, 2, 3, 4, 5], 3)
    for bad in ("nope", "page_!!", encode_cursor(T0 + 30), encode_cursor(T0), encode_cursor(NOW)):
        with pytest.raises(AnthropicError, match="cursor is not valid"):
            respond(s, [*base, ("page", bad)], NOW)


def test_late_revisions_show_as_they_become_visible() -> None:
    s = scenario(
        claude(
            T0 + 1,
            10,
            registered_at=T0,
            visible_after=300,
            revisions=[{"after": 900, "usage": {"uncached_input_tokens": 15}}],
        )
    )
    q = query(ending_at=format_rfc3339(T0 + 60), bucket_width="1m")
    assert respond(s, q, T0 + 200)["data"][0]["results"] == []  # not visible yet
    assert respond(s, q, T0 + 301)["data"][0]["results"][0]["uncached_input_tokens"] == 10
    assert respond(s, q, T0 + 901)["data"][0]["results"][0]["uncached_input_tokens"] == 15
    (row,) = truth_rows(s)
    assert row["usage"]["input_tokens"] == 15 and row["report"]["uncached_input_tokens"] == 15


def test_results_shuffle_their_keys_reproducibly() -> None:
    s = scenario(claude(T0 + 1, 10))
    q = parse_report_query(query(bucket_width="1d"))
    a = build_report(q, visible_rows(s, NOW), NOW, seed=1)
    b = build_report(q, visible_rows(s, NOW), NOW, seed=1)
    assert a == b
    assert list(a["data"][0]["results"][0]) == list(b["data"][0]["results"][0])


# ---------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("kind", "status", "type_"),
    [
        ("429", 429, "rate_limit_error"),
        ("500", 500, "api_error"),
        ("503", 503, "api_error"),
        ("529", 529, "overloaded_error"),
        ("401", 401, "authentication_error"),
        ("403", 403, "permission_error"),
    ],
)
def test_faults_answer_in_anthropics_envelope(kind: str, status: int, type_: str) -> None:
    retry = {"retry_after": 2} if kind in ("429", "529") else {}
    err = fault_error(Fault(kind=kind, target="anthropic", **retry))  # type: ignore[arg-type]
    assert err is not None and err.status == status
    assert err.envelope() == {"type": "error", "error": {"type": type_, "message": err.message}}
    assert err.headers == ({"retry-after": "2"} if retry else {})


def test_other_faults_are_not_envelopes() -> None:
    for kind in ("502", "hang", "bad_json", "gzip_bomb"):
        fault = Fault(kind=kind, target="anthropic", seconds=1 if kind == "hang" else 0)
        assert fault_error(fault) is None


def test_a_529_is_anthropics_only() -> None:
    with pytest.raises(ScenarioError, match="needs target 'anthropic'"):
        Fault(kind="529")
    assert Fault.from_json({"kind": 529, "target": "anthropic", "retry_after": 1}).retry_after == 1

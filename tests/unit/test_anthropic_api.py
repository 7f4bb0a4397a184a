"""The pure parts of the Anthropic usage report client: RFC 3339 windows, the query, pages."""

from __future__ import annotations

import calendar
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from tokensettle.anthropic_api import (
    END_MARGIN,
    AnthropicUsageClient,
    build_query,
    client_for,
    format_rfc3339,
    parse_page,
    parse_rfc3339,
    query_params,
)
from tokensettle.config import load_settings
from tokensettle.errors import ConfigError
from tokensettle.usage_api import Filters, MalformedResponseError, UsageClient
from tokensettle.windows import Interval

T0 = calendar.timegm((2025, 8, 1, 0, 0, 0))  # 2025-08-01T00:00:00Z
KEY = "sk-ant-admin01-unit-S3CRET"


# ------------------------------------------------------------------ RFC 3339


def test_format_is_rfc3339_utc_on_the_second() -> None:
    assert format_rfc3339(T0) == "2025-08-01T00:00:00Z"
    assert format_rfc3339(T0 + 90) == "2025-08-01T00:01:30Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-08-01T00:00:00Z", T0),
        ("2025-08-01t00:00:00z", T0),
        ("2025-08-01 00:00:00Z", T0),
        ("2025-08-01T02:00:00+02:00", T0),
        ("2025-07-31T19:00:00-05:00", T0),
        ("2025-08-01T00:00:00.999999Z", T0),  # floored
        ("2019-12-27T18:11:19.117123456Z", calendar.timegm((2019, 12, 27, 18, 11, 19))),
    ],
)
def test_parse_reads_rfc3339_in_its_forms(text: str, expected: int) -> None:
    assert parse_rfc3339(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        T0,  # Unix seconds: what OpenAI takes, not Anthropic
        str(T0),
        "2025-08-01",  # a date alone
        "2025-08-01T00:00:00",  # no offset: would be local time
        "2025-08-01T00:00Z",  # no seconds
        "2025-13-01T00:00:00Z",  # no 13th month
        "2025-08-01T00:00:00Z ",
        None,
        True,
    ],
)
def test_parse_refuses_anything_else(bad: object) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|valid date"):
        parse_rfc3339(bad)


# ------------------------------------------------------------------ the query


def test_the_query_of_a_ten_minute_interval() -> None:
    pairs = build_query(Interval(T0, T0 + 600))
    assert pairs == [
        ("starting_at", "2025-08-01T00:00:00Z"),
        # one minute past the interval: "buckets that end before ending_at", read strictly,
        # would otherwise leave out the interval's last minute
        ("ending_at", "2025-08-01T00:11:00Z"),
        ("bucket_width", "1m"),
        ("limit", "11"),
        ("group_by[]", "api_key_id"),
        ("group_by[]", "workspace_id"),
        ("group_by[]", "model"),
    ]
    assert END_MARGIN == 60


def test_filters_become_bracketed_arrays_sorted_and_workspaces_are_project_ids() -> None:
    filters = Filters(
        api_key_ids=frozenset({"apikey_b", "apikey_a"}), project_ids=frozenset({"wrkspc_1"})
    )
    pairs = build_query(Interval(T0, T0 + 60), filters, page="page_abc")
    assert pairs[-4:] == [
        ("api_key_ids[]", "apikey_a"),
        ("api_key_ids[]", "apikey_b"),
        ("workspace_ids[]", "wrkspc_1"),
        ("page", "page_abc"),
    ]
    assert not any(k in ("project_ids", "project_ids[]") for k, _ in pairs)


def test_limit_is_capped_at_a_day_of_minutes() -> None:
    day = build_query(Interval(T0, T0 + 1440 * 60))
    assert dict(day)["limit"] == "1440"  # 1,441 minutes asked: two pages
    assert dict(build_query(Interval(T0, T0 + 1439 * 60)))["limit"] == "1440"


def test_query_params_for_provenance_name_arrays_without_brackets() -> None:
    pairs = build_query(Interval(T0, T0 + 60), Filters(api_key_ids=frozenset({"apikey_a"})))
    assert query_params(pairs) == {
        "starting_at": "2025-08-01T00:00:00Z",
        "ending_at": "2025-08-01T00:02:00Z",
        "bucket_width": "1m",
        "limit": "2",
        "group_by": ["api_key_id", "workspace_id", "model"],
        "api_key_ids": ["apikey_a"],
    }


# ------------------------------------------------------------------ pages


def _result(**changes: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "uncached_input_tokens": 1500,
        "cache_creation": {"ephemeral_1h_input_tokens": 1000, "ephemeral_5m_input_tokens": 500},
        "cache_read_input_tokens": 200,
        "output_tokens": 500,
        "server_tool_use": {"web_search_requests": 10},
        "api_key_id": "apikey_a",
        "workspace_id": "wrkspc_a",
        "model": "claude-sonnet-4-20250514",
        "service_tier": "standard",
        "context_window": "0-200k",
    }
    result.update(changes)
    return result


def _bucket(start: int, *results: dict[str, Any], width: int = 60) -> dict[str, Any]:
    return {
        "starting_at": format_rfc3339(start),
        "ending_at": format_rfc3339(start + width),
        "results": list(results),
    }


def _page(*buckets: dict[str, Any], has_more: bool = False, nxt: str | None = None) -> Any:
    return {"data": list(buckets), "has_more": has_more, "next_page": nxt}


INTERVAL = Interval(T0, T0 + 180)


def test_a_page_becomes_rows_per_minute_key_workspace_and_model() -> None:
    page = parse_page(
        _page(
            _bucket(T0, _result(), _result(api_key_id="apikey_b", workspace_id=None)),
            _bucket(T0 + 60),
            _bucket(T0 + 120, _result(model=None, uncached_input_tokens=1)),
            _bucket(T0 + 180, _result()),  # the END_MARGIN minute: not the interval's
            has_more=True,
            nxt="page_x",
        ),
        INTERVAL,
    )
    assert page.bucket_starts == (T0, T0 + 60, T0 + 120)
    assert (page.has_more, page.next_page) == (True, "page_x")
    assert [(r.minute, r.api_key_id, r.project_id, r.model) for r in page.rows] == [
        (T0, "apikey_a", "wrkspc_a", "claude-sonnet-4-20250514"),
        (T0, "apikey_b", None, "claude-sonnet-4-20250514"),  # the Default workspace
        (T0 + 120, "apikey_a", "wrkspc_a", None),
    ]
    assert page.rows[0].usage.input_tokens == 3_200
    assert page.rows[2].usage.input_tokens == 1_701
    assert all(not r.usage.requests_counted for r in page.rows)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([], "body is list"),
        ({"has_more": False, "next_page": None}, "'data' is not a list"),
        ({"data": [], "has_more": "no", "next_page": None}, "'has_more'"),
        ({"data": [], "has_more": False, "next_page": 7}, "'next_page'"),
        (_page("bucket"), "a bucket is not an object"),
        (_page({**_bucket(T0), "starting_at": T0}), "bucket starting_at: .*RFC 3339"),
        (_page({**_bucket(T0), "ending_at": "yesterday"}), "bucket ending_at"),
        (_page(_bucket(T0, width=3600)), "not a one-minute bucket"),
        (_page({**_bucket(T0), "starting_at": format_rfc3339(T0 + 1)}), "one-minute"),
        (_page(_bucket(T0 + 60), _bucket(T0)), "does not follow"),
        (_page(_bucket(T0), _bucket(T0)), "does not follow"),
        (_page({**_bucket(T0), "results": None}), "no 'results' list"),
        (_page(_bucket(T0, "x")), "a result in bucket 2025-08-01T00:00:00Z is not an object"),
        (_page(_bucket(T0, _result(output_tokens=-1))), r"00:00:00Z: field 'output_tokens'"),
        (_page(_bucket(T0, _result(cache_creation=None))), "cache_creation"),
        (_page(_bucket(T0, _result(output_tokens=10**15))), "implausible counts"),
        (_page(_bucket(T0, _result(api_key_id=5))), "'api_key_id' is int"),
        (_page(_bucket(T0, _result(workspace_id=["w"]))), "'workspace_id' is list"),
    ],
)
def test_a_malformed_page_is_refused_with_the_reason(body: Any, needle: str) -> None:
    with pytest.raises(MalformedResponseError, match=needle) as info:
        parse_page(body, INTERVAL)
    assert str(info.value).startswith("malformed Anthropic usage report page: ")


# ------------------------------------------------------------------ configuration


async def test_client_for_reads_the_anthropic_settings() -> None:
    settings = load_settings(
        {
            "anthropic_admin_key": KEY,
            "anthropic_api_base_url": "http://127.0.0.1:9/v1",
            "anthropic_rate_limit_per_min": 2,
            "request_timeout": "7s",
            "request_attempts": 3,
        },
        environ={},
    )
    async with aiohttp.ClientSession() as session:
        client = client_for(settings, session)
        assert isinstance(client, AnthropicUsageClient) and isinstance(client, UsageClient)
        # a trailing /v1 (OpenAI's convention) is not doubled
        assert client.endpoint == "http://127.0.0.1:9/v1/organizations/usage_report/messages"
        assert KEY not in repr(client) and "S3CRET" not in repr(client)
        assert client._limiter.max_rate == 2
        assert client._timeout.total == timedelta(seconds=7).total_seconds()
        assert client._retry.attempts == 3
        assert client_for(settings, session, quick=True)._retry.attempts == 2


async def test_client_for_without_a_key_names_the_setting() -> None:
    settings = load_settings({}, environ={})
    assert settings.anthropic_rate_limit_per_min == 10
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ConfigError, match=r"^anthropic_admin_key: not set; export "):
            client_for(settings, session)
        settings.anthropic_admin_key = SecretStr("")
        with pytest.raises(ConfigError):
            client_for(settings, session)


def test_the_rate_limit_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="anthropic_rate_limit_per_min"):
        load_settings({"anthropic_rate_limit_per_min": 0}, environ={})
    env = {"TOKENSETTLE_ANTHROPIC_RATE_LIMIT_PER_MIN": "1.5"}
    assert load_settings(environ=env).anthropic_rate_limit_per_min == 1.5

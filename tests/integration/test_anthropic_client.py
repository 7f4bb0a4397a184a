"""The real AnthropicUsageClient against the simulator's Anthropic usage report over
loopback (127.0.0.1 only): one-minute buckets, filters, pages, retries and refused keys."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
import structlog
from aioresponses import aioresponses

from tests.integration.test_usage_api_client import _Response
from tokensettle.anthropic_api import AnthropicUsageClient, format_rfc3339
from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.usage_api import (
    AuthError,
    BadRequestError,
    Filters,
    PaginationError,
    RateLimitedError,
    ResponseTooLargeError,
    RetryPolicy,
    ServerError,
    UsageClient,
)
from tokensettle.windows import Interval, floor_minute

KEY = "sk-ant-admin01-integration-S3CRET"
NOT_ADMIN = "sk-ant-api03-not-an-admin-S3CRET"
HAIKU = "claude-haiku-4-5-20251001"
FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05)
DAY = 86_400


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    scenario = Scenario(anthropic_admin_keys={KEY}, anthropic_unscoped_keys={NOT_ADMIN})
    async with RunningSimulator(scenario) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def t0() -> int:
    """A minute three days ago: all its buckets are complete."""
    return floor_minute(time.time()) - 3 * DAY


def client(sim: RunningSimulator, session: aiohttp.ClientSession, **kw: Any) -> UsageClient:
    kw.setdefault("retry", FAST)
    kw.setdefault("admin_key", KEY)
    kw.setdefault("rate_limit_per_min", 600)  # the default 10/min would slow the tests
    return AnthropicUsageClient(base_url=sim.anthropic_base_url, session=session, **kw)


async def control(
    session: aiohttp.ClientSession, sim: RunningSimulator, path: str, body: Any
) -> dict[str, Any]:
    async with session.post(f"{sim.root_url}/_sim/{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


def claude(
    t: float,
    uncached: int,
    *,
    key: str = "apikey_a",
    workspace: str | None = "wrkspc_a",
    read: int = 0,
    write_5m: int = 0,
    write_1h: int = 0,
    out: int = 10,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "provider": "anthropic",
        "time": t,
        "api_key_id": key,
        "workspace_id": workspace,
        "model": HAIKU,
        "usage": {
            "uncached_input_tokens": uncached,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": write_5m,
                "ephemeral_1h_input_tokens": write_1h,
            },
            "output_tokens": out,
        },
        **extra,
    }


def statuses(sim: RunningSimulator) -> list[int]:
    return [e.status for e in sim.anthropic_request_log]


# ---------------------------------------------------------------------------- buckets


async def test_one_minute_buckets_give_exact_rows_in_the_normalised_schema(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(
        session,
        sim,
        "requests",
        {
            "requests": [
                claude(t0 + 5, 1000, read=200, write_5m=300, write_1h=100),
                claude(t0 + 50, 10),  # same minute, same key: summed
                claude(t0 + 65, 7, key="apikey_b", workspace=None),
                claude(t0 + 600, 99),  # outside the interval
            ]
        },
    )
    result = await client(sim, session).fetch(Interval(t0, t0 + 180))
    rows = sorted(result.rows, key=lambda r: (r.minute, r.api_key_id or ""))
    assert [(r.minute, r.api_key_id, r.project_id, r.model) for r in rows] == [
        (t0, "apikey_a", "wrkspc_a", HAIKU),
        (t0 + 60, "apikey_b", None, HAIKU),
    ]
    first = rows[0].usage
    assert (first.input_tokens, first.input_cached_tokens, first.output_tokens) == (1610, 200, 20)
    assert (first.input_cache_write_5m_tokens, first.input_cache_write_1h_tokens) == (300, 100)
    assert first.input_uncached_tokens == 1010 and not first.requests_counted
    assert (result.requests, result.pages) == (1, 1)
    # RFC 3339 on minute boundaries, one minute asked beyond the interval, bracketed arrays
    assert parse_qsl(sim.anthropic_request_log[0].query) == [
        ("starting_at", format_rfc3339(t0)),
        ("ending_at", format_rfc3339(t0 + 240)),
        ("bucket_width", "1m"),
        ("limit", "4"),
        ("group_by[]", "api_key_id"),
        ("group_by[]", "workspace_id"),
        ("group_by[]", "model"),
    ]
    assert sim.anthropic_request_log[0].auth_scheme == "x-api-key"


async def test_the_last_minute_of_the_interval_is_read(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    """Usage in the interval's last minute: read even though the docs' `ending_at` says
    "buckets that end before" it (the query asks one minute more)."""
    await control(session, sim, "requests", {"requests": [claude(t0 + 119, 42)]})
    result = await client(sim, session).fetch(Interval(t0, t0 + 120))
    assert [(r.minute, r.usage.input_tokens) for r in result.rows] == [(t0 + 60, 42)]


async def test_filters_by_key_and_by_workspace_are_sent_and_applied(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(
        session,
        sim,
        "requests",
        {
            "requests": [
                claude(t0 + 1, 1, key="apikey_a", workspace="wrkspc_a"),
                claude(t0 + 2, 2, key="apikey_b", workspace="wrkspc_a"),
                claude(t0 + 3, 4, key="apikey_c", workspace="wrkspc_b"),
            ]
        },
    )
    c = client(sim, session)
    window = Interval(t0, t0 + 60)
    by_key = await c.fetch(window, Filters(api_key_ids=frozenset({"apikey_a", "apikey_c"})))
    assert sorted(r.usage.input_tokens for r in by_key.rows) == [1, 4]
    assert by_key.params["api_key_ids"] == ["apikey_a", "apikey_c"]
    by_ws = await c.fetch(window, Filters(project_ids=frozenset({"wrkspc_a"})))
    assert sorted(r.usage.input_tokens for r in by_ws.rows) == [1, 2]
    assert by_ws.params["workspace_ids"] == ["wrkspc_a"]
    both = await c.fetch(
        window,
        Filters(api_key_ids=frozenset({"apikey_b"}), project_ids=frozenset({"wrkspc_b"})),
    )
    assert both.rows == ()  # AND, as the scope's dimensions
    queries = [e.query for e in sim.anthropic_request_log]
    assert "api_key_ids%5B%5D=apikey_a&api_key_ids%5B%5D=apikey_c" in queries[0]
    assert "workspace_ids%5B%5D=wrkspc_a" in queries[1]


async def test_openai_and_anthropic_usage_stay_apart(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    openai = {
        "time": t0 + 1,
        "api_key_id": "key_o",
        "project_id": "proj_o",
        "model": "gpt-4o-mini-2024-07-18",
        "usage": {"input_tokens": 5, "output_tokens": 1, "num_model_requests": 1},
    }
    await control(session, sim, "requests", {"requests": [openai, claude(t0 + 2, 77)]})
    theirs = await client(sim, session).fetch(Interval(t0, t0 + 60))
    assert [r.usage.input_tokens for r in theirs.rows] == [77]
    ours = await UsageClient(
        base_url=sim.base_url, admin_key="sk-admin-simulator-0000", session=session, retry=FAST
    ).fetch(Interval(t0, t0 + 60))
    assert [r.usage.input_tokens for r in ours.rows] == [5]
    assert sim.stats()["registered_requests"] == 1
    assert sim.stats()["registered_anthropic_requests"] == 1


# ---------------------------------------------------------------------------- pages


async def test_a_long_interval_is_read_over_several_pages(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    start = t0 - DAY
    minutes = (0, 1439, 1440, 2000, 2999)
    await control(
        session, sim, "requests", {"requests": [claude(start + 60 * m + 1, m + 1) for m in minutes]}
    )
    result = await client(sim, session).fetch(Interval(start, start + 3000 * 60))
    assert sorted((r.minute - start) // 60 for r in result.rows) == list(minutes)
    assert sum(r.usage.input_tokens for r in result.rows) == sum(m + 1 for m in minutes)
    assert (result.pages, result.requests) == (3, 3)  # 3,001 minutes asked, 1,440 a page
    assert [("page=" in e.query) for e in sim.anthropic_request_log] == [False, True, True]


async def test_repeated_cursor_and_has_more_without_cursor_are_refused() -> None:
    """The simulator never does this; aioresponses shapes the answers."""
    base = "http://127.0.0.1:9"
    t0 = 1_754_006_400  # 2025-08-01T00:00:00Z
    window = Interval(t0, t0 + 120)

    def page(start: int, nxt: str | None, more: bool = True) -> dict[str, Any]:
        bucket = {
            "starting_at": format_rfc3339(start),
            "ending_at": format_rfc3339(start + 60),
            "results": [],
        }
        return {"data": [bucket], "has_more": more, "next_page": nxt}

    async with aiohttp.ClientSession() as s:
        c = AnthropicUsageClient(base_url=base, admin_key=KEY, session=s, retry=FAST)
        url = re.compile(r"^http://127\.0\.0\.1:9/v1/organizations/usage_report/messages\?")
        with aioresponses() as mocked:
            mocked.get(url, payload=page(t0, "page_1"), response_class=_Response)
            mocked.get(url, payload=page(t0 + 60, "page_1"), response_class=_Response)
            with pytest.raises(PaginationError, match="repeats an earlier next_page"):
                await c.fetch(window)
        with aioresponses() as mocked:
            mocked.get(url, payload=page(t0, None), response_class=_Response)
            with pytest.raises(PaginationError, match="has_more but gives no next_page"):
                await c.fetch(window)
        with aioresponses() as mocked:
            mocked.get(url, payload=page(t0, "page_1"), repeat=True, response_class=_Response)
            c2 = AnthropicUsageClient(
                base_url=base, admin_key=KEY, session=s, retry=FAST, max_pages=1
            )
            with pytest.raises(PaginationError, match="more than 1 pages"):
                await c2.fetch(window)


# ---------------------------------------------------------------------------- faults


async def test_429_with_retry_after_is_waited_for_then_succeeds(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(session, sim, "requests", {"requests": [claude(t0 + 1, 42)]})
    fault = {"kind": "429", "retry_after": 1, "target": "anthropic"}
    await control(session, sim, "faults", {"faults": [fault]})
    began = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        result = await client(sim, session).fetch(Interval(t0, t0 + 60))
    elapsed = time.monotonic() - began
    assert [r.usage.input_tokens for r in result.rows] == [42]
    assert result.requests == 2 and statuses(sim) == [429, 200]
    assert elapsed >= 0.95  # the header's 1 s, not the 0.01 s backoff
    events = [e for e in logs if e["event"] == "anthropic_api.request"]
    assert [(e["status"], e["attempt"]) for e in events] == [(429, 1), (200, 2)]
    assert KEY not in repr(logs)


async def test_429_past_the_retries_is_a_rate_limited_error_in_anthropics_words(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    fault = {"kind": "429", "target": "anthropic"}
    await control(session, sim, "faults", {"faults": [fault] * 2})
    with pytest.raises(RateLimitedError) as info:
        await client(sim, session, retry=RetryPolicy(attempts=2, base=0.01)).fetch(
            Interval(t0, t0 + 60)
        )
    assert str(info.value).startswith("Anthropic usage report answered HTTP 429: rate_limit_error")
    assert "attempt 2 of 2" in str(info.value)


@pytest.mark.parametrize("kinds", [["529"], ["500"], ["502"], ["503", "529"]])
async def test_overloaded_and_server_errors_are_retried(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int, kinds: list[str]
) -> None:
    await control(session, sim, "requests", {"requests": [claude(t0 + 1, 9)]})
    faults = [{"kind": k, "target": "anthropic"} for k in kinds]
    await control(session, sim, "faults", {"faults": faults})
    result = await client(sim, session).fetch(Interval(t0, t0 + 60))
    assert [r.usage.input_tokens for r in result.rows] == [9]
    assert statuses(sim) == [int(k) for k in kinds] + [200]


async def test_server_errors_past_the_retries_never_become_rows(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(session, sim, "requests", {"requests": [claude(t0 + 1, 9)]})
    faults = [{"kind": "529", "target": "anthropic"}] * 4
    await control(session, sim, "faults", {"faults": faults})
    with pytest.raises(ServerError, match="overloaded_error: Overloaded"):
        await client(sim, session).fetch(Interval(t0, t0 + 60))
    assert statuses(sim) == [529] * 4


@pytest.mark.parametrize(
    ("key", "status", "needle"),
    [
        ("sk-ant-admin01-wrong-S3CRET", 401, "authentication_error: invalid x-api-key"),
        (NOT_ADMIN, 403, "permission_error"),
    ],
)
async def test_a_refused_key_is_an_auth_error_at_once(
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    t0: int,
    key: str,
    status: int,
    needle: str,
) -> None:
    c = client(sim, session, admin_key=key)
    with structlog.testing.capture_logs() as logs, pytest.raises(AuthError) as info:
        await c.fetch(Interval(t0, t0 + 60))
    assert info.value.status == status and needle in str(info.value)
    assert statuses(sim) == [status]  # never retried
    for text in (str(info.value), repr(info.value), repr(c), repr(logs)):
        assert "S3CRET" not in text


@pytest.mark.parametrize(("kind", "status"), [("401", 401), ("403", 403)])
async def test_auth_faults_are_auth_errors(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int, kind: str, status: int
) -> None:
    await control(session, sim, "faults", {"faults": [{"kind": kind, "target": "anthropic"}]})
    with pytest.raises(AuthError) as info:
        await client(sim, session).fetch(Interval(t0, t0 + 60))
    assert info.value.status == status


async def test_usage_faults_are_not_anthropics(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(session, sim, "faults", {"faults": [{"kind": "500"}]})  # target: usage
    await client(sim, session).fetch(Interval(t0, t0 + 60))
    assert statuses(sim) == [200] and sim.stats()["pending_faults"] == 1


async def test_a_bomb_is_refused_past_the_page_cap(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    fault = {"kind": "gzip_bomb", "size": 8 * 2**20, "target": "anthropic"}
    await control(session, sim, "faults", {"faults": [fault]})
    with pytest.raises(ResponseTooLargeError, match="larger than 1,048,576 bytes"):
        await client(sim, session, max_page_bytes=2**20).fetch(Interval(t0, t0 + 60))


async def test_a_request_the_api_refuses_is_a_bad_request_with_its_message(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    """A 400 in Anthropic's envelope is a BadRequestError naming the error type, not retried.
    The client never builds such a query: it goes through the client's own machinery
    (`fetch_pages`: path, headers, errors) by hand, with Unix seconds for a time."""
    c = client(sim, session)
    with pytest.raises(BadRequestError, match="invalid_request_error: starting_at: expected"):
        await c.fetch_pages(c.PATH, [("starting_at", "1760000000")], parse_page, what="by hand")
    assert statuses(sim) == [400]


def parse_page(body: object) -> Any:
    raise AssertionError(f"a 400 is never parsed as a page: {body!r}")

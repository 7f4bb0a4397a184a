"""The real UsageClient against the real simulator over loopback (127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import make_mocked_request
from aioresponses import aioresponses

from tokensettle.simulator import (
    SIMULATOR_ADMIN_KEY,
    RunningSimulator,
    Scenario,
    ScenarioError,
    load_scenario_file,
    serve_forever,
)
from tokensettle.simulator import cli as simulator_cli
from tokensettle.simulator.server import _loopback_only
from tokensettle.usage import Usage, UsageRow
from tokensettle.usage_api import (
    AuthError,
    BadRequestError,
    Filters,
    MalformedResponseError,
    PaginationError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    TransportError,
    UsageApiError,
    UsageClient,
    build_query,
)
from tokensettle.windows import Interval, floor_minute

KEY = "sk-admin-integration-S3CRET-key"
UNSCOPED = "sk-proj-no-usage-scope-S3CRET"
MINI = "gpt-4o-mini-2024-07-18"
FOUR_O = "gpt-4o-2024-08-06"
FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05)
DAY = 86_400


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with RunningSimulator(Scenario(admin_keys={KEY}, unscoped_keys={UNSCOPED})) as running:
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
    return UsageClient(base_url=sim.base_url, session=session, **kw)


async def control(
    session: aiohttp.ClientSession, sim: RunningSimulator, path: str, body: Any
) -> dict[str, Any]:
    async with session.post(f"{sim.root_url}/_sim/{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


def req(
    t: float,
    input_tokens: int,
    *,
    key: str = "key_a",
    project: str = "proj_a",
    model: str = MINI,
    **extra: Any,
) -> dict[str, Any]:
    usage = {
        "input_tokens": input_tokens,
        "output_tokens": input_tokens // 2,
        "num_model_requests": 1,
    }
    usage.update(extra.pop("usage", {}))
    return {
        "time": t,
        "api_key_id": key,
        "project_id": project,
        "model": model,
        "usage": usage,
        **extra,
    }


def statuses(sim: RunningSimulator) -> list[int]:
    return [e.status for e in sim.request_log]


def in_interval(rows: list[UsageRow], interval: Interval) -> list[UsageRow]:
    return [r for r in rows if interval.contains_minute(r.minute)]


# ---------------------------------------------------------------------------- happy paths


async def test_exact_totals_come_back(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(
        session,
        sim,
        "requests",
        {
            "requests": [
                req(t0 + 5, 100, usage={"input_cached_tokens": 40}),
                req(t0 + 50, 10),
                req(t0 + 61, 7, key="key_b"),
                req(t0 + 62, 3, key="key_b", project="proj_b", model=FOUR_O),
                req(t0 + 600, 1000),  # outside the interval below
                req(t0 - 1, 1000),  # just before it
            ]
        },
    )
    interval = Interval(t0, t0 + 300)
    result = await client(sim, session).fetch(interval)
    assert sorted(result.rows, key=lambda r: (r.minute, r.dims())) == in_interval(
        sim.scenario.truth(), interval
    )
    by_dims = {(r.minute, r.dims()): r.usage for r in result.rows}
    assert by_dims[(t0, ("key_a", "proj_a", MINI))] == Usage(110, 55, 2, input_cached_tokens=40)
    assert sum(r.usage.input_tokens for r in result.rows) == 120
    assert (result.requests, result.pages, result.interval) == (1, 1, interval)
    assert result.params == {
        "start_time": str(t0),
        "end_time": str(t0 + 300),
        "bucket_width": "1m",
        "limit": "5",
        "group_by": ["api_key_id", "project_id", "model"],
    }
    assert statuses(sim) == [200]
    assert sim.request_log[0].auth_scheme == "Bearer"


async def test_pagination_over_more_than_1440_minutes_resends_every_parameter(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    start = t0 - 2 * DAY
    interval = Interval(start, start + 3000 * 60)  # 1440 + 1440 + 120 buckets
    minutes = [0, 1439, 1440, 2000, 2879, 2880, 2999]
    await control(
        session,
        sim,
        "requests",
        {"requests": [req(start + m * 60 + 30, m + 1, key=f"key_{m % 2}") for m in minutes]},
    )
    filters = Filters(api_key_ids=frozenset({"key_1", "key_0"}))
    c = client(sim, session)
    result = await c.fetch(interval, filters)
    assert (result.pages, result.requests, c.requests_sent) == (3, 3, 3)
    assert sorted(r.minute for r in result.rows) == [start + m * 60 for m in minutes]
    assert sum(r.usage.input_tokens for r in result.rows) == sum(m + 1 for m in minutes)
    base = build_query(interval, filters)
    sent = [parse_qsl(e.query, keep_blank_values=True) for e in sim.request_log]
    assert sent[0] == base
    cursors = []
    for pairs in sent[1:]:
        assert pairs[:-1] == base  # every original parameter, in order, plus the page
        assert pairs[-1][0] == "page"
        cursors.append(pairs[-1][1])
    assert len(set(cursors)) == 2
    assert statuses(sim) == [200, 200, 200]


async def test_filters_reach_the_server(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(
        session,
        sim,
        "requests",
        {"requests": [req(t0 + 1, 1, key="key_a"), req(t0 + 2, 2, key="key_b", project="proj_b")]},
    )
    result = await client(sim, session).fetch(
        Interval(t0, t0 + 60), Filters(project_ids=frozenset({"proj_b"}))
    )
    assert [(r.api_key_id, r.usage.input_tokens) for r in result.rows] == [("key_b", 2)]
    assert "&project_ids=proj_b" in sim.request_log[0].query


async def test_concurrent_fetches_count_their_own_requests(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    c = client(sim, session)
    one, three = await asyncio.gather(
        c.fetch(Interval(t0, t0 + 60)), c.fetch(Interval(t0 - 2 * DAY, t0 - 2 * DAY + 3000 * 60))
    )
    assert (one.requests, one.pages, three.requests, three.pages) == (1, 1, 3, 3)
    assert c.requests_sent == 4 == len(sim.request_log)


async def test_late_revisions_and_delayed_visibility_show_on_later_reads(
    session: aiohttp.ClientSession,
) -> None:
    now = [1_760_572_800.0]
    t0 = int(now[0]) - 3600
    async with RunningSimulator(Scenario(admin_keys={KEY}), clock=lambda: now[0]) as sim:
        await control(
            session,
            sim,
            "requests",
            {
                "requests": [
                    req(t0 + 5, 10, revisions=[{"after": 300, "usage": {"input_tokens": 25}}]),
                    req(t0 + 65, 4, visible_after=600),
                ]
            },
        )
        c = client(sim, session)
        interval = Interval(t0, t0 + 120)
        first = await c.fetch(interval)
        assert [(r.minute, r.usage.input_tokens) for r in first.rows] == [(t0, 10)]
        now[0] += 300
        second = await c.fetch(interval)
        assert [(r.minute, r.usage.input_tokens) for r in second.rows] == [(t0, 25)]
        now[0] += 300
        third = await c.fetch(interval)
        assert [(r.minute, r.usage.input_tokens) for r in third.rows] == [(t0, 25), (t0 + 60, 4)]
        assert c.requests_sent == 3


# ---------------------------------------------------------------------------- retries


async def test_429_with_retry_after_is_waited_for_then_succeeds(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(session, sim, "requests", {"requests": [req(t0 + 1, 42)]})
    await control(session, sim, "faults", {"faults": [{"kind": "429", "retry_after": 1}]})
    began = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        result = await client(sim, session).fetch(Interval(t0, t0 + 60))
    elapsed = time.monotonic() - began
    assert [r.usage.input_tokens for r in result.rows] == [42]
    assert result.requests == 2 and statuses(sim) == [429, 200]
    assert elapsed >= 0.95  # the header's 1 s, not the 0.01 s backoff
    events = [e for e in logs if e["event"] == "usage_api.request"]
    assert [(e["status"], e["attempt"], e["page"]) for e in events] == [(429, 1, 1), (200, 2, 1)]
    assert all(isinstance(e["duration_ms"], float) for e in events)


async def test_429_without_retry_after_backs_off_then_succeeds(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(session, sim, "requests", {"requests": [req(t0 + 1, 42)]})
    await control(session, sim, "faults", {"faults": [{"kind": "429"}, {"kind": "429"}]})
    began = time.monotonic()
    result = await client(sim, session).fetch(Interval(t0, t0 + 60))
    assert time.monotonic() - began < 0.9
    assert [r.usage.input_tokens for r in result.rows] == [42]
    assert statuses(sim) == [429, 429, 200] and result.requests == 3


@pytest.mark.parametrize("kinds", [["500"], ["503"], ["502"], ["500", "503", "502"]])
async def test_server_errors_are_retried(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int, kinds: list[str]
) -> None:
    await control(session, sim, "requests", {"requests": [req(t0 + 1, 9)]})
    await control(session, sim, "faults", {"faults": [{"kind": k} for k in kinds]})
    result = await client(sim, session).fetch(Interval(t0, t0 + 60))
    assert [r.usage.input_tokens for r in result.rows] == [9]
    assert statuses(sim) == [int(k) for k in kinds] + [200]
    assert result.requests == len(kinds) + 1


async def test_hang_times_out_and_is_retried(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(session, sim, "requests", {"requests": [req(t0 + 1, 5)]})
    await control(session, sim, "faults", {"faults": [{"kind": "hang", "seconds": 30}]})
    began = time.monotonic()
    result = await client(sim, session, request_timeout=0.5).fetch(Interval(t0, t0 + 60))
    assert 0.45 <= time.monotonic() - began < 5
    assert [r.usage.input_tokens for r in result.rows] == [5]
    assert result.requests == 2
    assert [e.fault for e in sim.request_log] == ["hang", None]
    # leaving the fixture wakes the hanging handler instead of waiting 30 s


async def test_bad_json_is_retried(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(session, sim, "requests", {"requests": [req(t0 + 1, 5)]})
    await control(session, sim, "faults", {"faults": [{"kind": "bad_json"}]})
    result = await client(sim, session).fetch(Interval(t0, t0 + 60))
    assert [r.usage.input_tokens for r in result.rows] == [5]
    assert statuses(sim) == [200, 200] and result.requests == 2


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"kind": "429"}, RateLimitedError),
        ({"kind": "429", "retry_after": 1}, RateLimitedError),
        ({"kind": "500"}, ServerError),
        ({"kind": "503"}, ServerError),
        ({"kind": "bad_json"}, MalformedResponseError),
        ({"kind": "hang", "seconds": 30}, TransportError),
    ],
)
async def test_faults_beyond_the_attempts_raise_a_typed_error_never_empty_rows(
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    t0: int,
    fault: dict[str, Any],
    error: type[UsageApiError],
) -> None:
    await control(session, sim, "requests", {"requests": [req(t0 + 1, 5)]})
    await control(session, sim, "faults", {"faults": [fault] * 3})
    policy = RetryPolicy(attempts=2, base=0.01, cap=0.02)
    c = client(sim, session, retry=policy, request_timeout=0.3)
    if fault.get("retry_after"):
        c = client(sim, session, retry=RetryPolicy(attempts=2, base=0.01, max_retry_after=5))
    with pytest.raises(error) as info:
        await c.fetch(Interval(t0, t0 + 60))
    assert info.value.retryable
    assert "attempt 2 of 2" in str(info.value)
    assert len(sim.request_log) == 2 and c.requests_sent == 2
    assert KEY not in str(info.value) and KEY not in repr(info.value)


async def test_retry_after_longer_than_allowed_fails_at_once(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    await control(session, sim, "faults", {"faults": [{"kind": "429", "retry_after": 600}]})
    c = client(sim, session, retry=RetryPolicy(attempts=5, base=0.01, max_retry_after=120))
    began = time.monotonic()
    with pytest.raises(RateLimitedError, match="Retry-After 600s exceeds 120s") as info:
        await c.fetch(Interval(t0, t0 + 60))
    assert time.monotonic() - began < 1
    assert info.value.retry_after == 600 and info.value.status == 429
    assert len(sim.request_log) == 1


async def test_connection_refused_is_a_transport_error(
    session: aiohttp.ClientSession, t0: int
) -> None:
    async with RunningSimulator() as gone:
        base_url = gone.base_url
    c = UsageClient(base_url=base_url, admin_key=KEY, session=session, retry=FAST)
    with pytest.raises(TransportError, match="attempt 4 of 4") as info:
        await c.fetch(Interval(t0, t0 + 60))
    assert c.requests_sent == 4
    assert KEY not in str(info.value) and KEY not in repr(info.value)


async def test_rate_limiter_holds_requests_beyond_the_budget(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    c = client(sim, session, rate_limit_per_min=2)
    with pytest.raises(TimeoutError):
        # three pages, but only two requests fit in the budget: the third waits ~30 s
        await asyncio.wait_for(c.fetch(Interval(t0 - 2 * DAY, t0 - 2 * DAY + 3000 * 60)), 0.5)
    assert len(sim.request_log) == 2 and c.requests_sent == 2


async def test_page_guard_stops_runaway_pagination(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    c = client(sim, session, max_pages=2)
    with pytest.raises(PaginationError, match="more than 2 pages"):
        await c.fetch(Interval(t0 - 2 * DAY, t0 - 2 * DAY + 3000 * 60))
    assert len(sim.request_log) == 2


# ---------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("key", "status", "fault", "message"),
    [
        ("sk-admin-wrong-S3CRET-0001", 401, None, "Incorrect API key provided"),
        (UNSCOPED, 403, None, "Missing scopes: api.usage.read"),
        (KEY, 401, "401", "Incorrect API key provided"),
        (KEY, 403, "403", "Missing scopes: api.usage.read"),
    ],
)
async def test_auth_errors_are_not_retried_and_never_show_the_key(
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    t0: int,
    key: str,
    status: int,
    fault: str | None,
    message: str,
) -> None:
    if fault:
        await control(session, sim, "faults", {"faults": [{"kind": fault}]})
    c = client(sim, session, admin_key=key)
    with structlog.testing.capture_logs() as logs, pytest.raises(AuthError) as info:
        await c.fetch(Interval(t0, t0 + 60))
    err = info.value
    assert err.status == status and not err.retryable
    assert message in err.message and message in str(err)
    assert statuses(sim) == [status] and c.requests_sent == 1
    for text in (str(err), repr(err), err.message, repr(logs), repr(c), repr(sim.scenario)):
        assert key not in text
    assert "S3CRET" not in repr([e.to_json() for e in sim.request_log])


# ---------------------------------------------------------------------------- simulator


async def test_float_start_time_is_rejected_by_the_simulator(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    async with session.get(
        f"{sim.base_url}/organization/usage/completions",
        params={"start_time": "1760612579.93", "bucket_width": "1m"},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["param"] == "start_time"
    assert body["error"]["type"] == "invalid_request_error"
    assert "1760612579.93" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_all_array_encodings_give_the_same_answer(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    sim.scenario.add(
        next(iter(Scenario.from_json({"requests": [req(t0 + 1, 3, model=FOUR_O)]}).requests))
    )
    base = f"start_time={t0}&end_time={t0 + 60}&bucket_width=1m"
    bodies = []
    for arrays in (
        "group_by=model&group_by=api_key_id",
        "group_by[]=model&group_by[]=api_key_id",
        "group_by%5B%5D=model&group_by%5B%5D=api_key_id",
        "group_by=model,api_key_id",
    ):
        async with session.get(
            f"{sim.base_url}/organization/usage/completions?{base}&{arrays}",
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            assert resp.status == 200
            bodies.append(await resp.json())
    assert all(b == bodies[0] for b in bodies)
    result = bodies[0]["data"][0]["results"][0]
    assert (result["model"], result["api_key_id"], result["project_id"]) == (FOUR_O, "key_a", None)


async def test_control_endpoints(sim: RunningSimulator, session: aiohttp.ClientSession) -> None:
    root = sim.root_url
    await control(session, sim, "requests", {"requests": [req(1_000_000, 1)]})
    await control(session, sim, "faults", {"faults": [{"kind": "500"}]})
    async with session.get(f"{sim.base_url}/organization/usage/completions?start_time=0") as resp:
        assert resp.status == 500  # the fault comes before auth
    async with session.get(f"{sim.base_url}/organization/usage/completions?start_time=0") as resp:
        assert resp.status == 401
    async with session.get(f"{root}/_sim/stats") as resp:
        assert await resp.json() == {
            "usage_requests": 2,
            "by_status": {"401": 1, "500": 1},
            "registered_requests": 1,
            "pending_faults": 0,
            "anthropic_requests": 0,  # Anthropic's usage report keeps its own count
            "anthropic_by_status": {},
            "registered_anthropic_requests": 0,
        }
    async with session.get(f"{root}/_sim/log") as resp:
        log = await resp.json()
    assert [(e["query"], e["status"], e["fault"]) for e in log] == [
        ("start_time=0", 500, "500"),
        ("start_time=0", 401, None),
    ]
    async with session.get(f"{root}/_sim/truth") as resp:
        truth = await resp.json()
    assert truth["rows"][0]["minute"] == floor_minute(1_000_000)
    assert truth["rows"][0]["usage"]["input_tokens"] == 1
    assert await control(session, sim, "keys", {"admin_keys": ["sk-admin-new"]}) == {
        "admin_keys": 1,
        "unscoped_keys": 1,
        "anthropic_admin_keys": 0,
        "anthropic_unscoped_keys": 0,
    }
    assert sim.scenario.check_auth("Bearer sk-admin-new") is None
    await control(session, sim, "reset", {})
    assert sim.stats()["usage_requests"] == 0 and sim.scenario.requests == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("requests", b"{not json"),
        ("requests", b"[]"),
        ("requests", b'{"requests": {}}'),
        ("requests", b'{"requests": [{"time": 1}]}'),
        ("faults", b'{"faults": [{"kind": "418"}]}'),
        ("keys", b'{"admin_keys": "sk-admin-x"}'),
        ("requests", b'{"requests": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),  # was a 500
        ("requests", b'{"requests": [], "n": ' + b"9" * 5_000 + b"}"),  # was a 500
    ],
)
async def test_control_endpoints_refuse_bad_bodies(
    sim: RunningSimulator, session: aiohttp.ClientSession, path: str, body: bytes
) -> None:
    async with session.post(f"{sim.root_url}/_sim/{path}", data=body) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()
    assert sim.scenario.requests == [] and not sim.scenario.faults


async def test_control_endpoints_answer_loopback_only() -> None:
    transport = mock.Mock()
    transport.get_extra_info.return_value = ("192.0.2.7", 40000)  # TEST-NET address
    request = make_mocked_request("POST", "/_sim/reset", transport=transport)
    handler = mock.AsyncMock()
    response = await _loopback_only(request, handler)
    assert response.status == 403 and not handler.called


async def _serve_then_stop(stop: str, t0: int) -> None:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(
            serve_forever(
                "127.0.0.1", 0, Scenario(), on_ready=lambda s: ready.set_result(s.base_url)
            )
        )
        base_url = await asyncio.wait_for(ready, 5)
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"{base_url}/organization/usage/completions?start_time={t0}",
                headers={"Authorization": f"Bearer {SIMULATOR_ADMIN_KEY}"},
            ) as resp,
        ):
            assert resp.status == 200
        if stop == "sigterm":
            # the handler is installed before on_ready runs, so this cannot kill pytest
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(task, 5)
            assert task.done() and task.exception() is None
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    listening = [e for e in logs if e["event"] == "simulator.listening"]
    assert [e["url"] for e in listening] == [base_url]


@pytest.mark.parametrize("stop", ["sigterm", "cancel"])
async def test_serve_forever_stops_on_sigterm_and_on_cancel(stop: str, t0: int) -> None:
    await _serve_then_stop(stop, t0)
    # the signal handlers are removed again afterwards
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_scenario_files(tmp_path: Path) -> None:
    good = tmp_path / "scenario.json"
    good.write_text(
        '{"admin_keys": ["sk-admin-file"], "requests": [{"time": 600, "api_key_id": "k",'
        ' "project_id": "p", "model": "gpt-4o-mini-2024-07-18", "usage": {"input_tokens": 3}}]}'
    )
    scenario = load_scenario_file(good, now=100.0)
    assert scenario.admin_keys == {"sk-admin-file"} and scenario.requests[0].registered_at == 100.0
    bad = tmp_path / "bad.json"
    bad.write_text('{"requests": [')
    with pytest.raises(ScenarioError, match="not valid JSON"):
        load_scenario_file(bad)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario_file(tmp_path / "missing.json")
    args = simulator_cli.build_parser().parse_args(["--port", "0", "--scenario", str(bad)])
    assert simulator_cli.main(args) == 2


# ---------------------------------------------------------------------------- exotic answers

FAKE_BASE = "http://127.0.0.1:9/v1"  # never contacted: aioresponses answers
FAKE_URL = re.compile(r"^http://127\.0\.0\.1:9/v1/organization/usage/completions\?.*$")


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds ClientResponse without the `stream_writer` argument that
    aiohttp 3.14 made required (pnuckowski/aioresponses#289, fix in PR #288, unreleased).
    With `writer=None` aiohttp only reads `stream_writer.output_size`, so a stand-in
    suffices. Harmless once aioresponses passes the argument itself."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        if "stream_writer" in inspect.signature(aiohttp.ClientResponse.__init__).parameters:
            kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


def _page(start: int, has_more: bool, next_page: str | None) -> dict[str, Any]:
    result = {
        "object": "organization.usage.completions.result",
        "input_tokens": 1,
        "output_tokens": 1,
        "num_model_requests": 1,
    }
    bucket = {"object": "bucket", "start_time": start, "end_time": start + 60, "results": [result]}
    return {"object": "page", "data": [bucket], "has_more": has_more, "next_page": next_page}


async def test_has_more_without_cursor_and_repeated_cursor_are_pagination_errors(
    session: aiohttp.ClientSession, t0: int
) -> None:
    c = UsageClient(base_url=FAKE_BASE, admin_key=KEY, session=session, retry=FAST)
    interval = Interval(t0, t0 + 180)
    with aioresponses() as m:
        m.get(FAKE_URL, payload=_page(t0, True, None), response_class=_Response)
        with pytest.raises(PaginationError, match="no next_page"):
            await c.fetch(interval)
        m.get(FAKE_URL, payload=_page(t0, True, "page_A"), response_class=_Response)
        m.get(FAKE_URL, payload=_page(t0 + 60, True, "page_A"), response_class=_Response)
        with pytest.raises(PaginationError, match="repeats an earlier next_page"):
            await c.fetch(interval)
        m.get(FAKE_URL, payload=_page(t0, True, "page_B"), response_class=_Response)
        m.get(FAKE_URL, payload=_page(t0, False, None), response_class=_Response)
        with pytest.raises(PaginationError, match="repeats buckets"):
            await c.fetch(interval)
        sent = [str(call_url) for (_, call_url) in m.requests]
    assert c.requests_sent == 5
    assert any("page=page_A" in u for u in sent) and any("page=page_B" in u for u in sent)


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_client_errors_are_not_retried(
    session: aiohttp.ClientSession, t0: int, status: int
) -> None:
    c = UsageClient(base_url=FAKE_BASE, admin_key=KEY, session=session, retry=FAST)
    envelope = {
        "error": {
            "message": f"Invalid value for 'limit' (key {KEY})",  # a server echoing the key
            "type": "invalid_request_error",
            "param": "limit",
            "code": None,
        }
    }
    with aioresponses() as m:
        m.get(FAKE_URL, status=status, payload=envelope, repeat=True, response_class=_Response)
        with pytest.raises(BadRequestError, match="Invalid value for 'limit'") as info:
            await c.fetch(Interval(t0, t0 + 60))
    assert info.value.status == status and not info.value.retryable
    assert c.requests_sent == 1
    assert KEY not in str(info.value) and "[REDACTED]" in str(info.value)

"""The bill check against the simulator over loopback: the costs it bills from its own
requests beside the same usage priced by tokensettle.

Hand-computed amounts (genai-prices 0.2.3, USD per million tokens): gpt-4o-mini 0.15 in /
0.075 cached / 0.60 out, batch 0.075 / 0.30; gpt-5-mini flex 0.125 / 0.0125 / 1.00.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from tokensettle.bill import DAY, BillCheck, BillUnavailable, render_table
from tokensettle.bill_cli import check_for_report, run_check
from tokensettle.billing_api import fetch_bill_data
from tokensettle.config import Settings, load_settings
from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.simulator.scenario import request_from_json
from tokensettle.simulator.server import COSTS
from tokensettle.usage_api import AuthError, RetryPolicy, TransportError, UsageClient

KEY = "sk-admin-bill-0000"
UNSCOPED = "sk-proj-bill-noscope"
MINI = "gpt-4o-mini-2024-07-18"
G5MINI = "gpt-5-mini-2025-08-07"
UNKNOWN = "acme-secret-model-1"
TODAY = int(time.time()) // DAY * DAY
#: The checks' "now": fixed, so a test running over midnight checks the same days.
NOW = datetime.fromtimestamp(TODAY + 1, UTC)


def at(days_ago: int, hour: int = 12) -> int:
    return TODAY - days_ago * DAY + hour * 3600


def day(days_ago: int) -> date:
    return NOW.date() - timedelta(days=days_ago)


def request(t: int, project: str, model: str, tin: int, tout: int, **extra: Any) -> dict[str, Any]:
    cached = extra.pop("cached", None)
    usage = {"input_tokens": tin, "output_tokens": tout, "num_model_requests": 4}
    if cached is not None:
        usage["input_cached_tokens"] = cached
    return {
        "time": t,
        "api_key_id": "key_bill",
        "project_id": project,
        "model": model,
        "usage": usage,
        **extra,
    }


REQUESTS = [
    # 2 days ago, proj_a: standard 0.225 + 0.0375 + 0.60 = 0.8625; batch 0.15 + 0.30 = 0.45
    request(at(2), "proj_a", MINI, 2_000_000, 1_000_000, cached=500_000),
    request(at(2, 15), "proj_a", MINI, 2_000_000, 1_000_000, batch=True),
    # 3 days ago, proj_b: flex 0.125 + 1.00 = 1.125
    request(at(3), "proj_b", G5MINI, 1_000_000, 1_000_000, service_tier="flex"),
    # 9 days ago (a second page of daily buckets with the default limit of 7)
    request(at(9), "proj_a", MINI, 4_000_000, 0),  # 0.60
    # today: still being billed, never checked
    request(TODAY + 60, "proj_a", MINI, 9_000_000, 0),
]


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    scenario = Scenario.from_json(
        {"admin_keys": [KEY], "unscoped_keys": [UNSCOPED], "requests": REQUESTS}
    )
    async with RunningSimulator(scenario) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def settings(sim: RunningSimulator, key: str = KEY, **extra: Any) -> Settings:
    values = {"api_base_url": sim.base_url, "admin_key": key, "request_attempts": 2, **extra}
    return load_settings(values, environ={})


async def billing(session: aiohttp.ClientSession, sim: RunningSimulator, **knobs: Any) -> None:
    async with session.post(f"{sim.root_url}/_sim/billing", json=knobs) as resp:
        assert resp.status == 200, await resp.text()


def groups(check: BillCheck) -> dict[tuple[int, str | None, str], Any]:
    """(days ago, project, model label) -> the model check."""
    return {
        ((NOW.date() - d.day).days, d.project_id, m.label): m for d in check.days for m in d.models
    }


async def checked(sim: RunningSimulator, key: str = KEY, **extra: Any) -> BillCheck:
    projects = extra.pop("projects", ())
    return await run_check(settings(sim, key, **extra), days=10, projects=projects, now=NOW)


async def test_exact_prices_pass(sim: RunningSimulator) -> None:
    check = await checked(sim)
    assert check.verdict == "ok", [(d.day, d.project_id, d.verdict) for d in check.days]
    assert [(d.day.isoformat(), d.project_id) for d in check.days] == sorted(
        [(d.day.isoformat(), d.project_id) for d in check.days]
    )
    assert len(check.days) == 3  # 9, 3 and 2 days ago; today is left out
    assert check.billed_usd == check.priced_usd == Decimal("3.0375")
    assert check.uncovered_usd == 0


async def test_batch_and_flex_are_priced_at_their_own_prices(sim: RunningSimulator) -> None:
    by_model = groups(await checked(sim))
    mini = by_model[2, "proj_a", MINI]
    assert {(p.row.batch, p.usd) for p in mini.priced} == {
        (False, Decimal("0.8625")),
        (True, Decimal("0.45")),
    }
    assert mini.billed_usd == Decimal("1.3125") and mini.verdict == "ok"
    assert {line.line_item for line in mini.billed} >= {
        f"{MINI}, input, batch",
        f"{MINI}, cached input",
    }
    flex = by_model[3, "proj_b", G5MINI]
    assert flex.priced[0].row.service_tier == "flex"
    assert flex.priced_usd == Decimal("1.125") == flex.billed_usd


async def test_a_price_error_is_caught(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    """The simulator bills gpt-4o-mini 10% above the table: every day it was used fails."""
    await billing(session, sim, price_factors={MINI: 1.1})
    check = await checked(sim)
    assert check.verdict == "mismatch" and not check.passed
    verdicts = {(d.project_id, d.verdict) for d in check.days}
    assert verdicts == {("proj_a", "mismatch"), ("proj_b", "ok")}
    mini = groups(check)[2, "proj_a", MINI]
    assert mini.billed_usd == Decimal("1.44375")  # 1.3125 * 1.1
    assert mini.diff_pct is not None and round(mini.diff_pct, 2) == Decimal("-9.09")


async def test_an_added_amount_on_a_model_line_is_caught(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    await billing(
        session,
        sim,
        line_items=[
            {
                "time": at(3, 20),
                "project_id": "proj_b",
                "line_item": f"{G5MINI}, output, flex",
                "amount": 0.05,
            }
        ],
    )
    check = await checked(sim)
    flex = groups(check)[3, "proj_b", G5MINI]
    assert flex.billed_usd == Decimal("1.175") and flex.verdict == "mismatch"  # 4.4% over


async def test_the_tolerance_setting_decides(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    await billing(session, sim, price_factors={MINI: 1.015})  # 1.5% over: within 2%
    assert (await checked(sim)).verdict == "ok"
    strict = await checked(sim, bill_tolerance=0.01)
    assert strict.verdict == "mismatch"


async def test_line_items_completions_do_not_cover_are_shown_apart(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    await billing(
        session,
        sim,
        line_items=[
            {
                "time": at(2, 1),
                "project_id": "proj_a",
                "line_item": "text-embedding-3-small, input",
                "amount": 0.42,
                "quantity": 21_000_000,
                "quantity_unit": "tokens",
            },
            {
                "time": at(5),
                "project_id": "proj_c",
                "line_item": "web search tool calls",
                "amount": 2.5,
            },
        ],
    )
    check = await checked(sim)
    assert check.verdict == "ok"
    assert check.billed_usd == Decimal("3.0375")  # not mixed in
    assert check.uncovered_usd == Decimal("2.92")
    day = next(d for d in check.days if d.project_id == "proj_a" and d.uncovered)
    assert day.uncovered[0].line_item == "text-embedding-3-small, input"
    assert day.uncovered[0].quantity == 21_000_000 and day.verdict == "ok"
    assert "21,000,000 tokens" in render_table(check)
    web = next(d for d in check.days if d.project_id == "proj_c")
    assert web.verdict == "not_compared" and web.models == ()


async def test_an_unpriced_model_makes_its_day_incomplete(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    sim.scenario.add(
        request_from_json(request(at(4), "proj_a", UNKNOWN, 10_000, 5_000), registered_at=0)
    )
    await billing(session, sim, list_prices={UNKNOWN: {"input": 2.0, "output": 8.0}})
    check = await checked(sim)
    assert check.verdict == "incomplete" and not check.passed
    unknown = groups(check)[4, "proj_a", UNKNOWN]
    assert unknown.verdict == "incomplete" and unknown.diff_usd is None
    assert unknown.billed_usd == Decimal("0.06")  # the simulator's list price: 0.02 + 0.04
    assert unknown.priced_usd == 0 and not unknown.complete  # unpriced, not zero-priced


async def test_costs_and_usage_are_paged_with_the_default_limit(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    client = UsageClient(base_url=sim.base_url, admin_key=KEY, session=session)
    data = await fetch_bill_data(client, day(10), day(0))
    log = sim.app[COSTS].log
    assert [e.status for e in log] == [200, 200]  # 10 days, 7 a page
    assert "page=" not in log[0].query and "page=" in log[1].query
    assert "limit=" not in log[0].query
    usage_log = sim.request_log
    assert len(usage_log) == 2 and "page=" in usage_log[1].query
    assert data.requests == 4
    assert {line.day for line in data.costs} == {TODAY - n * DAY for n in (9, 3, 2)}
    assert data.params["/organization/costs"]["group_by"] == ["project_id", "line_item"]


async def test_one_project(sim: RunningSimulator) -> None:
    check = await checked(sim, projects=["proj_b"])
    assert {d.project_id for d in check.days} == {"proj_b"}
    assert check.projects == ("proj_b",)
    assert "project_ids=proj_b" in sim.app[COSTS].log[0].query
    assert "project_ids=proj_b" in sim.request_log[0].query


async def test_a_key_without_the_usage_scope_is_an_auth_error(sim: RunningSimulator) -> None:
    with pytest.raises(AuthError) as caught:
        await checked(sim, UNSCOPED)
    assert caught.value.status == 403 and "api.usage.read" in str(caught.value)
    assert UNSCOPED not in str(caught.value)


async def test_the_report_hook_never_raises(sim: RunningSimulator) -> None:
    good = await asyncio.to_thread(check_for_report, settings(sim), days=10, now=NOW)
    assert isinstance(good, BillCheck) and good.verdict == "ok"
    refused = await asyncio.to_thread(check_for_report, settings(sim, key=UNSCOPED))
    assert isinstance(refused, BillUnavailable) and "api.usage.read" in refused.reason
    no_key = await asyncio.to_thread(
        check_for_report, load_settings({"api_base_url": sim.base_url}, environ={})
    )
    assert isinstance(no_key, BillUnavailable) and "admin_key" in no_key.reason


async def test_a_failing_endpoint_is_a_typed_error(session: aiohttp.ClientSession) -> None:
    async with RunningSimulator() as down:
        url = down.base_url
    client = UsageClient(
        base_url=url, admin_key=KEY, session=session, retry=RetryPolicy(attempts=1)
    )
    with pytest.raises(TransportError):
        await fetch_bill_data(client, day(2), day(1))

"""Hostile Usage API answers from the real simulator: each is that request's failure with one
line, never a crash, never memory without bound, never data (issue 7, items 12, 15, 20)."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses

from tests.integration.conftest import Stage
from tests.integration.test_usage_api_client import FAKE_BASE, FAKE_URL, _Response
from tests.support.runs import SimControl, virtual_request, write_run
from tokensettle import usage_api
from tokensettle.simulator import RunningSimulator
from tokensettle.usage_api import MalformedResponseError, RetryPolicy, ServerError, UsageClient
from tokensettle.windows import Interval, floor_minute

MIB = 2**20
FAST = RetryPolicy(attempts=2, base=0.01, cap=0.02)


def client(sim: RunningSimulator, session: aiohttp.ClientSession, **kw: Any) -> UsageClient:
    kw.setdefault("retry", FAST)
    return UsageClient(
        base_url=sim.base_url, admin_key="sk-admin-simulator-0000", session=session, **kw
    )


def window() -> Interval:
    t0 = floor_minute(time.time()) - 7200
    return Interval(t0, t0 + 600)


async def seeded(control: SimControl, interval: Interval) -> None:
    await control.add([virtual_request(interval.start + 61, "baes", 1200, 300, 2)])


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) < 400, text
    return text


# ------------------------------------------------------------------- item 20: page size


@pytest.mark.parametrize("kind", ["huge_page", "gzip_bomb"])
async def test_a_page_past_the_cap_fails_the_request_without_reading_it_whole(
    sim: RunningSimulator, session: aiohttp.ClientSession, control: SimControl, kind: str
) -> None:
    """A 200 MB page was read whole (657 MB RSS) and a gzip bomb inflated to 972 MB. The
    bomb's compressed body (~64 KB at 1,000:1) is far below the 1 MiB cap: only the decoded
    size can trip it."""
    interval = window()
    await seeded(control, interval)
    await control.faults({"kind": kind, "size": 64 * MIB})
    c = client(sim, session, max_page_bytes=MIB)
    with pytest.raises(usage_api.ResponseTooLargeError) as info:
        await c.fetch(interval)
    text = one_line(info.value)
    assert "max_page_bytes" in text and "1,048,576" in text
    assert c.requests_sent == 1  # the same query gives the same page: not retried at once
    assert [(e.fault, e.status) for e in sim.request_log] == [(kind, 200)]


@pytest.mark.parametrize("kind", ["huge_page", "gzip_bomb"])
async def test_a_padded_or_compressed_page_within_the_cap_is_data(
    sim: RunningSimulator, session: aiohttp.ClientSession, control: SimControl, kind: str
) -> None:
    interval = window()
    await seeded(control, interval)
    await control.faults({"kind": kind, "size": 3 * MIB})
    result = await client(sim, session, max_page_bytes=4 * MIB).fetch(interval)
    assert [(r.minute, r.usage.input_tokens) for r in result.rows] == [(interval.start + 60, 1200)]


async def test_the_default_cap_holds_the_field_report_s_200_mb_page(
    sim: RunningSimulator, session: aiohttp.ClientSession, control: SimControl
) -> None:
    await control.faults({"kind": "huge_page", "size": 200 * MIB})
    cap = usage_api.DEFAULT_MAX_PAGE_BYTES
    with pytest.raises(usage_api.ResponseTooLargeError, match=f"{cap:,} bytes"):
        await client(sim, session).fetch(window())


# ------------------------------------------------------------------- item 15: hostile JSON


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        ({"kind": "deep_json", "size": 100_000}, "nested too deeply"),
        ({"kind": "huge_int", "size": 5_000}, "integer too long"),
    ],
)
async def test_deep_or_huge_integer_bodies_are_a_malformed_answer(
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    control: SimControl,
    fault: dict[str, Any],
    needle: str,
) -> None:
    await control.faults(fault, fault)  # one per attempt
    c = client(sim, session)
    with pytest.raises(MalformedResponseError, match=needle) as info:
        await c.fetch(window())
    one_line(info.value)
    assert c.requests_sent == 2  # malformed is retried like any garbled answer


@pytest.mark.parametrize(
    "body",
    [
        # 30,000 levels: deep enough for RecursionError, small enough for aioresponses to
        # feed in one piece (and within the 64 KiB the client reads of an error answer)
        b'{"error": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"error": {"message": ' + b"7" * 5_000 + b"}}",
    ],
)
async def test_a_hostile_error_body_still_gives_the_status_error(
    session: aiohttp.ClientSession, body: bytes
) -> None:
    c = UsageClient(base_url=FAKE_BASE, admin_key="sk-admin-x", session=session, retry=FAST)
    with aioresponses() as m:
        m.get(FAKE_URL, status=500, body=body, repeat=True, response_class=_Response)
        with pytest.raises(ServerError, match="HTTP 500") as info:
            await c.fetch(window())
    one_line(info.value)


# ------------------------------------------------------------------- item 12: absurd counts


@pytest.mark.parametrize("tokens", [10**15, 10**20])
async def test_absurd_counts_are_a_malformed_answer(
    sim: RunningSimulator, session: aiohttp.ClientSession, control: SimControl, tokens: int
) -> None:
    interval = window()
    await control.add([virtual_request(interval.start + 61, "baes", tokens, 1, 1)])
    with pytest.raises(MalformedResponseError, match="implausible counts") as info:
        await client(sim, session).fetch(interval)
    one_line(info.value)


@pytest.mark.parametrize("tokens", [10**15, 10**20])
async def test_absurd_counts_are_never_written_as_verified(stage: Stage, tokens: int) -> None:
    """Two stable polls of a page saying 10^15 or 10^20 input tokens in a minute wrote them
    as verified; 10^20 then crashed the daemon on the index at every start."""
    end = stage.end
    path = write_run(stage.root, "baes", "r1", [(end - 100, end)])
    before = path.read_bytes()
    await stage.control.add([virtual_request(end - 50, "baes", tokens, 10, 1)])
    states = await stage.settle(stage.reconciler())
    assert states == ["pending"]  # status kept; the attempts failed
    doc = json.loads(path.read_text())
    assert doc["aggregate_metrics"] == json.loads(before)["aggregate_metrics"]  # still 0
    block = doc["usage_api_reconciliation"]
    assert block["verification_status"] != "verified"
    assert all("implausible" in a["error"] for a in block["attempts"])
    assert all(a["total_tokens_in"] is None for a in block["attempts"])

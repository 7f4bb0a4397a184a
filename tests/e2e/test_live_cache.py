"""The daemon's live view without `TOKENSETTLE_HTTP_TOKEN`: `/` and `/report.json` are open
(200), the page escapes run ids, and the report is built once per cache period (five
seconds, `live.LiveReport.ttl`): requests within it get the same build, and once a run has
settled and the period is over the report shows the new status."""

from __future__ import annotations

import html
import json
import time
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import World
from tests.support.daemon import Daemon, wait_for, write_in_new_dirs

pytestmark = pytest.mark.e2e

WAIT = 30
#: The daemon's cache period (live.LiveReport's default); a rebuild is waited for with
#: a deadline well past it.
TTL = 5.0
HOSTILE = "<b>bold</b>&amp"  # no slash: it is a directory name too


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(30)) as resp:
        return resp.status, resp.content_type, await resp.text()


async def _report(world: World, daemon: Daemon) -> dict[str, Any]:
    status, kind, body = await _get(world.session, daemon.http + "/report.json")
    assert status == 200 and kind == "application/json", (status, kind, body[:200])
    report = json.loads(body)
    assert isinstance(report, dict)
    return report


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    return {r["run_id"]: r["status"] for r in report["runs"]}


async def test_the_open_live_view_is_cached_and_shows_a_settled_run_after_the_period(
    world: World,
) -> None:
    first = world.run("chatdev", HOSTILE, 0, (4000, 400, 3))
    later = world.run("baes", "live-later", 1, (5000, 500, 4))
    await world.register(first, later)
    daemon = await world.start()
    write_in_new_dirs(world.path(first), first.data)
    await daemon.wait_event("run.settled", WAIT, run_id=HOSTILE, status="verified")
    # A run the daemon knows but has not settled yet; the first request builds the report.
    write_in_new_dirs(world.path(later), later.data)
    await daemon.wait_event("run.scheduled", WAIT, run_id="live-later")
    built = time.monotonic()
    status, kind, page = await _get(world.session, daemon.http + "/")
    assert (status, kind) == (200, "text/html")
    assert HOSTILE not in page
    assert html.escape(HOSTILE) in page

    one = await _report(world, daemon)
    assert _statuses(one) == {HOSTILE: "verified", "live-later": "pending"}, one["runs"]
    again = await _report(world, daemon)
    assert again == one  # the same build, `generated_at` included

    await daemon.wait_event("run.settled", WAIT, run_id="live-later", status="verified")
    if time.monotonic() - built < TTL - 0.5:  # still within the period: still that build
        assert await _report(world, daemon) == one

    async def rebuilt() -> dict[str, Any] | None:
        report = await _report(world, daemon)
        return report if _statuses(report).get("live-later") == "verified" else None

    fresh = await wait_for(rebuilt, TTL + WAIT, interval=0.25, what="a rebuilt report")
    assert fresh["generated_at"] != one["generated_at"]
    assert time.monotonic() - built >= TTL  # not before the period was over
    assert _statuses(fresh) == {HOSTILE: "verified", "live-later": "verified"}
    (row,) = [r for r in fresh["runs"] if r["run_id"] == "live-later"]
    assert row["tokens_in"] == 5000
    status, _, page = await _get(world.session, daemon.http + "/")
    assert status == 200 and "live-later" in page
    assert await daemon.terminate() == 0

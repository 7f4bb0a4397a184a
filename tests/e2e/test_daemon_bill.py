"""The daemon runs the bill check now and then and exports its verdicts, so an alert can
say the bill is out of tolerance; a failing check shows in /healthz and backs off."""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import World
from tests.support.daemon import Daemon, wait_for, write_in_place
from tests.support.runs import virtual_request

pytestmark = pytest.mark.e2e

WAIT = 45


async def _metric(world: World, daemon: Daemon, name: str) -> float | None:
    _, text = await daemon.get(world.session, "/metrics")
    for line in str(text).splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_a_wrong_price_on_the_bill_shows_in_the_daemons_metrics(world: World) -> None:
    yesterday = (int(time.time()) // 86400 - 1) * 86400 + 12 * 3600
    await world.control.add(
        [virtual_request(yesterday + 60 * i, "chatdev", 2_000_000, 200_000, 3) for i in range(5)]
    )
    async with world.session.post(
        f"{world.sim.root_url}/_sim/billing",
        json={"price_factors": {"gpt-4o-mini-2024-07-18": 1.25}},
    ) as resp:
        assert resp.status == 200, await resp.text()
    daemon = await world.start(TOKENSETTLE_BILL_CHECK_INTERVAL="1h")
    checked = await daemon.wait_event("bill.checked", WAIT)
    assert checked["verdict"] == "mismatch" and checked["level"] == "warning", checked
    mismatch = 'tokensettle_bill_days{verdict="mismatch"}'

    async def days_out() -> float | None:
        return await _metric(world, daemon, mismatch)

    assert await wait_for(days_out, WAIT, what="bill metrics") == 1.0
    assert (await _metric(world, daemon, "tokensettle_bill_difference_usd") or 0) < 0
    assert await daemon.terminate() == 0


async def test_a_bill_check_that_cannot_read_the_costs_degrades_and_backs_off(
    world: World,
) -> None:
    await world.control.faults(*[{"kind": "500"}] * 40)  # every read fails for a while
    daemon = await world.start(TOKENSETTLE_BILL_CHECK_INTERVAL="1h")
    failed = await daemon.wait_event("bill.check_failed", WAIT)
    assert failed["retry_in"] >= 1

    async def bill_problem() -> object:
        _, body = await world.healthz(daemon)
        return [p for p in body["problems"] if p["kind"] == "bill"]

    (problem,) = await wait_for(bill_problem, WAIT, what="a bill problem in /healthz")
    assert "bill check failed" in problem["message"]
    assert await daemon.terminate() == 0


async def test_a_hanging_bill_check_does_not_hold_file_events(world: World) -> None:
    # The bill check ran inside the daemon's step: while its usage read hung, no file
    # event was looked at (detection_latency: the first files after start took 4-6 s).
    run = world.run("chatdev", "during-bill", 0, (1000, 100, 1))
    await world.register(run)
    await world.control.faults({"kind": "hang", "seconds": 25})
    path = world.path(run)
    path.parent.mkdir(parents=True)
    daemon = await world.start(
        TOKENSETTLE_BILL_CHECK_INTERVAL="1h", TOKENSETTLE_REQUEST_TIMEOUT="30s"
    )
    await wait_for(
        lambda: any(e.fault == "hang" for e in world.sim.request_log),
        WAIT,
        what="the bill check's hanging request",
    )
    write_in_place(path, run.data)
    await daemon.wait_event("run.scheduled", WAIT, path=str(path))
    assert not daemon.find("bill.checked") and not daemon.find("bill.check_failed")
    assert await daemon.terminate() == 0

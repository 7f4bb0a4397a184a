from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from tests.support.runs import SimControl
from tokensettle.simulator.server import RunningSimulator


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with RunningSimulator() as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def control(sim: RunningSimulator, session: aiohttp.ClientSession) -> SimControl:
    return SimControl(session, sim.root_url)


class FakeClock:
    """Reconciler time, moved by the test; the simulator keeps real time."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()

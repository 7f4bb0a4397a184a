from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.runs import SimControl, settings_for
from tokensettle.reconcile import Reconciler
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator
from tokensettle.usage_api import RetryPolicy, UsageClient


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


@dataclass
class Stage:
    """A runs root beside a running simulator, with the reconciler's clock in hand."""

    root: Path
    sim: RunningSimulator
    session: aiohttp.ClientSession
    control: SimControl
    clock: FakeClock

    @property
    def end(self) -> float:
        """A run end an hour ago: its window is complete and well within max age."""
        return self.clock.now.timestamp() - 3600

    def reconciler(self, key: str = SIMULATOR_ADMIN_KEY, **settings: Any) -> Reconciler:
        values = {"min_age": "0s", "stability_interval": "1m", **settings}
        client = UsageClient(
            base_url=self.sim.base_url,
            admin_key=key,
            session=self.session,
            retry=RetryPolicy(attempts=2, base=0.01),
        )
        return Reconciler(
            settings_for(self.root, self.sim.base_url, key, **values), client, clock=self.clock
        )

    async def settle(self, reconciler: Reconciler) -> list[str]:
        """Two passes a stability interval apart: the states of the second."""
        await reconciler.run_once()
        self.clock.advance(minutes=2)
        return [o.state for o in (await reconciler.run_once()).outcomes]


@pytest.fixture
def stage(
    tmp_path: Path,
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    control: SimControl,
    clock: FakeClock,
) -> Stage:
    return Stage(tmp_path / "runs", sim, session, control, clock)

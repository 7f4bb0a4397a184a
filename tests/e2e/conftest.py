"""The daemon's end-to-end world: a simulator in the test's loop, a runs root, a state
directory, and `tokensettle run` processes that are always stopped at teardown."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemon import Daemon, daemon_env, load
from tests.support.runs import SimControl, virtual_request, write_run
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator

#: Runs of one framework sit in distinct ten-minute slots from here (well in the past,
#: well inside MAX_AGE), so their windows never share a minute unless a test wants it.
SLOT = 600


@dataclass
class Run:
    """A run's file content and the provider's truth for it."""

    framework: str
    run_id: str
    steps: list[tuple[float, float]]
    requests: list[dict[str, Any]]
    data: bytes = b""

    @property
    def expected(self) -> tuple[int, int, int, int]:
        usage = [r["usage"] for r in self.requests]
        return (
            sum(u["input_tokens"] for u in usage),
            sum(u["output_tokens"] for u in usage),
            sum(u["num_model_requests"] for u in usage),
            sum(u.get("input_cached_tokens", 0) for u in usage),
        )

    def rel(self) -> Path:
        return Path(self.framework) / self.run_id / "metrics.json"


@dataclass
class World:
    tmp: Path
    root: Path
    state: Path
    staging: Path
    sim: RunningSimulator
    control: SimControl
    session: aiohttp.ClientSession
    base: float
    admin_key: str = SIMULATOR_ADMIN_KEY
    daemons: list[Daemon] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return daemon_env(self.root, self.sim.base_url, self.state, self.admin_key, **extra)

    async def start(self, *, wait_ready: bool = True, **extra: str) -> Daemon:
        daemon = Daemon(self.env(**extra), cwd=self.tmp)
        self.daemons.append(daemon)
        await daemon.start()
        if wait_ready:
            await daemon.ready()
        return daemon

    def path(self, run: Run) -> Path:
        return self.root / run.rel()

    def run(
        self,
        framework: str,
        run_id: str,
        slot: int,
        tokens: tuple[int, int, int],
        *,
        cached: int = 0,
        **request_extra: Any,
    ) -> Run:
        """A two-step run in its own slot with two requests of usage (one per step)."""
        start = self.base + slot * SLOT
        steps = [(start, start + 60.0), (start + 61.0, start + 130.0)]
        tin, tout, calls = tokens
        requests = [
            virtual_request(start + 20, framework, tin // 3, tout // 3, 1, cached, **request_extra),
            virtual_request(
                start + 120,
                framework,
                tin - tin // 3,
                tout - tout // 3,
                calls - 1,
                0,
                **request_extra,
            ),
        ]
        return Run(framework, run_id, steps, requests, self.render(framework, run_id, steps))

    def render(self, framework: str, run_id: str, steps: list[tuple[float, float]]) -> bytes:
        """The bytes `write_run` produces, without writing under the root."""
        scratch = self.tmp / "render"
        path = write_run(scratch, framework, run_id, steps)
        data = path.read_bytes()
        shutil.rmtree(scratch)
        return data

    async def register(self, *runs: Run) -> None:
        await self.control.add([r for run in runs for r in run.requests])

    async def healthz(self, daemon: Daemon) -> tuple[int, Any]:
        return await daemon.get(self.session, "/healthz")

    def assert_verified(self, run: Run, status: str = "verified") -> None:
        path = self.path(run)
        doc = load(path)
        block = doc["usage_api_reconciliation"]
        assert block["verification_status"] == status, (run.run_id, block)
        assert doc["verification_status"] == status
        agg = doc["aggregate_metrics"]
        got = (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"], agg["CACHED_TOKENS"])
        assert got == run.expected, (run.run_id, got, run.expected)
        assert (block["total_tokens_in"], block["total_tokens_out"]) == run.expected[:2]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    root = tmp_path / "runs"
    root.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    base = (int(time.time()) // 60) * 60 - 6 * 3600
    async with RunningSimulator() as sim, aiohttp.ClientSession() as session:
        w = World(
            tmp=tmp_path,
            root=root,
            state=tmp_path / "state",
            staging=staging,
            sim=sim,
            control=SimControl(session, sim.root_url),
            session=session,
            base=base,
        )
        try:
            yield w
        finally:
            for daemon in w.daemons:
                await daemon.close()
        for daemon in w.daemons:  # every line JSON, no traceback anywhere
            assert not daemon.not_json, daemon.not_json[:5]
            assert b"Traceback" not in daemon.stderr, daemon.stderr.decode()[-2000:]
            # In JSON log mode every line on stderr is a JSON object too (library warnings
            # included: watchdog's RuntimeWarning went to stderr as text).
            for line in daemon.stderr.decode("utf-8", "replace").splitlines():
                assert line.startswith("{") and line.endswith("}"), line[:300]

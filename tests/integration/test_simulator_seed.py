"""`--seed-from` on the real field files: seed the simulator from them, zero them, reconcile
them through the real client against the simulator, and get the recorded totals back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiohttp

from tests.integration.conftest import FakeClock
from tests.integration.test_reconcile_fixtures import SETTLED
from tests.support.runs import KEYS, pending_from_fixture, settings_for
from tokensettle.reconcile import Reconciler, Selection
from tokensettle.simulator import SIMULATOR_ADMIN_KEY, RunningSimulator, Scenario
from tokensettle.simulator.seed import SeedIdentity, plan_seed
from tokensettle.usage_api import RetryPolicy, UsageClient

# The runs' own timestamps (October 2025) are kept: replaying them needs --force.
FORCE = Selection(force=True)


async def test_seeded_field_runs_reconcile_to_their_recorded_totals(
    fixtures_dir: Path, tmp_path: Path, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    root = tmp_path / "runs"
    for name in SETTLED:
        framework, run_id = name.split("__")[1:3]
        path = root / framework / run_id / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_bytes((fixtures_dir / name).read_bytes())

    plan = plan_seed([root], SeedIdentity(keys=KEYS), registered_at=time.time())
    assert plan.skipped == () and len(plan.runs) == len(SETTLED)
    recorded = {run.path: run.recorded for run in plan.runs}
    assert {run.spread_over for run in plan.runs} == {"steps"}  # every field run has them

    for run in plan.runs:  # the runs as the benchmark writes them: tokens at 0, no block
        zeroed, _ = pending_from_fixture(json.loads(run.path.read_text()), 0.0, run.framework)
        run.path.write_text(json.dumps(zeroed, indent=2))

    async with RunningSimulator(Scenario(plan.requests)) as sim:
        settings = settings_for(root, sim.base_url, SIMULATOR_ADMIN_KEY, stability_interval="10m")
        client = UsageClient(
            base_url=sim.base_url,
            admin_key=SIMULATOR_ADMIN_KEY,
            session=session,
            retry=RetryPolicy(base=0.01),
        )
        reconciler = Reconciler(settings, client, clock=clock)
        first = await reconciler.run_once(FORCE)
        assert {o.state for o in first.outcomes} == {"pending"}
        clock.advance(minutes=11)
        second = await reconciler.run_once(FORCE)
    assert {o.state for o in second.outcomes} == {"verified"}, [o.message for o in second.outcomes]

    for path, rec in recorded.items():
        agg = json.loads(path.read_text())["aggregate_metrics"]
        assert (agg["TOK_IN"], agg["TOK_OUT"]) == (rec.tokens_in, rec.tokens_out), path
        if rec.api_calls is not None and "API_CALLS" in agg:
            assert agg["API_CALLS"] == rec.api_calls, path
        if rec.cached is not None and "CACHED_TOKENS" in agg:
            assert agg["CACHED_TOKENS"] == rec.cached, path

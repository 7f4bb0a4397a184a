"""The real run files from the field, tokens zeroed and times shifted, settled against the
simulator: the totals the field recorded must come back exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration.conftest import FakeClock
from tests.support.runs import AGG_TOKEN_KEYS, SimControl, Truth, pending_from_fixture, settings_for
from tokensettle.reconcile import Reconciler
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator
from tokensettle.usage_api import RetryPolicy, UsageClient

# One settled file per run (the last commit of each run's history).
SETTLED = [
    "runs__ghspec__a1b3972f-f772-4a7c-956e-1828a8db7a7d__metrics@e7337d8.json",
    "runs__baes__a7528f73-d107-4a8d-81f1-714c2b6f2170__metrics@5a13b38.json",
    "runs__chatdev__4df331a3-1d72-4154-8a6a-c61f80ef2228__metrics@3618a19.json",
    "runs__chatdev__7c997ab4-d1a7-4eee-b07f-a7c3cc0fc8c7__metrics@427bd02.json",
    "runs__baes__6f0b2490-1548-4b4f-a943-a688ec972355__metrics@427bd02.json",
    "runs__baes__6d5f179c-c3a6-404b-98be-ca536e72f01b__metrics@36bd6d2.json",
    "runs__baes__23f46f6b-929e-429b-ba74-4b0d20abc1ed__metrics@36bd6d2.json",
    "runs__baes__801758a3-dbda-4fc5-8d7f-fd1c916d7617__metrics@34dc8fb.json",
]
PATCHED_TOP = {
    "aggregate_metrics",
    "steps",
    "usage_api_reconciliation",
    "verification_status",
    "cost_breakdown",
}
# baes/6f0b2490 by hand at the published gpt-4o-mini prices (USD per 1M tokens: 0.15 input,
# 0.075 cached input, 0.60 output): (10,422 * 0.15 + 9,728 * 0.075 + 5,335 * 0.60) / 1e6.
HAND_PRICED = {"6f0b2490-1548-4b4f-a943-a688ec972355": 0.0054939}


def _without(doc: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in keys}


async def test_field_runs_settle_to_their_recorded_totals(
    fixtures_dir: Path,
    tmp_path: Path,
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    control: SimControl,
    clock: FakeClock,
) -> None:
    root = tmp_path / "runs"
    expected: dict[Path, tuple[Truth, dict[str, Any], dict[str, Any]]] = {}
    for i, name in enumerate(SETTLED):
        framework, run_id = name.split("__")[1:3]
        original = json.loads((fixtures_dir / name).read_text())
        run_end = max(s["end_timestamp"] for s in original["steps"])
        shift = (clock.now.timestamp() - 3 * 3600 - i * 3600) - run_end
        doc, truth = pending_from_fixture(original, shift, framework)
        # Precondition: the field's own aggregate is the sum of its steps.
        assert truth.tokens_in == original["aggregate_metrics"]["TOK_IN"]
        assert truth.tokens_out == original["aggregate_metrics"]["TOK_OUT"]
        path = root / framework / run_id / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(doc, indent=2))
        await control.add(truth.requests)
        expected[path] = (truth, doc, original)

    settings = settings_for(root, sim.base_url, SIMULATOR_ADMIN_KEY, stability_interval="10m")
    client = UsageClient(
        base_url=sim.base_url,
        admin_key=SIMULATOR_ADMIN_KEY,
        session=session,
        retry=RetryPolicy(base=0.01),
    )
    reconciler = Reconciler(settings, client, clock=clock)

    first = await reconciler.run_once()
    assert {o.state for o in first.outcomes} == {"pending"}
    assert first.requests <= 2  # eight runs over eight hours: merged, not one query per run
    clock.advance(minutes=11)
    second = await reconciler.run_once()
    assert {o.state for o in second.outcomes} == {"verified"}, [o.message for o in second.outcomes]

    for path, (truth, before, original) in expected.items():
        after = json.loads(path.read_text())
        agg = after["aggregate_metrics"]
        assert agg["TOK_IN"] == truth.tokens_in == original["aggregate_metrics"]["TOK_IN"]
        assert agg["TOK_OUT"] == truth.tokens_out == original["aggregate_metrics"]["TOK_OUT"]
        assert agg["API_CALLS"] == truth.api_calls
        assert agg["CACHED_TOKENS"] == truth.cached
        assert agg["AEI"] == original["aggregate_metrics"]["AEI"]
        block = after["usage_api_reconciliation"]
        assert block["verification_status"] == "verified"
        assert len(block["attempts"]) == 2
        if "verification_status" in before:
            assert after["verification_status"] == "verified"
        # Nothing else changed: top-level fields, other aggregates, non-token step fields.
        assert _without(after, PATCHED_TOP) == _without(before, PATCHED_TOP)
        kept = (*AGG_TOKEN_KEYS, "AEI", "COST_USD")
        assert {k: v for k, v in agg.items() if k not in kept} == {
            k: v for k, v in before["aggregate_metrics"].items() if k not in kept
        }
        cost = block["cost"]
        assert cost["complete"] is True
        assert block["local_vs_provider"]["verdict"] == "no_local_counts"
        if after["run_id"] in HAND_PRICED:
            assert agg["COST_USD"] == HAND_PRICED[after["run_id"]] == cost["total_usd"]
            assert after["cost_breakdown"]["cached_input_cost"] == 0.0007296
        assert ("COST_USD" in agg) == ("COST_USD" in before["aggregate_metrics"])
        for s_after, s_before in zip(after["steps"], before["steps"], strict=True):
            assert set(s_after) == set(s_before)  # no token field added or removed
            token_keys = {"tokens_in", "tokens_out", "api_calls", "cached_tokens"}
            assert _without(s_after, token_keys) == _without(s_before, token_keys)
        steps_in = sum(s.get("tokens_in", 0) for s in after["steps"])
        assert steps_in == truth.tokens_in  # step values are a partition of the total

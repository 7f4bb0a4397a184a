"""Parallel runs settle exactly with a key each: 8 real experiments started at once with
`tokensettle lease exec`, all of one framework on one project, call the simulator's model
with their leased keys over ~20 s and write their run files at the end; the real daemon
settles every one `verified` with the exact tokens its calls were given, and deletes the
8 keys once they are settled. The same shape without leases is `ambiguous` (test_daemon)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.support.daemon import EXE, Daemon, clean_environ, daemon_env, load
from tokensettle.simulator import RunningSimulator, Scenario

pytestmark = pytest.mark.e2e

ADMIN = "sk-admin-parallel-e2e-SECRET-42"
LEASES = "proj_leases"
RUNS = 4
WAIT = 60

#: One experiment: model calls spread over its run with its own key, then the run file
#: (tokens at 0, as a benchmark writes it) into the directory the lease names.
EXPERIMENT = r"""
import json, os, sys, time, urllib.request
index, calls, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
base, run_dir = os.environ["SIM_BASE"], os.environ["TOKENSETTLE_RUN_DIR"]
steps, used = [], {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}
for i in range(calls):
    start = time.time()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user",
            "content": "x" * (200 + 37 * index + 11 * i)}], "max_completion_tokens": 20 + index}
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
    with urllib.request.urlopen(req, timeout=10) as resp:
        usage = json.load(resp)["usage"]
    used["prompt_tokens"] += usage["prompt_tokens"]
    used["completion_tokens"] += usage["completion_tokens"]
    used["calls"] += 1
    time.sleep(gap)
    steps.append({"step_number": i + 1, "start_timestamp": start, "end_timestamp": time.time(),
                  "tokens_in": 0, "tokens_out": 0})
doc = {"run_id": os.path.basename(run_dir), "model": "gpt-4o-mini", "steps": steps,
       "aggregate_metrics": {"TOK_IN": 0, "TOK_OUT": 0, "API_CALLS": 0, "CACHED_TOKENS": 0}}
with open(os.path.join(run_dir, "used.json.txt"), "w") as f:
    json.dump(used, f)
tmp = os.path.join(run_dir, "metrics.json.tmp")
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
os.replace(tmp, os.path.join(run_dir, "metrics.json"))
"""


@dataclass
class Stage:
    tmp: Path
    root: Path
    sim: RunningSimulator
    session: aiohttp.ClientSession

    def env(self) -> dict[str, str]:
        return daemon_env(
            self.root,
            self.sim.base_url,
            self.tmp / "state",
            ADMIN,
            TOKENSETTLE_LEASE_PROJECT=LEASES,
            SIM_BASE=self.sim.base_url,
        )


@pytest.fixture
async def stage(tmp_path: Path) -> AsyncIterator[Stage]:
    root = tmp_path / "runs"
    root.mkdir()
    scenario = Scenario.from_json(
        {
            "admin_keys": [ADMIN],
            "admin": {"projects": [{"id": LEASES, "name": "Leases"}], "usage_delay": 2},
        }
    )
    async with RunningSimulator(scenario) as sim, aiohttp.ClientSession() as session:
        yield Stage(tmp_path, root, sim, session)


async def test_parallel_leased_runs_settle_exactly_and_their_keys_go(
    stage: Stage,
) -> None:
    daemon = Daemon(stage.env(), cwd=stage.tmp)
    experiment = stage.tmp / "experiment.py"
    experiment.write_text(EXPERIMENT)
    try:
        await daemon.start()
        await daemon.ready()
        env = {**clean_environ(), **stage.env()}
        procs = [
            await asyncio.create_subprocess_exec(
                EXE,
                "lease",
                "exec",
                "--framework",
                "chatdev",
                "--run-dir",
                str(stage.root / "chatdev" / f"par-{i}"),
                "--",
                sys.executable,
                str(experiment),
                str(i),
                "3",
                "2.0",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for i in range(RUNS)
        ]
        results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 90)
        for proc, (_, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err.decode()[-2000:]
        settled = await daemon.wait_events("run.settled", RUNS, WAIT)
        assert {e["status"] for e in settled} == {"verified"}, settled
        keys: set[str] = set()
        for i in range(RUNS):
            run_dir = stage.root / "chatdev" / f"par-{i}"
            doc = load(run_dir / "metrics.json")
            used = json.loads((run_dir / "used.json.txt").read_text())
            agg = doc["aggregate_metrics"]
            assert (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"]) == (
                used["prompt_tokens"],
                used["completion_tokens"],
                used["calls"],
            ), run_dir
            block = doc["usage_api_reconciliation"]
            assert block["verification_status"] == "verified"
            assert block["attribution"]["apportioned_fraction"] == 0  # exact, never shared
            declared = block["provenance"]["scope"]["declared"]
            keys.add(declared["lease"]["key_id"])
        assert len(keys) == RUNS
        revoked = await daemon.wait_events("lease.revoked", RUNS, WAIT)
        assert {e["key_id"] for e in revoked} == keys
        async with stage.session.get(f"{stage.sim.root_url}/_sim/admin") as resp:
            admin = await resp.json()
        states = {k["id"]: k["state"] for k in admin["keys"] if k["id"] in keys}
        assert set(states.values()) == {"deleted"}, states
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    assert not daemon.not_json, daemon.not_json[:5]

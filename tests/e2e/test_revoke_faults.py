"""Revoking a leased run's key, end to end: in the running daemon while the Admin API's
deletes fail (it backs off, counts them in `/metrics`, shows `revoke` in `/healthz`, then
deletes the key and is `ok` again), and in `tokensettle reconcile` with no daemon running
(two passes a stability interval apart settle the run and delete its key).

The leased run is a real `tokensettle lease exec` of a small experiment that calls the
simulator's model once with its key and then writes its run file."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import World
from tests.support.daemon import EXE, clean_environ, load, wait_for
from tokensettle.usage_scope import SCOPE_FILE, load_declaration

pytestmark = pytest.mark.e2e

WAIT = 30
#: The simulator's project that may hold service accounts (proj_default may not).
LEASES = "proj_simulator"
FAULTS = ("500", "503", "500")

#: One model call with the leased key, then the run file (tokens at 0) and what the call
#: used, outside the run directory. argv: the file to queue admin faults from, or "-".
EXPERIMENT = r"""
import json, os, sys, time, urllib.request
base, run_dir, out = os.environ["SIM_BASE"], os.environ["TOKENSETTLE_RUN_DIR"], sys.argv[1]
start = time.time()
body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 321}],
        "max_completion_tokens": 17}
req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
    headers={"Content-Type": "application/json",
             "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
with urllib.request.urlopen(req, timeout=10) as resp:
    usage = json.load(resp)["usage"]
doc = {"run_id": os.path.basename(run_dir), "model": "gpt-4o-mini",
       "steps": [{"step_number": 1, "start_timestamp": start, "end_timestamp": time.time(),
                  "tokens_in": 0, "tokens_out": 0}],
       "aggregate_metrics": {"TOK_IN": 0, "TOK_OUT": 0, "API_CALLS": 0, "CACHED_TOKENS": 0}}
with open(out, "w") as f:
    json.dump(usage, f)
tmp = os.path.join(run_dir, "metrics.json.tmp")
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
os.replace(tmp, os.path.join(run_dir, "metrics.json"))
"""


@dataclass
class Leased:
    run_dir: Path
    key_id: str
    usage: dict[str, int]


async def _lease_exec(world: World, env: dict[str, str], run_id: str) -> Leased:
    script = world.tmp / "experiment.py"
    script.write_text(EXPERIMENT)
    run_dir = world.root / "chatdev" / run_id
    used = world.tmp / f"{run_id}.usage.json"
    proc = await asyncio.create_subprocess_exec(
        *(EXE, "lease", "exec", "--framework", "chatdev", "--run-dir", str(run_dir), "--"),
        *(sys.executable, str(script), str(used)),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()[-2000:]
    scope = run_dir / SCOPE_FILE
    decl = load_declaration(scope.read_bytes(), source=str(scope))
    assert decl.lease is not None
    return Leased(run_dir, decl.lease.key_id, json.loads(used.read_text()))


async def _admin(world: World) -> dict[str, Any]:
    async with world.session.get(f"{world.sim.root_url}/_sim/admin") as resp:
        assert resp.status == 200
        state = await resp.json()
    assert isinstance(state, dict)
    return state


async def _admin_log(world: World) -> list[dict[str, Any]]:
    async with world.session.get(f"{world.sim.root_url}/_sim/admin/log") as resp:
        assert resp.status == 200
        log = await resp.json()
    assert isinstance(log, list)
    return log


async def _key_state(world: World, key_id: str) -> str:
    (key,) = [k for k in (await _admin(world))["keys"] if k["id"] == key_id]
    return str(key["state"])


async def _deletes(world: World, key_id: str) -> list[int]:
    return [
        int(e["status"])
        for e in await _admin_log(world)
        if e["target"] == "admin" and e["method"] == "DELETE" and key_id in e["path"]
    ]


def _assert_exact(leased: Leased) -> None:
    doc = load(leased.run_dir / "metrics.json")
    block = doc["usage_api_reconciliation"]
    assert block["verification_status"] == "verified"
    agg = doc["aggregate_metrics"]
    assert (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"]) == (
        leased.usage["prompt_tokens"],
        leased.usage["completion_tokens"],
        1,
    )
    assert block["provenance"]["scope"]["declared"]["lease"]["key_id"] == leased.key_id


async def _usage_at_once(world: World) -> None:
    async with world.session.post(f"{world.sim.root_url}/_sim/admin", json={"usage_delay": 0}) as r:
        assert r.status == 200, await r.text()


async def test_a_failing_revoke_backs_off_shows_in_healthz_and_metrics_then_deletes_the_key(
    world: World,
) -> None:
    await _usage_at_once(world)
    extra = {
        "TOKENSETTLE_LEASE_PROJECT": LEASES,
        # One request per delete: each queued fault is one failed revoke.
        "TOKENSETTLE_REQUEST_ATTEMPTS": "1",
    }
    daemon = await world.start(**extra)
    env = {**clean_environ(), **world.env(**extra), "SIM_BASE": world.sim.base_url}
    leased = await _lease_exec(world, env, "leased-faults")
    # The key exists (lease exec made it); the next admin requests, the deletes, fail.
    await world.control.faults(*({"kind": k, "target": "admin"} for k in FAULTS))
    assert await _key_state(world, leased.key_id) == "active"

    await daemon.wait_event("run.settled", WAIT, run_id="leased-faults", status="verified")
    _assert_exact(leased)

    async def revoke_problem() -> dict[str, Any] | None:
        status, body = await world.healthz(daemon)
        assert status == 200, body  # degraded, never failing: settling goes on
        problems = {p["kind"]: p for p in body.get("problems", [])}
        return body if body["status"] == "degraded" and "revoke" in problems else None

    degraded = await wait_for(revoke_problem, WAIT, interval=0.1, what="/healthz revoke")
    (problem,) = [p for p in degraded["problems"] if p["kind"] == "revoke"]
    assert leased.key_id in problem["message"] and problem["severity"] == "degraded", problem

    async def failed_count() -> float:
        status, text = await daemon.get(world.session, "/metrics")
        assert status == 200
        name = 'tokensettle_lease_revocations_total{result="failed"}'
        return sum(
            float(ln.rsplit(" ", 1)[1]) for ln in str(text).splitlines() if ln.startswith(name)
        )

    await daemon.wait_event("lease.revoked", WAIT, key_id=leased.key_id)
    assert await failed_count() == len(FAULTS)
    assert await _deletes(world, leased.key_id) == [500, 503, 500, 200]
    assert await _key_state(world, leased.key_id) == "deleted"

    async def ok() -> bool:
        status, body = await world.healthz(daemon)
        return status == 200 and body["status"] == "ok"

    await wait_for(ok, WAIT, what="/healthz ok after the delete")
    assert await daemon.terminate() == 0


async def _reconcile(env: dict[str, str], cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        EXE,
        "reconcile",
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert b"Traceback" not in err, err.decode()[-2000:]
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def _lease_list(env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        EXE,
        "lease",
        "list",
        "--json",
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()[-2000:]
    leases = json.loads(out)["leases"]
    assert isinstance(leases, list)
    return leases


async def test_reconcile_without_a_daemon_revokes_the_key_of_a_leased_run_it_settles(
    world: World,
) -> None:
    await _usage_at_once(world)
    interval = 1.0
    env = {
        **clean_environ(),
        **world.env(
            TOKENSETTLE_LEASE_PROJECT=LEASES,
            TOKENSETTLE_MIN_AGE="0s",
            TOKENSETTLE_STABILITY_INTERVAL="1s",
        ),
        "SIM_BASE": world.sim.base_url,
    }
    leased = await _lease_exec(world, env, "leased-cron")
    (listed,) = await _lease_list(env, world.tmp)
    assert (listed["key_id"], listed["state"]) == (leased.key_id, "active")

    code, out = await _reconcile(env, world.tmp)
    first = time.monotonic()
    assert code == 0, out
    block = load(leased.run_dir / "metrics.json")["usage_api_reconciliation"]
    assert block["verification_status"] == "pending", block
    assert await _key_state(world, leased.key_id) == "active"  # not settled: kept

    # The second pass counts only once a stability interval has passed since the first.
    await wait_for(lambda: time.monotonic() - first >= interval, 2 * interval)
    code, out = await _reconcile(env, world.tmp)
    assert code == 0, out
    _assert_exact(leased)
    (listed,) = await _lease_list(env, world.tmp)
    assert (listed["key_id"], listed["state"]) == (leased.key_id, "revoked"), listed
    assert listed["revoked_at"]
    assert await _key_state(world, leased.key_id) == "deleted"
    assert await _deletes(world, leased.key_id) == [200]

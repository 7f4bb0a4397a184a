"""One daemon, two providers: OpenAI and Anthropic runs in the same minutes settle exactly,
each against its own usage report (the real `tokensettle run` and the simulator, which
serves both on one port and counts each provider's requests apart)."""

from __future__ import annotations

import asyncio
import functools
import json
import operator
import sys
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest

from tests.e2e.conftest import SLOT, World
from tests.support.daemon import EXE, write_in_new_dirs
from tests.support.runs import write_run
from tokensettle.pricing import price_models
from tokensettle.usage import usage_from_anthropic

pytestmark = pytest.mark.e2e

WAIT = 45
CLAUDE_KEY = "apikey_01E2EclaudeFramework"
ROUTED_KEY = "apikey_01E2EroutedByModel"
ANTHROPIC_ADMIN = "sk-ant-admin-simulator-0000"
MODEL = "claude-haiku-4-5-20251001"


def claude_request(
    t: float, key: str, uncached: int, read: int, w5: int, w1h: int, out: int
) -> dict[str, Any]:
    return {
        "provider": "anthropic",
        "time": t,
        "api_key_id": key,
        "workspace_id": "wrkspc_01E2Eruns",
        "model": MODEL,
        "usage": {
            "uncached_input_tokens": uncached,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": w5,
                "ephemeral_1h_input_tokens": w1h,
            },
            "output_tokens": out,
        },
    }


def anthropic_env(world: World) -> dict[str, str]:
    return {
        "TOKENSETTLE_ANTHROPIC_API_BASE_URL": world.sim.anthropic_base_url,
        "TOKENSETTLE_ANTHROPIC_ADMIN_KEY": ANTHROPIC_ADMIN,
        "TOKENSETTLE_ANTHROPIC_RATE_LIMIT_PER_MIN": "600",
        "ANTHROPIC_API_KEY_CLAUDE_ID": CLAUDE_KEY,
    }


async def test_openai_and_anthropic_runs_in_the_same_minutes_settle_exactly(world: World) -> None:
    openai_run = world.run("baes", "gpt-run", 0, (5000, 900, 3), cached=300)
    start = world.base  # the same slot: the two runs share every minute
    steps = [(start, start + 60.0), (start + 61.0, start + 130.0)]
    claude = [
        claude_request(start + 20, CLAUDE_KEY, 1500, 200, 500, 1000, 500),
        claude_request(start + 120, CLAUDE_KEY, 700, 4000, 0, 0, 300),
    ]
    # A Claude model in the file and a framework that names no provider: routed to Anthropic.
    later = world.base + SLOT
    routed_steps = [(later, later + 90.0)]
    routed = [claude_request(later + 30, ROUTED_KEY, 100, 0, 0, 0, 40)]
    await world.register(openai_run)
    await world.control.add([*claude, *routed])

    daemon = await world.start(**anthropic_env(world))
    write_in_new_dirs(world.path(openai_run), openai_run.data)
    claude_path = write_run(world.root, "claude", "claude-run", steps)
    routed_path = write_run(
        world.root, "sonnetbench", "routed-run", routed_steps, extra={"model": MODEL}
    )

    for run_id in ("gpt-run", "claude-run", "routed-run"):
        settled = await daemon.wait_event("run.settled", WAIT, run_id=run_id)
        assert settled["status"] == "verified", settled
    world.assert_verified(openai_run)

    doc = json.loads(claude_path.read_bytes())
    agg, block = doc["aggregate_metrics"], doc["usage_api_reconciliation"]
    # TOK_IN is all input: uncached + cache reads + both cache writes; cached = reads.
    assert agg["TOK_IN"] == (1500 + 200 + 500 + 1000) + (700 + 4000) == 7900
    assert agg["CACHED_TOKENS"] == 4200
    assert agg["TOK_OUT"] == 800
    # Anthropic counts no requests: the run's API_CALLS stays what it wrote, not a made-up 0.
    assert agg["API_CALLS"] == 0 and block["total_api_calls"] is None
    assert doc["steps"][0]["tokens_in"] == 3200 and doc["steps"][1]["tokens_in"] == 4700
    provenance = block["provenance"]
    assert provenance["provider"] == "anthropic"
    assert provenance["endpoint"].endswith("/v1/organizations/usage_report/messages")
    assert (
        json.loads(world.path(openai_run).read_bytes())["usage_api_reconciliation"]["provenance"][
            "provider"
        ]
        == "openai"
    )

    # Priced in Anthropic's table, both cache-write prices and cache reads included.
    cost = block["cost"]
    assert cost["complete"] is True and cost["source"]["provider"] == "anthropic", cost
    usage = functools.reduce(operator.add, (usage_from_anthropic(r["usage"]) for r in claude))
    at = datetime.fromisoformat(doc["start_timestamp"])
    expected = price_models({MODEL: usage}, at, provider_id="anthropic")
    assert Decimal(cost["total_usd_exact"]) == expected.total_usd > 0

    routed_doc = json.loads(routed_path.read_bytes())
    assert routed_doc["aggregate_metrics"]["TOK_IN"] == 100
    assert routed_doc["usage_api_reconciliation"]["provenance"]["provider"] == "anthropic"
    assert daemon.count("run.provider_from_model", framework="sonnetbench") == 1

    async with world.session.get(f"{world.sim.root_url}/_sim/stats") as resp:
        stats = await resp.json()
    assert stats["anthropic_requests"] >= 2 and stats["usage_requests"] >= 2, stats
    assert set(stats["anthropic_by_status"]) == {"200"}, stats
    status, body = await world.healthz(daemon)
    assert status == 200 and body["status"] == "ok", body


async def test_without_an_anthropic_key_claude_runs_are_errors_and_openai_runs_settle(
    world: World,
) -> None:
    openai_run = world.run("baes", "gpt-alone", 0, (2000, 400, 2))
    await world.register(openai_run)
    daemon = await world.start(ANTHROPIC_API_KEY_CLAUDE_ID=CLAUDE_KEY)
    write_in_new_dirs(world.path(openai_run), openai_run.data)
    start = world.base + SLOT
    orphan = write_run(world.root, "claude", "claude-orphan", [(start, start + 60.0)])

    settled = await daemon.wait_event("run.settled", WAIT, run_id="gpt-alone")
    assert settled["status"] == "verified"
    seen = await daemon.wait_event("run.unreadable", WAIT, path=str(orphan))
    assert "TOKENSETTLE_ANTHROPIC_ADMIN_KEY" in seen["reason"], seen
    status, listed = await daemon.get(world.session, "/runs")
    assert status == 200
    entry = next(r for r in listed["runs"] if r["path"] == str(orphan))
    assert entry["status"] == "error" and "anthropic" in entry["message"], entry
    assert json.loads(orphan.read_bytes())["aggregate_metrics"]["TOK_IN"] == 0


POOL = {
    "apikey_01E2ePoolA": "sk-ant-api03-E2E-DAEMON-POOL-AAAA-9876",
    "apikey_02E2ePoolB": "sk-ant-api03-E2E-DAEMON-POOL-BBBB-9876",
}

#: An experiment under `lease exec`: waits until its peers have started (so the runs
#: overlap), "calls the model" by registering usage under its leased key with the
#: simulator, and writes its run file by rename, tokens at 0.
EXPERIMENT = r"""
import json, os, sys, time, urllib.request
from datetime import datetime, timezone
sim, barrier, name, peers, uncached, read, out = sys.argv[1:8]
started = time.time()
open(os.path.join(barrier, f"started-{name}"), "w").close()
deadline = time.monotonic() + 30
while len([p for p in os.listdir(barrier) if p.startswith("started-")]) < int(peers):
    if time.monotonic() > deadline:
        sys.exit(97)
    time.sleep(0.02)
usage = {"uncached_input_tokens": int(uncached), "cache_read_input_tokens": int(read),
         "output_tokens": int(out)}
body = {"requests": [{"provider": "anthropic", "time": time.time(),
                      "api_key_id": os.environ["TOKENSETTLE_LEASE_KEY_ID"],
                      "workspace_id": "wrkspc_01E2ePool", "model": sys.argv[8], "usage": usage}]}
request = urllib.request.Request(f"{sim}/_sim/requests", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
urllib.request.urlopen(request).read()
assert os.environ["ANTHROPIC_API_KEY"].startswith("sk-ant-api03-")
ended = time.time() + 0.01
iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")
doc = {"run_id": name, "model": sys.argv[8], "start_timestamp": iso(started),
       "end_timestamp": iso(ended),
       "steps": [{"step_number": 1, "start_timestamp": started, "end_timestamp": ended,
                  "tokens_in": 0, "tokens_out": 0, "api_calls": 0}],
       "aggregate_metrics": {"TOK_IN": 0, "TOK_OUT": 0, "API_CALLS": 0, "CACHED_TOKENS": 0},
       "verification_status": "pending"}
run_dir = os.environ["TOKENSETTLE_RUN_DIR"]
with open(os.path.join(run_dir, ".metrics.json.part"), "w") as f:
    json.dump(doc, f, indent=2)
os.rename(os.path.join(run_dir, ".metrics.json.part"), os.path.join(run_dir, "metrics.json"))
"""


async def test_parallel_claude_runs_on_pool_keys_settle_exactly_and_return_their_keys(
    world: World,
) -> None:
    keys = ", ".join(f'{{id = "{k}", workspace_id = "wrkspc_01E2ePool"}}' for k in POOL)
    config = world.tmp / "tokensettle.toml"
    config.write_text(f"[leases.anthropic]\nkeys = [{keys}]\n")
    values = world.tmp / "pool_values"
    values.write_text("".join(f"{k}={v}\n" for k, v in POOL.items()))
    values.chmod(0o600)
    (world.tmp / "experiment.py").write_text(EXPERIMENT)
    barrier = world.tmp / "barrier"
    barrier.mkdir()
    shared = {
        "TOKENSETTLE_CONFIG": str(config),
        "TOKENSETTLE_ANTHROPIC_POOL_FILE": str(values),
        **anthropic_env(world),
    }
    daemon = await world.start(**shared)
    env = world.env(**shared)
    # Two runs of one framework at once, in the same minutes, each on its own pool key.
    runs = {"p1": (1200, 300, 410), "p2": (900, 4100, 35)}
    procs = []
    for name, tokens in runs.items():
        lease = ["lease", "exec", "--provider", "anthropic", "--framework", "claude"]
        lease += ["--wait", "30s", "--run-dir", str(world.root / "claude" / name), "--"]
        experiment = [sys.executable, str(world.tmp / "experiment.py"), world.sim.root_url]
        experiment += [str(barrier), name, "2", *(str(n) for n in tokens), MODEL]
        procs.append(
            await asyncio.create_subprocess_exec(
                EXE, *lease, *experiment, env=env, cwd=world.tmp, stderr=asyncio.subprocess.PIPE
            )
        )
    errs = await asyncio.gather(*(asyncio.wait_for(p.communicate(), 60) for p in procs))
    assert [p.returncode for p in procs] == [0, 0], [e.decode()[-800:] for _, e in errs]

    for name, (uncached, read, out) in runs.items():
        settled = await daemon.wait_event("run.settled", WAIT, run_id=name)
        assert settled["status"] == "verified", settled
        doc = json.loads((world.root / "claude" / name / "metrics.json").read_bytes())
        agg = doc["aggregate_metrics"]
        assert (agg["TOK_IN"], agg["CACHED_TOKENS"], agg["TOK_OUT"]) == (
            uncached + read,
            read,
            out,
        ), name
        assert doc["usage_api_reconciliation"]["provenance"]["provider"] == "anthropic"
    # Every key went back to the pool once its run was settled.
    released = await daemon.wait_events("lease.released", 2, WAIT)
    assert {e["reason"] for e in released} == {"settled"}, released
    for _, err in errs:
        assert not any(v.encode() in err for v in POOL.values())
    for path in world.root.rglob("*"):
        if path.is_file():
            assert not any(v.encode() in path.read_bytes() for v in POOL.values()), path


async def test_a_refused_anthropic_key_pauses_claude_runs_only_and_shows(world: World) -> None:
    """The Anthropic key is refused: Claude runs wait (not `error`, nothing written),
    /healthz names the fault for anthropic, and OpenAI runs settle meanwhile;
    `reconcile` of the Claude framework exits 3."""
    refused = "sk-ant-api03-not-an-admin-key-E2E"
    async with world.session.post(
        f"{world.sim.root_url}/_sim/keys", json={"anthropic_unscoped_keys": [refused]}
    ) as resp:
        assert resp.status == 200
    openai_run = world.run("baes", "gpt-beside", 0, (2100, 300, 2))
    await world.register(openai_run)
    start = world.base + SLOT
    await world.control.add([claude_request(start + 10, CLAUDE_KEY, 400, 0, 0, 0, 90)])
    env = {**anthropic_env(world), "TOKENSETTLE_ANTHROPIC_ADMIN_KEY": refused}
    daemon = await world.start(**env)
    claude_path = write_run(world.root, "claude", "claude-refused", [(start, start + 60.0)])
    before = claude_path.read_bytes()
    write_in_new_dirs(world.path(openai_run), openai_run.data)

    failed = await daemon.wait_event("daemon.auth_failed", WAIT, provider="anthropic")
    assert refused not in json.dumps(failed)
    settled = await daemon.wait_event("run.settled", WAIT, run_id="gpt-beside")
    assert settled["status"] == "verified"
    status, body = await world.healthz(daemon)
    # A refused key needs a human: failing (503), as for OpenAI's, naming the provider.
    assert status == 503 and body["status"] == "failing", body
    assert any("anthropic" in json.dumps(p).lower() for p in body["problems"]), body
    assert claude_path.read_bytes() == before  # nothing written for the paused run
    assert not daemon.find("run.settled", run_id="claude-refused")

    proc = await asyncio.create_subprocess_exec(
        EXE, "reconcile", "claude", env=world.env(**env), cwd=world.tmp,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3, (out.decode(), err.decode()[-800:])
    assert refused.encode() not in out + err

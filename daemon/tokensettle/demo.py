"""`tokensettle demo`: the whole story on the built-in simulator, in about 20 seconds.

A fake experiment writes runs of three frameworks (tokens at 0, as real benchmarks do);
the simulator holds their true usage, which shows up a few seconds late and grows once;
`reconcile` runs every couple of seconds, as cron would, with compressed timings, until
every run is settled. One malformed file shows that bad input is left byte-identical.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tokensettle.config import FrameworkScope, load_settings
from tokensettle.logs import configure
from tokensettle.reconcile import Reconciler
from tokensettle.render import counts_line, table
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator
from tokensettle.stability import TERMINAL, Status
from tokensettle.usage_api import RetryPolicy, UsageClient

DEMO_DIR = Path("demo-runs")
FRAMEWORKS = {
    "chatdev": "key_chatdevDEMO0001",
    "baes": "key_baesDEMO000002",
    "ghspec": "key_ghspecDEMO0003",
}
PROJECT = "proj_demo"
MODEL = "gpt-4o-mini-2024-07-18"


@dataclass
class DemoRun:
    framework: str
    run_id: str
    path: Path
    truth_in: int = 0
    truth_out: int = 0
    truth_calls: int = 0


def _steps(start: int, rng: random.Random, n: int) -> list[tuple[int, int]]:
    steps, t = [], start
    for _ in range(n):
        length = rng.randint(20, 140)
        steps.append((t, t + length))
        t += length + rng.randint(1, 3)
    return steps


def write_experiment(
    root: Path, now: float, rng: random.Random
) -> tuple[list[DemoRun], list[dict[str, Any]]]:
    """Write run files the way a benchmark does, and the usage the provider recorded."""
    runs: list[DemoRun] = []
    requests: list[dict[str, Any]] = []
    start = int(now) - 3600
    for i in range(6):
        framework = list(FRAMEWORKS)[i % 3]
        run_id = f"demo-{framework}-{i:02d}"
        steps = _steps(start, rng, 4)
        start = steps[-1][1] + rng.randint(150, 400)  # runs of one key are well apart
        run = DemoRun(framework, run_id, root / framework / run_id / "metrics.json")
        doc_steps = []
        for n, (s, e) in enumerate(steps, 1):
            doc_steps.append(
                {
                    "step_number": n,
                    "duration_seconds": float(e - s),
                    "success": True,
                    "tokens_in": 0,
                    "tokens_out": 0,
                    "api_calls": 0,
                    "cached_tokens": 0,
                    "start_timestamp": s,
                    "end_timestamp": e,
                }
            )
            for _ in range(rng.randint(1, 4)):
                tin, tout = rng.randint(800, 9000), rng.randint(100, 2500)
                cached = rng.choice([0, 0, 1024, 2048])
                delay = rng.uniform(1.0, 6.0)
                final = {
                    "input_tokens": tin,
                    "output_tokens": tout,
                    "num_model_requests": 1,
                    "input_cached_tokens": min(cached, tin),
                }
                first = {**final, "input_tokens": tin // 2, "output_tokens": tout // 2}
                grows = rng.random() < 0.3
                requests.append(
                    {
                        "time": rng.uniform(s, e),
                        "api_key_id": FRAMEWORKS[framework],
                        "project_id": PROJECT,
                        "model": MODEL,
                        "usage": first if grows else final,
                        "visible_after": delay,
                        "revisions": [{"after": delay + 3.0, "usage": final}] if grows else [],
                    }
                )
                run.truth_in, run.truth_out, run.truth_calls = (
                    run.truth_in + tin,
                    run.truth_out + tout,
                    run.truth_calls + 1,
                )
        doc = {
            "run_id": run_id,
            "model": "gpt-4o-mini",
            "start_timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(steps[0][0])),
            "end_timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(steps[-1][1])),
            "steps": doc_steps,
            "aggregate_metrics": {
                "AUTR": 1.0,
                "TOK_IN": 0,
                "TOK_OUT": 0,
                "API_CALLS": 0,
                "CACHED_TOKENS": 0,
                "AEI": 0.0,
                "COST_USD": 0.0,
            },
            "verification_status": "pending",
        }
        run.path.parent.mkdir(parents=True)
        run.path.write_text(json.dumps(doc, indent=2))
        runs.append(run)
    broken = root / "baes" / "demo-broken" / "metrics.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"run_id": "demo-broken", "steps": [')
    return runs, requests


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _demo(root: Path) -> int:
    rng = random.Random(7)
    started = time.monotonic()
    async with RunningSimulator() as sim, aiohttp.ClientSession() as session:
        runs, requests = write_experiment(root, time.time(), rng)
        async with session.post(
            f"{sim.root_url}/_sim/requests", json={"requests": requests}
        ) as resp:
            resp.raise_for_status()
        broken = root / "baes" / "demo-broken" / "metrics.json"
        broken_bytes = broken.read_bytes()
        _say(f"simulator: {sim.base_url}  ({len(requests)} virtual requests, arriving 1-6 s late)")
        _say(
            f"experiment: {len(runs)} runs of {len(FRAMEWORKS)} frameworks "
            f"written to {root}/, tokens at 0"
        )
        _say(f"            plus {broken.relative_to(root)}, a truncated file")
        settings = load_settings(
            {
                "runs_dirs": [root],
                "api_base_url": sim.base_url,
                "admin_key": SIMULATOR_ADMIN_KEY,
                "min_age": "0s",
                "stability_interval": "3s",
                "max_backoff": "3s",
                "retry_delay": "1s",
                "frameworks": {
                    fw: FrameworkScope(api_key_ids=[key]) for fw, key in FRAMEWORKS.items()
                },
            },
            environ={},
        )
        client = UsageClient(
            base_url=settings.api_base_url,
            admin_key=SIMULATOR_ADMIN_KEY,
            session=session,
            rate_limit_per_min=600,
            retry=RetryPolicy(base=0.2),
        )
        reconciler = Reconciler(settings, client)
        _say(
            "\n$ tokensettle reconcile   # every 2 s, as cron would "
            "(min age 0s, stability interval 3s)"
        )
        passes = 0
        while time.monotonic() - started < 40:
            passes += 1
            report = await reconciler.run_once()
            states = {o.path: o.state for o in reconciler.list_runs(settled=True)}
            polled = [o for o in report.outcomes if o.polled]
            _say(
                f"  pass {passes:2d} t={time.monotonic() - started:4.1f}s  "
                f"polled {len(polled)} runs with {report.requests} request(s)  ->  "
                f"{counts_line(polled) if polled else 'nothing due'}"
            )
            if all(states.get(r.path) in {s.value for s in TERMINAL} for r in runs):
                break
            await asyncio.sleep(2.0)
        total_requests = (await (await session.get(f"{sim.root_url}/_sim/stats")).json())[
            "usage_requests"
        ]

    rows, ok = [], True
    for run in runs:
        doc = json.loads(run.path.read_text())
        agg, block = doc["aggregate_metrics"], doc.get("usage_api_reconciliation", {})
        status = block.get("verification_status", "-")
        match = (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"]) == (
            run.truth_in,
            run.truth_out,
            run.truth_calls,
        )
        ok = ok and match and status == Status.VERIFIED
        rows.append(
            [
                run.framework,
                run.run_id,
                status,
                f"{agg['TOK_IN']:,}",
                f"{agg['TOK_OUT']:,}",
                str(agg["API_CALLS"]),
                f"{run.truth_in:,}/{run.truth_out:,}",
                "yes" if match else "NO",
                str(len(block.get("attempts", []))),
            ]
        )
    untouched = broken.read_bytes() == broken_bytes
    _say("\nfinal state of the run files:")
    _say(
        table(
            [
                "FRAMEWORK",
                "RUN",
                "STATUS",
                "TOK_IN",
                "TOK_OUT",
                "CALLS",
                "TRUTH IN/OUT",
                "EXACT",
                "ATTEMPTS",
            ],
            rows,
        )
    )
    _say(f"\nmalformed file left byte-identical: {'yes' if untouched else 'NO'}")
    _say(
        f"{total_requests} Usage API requests in {passes} passes, "
        f"{time.monotonic() - started:.1f} s"
    )
    _say(
        f"inspect: {root}/<framework>/<run>/metrics.json  "
        "('usage_api_reconciliation' holds the audit trail)"
    )
    return 0 if ok and untouched else 1


def run_demo(root: Path = DEMO_DIR) -> int:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    configure(level="error", fmt="console")
    return asyncio.run(_demo(root))

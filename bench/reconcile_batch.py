"""Benchmark: 1,000 pending runs over one day, settled by one `tokensettle reconcile`.

Starts `tokensettle simulate` as its own process, writes N runs of three frameworks
spread over the last day with their usage registered in the simulator, then times one
`tokensettle reconcile --json` process (the command a cron job runs) and reads the API
request count from the simulator's own request log. Goals: <= 3 requests, < 10 s.

    .venv/bin/python bench/reconcile_batch.py [--runs 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BIN, free_port, fresh_aggregates, get, post

KEYS = {
    "chatdev": "key_chatdevBENCH01",
    "baes": "key_baesBENCH00002",
    "ghspec": "key_ghspecBENCH003",
}
ADMIN = "sk-admin-simulator-0000"


def bench_keys(frameworks: int) -> dict[str, str]:
    """Framework -> its API key id: the three of `KEYS`, then `fw03`, `fw04`, ... (so that
    10,000 runs of a day need not overlap on a key: ~300 fit a key's day one by one)."""
    keys = dict(list(KEYS.items())[:frameworks])
    for k in range(len(keys), frameworks):
        keys[f"fw{k:02d}"] = f"key_fw{k:02d}BENCH{k:07d}"
    return keys


def write_runs(
    root: Path, n: int, now: float, rng: random.Random, keys: dict[str, str] = KEYS
) -> tuple[list[dict[str, Any]], int]:
    """N runs, round-robin over frameworks, ending between 23.5 h and 40 min ago."""
    requests: list[dict[str, Any]] = []
    total_in = 0
    span = 23.5 * 3600 - 40 * 60
    frameworks = list(keys)
    for i in range(n):
        fw = frameworks[i % len(frameworks)]
        end = now - 40 * 60 - span * (1 - i / n)
        start = end - rng.randint(60, 200)
        steps = []
        t = start
        for k in range(3):
            e = min(end, t + (end - start) / 3)
            steps.append(
                {
                    "step_number": k + 1,
                    "start_timestamp": int(t),
                    "end_timestamp": int(e),
                    "tokens_in": 0,
                    "tokens_out": 0,
                    "api_calls": 0,
                    "cached_tokens": 0,
                }
            )
            tin = rng.randint(500, 8000)
            total_in += tin
            requests.append(
                {
                    "time": (t + e) / 2,
                    "api_key_id": keys[fw],
                    "project_id": "proj_bench",
                    "model": "gpt-4o-mini-2024-07-18",
                    "usage": {
                        "input_tokens": tin,
                        "output_tokens": tin // 4,
                        "num_model_requests": 1,
                        "input_cached_tokens": 0,
                    },
                }
            )
            t = e
        doc = {
            "run_id": f"run-{i:04d}",
            "steps": steps,
            "aggregate_metrics": fresh_aggregates(),
        }
        path = root / fw / f"run-{i:04d}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(doc, indent=2))
    return requests, total_in


def once(n: int, seed: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tokensettle-bench-"))
    port = free_port()
    sim = subprocess.Popen(
        [str(BIN / "tokensettle"), "simulate", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        root_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                get(f"{root_url}/_sim/stats")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        requests, total_in = write_runs(work / "runs", n, time.time(), random.Random(seed))
        post(f"{root_url}/_sim/requests", {"requests": requests})
        env = {
            **os.environ,
            "TOKENSETTLE_RUNS_DIRS": str(work / "runs"),
            "TOKENSETTLE_API_BASE_URL": f"{root_url}/v1",
            "TOKENSETTLE_ADMIN_KEY": ADMIN,
            "TOKENSETTLE_LOG_LEVEL": "warning",
            **{f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in KEYS.items()},
        }
        started = time.perf_counter()
        proc = subprocess.run(
            [str(BIN / "tokensettle"), "reconcile", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            cwd=work,
        )
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"reconcile exited {proc.returncode}: {proc.stderr[-2000:]}")
        report = json.loads(proc.stdout)
        stats = get(f"{root_url}/_sim/stats")
        got_in = sum(r["totals"]["input_tokens"] for r in report["runs"] if r["totals"])
        return {
            "runs": n,
            "polled": sum(1 for r in report["runs"] if r["polled"]),
            "counts": report["counts"],
            "api_requests": stats["usage_requests"],
            "windows": len(report["windows"]),
            "wall_seconds": round(wall, 3),
            "tokens_exact": got_in == total_in,
        }
    finally:
        sim.terminate()
        sim.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = [once(args.runs, seed) for seed in range(args.repeat)]
    walls = sorted(r["wall_seconds"] for r in results)
    summary = {
        "command": f"python bench/reconcile_batch.py --runs {args.runs} --repeat {args.repeat}",
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "results": results,
        "wall_seconds_median": walls[len(walls) // 2],
        "api_requests_max": max(r["api_requests"] for r in results),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: `tokensettle reconcile` beside the physical floor (`floor.py`), same tree.

Per repeat: start `tokensettle simulate`, write N pending runs with their usage registered
(the generator of `reconcile_batch.py`; 3 frameworks on 3 keys up to 1,000 runs, one more
framework and key per 300 runs beyond, so that runs of a day do not overlap on a key),
then, each as its own process, one after the other over the same tree:

    floor                     (pending files)
    reconcile --json   pass 1 (the first poll of every run: `pending`)
    floor                     (files as pass 1 left them)
    reconcile --json   pass 2 (the confirming poll: `verified`, tokens written)
    floor                     (files as pass 2 left them)

STABILITY_INTERVAL is 1s so that pass 2 confirms. The ratio of a pass is its wall time over
the floor pass that follows it (same files, same sizes). The figure is the median of the
repeats. Page cache warm: the first floor reads every file once before pass 1.

    .venv/bin/python bench/reconcile_floor.py [--runs 1000] [--repeat 3]
    .venv/bin/python bench/reconcile_floor.py --full     # 10,000 runs
    .venv/bin/python bench/reconcile_floor.py --profile DIR   # py-spy stacks of each pass
    .venv/bin/python bench/stacks.py DIR/pass1-seed0.txt      # where the time goes

With --profile the wall times include py-spy's overhead: read the stacks, not the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ADMIN_KEY, BIN, Simulator, clean_env, load_average, machine
from reconcile_batch import bench_keys, write_runs

HERE = Path(__file__).resolve().parent


#: CPU seconds (user + system) of the last `timed` command: on a shared machine the wall
#: time swings with the other tenants' load, the CPU time much less
last_cpu = [0.0]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    cpu = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    last_cpu[0] = _children_cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall, proc.stdout


def floor(root: Path, cwd: Path) -> float:
    wall, _ = timed([sys.executable, str(HERE / "floor.py"), str(root)], clean_env(), cwd)
    return wall


def once(n: int, seed: int, profile: Path | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tokensettle-floor-"))
    sim = Simulator()
    try:
        keys = bench_keys(max(3, -(-n // 300)) if n > 1000 else 3)
        requests, total_in = write_runs(work / "runs", n, time.time(), random.Random(seed), keys)
        sim.register(requests)
        env = {
            **clean_env(),
            "TOKENSETTLE_RUNS_DIRS": str(work / "runs"),
            "TOKENSETTLE_API_BASE_URL": sim.base_url,
            "TOKENSETTLE_ADMIN_KEY": ADMIN_KEY,
            "TOKENSETTLE_LOG_LEVEL": "warning",
            "TOKENSETTLE_STATE_DIR": str(work / "state"),
            "TOKENSETTLE_STABILITY_INTERVAL": "1s",
            "TOKENSETTLE_RATE_LIMIT_PER_MIN": "6000",
            **{f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in keys.items()},
        }
        out: dict[str, Any] = {"runs": n, "keys": len(keys)}
        floors = [floor(work / "runs", work)]
        for k in (1, 2):
            time.sleep(1.1)  # STABILITY_INTERVAL
            cmd = [str(BIN / "tokensettle"), "reconcile", "--json"]
            report_file = work / f"report{k}.json"
            if profile is not None:
                # py-spy (`.venv/bin/pip install py-spy`): the work is in worker threads,
                # which cProfile does not see. Raw (collapsed) stacks, every thread. py-spy
                # prints to stdout too, so the report goes to a file (the shell execs
                # reconcile: same pid, py-spy keeps sampling it).
                prof = profile / f"pass{k}-seed{seed}.txt"
                spy = [str(BIN / "py-spy"), "record", "--format", "raw", "--rate", "250"]
                spy += ["--output", str(prof), "--", "sh", "-c", 'exec "$@" > "$0"']
                cmd = [*spy, str(report_file), *cmd]
            wall, stdout = timed(cmd, env, work)
            cpu = last_cpu[0]
            report = json.loads(report_file.read_text() if profile is not None else stdout)
            floors.append(floor(work / "runs", work))
            floor_cpu = last_cpu[0]
            got_in = sum(r["totals"]["input_tokens"] for r in report["runs"] if r["totals"])
            out[f"pass{k}"] = {
                "seconds": round(wall, 3),
                "floor_seconds": round(floors[-1], 3),
                "ratio": round(wall / floors[-1], 2),
                "cpu_seconds": round(cpu, 3),
                "floor_cpu_seconds": round(floor_cpu, 3),
                "counts": report["counts"],
                "tokens_exact": got_in == total_in,
            }
        out["floor_pending_seconds"] = round(floors[0], 3)
        out["api_requests"] = sim.stats()["usage_requests"]
        return out
    finally:
        sim.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--full", action="store_true", help="10,000 runs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="write py-spy stacks of each pass here")
    args = parser.parse_args()
    n = 10_000 if args.full else args.runs
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    results = [once(n, seed, args.profile) for seed in range(args.repeat)]

    def median(key: str, field: str) -> float:
        return round(statistics.median(r[key][field] for r in results), 3)

    both = [
        (r["pass1"]["seconds"] + r["pass2"]["seconds"])
        / (r["pass1"]["floor_seconds"] + r["pass2"]["floor_seconds"])
        for r in results
    ]
    summary = {
        "command": " ".join(["python", "bench/reconcile_floor.py", *sys.argv[1:]]),
        "machine": machine(),
        "load_average": f"{load_before} -> {load_average()}",
        "results": results,
        "median": {
            "pass1_seconds": median("pass1", "seconds"),
            "pass1_floor_seconds": median("pass1", "floor_seconds"),
            "pass1_ratio": median("pass1", "ratio"),
            "pass2_seconds": median("pass2", "seconds"),
            "pass2_floor_seconds": median("pass2", "floor_seconds"),
            "pass2_ratio": median("pass2", "ratio"),
            "pass1_cpu_seconds": median("pass1", "cpu_seconds"),
            "pass2_cpu_seconds": median("pass2", "cpu_seconds"),
            "floor_cpu_seconds": median("pass2", "floor_cpu_seconds"),
            "both_ratio": round(statistics.median(both), 2),
        },
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

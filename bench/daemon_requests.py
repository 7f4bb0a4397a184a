"""Benchmark: Usage API requests per verified run for the daemon, 1,000 runs in one day.

Two scenarios, each with its own `tokensettle simulate` and `tokensettle run` processes;
requests are read from the simulator's own /_sim/stats, never from the daemon:

- `live` (compressed): a day of experiments replayed in `--day-seconds` of wall time
  (compression C = 86400 / day-seconds). A writer thread writes N runs (`os.replace`) at a
  steady pace, each ending just before it is written, and the daemon runs with every
  timing divided by C: MIN_AGE 30m/C, STABILITY_INTERVAL 10m/C, MAX_BACKOFF 30m/C,
  RETRY_DELAY 2m/C, RATE_LIMIT_PER_MIN 30*C, and TICK = each of `--ticks` (real-time
  equivalents) / C. Usage buckets are real minutes and cannot be compressed, so runs that
  a real day spreads over hours share minutes here: each run gets its own framework and
  API key (scope), which keeps every run exactly attributable and verifiable. Every
  scope also names the one project, so the batch query is unfiltered (`group_by` does
  the work) instead of listing 1,000 key ids in its URL.
- `backlog`: N runs on three keys ending over the last day (23.5 h .. 40 min ago) are
  already on disk when the daemon starts (it was down, or is new), as `reconcile_batch.py`
  sets them up; STABILITY_INTERVAL is compressed to 2s so the confirming poll comes soon.

Goal: <= 0.05 requests per verified run.

    .venv/bin/python bench/daemon_requests.py [--runs 1000] [--day-seconds 120]
        [--ticks 1m,5m,15m,1h] [--no-backlog]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import BIN, free_port, fresh_aggregates, get, post
from common import iso_z as iso

ADMIN = "sk-admin-simulator-0000"
MODEL = "gpt-4o-mini-2024-07-18"
PROJECT = "proj_bench"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    return float(text[:-1]) * UNITS[text[-1]]


def run_doc(run_id: str, steps: list[tuple[float, float]]) -> bytes:
    doc = {
        "run_id": run_id,
        "model": "gpt-4o-mini",
        "start_timestamp": iso(steps[0][0]),
        "end_timestamp": iso(steps[-1][1]),
        "steps": [
            {
                "step_number": k + 1,
                "start_timestamp": s,
                "end_timestamp": e,
                "tokens_in": 0,
                "tokens_out": 0,
                "api_calls": 0,
                "cached_tokens": 0,
            }
            for k, (s, e) in enumerate(steps)
        ],
        "aggregate_metrics": fresh_aggregates(),
    }
    return json.dumps(doc, indent=2).encode()


def usage(t: float, key: str, tin: int) -> dict[str, Any]:
    return {
        "time": t,
        "api_key_id": key,
        "project_id": PROJECT,
        "model": MODEL,
        "usage": {
            "input_tokens": tin,
            "output_tokens": tin // 4,
            "num_model_requests": 1,
            "input_cached_tokens": 0,
        },
    }


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Processes:
    """A simulator and a daemon; the daemon's stdout is counted in a reader thread."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.root_url = f"http://127.0.0.1:{self.port}"
        base_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))
        }
        self.base_env = base_env
        self.sim = subprocess.Popen(
            [str(BIN / "tokensettle"), "simulate", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=base_env,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                get(f"{self.root_url}/_sim/stats")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.settled: dict[str, int] = {}
        self.batches = 0
        self.failed_fetches = 0
        self.ready = threading.Event()
        self.lock = threading.Lock()

    def register(self, requests: list[dict[str, Any]]) -> None:
        for i in range(0, len(requests), 5000):
            post(f"{self.root_url}/_sim/requests", {"requests": requests[i : i + 5000]})

    def start_daemon(self, settings: dict[str, str], extra_env: dict[str, str]) -> None:
        env = {
            **self.base_env,
            "TOKENSETTLE_RUNS_DIRS": str(self.work / "runs"),
            "TOKENSETTLE_API_BASE_URL": f"{self.root_url}/v1",
            "TOKENSETTLE_ADMIN_KEY": ADMIN,
            "TOKENSETTLE_STATE_DIR": str(self.work / "state"),
            "TOKENSETTLE_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "TOKENSETTLE_LOG_FORMAT": "json",
            **{f"TOKENSETTLE_{k.upper()}": v for k, v in settings.items()},
            **extra_env,
        }
        with open(self.work / "daemon.stderr", "wb") as err:
            self.daemon = subprocess.Popen(
                [str(BIN / "tokensettle"), "run"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=self.work,
            )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.daemon is not None
        assert self.daemon.stdout is not None
        for line in self.daemon.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = event.get("event")
            with self.lock:
                if name == "daemon.ready":
                    self.ready.set()
                elif name == "run.settled":
                    status = str(event.get("status"))
                    self.settled[status] = self.settled.get(status, 0) + 1
                elif name == "usage_api.fetched":
                    self.batches += 1
                elif name == "usage_api.fetch_failed":
                    self.failed_fetches += 1

    def settled_count(self) -> int:
        with self.lock:
            return sum(self.settled.values())

    def wait_settled(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.settled_count() < n:
            if time.monotonic() > deadline:
                return False
            if self.daemon is not None and self.daemon.poll() is not None:
                raise RuntimeError(
                    "daemon exited: " + (self.work / "daemon.stderr").read_text()[-2000:]
                )
            time.sleep(0.1)
        return True

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = get(f"{self.root_url}/_sim/stats")
        return result

    def close(self) -> None:
        for proc in (self.daemon, self.sim):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def live(n: int, day_seconds: float, tick_real: str, seed: int) -> dict[str, Any]:
    c = 86400 / day_seconds
    work = Path(tempfile.mkdtemp(prefix="tokensettle-req-"))
    rng = random.Random(seed)
    procs = Processes(work)
    try:
        (work / "runs").mkdir()
        (work / "state").mkdir()
        frameworks = [f"fw{i:04d}" for i in range(n)]
        toml = "".join(
            f'[frameworks.{fw}]\napi_key_ids = ["key_{fw}"]\nproject_ids = ["{PROJECT}"]\n\n'
            for fw in frameworks
        )
        (work / "tokensettle.toml").write_text(toml)
        spacing = day_seconds / n
        t0 = time.time() + 3.0  # first file written 3 s after the daemon is ready
        plan = []
        requests: list[dict[str, Any]] = []
        expected_in = 0
        for i, fw in enumerate(frameworks):
            write_at = t0 + i * spacing
            end = write_at - 0.2  # the run ends just before its file is written
            start = end - rng.uniform(1.0, 3.0)
            mid = (start + end) / 2
            steps = [(start, mid), (mid, end)]
            for s, e in steps:
                tin = rng.randint(500, 8000)
                expected_in += tin
                requests.append(usage((s + e) / 2, f"key_{fw}", tin))
            plan.append((write_at, work / "runs" / fw / f"run-{i:04d}" / "metrics.json", steps))
        procs.register(requests)
        settings = {
            "min_age": f"{1800 / c:.4f}s",
            "stability_interval": f"{600 / c:.4f}s",
            "max_backoff": f"{1800 / c:.4f}s",
            "retry_delay": f"{120 / c:.4f}s",
            "tick": f"{seconds(tick_real) / c:.4f}s",
            "settle_delay": "0.2s",
            "rate_limit_per_min": f"{30 * c:.0f}",
            "config": str(work / "tokensettle.toml"),
        }
        procs.start_daemon(settings, {})
        if not procs.ready.wait(60):
            raise RuntimeError("daemon not ready")
        t0_shift = time.time() + 1.0 - t0  # keep "ends just before written" if start was slow
        if t0_shift > 0:
            raise RuntimeError("daemon took too long to start; raise the 3 s head start")
        started = time.monotonic()
        for write_at, path, steps in plan:
            delay = write_at - time.time()
            if delay > 0:
                time.sleep(delay)
            write_atomic(path, run_doc(path.parent.name, steps))
        written = time.monotonic() - started
        ok = procs.wait_settled(n, timeout=120 + 4 * seconds(tick_real) / c)
        stats = procs.stats()
        verified = procs.settled.get("verified", 0)
        return {
            "scenario": "live",
            "tick": tick_real,
            "tick_wall_s": round(seconds(tick_real) / c, 4),
            "ticks_per_day": round(86400 / seconds(tick_real)),
            "runs": n,
            "verified": verified,
            "settled": dict(procs.settled),
            "all_settled": ok,
            "api_requests": stats["usage_requests"],
            "requests_per_verified_run": round(stats["usage_requests"] / max(verified, 1), 4),
            "batches_logged": procs.batches,
            "failed_fetches": procs.failed_fetches,
            "writing_wall_s": round(written, 1),
        }
    finally:
        procs.close()
        shutil.rmtree(work, ignore_errors=True)


def backlog(n: int, seed: int) -> dict[str, Any]:
    keys = {"chatdev": "key_chatdevBENCH01", "baes": "key_baesBENCH00002", "ghspec": "key_ghspec3"}
    work = Path(tempfile.mkdtemp(prefix="tokensettle-req-"))
    rng = random.Random(seed)
    procs = Processes(work)
    try:
        (work / "state").mkdir()
        now = time.time()
        span = 23.5 * 3600 - 40 * 60
        requests = []
        for i in range(n):
            fw = list(keys)[i % 3]
            end = now - 40 * 60 - span * (1 - i / n)
            start = end - rng.randint(60, 200)
            third = (end - start) / 3
            steps = [(start + k * third, start + (k + 1) * third) for k in range(3)]
            for s, e in steps:
                requests.append(usage((s + e) / 2, keys[fw], rng.randint(500, 8000)))
            write_atomic(
                work / "runs" / fw / f"run-{i:04d}" / "metrics.json", run_doc(f"run-{i:04d}", steps)
            )
        procs.register(requests)
        env = {f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in keys.items()}
        procs.start_daemon({"stability_interval": "2s", "tick": "1s"}, env)
        started = time.monotonic()
        ok = procs.wait_settled(n, timeout=300)
        stats = procs.stats()
        verified = procs.settled.get("verified", 0)
        return {
            "scenario": "backlog",
            "tick": "1s",
            "runs": n,
            "verified": verified,
            "settled": dict(procs.settled),
            "all_settled": ok,
            "api_requests": stats["usage_requests"],
            "requests_per_verified_run": round(stats["usage_requests"] / max(verified, 1), 4),
            "batches_logged": procs.batches,
            "wall_s_to_all_settled": round(time.monotonic() - started, 1),
        }
    finally:
        procs.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--day-seconds", type=float, default=120.0)
    parser.add_argument("--ticks", default="1m,5m,15m,1h")
    parser.add_argument("--no-backlog", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = []
    if not args.no_backlog:
        results.append(backlog(args.runs, args.seed))
        print(json.dumps(results[-1]), file=sys.stderr)
    for tick in [t for t in args.ticks.split(",") if t]:
        results.append(live(args.runs, args.day_seconds, tick, args.seed))
        print(json.dumps(results[-1]), file=sys.stderr)
    print(
        json.dumps(
            {
                "command": f"python bench/daemon_requests.py --runs {args.runs} "
                f"--day-seconds {args.day_seconds:g} --ticks {args.ticks}",
                "machine": (
                    f"{platform.machine()}, {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}"
                ),
                "compression": round(86400 / args.day_seconds, 1),
                "results": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

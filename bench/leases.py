"""Benchmark: N parallel leased runs (issue 8): Usage API requests per verified run, Admin
API requests per run, and the time from a run's end to its key's deletion.

`tokensettle simulate` and `tokensettle run` run as their own processes; N experiments are
started at once, each with `tokensettle lease exec --framework bench --run-dir ...`, as real
processes that call the simulator's model with their leased key (`--calls` calls, `--gap`
seconds apart), then write their run file (tokens at 0) and print what the calls were
given. Timings are compressed: usage shows in the Usage API 2 s after a call (the real API:
5-60 min), MIN_AGE 2s, STABILITY_INTERVAL 2s, TICK 1s.

Counted by the simulator, never by tokensettle: Usage API requests (`/_sim/stats`, and the
`api_key_ids` each one filters on, from `/_sim/log`), Admin API requests by operation
(`/_sim/admin/log`), and when each key was deleted. Goals: Usage API requests grow with
poll rounds, not with keys (one request per round, all due keys in one `api_key_ids`
filter), so per verified run no more than sequential runs cost; 2 Admin API requests per
run (create, delete); a key deleted within a tick or two of its run's verification.

    .venv/bin/python bench/leases.py [--runs 50] [--calls 4] [--gap 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from common import BIN, free_port, get, machine

ADMIN = "sk-admin-simulator-0000"
PROJECT = "proj_bench_leases"
FRAMEWORK = "bench"

#: One experiment: model calls with its leased key, then the run file and its truth.
EXPERIMENT = r"""
import json, os, sys, time, urllib.request
index, calls, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
run_dir = os.environ["TOKENSETTLE_RUN_DIR"]
steps, used = [], {"tokens_in": 0, "tokens_out": 0, "calls": 0}
for i in range(calls):
    start = time.time()
    body = {"model": "gpt-4o-mini", "max_completion_tokens": 20 + index % 50,
            "messages": [{"role": "user", "content": "x" * (300 + 7 * index + 3 * i)}]}
    req = urllib.request.Request(os.environ["BENCH_MODEL_URL"] + "/chat/completions",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json",
        "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
    with urllib.request.urlopen(req, timeout=30) as resp:
        usage = json.load(resp)["usage"]
    used["tokens_in"] += usage["prompt_tokens"]
    used["tokens_out"] += usage["completion_tokens"]
    used["calls"] += 1
    time.sleep(gap)
    steps.append({"step_number": i + 1, "start_timestamp": start, "end_timestamp": time.time(),
                  "tokens_in": 0, "tokens_out": 0})
doc = {"run_id": os.path.basename(run_dir), "model": "gpt-4o-mini", "steps": steps,
       "aggregate_metrics": {"TOK_IN": 0, "TOK_OUT": 0, "API_CALLS": 0, "CACHED_TOKENS": 0}}
tmp = os.path.join(run_dir, "metrics.json.tmp")
with open(tmp, "w") as f:
    json.dump(doc, f)
os.replace(tmp, os.path.join(run_dir, "metrics.json"))
used["ended_at"] = steps[-1]["end_timestamp"]
print(json.dumps(used), flush=True)
"""

TIMINGS = {
    "TOKENSETTLE_MIN_AGE": "2s",
    "TOKENSETTLE_STABILITY_INTERVAL": "2s",
    "TOKENSETTLE_TICK": "1s",
    "TOKENSETTLE_SETTLE_DELAY": "0.5s",
    "TOKENSETTLE_MAX_BACKOFF": "2s",
    "TOKENSETTLE_RETRY_DELAY": "1s",
    "TOKENSETTLE_RATE_LIMIT_PER_MIN": "6000",
    "TOKENSETTLE_BILL_CHECK_INTERVAL": "0s",
}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def spread(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": round(statistics.median(values), 2) if values else None,
        "p90": pct(values, 0.9),
        "max": round(max(values), 2) if values else None,
    }


def admin_operation(method: str, path: str) -> str:
    if method == "DELETE":
        return "delete_key"
    if method == "POST" and path.endswith("/api_keys"):
        return "create_key"
    if method == "POST" and path.endswith("/service_accounts"):
        return "create_service_account"
    if method == "GET" and path.count("/") == 4:  # /v1/organization/projects/{id}
        return "get_project"
    return f"{method} {path}"


class Bench:
    def __init__(self, work: Path, runs: int, calls: int, gap: float) -> None:
        self.work, self.n, self.calls, self.gap = work, runs, calls, gap
        self.root = work / "runs"
        self.port = free_port()
        self.sim_url = f"http://127.0.0.1:{self.port}"
        self.base_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))
        }
        self.env = {
            **self.base_env,
            "TOKENSETTLE_RUNS_DIRS": str(self.root),
            "TOKENSETTLE_API_BASE_URL": f"{self.sim_url}/v1",
            "TOKENSETTLE_ADMIN_KEY": ADMIN,
            "TOKENSETTLE_STATE_DIR": str(work / "state"),
            "TOKENSETTLE_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "TOKENSETTLE_LOG_FORMAT": "json",
            "TOKENSETTLE_LEASE_PROJECT": PROJECT,
            "BENCH_MODEL_URL": f"{self.sim_url}/v1",
            **TIMINGS,
        }
        self.events: list[dict[str, Any]] = []
        self.daemon: asyncio.subprocess.Process | None = None
        self.procs: list[subprocess.Popen[bytes] | asyncio.subprocess.Process] = []

    def start_simulator(self) -> None:
        scenario = {"admin": {"projects": [{"id": PROJECT, "name": "Leases"}], "usage_delay": 2}}
        scenario_file = self.work / "scenario.json"
        scenario_file.write_text(json.dumps(scenario))
        sim = subprocess.Popen(
            [
                BIN / "tokensettle",
                "simulate",
                "--port",
                str(self.port),
                "--scenario",
                scenario_file,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.base_env,
        )
        self.procs.append(sim)
        deadline = time.monotonic() + 30
        while True:
            try:
                get(f"{self.sim_url}/_sim/stats")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    async def start_daemon(self) -> None:
        self.root.mkdir()
        daemon = await asyncio.create_subprocess_exec(
            BIN / "tokensettle",
            "run",
            env=self.env,
            cwd=self.work,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.daemon = daemon
        self.procs.append(daemon)
        self.reader = asyncio.create_task(self._read(daemon))
        await self.wait(lambda: self.count("daemon.ready") > 0, 60, "daemon.ready")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                print(line.decode(errors="replace").rstrip(), file=sys.stderr)
                continue
            event["_seen"] = time.time()
            self.events.append(event)

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e.get("event") == name)

    async def wait(self, done: Any, within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not done():
            if self.daemon is not None and self.daemon.returncode is not None:
                raise RuntimeError(f"the daemon exited {self.daemon.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {within:.0f} s waiting for {what}")
            await asyncio.sleep(0.1)

    async def experiment(self, i: int) -> dict[str, Any]:
        run_dir = self.root / FRAMEWORK / f"lease-{i:03d}"
        proc = await asyncio.create_subprocess_exec(
            BIN / "tokensettle",
            "lease",
            "exec",
            "--framework",
            FRAMEWORK,
            "--run-dir",
            str(run_dir),
            "--",
            sys.executable,
            "-c",
            EXPERIMENT,
            str(i),
            str(self.calls),
            str(self.gap),
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"lease exec {i} exited {proc.returncode}: {err.decode()[-800:]}")
        used: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        declared = json.loads((run_dir / "usage_scope.json").read_text())
        used["key_id"] = declared["lease"]["key_id"]
        used["run_id"] = run_dir.name
        used["path"] = run_dir / "metrics.json"
        return used

    async def play(self) -> dict[str, Any]:
        self.start_simulator()
        await self.start_daemon()
        started = time.monotonic()
        runs = await asyncio.gather(*(self.experiment(i) for i in range(self.n)))
        experiments_s = time.monotonic() - started
        keys = {r["key_id"] for r in runs}
        await self.wait(lambda: self.count("run.settled") >= self.n, 120, "every run settled")
        await self.wait(lambda: self.count("lease.revoked") >= self.n, 60, "every key revoked")
        all_done_s = time.monotonic() - started
        return self.summary(runs, keys, experiments_s, all_done_s)

    def summary(
        self, runs: list[dict[str, Any]], keys: set[str], experiments_s: float, all_done_s: float
    ) -> dict[str, Any]:
        stats = get(f"{self.sim_url}/_sim/stats")
        usage_log = get(f"{self.sim_url}/_sim/log")
        admin_log = get(f"{self.sim_url}/_sim/admin/log")
        admin_state = {k["id"]: k["state"] for k in get(f"{self.sim_url}/_sim/admin")["keys"]}
        settled = {e["run_id"]: e for e in self.events if e.get("event") == "run.settled"}
        exact = verified = 0
        for run in runs:
            doc = json.loads(run["path"].read_text())
            agg = doc["aggregate_metrics"]
            block = doc["usage_api_reconciliation"]
            verified += block["verification_status"] == "verified"
            exact += (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"]) == (
                run["tokens_in"],
                run["tokens_out"],
                run["calls"],
            ) and block["attribution"]["apportioned_fraction"] == 0
        deleted_at: dict[str, float] = {}
        ops: dict[str, int] = {}
        for call in admin_log:
            if call["target"] != "admin":
                continue
            op = admin_operation(call["method"], call["path"])
            ops[op] = ops.get(op, 0) + 1
            if op == "delete_key" and call["status"] == 200:
                deleted_at.setdefault(call["path"].rsplit("/", 1)[-1], call["at"])
        to_verified, to_revoked, verified_to_revoked = [], [], []
        for run in runs:
            event = settled.get(run["run_id"])
            at = datetime.fromisoformat(event["timestamp"]).timestamp() if event else None
            gone = deleted_at.get(run["key_id"])
            if at is not None:
                to_verified.append(at - run["ended_at"])
            if gone is not None:
                to_revoked.append(gone - run["ended_at"])
            if at is not None and gone is not None:
                verified_to_revoked.append(gone - at)

        def filtered(entry: dict[str, Any], name: str) -> int:
            return sum(1 for k, _ in parse_qsl(entry["query"]) if k.startswith(name))

        keys_per_request = [filtered(e, "api_key_ids") for e in usage_log]
        projects_per_request = [filtered(e, "project_ids") for e in usage_log]
        rounds = self.metric("tokensettle_poll_rounds_total")
        usage_requests = stats["usage_requests"]
        admin_total = sum(ops.values())
        return {
            "runs": self.n,
            "calls_per_run": self.calls,
            "verified": verified,
            "exact": exact,
            "keys_deleted_in_simulator": sum(admin_state.get(k) == "deleted" for k in keys),
            "usage_api_requests": usage_requests,
            "poll_rounds": rounds,
            "usage_requests_per_round": round(usage_requests / rounds, 2) if rounds else None,
            "usage_requests_per_verified_run": round(usage_requests / max(verified, 1), 3),
            "usage_request_filters": {
                "api_key_ids_max": max(keys_per_request, default=0),
                "project_ids_max": max(projects_per_request, default=0),
                "unfiltered_requests": sum(
                    k == p == 0 for k, p in zip(keys_per_request, projects_per_request, strict=True)
                ),
            },
            "admin_requests": ops,
            "admin_requests_per_run": round(admin_total / self.n, 3),
            "seconds_end_to_verified": spread(to_verified),
            "seconds_end_to_key_deleted": spread(to_revoked),
            "seconds_verified_to_key_deleted": spread(verified_to_revoked),
            "experiments_wall_s": round(experiments_s, 1),
            "all_settled_and_revoked_wall_s": round(all_done_s, 1),
        }

    def metric(self, name: str) -> float | None:
        url = f"http://{self.env['TOKENSETTLE_HTTP_ADDR']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    async def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                proc.terminate()
                if isinstance(proc, subprocess.Popen):
                    proc.wait(timeout=30)
                else:
                    await asyncio.wait_for(proc.wait(), 30)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tokensettle-leases-"))
    bench = Bench(work, args.runs, args.calls, args.gap)
    try:
        return await bench.play()
    finally:
        await bench.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="parallel leased runs (50)")
    parser.add_argument("--calls", type=int, default=4, help="model calls per run (4)")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds after each call (1.0)")
    args = parser.parse_args()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    result = asyncio.run(main_async(args))
    print(
        json.dumps(
            {
                "command": f"python bench/leases.py --runs {args.runs} --calls {args.calls} "
                f"--gap {args.gap:g}",
                "machine": machine(),
                "load_average_at_start": load,
                "result": result,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: N parallel leased runs (issue 8): exactness, Usage API requests per verified
run, Admin API requests per run, and the time from a run's verification to its key's
deletion; then the same N runs on one shared key, for contrast.

`tokensettle simulate` and `tokensettle run` run as their own processes. Phase `leased`:
N experiments are started at once, each with `tokensettle lease exec --framework bench
--run-dir ...`, as real processes that call the simulator's model with their leased key
(`--calls` calls, `--gap` seconds apart), then write their run file (tokens at 0) and
print what the calls were given. Phase `shared`: once every leased run is settled and its
key deleted, the same N experiments run at once without leases, all on the framework's
one project key (framework `shared`): minute buckets cannot tell them apart, so they come
out `ambiguous`. Timings are compressed: usage shows in the Usage API 2 s after a call
(the real API: 5-60 min), MIN_AGE 2s, STABILITY_INTERVAL 2s, TICK 1s (`--quick`, for
the smoke test: 1 s, 1s, 1s).

Counted by the simulator, never by tokensettle: the truth per key (`/_sim/truth`), Usage
API requests (`/_sim/stats`, and the `api_key_ids` each one filters on, from `/_sim/log`),
Admin API requests by operation (`/_sim/admin/log`), and when each key was deleted. A run
is `verified_exact` when it is `verified`, nothing of it apportioned, and its written
totals equal both what its calls were given and what the simulator recorded for its key.
Goals: every leased run verified exact and every key deleted (else exit 1); Usage API
requests grow with poll rounds, not with keys (one request per round, all due keys in one
`api_key_ids` filter); 2 Admin API requests per run (create, delete) besides the one-off
set-up of the lease project; a key deleted within a tick or two of its run's verification.

    .venv/bin/python bench/leases.py [--runs 50] [--calls 4] [--gap 1.0] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from common import ADMIN_KEY, BIN, clean_env, free_port, get, load_average, machine

PROJECT = "proj_bench_leases"
LEASED = "bench"
SHARED = "shared"
#: The `shared` framework's one project key, as a user has it (id and value).
SHARED_KEY_ID = "key_bench_shared"
SHARED_KEY_VALUE = "sk-proj-bench-shared-0001"

#: One experiment: model calls with the key in OPENAI_API_KEY, then the run file, and on
#: stdout what the calls were given.
EXPERIMENT = r"""
import json, os, sys, time, urllib.request
began = time.time()
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
used["began_at"], used["ended_at"] = began, steps[-1]["end_timestamp"]
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
#: `--quick` (the smoke test): usage visible 1 s after a call, and these.
QUICK = {"TOKENSETTLE_MIN_AGE": "1s", "TOKENSETTLE_STABILITY_INTERVAL": "1s"}
#: How long a phase's runs may take to settle (and their keys to go) after the last ends.
SETTLE_WITHIN = 180.0


def spread(values: list[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "median": round(statistics.median(values), 3) if values else None,
        "max": round(max(values), 3) if values else None,
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


def truth_by_key(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """(input, output, requests) per api_key_id, as the simulator recorded the calls."""
    out: dict[str, tuple[int, int, int]] = {}
    for row in rows:
        usage = row["usage"]
        i, o, n = out.get(row["api_key_id"], (0, 0, 0))
        out[row["api_key_id"]] = (
            i + usage["input_tokens"],
            o + usage["output_tokens"],
            n + usage["num_model_requests"],
        )
    return out


def filtered(entry: dict[str, Any], name: str) -> int:
    """How many ids of filter `name` (api_key_ids, project_ids) a usage request names."""
    return sum(1 for k, _ in parse_qsl(entry["query"]) if k.startswith(name))


class Bench:
    def __init__(self, work: Path, runs: int, calls: int, gap: float, quick: bool) -> None:
        self.work, self.n, self.calls, self.gap = work, runs, calls, gap
        self.usage_delay = 1 if quick else 2
        timings = {**TIMINGS, **(QUICK if quick else {})}
        self.root = work / "runs"
        self.port = free_port()
        self.sim_url = f"http://127.0.0.1:{self.port}"
        self.base_env = clean_env()
        self.env = {
            **self.base_env,
            "TOKENSETTLE_RUNS_DIRS": str(self.root),
            "TOKENSETTLE_API_BASE_URL": f"{self.sim_url}/v1",
            "TOKENSETTLE_ADMIN_KEY": ADMIN_KEY,
            "TOKENSETTLE_STATE_DIR": str(work / "state"),
            "TOKENSETTLE_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "TOKENSETTLE_LOG_FORMAT": "json",
            "TOKENSETTLE_LEASE_PROJECT": PROJECT,
            f"OPENAI_API_KEY_{SHARED.upper()}_ID": SHARED_KEY_ID,
            "BENCH_MODEL_URL": f"{self.sim_url}/v1",
            **timings,
        }
        self.events: list[dict[str, Any]] = []
        self.not_json: list[str] = []
        self.daemon: asyncio.subprocess.Process | None = None
        self.procs: list[asyncio.subprocess.Process] = []

    # ------------------------------------------------------------------ processes

    async def start_simulator(self) -> None:
        shared = {"id": SHARED_KEY_ID, "value": SHARED_KEY_VALUE, "project_id": PROJECT}
        scenario = {
            "admin": {
                "projects": [{"id": PROJECT, "name": "Leases"}],
                "api_keys": [shared],
                "usage_delay": self.usage_delay,
            }
        }
        scenario_file = self.work / "scenario.json"
        scenario_file.write_text(json.dumps(scenario))
        argv = [str(BIN / "tokensettle"), "simulate", "--port", str(self.port)]
        sim = await asyncio.create_subprocess_exec(
            *argv,
            "--scenario",
            str(scenario_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=self.base_env,
        )
        self.procs.append(sim)
        deadline = time.monotonic() + 30
        while True:
            try:
                get(f"{self.sim_url}/_sim/stats")
                return
            except OSError:
                if time.monotonic() > deadline or sim.returncode is not None:
                    raise RuntimeError("tokensettle simulate did not answer within 30 s") from None
                await asyncio.sleep(0.05)

    async def start_daemon(self) -> None:
        self.root.mkdir()
        daemon = await asyncio.create_subprocess_exec(
            BIN / "tokensettle",
            "run",
            env=self.env,
            cwd=self.work,
            stdin=asyncio.subprocess.DEVNULL,
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
                self.not_json.append(line.decode(errors="replace").rstrip())
                continue
            self.events.append(event)

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e.get("event") == name)

    def seen(self, name: str, field: str, among: set[str]) -> bool:
        """Whether an event `name` came for every value of `field` in `among`."""
        found = {e.get(field) for e in self.events if e.get("event") == name}
        return among <= found

    async def wait(self, done: Callable[[], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not done():
            if self.daemon is not None and self.daemon.returncode is not None:
                raise RuntimeError(f"the daemon exited {self.daemon.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {within:.0f} s waiting for {what}")
            await asyncio.sleep(0.1)

    async def experiment(self, framework: str, i: int) -> dict[str, Any]:
        """One experiment as its own process: through `lease exec` for the leased phase,
        with the shared key in OPENAI_API_KEY (and no admin key) for the other."""
        run_dir = self.root / framework / f"{framework}-{i:03d}"
        argv: list[str | Path] = [sys.executable, "-c", EXPERIMENT, str(i)]
        argv += [str(self.calls), str(self.gap)]
        if framework == LEASED:
            lease = ["lease", "exec", "--framework", framework, "--run-dir", str(run_dir), "--"]
            argv, env = [BIN / "tokensettle", *lease, *argv], self.env
        else:
            run_dir.mkdir(parents=True)
            env = {
                **self.base_env,
                "BENCH_MODEL_URL": self.env["BENCH_MODEL_URL"],
                "OPENAI_API_KEY": SHARED_KEY_VALUE,
                "TOKENSETTLE_RUN_DIR": str(run_dir),
            }
        spawned = time.time()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.procs.append(proc)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(
                f"experiment {run_dir.name} exited {proc.returncode}: {err[-800:]!r}"
            )
        used: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        if framework == LEASED:
            declared = json.loads((run_dir / "usage_scope.json").read_text())
            used["key_id"] = declared["lease"]["key_id"]
        else:
            used["key_id"] = SHARED_KEY_ID
        used["run_id"] = run_dir.name
        used["spawn_to_start"] = used["began_at"] - spawned
        used["path"] = run_dir / "metrics.json"
        return used

    # --------------------------------------------------------------------- phases

    def marks(self) -> dict[str, Any]:
        """Where the simulator's logs and the daemon's counters stand."""
        return {
            "usage": get(f"{self.sim_url}/_sim/stats")["usage_requests"],
            "admin": len(get(f"{self.sim_url}/_sim/admin/log")),
            "rounds": self.metric("tokensettle_poll_rounds_total") or 0.0,
        }

    async def phase(self, framework: str) -> dict[str, Any]:
        before = self.marks()
        started = time.monotonic()
        runs = await asyncio.gather(*(self.experiment(framework, i) for i in range(self.n)))
        experiments_s = time.monotonic() - started
        ids, keys = {r["run_id"] for r in runs}, {r["key_id"] for r in runs}
        settled = lambda: self.seen("run.settled", "run_id", ids)  # noqa: E731
        await self.wait(settled, SETTLE_WITHIN, f"{framework} runs settled")
        if framework == LEASED:
            revoked = lambda: self.seen("lease.revoked", "key_id", keys)  # noqa: E731
            await self.wait(revoked, SETTLE_WITHIN, "leased keys revoked")
        done_s = time.monotonic() - started
        after = self.marks()
        usage_log = get(f"{self.sim_url}/_sim/log")[before["usage"] : after["usage"]]
        admin_log = get(f"{self.sim_url}/_sim/admin/log")[before["admin"] : after["admin"]]
        rounds = after["rounds"] - before["rounds"]
        out = self.settled(runs)
        out.update(self.requests(usage_log, rounds, out["verified"], out["runs"]))
        if framework == LEASED:
            out.update(self.admin(runs, admin_log))
        out["experiments_wall_s"] = round(experiments_s, 1)
        out["wall_s_to_all_settled" + ("_and_deleted" if framework == LEASED else "")] = round(
            done_s, 1
        )
        return out

    def settled(self, runs: list[dict[str, Any]]) -> dict[str, Any]:
        """What the daemon wrote into each run file, against the calls and the truth."""
        truth = truth_by_key(get(f"{self.sim_url}/_sim/truth")["rows"])
        statuses: Counter[str] = Counter()
        exact = matches_calls = 0
        apportioned: list[float] = []
        written_total = [0, 0, 0]
        for run in runs:
            doc = json.loads(run["path"].read_text())
            agg, block = doc["aggregate_metrics"], doc["usage_api_reconciliation"]
            status = block["verification_status"]
            statuses[status] += 1
            written = (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"])
            written_total = [a + b for a, b in zip(written_total, written, strict=True)]
            given = (run["tokens_in"], run["tokens_out"], run["calls"])
            fraction = block["attribution"]["apportioned_fraction"]
            apportioned.append(fraction)
            matches_calls += written == given
            exact += (
                status == "verified" and fraction == 0 and written == given == truth[run["key_id"]]
            )
        keys = {r["key_id"] for r in runs}
        key_truth = [sum(truth[k][j] for k in keys) for j in range(3)]
        return {
            "runs": len(runs),
            # process start to the experiment's first line: `lease exec` minting the key
            "seconds_spawn_to_experiment_start": spread([r["spawn_to_start"] for r in runs]),
            "statuses": dict(sorted(statuses.items())),
            "verified": statuses["verified"],
            "verified_exact": exact,
            "written_equal_to_calls": matches_calls,
            "apportioned_fraction": spread(apportioned),
            # integers are split exactly, so the runs' written totals sum to their keys'
            "written_totals_equal_key_truth": written_total == key_truth,
        }

    def requests(
        self, usage_log: list[dict[str, Any]], rounds: float, verified: int, settled: int
    ) -> dict[str, Any]:
        keys_per_request = [filtered(e, "api_key_ids") for e in usage_log]
        projects_per_request = [filtered(e, "project_ids") for e in usage_log]
        total = len(usage_log)
        return {
            "usage_api_requests": total,
            "poll_rounds": int(rounds),
            "usage_requests_per_round": round(total / rounds, 2) if rounds else None,
            "usage_requests_per_verified_run": round(total / verified, 3) if verified else None,
            "usage_requests_per_settled_run": round(total / settled, 3) if settled else None,
            "usage_request_filters": {
                "api_key_ids_max": max(keys_per_request, default=0),
                "project_ids_max": max(projects_per_request, default=0),
                "unfiltered_requests": sum(
                    k == p == 0 for k, p in zip(keys_per_request, projects_per_request, strict=True)
                ),
            },
        }

    def admin(self, runs: list[dict[str, Any]], admin_log: list[dict[str, Any]]) -> dict[str, Any]:
        """Admin API requests by operation, the keys left, and each key's deletion time
        after its run's `run.settled` (the daemon's log timestamp, the simulator's clock
        for the delete; both are this machine's wall clock)."""
        ops: Counter[str] = Counter()
        deleted_at: dict[str, float] = {}
        for call in admin_log:
            if call["target"] != "admin":
                continue
            op = admin_operation(call["method"], call["path"])
            ops[op] += 1
            if op == "delete_key" and call["status"] == 200:
                deleted_at.setdefault(call["path"].rsplit("/", 1)[-1], call["at"])
        states = {k["id"]: k["state"] for k in get(f"{self.sim_url}/_sim/admin")["keys"]}
        keys = {r["key_id"] for r in runs}
        settled_at = {
            e["run_id"]: datetime.fromisoformat(e["timestamp"]).timestamp()
            for e in self.events
            if e.get("event") == "run.settled"
        }
        to_deleted, ended_to_deleted = [], []
        for run in runs:
            gone, at = deleted_at.get(run["key_id"]), settled_at.get(run["run_id"])
            if gone is not None and at is not None:
                to_deleted.append(gone - at)
            if gone is not None:
                ended_to_deleted.append(gone - run["ended_at"])
        per_run = ops["create_key"] + ops["delete_key"]
        return {
            "distinct_keys": len(keys),
            "keys_left_undeleted": sum(states.get(k) != "deleted" for k in keys),
            "admin_requests": dict(sorted(ops.items())),
            "admin_requests_per_run": round(sum(ops.values()) / len(runs), 3),
            "admin_key_requests_per_run": round(per_run / len(runs), 3),
            "admin_setup_requests": sum(ops.values()) - per_run,
            "seconds_verified_to_key_deleted": spread(to_deleted),
            "seconds_run_end_to_key_deleted": spread(ended_to_deleted),
        }

    def metric(self, name: str) -> float | None:
        url = f"http://{self.env['TOKENSETTLE_HTTP_ADDR']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    async def play(self) -> dict[str, Any]:
        # The daemon needs the simulator only from its first poll on: start both at once.
        started = time.monotonic()
        await asyncio.gather(self.start_simulator(), self.start_daemon())
        ready_s = time.monotonic() - started
        leased = await self.phase(LEASED)
        shared = await self.phase(SHARED)
        return {
            "leased": leased,
            "shared_key_no_leases": shared,
            "wall_s_to_daemon_ready": round(ready_s, 1),
            "non_json_lines": self.not_json,
        }

    async def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tokensettle-leases-"))
    bench = Bench(work, args.runs, args.calls, args.gap, args.quick)
    try:
        return await bench.play()
    finally:
        await bench.close()
        shutil.rmtree(work, ignore_errors=True)


def failures(result: dict[str, Any], runs: int) -> list[str]:
    """What makes the benchmark exit 1: a leased run not verified exact, a key left."""
    leased = result["leased"]
    out = []
    if leased["verified_exact"] != runs:
        out.append(f"{runs - leased['verified_exact']} of {runs} leased runs not verified exact")
    if leased["keys_left_undeleted"]:
        out.append(f"{leased['keys_left_undeleted']} leased keys left undeleted")
    if leased["distinct_keys"] != runs:
        out.append(f"{leased['distinct_keys']} distinct keys for {runs} leased runs")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="parallel runs per phase (50)")
    parser.add_argument("--calls", type=int, default=4, help="model calls per run (4)")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds after each call (1.0)")
    parser.add_argument(
        "--quick", action="store_true", help="usage delay, MIN_AGE, STABILITY_INTERVAL 1 s (smoke)"
    )
    args = parser.parse_args()
    if args.runs < 1 or args.calls < 1 or args.gap < 0:
        parser.error("--runs and --calls must be at least 1, --gap not negative")
    load = load_average()
    try:
        result = asyncio.run(main_async(args))
    except RuntimeError as exc:
        print(f"leases.py: {exc}", file=sys.stderr)
        return 1
    problems = failures(result, args.runs)
    print(
        json.dumps(
            {
                "command": f"python bench/leases.py --runs {args.runs} --calls {args.calls} "
                f"--gap {args.gap:g}" + (" --quick" if args.quick else ""),
                "machine": machine(),
                "load_average_at_start": load,
                "load_average_at_end": load_average(),
                "result": result,
                "failures": problems,
            },
            indent=2,
        )
    )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

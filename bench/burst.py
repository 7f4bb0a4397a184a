"""Benchmark: a burst of 10,000 already-due runs arriving in a watched tree while the daemon runs.

Starts `tokensettle simulate` and `tokensettle run` (SETTLE_DELAY and MIN_AGE at their
defaults, TICK from --tick, STABILITY_INTERVAL from --stability so the confirming poll
comes within the benchmark), waits for `daemon.ready`, then brings N pending runs into the
root the way a restore does:

- `copy`: file by file, framework by framework, each run directory made and its
  metrics.json written in place (as `cp -r` or `rsync` does), in bursts of --burst files
  with a pause of 50-500 ms between bursts;
- `rename`: the three framework trees are prepared outside the root (same filesystem),
  then each is moved in with one rename.

The runs: three frameworks on three API keys, one minute each (two steps), every run of a
framework in its own minute so each is exactly attributable; N = 10,000 therefore spans
about 56 hours (3,334 minutes per key), so MAX_AGE is raised to 4 days; the last run ended
45 minutes ago (past MIN_AGE). Their usage is registered in the simulator first.

Measured, from the first file written (or renamed) to the last run's `run.settled` line:
Usage API requests (the simulator's count, and per poll round from the daemon's log,
beside the floor: the pages of the round's merged windows), time to all verified,
`/healthz` latency sampled every 20-50 ms by a separate process for the whole burst,
the daemon's peak (VmHWM) and steady (VmRSS after --idle s) memory, CPU time, poll rounds
(`tokensettle_poll_rounds_total`), and every line on stdout or stderr that is not JSON.
At the end every file must be verified with exactly its truth. Goals (issue 7): /healthz
p99 < 50 ms and peak RSS < 200 MB during a 10,000-run burst; about one request per merged
window per round.

    .venv/bin/python bench/burst.py [--runs 10000 | --quick] [--mode copy|rename|both]
        [--tick 5s] [--stability 10s] [--burst 500] [--seed 0] [--profile OUT.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common import (
    DaemonProcess,
    Simulator,
    cpu_seconds,
    daemon_env,
    load_average,
    machine,
    pct,
    pending_run,
    status_kb,
)
from tokensettle.windows import pages_for

KEYS = {"chatdev": "key_chatdevBURST1", "baes": "key_baesBURST0002", "ghspec": "key_ghspecBURST3"}
PROJECT = "proj_burst"
MODEL = "gpt-4o-mini-2024-07-18"
POLLED = ("run.polled", "run.attempt_failed", "run.settled")
AGG_KEYS = ("TOK_IN", "TOK_OUT", "API_CALLS", "CACHED_TOKENS")
BLOCK_KEYS = ("total_tokens_in", "total_tokens_out", "total_api_calls", "total_cached_tokens")
Plan = tuple[dict[str, bytes], dict[str, list[int]], list[dict[str, Any]]]


# ---------------------------------------------------------------------- the runs


def plan(
    n: int, now: float, rng: random.Random
) -> tuple[dict[str, bytes], dict[str, list[int]], list[dict[str, Any]]]:
    """Each run's relative path -> file bytes, -> truth (in, out, calls, cached); and the
    simulator's requests. Run i is framework i % 3 in minute i // 3 of its key."""
    per_key = (n + 2) // 3
    base = (int(now) // 60) * 60 - 45 * 60 - per_key * 60
    files: dict[str, bytes] = {}
    truth: dict[str, list[int]] = {}
    requests: list[dict[str, Any]] = []
    fws = list(KEYS)
    for i in range(n):
        fw = fws[i % 3]
        minute = base + (i // 3) * 60
        steps = [(minute + 5.0, minute + 25.0), (minute + 30.0, minute + 55.0)]
        total = [0, 0, 0, 0]
        for s, e in steps:
            tin = rng.randint(300, 6000)
            usage = [
                tin,
                tin // 6 + rng.randint(0, 50),
                rng.randint(1, 4),
                rng.randint(0, tin // 3),
            ]
            total = [a + b for a, b in zip(total, usage, strict=True)]
            requests.append(
                {
                    "time": rng.uniform(s + 1, e - 1),
                    "api_key_id": KEYS[fw],
                    "project_id": PROJECT,
                    "model": MODEL,
                    "usage": {
                        "input_tokens": usage[0],
                        "output_tokens": usage[1],
                        "num_model_requests": usage[2],
                        "input_cached_tokens": usage[3],
                    },
                }
            )
        run_id = f"run-{i:05d}"
        rel = f"{fw}/{run_id}/metrics.json"
        files[rel] = pending_run(run_id, steps)
        truth[rel] = total
    return files, truth, requests


def write_tree(target: Path, files: dict[str, bytes], order: list[str]) -> None:
    for rel in order:
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(files[rel])


def check_files(root: Path, truth: dict[str, list[int]]) -> list[str]:
    """Every file verified with exactly its truth (aggregate and block totals)."""
    wrong = []
    for rel, want in truth.items():
        doc = json.loads((root / rel).read_bytes())
        block = doc.get("usage_api_reconciliation") or {}
        agg = doc.get("aggregate_metrics") or {}
        got = [agg.get(k) for k in ("TOK_IN", "TOK_OUT", "API_CALLS", "CACHED_TOKENS")]
        got_block = [
            block.get(k)
            for k in (
                "total_tokens_in",
                "total_tokens_out",
                "total_api_calls",
                "total_cached_tokens",
            )
        ]
        if block.get("verification_status") != "verified" or got != want or got_block != want:
            wrong.append(f"{rel}: {block.get('verification_status')} {got} want {want}")
    return wrong


# ---------------------------------------------------------------------- measuring


def probe(url: str, out: Path) -> int:
    """The /healthz prober, in its own process (so the writer's GIL never delays it):
    one GET on a fresh connection every 20-50 ms until SIGTERM; one line per answer."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rng = random.Random()
    with open(out, "w") as f:
        while not stop.is_set():
            began = time.perf_counter()
            status = 0
            try:
                with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback
                    resp.read()
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                status = -1
            f.write(f"{time.time():.6f} {(time.perf_counter() - began) * 1000:.3f} {status}\n")
            f.flush()
            stop.wait(rng.uniform(0.02, 0.05))
    return 0


class Memory(threading.Thread):
    """VmRSS of the daemon every 100 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(status_kb(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return
            self.stop.wait(0.1)


def rounds_of(
    events: list[dict[str, Any]], read_at: list[float], t0: float
) -> list[dict[str, Any]]:
    """The daemon's log cut into poll rounds: a round's fetches (`usage_api.request`,
    `usage_api.fetched`) come before its runs' lines, so a fetch after a run line opens
    the next round."""
    rounds: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for event, at in zip(events, read_at, strict=True):
        name = event.get("event")
        if name in ("usage_api.request", "usage_api.fetched", "usage_api.fetch_failed"):
            if current is None or current["closed"]:
                current = {
                    "at_s": round(at - t0, 2),
                    "requests": 0,
                    "merged_windows": 0,
                    "floor": 0,
                    "runs": 0,
                    "polled": 0,
                    "closed": False,
                }
                rounds.append(current)
            if name == "usage_api.request":
                current["requests"] += 1
            elif name == "usage_api.fetched":
                current["merged_windows"] += 1
                current["floor"] += pages_for(int(event.get("minutes") or 0))
                current["runs"] += int(event.get("runs") or 0)
        elif name in POLLED and current is not None:
            current["closed"] = True
            if name != "run.settled":
                current["polled"] += 1
    for r in rounds:
        del r["closed"]
    return rounds


def notable(events: list[dict[str, Any]]) -> dict[str, int]:
    """Counts of the log lines that explain a round's shape (rescans and their reasons,
    watcher trouble, unreadable or failing runs)."""
    counts: dict[str, int] = {}
    for e in events:
        name = str(e.get("event"))
        if name == "daemon.rescanned":
            name = f"daemon.rescanned ({e.get('reason')})"
        elif not name.startswith(("watcher.", "index.", "run.write", "run.unreadable", "http.")):
            continue
        counts[name] = counts.get(name, 0) + 1
    return counts


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------------- one burst


def burst(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix=f"tokensettle-burst-{mode}-"))
    root, state, staging = work / "runs", work / "state", work / "staging"
    for d in (root, state, staging):
        d.mkdir()
    files, truth, requests = plan(args.runs, time.time(), rng)
    order = sorted(files, key=lambda rel: (rel.split("/")[0], rel))  # as a copy walks the tree
    sim = Simulator()
    daemon: DaemonProcess | None = None
    prober: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"mode": mode, "runs": args.runs}
    try:
        sim.register(requests)
        if mode == "rename":
            write_tree(staging, files, order)
        settings = {
            "tick": args.tick,
            "stability_interval": args.stability,
            "max_age": "4d",
            "rate_limit_per_min": "6000",
        }
        daemon = DaemonProcess(daemon_env(root, sim.base_url, state, KEYS, settings), work)
        if daemon.wait_event("daemon.ready", 60) is None:
            raise RuntimeError("daemon not ready: " + "\n".join(daemon.stderr_text[-20:]))
        samples = work / "healthz.txt"
        prober = subprocess.Popen(
            [sys.executable, __file__, "--probe", f"{daemon.http}/healthz", str(samples)]
        )
        memory = Memory(daemon.pid)
        memory.start()
        time.sleep(1.0)  # a second of idle samples before the burst
        profiler = None
        if args.profile:  # py-spy (pip install py-spy): speedscope JSON, samples in time order
            spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(daemon.pid)]
            profiler = subprocess.Popen(
                [*spy, "--rate", "100", "--idle", "--format", "speedscope", "-o", args.profile],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        cpu0 = cpu_seconds(daemon.pid)
        requests0 = sim.stats()["usage_requests"]
        since = len(daemon.events)
        t0 = time.monotonic()
        wall0 = time.time()
        if mode == "copy":
            for i in range(0, len(order), args.burst):
                write_tree(root, files, order[i : i + args.burst])
                time.sleep(rng.uniform(0.05, 0.5))
        else:
            for fw in KEYS:
                os.rename(staging / fw, root / fw)
                time.sleep(rng.uniform(0.05, 0.5))
        written_s = time.monotonic() - t0
        scheduled = daemon.wait_count("run.scheduled", args.runs, args.within, since=since)
        settled = daemon.wait_count("run.settled", args.runs, args.within, since=since)
        verified_at = daemon.read_at[settled] - t0 if settled is not None else None
        requests_at_verified = sim.stats()["usage_requests"] - requests0
        cpu1 = cpu_seconds(daemon.pid)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            profiler.wait(timeout=60)
        time.sleep(args.idle)  # steady state
        steady_kb = status_kb(daemon.pid, "VmRSS")
        peak_kb = status_kb(daemon.pid, "VmHWM")
        with urllib.request.urlopen(f"{daemon.http}/metrics", timeout=30) as resp:  # noqa: S310
            metrics_text = resp.read().decode()
        prober.terminate()
        prober.wait(timeout=30)
        memory.stop.set()
        wrong = check_files(root, truth)
        statuses: dict[str, int] = {}
        for e in daemon.find("run.settled", since):
            statuses[str(e.get("status"))] = statuses.get(str(e.get("status")), 0) + 1
        lat: list[float] = []
        codes: dict[str, int] = {}
        timed: list[tuple[float, float]] = []
        for line in samples.read_text().splitlines():
            ts, ms, code = line.split()
            if float(ts) >= wall0 and (verified_at is None or float(ts) <= wall0 + verified_at):
                lat.append(float(ms))
                timed.append((float(ms), float(ts) - wall0))
                codes[code] = codes.get(code, 0) + 1
        # the five slowest answers: (ms, seconds after the burst began, when it was sent)
        slowest = [[round(ms), round(at - ms / 1000, 1)] for ms, at in sorted(timed)[-5:]]
        rounds = rounds_of(daemon.events[since:], daemon.read_at[since:], t0)
        exit_code = daemon.terminate()
        result.update(
            {
                "seconds_writing": round(written_s, 2),
                # every run read and on the grid: the ingest
                "seconds_to_all_scheduled": (
                    round(daemon.read_at[scheduled] - t0, 1) if scheduled is not None else None
                ),
                "seconds_to_all_verified": round(verified_at, 1) if verified_at else None,
                "settled": statuses,
                "verified_exact": args.runs - len(wrong),
                "wrong_examples": wrong[:3],
                "usage_api_requests_until_all_verified": requests_at_verified,
                "usage_api_requests_total": sim.stats()["usage_requests"] - requests0,
                "poll_rounds_metric": metric(metrics_text, "tokensettle_poll_rounds_total"),
                "poll_rounds": len(rounds),
                "requests_floor": sum(r["floor"] for r in rounds),
                "rounds": rounds,
                "healthz": {
                    "samples": len(lat),
                    "status_codes": codes,
                    "p50_ms": round(pct(lat, 50), 1) if lat else None,
                    "p99_ms": round(pct(lat, 99), 1) if lat else None,
                    "max_ms": round(max(lat), 1) if lat else None,
                    "over_50ms": sum(1 for v in lat if v > 50),
                    "over_1s": sum(1 for v in lat if v > 1000),
                    "slowest_at_s": slowest,
                },
                "rss_mb": {
                    "before_burst": round(memory.samples[0] / 1024, 1) if memory.samples else None,
                    "peak_vmhwm": round(peak_kb / 1024, 1),
                    "max_sampled": round(max(memory.samples) / 1024, 1),
                    f"steady_after_{args.idle:g}s_idle": round(steady_kb / 1024, 1),
                },
                "daemon_cpu_seconds_until_verified": round(cpu1 - cpu0, 1),
                "daemon_events": notable(daemon.events[since:]),
                "non_json_lines": len(daemon.not_json),
                "non_json_examples": [line[:300] for line in daemon.not_json[:3]],
                "tracebacks": sum(1 for line in daemon.stderr_text if "Traceback" in line),
                "exit_code_at_sigterm": exit_code,
            }
        )
    finally:
        if prober is not None and prober.poll() is None:
            prober.kill()
        if daemon is not None and daemon.proc.poll() is None:
            daemon.kill()
        sim.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        return probe(sys.argv[2], Path(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 runs, a fast check")
    parser.add_argument("--mode", choices=["copy", "rename", "both"], default="copy")
    parser.add_argument("--tick", default="5s")
    parser.add_argument("--stability", default="10s", help="STABILITY_INTERVAL")
    parser.add_argument("--burst", type=int, default=500, help="files per burst (copy)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds before steady RSS")
    parser.add_argument("--within", type=float, default=900.0, help="give up after (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--profile", help="py-spy speedscope profile of the daemon to this file")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1000
    load_before = load_average()
    modes = ["copy", "rename"] if args.mode == "both" else [args.mode]
    results = []
    for mode in modes:
        results.append(burst(mode, args))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "rounds"}), file=sys.stderr)
    print(
        json.dumps(
            {
                "command": f"python bench/burst.py --runs {args.runs} --mode {args.mode} "
                f"--tick {args.tick} --stability {args.stability} --burst {args.burst}",
                "machine": machine(),
                "load_average_before": load_before,
                "load_average_after": load_average(),
                "results": results,
            },
            indent=2,
        )
    )
    ok = all(r.get("verified_exact") == args.runs and not r.get("non_json_lines") for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

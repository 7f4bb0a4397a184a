"""`tokensettle demo`: the daemon's story on the built-in simulator, in about 20 seconds.

The simulator holds the provider's truth, which shows up a few seconds late and sometimes
grows once. A fake experiment writes runs of three frameworks over a few seconds (tokens
at 0, as real benchmarks do), two of them overlapping on one key, plus one truncated
file. The real `tokensettle run` process watches the tree with compressed timings; its
log lines are shown as they come, then a final table compares the files with the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tokensettle.errors import EXIT_USAGE, CommandError
from tokensettle.render import table
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator

DEMO_DIR = Path("demo-runs")
FRAMEWORKS = {
    "chatdev": "key_chatdevDEMO0001",
    "baes": "key_baesDEMO000002",
    "ghspec": "key_ghspecDEMO0003",
}
PROJECT = "proj_demo"
MODEL = "gpt-4o-mini-2024-07-18"
TIMINGS = {
    "TOKENSETTLE_MIN_AGE": "2s",
    "TOKENSETTLE_STABILITY_INTERVAL": "3s",
    "TOKENSETTLE_TICK": "1s",
    "TOKENSETTLE_SETTLE_DELAY": "1s",
    "TOKENSETTLE_MAX_BACKOFF": "2s",
    "TOKENSETTLE_RETRY_DELAY": "1s",
}
SHOWN_EVENTS = {"daemon.ready", "run.scheduled", "run.polled", "run.settled", "run.unreadable"}


@dataclass
class DemoRun:
    framework: str
    run_id: str
    path: Path
    doc: dict[str, Any]
    truth_in: int = 0
    truth_out: int = 0
    truth_calls: int = 0
    expect: str = "verified"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(ts))


def plan_experiment(
    root: Path, now: float, rng: random.Random
) -> tuple[list[DemoRun], list[dict[str, Any]]]:
    """Run documents as a benchmark writes them, and the usage the provider recorded."""
    runs: list[DemoRun] = []
    requests: list[dict[str, Any]] = []
    start = int(now) - 3600
    for i in range(7):
        framework = list(FRAMEWORKS)[i % 3]
        if i == 6:  # started while chatdev run 3 was still going: they share a key
            framework, start = "chatdev", runs[3].doc["steps"][0]["start_timestamp"] + 90
        steps, t = [], start
        for _ in range(4):
            length = rng.randint(20, 140)
            steps.append((t, t + length))
            t += length + rng.randint(1, 3)
        start = steps[-1][1] + rng.randint(150, 400)
        run_id = f"demo-{framework}-{i:02d}"
        run = DemoRun(framework, run_id, root / framework / run_id / "metrics.json", {})
        run.expect = "ambiguous" if i in (3, 6) else "verified"
        for s, e in steps:
            for _ in range(rng.randint(1, 4)):
                tin, tout = rng.randint(800, 9000), rng.randint(100, 2500)
                delay = rng.uniform(1.0, 6.0)
                final = {
                    "input_tokens": tin,
                    "output_tokens": tout,
                    "num_model_requests": 1,
                    "input_cached_tokens": min(rng.choice([0, 0, 1024, 2048]), tin),
                }
                grows = rng.random() < 0.3
                first = {**final, "input_tokens": tin // 2, "output_tokens": tout // 2}
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
                run.truth_in += tin
                run.truth_out += tout
                run.truth_calls += 1
        run.doc = {
            "run_id": run_id,
            "model": "gpt-4o-mini",
            "start_timestamp": _iso(steps[0][0]),
            "end_timestamp": _iso(steps[-1][1]),
            "steps": [
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
                for n, (s, e) in enumerate(steps, 1)
            ],
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
        runs.append(run)
    return runs, requests


def _write(path: Path, text: str) -> None:
    """As benchmarks do: temp file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".metrics.json.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _brief(event: dict[str, Any], started: float) -> str | None:
    name = event.get("event")
    if name not in SHOWN_EVENTS:
        return None
    who = f"{event.get('framework', '')}/{event.get('run_id', '')}"
    if name == "run.polled":
        detail = f"{event['status']:<18} {event['tokens_in']:>7,} in {event['tokens_out']:>6,} out"
    elif name == "run.scheduled":
        detail = f"{event['status']:<18} attempts={event['attempts']}"
    elif name == "run.settled":
        detail = f"{event['status']:<18} {event['tokens_in']:>7,} in {event['tokens_out']:>6,} out"
    elif name == "run.unreadable":
        who, detail = Path(str(event.get("path"))).parent.name, str(event.get("reason"))
    else:
        who, detail = "", f"watching, {event.get('tracked')} run(s) known"
    return f"  {time.monotonic() - started:5.1f}s  {name:<15} {who:<22} {detail}"


async def _follow(stream: asyncio.StreamReader, started: float) -> None:
    while line := await stream.readline():
        try:
            event = json.loads(line)
        except ValueError:
            _say(f"  {line.decode().rstrip()}")
            continue
        brief = _brief(event, started)
        if brief:
            _say(brief)


async def _demo(root: Path) -> int:
    rng = random.Random(7)
    started = time.monotonic()
    state = root.parent / f".{root.name}-state"
    shutil.rmtree(state, ignore_errors=True)
    async with RunningSimulator() as sim, aiohttp.ClientSession() as session:
        runs, requests = plan_experiment(root, time.time(), rng)
        async with session.post(f"{sim.root_url}/_sim/requests", json={"requests": requests}) as r:
            r.raise_for_status()
        _say(f"simulator  {sim.base_url}: {len(requests)} requests, visible 1-6 s late, some grow")
        http = f"127.0.0.1:{_free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))}
        env.update(
            TIMINGS,
            TOKENSETTLE_RUNS_DIRS=str(root),
            TOKENSETTLE_API_BASE_URL=sim.base_url,
            TOKENSETTLE_ADMIN_KEY=SIMULATOR_ADMIN_KEY,
            TOKENSETTLE_STATE_DIR=str(state),
            TOKENSETTLE_HTTP_ADDR=http,
            TOKENSETTLE_LOG_FORMAT="json",
            **{f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in FRAMEWORKS.items()},
        )
        exe = shutil.which("tokensettle", path=str(Path(sys.executable).parent)) or "tokensettle"
        _say(
            f"daemon     tokensettle run  (min age 2s, stability interval 3s, tick 1s; http {http})"
        )
        _say("")
        daemon = await asyncio.create_subprocess_exec(
            exe, "run", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert daemon.stdout is not None
        follower = asyncio.create_task(_follow(daemon.stdout, started))
        try:
            # The fake experiment: one run file every 0.6 s, then a truncated one.
            for run in runs:
                await asyncio.sleep(0.6)
                _write(run.path, json.dumps(run.doc, indent=2))
            broken = root / "baes" / "demo-broken" / "metrics.json"
            _write(broken, '{"run_id": "demo-broken", "steps": [')
            broken_bytes = broken.read_bytes()
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                async with session.get(f"http://{http}/runs") as resp:
                    pending = [r for r in (await resp.json())["runs"] if r["status"] != "error"]
                if not pending and all(r.path.exists() for r in runs):
                    break
                await asyncio.sleep(0.5)
            async with session.get(f"http://{http}/healthz") as resp:
                health = await resp.json()
            total_requests = (await (await session.get(f"{sim.root_url}/_sim/stats")).json())[
                "usage_requests"
            ]
        finally:
            if daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
            code = await daemon.wait()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    shutil.rmtree(state, ignore_errors=True)

    rows, ok = [], True
    for run in runs:
        doc = json.loads(run.path.read_text())
        agg, block = doc["aggregate_metrics"], doc.get("usage_api_reconciliation", {})
        status = block.get("verification_status", "-")
        got = (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"])
        exact = got == (run.truth_in, run.truth_out, run.truth_calls)
        # Overlapping runs: each one's total is a split of shared minutes, flagged as such.
        ok = ok and status == run.expect and (exact or run.expect == "ambiguous")
        shared = block.get("attribution", {}).get("apportioned_fraction", 0.0)
        rows.append(
            [
                run.framework,
                run.run_id,
                status,
                f"{agg['TOK_IN']:,}",
                f"{agg['TOK_OUT']:,}",
                f"{run.truth_in:,}/{run.truth_out:,}",
                "yes" if exact else f"no ({shared:.0%} shared)",
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
                "TRUTH IN/OUT",
                "EXACT",
                "ATTEMPTS",
            ],
            rows,
        )
    )
    _say(f"\ntruncated file left byte-identical: {'yes' if untouched else 'NO'}")
    _say(f"daemon healthy at the end: {health['status']}; stopped with SIGTERM, exit code {code}")
    elapsed = time.monotonic() - started
    _say(f"{total_requests} Usage API requests for {len(runs)} runs, {elapsed:.1f} s")
    _say(f"inspect: {root}/<framework>/<run>/metrics.json ('usage_api_reconciliation' block)")
    return 0 if ok and untouched and code == 0 and health["status"] == "ok" else 1


def run_demo(root: Path = DEMO_DIR) -> int:
    try:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
    except OSError as exc:
        try:
            where = root.absolute()
        except OSError:  # the working directory itself is gone
            where = root
        raise CommandError(
            f"demo: cannot create {where} ({exc.strerror or exc}); run it from a "
            "directory you can write, e.g. cd /tmp (in Docker: docker run -w /tmp IMAGE demo)",
            EXIT_USAGE,
        ) from None
    return asyncio.run(_demo(root))

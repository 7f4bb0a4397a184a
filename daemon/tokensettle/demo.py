"""`tokensettle demo`: the daemon's story on the built-in simulator, in about 20 seconds.

The simulator holds the provider's truth, which shows up a few seconds late. One real
`tokensettle run` process watches the tree with compressed timings; its log lines are
shown as they come, each under the act it belongs to, and a final table per act compares
the files with the truth. The story is a list of acts (`ACTS`) on the same simulator and
daemon:

1. a fake experiment writes runs of three frameworks (tokens at 0, as benchmarks do), two
   of them overlapping on one key, plus one truncated file, with usage that sometimes
   grows once;
2. four real experiment processes of one framework call the simulator's model at the same
   time with the framework's one key: minute buckets cannot tell them apart (`ambiguous`);
3. the same four with `tokensettle lease exec`, a key each: exact, `verified`, and the
   keys are deleted once the runs are settled.

An act is an `Act`: `setup` (simulator state, daemon settings, its run names) before the
daemon starts, `play` (start its runs, return them with their truth) and `finish` (its own
checks once they are settled). Each act's `play` starts when the one before has started
its runs, so acts overlap in time and adding one costs little; add it to `ACTS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from tokensettle.errors import EXIT_USAGE, CommandError
from tokensettle.render import table
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator
from tokensettle.usage_scope import SCOPE_FILE

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
    # The daily bill check reads usage too; the demo counts the requests runs cost.
    "TOKENSETTLE_BILL_CHECK_INTERVAL": "0s",
}
SHOWN_EVENTS = {
    "daemon.ready",
    "run.scheduled",
    "run.polled",
    "run.settled",
    "run.unreadable",
    "lease.created",
    "lease.revoked",
}
#: How long an act may take to settle before the demo says it did not check out.
ACT_DEADLINE = 40.0


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


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_name(event: dict[str, Any]) -> str | None:
    """The run directory's name an event is about, if any."""
    if event.get("run_dir"):
        return Path(str(event["run_dir"])).name
    if event.get("path"):
        return Path(str(event["path"])).parent.name
    run_id = event.get("run_id")
    return str(run_id) if run_id is not None else None


def _who(event: dict[str, Any]) -> str:
    run_dir = event.get("run_dir")
    if run_dir:  # lease lines name the run by its directory
        return f"{event.get('framework') or Path(run_dir).parent.name}/{Path(run_dir).name}"
    return f"{event.get('framework', '')}/{event.get('run_id', '')}"


def _brief(event: dict[str, Any], started: float) -> str | None:
    name = event.get("event")
    if name not in SHOWN_EVENTS:
        return None
    who = _who(event)
    if name in ("run.polled", "run.settled"):
        detail = f"{event['status']:<18} {event['tokens_in']:>7,} in {event['tokens_out']:>6,} out"
    elif name == "run.scheduled":
        detail = f"{event['status']:<18} attempts={event['attempts']}"
    elif name == "run.unreadable":
        who, detail = Path(str(event.get("path"))).parent.name, str(event.get("reason"))
    elif name == "lease.created":
        detail = f"key {event.get('key_id')} (lease exec, before the command starts)"
    elif name == "lease.revoked":
        detail = f"key {event.get('key_id')} deleted (its run is settled)"
    else:
        who, detail = "", f"watching, {event.get('tracked')} run(s) known"
    return f"  {time.monotonic() - started:5.1f}s  {name:<15} {who:<22} {detail}"


class Log:
    """The JSON lines of the daemon and of the commands the acts start, kept so an act can
    wait for the lines it expects, and shown as they come under the act they belong to:
    the lines of an act that started early (while the one before it settles) are held
    until its own heading is shown."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.events: list[dict[str, Any]] = []
        self.acts: list[Act] = []
        self._shown: set[int] = set()
        self._held: dict[int, list[str]] = {}
        self._changed = asyncio.Condition()

    def _owner(self, event: dict[str, Any]) -> int | None:
        name = _run_name(event)
        for n, act in enumerate(self.acts):
            if name in act.run_ids:
                return n
        return None

    async def add(self, event: dict[str, Any]) -> None:
        brief = _brief(event, self.started)
        if brief:
            owner = self._owner(event)
            if owner is None or owner in self._shown:
                _say(brief)
            else:
                self._held.setdefault(owner, []).append(brief)
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def show(self, n: int, heading: str) -> None:
        """Act `n`'s heading, then the lines it had so far; its later lines as they come."""
        _say(heading)
        self._shown.add(n)
        for line in self._held.pop(n, []):
            _say(line)

    async def follow(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            try:
                event = json.loads(line)
            except ValueError:
                _say(f"  {line.decode(errors='replace').rstrip()}")
                continue
            if isinstance(event, dict):
                await self.add(event)

    def find(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait(self, done: Callable[[], bool], within: float) -> bool:
        """Until `done()` holds (True) or `within` seconds pass (False)."""
        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(done)
        except TimeoutError:
            return False
        return True


@dataclass
class Stage:
    """What the acts play on: the run tree, the simulator, the daemon's log and settings."""

    root: Path
    state: Path
    sim: RunningSimulator
    session: aiohttp.ClientSession
    log: Log
    exe: str
    env: dict[str, str] = field(default_factory=dict)

    async def post(self, path: str, body: dict[str, Any]) -> None:
        async with self.session.post(f"{self.sim.root_url}{path}", json=body) as resp:
            resp.raise_for_status()

    async def get(self, path: str) -> Any:
        async with self.session.get(f"{self.sim.root_url}{path}") as resp:
            resp.raise_for_status()
            return await resp.json()


class Act:
    """One part of the story. `setup` runs before the daemon starts (simulator state,
    settings in `stage.env`) and names the act's runs (`run_ids`: directory names, so its
    log lines are shown under it); `play` starts the runs and returns them with their
    truth, and the next act's `play` starts then, while these settle; once each is
    settled, `finish` adds the act's own checks, as (line, passed)."""

    title: ClassVar[str]
    run_ids: frozenset[str] = frozenset()

    async def setup(self, stage: Stage) -> None:
        return None

    async def play(self, stage: Stage) -> list[DemoRun]:
        raise NotImplementedError

    async def finish(self, stage: Stage, runs: list[DemoRun]) -> list[tuple[str, bool]]:
        return []


def _write(path: Path, text: str) -> None:
    """As benchmarks do: temp file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".metrics.json.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


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


class SettlingAct(Act):
    """Act 1: runs of three frameworks written one after another, two of them overlapping
    on one key, and a truncated file that must be left as it is."""

    title = "runs of three frameworks, two overlapping on one key, and a truncated file"

    def __init__(self) -> None:
        self.broken_bytes = b""

    async def setup(self, stage: Stage) -> None:
        self.runs, requests = plan_experiment(stage.root, time.time(), random.Random(7))
        self.run_ids = frozenset({*(r.run_id for r in self.runs), "demo-broken"})
        await stage.post("/_sim/requests", {"requests": requests})
        stage.env.update({f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in FRAMEWORKS.items()})
        _say(f"simulator  {len(requests)} requests for act 1, visible 1-6 s late, some grow")

    async def play(self, stage: Stage) -> list[DemoRun]:
        # The fake experiment: one run file every 0.6 s, then a truncated one.
        for run in self.runs:
            await asyncio.sleep(0.6)
            _write(run.path, json.dumps(run.doc, indent=2))
        self.broken = stage.root / "baes" / "demo-broken" / "metrics.json"
        _write(self.broken, '{"run_id": "demo-broken", "steps": [')
        self.broken_bytes = self.broken.read_bytes()
        return self.runs

    async def finish(self, stage: Stage, runs: list[DemoRun]) -> list[tuple[str, bool]]:
        untouched = self.broken.read_bytes() == self.broken_bytes
        return [(f"truncated file left byte-identical: {'yes' if untouched else 'NO'}", untouched)]


#: One experiment process: `calls` model calls with its key, a pause after each, then the
#: run file (tokens at 0) into TOKENSETTLE_RUN_DIR, and what its calls were given on stdout.
EXPERIMENT = r"""
import json, os, sys, time, urllib.request
index, calls, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
run_dir = os.environ["TOKENSETTLE_RUN_DIR"]
steps, used = [], {"tokens_in": 0, "tokens_out": 0, "calls": 0}
for i in range(calls):
    start = time.time()
    body = {"model": "gpt-4o-mini", "max_completion_tokens": 40 + 13 * index + 5 * i,
            "messages": [{"role": "user", "content": "Plan step %d of task %d. " % (i, index)
                          * (40 + 17 * index + 3 * i)}]}
    req = urllib.request.Request(os.environ["DEMO_MODEL_URL"] + "/chat/completions",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json",
        "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
    with urllib.request.urlopen(req, timeout=10) as resp:
        usage = json.load(resp)["usage"]
    used["tokens_in"] += usage["prompt_tokens"]
    used["tokens_out"] += usage["completion_tokens"]
    used["calls"] += 1
    time.sleep(gap)
    steps.append({"step_number": i + 1, "start_timestamp": start, "end_timestamp": time.time(),
                  "tokens_in": 0, "tokens_out": 0, "api_calls": 0})
iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
doc = {"run_id": os.path.basename(run_dir), "model": "gpt-4o-mini",
       "start_timestamp": iso(steps[0]["start_timestamp"]),
       "end_timestamp": iso(steps[-1]["end_timestamp"]), "steps": steps,
       "aggregate_metrics": {"AUTR": 1.0, "TOK_IN": 0, "TOK_OUT": 0, "API_CALLS": 0,
                             "CACHED_TOKENS": 0, "AEI": 0.0},
       "verification_status": "pending"}
os.makedirs(run_dir, exist_ok=True)
tmp = os.path.join(run_dir, ".metrics.json.partial")
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
os.replace(tmp, os.path.join(run_dir, "metrics.json"))
print(json.dumps(used), flush=True)
"""
PARALLEL_RUNS = 4
CALLS, GAP = 3, 0.3
#: The framework's one project key (a user's key, shared by its runs) and its value.
SHARED_KEY_VALUE = "sk-proj-demo-chatdev-shared-0001"


async def _model_project(stage: Stage, **extra: Any) -> None:
    """The simulator's project for model calls (and leases), with usage visible 1 s after
    a call; `extra` adds e.g. static keys."""
    body = {"projects": [{"id": PROJECT, "name": "Demo experiments"}], "usage_delay": 1, **extra}
    await stage.post("/_sim/admin", body)


class ParallelAct(Act):
    """Act 2: a few runs of one framework in parallel, each a real process calling the
    simulator's model with the framework's one key."""

    title = (
        f"{PARALLEL_RUNS} experiments of chatdev at once on its one key: minute buckets "
        "cannot tell them apart"
    )
    framework = "chatdev"
    prefix = "shared"
    expect = "ambiguous"

    def __init__(self) -> None:
        self.run_ids = frozenset(f"{self.prefix}-{i}" for i in range(1, PARALLEL_RUNS + 1))

    async def setup(self, stage: Stage) -> None:
        shared = {
            "id": FRAMEWORKS[self.framework],
            "value": SHARED_KEY_VALUE,
            "project_id": PROJECT,
        }
        await _model_project(stage, api_keys=[shared])

    def command(self, stage: Stage, index: int, run_dir: Path) -> tuple[list[str], dict[str, str]]:
        env = {
            **_clean_environ(),
            "OPENAI_API_KEY": SHARED_KEY_VALUE,
            "TOKENSETTLE_RUN_DIR": str(run_dir),
        }
        return [sys.executable, "-c", EXPERIMENT, str(index), str(CALLS), str(GAP)], env

    async def play(self, stage: Stage) -> list[DemoRun]:
        dirs = [stage.root / self.framework / name for name in sorted(self.run_ids)]
        procs = []
        for i, run_dir in enumerate(dirs, 1):
            argv, env = self.command(stage, i, run_dir)
            env["DEMO_MODEL_URL"] = stage.sim.base_url
            procs.append(
                await asyncio.create_subprocess_exec(
                    *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
                )
            )
        outputs = await asyncio.gather(*(self._output(stage, p) for p in procs))
        runs = []
        for run_dir, (code, used) in zip(dirs, outputs, strict=True):
            run = DemoRun(self.framework, run_dir.name, run_dir / "metrics.json", {})
            run.expect = self.expect if code == 0 else "experiment failed"
            run.truth_in, run.truth_out = used.get("tokens_in", 0), used.get("tokens_out", 0)
            run.truth_calls = used.get("calls", 0)
            runs.append(run)
        return runs

    async def finish(self, stage: Stage, runs: list[DemoRun]) -> list[tuple[str, bool]]:
        written = [0, 0]
        for run in runs:
            with contextlib.suppress(OSError, ValueError, KeyError):
                agg = json.loads(run.path.read_text())["aggregate_metrics"]
                written = [written[0] + agg["TOK_IN"], written[1] + agg["TOK_OUT"]]
        truth = [sum(r.truth_in for r in runs), sum(r.truth_out for r in runs)]
        return [
            (
                f"together {written[0]:,} in / {written[1]:,} out, the truth {truth[0]:,} / "
                f"{truth[1]:,}: the minutes hold the sum, not who made it",
                written == truth,
            )
        ]

    async def _output(
        self, stage: Stage, proc: asyncio.subprocess.Process
    ) -> tuple[int, dict[str, Any]]:
        """The experiment's own line on stdout; the command's log lines (stderr) to the log."""
        assert proc.stdout is not None
        assert proc.stderr is not None
        logs = asyncio.create_task(stage.log.follow(proc.stderr))
        out = await proc.stdout.read()
        await logs
        code = await proc.wait()
        try:
            used = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            used = {}
        return code, used if isinstance(used, dict) else {}


class LeasedAct(ParallelAct):
    """Act 3: the same experiments, each started with `tokensettle lease exec`: a key of
    its own, minted before it starts and deleted once its run is settled."""

    title = (
        f"the same {PARALLEL_RUNS} with `tokensettle lease exec`: a key each, exact, and the "
        "keys deleted"
    )
    prefix = "leased"
    expect = "verified"

    async def setup(self, stage: Stage) -> None:
        await _model_project(stage)
        stage.env["TOKENSETTLE_LEASE_PROJECT"] = PROJECT  # where `lease exec` mints keys

    def command(self, stage: Stage, index: int, run_dir: Path) -> tuple[list[str], dict[str, str]]:
        argv, _ = super().command(stage, index, run_dir)
        lease = [stage.exe, "lease", "exec", "--framework", self.framework]
        return [*lease, "--run-dir", str(run_dir), "--", *argv], dict(stage.env)

    async def finish(self, stage: Stage, runs: list[DemoRun]) -> list[tuple[str, bool]]:
        keys = {}
        for run in runs:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                declared = json.loads((run.path.parent / SCOPE_FILE).read_text())
                keys[run.run_id] = declared["lease"]["key_id"]
        await stage.log.wait(
            lambda: all(stage.log.find("lease.revoked", key_id=k) for k in keys.values()), 15
        )
        revoked = {e["key_id"] for e in stage.log.find("lease.revoked")}
        admin = await stage.get("/_sim/admin")
        state = {k["id"]: k["state"] for k in admin["keys"]}
        calls = await stage.get("/_sim/admin/log")
        created = sum(c["method"] == "POST" and c["path"].endswith("/api_keys") for c in calls)
        deleted = sum(c["method"] == "DELETE" for c in calls)
        lines = [
            (
                f"{run_id}: {SCOPE_FILE} declares {key}; "
                f"{'revoked' if key in revoked else 'NOT revoked'}, "
                f"simulator says {state.get(key, 'unknown')}",
                key in revoked and state.get(key) == "deleted",
            )
            for run_id, key in sorted(keys.items())
        ]
        lines.append(
            (
                f"Admin API: {created} keys created, {deleted} deleted for {len(runs)} runs",
                len(keys) == len(runs) and created == deleted == len(runs),
            )
        )
        return lines


ACTS: list[Callable[[], Act]] = [SettlingAct, ParallelAct, LeasedAct]


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))}


def _settled(log: Log, runs: list[DemoRun]) -> bool:
    return all(log.find("run.settled", framework=r.framework, run_id=r.run_id) for r in runs)


def _exact_cell(block: dict[str, Any], exact: bool) -> str:
    if exact:
        return "yes"
    attribution = block.get("attribution", {})
    shared = attribution.get("apportioned_fraction", 0.0)
    minutes = attribution.get("shared_minutes", 0)
    others = len(block.get("overlaps", []))
    # Overlapping runs: each one's total is a split of shared minutes, flagged as such.
    return f"no: {shared:.0%} in {minutes} min shared with {others} run(s)"


def _report(title: str, runs: list[DemoRun]) -> bool:
    rows, ok = [], True
    for run in runs:
        try:
            doc = json.loads(run.path.read_text())
        except (OSError, ValueError):
            doc = {}
        agg = doc.get("aggregate_metrics", {})
        block = doc.get("usage_api_reconciliation", {})
        status = block.get("verification_status", "-")
        got = (agg.get("TOK_IN"), agg.get("TOK_OUT"), agg.get("API_CALLS"))
        exact = got == (run.truth_in, run.truth_out, run.truth_calls)
        ok = ok and status == run.expect and (exact or run.expect == "ambiguous")
        rows.append(
            [
                run.framework,
                run.run_id,
                status,
                f"{agg.get('TOK_IN', 0):,}",
                f"{agg.get('TOK_OUT', 0):,}",
                f"{run.truth_in:,}/{run.truth_out:,}",
                _exact_cell(block, exact),
                str(len(block.get("attempts", []))),
            ]
        )
    headers = ["FRAMEWORK", "RUN", "STATUS", "TOK_IN", "TOK_OUT", "TRUTH IN/OUT", "EXACT"]
    _say(f"\n{title}")
    _say(table([*headers, "ATTEMPTS"], rows))
    return ok


Played = tuple[Act, list[DemoRun], list[tuple[str, bool]]]


async def _play(stage: Stage, acts: list[Act]) -> list[Played]:
    """Each act's `play` starts once the one before has started its runs, so an act's
    processes start while the runs before it settle; each act is shown, waited for and
    finished in turn."""
    runs: dict[int, list[DemoRun]] = {}
    began: dict[int, float] = {}
    started = [asyncio.Event() for _ in acts]

    async def in_turn() -> None:
        for n, act in enumerate(acts):
            began[n] = time.monotonic() - stage.log.started
            runs[n] = await act.play(stage)
            started[n].set()

    player = asyncio.create_task(in_turn())
    played: list[Played] = []
    try:
        for n, act in enumerate(acts):
            waiter = asyncio.create_task(started[n].wait())
            await asyncio.wait({waiter, player}, return_when=asyncio.FIRST_COMPLETED)
            if not started[n].is_set():
                waiter.cancel()
                player.result()  # play raised: let it be seen
            early = f" (started at {began[n]:.1f}s, while act {n} settled)" if n else ""
            stage.log.show(n, f"\nact {n + 1}: {act.title}{early}")
            await stage.log.wait(functools.partial(_settled, stage.log, runs[n]), ACT_DEADLINE)
            played.append((act, runs[n], await act.finish(stage, runs[n])))
    finally:
        if not player.done():
            player.cancel()
    return played


async def _demo(root: Path) -> int:
    started = time.monotonic()
    state = root.parent / f".{root.name}-state"
    shutil.rmtree(state, ignore_errors=True)
    exe = shutil.which("tokensettle", path=str(Path(sys.executable).parent)) or "tokensettle"
    acts = [make() for make in ACTS]
    played: list[Played] = []
    async with RunningSimulator() as sim, aiohttp.ClientSession() as session:
        http = f"127.0.0.1:{_free_port()}"
        stage = Stage(root, state, sim, session, Log(started), exe)
        stage.log.acts = acts
        stage.env.update(
            _clean_environ(),
            TOKENSETTLE_RUNS_DIRS=str(root),
            TOKENSETTLE_API_BASE_URL=sim.base_url,
            TOKENSETTLE_ADMIN_KEY=SIMULATOR_ADMIN_KEY,
            TOKENSETTLE_STATE_DIR=str(state),
            TOKENSETTLE_HTTP_ADDR=http,
            TOKENSETTLE_LOG_FORMAT="json",
            **TIMINGS,
        )
        _say(f"simulator  {sim.base_url}: the Usage API, the Admin API and a model endpoint")
        for act in acts:
            await act.setup(stage)
        _say(
            f"daemon     tokensettle run  (min age 2s, stability interval 3s, tick 1s; http {http})"
        )
        daemon = await asyncio.create_subprocess_exec(
            exe,
            "run",
            env=stage.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert daemon.stdout is not None
        follower = asyncio.create_task(stage.log.follow(daemon.stdout))
        health: dict[str, Any] = {"status": "not reached"}
        try:
            await stage.log.wait(lambda: bool(stage.log.find("daemon.ready")), 30)
            played = await _play(stage, acts)
            async with session.get(f"http://{http}/healthz") as resp:
                health = await resp.json()
            total_requests = (await stage.get("/_sim/stats"))["usage_requests"]
        finally:
            if daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
            code = await daemon.wait()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    shutil.rmtree(state, ignore_errors=True)

    ok = True
    _say("\nfinal state of the run files:")
    for n, (act, runs, checks) in enumerate(played, 1):
        ok = _report(f"act {n}: {act.title}", runs) and ok
        for line, passed in checks:
            _say(f"  {line}")
            ok = ok and passed
    n_runs = sum(len(runs) for _, runs, _ in played)
    _say(f"\ndaemon healthy at the end: {health['status']}; stopped with SIGTERM, exit code {code}")
    elapsed = time.monotonic() - started
    _say(f"{total_requests} Usage API requests for {n_runs} runs, {elapsed:.1f} s")
    _say(f"inspect: {root}/<framework>/<run>/metrics.json ('usage_api_reconciliation' block)")
    return 0 if ok and code == 0 and health["status"] == "ok" else 1


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

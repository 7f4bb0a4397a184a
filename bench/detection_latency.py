"""Benchmark: a run file written -> the daemon's `run.scheduled` for it.

Starts `tokensettle run` (default timings: SETTLE_DELAY 2s, TICK 1m, MIN_AGE 30m, so
nothing is polled while we measure) on an empty root, then writes N run files one by one
at a steady pace with each writer in turn:

- `inplace`: open / write / close into a run directory created when the "run started"
  (before the daemon), as most benchmarks write metrics.json;
- `rename`: `metrics.json.tmp` in the same directory, then `os.replace`;
- `newdir`: `os.makedirs` of the run directory, then the file written at once.

Latency = the daemon's `run.scheduled` log timestamp for that path (structlog ISO UTC,
microseconds) minus the writer's `time.time()` taken just after close()/os.replace().
Both clocks are the same host clock. Goal: p99 < 100 ms.

    .venv/bin/python bench/detection_latency.py [--files 300] [--interval 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import BIN, free_port, fresh_aggregates, pct
from common import iso_z as iso

WRITERS = {"inplace": "chatdev", "rename": "baes", "newdir": "ghspec"}


def parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_bytes(run_id: str, end: float) -> bytes:
    """A fresh run file as benchmarks write it: three steps, tokens at 0, indent=2."""
    start = end - 180
    steps = [
        {
            "step_number": k + 1,
            "duration_seconds": 60.0,
            "success": True,
            "tokens_in": 0,
            "tokens_out": 0,
            "api_calls": 0,
            "cached_tokens": 0,
            "start_timestamp": start + 60 * k,
            "end_timestamp": start + 60 * (k + 1),
        }
        for k in range(3)
    ]
    doc = {
        "run_id": run_id,
        "model": "gpt-4o-mini",
        "start_timestamp": iso(start),
        "end_timestamp": iso(end),
        "steps": steps,
        "aggregate_metrics": fresh_aggregates(),
        "verification_status": "pending",
    }
    return json.dumps(doc, indent=2).encode()


def write(kind: str, path: Path, data: bytes) -> float:
    if kind == "inplace":
        with open(path, "wb") as f:
            f.write(data)
    elif kind == "rename":
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        os.makedirs(path.parent)
        with open(path, "wb") as f:
            f.write(data)
    return time.time()


class Scheduled:
    """Reads the daemon's stdout in a thread; keeps the first `run.scheduled` time per path."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.at: dict[str, float] = {}
        self.ready = threading.Event()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = event.get("event")
            if name == "daemon.ready":
                self.ready.set()
            elif name == "run.scheduled":
                with self.cond:
                    self.at.setdefault(event["path"], parse_ts(event["timestamp"]))
                    self.cond.notify_all()

    def wait_all(self, paths: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(p in self.at for p in paths):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.cond.wait(remaining)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="files per writer")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between files")
    parser.add_argument("--writers", default=",".join(WRITERS))
    parser.add_argument(
        "--no-bill-check",
        action="store_true",
        help="BILL_CHECK_INTERVAL=0s: the daily bill check's first run (against an API "
        "that is not there) holds the daemon's step, and the first writer's files, for seconds",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokensettle-detect-"))
    root, state = work / "runs", work / "state"
    root.mkdir()
    state.mkdir()
    kinds = [k for k in args.writers.split(",") if k]
    now = time.time()
    plan: dict[str, list[Path]] = {}
    for kind in kinds:
        fw = WRITERS[kind]
        plan[kind] = [root / fw / f"{kind}-{i:05d}" / "metrics.json" for i in range(args.files)]
        if kind != "newdir":  # run directories made when the runs started
            for path in plan[kind]:
                path.parent.mkdir(parents=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))},
        "TOKENSETTLE_RUNS_DIRS": str(root),
        "TOKENSETTLE_API_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",  # never called
        "TOKENSETTLE_ADMIN_KEY": "sk-admin-simulator-0000",
        "TOKENSETTLE_STATE_DIR": str(state),
        "TOKENSETTLE_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "TOKENSETTLE_LOG_FORMAT": "json",
        **({"TOKENSETTLE_BILL_CHECK_INTERVAL": "0s"} if args.no_bill_check else {}),
    }
    proc = subprocess.Popen(
        [str(BIN / "tokensettle"), "run"], env=env, stdout=subprocess.PIPE, cwd=work
    )
    results: dict[str, Any] = {}
    try:
        reader = Scheduled(proc)
        if not reader.ready.wait(60):
            raise RuntimeError("daemon not ready within 60 s")
        for kind in kinds:
            written: dict[str, float] = {}
            t0 = time.monotonic() + 0.5
            for i, path in enumerate(plan[kind]):
                delay = t0 + i * args.interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                written[str(path)] = write(kind, path, run_bytes(path.parent.name, now - 120))
            # 35 s: longer than the loop's longest sleep (30 s), so a late look still counts.
            reader.wait_all(list(written), 35)
            lat = [(reader.at[p] - t) * 1000 for p, t in written.items() if p in reader.at]
            results[kind] = {
                "files": len(written),
                "missed": len(written) - len(lat),
                "p50_ms": round(pct(lat, 50), 1),
                "p90_ms": round(pct(lat, 90), 1),
                "p99_ms": round(pct(lat, 99), 1),
                "max_ms": round(max(lat), 1),
                "over_100ms": sum(1 for v in lat if v > 100),
                "over_1s": sum(1 for v in lat if v > 1000),
            }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "command": f"python bench/detection_latency.py --files {args.files} "
                f"--interval {args.interval} --writers {args.writers}"
                + (" --no-bill-check" if args.no_bill_check else ""),
                "machine": (
                    f"{platform.machine()}, {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}"
                ),
                "settings": "defaults (SETTLE_DELAY 2s, TICK 1m, MIN_AGE 30m): no polls",
                "results": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

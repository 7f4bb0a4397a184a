"""Benchmark: an idle daemon watching 100,000 run directories (inotify).

Checks /proc/sys/fs/inotify/max_user_watches against the tree (one watch per directory),
writes N finished (verified) runs under three frameworks, starts `tokensettle run` once
to build the index and stops it, then starts it again (a service restart) and, from its
`daemon.ready` line, leaves it alone for `--idle` seconds. Reported:

- CPU % of one core over the idle window, from utime+stime deltas in /proc/<pid>/stat,
  also per 10-second slice (to tell a start-up tail from a steady load);
- peak RSS (VmHWM in /proc/<pid>/status) and the RSS at the end (VmRSS);
- the log events seen while idle (there should be none).

Goals: < 1 % of a core, < 150 MB peak RSS. The tree is deleted at the end.

    .venv/bin/python bench/idle_watch.py [--runs 100000] [--idle 60]
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
from collections import Counter
from pathlib import Path
from typing import Any

from common import BIN, cpu_seconds, free_port, status_kb

FRAMEWORKS = {"chatdev": "key_chatdevBENCH01", "baes": "key_baesBENCH00002", "ghspec": "key_gh3"}


def generate(root: Path, n: int) -> float:
    """N verified runs (a compact settled file, ~1 KB), ending over the last 30 days."""
    started = time.perf_counter()
    now = time.time()
    fws = list(FRAMEWORKS)
    for i in range(n):
        fw = fws[i % 3]
        end = int(now - 3600 - i * (30 * 86400 / n))
        doc = {
            "run_id": f"run-{i:06d}",
            "steps": [
                {"step_number": 1, "start_timestamp": end - 120, "end_timestamp": end - 60},
                {"step_number": 2, "start_timestamp": end - 60, "end_timestamp": end},
            ],
            "aggregate_metrics": {"TOK_IN": 1000 + i % 9000, "TOK_OUT": 100 + i % 900},
            "verification_status": "verified",
            "usage_api_reconciliation": {
                "verification_status": "verified",
                "status": "verified",
                "attempts": [],
                "provenance": {"tool": "tokensettle", "version": "0.1.0"},
                "total_tokens_in": 1000 + i % 9000,
                "total_tokens_out": 100 + i % 900,
            },
        }
        directory = root / fw / f"run-{i:06d}"
        directory.mkdir(parents=True)
        (directory / "metrics.json").write_text(json.dumps(doc, indent=2))
    return time.perf_counter() - started


class Daemon:
    def __init__(self, work: Path) -> None:
        env = {
            **{
                k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))
            },
            "TOKENSETTLE_RUNS_DIRS": str(work / "runs"),
            "TOKENSETTLE_API_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",  # never called
            "TOKENSETTLE_ADMIN_KEY": "sk-admin-simulator-0000",
            "TOKENSETTLE_STATE_DIR": str(work / "state"),
            "TOKENSETTLE_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "TOKENSETTLE_LOG_FORMAT": "json",
            **{f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in FRAMEWORKS.items()},
        }
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(BIN / "tokensettle"), "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=work,
        )
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.ready_at: float | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append((time.perf_counter(), event))
            if event.get("event") == "daemon.ready":
                self.ready_at = time.perf_counter()
                self.ready.set()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=60.0)
    args = parser.parse_args()
    limits = {
        name: int(Path(f"/proc/sys/fs/inotify/{name}").read_text())
        for name in ("max_user_watches", "max_user_instances", "max_queued_events")
    }
    directories = args.runs + len(FRAMEWORKS) + 1
    if limits["max_user_watches"] < directories:
        print(
            json.dumps({"error": "max_user_watches too low", "limits": limits, "need": directories})
        )
        return 1
    work = Path(tempfile.mkdtemp(prefix="tokensettle-idle-"))
    (work / "state").mkdir()
    result: dict[str, Any] = {}
    try:
        generate_s = generate(work / "runs", args.runs)
        first = Daemon(work)  # builds the index
        if not first.ready.wait(600):
            raise RuntimeError("first start: no daemon.ready")
        first_ready = (first.ready_at or 0) - first.t0
        first.stop()

        daemon = Daemon(work)
        if not daemon.ready.wait(600):
            raise RuntimeError("no daemon.ready")
        pid = daemon.proc.pid
        ready_s = (daemon.ready_at or 0) - daemon.t0
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        slices = []
        last_cpu, last_t = cpu0, t0
        while time.perf_counter() - t0 < args.idle:
            time.sleep(min(10.0, args.idle - (time.perf_counter() - t0)))
            cpu, t = cpu_seconds(pid), time.perf_counter()
            slices.append(round(100 * (cpu - last_cpu) / (t - last_t), 2))
            last_cpu, last_t = cpu, t
        cpu1, t1 = cpu_seconds(pid), time.perf_counter()
        hwm, rss = status_kb(pid, "VmHWM"), status_kb(pid, "VmRSS")
        idle_events = Counter(e["event"] for at, e in daemon.events if at > t0)
        daemon.stop()
        result = {
            "command": f"python bench/idle_watch.py --runs {args.runs} --idle {args.idle:g}",
            "machine": (
                f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
            ),
            "inotify": limits,
            "watches_needed": directories,
            "generate_seconds": round(generate_s, 1),
            "first_start_seconds_to_ready": round(first_ready, 2),
            "seconds_to_ready": round(ready_s, 2),
            "idle_seconds": round(t1 - t0, 1),
            "cpu_percent_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
            "cpu_percent_per_10s": slices,
            "peak_rss_mb": round(hwm / 1024, 1),
            "rss_at_end_mb": round(rss / 1024, 1),
            "events_while_idle": dict(idle_events),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

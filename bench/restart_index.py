"""Benchmark: daemon start over 100,000 finished runs, with and without the index.

Writes N verified run files (the shape the daemon itself writes: two agreeing attempts,
provenance, attribution; ~7 KB each) under three frameworks, then times `tokensettle run`
from process start to its `daemon.ready` line:

- `no index`: the state directory's index.sqlite3 deleted before the start: every file
  is parsed (and the index rebuilt);
- `index`: the index from the previous start present: a stat per file.

Each start is stopped with SIGTERM once ready, after `--settle` seconds in which the
steady RSS (VmRSS) is read; the peak (VmHWM) is read then too, and the inotify watches the
process holds are counted from /proc/<pid>/fdinfo. The page cache is warm (the files were
just written or read), as after a service restart; nothing is polled (no API calls).
The tree is deleted at the end unless --keep (or --tree, which reuses a kept tree).
Goal (issue 11): < 2 s to ready with the index, RSS < 100 MB steady, < 150 MB peak.

    .venv/bin/python bench/restart_index.py [--runs 100000] [--repeat 3] [--keep]
        [--tree DIR] [--index-only] [--settle 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import BIN, cpu_seconds, free_port, load_average, status_kb

FRAMEWORKS = {"chatdev": "key_chatdevBENCH01", "baes": "key_baesBENCH00002", "ghspec": "key_gh3"}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def template() -> str:
    """A verified run file as JSON text with placeholders for what differs per run."""
    start, end = 1111111111, 2222222222
    window = {
        "start": 3333333333,
        "end": 4444444444,
        "start_iso": "__WSTART__",
        "end_iso": "__WEND__",
        "grace_seconds": 60,
    }
    attempt = {
        "timestamp": "__POLLED__",
        "total_tokens_in": 5555555,
        "total_tokens_out": 6666666,
        "total_api_calls": 3,
        "total_cached_tokens": 0,
        "query_window": window,
        "fingerprint": "sha256:f0777f311921fe61",
        "status": "pending",
        "exact_tokens": 7777777,
        "apportioned_tokens": 0,
        "steps_with_tokens": 2,
        "total_steps": 2,
        "error": None,
    }
    counters = {
        "input_tokens": 5555555,
        "output_tokens": 6666666,
        "num_model_requests": 3,
        "input_cached_tokens": 0,
    }
    doc: dict[str, Any] = {
        "run_id": "__RUNID__",
        "model": "gpt-4o-mini",
        "start_timestamp": "__START__",
        "end_timestamp": "__END__",
        "steps": [
            {
                "step_number": k + 1,
                "duration_seconds": 60.0,
                "success": True,
                "tokens_in": 0,
                "tokens_out": 0,
                "api_calls": 0,
                "cached_tokens": 0,
                "start_timestamp": start if k == 0 else 8888888888,
                "end_timestamp": 8888888888 if k == 0 else end,
            }
            for k in range(2)
        ],
        "aggregate_metrics": {
            "AUTR": 1.0,
            "TOK_IN": 5555555,
            "TOK_OUT": 6666666,
            "API_CALLS": 3,
            "CACHED_TOKENS": 0,
            "AEI": 0.0625,
        },
        "verification_status": "verified",
        "usage_api_reconciliation": {
            "verification_status": "verified",
            "verification_message": "verified: 2 identical polls at least 10m apart",
            "attempts": [attempt, {**attempt, "status": "verified"}],
            "status": "verified",
            "reconciled_at": "__POLLED__",
            "next_poll_at": None,
            "provenance": {
                "tool": "tokensettle",
                "version": "0.1.0",
                "endpoint": "https://api.openai.com/v1/organization/usage/completions",
                "scope": {
                    "api_key_ids": ["__KEY__"],
                    "project_ids": [],
                    "organisation_wide": False,
                    "framework": "__FW__",
                },
                "window_source": "steps",
                "query": {
                    "start_time": "3333333333",
                    "end_time": "4444444444",
                    "bucket_width": "1m",
                    "limit": "4",
                    "group_by": ["api_key_id", "project_id", "model"],
                    "api_key_ids": ["__KEY__"],
                },
                "requests": 1,
            },
            "steps_with_tokens": 2,
            "total_steps": 2,
            "attribution": {
                "exact": counters,
                "apportioned": {"input_tokens": 0, "output_tokens": 0, "num_model_requests": 0},
                "apportioned_fraction": 0.0,
                "tolerance": 0.01,
                "minutes": 3,
                "shared_minutes": 0,
                "models": {"gpt-4o-mini-2024-07-18": counters},
            },
            "overlaps": [],
            "verified_at": "__POLLED__",
            "total_tokens_in": 5555555,
            "total_tokens_out": 6666666,
            "total_api_calls": 3,
            "total_cached_tokens": 0,
            "steps_updated": ["1", "2"],
        },
    }
    return json.dumps(doc, indent=2)


def generate(root: Path, n: int) -> float:
    """N verified runs, ending over the last 30 days (finished long ago)."""
    started = time.perf_counter()
    text = template()
    now = time.time()
    fws = list(FRAMEWORKS)
    for i in range(n):
        fw = fws[i % 3]
        end = int(now - 3600 - i * (30 * 86400 / n))
        start = end - 120
        w0 = start - start % 60
        w1 = end - end % 60 + 120
        out = (
            text.replace("__RUNID__", f"run-{i:06d}")
            .replace("__FW__", fw)
            .replace("__KEY__", FRAMEWORKS[fw])
            .replace("__START__", iso(start))
            .replace("__END__", iso(end))
            .replace("__WSTART__", iso(w0))
            .replace("__WEND__", iso(w1))
            .replace("__POLLED__", iso(end + 2400))
            .replace("1111111111", str(start))
            .replace("2222222222", str(end))
            .replace("8888888888", str(start + 60))
            .replace("3333333333", str(w0))
            .replace("4444444444", str(w1))
            .replace("5555555", str(1000 + i % 9000))
            .replace("6666666", str(100 + i % 900))
            .replace("7777777", str(1100 + i % 9000 + i % 900))
        )
        directory = root / fw / f"run-{i:06d}"
        directory.mkdir(parents=True)
        fd = os.open(directory / "metrics.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, out.encode())
        finally:
            os.close(fd)
    return time.perf_counter() - started


def mtimes(root: Path) -> dict[str, int]:
    out = {}
    for fw in FRAMEWORKS:
        with os.scandir(root / fw) as runs:
            for run in runs:
                path = os.path.join(run.path, "metrics.json")
                out[path] = os.stat(path).st_mtime_ns
    return out


def inotify_watches(pid: int) -> int | None:
    """The inotify watches a process holds (one `inotify wd:` line each in fdinfo)."""
    total, found = 0, False
    fds = Path(f"/proc/{pid}/fd")
    try:
        for fd in fds.iterdir():
            try:
                if os.readlink(fd) != "anon_inode:inotify":
                    continue
                info = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
            except OSError:
                continue
            found = True
            total += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
    except OSError:
        return None
    return total if found else None


def start_once(work: Path, settle: float) -> dict[str, Any]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))},
        "TOKENSETTLE_RUNS_DIRS": str(work / "runs"),
        "TOKENSETTLE_API_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",  # never called
        "TOKENSETTLE_ADMIN_KEY": "sk-admin-simulator-0000",
        "TOKENSETTLE_STATE_DIR": str(work / "state"),
        "TOKENSETTLE_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "TOKENSETTLE_LOG_FORMAT": "json",
        **{f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in FRAMEWORKS.items()},
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "tokensettle"), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=work,
    )
    assert proc.stdout is not None
    rescanned: dict[str, Any] = {}
    ready: dict[str, Any] | None = None
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("event") == "daemon.rescanned":
            rescanned = event
        if event.get("event") == "daemon.ready":
            ready = event
            break
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(proc.pid) if proc.poll() is None else None
    watches = inotify_watches(proc.pid)
    deadline = time.monotonic() + settle
    while ready is not None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)  # a fixed idle period to measure, not a synchronisation
    hwm = rss = None
    if proc.poll() is None:
        hwm, rss = status_kb(proc.pid, "VmHWM"), status_kb(proc.pid, "VmRSS")
    proc.terminate()
    proc.communicate(timeout=60)
    if ready is None:
        raise RuntimeError(f"daemon exited {proc.returncode} before daemon.ready")
    return {
        "seconds_to_ready": round(seconds, 2),
        "cpu_seconds_to_ready": round(cpu, 2) if cpu is not None else None,
        "rescan_seconds": rescanned.get("seconds"),
        "parsed": rescanned.get("parsed"),
        "skipped_finished": rescanned.get("skipped_finished"),
        "tracked": ready.get("tracked"),
        "inotify_watches": watches,
        "peak_rss_mb": round(hwm / 1024, 1) if hwm else None,
        f"rss_after_{settle:g}s_mb": round(rss / 1024, 1) if rss else None,
        "exit_code": proc.returncode,
    }


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated tree")
    parser.add_argument("--tree", type=Path, help="reuse (or create and keep) this tree")
    parser.add_argument(
        "--index-only", action="store_true", help="skip the start without the index"
    )
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before RSS")
    args = parser.parse_args()
    work = args.tree or Path(tempfile.mkdtemp(prefix="tokensettle-restart-"))
    keep = args.keep or args.tree is not None
    (work / "state").mkdir(parents=True, exist_ok=True)
    load = load_average()
    try:
        generate_s = 0.0 if (work / "runs").is_dir() else generate(work / "runs", args.runs)
        before = mtimes(work / "runs")
        runs: dict[str, list[dict[str, Any]]] = {"no_index": [], "index": []}
        if args.index_only and not (work / "state" / "index.sqlite3").exists():
            start_once(work, 0)  # build the index once
        for _ in range(args.repeat):
            if not args.index_only:
                for path in (work / "state").glob("index.sqlite3*"):
                    path.unlink()
                # parses every file, rebuilds the index
                runs["no_index"].append(start_once(work, args.settle))
            runs["index"].append(start_once(work, args.settle))
        changed = sum(1 for p, m in mtimes(work / "runs").items() if before.get(p) != m)
        summary = {
            "command": f"python bench/restart_index.py --runs {args.runs} --repeat {args.repeat}",
            "machine": (
                f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
            ),
            "load_average": f"{load} -> {load_average()}",
            "runs": len(before),
            "generate_seconds": round(generate_s, 1),
            "files_changed_by_the_daemon": changed,
            "median_seconds_to_ready": {
                k: median([r["seconds_to_ready"] for r in v]) for k, v in runs.items() if v
            },
            "starts": runs,
        }
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: writer updates lost while an experiment rewrites its metrics.json as we patch it.

A writer thread plays the experiment: every 5-30 ms (uniform) it reads the run file,
appends its next counter to `writer.log`, and writes the file back by its own temp file
and `os.rename`. The main thread meanwhile patches the file with tokensettle's own
`atomic.rewrite` in a loop, as fast as it can (each patch counts `ours`).

A writer update is lost when one of our swaps puts back content older than the writer's
last version. Two checks see every such loss:

- since every writer version carries all earlier counters, a version we drop leaves a gap
  for good: the final file must hold every counter 1..N (`missing_in_final`, the figure);
- at each write, the writer first reads the file: if its last counter there is below the
  writer's last written one, one of its versions was just displaced by an older-based
  patch of ours (`lost_seen_by_writer`, the same losses seen as they happen).

`--method` picks the swap: `exchange` (renameat2(RENAME_EXCHANGE), the default on Linux)
or `replace` (compare, then os.replace: the fallback elsewhere, and the only method at
4bde81e). The writer's own read-modify-write can still overwrite *our* patch; that is the
experiment's business, not a lost writer update, and is reported as `our_patches_lost`.

    .venv/bin/python bench/concurrent_writer.py [--duration 60] [--method both] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import machine
from tokensettle.atomic import ConflictError, exchange_supported, rewrite


def _doc(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_bytes())
    assert isinstance(doc, dict)
    return doc


class Writer(threading.Thread):
    """The experiment: read, add its next counter, temp file + rename, every 5-30 ms."""

    def __init__(self, path: Path, until: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.until = until
        self.random = random.Random(seed)
        self.written = 0
        self.lost_seen = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            tmp = self.path.with_name(".experiment-writing.tmp")
            while time.monotonic() < self.until:
                time.sleep(self.random.uniform(0.005, 0.030))
                doc = _doc(self.path)
                log = doc["writer"]["log"]
                if (log[-1] if log else 0) < self.written:
                    self.lost_seen += 1
                self.written += 1
                log.append(self.written)
                tmp.write_text(json.dumps(doc, indent=2))
                os.rename(tmp, self.path)
        except BaseException as exc:
            self.error = exc


def _patch(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["ours"] = doc.get("ours", 0) + 1
    return json.dumps(doc, indent=2).encode()


def trial(directory: Path, method: str, seconds: float, seed: int) -> dict[str, Any]:
    path = directory / "metrics.json"
    path.write_text(json.dumps({"run_id": "bench", "writer": {"log": []}, "ours": 0}, indent=2))
    writer = Writer(path, time.monotonic() + seconds, seed)
    patches = conflicts = 0
    started = time.perf_counter()
    writer.start()
    while writer.is_alive():
        try:
            if rewrite(path, _patch, use_exchange=method == "exchange").written:
                patches += 1
        except ConflictError:
            conflicts += 1
    elapsed = time.perf_counter() - started
    if writer.error is not None:
        raise writer.error
    final = _doc(path)
    missing = sorted(set(range(1, writer.written + 1)) - set(final["writer"]["log"]))
    leftovers = sorted(p.name for p in directory.iterdir() if p.name != "metrics.json")
    return {
        "method": method,
        "seconds": round(elapsed, 1),
        "writer_updates": writer.written,
        "our_patches_written": patches,
        "our_patches_lost": patches - final["ours"],
        "conflicts_given_up": conflicts,
        "lost_seen_by_writer": writer.lost_seen,
        "missing_in_final": len(missing),
        "first_missing": missing[:10],
        "temp_files_left": leftovers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per trial")
    parser.add_argument("--method", choices=["exchange", "replace", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where the run file lives")
    args = parser.parse_args()
    methods = ["exchange", "replace"] if args.method == "both" else [args.method]
    trials = []
    with tempfile.TemporaryDirectory(prefix="tokensettle-cw-", dir=args.dir) as tmp:
        directory = Path(tmp)
        if "exchange" in methods and not exchange_supported(directory):
            raise SystemExit(f"renameat2(RENAME_EXCHANGE) is not supported in {directory}")
        for n in range(args.repeat):
            for method in methods:
                trials.append(trial(directory, method, args.duration, seed=n))
    lost = {m: sum(t["missing_in_final"] for t in trials if t["method"] == m) for m in methods}
    print(
        json.dumps(
            {
                "command": (
                    f"python bench/concurrent_writer.py --duration {args.duration:g} "
                    f"--method {args.method} --repeat {args.repeat}"
                ),
                "machine": machine(),
                "lost_writer_updates": lost,
                "trials": trials,
            },
            indent=2,
        )
    )
    return 1 if lost.get("exchange") else 0


if __name__ == "__main__":
    raise SystemExit(main())

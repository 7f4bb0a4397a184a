"""The physical floor of settling run files: what any correct tool must do per run.

For every `metrics.json` under the roots: read it, write a same-directory temp file
(O_EXCL), fsync it, rename it over the original, fsync the directory. Nothing is parsed,
nothing is changed (each file gets its own bytes back, so the sizes, and the pages fsync
must write, are those of the files as they stand). No network, no JSON, no logging: a
tool doing less could lose a file on a crash (no fsync), break a concurrent reader (no
rename) or lose the rename (no directory fsync).

`reconcile_floor.py` runs this as its own process beside `tokensettle reconcile` over the
same tree and records the ratio.

    .venv/bin/python bench/floor.py ROOT [ROOT ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def run_files(roots: list[str]) -> list[str]:
    """Every `metrics.json` below the roots (a directory holding one is not entered)."""
    found: list[str] = []
    stack = list(roots)
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as it:
            entries = list(it)
        if any(e.name == "metrics.json" and e.is_file(follow_symlinks=False) for e in entries):
            found.append(os.path.join(directory, "metrics.json"))
            continue
        stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
    return found


def settle_one(path: str) -> int:
    """Read, temp file, fsync, rename, directory fsync. The bytes written."""
    with open(path, "rb") as f:
        data = f.read()
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".floor-metrics.json.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return len(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+")
    args = parser.parse_args()
    started = time.perf_counter()
    files = run_files(args.roots)
    written = sum(settle_one(p) for p in files)
    seconds = time.perf_counter() - started
    json.dump({"files": len(files), "bytes": written, "seconds": round(seconds, 3)}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

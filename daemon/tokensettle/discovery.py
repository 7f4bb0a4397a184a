"""Find run files under the watched roots.

A run is a regular `metrics.json`; its framework is the run directory's parent name. A
directory that holds a metrics.json is a run directory and is not searched further (older
layouts keep per-sprint metrics.json files inside runs). Symlinked directories are not
followed, and a symlinked metrics.json is reported and never written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RUN_FILE = "metrics.json"


@dataclass(frozen=True, slots=True)
class Found:
    path: Path
    root: Path
    framework: str
    #: why the file is not usable (symlink, ...); None when it is a candidate run
    skip_reason: str | None = None


def framework_of(path: Path) -> str:
    return path.parent.parent.name


def scan(root: Path) -> Iterator[Found]:
    if not root.is_dir():
        return
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        run_file = next((e for e in entries if e.name == RUN_FILE), None)
        if run_file is not None and Path(run_file.path).parent != root:
            path = Path(run_file.path)
            if run_file.is_symlink():
                yield Found(path, root, framework_of(path), "is a symlink; not followed or written")
            elif run_file.is_file(follow_symlinks=False):
                yield Found(path, root, framework_of(path))
            continue
        stack.extend(
            Path(e.path)
            for e in sorted(entries, key=lambda e: e.name, reverse=True)
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
        )


def scan_all(roots: list[Path]) -> list[Found]:
    seen: set[Path] = set()
    found: list[Found] = []
    for root in roots:
        for item in scan(root):
            if item.path not in seen:
                seen.add(item.path)
                found.append(item)
    return found

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


SYMLINK_REASON = "is a symlink; not followed or written"


def run_entries(root: Path, *, ordered: bool = False) -> Iterator[os.DirEntry[str]]:
    """The directory entries of every run file under `root` (cheap: no Path objects, and
    the entry caches its lstat for the caller)."""
    top = str(root)
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue
        run_file = next((e for e in entries if e.name == RUN_FILE), None)
        if run_file is not None and directory != top:
            if run_file.is_symlink() or run_file.is_file(follow_symlinks=False):
                yield run_file
            continue
        if ordered:
            entries.sort(key=lambda e: e.name, reverse=True)
        stack.extend(
            e.path
            for e in entries
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
        )


def found_of(entry: os.DirEntry[str], root: Path) -> Found:
    path = Path(entry.path)
    return Found(path, root, framework_of(path), SYMLINK_REASON if entry.is_symlink() else None)


def scan(root: Path) -> Iterator[Found]:
    if not root.is_dir():
        return
    for entry in run_entries(root, ordered=True):
        yield found_of(entry, root)


def scan_all(roots: list[Path]) -> list[Found]:
    seen: set[Path] = set()
    found: list[Found] = []
    for root in roots:
        for item in scan(root):
            if item.path not in seen:
                seen.add(item.path)
                found.append(item)
    return found

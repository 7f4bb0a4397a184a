"""Find run files under the watched roots.

A run is a regular `metrics.json`; its framework is the run directory's parent name. A
directory that holds a metrics.json is a run directory and is not searched further (older
layouts keep per-sprint metrics.json files inside runs). Symlinked directories are not
followed, and a symlinked metrics.json is never written; each of those, and a
metrics.json that is a directory, FIFO, socket or device, is reported as a `Found` with a
one-line `skip_reason` (never opened). The same listing reports our temp files, so stale
ones can be removed without a second walk.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokensettle.atomic import file_kind, is_temp_name

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
SYMLINKED_RUN_DIR_REASON = (
    "is in a symlinked run directory; not followed (settle it under its real path)"
)
SYMLINKED_DIR_REASON = (
    "is a symlinked directory; the runs under it are not followed (watch its real path)"
)


def not_regular_reason(mode: int) -> str:
    return f"is {file_kind(mode)}, not a regular file; never opened"


def _symlinked_dir(entry: os.DirEntry[str], root: Path) -> Found | None:
    """A Found for a symlink to a directory (a run or framework directory), else None."""
    try:
        if not entry.is_dir():  # follows the link: one stat, for symlinks only
            return None
    except OSError:
        return None
    link = Path(entry.path)
    run_file = link / RUN_FILE
    if os.path.lexists(run_file):
        return Found(run_file, root, link.parent.name, SYMLINKED_RUN_DIR_REASON)
    return Found(link, root, link.name, SYMLINKED_DIR_REASON)


def run_entries(
    root: Path,
    *,
    ordered: bool = False,
    skipped: list[Found] | None = None,
    temps: list[str] | None = None,
    watch: Callable[[str], object] | None = None,
    settled: Callable[[str], bool] | None = None,
    top_is_root: bool = True,
) -> Iterator[os.DirEntry[str]]:
    """The directory entries of every run file under `root` (cheap: no Path objects, and
    the entry caches its lstat for the caller).

    Symlinked metrics.json files are yielded (the caller reports them with `found_of`).
    With `skipped`, what is never yielded is reported there: a metrics.json that is not a
    regular file, a symlinked run or framework directory. With `temps`, the paths of our
    temp files seen in any listed directory are appended (see `atomic.remove_stale_temps`).
    `watch(directory)` is called before each directory is listed, so whatever appears in
    it afterwards has an event. A subdirectory for which `settled(directory)` is true (a
    finished run its caller has just checked) is neither watched nor listed. With
    `top_is_root` false, `root` is a directory under a root (one just created or moved
    in): it is a run directory itself if it holds a metrics.json.
    """
    top = str(root)
    stack = [top]
    while stack:
        directory = stack.pop()
        if watch is not None:
            watch(directory)
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue
        if temps is not None:
            temps.extend(e.path for e in entries if is_temp_name(e.name))
        run_file = next((e for e in entries if e.name == RUN_FILE), None)
        if run_file is not None and (directory != top or not top_is_root):
            if run_file.is_symlink() or run_file.is_file(follow_symlinks=False):
                yield run_file
            elif skipped is not None:
                path = Path(run_file.path)
                try:
                    mode = run_file.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue
                skipped.append(Found(path, root, framework_of(path), not_regular_reason(mode)))
            continue
        if ordered:
            entries.sort(key=lambda e: e.name, reverse=True)
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                if settled is None or not settled(e.path):
                    stack.append(e.path)
            elif skipped is not None and e.is_symlink():
                found = _symlinked_dir(e, root)
                if found is not None:
                    skipped.append(found)


def found_of(entry: os.DirEntry[str], root: Path) -> Found:
    path = Path(entry.path)
    return Found(path, root, framework_of(path), SYMLINK_REASON if entry.is_symlink() else None)


def found_at(path: Path, root: Path) -> Found:
    """The Found for one run-file path (a watcher event): its skip reason from one lstat.
    A path that does not exist raises FileNotFoundError."""
    mode = os.lstat(path).st_mode
    reason = None
    if stat.S_ISLNK(mode):
        reason = SYMLINK_REASON
    elif not stat.S_ISREG(mode):
        reason = not_regular_reason(mode)
    return Found(path, root, framework_of(path), reason)


def scan(root: Path, *, temps: list[str] | None = None) -> Iterator[Found]:
    """Every run under `root`, the skipped ones included (with their reason)."""
    if not root.is_dir():
        return
    skipped: list[Found] = []
    for entry in run_entries(root, ordered=True, skipped=skipped, temps=temps):
        yield from skipped
        skipped.clear()
        yield found_of(entry, root)
    yield from skipped


def scan_all(roots: list[Path], *, temps: list[str] | None = None) -> list[Found]:
    seen: set[Path] = set()
    found: list[Found] = []
    for root in roots:
        for item in scan(root, temps=temps):
            if item.path not in seen:
                seen.add(item.path)
                found.append(item)
    return found

"""`watcher.Tree` on a real inotify instance: which directories it watches as a tree
changes under it (created, renamed, moved away, deleted), and what it reports."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's")

from tokensettle.watcher import Tree  # noqa: E402


class Seen:
    def __init__(self) -> None:
        self.events: list[tuple[str, Path]] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, path: Path) -> None:
        with self.lock:
            self.events.append((kind, path))

    def has(self, kind: str, path: Path) -> bool:
        with self.lock:
            return (kind, path) in self.events


def until(predicate: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def tree() -> Iterator[tuple[Tree, Seen]]:
    seen = Seen()
    watched = Tree(seen, lambda: None)
    yield watched, seen
    watched.close()


def test_a_new_directory_is_watched_before_it_is_reported(
    tree: tuple[Tree, Seen], tmp_path: Path
) -> None:
    t, seen = tree
    assert t.watch(str(tmp_path))
    run = tmp_path / "fw" / "run-1"
    run.mkdir(parents=True)
    until(lambda: seen.has("dir", tmp_path / "fw"), "the framework directory")
    assert t.watching(str(tmp_path / "fw"))
    # run-1 may predate the watch on fw/: the caller's listing (after watch) finds it.
    t.watch(str(run))
    (run / "metrics.json").write_text("{}")
    until(lambda: seen.has("complete", run / "metrics.json"), "the closed run file")
    assert t.count() == 3


def test_a_renamed_or_moved_away_directory_loses_its_watches(
    tree: tuple[Tree, Seen], tmp_path: Path
) -> None:
    t, seen = tree
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "fw" / "run-1").mkdir(parents=True)
    outside.mkdir()
    for d in (root, root / "fw", root / "fw" / "run-1"):
        t.watch(str(d))
    os.rename(root / "fw", root / "fw2")
    until(lambda: seen.has("dir", root / "fw2"), "the new name")
    assert seen.has("gone", root / "fw")
    # The old names' watches went with them (the subdirectory's too); the new name is
    # watched, and its subdirectories are the caller's listing to watch again.
    assert not t.watching(str(root / "fw")) and not t.watching(str(root / "fw" / "run-1"))
    assert t.watching(str(root / "fw2")) and t.count() == 2
    t.watch(str(root / "fw2" / "run-1"))
    os.rename(root / "fw2", outside / "fw2")
    until(lambda: seen.has("gone", root / "fw2"), "the move away")
    assert t.count() == 1
    # Nothing is reported for what happens outside, under the old inode.
    (outside / "fw2" / "run-1" / "metrics.json").write_text("{}")
    (root / "marker").mkdir()
    until(lambda: seen.has("dir", root / "marker"), "a later event")
    assert not any("outside" in str(p) or p.name == "metrics.json" for _, p in seen.events)


def test_unwatch_drops_a_subtree_and_deletion_clears_the_book_keeping(
    tree: tuple[Tree, Seen], tmp_path: Path
) -> None:
    t, seen = tree
    run = tmp_path / "fw" / "run-1"
    (run / "sub").mkdir(parents=True)
    for d in (tmp_path, tmp_path / "fw", run, run / "sub"):
        t.watch(str(d))
    t.unwatch(str(run))  # settled: neither it nor anything under it is watched
    assert t.count() == 2 and not t.watching(str(run / "sub"))
    (run / "metrics.json").write_text("{}")
    t.watch(str(run))
    shutil.rmtree(tmp_path / "fw")
    until(lambda: t.count() == 1, "the deleted directories' watches to go")
    assert seen.has("gone", tmp_path / "fw")

"""A write killed half-way (kill -9 of a real process inside `rewrite`) leaves a temp file
that the sweep removes, and nothing else: not other dot-files, not a live writer's temp,
not a temp of a write of ours still in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokensettle import atomic
from tokensettle.discovery import run_entries

#: A child that starts a real rewrite of argv[1] and stops inside it, after its temp file is
#: written and fsynced and before the swap, says so on stdout, and waits on stdin forever.
WRITER = """
import sys
from pathlib import Path
from tokensettle.atomic import rewrite

def hold() -> None:
    print("in-write", flush=True)
    sys.stdin.read()

rewrite(Path(sys.argv[1]), lambda raw: raw + b" ", before_replace=hold)
"""


class Writer:
    """A real process stopped in the middle of a write of `path`."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the event: it is inside the write
        assert line == b"in-write\n", (line, self.proc.stderr.read() if self.proc.stderr else b"")
        (self.temp,) = [p for p in path.parent.iterdir() if f".{self.proc.pid}." in p.name]

    def kill_9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)  # reaped: its pid is free, not a zombie

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for writer in started:
        writer.stop()


def _run(root: Path, name: str) -> Path:
    path = root / "baes" / name / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"run_id": "%s"}' % name.encode())
    return path


def _temps(root: Path) -> list[str]:
    temps: list[str] = []
    for _ in run_entries(root, temps=temps):
        pass
    return temps


def _later(*paths: Path, by: float = atomic.STALE_AFTER_SECONDS + 1) -> float:
    """A clock `by` seconds after the newest of these files changed."""
    return max(p.lstat().st_ctime for p in paths) + by


def test_kill_9_inside_a_write_leaves_a_temp_only_the_sweep_removes(
    tmp_path: Path, writers: list[Writer]
) -> None:
    root = tmp_path / "runs"
    killed_run, live_run, own_run = _run(root, "killed"), _run(root, "live"), _run(root, "own")
    before = {p: p.read_bytes() for p in (killed_run, live_run, own_run)}

    killed = Writer(killed_run)
    writers.append(killed)
    killed.kill_9()
    live = Writer(live_run)  # another process's write, still running
    writers.append(live)

    # A write of this very process, stopped inside `rewrite` in a thread.
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        release.wait(30)

    ours = threading.Thread(
        target=atomic.rewrite,
        args=(own_run, lambda raw: raw + b" "),
        kwargs={"before_replace": hold},
    )
    ours.start()
    assert inside.wait(30)
    (own_temp,) = [p for p in own_run.parent.iterdir() if p.name != "metrics.json"]

    # A leftover of an earlier process that had our pid (pid 1 in a restarted container).
    leftover = killed_run.parent / f".tokensettle-metrics.json.{os.getpid()}.0123abcd.tmp"
    leftover.write_bytes(b"half")
    # Not ours, though close: other dot-files, a bad tag, a directory and a symlink.
    lookalikes = [
        killed_run.parent / ".tokensettle-notes.tmp",
        killed_run.parent / ".metrics.json.swp",
        killed_run.parent / f".tokensettle-metrics.json.{os.getpid()}.NOTHEX00.tmp",
        killed_run.parent / ".tokensettle-metrics.json.1.0123abcd.tmp.bak",
    ]
    for path in lookalikes:
        path.write_bytes(b"x")
    pattern_dir = live_run.parent / ".tokensettle-metrics.json.1.00000000.tmp"
    pattern_dir.mkdir()
    pattern_link = live_run.parent / ".tokensettle-metrics.json.1.11111111.tmp"
    pattern_link.symlink_to(killed_run)

    try:
        temps = _temps(root)
        # Discovery's own listing reports exactly the names of our pattern.
        assert sorted(temps) == sorted(
            str(p) for p in (killed.temp, live.temp, own_temp, leftover, pattern_dir, pattern_link)
        )
        # Young temps are never removed, whoever wrote them.
        assert atomic.remove_stale_temps(temps).removed == []
        assert killed.temp.exists()

        now = _later(killed.temp, live.temp, own_temp, leftover)
        sweep = atomic.remove_stale_temps(temps, now=now)

        assert sorted(sweep.removed) == sorted([killed.temp, leftover])
        assert sweep.failed == []
        assert live.temp.exists() and own_temp.exists()
        assert all(p.exists() for p in lookalikes)
        assert pattern_dir.is_dir() and pattern_link.is_symlink()
        # The killed write never swapped: its run file is byte-identical.
        assert killed_run.read_bytes() == before[killed_run]
    finally:
        release.set()
        ours.join(30)
    # Our own write, released, completed normally and left nothing behind.
    assert own_run.read_bytes() == before[own_run] + b" "
    assert sorted(p.name for p in own_run.parent.iterdir()) == ["metrics.json"]


def test_a_live_pid_is_trusted_only_until_its_temp_is_abandoned(
    tmp_path: Path, writers: list[Writer]
) -> None:
    # The pid in the name may have been reused by an unrelated long-lived process.
    run = _run(tmp_path / "runs", "live")
    live = Writer(run)
    writers.append(live)
    temps = [str(live.temp)]
    assert atomic.remove_stale_temps(temps, now=_later(live.temp)).removed == []
    abandoned = _later(live.temp, by=atomic.ABANDONED_AFTER_SECONDS + 1)
    assert atomic.remove_stale_temps(temps, now=abandoned).removed == [live.temp]


def test_sweep_of_a_tree_or_of_given_run_directories(tmp_path: Path, writers: list[Writer]) -> None:
    root = tmp_path / "runs"
    a, b = _run(root, "a"), _run(root, "b")
    for path in (a, b):
        writer = Writer(path)
        writers.append(writer)
        writer.kill_9()
    (temp_a,) = [p for p in a.parent.iterdir() if p.name != "metrics.json"]
    (temp_b,) = [p for p in b.parent.iterdir() if p.name != "metrics.json"]
    now = _later(temp_a, temp_b)

    only_a = atomic.sweep_stale_temps([a.parent], recursive=False, now=now)
    assert only_a.removed == [temp_a] and temp_b.exists()
    tree = atomic.sweep_stale_temps([root], now=now)
    assert tree.removed == [temp_b]
    assert sorted(p.name for p in a.parent.iterdir()) == ["metrics.json"]

"""Which directories the real daemon holds an inotify watch on (read from /proc, not its
internals): the roots and the directories on the way to runs, and unsettled runs only.
A settled run's directory holds none; the periodic rescan notices it changing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import World
from tests.support.daemon import Daemon, wait_for, write_in_new_dirs, write_in_place

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sys.platform != "linux", reason="inotify watches are Linux's"),
]

WAIT = 45


def watched_inodes(daemon: Daemon) -> set[int]:
    """The inodes of every inotify watch the daemon's process holds (/proc fdinfo)."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    inodes: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("inotify wd:"):
                fields = dict(f.split(":", 1) for f in line.split()[1:])
                inodes.add(int(fields["ino"], 16))
    return inodes


def ino(path: Path) -> int:
    return os.stat(path).st_ino


async def test_only_unsettled_runs_hold_a_watch_and_the_rescan_sees_a_settled_one_change(
    world: World,
) -> None:
    old = world.run("chatdev", "old", 0, (1200, 120, 2))
    new = world.run("chatdev", "new", 1, (3400, 340, 3))
    await world.register(old, new)
    write_in_new_dirs(world.path(old), old.data)
    daemon = await world.start()
    fw = world.root / "chatdev"
    await daemon.wait_event("run.settled", WAIT, run_id="old", status="verified")
    # Settled: its directory's watch is gone; the root and the framework keep theirs.
    await wait_for(
        lambda: ino(world.path(old).parent) not in watched_inodes(daemon),
        10,
        what="the settled run's watch to go",
    )
    assert {ino(world.root), ino(fw)} <= watched_inodes(daemon)

    # A new run directory is watched as soon as it appears, before its file.
    new_dir = world.path(new).parent
    new_dir.mkdir()
    await wait_for(
        lambda: ino(new_dir) in watched_inodes(daemon), 10, what="a watch on the new run dir"
    )
    write_in_place(world.path(new), new.data)  # seen through that watch
    await daemon.wait_event("run.settled", WAIT, run_id="new", status="verified")
    await wait_for(lambda: ino(new_dir) not in watched_inodes(daemon), 10, what="its watch to go")
    world.assert_verified(new)
    assert await daemon.terminate() == 0

    # A restart over settled runs watches neither of them.
    again = await world.start(TOKENSETTLE_RESCAN_INTERVAL="1s")
    (ready,) = again.find("daemon.ready")
    watched = watched_inodes(again)
    assert ino(world.path(old).parent) not in watched and ino(new_dir) not in watched
    assert {ino(world.root), ino(fw)} <= watched and ready["watches"] == len(watched)

    # A settled run rewritten in place (no watch, so no event): the rescan's stat sees it,
    # it is watched again while it is pending, and verifies again.
    write_in_place(world.path(old), old.data)
    await again.wait_event("run.scheduled", WAIT, path=str(world.path(old)))
    assert ino(world.path(old).parent) in watched_inodes(again)
    await again.wait_event("run.settled", WAIT, run_id="old", status="verified")
    world.assert_verified(old)
    assert not again.not_json

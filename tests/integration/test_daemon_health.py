"""The daemon in-process, for failures a real process cannot be pushed into from outside."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.runs import KEYS
from tokensettle.config import FrameworkScope, load_settings
from tokensettle.daemon import EXIT_FAILED, Daemon
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator


async def _ready(daemon: Daemon, task: asyncio.Task[int]) -> None:
    ready = asyncio.create_task(daemon.ready_event.wait())
    done, _ = await asyncio.wait({ready, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    assert ready in done, (
        f"daemon ended before it was ready: {task.result() if task.done() else '?'}"
    )


@pytest.mark.timeout(60)
async def test_a_dead_watcher_thread_makes_the_daemon_exit_non_zero(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    settings = load_settings(
        {
            "runs_dirs": [root],
            "api_base_url": sim.base_url,
            "admin_key": SIMULATOR_ADMIN_KEY,
            "state_dir": tmp_path / "state",
            "http_addr": "",
            "frameworks": {fw: FrameworkScope(api_key_ids=[k]) for fw, k in KEYS.items()},
        },
        environ={},
    )
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    await _ready(daemon, task)
    assert daemon.health()["watcher_alive"] is True
    assert daemon.bridge.watcher is not None
    for thread in daemon.bridge.watcher.threads():  # what an exception in watchdog's does
        thread.stop()
        thread.join()
    assert daemon.health()["status"] == "failing"
    daemon.bridge.on_dir(root)  # any wake-up: the loop checks the watcher first
    async with asyncio.timeout(30):
        assert await task == EXIT_FAILED

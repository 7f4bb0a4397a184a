"""The real daemon next to files that are not run files: a FIFO named metrics.json froze its
event loop forever (opened on the loop thread; SIGTERM ignored)."""

from __future__ import annotations

import os

import pytest

from tests.e2e.conftest import World
from tests.support.daemon import write_in_new_dirs

pytestmark = pytest.mark.e2e

WAIT = 45


async def test_a_fifo_named_metrics_json_is_reported_and_never_blocks(world: World) -> None:
    daemon = await world.start()
    fifo = world.root / "baes" / "fifo-run" / "metrics.json"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # no writer will ever open it: an open() for reading would block
    run = world.run("chatdev", "after-fifo", 0, (1200, 120, 2))
    await world.register(run)
    write_in_new_dirs(world.path(run), run.data)

    unreadable = await daemon.wait_event("run.unreadable", WAIT, path=str(fifo))
    assert "is a FIFO, not a regular file" in unreadable["reason"]
    await daemon.wait_event("run.settled", WAIT, run_id="after-fifo", status="verified")
    world.assert_verified(run)
    status, _ = await world.healthz(daemon)
    assert status == 200
    assert await daemon.terminate() == 0
    assert fifo.is_fifo()

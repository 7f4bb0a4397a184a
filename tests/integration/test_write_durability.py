"""Which writes of an attempt are made durable with a directory fsync (docs/decisions.md:
a pending-only attempt may be lost by a crash; a write of token fields may not)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import Stage
from tests.support.runs import virtual_request, write_run
from tokensettle.atomic import fsync_dir


async def test_only_writes_that_change_token_fields_fsync_the_directory(stage: Stage) -> None:
    end = stage.end
    path = write_run(stage.root, "baes", "d1", [(end - 100, end)])
    await stage.control.add([virtual_request(end - 50, "baes", 1200, 120, 2)])
    reconciler = stage.reconciler()
    synced: list[Path] = []

    def recording_fsync(directory: Path) -> None:
        synced.append(directory)
        fsync_dir(directory)

    reconciler.writer.sync_dir = recording_fsync
    (first,) = (await reconciler.run_once()).outcomes
    assert first.state == "pending" and first.written
    assert len(json.loads(path.read_bytes())["usage_api_reconciliation"]["attempts"]) == 1
    assert synced == []  # the pending attempt is in the file, without a directory fsync
    stage.clock.advance(minutes=2)
    (second,) = (await reconciler.run_once()).outcomes
    assert second.state == "verified" and second.written
    assert json.loads(path.read_bytes())["aggregate_metrics"]["TOK_IN"] == 1200
    assert synced == [path.parent]

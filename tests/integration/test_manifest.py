"""The runs manifest, where present, follows the runs: under a lock, nothing else changed."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import FakeClock, Stage
from tests.support.runs import (
    SimControl,
    pending_from_fixture,
    settings_for,
    virtual_request,
    write_run,
)
from tokensettle.manifest import ManifestUpdate, find_manifest, update_manifest
from tokensettle.reconcile import Reconciler
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator
from tokensettle.usage_api import RetryPolicy, UsageClient

MANIFEST = "runs__runs_manifest@427bd02.json"
PENDING = "runs__ghspec__a1b3972f-f772-4a7c-956e-1828a8db7a7d__metrics@502e40c.json"
SETTLED = "runs__ghspec__a1b3972f-f772-4a7c-956e-1828a8db7a7d__metrics@e7337d8.json"
RUN_ID = "a1b3972f-f772-4a7c-956e-1828a8db7a7d"


async def test_settled_run_updates_its_manifest_entry_only(
    fixtures_dir: Path,
    tmp_path: Path,
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    control: SimControl,
    clock: FakeClock,
) -> None:
    root = tmp_path / "runs"
    manifest = root / "runs_manifest.json"
    manifest.parent.mkdir()
    manifest.write_bytes((fixtures_dir / MANIFEST).read_bytes())
    before = json.loads(manifest.read_text())
    # The real un-reconciled file; the truth comes from the same run's settled commit.
    settled = json.loads((fixtures_dir / SETTLED).read_text())
    shift = clock.now.timestamp() - 7200 - max(s["end_timestamp"] for s in settled["steps"])
    _, truth = pending_from_fixture(settled, shift, "ghspec")
    pending, _ = pending_from_fixture(
        json.loads((fixtures_dir / PENDING).read_text()), shift, "ghspec"
    )
    run = root / "ghspec" / RUN_ID / "metrics.json"
    run.parent.mkdir(parents=True)
    run.write_text(json.dumps(pending, indent=2))
    await control.add(truth.requests)
    assert find_manifest(run) == manifest

    client = UsageClient(
        base_url=sim.base_url,
        admin_key=SIMULATOR_ADMIN_KEY,
        session=session,
        retry=RetryPolicy(base=0.01),
    )
    reconciler = Reconciler(
        settings_for(root, sim.base_url, SIMULATOR_ADMIN_KEY), client, clock=clock
    )
    await reconciler.run_once()
    assert json.loads(manifest.read_text()) == before  # pending: the manifest waits for a result
    clock.advance(minutes=11)
    assert (await reconciler.run_once()).outcomes[0].state == "verified"

    after = json.loads(manifest.read_text())
    entry = next(e for e in after["runs"] if e["run_id"] == RUN_ID)
    assert (entry["verification_status"], entry["total_tokens_in"], entry["total_tokens_out"]) == (
        "verified",
        46512,
        18387,
    )
    others_after = [e for e in after["runs"] if e["run_id"] != RUN_ID]
    others_before = [e for e in before["runs"] if e["run_id"] != RUN_ID]
    assert others_after == others_before
    assert after["last_updated"] != before["last_updated"]
    assert {k: v for k, v in after.items() if k not in ("runs", "last_updated")} == {
        k: v for k, v in before.items() if k not in ("runs", "last_updated")
    }
    assert manifest.read_text() == json.dumps(after, indent=2)  # the file's own style


def test_concurrent_updates_under_the_lock_lose_nothing(fixtures_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes((fixtures_dir / MANIFEST).read_bytes())
    runs = json.loads(manifest.read_text())["runs"][:24]
    start = threading.Barrier(len(runs))
    errors: list[BaseException] = []

    def settle(i: int, entry: dict[str, object]) -> None:
        try:
            start.wait()
            update_manifest(
                manifest,
                ManifestUpdate(
                    str(entry["run_id"]),
                    str(entry["framework"]),
                    "verified",
                    1000 + i,
                    i,
                    datetime.now(UTC),
                ),
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=settle, args=(i, e)) for i, e in enumerate(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    after = {e["run_id"]: e for e in json.loads(manifest.read_text())["runs"]}
    for i, entry in enumerate(runs):
        assert after[entry["run_id"]]["total_tokens_in"] == 1000 + i


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
async def test_owner_is_kept(stage: Stage) -> None:
    path = write_run(stage.root, "baes", "r1", [(stage.end - 30, stage.end)])
    os.chown(path, 4321, 4322)
    await stage.control.add([virtual_request(stage.end - 5, "baes", 10, 5, 1)])
    assert await stage.settle(stage.reconciler()) == ["verified"]
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (4321, 4322)

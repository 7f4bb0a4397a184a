"""The real `tokensettle run` process against the simulator, with compressed timings.

Every wait is on an event: a JSON log line on the daemon's stdout, an HTTP answer, or a
file condition polled with a deadline. Nothing here asserts on timing; bench/ does that.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.e2e.conftest import Run, World
from tests.support.daemon import (
    wait_for,
    write_by_rename,
    write_in_new_dirs,
    write_in_place,
)
from tests.support.runs import virtual_request
from tokensettle.runfile import iso

pytestmark = pytest.mark.e2e

#: Deadline for a run to settle: seconds when all is well, generous for a slow machine.
WAIT = 45


def iso_minute(ts: float) -> str:
    return iso(datetime.fromtimestamp(ts // 60 * 60, UTC))


SECRET = "sk-admin-e2eSECRETvalue-5f3c9a7d"
NO_SCOPE = "sk-admin-e2eNOSCOPEvalue-1b2c3d4e"


def assert_no_secret(*texts: str | bytes) -> None:
    for text in texts:
        raw = text.encode() if isinstance(text, str) else text
        for secret in (SECRET, NO_SCOPE):
            assert secret.encode() not in raw
            assert secret[-12:].encode() not in raw  # not even a tail of it


def attempts_of(path: Path) -> list[dict[str, object]]:
    block = json.loads(path.read_bytes()).get("usage_api_reconciliation") or {}
    return list(block.get("attempts") or [])


def inotify_queue_limit() -> int:
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())


def status_of_attempts(attempts: list[dict[str, object]]) -> object:
    return attempts[-1]["status"] if attempts else None


async def test_runs_written_every_way_end_verified(world: World) -> None:
    in_place = world.run("chatdev", "in-place", 0, (4000, 800, 3), cached=200)
    renamed = world.run("chatdev", "renamed", 1, (5100, 910, 4))
    new_dirs = world.run("ghspec", "new-dirs", 2, (6200, 1020, 5), cached=64)
    moved_run = world.run("chatdev", "moved-run", 3, (7300, 1130, 6))
    moved_fw = world.run("baes", "moved-fw", 4, (8400, 1240, 7))
    runs = [in_place, renamed, new_dirs, moved_run, moved_fw]
    await world.register(*runs)
    # Run directories the experiment created when the runs started, before the daemon.
    world.path(in_place).parent.mkdir(parents=True)
    world.path(renamed).parent.mkdir(parents=True)
    daemon = await world.start()

    write_in_place(world.path(in_place), in_place.data)
    write_by_rename(world.path(renamed), renamed.data)
    write_in_new_dirs(world.path(new_dirs), new_dirs.data)  # ghspec/ did not exist either
    # Built outside the root, then moved in: a run directory, and a whole framework.
    outside = world.staging / moved_run.rel()
    write_in_new_dirs(outside, moved_run.data)
    os.rename(outside.parent, world.path(moved_run).parent)
    outside = world.staging / moved_fw.rel()
    write_in_new_dirs(outside, moved_fw.data)
    os.rename(world.staging / "baes", world.root / "baes")

    for run in runs:
        await daemon.wait_event("run.settled", WAIT, run_id=run.run_id, status="verified")
    for run in runs:
        world.assert_verified(run)
        assert daemon.count("run.scheduled", path=str(world.path(run)), attempts=0) == 1
    status, body = await world.healthz(daemon)
    assert status == 200 and body["status"] == "ok", body
    status, listed = await daemon.get(world.session, "/runs")
    assert status == 200 and listed["finished"] == {"verified": len(runs)}
    assert not daemon.not_json


async def test_late_and_growing_usage_ends_with_the_final_totals(world: World) -> None:
    daemon = await world.start()
    first = world.run("baes", "late", 0, (3000, 600, 2))
    # Visible 2 s after registration, then revised upwards at 3 s: the counts grow.
    final = world.run("baes", "late", 0, (4500, 900, 3))
    for early, late in zip(first.requests, final.requests, strict=True):
        usage = early.pop("usage")
        early["revisions"] = [{"after": 2, "usage": usage}, {"after": 3, "usage": late["usage"]}]
    await world.control.add(first.requests)
    write_in_new_dirs(world.path(first), first.data)

    settled = await daemon.wait_event("run.settled", WAIT, run_id="late")
    assert settled["status"] == "verified"
    world.assert_verified(final)
    attempts = json.loads(world.path(first).read_bytes())["usage_api_reconciliation"]["attempts"]
    statuses = [a["status"] for a in attempts]
    assert statuses[0] == "data_not_available", statuses
    assert "pending" in statuses and statuses[-1] == "verified", statuses
    assert all(a["error"] is None for a in attempts)
    # The last two attempts agree on the final (larger) counts; nothing smaller was written.
    last_two = [(a["total_tokens_in"], a["total_tokens_out"]) for a in attempts[-2:]]
    assert last_two == [final.expected[:2]] * 2
    polled = [e["status"] for e in daemon.find("run.polled", run_id="late")]
    assert polled[0] == "data_not_available" and "pending" in polled
    status, _ = await world.healthz(daemon)
    assert status == 200


async def test_faults_never_count_as_data_and_runs_still_verify(world: World) -> None:
    runs = [
        world.run("chatdev", "f-1", 0, (1200, 300, 2)),
        world.run("ghspec", "f-2", 1, (2300, 400, 3), cached=100),
    ]
    await world.register(*runs)
    for run in runs:  # written before the start: the first batch polls both together
        write_in_new_dirs(world.path(run), run.data)
    # Three tries per fetch (REQUEST_ATTEMPTS=3): the first fetch fails for good after
    # 429 (Retry-After: 1), 500 and 503; the second after a hang past REQUEST_TIMEOUT (2 s),
    # a truncated JSON body and a gateway's HTML 502. Later fetches succeed.
    await world.control.faults(
        {"kind": "429", "retry_after": 1},
        {"kind": "500"},
        {"kind": "503"},
        {"kind": "hang", "seconds": 4},
        {"kind": "bad_json"},
        {"kind": "502"},
    )
    daemon = await world.start()
    for run in runs:
        await daemon.wait_event("run.settled", WAIT, run_id=run.run_id, status="verified")

    for run in runs:
        world.assert_verified(run)
        attempts = json.loads(world.path(run).read_bytes())["usage_api_reconciliation"]["attempts"]
        failed = [a for a in attempts if a["error"]]
        assert len(failed) == 2, attempts
        for attempt in failed:  # a failed request is never data, never zero
            assert attempt["total_tokens_in"] is None and attempt["total_tokens_out"] is None
            assert attempt["total_api_calls"] is None and "fingerprint" not in attempt
        ok = [a for a in attempts if not a["error"]]
        assert len(ok) >= 2 and all(
            (a["total_tokens_in"], a["total_tokens_out"]) == run.expected[:2] for a in ok
        )
    entries = world.sim.request_log
    assert [e.fault for e in entries[:6]] == ["429", "500", "503", "hang", "bad_json", "502"]
    # Retry-After: 1 was honoured before the next try.
    assert entries[1].at - entries[0].at >= 0.95
    assert world.sim.stats()["pending_faults"] == 0
    assert daemon.count("run.attempt_failed") >= len(runs)
    status, body = await world.healthz(daemon)
    assert status == 200 and body["status"] == "ok" and body["last_api_success"], body


async def test_kill_9_and_restart_resumes_every_run_from_its_file(world: World) -> None:
    runs = [
        world.run(fw, f"k-{i}", i, (1000 + 111 * i, 200 + 7 * i, 2 + i))
        for i, fw in enumerate(["chatdev", "baes", "ghspec", "chatdev", "baes", "ghspec"])
    ]
    # Two runs see their usage only later: they are still waiting for data at the kill.
    for run in runs[4:]:
        for request in run.requests:
            request["visible_after"] = 8
    await world.register(*runs)
    debug = {"TOKENSETTLE_LOG_LEVEL": "debug"}  # every attempt is logged (run.polled)
    first = await world.start(**debug)

    invalid: list[str] = []
    stop = asyncio.Event()

    async def watch_files() -> None:  # files are valid JSON at every moment
        while not stop.is_set():
            for run in runs:
                path = world.path(run)
                try:
                    raw = path.read_bytes()
                except FileNotFoundError:
                    continue
                try:
                    json.loads(raw)
                except ValueError:
                    invalid.append(f"{path}: {raw[:80]!r}")
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch_files())
    try:
        for run in runs:
            write_in_new_dirs(world.path(run), run.data)
        # Kill in the middle: some runs polled once (pending or still empty), none verified.
        await first.wait_events("run.polled", 3)
        await first.wait_event("run.polled", status="data_not_available")
        await first.kill()
        at_kill = {run.run_id: attempts_of(world.path(run)) for run in runs}
        assert all(status_of_attempts(a) != "verified" for a in at_kill.values()), at_kill
        logged_before = {
            run.run_id: first.count("run.polled", run_id=run.run_id)
            + first.count("run.attempt_failed", run_id=run.run_id)
            for run in runs
        }
        for run in runs:
            # A write that reached the disk may not have reached the log before the kill.
            assert logged_before[run.run_id] <= len(at_kill[run.run_id])
            assert len(at_kill[run.run_id]) <= logged_before[run.run_id] + 1

        second = await world.start(**debug)
        for run in runs:
            scheduled = await second.wait_event("run.scheduled", path=str(world.path(run)))
            assert scheduled["attempts"] == len(at_kill[run.run_id])
        for run in runs:
            await second.wait_event("run.settled", WAIT, run_id=run.run_id, status="verified")
    finally:
        stop.set()
        await watcher
    assert invalid == []
    for run in runs:
        world.assert_verified(run)
        final = attempts_of(world.path(run))
        before = at_kill[run.run_id]
        assert final[: len(before)] == before  # nothing lost or rewritten
        stamps = [a["timestamp"] for a in final]
        assert len(set(stamps)) == len(stamps) and stamps == sorted(stamps)  # no duplicates
        logged_after = second.count("run.polled", run_id=run.run_id) + second.count(
            "run.attempt_failed", run_id=run.run_id
        )
        assert len(final) == len(before) + logged_after
    status, _ = await world.healthz(second)
    assert status == 200


async def test_malformed_files_stay_identical_and_are_reported_once(world: World) -> None:
    good = [
        world.run("chatdev", "good-1", 0, (900, 90, 2)),
        world.run("baes", "good-2", 1, (800, 80, 2)),
    ]
    fixed = world.run("ghspec", "bad-trunc", 2, (700, 70, 2))
    await world.register(*good, fixed)
    bad = {
        "bad-trunc": (world.path(fixed), fixed.data[: len(fixed.data) // 2]),
        "bad-empty": (world.root / "chatdev" / "bad-empty" / "metrics.json", b""),
        "bad-array": (world.root / "baes" / "bad-array" / "metrics.json", b'[{"run_id": "x"}]\n'),
    }
    # One bad and one good file exist at the start; the others arrive while it runs.
    write_in_new_dirs(*bad["bad-trunc"])
    write_in_new_dirs(world.path(good[0]), good[0].data)
    daemon = await world.start()
    write_in_new_dirs(*bad["bad-empty"])
    write_in_new_dirs(bad["bad-array"][0], b"")
    write_by_rename(*bad["bad-array"])
    write_in_new_dirs(world.path(good[1]), good[1].data)

    for path, _ in bad.values():
        await daemon.wait_event("run.unreadable", path=str(path))
    for run in good:  # >= 2 s: every trailing look of the bad files is behind us
        await daemon.wait_event("run.settled", WAIT, run_id=run.run_id, status="verified")
        world.assert_verified(run)
    for name, (path, raw) in bad.items():
        assert path.read_bytes() == raw, name
        assert daemon.count("run.unreadable", path=str(path)) == 1, name
    _, listed = await daemon.get(world.session, "/runs")
    errors = {Path(r["path"]).parent.name: r for r in listed["runs"] if r["status"] == "error"}
    assert set(errors) == set(bad)
    assert "empty" in errors["bad-empty"]["message"]
    assert "list" in errors["bad-array"]["message"]
    status, _ = await world.healthz(daemon)
    assert status == 200

    # The experiment finishes writing the truncated file: it is scheduled and settled.
    write_in_place(world.path(fixed), fixed.data)
    await daemon.wait_event("run.scheduled", path=str(world.path(fixed)))
    await daemon.wait_event("run.settled", WAIT, run_id="bad-trunc", status="verified")
    world.assert_verified(fixed)
    assert daemon.count("run.unreadable", path=str(world.path(fixed))) == 1
    for name in ("bad-empty", "bad-array"):
        assert bad[name][0].read_bytes() == bad[name][1]
    status, _ = await world.healthz(daemon)
    assert status == 200


async def test_overlapping_runs_of_one_framework_end_ambiguous(world: World) -> None:
    t = world.base + 3 * 600
    a = Run("chatdev", "ov-a", [(t, t + 300), (t + 301, t + 600)], [])
    b = Run("chatdev", "ov-b", [(t + 300, t + 600), (t + 601, t + 900)], [])
    requests = [
        virtual_request(t + 100, "chatdev", 1000, 100, 1),  # a alone
        virtual_request(t + 400, "chatdev", 3000, 300, 2),  # a and b: shared minutes
        virtual_request(t + 530, "chatdev", 2001, 201, 1),  # shared
        virtual_request(t + 800, "chatdev", 500, 50, 1),  # b alone
    ]
    await world.control.add(requests)
    for run in (a, b):
        write_in_new_dirs(world.path(run), world.render(run.framework, run.run_id, run.steps))
    daemon = await world.start()
    for run in (a, b):
        await daemon.wait_event("run.settled", WAIT, run_id=run.run_id, status="ambiguous")

    docs = {run.run_id: json.loads(world.path(run).read_bytes()) for run in (a, b)}
    shared = [iso_minute(t + 400), iso_minute(t + 530)]
    for run_id, other in (("ov-a", "ov-b"), ("ov-b", "ov-a")):
        block = docs[run_id]["usage_api_reconciliation"]
        assert block["verification_status"] == "ambiguous"
        assert docs[run_id]["verification_status"] == "ambiguous"
        (overlap,) = block["overlaps"]
        assert overlap["run_id"] == other and overlap["framework"] == "chatdev"
        assert overlap["minutes"] == shared  # the minutes with usage both could own
        assert block["attribution"]["apportioned"]["input_tokens"] > 0
    agg = {k: d["aggregate_metrics"] for k, d in docs.items()}
    for field, total in (("TOK_IN", 6501), ("TOK_OUT", 651), ("API_CALLS", 5)):
        assert agg["ov-a"][field] + agg["ov-b"][field] == total, field
    assert agg["ov-a"]["TOK_IN"] > 1000 and agg["ov-b"]["TOK_IN"] > 500
    status, _ = await world.healthz(daemon)
    assert status == 200


async def test_sigterm_exits_0_and_the_admin_key_never_shows(world: World) -> None:
    await world.control.keys(admin=[SECRET], unscoped=[NO_SCOPE])
    world.admin_key = SECRET
    run = world.run("baes", "s-1", 0, (1500, 150, 2))
    await world.register(run)
    daemon = await world.start()
    await world.control.faults({"kind": "500"}, {"kind": "401"})  # errors carry messages
    write_in_new_dirs(world.path(run), run.data)
    await daemon.wait_event("run.settled", WAIT, run_id="s-1", status="verified")
    world.assert_verified(run)
    # The 401 paused polling for MAX_BACKOFF; the next batch succeeded.
    assert daemon.count("daemon.auth_failed") == 1
    assert daemon.count("daemon.auth_recovered") == 1
    bodies = [await daemon.get(world.session, p) for p in ("/healthz", "/runs", "/metrics")]
    assert bodies[0][0] == 200
    assert await daemon.terminate() == 0
    assert daemon.events[-1]["event"] == "daemon.stopped"
    assert daemon.events[-1]["exit_code"] == 0
    assert_no_secret(
        "\n".join(daemon.stdout_lines), daemon.stderr, world.path(run).read_bytes(), str(bodies)
    )

    # A key without api.usage.read: polling stops, /healthz fails, nothing is written.
    world.admin_key = NO_SCOPE
    pending = world.run("baes", "s-2", 1, (1600, 160, 2))
    await world.register(pending)
    write_in_new_dirs(world.path(pending), pending.data)
    raw = world.path(pending).read_bytes()
    denied = await world.start()
    failed = await denied.wait_event("daemon.auth_failed")
    assert "api.usage.read" in failed["error"]
    status, body = await world.healthz(denied)
    assert status == 503 and body["auth_ok"] is False, body
    assert world.path(pending).read_bytes() == raw
    bodies = [await denied.get(world.session, p) for p in ("/healthz", "/runs", "/metrics")]
    assert await denied.terminate() == 0
    assert_no_secret("\n".join(denied.stdout_lines), denied.stderr, str(bodies))

    # A root that does not exist: exit 2 at once, with the reason.
    world.admin_key = SECRET
    missing = await world.start(
        wait_ready=False, TOKENSETTLE_RUNS_DIRS=str(world.tmp / "no-such-root")
    )
    assert await missing.wait_exit() == 2
    (error,) = missing.find("daemon.config_error")
    assert "no-such-root" in error["error"] and "RUNS_DIRS" in error["error"]
    assert missing.count("daemon.ready") == 0
    assert missing.find("daemon.stopped")[-1]["exit_code"] == 2
    assert_no_secret("\n".join(missing.stdout_lines), missing.stderr)


async def test_restart_skips_finished_runs_by_the_index(world: World) -> None:
    runs = [
        world.run(fw, f"i-{i}", i, (300 + i, 30 + i, 2))
        for i, fw in enumerate(["chatdev", "baes", "ghspec", "chatdev", "baes"])
    ]
    await world.register(*runs)
    for run in runs:
        write_in_new_dirs(world.path(run), run.data)
    daemon = await world.start()
    for run in runs:
        await daemon.wait_event("run.settled", WAIT, run_id=run.run_id, status="verified")
    assert await daemon.terminate() == 0
    settled = {run.run_id: world.path(run).read_bytes() for run in runs}
    stats = world.sim.stats()["usage_requests"]

    again = await world.start()
    (rescan,) = again.find("daemon.rescanned", reason="start")
    assert rescan["skipped_finished"] == len(runs) and rescan["parsed"] == 0, rescan
    assert again.count("run.scheduled") == 0
    _, listed = await again.get(world.session, "/runs")
    assert listed["runs"] == [] and listed["finished"] == {"verified": len(runs)}
    assert await again.terminate() == 0

    index = sorted(world.state.glob("index.sqlite3*"))
    assert index, list(world.state.iterdir())
    for path in index:
        path.unlink()
    rebuilt = await world.start()
    (rescan,) = rebuilt.find("daemon.rescanned", reason="start")
    assert rescan["parsed"] == len(runs) and rescan["skipped_finished"] == 0, rescan
    assert rebuilt.count("run.scheduled") == 0
    _, listed = await rebuilt.get(world.session, "/runs")
    assert listed["finished"] == {"verified": len(runs)}
    status, _ = await world.healthz(rebuilt)
    assert status == 200
    assert await rebuilt.terminate() == 0
    assert {run.run_id: world.path(run).read_bytes() for run in runs} == settled
    assert world.sim.stats()["usage_requests"] == stats  # nothing was polled again


async def test_own_writes_do_not_wake_the_daemon(world: World) -> None:
    daemon = await world.start()
    first = world.run("ghspec", "own-1", 0, (2500, 250, 3))
    for request in first.requests:  # empty first: the file is written three times
        request["visible_after"] = 1.5
    # A barrier in another scope that settles >= 2 s (> SETTLE_DELAY) after the first:
    # by then every event of our own writes to the first file has been handled.
    barrier = world.run("chatdev", "own-2", 1, (100, 10, 2))
    for request in barrier.requests:
        request["visible_after"] = 4
    await world.register(first, barrier)
    write_in_new_dirs(world.path(first), first.data)
    write_in_new_dirs(world.path(barrier), barrier.data)
    await daemon.wait_event("run.settled", WAIT, run_id="own-1", status="verified")
    await daemon.wait_event("run.settled", WAIT, run_id="own-2", status="verified")

    world.assert_verified(first)
    attempts = attempts_of(world.path(first))
    statuses = [a["status"] for a in attempts]
    assert statuses == ["data_not_available", "pending", "verified"], statuses
    scheduled = daemon.find("run.scheduled", path=str(world.path(first)))
    # Scheduled once, when found; our own three rewrites (renames) did not wake it again.
    assert [(e["attempts"], e["status"]) for e in scheduled] == [(0, "pending")], scheduled
    log = [e for e in daemon.events if e.get("path") == str(world.path(first))]
    assert [e["event"] for e in log] == ["run.scheduled"], log
    # Nor was it polled more often than its file says.
    assert daemon.count("run.polled", run_id="own-1") == len(attempts)
    assert daemon.count("run.unreadable") == 0
    status, _ = await world.healthz(daemon)
    assert status == 200


async def test_a_file_written_during_a_poll_is_seen_at_once(world: World) -> None:
    busy = world.run("chatdev", "busy", 0, (1000, 100, 2))
    newcomer = world.run("baes", "newcomer", 1, (2000, 200, 2))
    await world.register(busy, newcomer)
    daemon = await world.start()
    write_in_new_dirs(world.path(busy), busy.data)
    await daemon.wait_event("run.polled", run_id="busy", status="pending")
    # The verifying poll hangs for a while (less than REQUEST_TIMEOUT): the step is busy.
    await world.control.faults({"kind": "hang", "seconds": 1})
    await wait_for(
        lambda: any(e.fault == "hang" and e.status == 0 for e in world.sim.request_log),
        10,
        what="the hanging request",
    )
    write_in_new_dirs(world.path(newcomer), newcomer.data)
    await daemon.wait_event("run.settled", run_id="busy", status="verified")
    # Nothing else is due: only the file event can wake the loop. Seen within a tick and
    # the settle delay when it does; 30 s (the loop's longest sleep) when it is lost.
    await daemon.wait_event("run.scheduled", 3, path=str(world.path(newcomer)))
    await daemon.wait_event("run.settled", 10, run_id="newcomer", status="verified")
    world.assert_verified(newcomer)


async def test_an_in_place_write_is_read_when_closed_not_after_the_settle_delay(
    world: World,
) -> None:
    # Written in place, a file is first seen empty (its creation event) and was looked at
    # again only SETTLE_DELAY later; the close-after-write event says the writer is done.
    run = world.run("chatdev", "in-place", 0, (1500, 150, 2))
    await world.register(run)
    path = world.path(run)
    path.parent.mkdir(parents=True)
    daemon = await world.start(TOKENSETTLE_SETTLE_DELAY="1h", TOKENSETTLE_LOG_LEVEL="debug")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        await daemon.wait_event("run.deferred", path=str(path), reason="file is empty")
        os.write(fd, run.data)
    finally:
        os.close(fd)
    # Only the close event can bring it in before the hour is up (and the rescan's 10 min).
    scheduled = await daemon.wait_event("run.scheduled", path=str(path))
    assert scheduled["attempts"] == 0
    await daemon.wait_event("run.settled", WAIT, run_id="in-place", status="verified")
    world.assert_verified(run)


async def test_a_run_directory_renamed_inside_the_root_still_verifies(world: World) -> None:
    run = world.run("chatdev", "tmp-name", 0, (3300, 330, 3))
    await world.register(run)
    daemon = await world.start()
    write_in_new_dirs(world.path(run), run.data)
    await daemon.wait_event("run.polled", run_id="tmp-name", status="pending")
    # The experiment renames its run directory after the first poll.
    final_dir = world.root / "chatdev" / "final-name"
    os.rename(world.path(run).parent, final_dir)
    moved = final_dir / "metrics.json"
    await daemon.wait_event("run.scheduled", path=str(moved))
    await daemon.wait_event("run.settled", WAIT, run_id="tmp-name", status="verified")
    doc = json.loads(moved.read_bytes())
    agg = doc["aggregate_metrics"]
    assert (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"]) == run.expected[:3]
    _, listed = await daemon.get(world.session, "/runs")
    assert listed["runs"] == [], listed
    status, _ = await world.healthz(daemon)
    assert status == 200


async def test_a_run_renamed_before_its_first_poll_is_not_split_with_its_ghost(
    world: World,
) -> None:
    run = world.run("chatdev", "tmp-name", 0, (3300, 330, 3))
    await world.register(run)
    # Found by the start scan (no file events, so nothing looks at the old path again);
    # first poll ~3 s later (MIN_AGE counts from the run's end).
    write_in_new_dirs(world.path(run), run.data)
    min_age = time.time() + 3 - run.steps[-1][1]
    daemon = await world.start(TOKENSETTLE_MIN_AGE=f"{min_age:.0f}s")
    assert daemon.count("run.scheduled", path=str(world.path(run))) == 1
    final_dir = world.root / "chatdev" / "final-name"
    os.rename(world.path(run).parent, final_dir)
    moved = final_dir / "metrics.json"
    await daemon.wait_event("run.scheduled", path=str(moved))
    await daemon.wait_event("run.polled", WAIT, run_id="tmp-name")
    first = (await wait_for(lambda: attempts_of(moved), 10, what="the first attempt"))[0]
    assert (first["total_tokens_in"], first["total_tokens_out"]) == run.expected[:2], first
    assert first["apportioned_tokens"] == 0, first
    await daemon.wait_event("run.settled", WAIT, run_id="tmp-name", status="verified")
    assert all(a["apportioned_tokens"] == 0 for a in attempts_of(moved))
    assert json.loads(moved.read_bytes())["usage_api_reconciliation"]["overlaps"] == []
    status, _ = await world.healthz(daemon)
    assert status == 200


async def test_sigterm_during_a_hanging_poll_exits_0_promptly(world: World) -> None:
    run = world.run("ghspec", "hung", 0, (100, 10, 2))
    await world.register(run)
    write_in_new_dirs(world.path(run), run.data)
    raw = world.path(run).read_bytes()
    await world.control.faults({"kind": "hang", "seconds": 60})
    daemon = await world.start(TOKENSETTLE_REQUEST_TIMEOUT="60s")
    await wait_for(
        lambda: any(e.fault == "hang" and e.status == 0 for e in world.sim.request_log),
        10,
        what="the hanging request",
    )
    assert await daemon.terminate(within=10) == 0
    assert [e["event"] for e in daemon.events[-2:]] == ["daemon.stopping", "daemon.stopped"]
    assert world.path(run).read_bytes() == raw  # no attempt half-recorded
    assert not list(world.path(run).parent.glob(".tokensettle-*"))


async def test_scanning_a_large_tree_does_not_overflow_its_own_watch(world: World) -> None:
    queue = inotify_queue_limit()
    if queue > 65536:
        pytest.skip(f"max_queued_events is {queue}: too many directories to make here")
    runs = max(6000, 6000 * queue // 16384)  # ~2-4 events per directory scanned
    doc = {
        "run_id": "old",
        "steps": [{"start_timestamp": world.base, "end_timestamp": world.base + 60}],
        "usage_api_reconciliation": {"verification_status": "verified"},
    }
    data = json.dumps(doc).encode()
    for i in range(runs):  # finished runs: nothing to poll, only to watch
        directory = world.root / "chatdev" / f"old-{i:05d}"
        directory.mkdir(parents=True)
        (directory / "metrics.json").write_bytes(data)
    daemon = await world.start()
    (rescan,) = daemon.find("daemon.rescanned", reason="start")
    assert rescan["parsed"] == runs
    # Reading our own tree is not a filesystem change: no overflow, no second full scan.
    assert daemon.count("watcher.overflow") == 0, daemon.find("watcher.overflow")
    assert daemon.count("daemon.rescanned") == 1
    status, _ = await world.healthz(daemon)
    assert status == 200

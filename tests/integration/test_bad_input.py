"""Bad input loses nothing: each bad file is left byte-identical with a one-line reason,
and the good runs beside it are settled."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.integration.conftest import Stage
from tests.support.runs import virtual_request, write_run
from tokensettle.atomic import MAX_FILE_BYTES
from tokensettle.reconcile import Selection
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY

BAD_FILES: dict[str, bytes] = {
    "malformed": b'{"run_id": "x", "steps": [',
    "empty": b"",
    "array": b"[1, 2, 3]",
    "wrong-types": json.dumps({"run_id": "w", "steps": "six of them"}).encode(),
    "no-timestamps": json.dumps({"run_id": "n", "steps": [{"step_number": 1}]}).encode(),
    "bad-timestamp": json.dumps(
        {"run_id": "b", "steps": [{"start_timestamp": "yesterday", "end_timestamp": 5}]}
    ).encode(),
    "millis": json.dumps(
        {
            "run_id": "m",
            "steps": [{"start_timestamp": 1760870369000, "end_timestamp": 1760870426000}],
        }
    ).encode(),
    "agg-not-object": json.dumps(
        {
            "run_id": "a",
            "start_timestamp": "2025-10-19T10:39:29Z",
            "end_timestamp": "2025-10-19T10:41:18Z",
            "aggregate_metrics": [0, 0],
        }
    ).encode(),
    # Seen by the torture harness: each crashed the batch or lost data.
    "duplicate-keys": (
        b'{"run_id": "d", "start_timestamp": "2025-10-19T10:39:29Z",'
        b' "end_timestamp": "2025-10-19T10:41:18Z",'
        b' "aggregate_metrics": {"TOK_IN": 5, "NOTE": "first"},'
        b' "aggregate_metrics": {"TOK_IN": 0}}'
    ),
    "nested-600": (
        b'{"run_id": "n6", "start_timestamp": "2025-10-19T10:39:29Z",'
        b' "end_timestamp": "2025-10-19T10:41:18Z", "deep": ' + b"[" * 600 + b"]" * 600 + b"}"
    ),
    "int-5000-digits": b'{"run_id": "i5", "seed": ' + b"7" * 5000 + b"}",
    "timestamp-401-digits": (
        b'{"run_id": "t4", "steps": [{"start_timestamp": '
        + b"9" * 401
        + b', "end_timestamp": 1760870426}]}'
    ),
    "utf-16": json.dumps(
        {
            "run_id": "u16",
            "start_timestamp": "2025-10-19T10:39:29Z",
            "end_timestamp": "2025-10-19T10:41:18Z",
        }
    ).encode("utf-16"),
    "nan-count": (
        b'{"run_id": "nan", "start_timestamp": "2025-10-19T10:39:29Z",'
        b' "end_timestamp": "2025-10-19T10:41:18Z", "aggregate_metrics": {"TOK_IN": NaN}}'
    ),
}
REASONS = {
    "malformed": "not valid JSON",
    "empty": "empty",
    "array": "JSON list",
    "wrong-types": "'steps' is str",
    "no-timestamps": "no run window",
    "bad-timestamp": "not ISO 8601",
    "millis": "not a plausible Unix time",
    "agg-not-object": "'aggregate_metrics' is list",
    "duplicate-keys": "duplicate key 'aggregate_metrics'",
    "nested-600": "nested more than",
    "int-5000-digits": "integer of 5,000 digits",
    "timestamp-401-digits": "integer of 401 digits",
    "utf-16": "not UTF-8",
    "nan-count": "aggregate_metrics.TOK_IN is NaN",
    "huge": "over the",
    "symlink-out": "symlink",
    "fifo": "is a FIFO, not a regular file",
    "dir-named": "is a directory, not a regular file",
}


async def test_bad_files_untouched_good_runs_settled(stage: Stage) -> None:
    root, end, control, clock = stage.root, stage.end, stage.control, stage.clock
    good = write_run(root, "baes", "good", [(end - 100, end - 50), (end - 49, end)])
    await control.add([virtual_request(end - 60, "baes", 1000, 200, 2, 128)])
    bad: dict[str, Path] = {}
    for name, raw in BAD_FILES.items():
        path = root / "baes" / name / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(raw)
        bad[name] = path
    huge = root / "baes" / "huge" / "metrics.json"
    huge.parent.mkdir(parents=True)
    huge.write_bytes(b'{"run_id": "huge", "pad": "' + b"x" * MAX_FILE_BYTES + b'"}')
    bad["huge"] = huge
    outside = stage.root.parent / "elsewhere.json"
    outside.write_text(
        json.dumps({"run_id": "evil", "start_timestamp": end - 10, "end_timestamp": end})
    )
    link = root / "baes" / "symlink-out" / "metrics.json"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    bad["symlink-out"] = link
    # Not regular files: never opened (a FIFO's open would block the batch forever).
    for name, make in (("fifo", os.mkfifo), ("dir-named", os.mkdir)):
        odd = root / "baes" / name / "metrics.json"
        odd.parent.mkdir(parents=True)
        make(odd)
        bad[name] = odd
    # A symlinked directory pointing outside the root is not entered, only reported.
    (root / "ghspec").mkdir()
    (stage.root.parent / "outside-run").mkdir()
    (stage.root.parent / "outside-run" / "metrics.json").write_bytes(outside.read_bytes())
    (root / "ghspec" / "linked-dir").symlink_to(stage.root.parent / "outside-run")

    before = {name: os.lstat(p).st_mtime_ns for name, p in bad.items()}
    regular = {n: p for n, p in bad.items() if stat.S_ISREG(os.lstat(p).st_mode)}
    raw_before = {n: p.read_bytes() for n, p in regular.items()}
    outside_before = outside.read_bytes()

    reconciler = stage.reconciler()
    report = await reconciler.run_once()
    clock.advance(minutes=2)
    report2 = await reconciler.run_once()

    by_dir = {o.path.parent.name: o for o in report.outcomes}
    for name, reason in REASONS.items():
        outcome = by_dir[name]
        assert outcome.state in ("error", "skipped"), name
        assert reason in outcome.message, (name, outcome.message)
        assert "\n" not in outcome.message
    assert report.failed  # error files make the one-shot command exit 1
    for name, raw in raw_before.items():
        assert bad[name].read_bytes() == raw, name
    assert {name: os.lstat(p).st_mtime_ns for name, p in bad.items()} == before
    assert outside.read_bytes() == outside_before
    assert by_dir["linked-dir"].state == "skipped"
    assert "symlinked run directory" in by_dir["linked-dir"].message

    assert {o.state for o in report2.outcomes if o.path == good} == {"verified"}
    agg = json.loads(good.read_text())["aggregate_metrics"]
    assert (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"], agg["CACHED_TOKENS"]) == (
        1000,
        200,
        2,
        128,
    )


async def test_failed_requests_never_become_zero(stage: Stage) -> None:
    root, end, control, clock = stage.root, stage.end, stage.control, stage.clock
    path = write_run(root, "chatdev", "r1", [(end - 300, end)])
    await control.add([virtual_request(end - 10, "chatdev", 5000, 700, 3)])
    reconciler = stage.reconciler()

    await control.faults({"kind": "500"}, {"kind": "503"})  # both tries of the one request
    report = await reconciler.run_once()
    (outcome,) = report.outcomes
    assert outcome.failed and outcome.state == "pending" and outcome.totals is None
    doc = json.loads(path.read_text())
    assert doc["aggregate_metrics"]["TOK_IN"] == 0  # untouched, not "0 from the API"
    attempt = doc["usage_api_reconciliation"]["attempts"][-1]
    assert attempt["total_tokens_in"] is None
    assert "503" in attempt["error"]  # the last try's failure is what is recorded

    clock.advance(minutes=3)
    await control.faults({"kind": "bad_json"}, {"kind": "bad_json"})
    report = await reconciler.run_once()
    assert report.outcomes[0].failed
    # Two good polls after the failures: the failures neither broke nor advanced the chain.
    clock.advance(minutes=5)
    assert (await reconciler.run_once()).outcomes[0].state == "pending"
    clock.advance(minutes=2)
    assert (await reconciler.run_once()).outcomes[0].state == "verified"
    doc = json.loads(path.read_text())
    assert doc["aggregate_metrics"]["TOK_IN"] == 5000
    statuses = [a["status"] for a in doc["usage_api_reconciliation"]["attempts"]]
    assert statuses == ["pending", "pending", "pending", "verified"]


async def test_lower_total_never_overwrites_higher(stage: Stage) -> None:
    root, end, control, clock = stage.root, stage.end, stage.control, stage.clock
    path = write_run(root, "ghspec", "r1", [(end - 300, end)])
    await control.add(
        [
            virtual_request(end - 100, "ghspec", 9000, 900, 4),
            virtual_request(end - 10, "ghspec", 1000, 100, 1),
        ]
    )
    reconciler = stage.reconciler()
    await reconciler.run_once()
    clock.advance(minutes=2)
    assert (await reconciler.run_once()).outcomes[0].state == "verified"

    # The provider now reports less (one request vanished): a forced re-check warns.
    await control.reset()
    await control.add([virtual_request(end - 10, "ghspec", 1000, 100, 1)])
    clock.advance(minutes=2)
    for _ in range(3):
        report = await reconciler.run_once(Selection(force=True))
        assert report.outcomes[0].state == "warning", report.outcomes[0].message
        clock.advance(minutes=2)
    doc = json.loads(path.read_text())
    assert doc["aggregate_metrics"]["TOK_IN"] == 10000
    assert doc["usage_api_reconciliation"]["total_tokens_in"] == 10000
    assert "went down" in doc["usage_api_reconciliation"]["verification_message"]


async def test_auth_failure_stops_everything_and_writes_nothing(stage: Stage) -> None:
    root, end, control = stage.root, stage.end, stage.control
    path = write_run(root, "baes", "r1", [(end - 30, end)])
    raw = path.read_bytes()
    await control.keys(admin=[SIMULATOR_ADMIN_KEY], unscoped=["sk-proj-notadmin"])
    report = await stage.reconciler("sk-proj-notadmin").run_once()
    assert report.auth_error is not None and "api.usage.read" in report.auth_error
    assert "sk-proj-notadmin" not in report.auth_error
    assert path.read_bytes() == raw
    assert await control.usage_requests() == 1  # not retried


@pytest.mark.parametrize("mode", [0o640, 0o600])
async def test_write_keeps_mode_and_formatting(stage: Stage, mode: int) -> None:
    root, end, control = stage.root, stage.end, stage.control
    path = write_run(root, "baes", "r1", [(end - 30, end)], extra={"note": "caf\u00e9 \u2705"})
    # Re-save with 4-space indent, raw UTF-8 and a trailing newline: all must be kept.
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4, ensure_ascii=False) + "\n")
    path.chmod(mode)
    await control.add([virtual_request(end - 5, "baes", 10, 5, 1)])
    assert await stage.settle(stage.reconciler()) == ["verified"]
    text = path.read_text()
    assert (path.stat().st_mode & 0o777) == mode
    assert text.endswith("}\n") and '    "run_id"' in text and "caf\u00e9 \u2705" in text
    assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n"
    assert not [p for p in path.parent.iterdir() if p.name != "metrics.json"]  # no temp left


async def test_a_read_only_run_file_is_never_replaced(stage: Stage) -> None:
    # Seen: a mode-0444 file replaced without a word by a process that may write the
    # directory (as root, or by group). Polled or not, it is left exactly as it is.
    root, end, control, clock = stage.root, stage.end, stage.control, stage.clock
    path = write_run(root, "baes", "protected", [(end - 30, end)])
    await control.add([virtual_request(end - 5, "baes", 10, 5, 1)])
    path.chmod(0o444)
    before, raw = os.stat(path), path.read_bytes()
    reconciler = stage.reconciler()
    for _ in range(2):
        await reconciler.run_once()
        clock.advance(minutes=2)
    after = os.stat(path)
    assert path.read_bytes() == raw
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_mode,
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]

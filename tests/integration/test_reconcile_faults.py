"""`reconcile` under faults: a failing API never regresses a settled run, a failed write
is a failure of the command, and one absurd window cannot poison the batch."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import Stage
from tests.support.runs import virtual_request, write_run
from tests.support.smallfs import read_only, read_write, small_filesystem
from tokensettle.reconcile import Selection
from tokensettle.render import report_human, report_json


def _block(path: Path) -> dict[str, object]:
    block = json.loads(path.read_bytes())["usage_api_reconciliation"]
    assert isinstance(block, dict)
    return block


async def test_a_forced_repoll_that_fails_keeps_the_settled_numbers(stage: Stage) -> None:
    # `reconcile --force` on verified runs while the API failed turned them back to
    # `pending`, and `report` then showed 0 tokens for them.
    end = stage.end
    path = write_run(stage.root, "baes", "v1", [(end - 100, end)])
    await stage.control.add([virtual_request(end - 50, "baes", 4000, 400, 3)])
    reconciler = stage.reconciler()
    assert await stage.settle(reconciler) == ["verified"]
    before = json.loads(path.read_bytes())
    await stage.control.faults(*[{"kind": "500"}] * 10)
    report = await reconciler.run_once(Selection(force=True))
    (outcome,) = report.outcomes
    assert outcome.failed and outcome.state == "verified"
    after = json.loads(path.read_bytes())
    block = after["usage_api_reconciliation"]
    assert block["verification_status"] == "verified"
    assert block["total_tokens_in"] == 4000 and block["total_tokens_out"] == 400
    assert after["aggregate_metrics"] == before["aggregate_metrics"]
    assert block["verified_at"] == before["usage_api_reconciliation"]["verified_at"]
    assert block["attempts"][-1]["error"] and block["attempts"][-1]["total_tokens_in"] is None
    assert after["verification_status"] == "verified"


async def test_failed_writes_make_the_command_fail_and_change_nothing(stage: Stage) -> None:
    # `reconcile` exited 0 while every write failed.
    with small_filesystem(stage.root, "4m"):
        end = stage.end
        path = write_run(stage.root, "baes", "w1", [(end - 100, end)])
        await stage.control.add([virtual_request(end - 50, "baes", 700, 70, 1)])
        raw = path.read_bytes()
        read_only(stage.root)
        try:
            report = await stage.reconciler().run_once()
        finally:
            read_write(stage.root)
        (outcome,) = report.outcomes
        assert report.failed and outcome.failed
        assert outcome.write_error and "Read-only" in outcome.write_error
        assert not outcome.written
        assert path.read_bytes() == raw
        # What the user reads says so, not only the log on stderr.
        shown = report_human(report, stage.clock.now)
        assert "write failed, file unchanged: " in shown and "1 write(s) failed" in shown
        assert report_json(report, stage.clock.now)["runs"][0]["write_error"] == outcome.write_error


async def test_one_absurd_window_is_that_runs_error_not_the_batchs(stage: Stage) -> None:
    # A step dated 2001 merged with every due run's window; the fetch gave up after 500
    # pages and no run in the batch settled.
    end = stage.end
    good = write_run(stage.root, "baes", "good", [(end - 100, end)])
    bad = write_run(
        stage.root,
        "baes",
        "from-2001",
        [(1_000_000_000.0, 1_000_000_060.0), (end - 3000, end - 2900)],
    )
    raw = bad.read_bytes()
    await stage.control.add([virtual_request(end - 50, "baes", 900, 90, 1)])
    reconciler = stage.reconciler()
    report = await reconciler.run_once()
    states = {o.path.parent.name: o for o in report.outcomes}
    assert states["from-2001"].state == "error" and states["from-2001"].failed
    assert "MAX_WINDOW" in states["from-2001"].message
    assert states["good"].state == "pending"
    assert report.requests == 1
    assert bad.read_bytes() == raw
    assert (
        await stage.settle(reconciler) == ["error", "verified"]
        or _block(good)["verification_status"] == "verified"
    )


async def test_provenance_names_only_the_runs_own_keys(stage: Stage) -> None:
    end = stage.end
    a = write_run(stage.root, "baes", "a", [(end - 100, end)])
    write_run(stage.root, "chatdev", "c", [(end - 300, end - 200)])
    await stage.control.add([virtual_request(end - 50, "baes", 900, 90, 1)])
    await stage.reconciler().run_once()
    query = _block(a)["provenance"]
    assert isinstance(query, dict)
    assert query["query"]["api_key_ids"] == ["key_baesTEST00001"]
    assert query["query"]["api_key_ids_of_other_runs"] == 1

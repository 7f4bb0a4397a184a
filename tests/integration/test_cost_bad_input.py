"""Issue 4's bad input, end to end through the simulator: each problem is named in the
block and the log, and nothing already correct is overwritten."""

from __future__ import annotations

import json

from structlog.testing import capture_logs

from tests.integration.conftest import Stage
from tests.support.runs import virtual_request, write_run


async def test_unknown_model_is_reported_never_priced_at_zero(stage: Stage) -> None:
    end = stage.end
    path = write_run(stage.root, "baes", "r1", [(end - 60, end)])
    doc = json.loads(path.read_text())
    doc["aggregate_metrics"]["COST_USD"] = 0.42  # whatever was there stays
    path.write_text(json.dumps(doc, indent=2))
    request = virtual_request(end - 5, "baes", 1000, 100, 1)
    request["model"] = "acme-unknown-2026-01-01"
    await stage.control.add([request])
    with capture_logs() as logs:
        assert await stage.settle(stage.reconciler()) == ["verified"]
    after = json.loads(path.read_text())
    assert after["aggregate_metrics"]["TOK_IN"] == 1000
    assert after["aggregate_metrics"]["COST_USD"] == 0.42
    cost = after["usage_api_reconciliation"]["cost"]
    assert cost["complete"] is False
    assert "acme-unknown-2026-01-01" in cost["unpriced"]
    assert [e for e in logs if e["event"] == "run.unpriced" and "acme-unknown" in e["detail"]]


async def test_bad_local_counts_and_cached_over_input_are_named(stage: Stage) -> None:
    end = stage.end
    path = write_run(stage.root, "chatdev", "r1", [(end - 60, end)])
    doc = json.loads(path.read_text())
    doc["aggregate_metrics"].update({"TOK_IN": -5, "TOK_OUT": 12.5, "API_CALLS": 3})
    path.write_text(json.dumps(doc, indent=2))
    request = virtual_request(end - 5, "chatdev", 1000, 100, 3, cached=1500)  # cached > input
    await stage.control.add([request])
    with capture_logs() as logs:
        assert await stage.settle(stage.reconciler()) == ["verified"]
    block = json.loads(path.read_text())["usage_api_reconciliation"]
    comparison = block["local_vs_provider"]
    assert comparison["verdict"] == "invalid_local_counts"
    assert {i["field"] for i in comparison["invalid"]} == {"TOK_IN", "TOK_OUT"}
    assert comparison["fields"]["API_CALLS"]["diff"] == 0  # the valid count is still compared
    assert block["token_breakdown"]["problems"]
    events = {e["event"] for e in logs}
    assert {"run.local_counts_invalid", "run.usage_problem"} <= events


async def test_local_counts_are_kept_and_compared(stage: Stage) -> None:
    end = stage.end
    path = write_run(stage.root, "ghspec", "r1", [(end - 60, end)])
    doc = json.loads(path.read_text())
    doc["aggregate_metrics"].update({"TOK_IN": 1040, "TOK_OUT": 100, "API_CALLS": 2})
    path.write_text(json.dumps(doc, indent=2))
    await stage.control.add([virtual_request(end - 5, "ghspec", 1000, 100, 2)])
    assert await stage.settle(stage.reconciler()) == ["verified"]
    after = json.loads(path.read_text())
    comparison = after["usage_api_reconciliation"]["local_vs_provider"]
    assert comparison["local"] == {"TOK_IN": 1040, "TOK_OUT": 100, "API_CALLS": 2}
    assert comparison["fields"]["TOK_IN"]["diff"] == 40
    assert comparison["fields"]["TOK_IN"]["diff_pct"] == 4.0
    assert comparison["verdict"] == "match"  # within the default 5%
    assert after["aggregate_metrics"]["TOK_IN"] == 1000  # the provider's count is written

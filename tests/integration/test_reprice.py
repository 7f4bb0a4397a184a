"""`reprice` on real field files: the inherited COST_USD of 0.0 gets its real value."""

from __future__ import annotations

import json
import shutil
from decimal import Decimal
from pathlib import Path

from tokensettle.discovery import scan_all
from tokensettle.reprice import reprice_runs

PRICED = "runs__baes__6f0b2490-1548-4b4f-a943-a688ec972355__metrics@427bd02.json"
NO_MODEL = "runs__chatdev__4df331a3-1d72-4154-8a6a-c61f80ef2228__metrics@3618a19.json"
PENDING = "runs__ghspec__a1b3972f-f772-4a7c-956e-1828a8db7a7d__metrics@342cda3.json"


def _tree(fixtures: Path, root: Path) -> dict[str, Path]:
    out = {}
    for name in (PRICED, NO_MODEL, PENDING):
        fw, run = name.split("__")[1:3]
        path = root / fw / run / "metrics.json"
        path.parent.mkdir(parents=True)
        shutil.copyfile(fixtures / name, path)
        out[name] = path
    return out


def test_dry_run_shows_and_writes_nothing_then_reprice_writes(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    paths = _tree(fixtures_dir, tmp_path)
    before = {n: p.read_bytes() for n, p in paths.items()}
    results = {r.run_id[:8]: r for r in reprice_runs(scan_all([tmp_path]), 60, dry_run=True)}
    assert set(results) == {"6f0b2490", "4df331a3"}  # the pending run is not priced
    assert results["6f0b2490"].old_usd == Decimal("0.0")
    assert results["6f0b2490"].new_usd == Decimal("0.0054939")
    assert results["4df331a3"].new_usd is None  # no model recorded: unpriced, not $0
    assert {n: p.read_bytes() for n, p in paths.items()} == before

    reprice_runs(scan_all([tmp_path]), 60, dry_run=False)
    doc = json.loads(paths[PRICED].read_text())
    assert doc["aggregate_metrics"]["COST_USD"] == 0.0054939
    assert doc["cost_breakdown"]["output_cost"] == 0.003201
    assert (
        doc["usage_api_reconciliation"]["cost"]["basis"] == "configured model and aggregate counts"
    )
    assert paths[NO_MODEL].read_bytes() == before[NO_MODEL]
    assert paths[PENDING].read_bytes() == before[PENDING]
    # Only the cost fields changed, and in the file's own style.
    original = json.loads(before[PRICED])
    for key in ("steps", "usage_api_verification", "run_id", "model"):
        assert doc[key] == original[key]
    assert paths[PRICED].read_text() == json.dumps(doc, indent=2)

    again = reprice_runs(scan_all([tmp_path]), 60, dry_run=False)
    assert not any(r.written for r in again)  # idempotent


def test_model_option_prices_runs_that_record_none(fixtures_dir: Path, tmp_path: Path) -> None:
    _tree(fixtures_dir, tmp_path)
    results = {
        r.run_id[:8]: r
        for r in reprice_runs(scan_all([tmp_path]), 60, dry_run=True, assume_model="gpt-4o-mini")
    }
    # 258,207 in (37,504 cached) / 73,872 out at gpt-4o-mini prices, by hand:
    expected = (
        Decimal(258207 - 37504) * Decimal("0.15")
        + Decimal(37504) * Decimal("0.075")
        + Decimal(73872) * Decimal("0.60")
    ) / Decimal(10**6)
    assert results["4df331a3"].new_usd == expected


def test_a_claude_run_is_priced_in_anthropics_table(tmp_path: Path) -> None:
    """A run settled against Anthropic (its provenance says so) is repriced there, not
    looked up among OpenAI's models and left unpriced."""
    path = tmp_path / "claudebench" / "c-1" / "metrics.json"
    path.parent.mkdir(parents=True)
    doc = {
        "run_id": "c-1",
        "model": "claude-haiku-4-5-20251001",
        "start_timestamp": "2026-11-30T10:00:00Z",
        "end_timestamp": "2026-11-30T10:05:00Z",
        "aggregate_metrics": {"TOK_IN": 3_200, "TOK_OUT": 500, "API_CALLS": 0, "COST_USD": 0.0},
        "usage_api_reconciliation": {
            "verification_status": "verified",
            "provenance": {"provider": "anthropic"},
        },
    }
    path.write_text(json.dumps(doc, indent=2))
    (result,) = reprice_runs(scan_all([tmp_path]), 60, dry_run=True)
    assert result.new is not None and result.new.complete, result.note
    assert result.new_usd is not None and result.new_usd > 0
    assert result.new.provider == "anthropic"

"""The torture benchmarks at toy sizes: they still run, and what they check still holds.

The figures belong to bench/README.md; here only the invariants each script checks are
asserted (every run verified with exactly its truth, no failed start, no broken file).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import clean_environ

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_bench(script: str, args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args.split()],
        capture_output=True,
        env=clean_environ(),
        cwd=BENCH.parent,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:]
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary


def test_kill_loop_at_toy_size() -> None:
    summary = run_bench("kill_loop.py", "--cycles 3 --runs 9 --seed 1")
    shown = json.dumps(summary)[-3000:]
    assert summary["starts"] == 4, shown
    assert summary["failed_starts"] == 0, summary["failed_start_examples"]
    assert summary["final"]["verified_exact"] == 9, summary["final"]
    assert summary["invalid_json_reads"] == 0, shown
    assert summary["token_field_decreases"] == 0, shown
    assert summary["file_reads"] > 0, shown


def test_burst_at_toy_size() -> None:
    # A copy into the tree made watchdog print a RuntimeWarning on stderr (issue 7 item
    # 8); it goes through the structured log now, and burst.py counts any other line.
    summary = run_bench("burst.py", "--runs 60 --mode copy --tick 1s --stability 2s --idle 0.5")
    (result,) = summary["results"]
    assert result["verified_exact"] == 60, result
    assert result["usage_api_requests_until_all_verified"] >= 2  # a poll and its confirmation
    assert result["healthz"]["samples"] > 0
    assert result["non_json_lines"] == 0, result["non_json_examples"]

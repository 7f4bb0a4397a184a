"""The real `tokensettle report` command over a real tree: statuses as `list` gives them,
the paper formats, figures, and a clear error for an unwritable output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e
EXE = shutil.which("tokensettle", path=str(Path(sys.executable).parent)) or "tokensettle"
NOW = datetime.now(UTC)


def _doc(run_id: str, ended: datetime, **block: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "run_id": run_id,
        "start_timestamp": (ended - timedelta(minutes=20)).isoformat(),
        "end_timestamp": ended.isoformat(),
        "aggregate_metrics": {"TOK_IN": 0, "TOK_OUT": 0},
    }
    if block:
        doc["usage_api_reconciliation"] = block
    return doc


def _verified(tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return {
        "verification_status": "verified",
        "verified_at": (NOW - timedelta(hours=1)).isoformat(),
        "total_tokens_in": tokens_in,
        "total_tokens_out": tokens_out,
        "total_api_calls": 3,
        "total_cached_tokens": 0,
    }


def _write(root: Path, framework: str, run_id: str, content: dict[str, Any] | str) -> Path:
    path = root / framework / run_id / "metrics.json"
    path.parent.mkdir(parents=True)
    text = content if isinstance(content, str) else json.dumps(content, indent=2)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    recent = NOW - timedelta(hours=2)
    _write(root, "baes", "verified-1", _doc("verified-1", recent, **_verified(1_000, 100)))
    _write(root, "baes", "verified-2", _doc("verified-2", recent, **_verified(3_000, 300)))
    _write(root, "baes", "no-window", {"run_id": "no-window", "steps": []})
    _write(root, "baes", "broken", '{"run_id": "broken", ')
    _write(root, "chatdev", "pending-1", _doc("pending-1", recent))
    _write(root, "chatdev", "weird", _doc("weird", recent, verification_status="bogus"))
    _write(root, "chatdev", "old", _doc("old", NOW - timedelta(days=3)))
    target = _write(root, "chatdev", "real", _doc("real", recent, **_verified(50, 5)))
    link = root / "chatdev" / "linked" / "metrics.json"
    link.parent.mkdir()
    link.symlink_to(target)
    return root


def _run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))}
    env["TOKENSETTLE_RUNS_DIRS"] = str(root)
    env["TOKENSETTLE_LOG_FORMAT"] = "json"
    return subprocess.run(
        [EXE, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_report_statuses_agree_with_list(tree: Path) -> None:
    listed = _run(tree, "list", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    by_list = {Path(r["path"]).parent.name: r["status"] for r in json.loads(listed.stdout)["runs"]}
    reported = _run(tree, "report", "--format", "json")
    # The unreadable files are rows of the report, and they make it exit 1 (incomplete).
    assert reported.returncode == 1, reported.stderr
    runs = json.loads(reported.stdout)["runs"]
    by_report = {r["run_id"]: r["status"] for r in runs}
    assert by_list == {
        "verified-1": "verified",
        "verified-2": "verified",
        "no-window": "error",
        "broken": "error",
        "pending-1": "pending",
        "weird": "pending",
        "old": "too_old",
        "real": "verified",
        "linked": "skipped",
    }
    assert by_report == by_list
    # ...and on the run id, which an unreadable file gets from its directory in both.
    by_id = {r["run_id"]: r["status"] for r in json.loads(listed.stdout)["runs"]}
    assert by_id == by_report
    errors = {r["run_id"]: r["message"] for r in runs if r["status"] == "error"}
    assert "no run window" in errors["no-window"]
    assert "not valid JSON" in errors["broken"]
    baes = json.loads(reported.stdout)["frameworks"][0]
    assert baes["stats"]["tokens_in"]["mean"] == 2_000
    assert {x["run_id"]: x["reason"] for x in baes["counted"]["left_out"]} == {
        "no-window": "error",
        "broken": "error",
    }


def test_report_latex_with_figures(tree: Path, tmp_path: Path) -> None:
    figures = tmp_path / "figures" / "new"
    out = tmp_path / "table.tex"
    made = _run(tree, "report", "--format", "latex", "--out", str(out), "--figures", str(figures))
    assert made.returncode == 1, made.stderr  # the tree holds two unreadable files
    assert made.stdout == ""
    events = [json.loads(line) for line in made.stderr.splitlines()]
    (written,) = [e for e in events if e["event"] == "report.figures_written"]
    assert written["figures"] == 8 and written["path"] == str(figures)
    latex = out.read_text(encoding="utf-8")
    assert r"\begin{tabular}" in latex
    assert "% counted baes: verified-1, verified-2" in latex
    assert "% left out baes / broken: error: not valid JSON" in latex
    svgs = sorted(figures.glob("*.svg"))
    assert len(svgs) == 8
    for svg in svgs:
        root = ET.parse(svg).getroot()  # noqa: S314 (our own output)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_figures_into_a_path_under_a_file_is_one_line_and_exit_2(
    tree: Path, tmp_path: Path
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("x")
    result = _run(tree, "report", "--figures", str(blocked / "figs"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = json.loads(result.stderr.strip().splitlines()[-1])
    assert last["error"].startswith(f"report --figures {blocked / 'figs'}: ")

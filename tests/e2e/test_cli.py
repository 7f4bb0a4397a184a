"""The real `tokensettle` command as cron runs it: exit codes, output, files."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.support.runs import KEYS, SimControl, virtual_request, write_run
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator

pytestmark = pytest.mark.e2e
EXE = shutil.which("tokensettle", path=str(Path(sys.executable).parent)) or "tokensettle"


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Env:
    root: Path
    sim: RunningSimulator
    control: SimControl
    env: dict[str, str]

    async def run(self, *args: str, **extra: str) -> Result:
        proc = await asyncio.create_subprocess_exec(
            EXE,
            *args,
            env={**self.env, **extra},
            cwd=self.root.parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def cli(tmp_path: Path) -> AsyncIterator[Env]:
    root = tmp_path / "runs"
    root.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))}
    env = {
        **base,
        "TOKENSETTLE_RUNS_DIRS": str(root),
        "TOKENSETTLE_ADMIN_KEY": SIMULATOR_ADMIN_KEY,
        "TOKENSETTLE_MIN_AGE": "0s",
        "TOKENSETTLE_STABILITY_INTERVAL": "1s",
        "TOKENSETTLE_LOG_FORMAT": "json",
        **{f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in KEYS.items()},
    }
    async with RunningSimulator() as sim, aiohttp.ClientSession() as session:
        env["TOKENSETTLE_API_BASE_URL"] = sim.base_url
        yield Env(root, sim, SimControl(session, sim.root_url), env)


async def test_cron_story_pending_then_verified(cli: Env) -> None:
    end = time.time() - 1800
    path = write_run(cli.root, "chatdev", "run-1", [(end - 200, end - 100), (end - 99, end)])
    await cli.control.add(
        [
            virtual_request(end - 150, "chatdev", 4000, 800, 2),
            virtual_request(end - 5, "chatdev", 600, 90, 1),
        ]
    )
    listed = await cli.run("list", "--json")
    assert listed.code == 0
    (row,) = json.loads(listed.out)["runs"]
    assert (
        row["status"] == "pending" and row["attempts"] == 0 and 1790 <= row["age_seconds"] <= 1900
    )

    first = await cli.run("reconcile", "--json")
    assert first.code == 0, first.err
    report = json.loads(first.out)
    assert report["requests"] == 1 and report["counts"] == {"pending": 1}
    await asyncio.sleep(1.1)  # STABILITY_INTERVAL is 1s: the policy, not a race
    second = await cli.run("reconcile")
    assert second.code == 0, second.err
    assert "verified" in second.out and "4,600 in / 890 out" in second.out
    agg = json.loads(path.read_text())["aggregate_metrics"]
    assert (agg["TOK_IN"], agg["TOK_OUT"], agg["API_CALLS"]) == (4600, 890, 3)
    for line in second.err.splitlines():  # logs are JSON lines on stderr
        json.loads(line)
    assert (await cli.run("list")).out.startswith("no runs")
    assert "verified" in (await cli.run("list", "--all")).out


async def test_missing_scope_exits_3_and_writes_nothing(cli: Env) -> None:
    end = time.time() - 1800
    path = write_run(cli.root, "baes", "run-1", [(end - 60, end)])
    raw = path.read_bytes()
    await cli.control.keys(admin=[SIMULATOR_ADMIN_KEY], unscoped=["sk-proj-secretvalue123"])
    result = await cli.run("reconcile", TOKENSETTLE_ADMIN_KEY="sk-proj-secretvalue123")
    assert result.code == 3
    assert "api.usage.read" in result.out + result.err
    assert "secretvalue123" not in result.out + result.err
    assert path.read_bytes() == raw


async def test_bad_setting_exits_2_with_one_line(cli: Env) -> None:
    result = await cli.run("reconcile", TOKENSETTLE_MIN_AGE="30")
    assert result.code == 2
    assert result.err.count("\n") == 1 and "min_age" in result.err and "unit" in result.err
    missing = await cli.run("reconcile", TOKENSETTLE_ADMIN_KEY="")
    assert missing.code == 2 and "admin_key" in missing.err
    usage = await cli.run("reconcile", "--min-age", "soon")
    assert usage.code == 2


async def test_malformed_file_exits_1_and_stays_identical(cli: Env) -> None:
    end = time.time() - 1800
    write_run(cli.root, "ghspec", "good", [(end - 60, end)])
    await cli.control.add([virtual_request(end - 30, "ghspec", 100, 10, 1)])
    bad = cli.root / "ghspec" / "bad" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b'{"run_id": "bad", ')
    result = await cli.run("reconcile", "--json")
    assert result.code == 1
    report = json.loads(result.out)
    states = {r["path"].split("/")[-2]: r["status"] for r in report["runs"]}
    assert states == {"good": "pending", "bad": "error"}
    assert bad.read_bytes() == b'{"run_id": "bad", '
    assert any("run.unreadable" in line for line in result.err.splitlines())


async def test_dry_run_writes_nothing(cli: Env) -> None:
    end = time.time() - 1800
    path = write_run(cli.root, "baes", "r", [(end - 60, end)])
    await cli.control.add([virtual_request(end - 30, "baes", 100, 10, 1)])
    raw = path.read_bytes()
    result = await cli.run("reconcile", "--dry-run")
    assert result.code == 0 and "[dry run]" in result.out
    assert path.read_bytes() == raw

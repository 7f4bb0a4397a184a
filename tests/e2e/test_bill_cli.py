"""`tokensettle bill` as a real process against the simulator: output and exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.support.daemon import EXE
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator

pytestmark = pytest.mark.e2e
DAY = 86_400
MINI = "gpt-4o-mini-2024-07-18"
UNSCOPED = "sk-proj-billsecret-0042"


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Bill:
    sim: RunningSimulator
    session: aiohttp.ClientSession
    env: dict[str, str]
    cwd: Path

    async def run(self, *args: str, command: str = "bill", **extra: str) -> Result:
        proc = await asyncio.create_subprocess_exec(
            EXE,
            command,
            *args,
            env={**self.env, **extra},
            cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())

    async def knobs(self, **billing: object) -> None:
        async with self.session.post(f"{self.sim.root_url}/_sim/billing", json=billing) as r:
            assert r.status == 200, await r.text()


@pytest.fixture
async def bill(tmp_path: Path) -> AsyncIterator[Bill]:
    today = int(time.time()) // DAY * DAY
    requests = [
        {
            "time": today - days * DAY + 7200,
            "api_key_id": "key_e2e",
            "project_id": "proj_e2e",
            "model": MINI,
            "usage": {
                "input_tokens": 3_000_000,
                "output_tokens": 1_000_000,
                "num_model_requests": 5,
            },
            **({"batch": True} if days == 4 else {}),
        }
        for days in (1, 4, 9)
    ]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))}
    async with RunningSimulator() as sim, aiohttp.ClientSession() as session:
        async with session.post(f"{sim.root_url}/_sim/requests", json={"requests": requests}) as r:
            assert r.status == 200
        async with session.post(
            f"{sim.root_url}/_sim/keys",
            json={"admin_keys": [SIMULATOR_ADMIN_KEY], "unscoped_keys": [UNSCOPED]},
        ) as r:
            assert r.status == 200
        env = {
            **base,
            "TOKENSETTLE_API_BASE_URL": sim.base_url,
            "TOKENSETTLE_ADMIN_KEY": SIMULATOR_ADMIN_KEY,
            "TOKENSETTLE_LOG_FORMAT": "json",
            "TOKENSETTLE_REQUEST_ATTEMPTS": "1",
            "TOKENSETTLE_RUNS_DIRS": str(tmp_path / "runs"),
        }
        (tmp_path / "runs").mkdir()
        yield Bill(sim, session, env, tmp_path)


async def test_exact_prices_exit_0(bill: Bill) -> None:
    result = await bill.run("--days", "10")
    assert result.code == 0, result.err
    assert "Verdict: ok (3 day-project pairs compared: 3 ok)" in result.out
    assert f"{MINI}" in result.out and "proj_e2e" in result.out
    for line in result.err.splitlines():  # logs are JSON lines on stderr, never on stdout
        json.loads(line)


async def test_a_price_error_exits_1(bill: Bill) -> None:
    await bill.knobs(price_factors={MINI: 1.25})
    result = await bill.run("--days", "10", "--json")
    assert result.code == 1, result.err
    doc = json.loads(result.out)
    assert doc["verdict"] == "mismatch" and doc["counts"]["mismatch"] == 3
    assert {round(c["diff_pct"], 2) for c in doc["checks"]} == {-20.0}  # 1/1.25 - 1


async def test_the_days_and_tolerance_are_honoured(bill: Bill) -> None:
    await bill.knobs(price_factors={MINI: 1.03})
    assert (await bill.run("--days", "10")).code == 1  # 2.9% off: beyond 2%
    loose = await bill.run("--days", "10", TOKENSETTLE_BILL_TOLERANCE="0.05")
    assert loose.code == 0 and "tolerance 5.00%" in loose.out
    recent = await bill.run("--days", "3", "--json")  # only the day 1 ago
    assert len(json.loads(recent.out)["checks"]) == 1


async def test_a_key_without_the_scope_exits_3(bill: Bill) -> None:
    result = await bill.run(TOKENSETTLE_ADMIN_KEY=UNSCOPED)
    assert result.code == 3
    assert result.out == ""
    lines = [json.loads(line) for line in result.err.splitlines()]  # JSON lines only
    assert lines[-1]["event"] == "bill.auth_failed" and "api.usage.read" in lines[-1]["error"]
    assert UNSCOPED not in result.err


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("--days", "0"), {}, "--days must be between 1 and 366"),
        ((), {"TOKENSETTLE_ADMIN_KEY": ""}, "admin_key"),
        ((), {"TOKENSETTLE_BILL_TOLERANCE": "2%"}, "bill_tolerance"),
    ],
)
async def test_usage_and_config_errors_exit_2(
    bill: Bill, args: tuple[str, ...], env: dict[str, str], needle: str
) -> None:
    result = await bill.run(*args, **env)
    assert result.code == 2, result
    assert needle in result.err and "Traceback" not in result.err


async def test_an_unreachable_api_exits_1_with_one_line(bill: Bill) -> None:
    async with RunningSimulator() as gone:
        url = gone.base_url
    result = await bill.run(TOKENSETTLE_API_BASE_URL=url)
    assert result.code == 1
    (line,) = result.err.strip().splitlines()[-1:]
    assert "bill:" in line and "Traceback" not in result.err


async def test_the_parser_loads_nothing_heavy() -> None:
    """`tokensettle --version` and usage errors stay fast when the CLI names `bill`."""
    code = (
        "import argparse, sys; import tokensettle.bill_cli as b; "
        "b.add_arguments(argparse.ArgumentParser()); "
        "print(sorted(m for m in ('aiohttp', 'pydantic', 'genai_prices') if m in sys.modules))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0 and out.decode().strip() == "[]"


# ------------------------------------------------------------------ report --bill


async def test_report_carries_the_bill_check_as_a_section(bill: Bill) -> None:
    as_json = await bill.run("--format", "json", "--bill", "10", command="report")
    assert as_json.code == 0, as_json.err
    doc = json.loads(as_json.out)
    assert doc["bill"]["verdict"] == "ok" and doc["bill"]["counts"]["ok"] == 3
    assert "frameworks" in doc  # the report itself is all there
    await bill.knobs(price_factors={MINI: 1.25})
    as_md = await bill.run("--format", "markdown", "--bill", "10", command="report")
    assert as_md.code == 0, as_md.err
    assert "### Bill check" in as_md.out and "mismatch" in as_md.out
    as_html = await bill.run("--format", "html", "--bill", command="report")
    assert as_html.code == 0 and "<h2>Bill check</h2>" in as_html.out
    assert as_html.out.rstrip().endswith("</html>")


async def test_report_says_why_the_bill_is_missing_and_still_succeeds(bill: Bill) -> None:
    result = await bill.run("--bill", command="report", TOKENSETTLE_ADMIN_KEY=UNSCOPED)
    assert result.code == 0, result.err
    assert "Bill check: not available" in result.out and "api.usage.read" in result.out
    assert UNSCOPED not in result.out + result.err


async def test_report_bill_in_a_format_without_sections_is_a_usage_error(bill: Bill) -> None:
    result = await bill.run("--format", "csv", "--bill", command="report")
    assert result.code == 2 and result.out == ""
    (line,) = result.err.splitlines()
    assert "report --bill: not with --format csv" in line

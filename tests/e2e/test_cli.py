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


# ------------------------------------------------------------------ misuse: one line, no traceback


def the_line(result: Result) -> str:
    """The one line a command that gave up printed on stderr: plain, or a JSON log line
    (the CLI logs JSON when stderr is not a terminal); never a traceback."""
    assert "Traceback" not in result.out + result.err, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    try:
        event = json.loads(lines[0])
    except json.JSONDecodeError:
        return lines[0]
    assert event["level"] == "error"
    return str(event["error"])


async def run_all(cli: Env, cases: list[tuple[tuple[str, ...], dict[str, str]]]) -> list[Result]:
    """Run the commands a few at a time (each is a whole interpreter start)."""
    gate = asyncio.Semaphore(3)

    async def one(args: tuple[str, ...], env: dict[str, str]) -> Result:
        async with gate:
            return await cli.run(*args, **env)

    return await asyncio.gather(*(one(args, env) for args, env in cases))


async def test_configuration_mistakes_exit_2_with_one_line_naming_them(
    cli: Env, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("min_age = \n[[[")
    typo_fw = tmp_path / "typo-fw.toml"
    typo_fw.write_text('[frameworks.chatdev]\napi_key_id = ["key_chatdevTEST001"]\n')
    typo_key = tmp_path / "typo-key.toml"
    typo_key.write_text("stable_pols = 3\n")
    proxy = "http://proxyuser:hunter2pw@127.0.0.1:3128/v1"
    cases: list[tuple[tuple[str, ...], dict[str, str], list[str]]] = [
        (("run",), {"TOKENSETTLE_HTTP_ADDR": "127.0.0.1:99999"}, ["http_addr", "1 to 65535"]),
        (("list",), {"TOKENSETTLE_MIN_AEG": "5m"}, ["did you mean TOKENSETTLE_MIN_AGE?"]),
        (("run",), {"TOKENSETTLE_CONFIG": str(typo_key)}, ["stable_pols", "stable_polls"]),
        (("reconcile",), {"TOKENSETTLE_CONFIG": str(typo_fw)}, ["api_key_id", "api_key_ids"]),
        (("reconcile",), {"TOKENSETTLE_API_BASE_URL": proxy}, ["api_base_url", "user:password@"]),
        (("report", "--config", str(tmp_path)), {}, [str(tmp_path), "is a directory"]),
        (("reprice", "--config", str(broken)), {}, [str(broken), "is not valid TOML"]),
        (("run",), {"TOKENSETTLE_ADMIN_KEY": "sk-admin-abc\ndef"}, ["admin_key", "not shown"]),
    ]
    results = await run_all(cli, [(args, env) for args, env, _ in cases])
    for (args, env, words), result in zip(cases, results, strict=True):
        assert result.code == 2, (args, env, result)
        line = daemon_config_error(result) if args == ("run",) else the_line(result)
        assert all(w in line for w in words), (args, line)
        assert "hunter2pw" not in result.out + result.err


def daemon_config_error(result: Result) -> str:
    """The daemon logs to stdout, whoever found the mistake (the settings or the daemon's
    own checks): one `daemon.config_error` line, then `daemon.stopped` with the code."""
    assert "Traceback" not in result.out + result.err and result.err == "", result.err
    error, stopped = (json.loads(line) for line in result.out.splitlines())
    assert error["event"] == "daemon.config_error" and error["level"] == "error", error
    assert stopped["event"] == "daemon.stopped" and stopped["exit_code"] == result.code
    return str(error["error"])


async def test_paths_that_cannot_be_used_exit_2_with_one_line_naming_them(
    cli: Env, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases: list[tuple[tuple[str, ...], str]] = [
        (("list", "--runs-dir", str(missing)), f"{missing} does not exist"),
        (("reconcile", "--runs-dir", str(a_file)), f"{a_file} is not a directory"),
        (("report", "--runs-dir", str(missing)), f"{missing} does not exist"),
        (("report", "--out", str(missing / "r.html")), f"directory {missing} does not exist"),
        (("report", "--format", "csv", "--out", str(tmp_path)), "is a directory"),
        (("reprice", "--runs-dir", str(missing)), "runs_dirs (TOKENSETTLE_RUNS_DIRS"),
    ]
    results = await run_all(cli, [(args, {}) for args, _ in cases])
    for (args, words), result in zip(cases, results, strict=True):
        assert result.code == 2, (args, result)
        assert words in the_line(result), args
    assert not missing.exists()


async def test_usage_mistakes_exit_2_without_a_traceback(cli: Env) -> None:
    cases: list[tuple[str, ...]] = [("reconcile", "--min-age", "soon"), ("report", "--bogus")]
    for result in await run_all(cli, [(args, {}) for args in cases]):
        assert result.code == 2
        assert "Traceback" not in result.err and "usage: tokensettle" in result.err


async def test_doctor_renders_a_configuration_error_and_exits_2(cli: Env) -> None:
    result = await cli.run("doctor", TOKENSETTLE_STATE_DRI="/var/lib/tokensettle")
    assert result.code == 2
    assert result.out.startswith(
        "FAIL  config: TOKENSETTLE_STATE_DRI (environment): unknown setting; "
        "did you mean TOKENSETTLE_STATE_DIR?"
    )
    assert "Traceback" not in result.err


async def test_a_run_or_framework_that_does_not_exist_exits_1(cli: Env) -> None:
    end = time.time() - 1800
    write_run(cli.root, "chatdev", "run-1", [(end - 60, end)])
    write_run(cli.root, "baes", "run-2", [(end - 60, end)])
    there = f"frameworks under {cli.root}: baes, chatdev"
    cases: list[tuple[tuple[str, ...], str]] = [
        (("list", "chatdve"), f"no such run: framework chatdve (did you mean chatdev? {there})"),
        (
            ("reconcile", "chatdev", "run-9"),
            f"no such run: chatdev/run-9 (framework chatdev has no run run-9 under {cli.root}; "
            "did you mean run-1?)",
        ),
        (("reconcile", "ghspec"), f"no such run: framework ghspec ({there})"),
        (("report", "nope"), f"no such run: framework nope ({there})"),
        (("reprice", "nope", "--dry-run"), f"no such run: framework nope ({there})"),
    ]
    results = await run_all(cli, [(args, {}) for args, _ in cases])
    for (args, expected), result in zip(cases, results, strict=True):
        assert result.code == 1, (args, result)
        assert the_line(result) == expected
    assert cli.sim.request_log == [], "nothing is polled for a run that does not exist"
    assert (await cli.run("list", "chatdev")).code == 0  # what exists is still found


async def test_list_does_not_say_waiting_beside_due(cli: Env) -> None:
    end = time.time() - 3600
    write_run(cli.root, "chatdev", "run-1", [(end - 60, end)])
    result = await cli.run("list", TOKENSETTLE_MIN_AGE="30m")
    assert result.code == 0
    (row,) = [line for line in result.out.splitlines() if "run-1" in line]
    assert "waiting for min age" not in row and "min age reached" in row
    later = write_run(cli.root, "chatdev", "run-2", [(time.time() - 60, time.time())])
    result = await cli.run("list", TOKENSETTLE_MIN_AGE="30m")
    (row,) = [line for line in result.out.splitlines() if later.parent.name in line]
    assert "waiting for min age" in row and " due " not in row


async def test_reconcile_keeps_its_summary_on_stdout_and_its_logs_on_stderr(
    cli: Env, tmp_path: Path
) -> None:
    """As cron runs it: `>out 2>err` files, read back separately."""
    end = time.time() - 1800
    write_run(cli.root, "chatdev", "run-1", [(end - 60, end)])
    await cli.control.add([virtual_request(end - 30, "chatdev", 100, 10, 1)])
    bad = cli.root / "chatdev" / "bad" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"{")
    for extra in ((), ("--json",)):
        out, err = tmp_path / "out", tmp_path / "err"
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            'exec "$0" reconcile "$@" >"$OUT" 2>"$ERR"',
            EXE,
            *extra,
            env={**cli.env, "OUT": str(out), "ERR": str(err)},
        )
        assert await asyncio.wait_for(proc.wait(), 60) == 1  # the bad file
        logs = [json.loads(line) for line in err.read_text().splitlines()]
        assert logs and all(isinstance(e, dict) and "event" in e for e in logs)
        assert any(e["event"] == "run.unreadable" for e in logs)
        text = out.read_text()
        if extra:
            assert json.loads(text)["counts"]["error"] == 1
        else:
            assert text.startswith("polled 1 run(s)") and "summary:" in text
            assert "run.unreadable" not in text and '"event"' not in text


@pytest.mark.parametrize("how", ["removed", "read-only"])
async def test_demo_in_a_directory_it_cannot_write_says_where_to_go(
    tmp_path: Path, how: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    if how == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes through any mode bits")
        work.chmod(0o555)
        args = [EXE, "demo"]
    else:  # the working directory is gone: as unusable as a read-only one, even for root
        args = ["sh", "-c", 'cd "$1" && rmdir "$1" && exec "$2" demo', "sh", str(work), EXE]
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=tmp_path if how == "removed" else work,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    result = Result(proc.returncode or 0, out.decode(), err.decode())
    if work.exists():
        work.chmod(0o755)
    assert result.code == 2, result
    line = the_line(result)
    assert "demo: cannot create" in line and "demo-runs" in line and "cd /tmp" in line

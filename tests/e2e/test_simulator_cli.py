"""The real simulator process: its help, its JSON logs, `--seed-from`, and one line with
exit 2 for an address it cannot listen on (issue 7, items 5 and 10)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemon import EXE, clean_environ
from tests.support.runs import write_run
from tokensettle.simulator import SIMULATOR_ADMIN_KEY

pytestmark = pytest.mark.e2e
MODULE = (sys.executable, "-m", "tokensettle.simulator")
SIMULATE = (EXE, "simulate")
DEADLINE = 20.0


async def run(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=clean_environ(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=DEADLINE)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Served:
    """A simulator process with stdout a pipe (not a terminal): its JSON lines as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []

    async def event(self, name: str) -> dict[str, Any]:
        """The first log line with this event, reading on until it comes (or the deadline)."""

        async def read() -> dict[str, Any]:
            for line in self.lines:
                if line["event"] == name:
                    return line
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"stdout closed before {name}: {self.lines}"
                line = json.loads(raw)  # every line is one JSON object
                self.lines.append(line)
                if line["event"] == name:
                    return line

        return await asyncio.wait_for(read(), timeout=DEADLINE)


@contextlib.asynccontextmanager
async def served(*argv: str) -> AsyncIterator[Served]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        "--port",
        "0",
        env=clean_environ(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Served(proc)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=DEADLINE)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def assert_one_line(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert out == "" and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


# ------------------------------------------------------------------ addresses


async def test_an_address_it_cannot_listen_on_is_one_line_and_exit_2() -> None:
    """`simulate --port 99999` printed an OverflowError traceback and exited 1. The four
    cases run concurrently: each is a process start."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            ("--port", "99999"): ("--port 99999", "0 for a free one"),
            ("--port", str(port)): (f"--port {port}", "in use"),
            ("--host", "no-such-host.invalid"): ("--host", "cannot be resolved"),
            ("--host", "192.0.2.1"): ("--host", "not an address of this machine"),  # TEST-NET
        }
        results = await asyncio.gather(
            *(
                run(*SIMULATE, *args, *([] if "--port" in args else ["--port", "0"]))
                for args in cases
            )
        )
    for needles, result in zip(cases.values(), results, strict=True):
        assert_one_line(*result, *needles)


def test_an_empty_host_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tokensettle.simulator.cli import build_parser, main

    assert main(build_parser().parse_args(["--host", " "])) == 2
    assert (
        capsys.readouterr().err
        == "tokensettle simulate: --host is empty: give an address such as 127.0.0.1\n"
    )


# ------------------------------------------------------------------ help and logs


async def test_help_documents_the_simulator_and_its_curl_example_works() -> None:
    """The help names the key it accepts, the control endpoints, the scenario format, and a
    curl line that registers ground truth as printed; the logs are JSON lines on a pipe
    (the simulator used structlog's console renderer whatever its stdout was)."""
    code, text, _ = await run(*MODULE, "--help")
    assert code == 0
    for needle in (
        SIMULATOR_ADMIN_KEY,
        "unscoped_keys",
        "/_sim/requests",
        "/_sim/faults",
        "/_sim/truth",
        "gzip_bomb",
        "curl ",
        "scenario file",
        '"revisions"',
        "--seed-from RUNS_DIR",
        "docs/simulator.md",
    ):
        assert needle in text, needle
    start = text.index("curl ")
    command = text[start : text.index("}]}'", start) + len("}]}'")]
    async with served(*SIMULATE) as sim:
        listening = await sim.event("simulator.listening")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", listening["url"])
        root = listening["url"].removesuffix("/v1")
        if shutil.which("curl") is not None:
            proc = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                command.replace("http://127.0.0.1:8787", root),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=DEADLINE)
            assert json.loads(out)["registered"] == 1
            async with aiohttp.ClientSession() as s, s.get(f"{root}/_sim/truth") as resp:
                (row,) = (await resp.json())["rows"]
            assert row["minute"] == 1_760_000_000 - 1_760_000_000 % 60
            assert row["usage"]["input_tokens"] == 1200
        sim.proc.send_signal(signal.SIGTERM)
        await sim.event("simulator.stopping")
        assert await asyncio.wait_for(sim.proc.wait(), timeout=DEADLINE) == 0


async def test_seed_from_serves_the_totals_the_run_files_record(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    path = write_run(root, "baes", "r1", [(1_760_000_000.0, 1_760_000_150.0)], step_tokens=False)
    doc = json.loads(path.read_text())
    doc["aggregate_metrics"].update(TOK_IN=9_001, TOK_OUT=77, API_CALLS=5, CACHED_TOKENS=1_024)
    path.write_text(json.dumps(doc, indent=2))
    write_run(root, "ghspec", "never-settled", [(1_760_000_000.0, 1_760_000_060.0)])

    argv = (*MODULE, "--seed-from", str(root), "--key-id", "baes=key_seeded")
    async with served(*argv) as sim:
        seeded = await sim.event("simulator.seeded")
        assert (seeded["runs"], seeded["skipped"]) == (1, 1)
        assert seeded["keys"] == {"baes": "key_seeded"}
        skip = next(e for e in sim.lines if e["event"] == "simulator.seed_skipped")
        assert "never-settled" in skip["path"] and "records no tokens" in skip["reason"]
        root_url = (await sim.event("simulator.listening"))["url"].removesuffix("/v1")
        async with aiohttp.ClientSession() as s, s.get(f"{root_url}/_sim/truth") as resp:
            rows = (await resp.json())["rows"]
    assert {r["api_key_id"] for r in rows} == {"key_seeded"}
    total = {k: sum(r["usage"][k] for r in rows) for k in rows[0]["usage"]}
    assert total == {
        "input_tokens": 9_001,
        "output_tokens": 77,
        "num_model_requests": 5,
        "input_cached_tokens": 1_024,
    }

"""`tokensettle lease exec` as real processes: the child's environment and declaration,
its model calls settled by key, signal forwarding, exit codes, parallel first uses, and
the key value absent from everything but the child's environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon import EXE, clean_environ
from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.usage_scope import SCOPE_FILE, load_declaration

pytestmark = pytest.mark.e2e

ADMIN = "sk-admin-lease-e2e-S3CRET-0000"
LEASES = "proj_leases"

#: The experiment: reports what it was given, calls the model with its key, then exits,
#: kills itself, or waits for a signal.
CHILD = r"""
import json, os, signal, sys, time, urllib.request
out_dir, mode, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
PREFIXES = ("OPENAI", "TOKENSETTLE", "ANTHROPIC", "CREDENTIALS", "EXPERIMENT")
run_dir = os.environ.get("TOKENSETTLE_RUN_DIR")
scope = os.path.join(run_dir, "usage_scope.json") if run_dir else None
report = {
    "env": {k: v for k, v in os.environ.items() if k.startswith(PREFIXES)},
    "scope_at_start": open(scope).read() if scope and os.path.exists(scope) else None,
    "usage": [],
}
for i in range(calls):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (40 + i)}],
            "max_completion_tokens": 10 + i}
    req = urllib.request.Request(os.environ["SIM_BASE"] + "/chat/completions",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json",
        "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
    with urllib.request.urlopen(req, timeout=10) as resp:
        report["usage"].append(json.load(resp)["usage"])
# the key goes where the test can read it, outside the run and state directories
with open(os.path.join(out_dir, f"child-{os.getpid()}.json"), "w") as f:
    json.dump(report, f)
if mode.startswith("exit"):
    sys.exit(int(mode[4:]))
if mode == "selfkill":
    os.kill(os.getpid(), signal.SIGTERM)
got = []
def on(sig, frame):
    got.append(signal.Signals(sig).name)
    with open(os.path.join(out_dir, "signals"), "w") as f:
        f.write(",".join(got))
    sys.exit(42)
signal.signal(signal.SIGTERM, on)
signal.signal(signal.SIGINT, on)
open(os.path.join(out_dir, "ready"), "w").close()
time.sleep(30)
sys.exit(99)
"""


@dataclass
class Proc:
    code: int
    out: str
    err: str


@dataclass
class World:
    tmp: Path
    sim: RunningSimulator
    child: Path
    env: dict[str, str]

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def argv(self, *args: str) -> list[str]:
        return [EXE, "lease", *args]

    def child_cmd(self, mode: str, calls: int = 0) -> list[str]:
        return [sys.executable, str(self.child), str(self.tmp), mode, str(calls)]

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.argv(*args),
            env=self.env,
            cwd=self.tmp,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def run(self, *args: str) -> Proc:
        proc = await self.start(*args)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return Proc(proc.returncode, out.decode(), err.decode())

    def reports(self) -> list[dict[str, object]]:
        return [json.loads(p.read_text()) for p in sorted(self.tmp.glob("child-*.json"))]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    creds = tmp_path / "credentials"
    creds.mkdir()
    scenario = Scenario.from_json(
        {
            "admin_keys": [ADMIN],
            "admin": {"projects": [{"id": LEASES, "name": "Leases"}], "usage_delay": 0},
        }
    )
    async with RunningSimulator(scenario) as sim:
        env = {
            **clean_environ(),
            "TOKENSETTLE_API_BASE_URL": sim.base_url,
            "TOKENSETTLE_ADMIN_KEY": ADMIN,
            "OPENAI_ADMIN_KEY": "sk-admin-alias-two",
            "OPENAI_API_KEY_USAGE_TRACKING": "sk-admin-alias-three",
            "ANTHROPIC_ADMIN_KEY": "sk-ant-admin-four",
            "TOKENSETTLE_ANTHROPIC_ADMIN_KEY": "sk-ant-admin-five",
            "CREDENTIALS_DIRECTORY": str(creds),
            "OPENAI_API_KEY": "sk-proj-the-callers-own-key",
            "TOKENSETTLE_LEASE_PROJECT": LEASES,
            "TOKENSETTLE_STATE_DIR": str(tmp_path / "state"),
            "TOKENSETTLE_LOG_FORMAT": "json",
            "EXPERIMENT_SEED": "7",
            "SIM_BASE": sim.base_url,
        }
        yield World(tmp_path, sim, child, env)


def files_under(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.rglob("*") if p.is_file()]


async def test_exec_gives_the_command_its_own_key_and_declaration(world: World) -> None:
    run_dir = world.tmp / "runs" / "chatdev" / "r1"
    proc = await world.run(
        "exec", "--framework", "chatdev", "--run-dir", str(run_dir), "--",
        *world.child_cmd("exit7", calls=3),
    )  # fmt: skip
    assert proc.code == 7, proc.err
    (report,) = world.reports()
    env = report["env"]
    assert isinstance(env, dict)
    value = env["OPENAI_API_KEY"]
    assert value.startswith("sk-svcacct-") and env["OPENAI_API_KEY_CHATDEV"] == value
    # no admin key, alias or credentials path reached the experiment; the rest did
    for name in (
        "TOKENSETTLE_ADMIN_KEY",
        "OPENAI_ADMIN_KEY",
        "OPENAI_API_KEY_USAGE_TRACKING",
        "ANTHROPIC_ADMIN_KEY",
        "TOKENSETTLE_ANTHROPIC_ADMIN_KEY",
        "CREDENTIALS_DIRECTORY",
    ):
        assert name not in env, name
    assert env["EXPERIMENT_SEED"] == "7" and env["TOKENSETTLE_RUN_DIR"] == str(run_dir)
    # the declaration was there before the command started, and names the key
    on_disk = (run_dir / SCOPE_FILE).read_text()
    assert report["scope_at_start"] == on_disk
    decl = load_declaration(on_disk.encode(), source=str(run_dir))
    key_id = env["TOKENSETTLE_LEASE_KEY_ID"]
    assert decl.api_key_ids == (key_id,) and decl.lease is not None
    assert json.loads(env["TOKENSETTLE_USAGE_SCOPE"]) == decl.to_json()
    # the model calls are recorded under that key, exactly
    truth = [r for r in world.sim.scenario.requests if r.api_key_id == key_id]
    assert len(truth) == 3
    assert sum(r.final_usage.input_tokens for r in truth) == sum(
        u["prompt_tokens"]  # type: ignore[index]
        for u in report["usage"]  # type: ignore[attr-defined]
    )
    listed = json.loads((await world.run("list", "--json")).out)
    (lease,) = listed["leases"]
    assert (lease["key_id"], lease["state"], lease["run_dir"]) == (key_id, "active", str(run_dir))
    # the value is nowhere but in the child's environment
    assert value not in proc.out + proc.err
    for path in files_under(world.state, run_dir):
        assert value.encode() not in path.read_bytes(), path
    assert ADMIN not in proc.out + proc.err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signals_reach_the_command_and_its_code_comes_back(
    world: World, sig: signal.Signals
) -> None:
    proc = await world.start("exec", "--", *world.child_cmd("wait"))
    try:
        ready = world.tmp / "ready"
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.returncode is None and time.monotonic() < deadline, "child not ready"
            await asyncio.sleep(0.05)
        os.kill(proc.pid, sig)  # to tokensettle only, not to its process group
        _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 42, err.decode()
    assert (world.tmp / "signals").read_text() == sig.name  # once, not twice
    assert "lease.signal_forwarded" in err.decode()


async def test_a_command_killed_by_a_signal_exits_128_plus_n(world: World) -> None:
    proc = await world.run("exec", "--", *world.child_cmd("selfkill"))
    assert proc.code == 128 + signal.SIGTERM, proc.err


async def test_parallel_first_uses_make_one_service_account(world: World) -> None:
    runs = [world.tmp / "runs" / "fw" / f"r{i}" for i in range(3)]
    procs = await asyncio.gather(
        *(world.run("exec", "--run-dir", str(d), "--", *world.child_cmd("exit0", 1)) for d in runs)
    )
    assert [p.code for p in procs] == [0, 0, 0], [p.err for p in procs]
    assert len(world.sim.admin.service_accounts) == 1
    key_ids = {
        load_declaration((d / SCOPE_FILE).read_bytes(), source="x").api_key_ids for d in runs
    }
    assert len(key_ids) == 3
    book = json.loads((world.state / "leases.json").read_text())
    assert len(book["leases"]) == 3 and len(book["service_accounts"]) == 1
    assert {r.api_key_id for r in world.sim.scenario.requests} == {k for (k,) in key_ids}

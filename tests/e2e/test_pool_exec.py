"""`tokensettle lease --provider anthropic` as real processes sharing one state directory:
two runs at once on a two-key pool get different keys; on a one-key pool the second run
waits until the first's run is settled and its key released; a lease is renewed while
its command runs and released after its TTL once `lease exec` is killed; signals reach
the command. Pool values appear in no output and no file but the command's environment.

Settling is simulated as the brief allows: a settled metrics.json and LeaseKeeper.revoke
(the daemon's and reconcile's call), since no Anthropic usage is needed to test a pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import EXE, clean_environ, wait_for
from tokensettle.config import load_settings
from tokensettle.leasekeeper import LeaseKeeper, leased_runs
from tokensettle.pool import free_after
from tokensettle.reconcile import with_declared_scope
from tokensettle.runfile import parse_run
from tokensettle.usage_scope import SCOPE_FILE, load_declaration

pytestmark = pytest.mark.e2e

KEYS = {
    "apikey_01E2eA": "sk-ant-api03-E2E-POOL-SECRET-AAAA-0123",
    "apikey_02E2eB": "sk-ant-api03-E2E-POOL-SECRET-BBBB-0123",
}
ADMIN = "sk-ant-admin-E2E-S3CRET"

#: The experiment: reports its environment, waits until `peers` runs have started (so
#: the test proves they ran at the same time), optionally writes its run file, and exits
#: or waits for a signal.
CHILD = r"""
import json, os, signal, sys, time
out_dir, name, peers, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
keep = ("ANTHROPIC", "OPENAI", "TOKENSETTLE", "CREDENTIALS", "EXPERIMENT")
with open(os.path.join(out_dir, f"report-{name}.json"), "w") as f:
    json.dump({k: v for k, v in os.environ.items() if k.startswith(keep)}, f)
with open(os.path.join(out_dir, f"started-{name}"), "w") as f:
    f.write(str(os.getpid()))
deadline = time.monotonic() + 30
while len([p for p in os.listdir(out_dir) if p.startswith("started-")]) < peers:
    if time.monotonic() > deadline:
        sys.exit(97)
    time.sleep(0.02)
if mode == "write":  # the run writes its file (the test settles it later)
    with open(os.path.join(os.environ["TOKENSETTLE_RUN_DIR"], "metrics.json"), "w") as f:
        f.write("{}")
    sys.exit(0)
if mode == "wait":
    def on(sig, frame):
        sys.exit(42)
    signal.signal(signal.SIGTERM, on)
    open(os.path.join(out_dir, f"ready-{name}"), "w").close()
    time.sleep(60)
    sys.exit(99)
sys.exit(int(mode))
"""


@dataclass
class Proc:
    code: int
    out: str
    err: str


@dataclass
class World:
    tmp: Path
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def runs(self) -> Path:
        return self.tmp / "runs"

    def pool(self, *key_ids: str) -> None:
        keys = ", ".join(f'{{id = "{k}", workspace_id = "wrkspc_01E2e"}}' for k in key_ids)
        (self.tmp / "tokensettle.toml").write_text(f"[leases.anthropic]\nkeys = [{keys}]\n")
        values = "".join(f"{k}={KEYS[k]}\n" for k in key_ids)
        (self.tmp / "pool_values").write_text(values)

    def child(self, name: str, *, peers: int = 1, mode: str = "0") -> list[str]:
        return [sys.executable, str(self.tmp / "child.py"), str(self.tmp), name, str(peers), mode]

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            EXE,
            "lease",
            *args,
            env=self.env,
            cwd=self.tmp,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def finish(
        self, proc: asyncio.subprocess.Process, err: bytes = b"", *, secret_out: bool = False
    ) -> Proc:
        """Its exit and output, kept for the leak check (but for `lease new`'s stdout,
        the one place a value belongs)."""
        out, rest = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        done = Proc(proc.returncode, out.decode(), (err + rest).decode())
        self.outputs += [done.err] if secret_out else [done.out, done.err]
        return done

    async def run(self, *args: str, secret_out: bool = False) -> Proc:
        return await self.finish(await self.start(*args), secret_out=secret_out)

    def report(self, name: str) -> dict[str, str]:
        return json.loads((self.tmp / f"report-{name}.json").read_text())  # type: ignore[no-any-return]

    async def listed(self) -> dict[str, Any]:
        proc = await self.run("list", "--json")
        assert proc.code == 0, proc.err
        return json.loads(proc.out)  # type: ignore[no-any-return]

    def keeper(self) -> LeaseKeeper:
        settings = load_settings({}, config_file=self.tmp / "tokensettle.toml", environ=self.env)
        return LeaseKeeper(lambda: settings, None)

    def assert_no_value_leaked(self) -> None:
        for text in self.outputs:
            for value in KEYS.values():
                assert value not in text
        for directory in (self.state, self.runs):
            for path in directory.rglob("*"):
                if path.is_file():
                    data = path.read_bytes()
                    assert not any(v.encode() in data for v in KEYS.values()), path


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    (tmp_path / "child.py").write_text(CHILD)
    env = {
        **{k: v for k, v in clean_environ().items() if not k.startswith("ANTHROPIC_")},
        "TOKENSETTLE_CONFIG": str(tmp_path / "tokensettle.toml"),
        "TOKENSETTLE_ANTHROPIC_POOL_FILE": str(tmp_path / "pool_values"),
        "TOKENSETTLE_STATE_DIR": str(tmp_path / "state"),
        "TOKENSETTLE_LOG_FORMAT": "json",
        "ANTHROPIC_ADMIN_KEY": ADMIN,
        "EXPERIMENT_SEED": "7",
    }
    w = World(tmp_path, env)
    yield w
    w.assert_no_value_leaked()


def settle(run_dir: Path, end: datetime) -> Any:
    """Write the run's file as it is once settled, and read it as the daemon does."""
    doc = {
        "run_id": run_dir.name,
        "start_timestamp": (end - timedelta(minutes=2)).isoformat().replace("+00:00", "Z"),
        "end_timestamp": end.isoformat().replace("+00:00", "Z"),
        "usage_api_reconciliation": {"verification_status": "verified"},
    }
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(doc))
    return with_declared_scope(parse_run(path.read_bytes(), path, run_dir.parent.name, 60))


async def line_on(proc: asyncio.subprocess.Process, needle: str, seen: bytearray) -> None:
    """Read `proc`'s stderr (kept in `seen`) until a line holds `needle`."""
    assert proc.stderr is not None
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=20)
        assert line, f"stderr closed before {needle!r}: {seen.decode()}"
        seen += line
        if needle.encode() in line:
            return


def scope_of(run_dir: Path) -> Any:
    return load_declaration((run_dir / SCOPE_FILE).read_bytes(), source=str(run_dir))


async def test_two_runs_at_once_on_two_keys_get_one_each(world: World) -> None:
    world.pool(*KEYS)
    dirs = [world.runs / "claude" / f"r{i}" for i in (1, 2)]
    argv = ["exec", "--provider", "anthropic", "--framework", "claude", "--run-dir"]
    procs = await asyncio.gather(
        *(world.run(*argv, str(d), "--", *world.child(d.name, peers=2)) for d in dirs)
    )
    assert [p.code for p in procs] == [0, 0], [p.err for p in procs]
    reports = [world.report(d.name) for d in dirs]
    ids = {r["TOKENSETTLE_LEASE_KEY_ID"] for r in reports}
    assert ids == set(KEYS)  # both keys, one each, while both ran (the barrier)
    for report in reports:
        key_id = report["TOKENSETTLE_LEASE_KEY_ID"]
        assert report["ANTHROPIC_API_KEY"] == KEYS[key_id] == report["ANTHROPIC_API_KEY_CLAUDE"]
        assert "ANTHROPIC_ADMIN_KEY" not in report
        assert "TOKENSETTLE_ANTHROPIC_POOL_FILE" not in report
        assert report["EXPERIMENT_SEED"] == "7"
    assert {scope_of(d).api_key_ids for d in dirs} == {(k,) for k in KEYS}


async def test_one_key_the_second_run_waits_for_the_first_to_settle(world: World) -> None:
    (key_id,) = list(KEYS)[:1]
    world.pool(key_id)
    first_dir, second_dir = world.runs / "claude" / "first", world.runs / "claude" / "second"
    held = await world.run(
        "new", "--provider", "anthropic", "--run-dir", str(first_dir), secret_out=True
    )
    assert held.code == 0, held.err
    assert f"export ANTHROPIC_API_KEY={KEYS[key_id]}" in held.out
    waiting = await world.start(
        "exec", "--provider", "anthropic", "--wait", "60s", "--run-dir", str(second_dir),
        "--", *world.child("second"),
    )  # fmt: skip
    seen = bytearray()
    try:
        await line_on(waiting, "waiting for a free anthropic pool key (1 key(s): 1 leased)", seen)
        assert not (world.tmp / "started-second").exists() and not second_dir.exists()
        keeper = world.keeper()
        first = settle(first_dir, datetime.now(UTC) - timedelta(minutes=6))
        await keeper.revoke(leased_runs([]), datetime.now(UTC))  # nothing settled yet
        assert keeper.released == [] and not second_dir.exists()
        await keeper.revoke(leased_runs([first]), datetime.now(UTC))
        (released,) = keeper.released
        assert released.key_id == key_id and released.release_reason == "settled"
        done = await world.finish(waiting, bytes(seen))
    finally:
        if waiting.returncode is None:
            waiting.kill()
            await waiting.wait()
    assert done.code == 0, done.err
    assert world.report("second")["TOKENSETTLE_LEASE_KEY_ID"] == key_id
    one, two = scope_of(first_dir).lease, scope_of(second_dir).lease
    assert one.key_id == two.key_id == key_id and two.created_at > one.created_at
    assert two.created_at >= free_after(first.end, timedelta(minutes=1))


async def test_a_key_whose_command_just_exited_cools_for_the_minute_rule(world: World) -> None:
    """Settled at once, the key is still not handed out before the minute after the last
    minute its command could have used: the next run gives up rather than share it."""
    (key_id,) = list(KEYS)[:1]
    world.pool(key_id)
    run_dir = world.runs / "claude" / "quick"
    proc = await world.run(
        "exec", "--provider", "anthropic", "--run-dir", str(run_dir), "--",
        *world.child("quick", mode="write"),
    )  # fmt: skip
    assert proc.code == 0, proc.err
    (slot,) = (await world.listed())["pool"]
    assert slot["status"] == "leased" and slot["lease"]["ended_at"] is not None
    record = settle(run_dir, datetime.now(UTC) - timedelta(minutes=6))  # the daemon's verdict
    keeper = world.keeper()
    now = datetime.now(UTC)
    await keeper.revoke(leased_runs([record]), now)
    (released,) = keeper.released
    ended = _time(slot["lease"]["ended_at"])
    assert released.free_at == free_after(ended, timedelta(minutes=1)) > now
    marker = world.tmp / "ran"
    again = await world.run(
        "exec", "--provider", "anthropic", "--wait", "0s", "--", "touch", str(marker)
    )
    assert again.code == 1 and "1 cooling" in again.err and not marker.exists()


async def test_a_lease_lives_while_its_command_does_and_a_killed_holder_expires(
    world: World,
) -> None:
    (key_id,) = list(KEYS)[:1]
    world.pool(key_id)
    proc = await world.start(
        "exec", "--provider", "anthropic", "--ttl", "2s", "--", *world.child("long", mode="wait")
    )
    try:
        await wait_for((world.tmp / "ready-long").exists, 20, what="the command")
        lease = (await world.listed())["pool"][0]["lease"]
        created = _time(lease["created_at"])

        async def renewed() -> bool:
            slot = (await world.listed())["pool"][0]
            return bool(
                slot["status"] == "leased"
                and _time(slot["lease"]["expires_at"]) > created + timedelta(seconds=4)
            )

        # well past the 2 s TTL it is still leased: lease exec renews it every 0.7 s
        await wait_for(renewed, 20, interval=0.5, what="a renewed lease")
        os.kill(proc.pid, signal.SIGKILL)  # lease exec dies (a crash)...
    finally:
        # ...and the test stops its command, which would live on (holding the pipes)
        with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
            os.kill(int((world.tmp / "started-long").read_text()), signal.SIGKILL)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    async def expired() -> bool:
        slot = (await world.listed())["pool"][0]
        return bool(slot["status"] == "cooling" and slot["lease"]["release_reason"] == "expired")

    await wait_for(expired, 20, interval=0.5, what="the lease to expire")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_a_signal_reaches_the_command_and_its_exit_is_recorded(world: World) -> None:
    (key_id,) = list(KEYS)[:1]
    world.pool(key_id)
    run_dir = world.runs / "claude" / "sig"
    proc = await world.start(
        "exec", "--provider", "anthropic", "--run-dir", str(run_dir), "--",
        *world.child("sig", mode="wait"),
    )  # fmt: skip
    try:
        await wait_for((world.tmp / "ready-sig").exists, 20, what="the command")
        os.kill(proc.pid, signal.SIGTERM)
        done = await world.finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert done.code == 42, done.err
    assert "lease.signal_forwarded" in done.err
    (slot,) = (await world.listed())["pool"]
    # no metrics.json: nothing will settle this run, so its key went back at once
    assert slot["status"] == "cooling" and slot["lease"]["release_reason"] == "no_run"

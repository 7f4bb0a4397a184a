"""`tokensettle lease --provider anthropic` in this process, with real files and the real
lease lock: the run's environment, settings that do not fit (one line, nothing run),
waiting and its timeout, `new`, `list`, `revoke`, the keeper's release once runs settle,
exclusive takes from many threads, and pool values absent from every file and output.
Real processes running at once are in tests/e2e/test_pool_exec.py."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from tokensettle import lease_cli
from tokensettle.config import KeyPool, PoolKey, load_settings
from tokensettle.leasekeeper import LeaseKeeper, leased_runs
from tokensettle.leases import LeaseBook, LeaseStore, PoolLease, PoolState
from tokensettle.pool import PoolBusy, free_after, take
from tokensettle.reconcile import with_declared_scope
from tokensettle.runfile import parse_run
from tokensettle.usage_scope import SCOPE_FILE, load_declaration

KEY_A, KEY_B = "apikey_01PoolA", "apikey_02PoolB"
VALUE_A = "sk-ant-api03-POOL-SECRET-AAAA-0123456789"
VALUE_B = "sk-ant-api03-POOL-SECRET-BBBB-0123456789"
ADMIN = "sk-admin-pool-cli-S3CRET"
WORKSPACE = "wrkspc_01Runs"
GRACE = timedelta(minutes=1)

#: Writes its environment (the part of interest) where the test reads it, outside the
#: run and state directories, then exits with the code it is given.
CHILD = r"""
import json, os, sys
keep = ("ANTHROPIC", "OPENAI", "TOKENSETTLE", "CREDENTIALS", "EXPERIMENT")
run_dir = os.environ.get("TOKENSETTLE_RUN_DIR")
scope = os.path.join(run_dir, "usage_scope.json") if run_dir else None
with open(sys.argv[1], "w") as f:
    json.dump({"env": {k: v for k, v in os.environ.items() if k.startswith(keep)},
               "scope_at_start": open(scope).read() if scope and os.path.exists(scope)
                                 else None}, f)
if len(sys.argv) > 3:
    open(sys.argv[3], "w").write("{}")
sys.exit(int(sys.argv[2]))
"""


@dataclass
class Pool:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def store(self) -> LeaseStore:
        return LeaseStore(self.state)

    def configure(self, keys: str, values: str | None) -> None:
        (self.tmp / "tokensettle.toml").write_text(f"[leases.anthropic]\nkeys = [{keys}]\n")
        if values is not None:
            (self.tmp / "pool_values").write_text(values)

    def run(self, *argv: str, **env: str | None) -> tuple[int, str, str]:
        with self.monkeypatch.context() as m:
            for name, value in env.items():
                if value is None:
                    m.delenv(name, raising=False)
                else:
                    m.setenv(name, value)
            code = lease_cli.run(["lease", *argv])
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def child(self, code: int = 0, *, metrics: Path | None = None) -> list[str]:
        script = self.tmp / "child.py"
        script.write_text(CHILD)
        argv = [sys.executable, str(script), str(self.tmp / "child.json"), str(code)]
        return [*argv, str(metrics)] if metrics is not None else argv

    def report(self) -> dict[str, dict[str, str]]:
        return json.loads((self.tmp / "child.json").read_text())  # type: ignore[no-any-return]

    def book(self) -> LeaseBook:
        return self.store.load()


@pytest.fixture
def pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Pool]:
    for name in list(os.environ):
        if name.startswith(("TOKENSETTLE_", "OPENAI_", "ANTHROPIC_")) or name in (
            "CREDENTIALS_DIRECTORY",
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("TOKENSETTLE_CONFIG", str(tmp_path / "tokensettle.toml"))
    monkeypatch.setenv("TOKENSETTLE_ANTHROPIC_POOL_FILE", str(tmp_path / "pool_values"))
    monkeypatch.setenv("TOKENSETTLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TOKENSETTLE_LOG_FORMAT", "json")
    # admin keys the run must never see (a pool needs none of them)
    monkeypatch.setenv("TOKENSETTLE_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("ANTHROPIC_ADMIN_KEY", "sk-ant-admin-S3CRET")
    monkeypatch.setenv("EXPERIMENT_SEED", "7")
    p = Pool(tmp_path, monkeypatch, capsys)
    p.configure(
        f'{{id = "{KEY_A}", workspace_id = "{WORKSPACE}"}}, {{id = "{KEY_B}"}}',
        f"# the pool\n{KEY_A}={VALUE_A}\n{KEY_B}={VALUE_B}\n",
    )
    try:
        yield p
    finally:
        structlog.reset_defaults()  # the CLI bound its logs to this test's stderr


def message_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line and not line.startswith(("{", "usage:"))]


def no_value_anywhere(p: Pool, *texts: str) -> None:
    for text in texts:
        assert VALUE_A not in text and VALUE_B not in text
    for path in [f for d in (p.state, p.tmp / "runs") if d.exists() for f in d.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert VALUE_A.encode() not in data and VALUE_B.encode() not in data, path


# ---------------------------------------------------------------------------- exec


def test_exec_gives_the_run_one_pool_key_and_its_declaration(pool: Pool) -> None:
    run_dir = pool.tmp / "runs" / "claude" / "r1"
    metrics = run_dir / "metrics.json"
    code, out, err = pool.run(
        "exec", "--provider", "anthropic", "--framework", "claude", "--run-dir", str(run_dir),
        "--", *pool.child(5, metrics=metrics),
    )  # fmt: skip
    assert code == 5, err
    env = pool.report()["env"]
    assert env["ANTHROPIC_API_KEY"] == VALUE_A == env["ANTHROPIC_API_KEY_CLAUDE"]
    assert env["TOKENSETTLE_LEASE_KEY_ID"] == KEY_A
    assert env["TOKENSETTLE_RUN_DIR"] == str(run_dir) and env["EXPERIMENT_SEED"] == "7"
    for name in (
        "TOKENSETTLE_ADMIN_KEY",
        "ANTHROPIC_ADMIN_KEY",
        "TOKENSETTLE_ANTHROPIC_POOL_FILE",
        "TOKENSETTLE_CONFIG",
    ):
        assert name not in env, name
    assert VALUE_B not in json.dumps(env)  # the run holds its own key only
    on_disk = (run_dir / SCOPE_FILE).read_text()
    assert pool.report()["scope_at_start"] == on_disk  # written before the command started
    decl = load_declaration(on_disk.encode(), source="x")
    assert decl.provider == "anthropic" and decl.api_key_ids == (KEY_A,)
    assert decl.project_ids == (WORKSPACE,) and decl.lease is not None and decl.lease.pool
    assert json.loads(env["TOKENSETTLE_USAGE_SCOPE"]) == decl.to_json()
    # the run wrote its file: the lease waits for it to settle, with the command's exit
    (record,) = pool.book().pool
    assert record.state is PoolState.ACTIVE and record.ended_at is not None
    assert (record.key_id, record.created_at) == decl.lease.identity
    assert record.run_dir == str(run_dir) and record.framework == "claude"
    no_value_anywhere(pool, out, err)
    assert ADMIN not in out + err


def test_a_command_that_writes_no_run_file_returns_its_key_at_once(pool: Pool) -> None:
    run_dir = pool.tmp / "runs" / "claude" / "crashed"
    code, _, err = pool.run(
        "exec", "--provider", "anthropic", "--run-dir", str(run_dir), "--", *pool.child(1)
    )
    assert code == 1, err
    (record,) = pool.book().pool
    assert record.state is PoolState.RELEASED and record.release_reason == "no_run"
    assert record.ended_at is not None and record.free_at == free_after(record.ended_at, GRACE)
    assert '"lease.released"' in err


def test_two_runs_in_a_row_take_both_keys(pool: Pool) -> None:
    """The first key is still leased (its run has not settled): the second run gets the
    other key, never the same one."""
    first, second = (pool.tmp / "runs" / "claude" / r for r in ("a", "b"))
    for run_dir in (first, second):
        code, _, err = pool.run(
            "exec", "--provider", "anthropic", "--run-dir", str(run_dir), "--",
            *pool.child(0, metrics=run_dir / "metrics.json"),
        )  # fmt: skip
        assert code == 0, err
    keys = [
        load_declaration((d / SCOPE_FILE).read_bytes(), source="x").api_key_ids
        for d in (first, second)
    ]
    assert keys == [(KEY_A,), (KEY_B,)]


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("keys", "values", "env", "needle"),
    [
        ("", "", {}, "leases.anthropic.keys ([leases.anthropic] keys in the TOML config): no pool"),
        (None, None, {}, "pool_values does not exist"),
        (
            None,
            f"{KEY_A}={VALUE_A}\n{KEY_B}={VALUE_B}\napikey_03Gone={VALUE_B}\n",
            {},
            "apikey_03Gone has a value but is not in leases.anthropic.keys",
        ),
        (None, f"{KEY_A}={VALUE_A}\n", {}, f"{KEY_B} has no value in"),
        (None, f"{KEY_A}={VALUE_A}\n{VALUE_B}\n", {}, "line 2 is not apikey_...=VALUE"),
        (
            None,
            None,
            {"TOKENSETTLE_ANTHROPIC_POOL_FILE": None},
            "anthropic_pool_file (TOKENSETTLE_ANTHROPIC_POOL_FILE): not set",
        ),
        ('{id = "key_openai"}', None, {}, "'key_openai' is not an Anthropic key id"),
    ],
)
def test_a_pool_that_does_not_fit_runs_nothing(
    pool: Pool, keys: str | None, values: str | None, env: dict[str, str | None], needle: str
) -> None:
    if keys is not None or values is not None:
        current = (pool.tmp / "tokensettle.toml").read_text().split("keys = [", 1)[1][:-2]
        pool.configure(current if keys is None else keys, values)
    if values is None and keys is None and "does not exist" in needle:
        (pool.tmp / "pool_values").unlink()
    # no credentials directory on this machine may answer for the file
    pool.monkeypatch.setattr("tokensettle.pool.secrets_dirs", lambda environ=None: [])
    run_dir = pool.tmp / "runs" / "claude" / "r1"
    marker = pool.tmp / "ran"
    code, out, err = pool.run(
        "exec", "--provider", "anthropic", "--run-dir", str(run_dir), "--",
        "touch", str(marker), **env,
    )  # fmt: skip
    assert code == 2, err
    lines = message_lines(err)
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and out == ""
    assert not marker.exists() and not run_dir.exists()
    assert not (pool.state / "leases.json").exists()
    no_value_anywhere(pool, out, err)


def test_the_values_file_is_found_among_the_credentials(pool: Pool) -> None:
    creds = pool.tmp / "creds"
    creds.mkdir()
    (pool.tmp / "pool_values").rename(creds / "anthropic_pool_keys")
    code, _, err = pool.run(
        "exec", "--provider", "anthropic", "--", *pool.child(0),
        TOKENSETTLE_ANTHROPIC_POOL_FILE=None, CREDENTIALS_DIRECTORY=str(creds),
    )  # fmt: skip
    assert code == 0, err
    env = pool.report()["env"]
    assert env["ANTHROPIC_API_KEY"] == VALUE_A and "CREDENTIALS_DIRECTORY" not in env


def test_wait_is_for_the_pool_only(pool: Pool) -> None:
    code, _, err = pool.run("exec", "--wait", "1m", "--", "true")
    assert code == 2 and "--wait: only for --provider anthropic" in err


def test_a_full_pool_waits_then_gives_up_without_running(pool: Pool) -> None:
    pool.configure(f'{{id = "{KEY_A}"}}', f"{KEY_A}={VALUE_A}\n")
    code, out, _ = pool.run("new", "--provider", "anthropic", "--format", "env")
    assert code == 0 and f"export ANTHROPIC_API_KEY={VALUE_A}" in out
    marker = pool.tmp / "ran"
    run_dir = pool.tmp / "runs" / "claude" / "r2"
    code, out, err = pool.run(
        "exec", "--provider", "anthropic", "--wait", "1s", "--run-dir", str(run_dir), "--",
        "touch", str(marker),
    )  # fmt: skip
    assert code == 1, err
    lines = message_lines(err)
    assert lines[0].startswith("tokensettle lease: waiting for a free anthropic pool key")
    assert "1 key(s): 1 leased" in lines[0] and "of 1s" in lines[0]
    assert lines[-1] == (
        "tokensettle lease: no anthropic pool key became free within 1s (1 key(s): 1 leased); "
        "the command was not run: wait longer (--wait) or add keys to [leases.anthropic] keys"
    )
    assert not marker.exists() and not run_dir.exists() and out == ""


# ---------------------------------------------------------------------------- new, list, revoke


def test_new_prints_the_key_and_records_a_runner_held_lease(pool: Pool) -> None:
    run_dir = pool.tmp / "runs" / "claude" / "n1"
    code, out, err = pool.run(
        "new", "--provider", "anthropic", "--framework", "claude", "--run-dir", str(run_dir),
        "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    got = json.loads(out)
    assert (got["provider"], got["key_id"], got["api_key"]) == ("anthropic", KEY_A, VALUE_A)
    assert got["env"]["ANTHROPIC_API_KEY_CLAUDE"] == VALUE_A
    assert got["usage_scope"] == json.loads((run_dir / SCOPE_FILE).read_text())
    (record,) = pool.book().pool
    assert record.holder == "new" and record.state is PoolState.ACTIVE
    no_value_anywhere(pool, err)  # stdout is the one place it belongs


def test_list_shows_pool_leases_and_free_keys(pool: Pool) -> None:
    code, _, _ = pool.run("new", "--provider", "anthropic", "--framework", "claude")
    assert code == 0
    code, out, _ = pool.run("list")
    assert code == 0
    head, *rows = out.splitlines()
    assert head.split()[:3] == ["KEY", "PROVIDER", "STATE"]
    cells = {row.split()[0]: row.split() for row in rows}
    assert cells[KEY_A][1:4] == ["anthropic", "active", "claude"]
    assert cells[KEY_B][1:3] == ["anthropic", "free"] and "never leased" in out
    code, out, _ = pool.run("list", "--json")
    listed = json.loads(out)
    assert [(s["key_id"], s["status"]) for s in listed["pool"]] == [
        (KEY_A, "leased"),
        (KEY_B, "free"),
    ]
    assert listed["pool"][0]["lease"]["holder"] == "new" and listed["leases"] == []
    no_value_anywhere(pool, out)


def test_revoke_releases_a_pool_key_and_refuses_a_running_one(pool: Pool) -> None:
    pool.run("new", "--provider", "anthropic")
    now = datetime.now(UTC)
    running = PoolLease(
        KEY_B, None, now.replace(microsecond=0), now + timedelta(hours=1),
        holder="exec", pid=4242, renewed_at=now,
    )  # fmt: skip
    pool.store.update(lambda book: book.with_pool_lease(running))
    code, out, err = pool.run("revoke", KEY_A, KEY_B)
    assert code == 1, err
    assert f"{KEY_A}: released, free from" in out
    assert f"{KEY_B}: in use by a running `lease exec` (pid 4242)" in out
    book = pool.book()
    released = book.pool_lease(KEY_A)
    assert released is not None and released.release_reason == "revoked"
    assert released.free_at is not None and released.free_at > now
    assert book.pool_lease(KEY_B) == running
    code, out, _ = pool.run("revoke", KEY_A)
    assert code == 0 and "already released (revoked)" in out
    code, out, _ = pool.run("revoke", "apikey_01Unknown")
    assert code == 1 and "not a pool key" in out
    code, _, err = pool.run("revoke", "sk-ant-api03-x")
    assert code == 2 and "is not a key id (key_... or apikey_...)" in err


def test_a_damaged_book_holds_the_pool_until_released_by_hand(pool: Pool) -> None:
    pool.state.mkdir()
    (pool.state / "leases.json").write_text("{not json")
    marker = pool.tmp / "ran"
    code, _, err = pool.run(
        "exec", "--provider", "anthropic", "--wait", "0s", "--", "touch", str(marker)
    )
    assert code == 1 and "2 key(s): 2 held" in err and not marker.exists()
    assert list(pool.state.glob("leases.json.damaged-*"))
    code, out, _ = pool.run("list")
    assert "unknown since leases.json was reset" in out
    code, out, _ = pool.run("revoke", KEY_A)
    assert code == 0 and f"{KEY_A}: released, free from" in out


# ---------------------------------------------------------------------------- the keeper


def settled_run(run_dir: Path, end: datetime) -> Path:
    """A run file as it is once settled (the daemon's block says verified)."""
    start = end - timedelta(minutes=3)
    doc = {
        "run_id": run_dir.name,
        "start_timestamp": start.isoformat().replace("+00:00", "Z"),
        "end_timestamp": end.isoformat().replace("+00:00", "Z"),
        "usage_api_reconciliation": {"verification_status": "verified"},
    }
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(doc))
    return path


def test_the_keeper_returns_a_key_once_its_run_is_settled(pool: Pool) -> None:
    run_dir = pool.tmp / "runs" / "claude" / "k1"
    code, _, _ = pool.run("new", "--provider", "anthropic", "--run-dir", str(run_dir))
    assert code == 0
    settings = load_settings({}, config_file=pool.tmp / "tokensettle.toml")
    assert settings.secret_key() == ADMIN
    keeper = LeaseKeeper(lambda: settings, None)  # no OpenAI client: pools need none
    now = datetime.now(UTC)
    # unsettled: the run has not written its file yet
    assert asyncio.run(keeper.revoke(leased_runs([]), now)) == [] and keeper.released == []
    end = now - timedelta(minutes=6)
    path = settled_run(run_dir, end)
    record = with_declared_scope(parse_run(path.read_bytes(), path, "claude", 60))
    pending = replace(record, status=None)
    asyncio.run(keeper.revoke(leased_runs([pending]), now))
    assert keeper.released == [] and pool.book().pool[0].state is PoolState.ACTIVE
    asyncio.run(keeper.revoke(leased_runs([record]), now))
    (released,) = keeper.released
    assert released.release_reason == "settled" and released.free_at == free_after(end, GRACE)
    assert released.free_at <= now  # its window ended long ago: free at once
    # the next run takes the same key at once
    code, _, err = pool.run("exec", "--provider", "anthropic", "--wait", "0s", "--", *pool.child(0))
    assert code == 0, err and pool.report()["env"]["TOKENSETTLE_LEASE_KEY_ID"] == KEY_A


def test_an_index_row_without_an_end_counts_from_the_release(pool: Pool) -> None:
    code, _, _ = pool.run("new", "--provider", "anthropic")
    assert code == 0
    settings = load_settings({}, config_file=pool.tmp / "tokensettle.toml")
    keeper = LeaseKeeper(lambda: settings, None)
    (record,) = pool.book().pool
    lease = replace(record, state=PoolState.ACTIVE)
    decl = load_declaration(
        json.dumps(
            {
                "provider": "anthropic",
                "api_key_ids": [lease.key_id],
                "lease": {
                    "key_id": lease.key_id,
                    "project_id": lease.workspace_id,
                    "created_at": lease.created_at.isoformat(),
                    "expires_at": lease.expires_at.isoformat(),
                    "pool": True,
                },
            }
        ).encode(),
        source="index",
    )
    assert decl.lease is not None
    now = datetime.now(UTC)
    before = (pool.state / "leases.json").stat().st_mtime_ns
    asyncio.run(keeper.revoke(leased_runs([], [(decl.lease, "pending")]), now))
    assert (pool.state / "leases.json").stat().st_mtime_ns == before  # idle: not written
    asyncio.run(keeper.revoke(leased_runs([], [(decl.lease, "verified")]), now))
    (released,) = keeper.released
    assert released.free_at == free_after(now, GRACE)


# ---------------------------------------------------------------------------- exclusivity


def test_many_takers_at_once_never_share_a_key(tmp_path: Path) -> None:
    keys = KeyPool(keys=[PoolKey(id=f"apikey_{i:02d}") for i in range(6)])
    store = LeaseStore(tmp_path / "state")
    got: list[str] = []
    busy: list[int] = []
    start = threading.Barrier(10)

    def taker(i: int) -> None:
        start.wait()
        try:
            lease = asyncio.run(
                take(
                    store,
                    keys,
                    ttl=timedelta(hours=1),
                    hold=timedelta(hours=1),
                    grace=GRACE,
                    wait=timedelta(0),
                    run_dir=f"/runs/{i}",
                )
            )
        except PoolBusy:
            busy.append(i)
        else:
            got.append(lease.key_id)

    threads = [threading.Thread(target=taker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == [f"apikey_{i:02d}" for i in range(6)]  # each once
    assert len(busy) == 4
    book = store.load()
    assert len(book.pool) == 6 and all(r.state is PoolState.ACTIVE for r in book.pool)
    assert len({r.run_dir for r in book.pool}) == 6

"""Leases against real files and the real simulator: the store in a state directory, and
`revoke_due` (the daemon's and reconcile's call) deleting keys, retrying, backing off."""

from __future__ import annotations

import asyncio
import json
import stat
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from tokensettle.admin_api import AdminClient
from tokensettle.leases import (
    LEASES_FILE,
    Lease,
    LeaseState,
    LeaseStore,
    LeaseStoreError,
    RevokePolicy,
    ensure_service_account,
    mint_lease,
    revoke_due,
)
from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.usage_api import RetryPolicy
from tokensettle.usage_scope import LeaseDeclaration

KEY = "sk-admin-leases-S3CRET"
LEASES = "proj_leases"
POLICY = RevokePolicy(retry_delay=timedelta(minutes=2), max_backoff=timedelta(minutes=30))
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    scenario = Scenario.from_json(
        {
            "admin_keys": [KEY],
            "admin": {"projects": [{"id": LEASES}, {"id": "proj_other"}], "usage_delay": 0},
        }
    )
    async with RunningSimulator(scenario) as running:
        yield running


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[AdminClient]:
    async with aiohttp.ClientSession() as session:
        yield AdminClient(
            base_url=sim.base_url,
            admin_key=KEY,
            session=session,
            retry=RetryPolicy(attempts=2, base=0.01, cap=0.02),
        )


@pytest.fixture
def store(tmp_path: Path) -> LeaseStore:
    return LeaseStore(tmp_path / "state")


async def mint(store: LeaseStore, client: AdminClient, n: int) -> list[Lease]:
    now = datetime.now(UTC)
    account = await ensure_service_account(store, client, LEASES, now)
    return [
        (await mint_lease(store, client, account, ttl=timedelta(hours=1), now=now))[0]
        for _ in range(n)
    ]


def live_keys(sim: RunningSimulator) -> set[str]:
    return {k.id for k in sim.admin.keys.values() if k.deleted_at is None}


def deletes(sim: RunningSimulator) -> int:
    return sum(1 for e in sim.call_log if e.method == "DELETE")


async def admin_faults(sim: RunningSimulator, *kinds: str) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{sim.root_url}/_sim/faults",
            json={"faults": [{"kind": k, "target": "admin"} for k in kinds]},
        ) as resp,
    ):
        assert resp.status == 200


# ---------------------------------------------------------------------------- the store


def test_a_missing_book_is_empty_and_a_written_one_is_private(store: LeaseStore) -> None:
    assert store.load().leases == ()
    lease = Lease("key_a", LEASES, "svc_acct_1", T0, T0 + timedelta(hours=1))
    store.update(lambda b: b.with_lease(lease))
    assert store.load().get("key_a") == lease
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in store.state_dir.iterdir()) == [LEASES_FILE, "leases.json.lock"]


def test_a_damaged_book_is_set_aside_not_lost(store: LeaseStore) -> None:
    store.state_dir.mkdir(parents=True)
    store.path.write_bytes(b'{"version": 1, "leases": [{"key_id": ')
    with pytest.raises(LeaseStoreError, match=r"leases\.json: not a lease book"):
        store.load()
    lease = Lease("key_b", LEASES, None, T0, T0 + timedelta(hours=1))
    store.update(lambda b: b.with_lease(lease))
    assert [x.key_id for x in store.load().leases] == ["key_b"]
    aside = list(store.state_dir.glob("leases.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b'{"version": 1, "leases": [{"key_id": '


def test_concurrent_writers_lose_no_record(store: LeaseStore) -> None:
    def add(worker: int) -> None:
        for i in range(10):
            lease = Lease(f"key_{worker}_{i}", LEASES, None, T0, T0 + timedelta(hours=1))
            LeaseStore(store.state_dir).update(lambda b, x=lease: b.with_lease(x))

    threads = [threading.Thread(target=add, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.load().leases) == 60


def test_an_unusable_state_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LeaseStoreError, match=r"^state_dir \(TOKENSETTLE_STATE_DIR\): cannot"):
        LeaseStore(blocker / "state").update(lambda b: b)


# ---------------------------------------------------------------------------- minting


async def test_one_service_account_however_many_first_uses(
    store: LeaseStore, client: AdminClient, sim: RunningSimulator
) -> None:
    now = datetime.now(UTC)
    accounts = await asyncio.gather(
        *(ensure_service_account(store, client, LEASES, now) for _ in range(5))
    )
    assert len({a.id for a in accounts}) == 1
    assert len(sim.admin.service_accounts) == 1
    assert store.load().service_account_for(LEASES) == accounts[0]
    configured = await ensure_service_account(
        store, client, LEASES, now, configured="svc_acct_given"
    )
    assert configured.id == "svc_acct_given" and not configured.created_by_us
    assert len(sim.admin.service_accounts) == 1


async def test_a_minted_lease_is_recorded_without_its_value(
    store: LeaseStore, client: AdminClient, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    account = await ensure_service_account(store, client, LEASES, now)
    lease, key = await mint_lease(
        store,
        client,
        account,
        ttl=timedelta(minutes=90),
        now=now,
        framework="chatdev",
        run_dir=tmp_path / "runs" / "chatdev" / "r1",
    )
    assert lease.key_id == key.id and lease.state is LeaseState.ACTIVE
    assert lease.expires_at - lease.created_at == timedelta(minutes=90)
    assert store.load().get(key.id) == lease
    raw = store.path.read_text()
    assert key.value not in raw and key.id in raw
    assert json.loads(raw)["leases"][0]["run_dir"] == str(tmp_path / "runs" / "chatdev" / "r1")
    with pytest.raises(ValueError, match="not absolute"):
        await mint_lease(store, client, account, ttl=timedelta(hours=1), now=now, run_dir=Path("r"))


# ---------------------------------------------------------------------------- revoking


async def test_only_settled_leases_are_revoked(
    store: LeaseStore, client: AdminClient, sim: RunningSimulator
) -> None:
    a, b, c = await mint(store, client, 3)
    now = datetime.now(UTC)
    assert await revoke_due(store, client, set(), now, policy=POLICY) == []
    assert deletes(sim) == 0
    outcomes = await revoke_due(store, client, {a.key_id}, now, policy=POLICY)
    assert [(o.key_id, o.revoked, o.error) for o in outcomes] == [(a.key_id, True, None)]
    assert live_keys(sim) == {b.key_id, c.key_id}
    book = store.load()
    assert book.get(a.key_id).state is LeaseState.REVOKED  # type: ignore[union-attr]
    assert {book.get(x.key_id).state for x in (b, c)} == {LeaseState.ACTIVE}  # type: ignore[union-attr]
    # settled again later: nothing more to do
    assert await revoke_due(store, client, {a.key_id}, now, policy=POLICY) == []
    assert deletes(sim) == 1


async def test_a_failed_revoke_backs_off_and_is_retried(
    store: LeaseStore, client: AdminClient, sim: RunningSimulator
) -> None:
    (lease,) = await mint(store, client, 1)
    now = datetime.now(UTC)
    await admin_faults(sim, "500", "503")  # both tries of the one delete
    (failed,) = await revoke_due(store, client, {lease.key_id}, now, policy=POLICY)
    assert not failed.revoked and not failed.auth_error
    assert failed.error is not None and "HTTP 503" in failed.error
    assert failed.failures == 1 and failed.next_revoke_at == now + timedelta(minutes=2)
    record = store.load().get(lease.key_id)
    assert record is not None and record.state is LeaseState.SETTLED
    assert record.last_revoke_error == failed.error
    assert live_keys(sim) == {lease.key_id}
    # not due yet: no request at all
    before = deletes(sim)
    assert await revoke_due(store, client, {lease.key_id}, now + timedelta(minutes=1)) == []
    assert deletes(sim) == before
    (done,) = await revoke_due(
        store, client, {lease.key_id}, now + timedelta(minutes=2), policy=POLICY
    )
    assert done.revoked and live_keys(sim) == set()
    record = store.load().get(lease.key_id)
    assert record is not None and record.state is LeaseState.REVOKED
    assert record.revoke_failures == 1


async def test_an_admin_key_that_may_not_delete_stops_the_round(
    store: LeaseStore, client: AdminClient, sim: RunningSimulator
) -> None:
    leases = await mint(store, client, 3)
    sim.admin.usage_only_keys = {KEY}
    before = deletes(sim)
    outcomes = await revoke_due(
        store, client, {x.key_id for x in leases}, datetime.now(UTC), policy=POLICY
    )
    assert [o.auth_error for o in outcomes] == [True, True, True]
    assert deletes(sim) - before == 1  # the other two were not tried
    assert all("HTTP 403" in (o.error or "") and KEY not in (o.error or "") for o in outcomes)
    assert {store.load().get(x.key_id).revoke_failures for x in leases} == {1}  # type: ignore[union-attr]


async def test_a_key_already_gone_counts_as_revoked(
    store: LeaseStore, client: AdminClient, sim: RunningSimulator
) -> None:
    (lease,) = await mint(store, client, 1)
    await client.delete_key(LEASES, lease.key_id)
    (outcome,) = await revoke_due(store, client, {lease.key_id}, datetime.now(UTC))
    assert outcome.revoked and outcome.already_gone


async def test_expired_leases_are_not_deleted(
    store: LeaseStore, client: AdminClient, sim: RunningSimulator
) -> None:
    (lease,) = await mint(store, client, 1)
    later = lease.expires_at + timedelta(seconds=1)
    assert await revoke_due(store, client, {lease.key_id}, later) == []
    record = store.load().get(lease.key_id)
    assert record is not None and record.state is LeaseState.EXPIRED
    assert deletes(sim) == 0


async def test_a_lost_book_still_revokes_declared_leases_of_the_lease_project(
    tmp_path: Path, client: AdminClient, sim: RunningSimulator
) -> None:
    minted = await mint(LeaseStore(tmp_path / "lost"), client, 2)
    fresh = LeaseStore(tmp_path / "fresh")  # leases.json gone
    declared = [
        LeaseDeclaration(x.key_id, x.project_id, x.created_at, x.expires_at) for x in minted
    ]
    foreign = LeaseDeclaration("key_foreign", "proj_other", T0, T0 + timedelta(days=999))
    ids = {x.key_id for x in minted} | {"key_foreign"}
    outcomes = await revoke_due(
        fresh,
        client,
        ids,
        datetime.now(UTC),
        declared=[*declared, foreign],
        lease_project=LEASES,
    )
    assert sorted(o.key_id for o in outcomes if o.revoked) == sorted(x.key_id for x in minted)
    assert live_keys(sim) == set()
    assert fresh.load().get("key_foreign") is None  # another project's key: never touched
    # without lease_project nothing is adopted
    other = LeaseStore(tmp_path / "other")
    assert await revoke_due(other, client, ids, datetime.now(UTC), declared=declared) == []


async def test_a_declaration_naming_a_users_own_key_never_deletes_it(
    tmp_path: Path, client: AdminClient, sim: RunningSimulator
) -> None:
    """A hand-written usage_scope.json with a `lease` object naming a shared user key in
    the lease project: the daemon adopted it once the run settled and deleted the key."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{sim.root_url}/_sim/admin",
            json={
                "api_keys": [{"id": "key_shared01", "value": "sk-proj-sh-1", "project_id": LEASES}]
            },
        ) as resp,
    ):
        assert resp.status == 200
    store = LeaseStore(tmp_path / "state")
    now = datetime.now(UTC)
    declared = LeaseDeclaration("key_shared01", LEASES, now, now + timedelta(days=1))
    (outcome,) = await revoke_due(
        store,
        client,
        {"key_shared01"},
        datetime.now(UTC),
        declared=[declared],
        lease_project=LEASES,
    )
    assert not outcome.revoked and outcome.not_ours, outcome
    assert "key_shared01" in live_keys(sim) and deletes(sim) == 0
    assert store.load().get("key_shared01") is None  # forgotten, not retried every round
    again = await revoke_due(
        store,
        client,
        {"key_shared01"},
        datetime.now(UTC),
        declared=[declared],
        lease_project=LEASES,
    )
    assert [o.not_ours for o in again] == [True] and deletes(sim) == 0


async def test_an_idle_round_touches_nothing(
    store: LeaseStore, client: AdminClient, sim: RunningSimulator
) -> None:
    """The daemon calls revoke_due every round: without leases it creates no file, and with
    nothing to do it neither rewrites the book nor sends a request."""
    assert await revoke_due(store, client, {"key_x"}, datetime.now(UTC)) == []
    assert not store.state_dir.exists()
    await mint(store, client, 2)
    before = (store.path.read_bytes(), store.path.stat().st_mtime_ns, len(sim.call_log))
    (store.state_dir / "leases.json.lock").unlink()
    assert await revoke_due(store, client, {"key_x"}, datetime.now(UTC)) == []
    after = (store.path.read_bytes(), store.path.stat().st_mtime_ns, len(sim.call_log))
    assert after == before
    assert not (store.state_dir / "leases.json.lock").exists()  # no lock was taken

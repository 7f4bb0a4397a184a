"""The lease room: leased keys are deleted once every run that declares them is settled,
and pool keys go back to their pool.

A key is settled when the runs declaring it (through their `usage_scope` lease) are all
`verified`, `ambiguous` or `expired`, and no unsettled run declares it. The daemon asks
after each poll round, `reconcile` after its batch; `leases.revoke_due` does the deletes
with backoff. A failed delete never blocks settling: it counts in `/metrics` and shows in
`/healthz` (`revoke`) until the same key is deleted; a refused admin key shows as such.

A pool lease (Anthropic, `"pool": true`) is one of many leases of its key, so it is told
apart by `(key_id, created_at)`, and it is released, not deleted (`pool.release_due`, no
API call, so no admin key is needed). The runs' recorded ends go with it when known:
they decide when the key may serve the next run (`pool.free_after`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp
import structlog

from tokensettle.admin_api import AdminClient, client_for
from tokensettle.config import Settings
from tokensettle.health import Faults
from tokensettle.leases import (
    LeaseStore,
    LeaseStoreError,
    PoolLease,
    RevokeOutcome,
    RevokePolicy,
    revoke_due,
)
from tokensettle.pool import release_due
from tokensettle.runfile import RunRecord
from tokensettle.stability import TERMINAL
from tokensettle.usage_scope import LeaseDeclaration

log = structlog.get_logger("tokensettle.leases")

SETTLED = frozenset(s.value for s in TERMINAL)


@dataclass
class LeasedRuns:
    """Which leased keys the runs in view declare, settled or not; for pool leases, by
    lease `(key_id, created_at)`, with the settled runs' ends (None: not known)."""

    settled: dict[str, LeaseDeclaration] = field(default_factory=dict)
    unsettled: set[str] = field(default_factory=set)
    pool_settled: dict[tuple[str, datetime], list[datetime | None]] = field(default_factory=dict)
    pool_unsettled: set[tuple[str, datetime]] = field(default_factory=set)

    def add(self, lease: LeaseDeclaration, status: str | None, end: datetime | None = None) -> None:
        if lease.pool:
            if status in SETTLED:
                self.pool_settled.setdefault(lease.identity, []).append(end)
            else:
                self.pool_unsettled.add(lease.identity)
        elif status in SETTLED:
            self.settled.setdefault(lease.key_id, lease)
        else:
            self.unsettled.add(lease.key_id)

    def add_record(self, record: RunRecord) -> None:
        declared = record.declared
        if declared is not None and declared.lease is not None:
            status = record.status.value if record.status else None
            self.add(declared.lease, status, record.end)

    @property
    def settled_keys(self) -> set[str]:
        return set(self.settled) - self.unsettled

    @property
    def declarations(self) -> list[LeaseDeclaration]:
        keys = self.settled_keys
        return [lease for key, lease in self.settled.items() if key in keys]


def admin_client(settings: Settings, session: aiohttp.ClientSession) -> AdminClient | None:
    key = settings.secret_key()
    return client_for(settings, session, key) if key else None


class LeaseKeeper:
    def __init__(
        self,
        settings: Callable[[], Settings],
        client: AdminClient | None,
        *,
        faults: Faults | None = None,
        on_outcome: Callable[[RevokeOutcome], None] | None = None,
    ) -> None:
        self._settings = settings
        self.client = client
        self.faults = faults
        self.on_outcome = on_outcome
        #: the pool leases the last `revoke` released
        self.released: list[PoolLease] = []

    @property
    def store(self) -> LeaseStore:
        return LeaseStore(self._settings().state_dir)

    async def revoke(self, runs: LeasedRuns, now: datetime) -> list[RevokeOutcome]:
        """Release the pool leases of `runs` that are settled (or past their TTL), then
        delete the minted keys that are settled and due. Never raises. Returns the
        deletes tried; the pool leases released are in `released` (and logged as
        `lease.released`). A pool needs no admin key: it is released without one."""
        settings = self._settings()
        store = self.store
        outcomes: list[RevokeOutcome] = []
        try:
            self.released = await release_due(
                store, runs.pool_settled, runs.pool_unsettled, now, settings.window_grace
            )
            if self.client is not None:
                outcomes = await revoke_due(
                    store,
                    self.client,
                    runs.settled_keys,
                    now,
                    policy=RevokePolicy.from_settings(settings),
                    declared=runs.declarations,
                    lease_project=settings.lease_project,
                )
        except LeaseStoreError as exc:
            log.warning("lease.store_failed", error=str(exc))
            if self.faults is not None:
                self.faults.raise_("revoke", "leases.json", str(exc), now)
            return []
        if self.faults is not None:
            self.faults.clear("revoke", "leases.json")
        for outcome in outcomes:
            self._record(outcome, now)
        return outcomes

    def _record(self, outcome: RevokeOutcome, now: datetime) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        if self.faults is None:
            return
        if outcome.revoked:
            self.faults.clear("revoke", outcome.key_id)
            return
        what = "the admin key may not delete project keys" if outcome.auth_error else "failed"
        self.faults.raise_(
            "revoke", outcome.key_id, f"{outcome.key_id}: {what}: {outcome.error}", now
        )


def leased_runs(
    records: Iterable[RunRecord], finished: Iterable[tuple[LeaseDeclaration, str]] = ()
) -> LeasedRuns:
    """The leased keys declared by `records` (any status) and by finished index rows."""
    runs = LeasedRuns()
    for lease, status in finished:
        runs.add(lease, status)
    for record in records:
        runs.add_record(record)
    return runs

"""Leases: per-run API keys, their records in STATE_DIR, and their revocation.

A lease is a service-account key minted for one run in the configured lease project,
expiring after `LEASE_TTL`. Its record (never its value) lives in `STATE_DIR/leases.json`,
rewritten atomically under the lock `leases.json.lock`, together with the service account
the leases are minted for (created once with `create_service_account_only`). The same
book holds one `PoolLease` per Anthropic pool key (its current or last lease); the pool's
rules are in `tokensettle.pool`.

States, and the pure functions that move between them:

    active --settle()--> settled --revoked()--> revoked
       |                   |  ^
       |                   |  +-- revoke_failed(): stays settled, next try after backoff
       +-----expire()------+---> expired (expires_at passed: the key is dead anyway)

A lease is settled when every run that declares its key is settled (the caller knows the
runs and passes their key ids); only then is its key deleted, so no settling ever depends
on querying a deleted key. Losing `leases.json` loses nothing that matters: each run's
declaration names its key, and keys expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import structlog
from filelock import FileLock

from tokensettle.admin_api import (
    AdminApiError,
    AdminAuthError,
    AdminClient,
    AdminNotFoundError,
    LeasedKey,
)
from tokensettle.atomic import publish
from tokensettle.stability import backoff
from tokensettle.usage_scope import LeaseDeclaration

__all__ = [
    "DEFAULT_SERVICE_ACCOUNT_NAME",
    "LEASES_FILE",
    "LOCK_FILE",
    "Lease",
    "LeaseBook",
    "LeaseState",
    "LeaseStore",
    "LeaseStoreError",
    "PoolLease",
    "PoolState",
    "RevokeOutcome",
    "RevokePolicy",
    "ServiceAccountRecord",
    "advance",
    "effective_state",
    "ensure_service_account",
    "expire",
    "is_due",
    "key_name",
    "mint_lease",
    "remembered_service_account",
    "revoke",
    "revoke_due",
    "revoke_failed",
    "revoked",
    "settle",
]

LEASES_FILE: Final = "leases.json"
LOCK_FILE: Final = "leases.json.lock"
DEFAULT_SERVICE_ACCOUNT_NAME: Final = "tokensettle-leases"
_VERSION: Final = 1
_ERROR_LIMIT: Final = 300

log = structlog.get_logger("tokensettle.leases")


class LeaseState(StrEnum):
    ACTIVE = "active"
    SETTLED = "settled"
    REVOKED = "revoked"
    EXPIRED = "expired"


class PoolState(StrEnum):
    ACTIVE = "active"  # held by one run
    RELEASED = "released"  # back in the pool, handed out again from `free_at`


class LeaseStoreError(Exception):
    """`leases.json` cannot be read or written. `str()` is one line naming the file."""


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not an ISO 8601 string")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"{what} has no time zone")
    return parsed.astimezone(UTC)


def _opt_time(value: object, what: str) -> datetime | None:
    return None if value is None else _time(value, what)


def _opt_str(value: object, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value


# --------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class Lease:
    """What we remember of a lease. There is no field for the key's value, on purpose."""

    key_id: str
    project_id: str
    service_account_id: str | None
    created_at: datetime
    expires_at: datetime
    framework: str | None = None
    #: Absolute run directory given to `lease exec/new --run-dir`, if any.
    run_dir: str | None = None
    state: LeaseState = LeaseState.ACTIVE
    settled_at: datetime | None = None
    revoked_at: datetime | None = None
    revoke_failures: int = 0
    last_revoke_error: str | None = None
    next_revoke_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "project_id": self.project_id,
            "service_account_id": self.service_account_id,
            "framework": self.framework,
            "run_dir": self.run_dir,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "state": self.state.value,
            "settled_at": _iso(self.settled_at),
            "revoked_at": _iso(self.revoked_at),
            "revoke_failures": self.revoke_failures,
            "last_revoke_error": self.last_revoke_error,
            "next_revoke_at": _iso(self.next_revoke_at),
        }

    @staticmethod
    def from_json(obj: object) -> Lease:
        """Raises ValueError (or KeyError/TypeError) on a record that is not one."""
        if not isinstance(obj, dict):
            raise ValueError("a lease record is not an object")
        key_id, project_id = obj["key_id"], obj["project_id"]
        if not isinstance(key_id, str) or not isinstance(project_id, str):
            raise ValueError("key_id and project_id must be strings")
        failures = obj.get("revoke_failures", 0)
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
            raise ValueError("revoke_failures must be a non-negative integer")
        return Lease(
            key_id=key_id,
            project_id=project_id,
            service_account_id=_opt_str(obj.get("service_account_id"), "service_account_id"),
            created_at=_time(obj["created_at"], "created_at"),
            expires_at=_time(obj["expires_at"], "expires_at"),
            framework=_opt_str(obj.get("framework"), "framework"),
            run_dir=_opt_str(obj.get("run_dir"), "run_dir"),
            state=LeaseState(obj.get("state", "active")),
            settled_at=_opt_time(obj.get("settled_at"), "settled_at"),
            revoked_at=_opt_time(obj.get("revoked_at"), "revoked_at"),
            revoke_failures=failures,
            last_revoke_error=_opt_str(obj.get("last_revoke_error"), "last_revoke_error"),
            next_revoke_at=_opt_time(obj.get("next_revoke_at"), "next_revoke_at"),
        )


def _opt_int(value: object, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{what} is not an integer")
    return value


@dataclass(frozen=True, slots=True)
class PoolLease:
    """A pool key's current lease, or its last one once released (one record per key,
    so a key is never recorded as held twice). There is no field for the value."""

    key_id: str
    workspace_id: str | None
    #: the lease's start and its identity in run declarations (whole seconds)
    created_at: datetime
    #: the crash bound: created_at + TTL, renewed while `lease exec` runs
    expires_at: datetime
    framework: str | None = None
    run_dir: str | None = None
    #: "exec" (a `lease exec` process holds it and renews it) or "new" (a runner does)
    holder: str = "exec"
    pid: int | None = None
    renewed_at: datetime | None = None
    #: when `lease exec`'s command exited (the key's last possible use by it)
    ended_at: datetime | None = None
    state: PoolState = PoolState.ACTIVE
    released_at: datetime | None = None
    #: settled | expired | revoked (by hand) | no_run (exited without a run file) | unused
    release_reason: str | None = None
    #: when the key may be handed out again (see pool.free_after)
    free_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "workspace_id": self.workspace_id,
            "framework": self.framework,
            "run_dir": self.run_dir,
            "holder": self.holder,
            "pid": self.pid,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "renewed_at": _iso(self.renewed_at),
            "ended_at": _iso(self.ended_at),
            "state": self.state.value,
            "released_at": _iso(self.released_at),
            "release_reason": self.release_reason,
            "free_at": _iso(self.free_at),
        }

    @staticmethod
    def from_json(obj: object) -> PoolLease:
        """Raises ValueError (or KeyError/TypeError) on a record that is not one."""
        if not isinstance(obj, dict):
            raise ValueError("a pool lease record is not an object")
        if not isinstance(obj["key_id"], str):
            raise ValueError("key_id must be a string")
        holder = obj.get("holder", "exec")
        if holder not in ("exec", "new"):
            raise ValueError("holder must be 'exec' or 'new'")
        return PoolLease(
            key_id=obj["key_id"],
            workspace_id=_opt_str(obj.get("workspace_id"), "workspace_id"),
            created_at=_time(obj["created_at"], "created_at"),
            expires_at=_time(obj["expires_at"], "expires_at"),
            framework=_opt_str(obj.get("framework"), "framework"),
            run_dir=_opt_str(obj.get("run_dir"), "run_dir"),
            holder=holder,
            pid=_opt_int(obj.get("pid"), "pid"),
            renewed_at=_opt_time(obj.get("renewed_at"), "renewed_at"),
            ended_at=_opt_time(obj.get("ended_at"), "ended_at"),
            state=PoolState(obj.get("state", "active")),
            released_at=_opt_time(obj.get("released_at"), "released_at"),
            release_reason=_opt_str(obj.get("release_reason"), "release_reason"),
            free_at=_opt_time(obj.get("free_at"), "free_at"),
        )


@dataclass(frozen=True, slots=True)
class ServiceAccountRecord:
    """The service account leases of a project are minted for."""

    id: str
    project_id: str
    name: str
    created_at: datetime
    #: False for an account named by TOKENSETTLE_LEASE_SERVICE_ACCOUNT (never stored).
    created_by_us: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project_id": self.project_id,
            "name": self.name,
            "created_at": _iso(self.created_at),
            "created_by_us": self.created_by_us,
        }

    @staticmethod
    def from_json(obj: object) -> ServiceAccountRecord:
        if not isinstance(obj, dict):
            raise ValueError("a service account record is not an object")
        for name in ("id", "project_id", "name"):
            if not isinstance(obj.get(name), str):
                raise ValueError(f"service account {name} must be a string")
        return ServiceAccountRecord(
            id=obj["id"],
            project_id=obj["project_id"],
            name=obj["name"],
            created_at=_time(obj["created_at"], "created_at"),
            created_by_us=bool(obj.get("created_by_us", True)),
        )


@dataclass(frozen=True, slots=True)
class LeaseBook:
    """Everything `leases.json` holds. Immutable; the `with_*` methods return new books."""

    leases: tuple[Lease, ...] = ()
    service_accounts: tuple[ServiceAccountRecord, ...] = ()
    #: one record per pool key that was ever leased (sorted by key id)
    pool: tuple[PoolLease, ...] = ()
    #: when a damaged book was set aside and this one started empty: which pool keys
    #: were held is unknown since then (pool.PoolView holds unrecorded keys for a TTL)
    reset_at: datetime | None = None

    def get(self, key_id: str) -> Lease | None:
        return next((lease for lease in self.leases if lease.key_id == key_id), None)

    def with_lease(self, lease: Lease) -> LeaseBook:
        """The book with `lease` added, or replacing the record of the same key id."""
        others = tuple(x for x in self.leases if x.key_id != lease.key_id)
        ordered = sorted((*others, lease), key=lambda x: (x.created_at, x.key_id))
        return replace(self, leases=tuple(ordered))

    def pool_lease(self, key_id: str) -> PoolLease | None:
        return next((x for x in self.pool if x.key_id == key_id), None)

    def with_pool_lease(self, record: PoolLease) -> LeaseBook:
        """The book with `record` as its key's record (replacing the previous one)."""
        others = tuple(x for x in self.pool if x.key_id != record.key_id)
        return replace(self, pool=tuple(sorted((*others, record), key=lambda x: x.key_id)))

    def service_account_for(self, project_id: str) -> ServiceAccountRecord | None:
        return next((a for a in self.service_accounts if a.project_id == project_id), None)

    def with_service_account(self, account: ServiceAccountRecord) -> LeaseBook:
        others = tuple(a for a in self.service_accounts if a.project_id != account.project_id)
        return replace(self, service_accounts=(*others, account))

    def without_service_account(self, project_id: str, account_id: str) -> LeaseBook:
        kept = tuple(
            a
            for a in self.service_accounts
            if not (a.project_id == project_id and a.id == account_id)
        )
        return replace(self, service_accounts=kept)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": _VERSION,
            "service_accounts": [a.to_json() for a in self.service_accounts],
            "leases": [lease.to_json() for lease in self.leases],
            "pool": [record.to_json() for record in self.pool],
        }
        if self.reset_at is not None:
            out["reset_at"] = _iso(self.reset_at)
        return out

    @staticmethod
    def from_json(obj: object) -> LeaseBook:
        if not isinstance(obj, dict) or obj.get("version") != _VERSION:
            raise ValueError(f"not a version {_VERSION} lease book")
        leases, accounts = obj.get("leases", []), obj.get("service_accounts", [])
        pool = obj.get("pool", [])
        if not isinstance(leases, list) or not isinstance(accounts, list):
            raise ValueError("'leases' and 'service_accounts' must be lists")
        if not isinstance(pool, list):
            raise ValueError("'pool' must be a list")
        book = LeaseBook(
            service_accounts=tuple(ServiceAccountRecord.from_json(a) for a in accounts),
            reset_at=_opt_time(obj.get("reset_at"), "reset_at"),
        )
        for raw in leases:
            book = book.with_lease(Lease.from_json(raw))
        for raw in pool:
            book = book.with_pool_lease(PoolLease.from_json(raw))
        return book


# --------------------------------------------------------------------------------------
# The state machine (pure)


@dataclass(frozen=True, slots=True)
class RevokePolicy:
    """Backoff of failed deletes: `retry_delay` doubling to `max_backoff` (the settings
    RETRY_DELAY and MAX_BACKOFF, as for failed polls and writes)."""

    retry_delay: timedelta = timedelta(minutes=2)
    max_backoff: timedelta = timedelta(minutes=30)

    @staticmethod
    def from_settings(settings: Any) -> RevokePolicy:
        return RevokePolicy(settings.retry_delay, settings.max_backoff)


def settle(lease: Lease, now: datetime) -> Lease:
    """active -> settled (due for revocation at once); any other state unchanged."""
    if lease.state is not LeaseState.ACTIVE:
        return lease
    return replace(lease, state=LeaseState.SETTLED, settled_at=now, next_revoke_at=now)


def expire(lease: Lease, now: datetime) -> Lease:
    """active/settled -> expired once `expires_at` has passed: the key no longer works,
    so retrying its delete is pointless. Revoked and expired leases are unchanged."""
    if lease.state in (LeaseState.ACTIVE, LeaseState.SETTLED) and now >= lease.expires_at:
        return replace(lease, state=LeaseState.EXPIRED, next_revoke_at=None)
    return lease


def effective_state(lease: Lease, now: datetime) -> LeaseState:
    """The state as of `now` (an unrecorded expiry counts), for listings."""
    return expire(lease, now).state


def revoked(lease: Lease, now: datetime) -> Lease:
    """The key was deleted (or was already gone): -> revoked."""
    return replace(
        lease,
        state=LeaseState.REVOKED,
        revoked_at=now,
        next_revoke_at=None,
        last_revoke_error=None,
    )


def revoke_failed(lease: Lease, now: datetime, error: str, policy: RevokePolicy) -> Lease:
    """A delete failed: the state stays, the failure counts, the next try waits
    `retry_delay` doubled per consecutive failure, capped at `max_backoff`."""
    failures = lease.revoke_failures + 1
    wait = backoff(policy.retry_delay, failures, policy.max_backoff)
    return replace(
        lease,
        revoke_failures=failures,
        last_revoke_error=error[:_ERROR_LIMIT],
        next_revoke_at=now + wait,
    )


def is_due(lease: Lease, now: datetime) -> bool:
    """Whether the daemon should try to delete the key now."""
    if lease.state is not LeaseState.SETTLED or now >= lease.expires_at:
        return False
    return lease.next_revoke_at is None or lease.next_revoke_at <= now


def advance(book: LeaseBook, settled_key_ids: Iterable[str], now: datetime) -> LeaseBook:
    """Settle the leases whose keys are in `settled_key_ids`, expire the ones past their
    expiry. Returns the same object when nothing changed."""
    settled = frozenset(settled_key_ids)
    out = book
    for lease in book.leases:
        moved = expire(settle(lease, now) if lease.key_id in settled else lease, now)
        if moved != lease:
            out = out.with_lease(moved)
            log.info(
                f"lease.{moved.state.value}",
                key_id=moved.key_id,
                project_id=moved.project_id,
                framework=moved.framework,
                run_dir=moved.run_dir,
            )
    return out


def key_name(framework: str | None, now: datetime) -> str:
    """A unique, readable name for a leased key (it shows in the dashboard's key list)."""
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"tokensettle-{framework or 'run'}-{stamp}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------------------
# The store (files)


class LeaseStore:
    """`leases.json` in a state directory. Reads need no lock (the file is replaced
    atomically); every change holds `leases.json.lock`, so `lease exec` processes and the
    daemon can share one state directory."""

    def __init__(self, state_dir: Path, *, lock_timeout: float = 30.0) -> None:
        self.state_dir = Path(os.path.abspath(state_dir))
        self.path = self.state_dir / LEASES_FILE
        self.lock_path = self.state_dir / LOCK_FILE
        self._lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"LeaseStore({str(self.path)!r})"

    def load(self) -> LeaseBook:
        """The book (empty when there is no file). Raises LeaseStoreError when the file
        cannot be read or is not a lease book."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return LeaseBook()
        except OSError as exc:
            raise LeaseStoreError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            return LeaseBook.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise LeaseStoreError(f"{self.path}: not a lease book ({exc})") from None

    def _lock(self) -> FileLock:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise LeaseStoreError(
                f"state_dir (TOKENSETTLE_STATE_DIR): cannot create {self.state_dir}: "
                f"{exc.strerror or exc}"
            ) from None
        # Not thread-local: `alocked` acquires in a worker thread and releases in the loop.
        return FileLock(str(self.lock_path), timeout=self._lock_timeout, thread_local=False)

    def _acquired(self) -> FileLock:
        lock = self._lock()
        try:
            lock.acquire()
        except TimeoutError:
            raise LeaseStoreError(
                f"{self.lock_path}: held by another process for over {self._lock_timeout:g}s"
            ) from None
        return lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold `leases.json.lock` (creating the state directory if needed)."""
        lock = self._acquired()
        try:
            yield
        finally:
            lock.release()

    @contextlib.asynccontextmanager
    async def alocked(self) -> AsyncIterator[None]:
        """`locked()` for coroutines that await while holding it: the wait for the lock
        happens in a worker thread, so the event loop keeps running meanwhile."""
        lock = await asyncio.to_thread(self._acquired)
        try:
            yield
        finally:
            lock.release()

    def load_or_set_aside(self) -> LeaseBook:
        """Under the lock: the book, or a fresh one after moving a damaged file aside
        (kept for a human as `leases.json.damaged-<time>`; the leases it named expire).
        The fresh book records `reset_at`, so pool keys it does not know are not handed
        out as if free (which of them were held is unknown)."""
        try:
            return self.load()
        except LeaseStoreError as exc:
            if not self.path.exists():
                raise
            now = datetime.now(UTC)
            stamp = now.strftime("%Y%m%dT%H%M%S")
            aside = self.path.with_name(f"{LEASES_FILE}.damaged-{stamp}")
            os.replace(self.path, aside)
            log.warning(
                "lease.store_damaged", path=str(self.path), moved_to=str(aside), error=str(exc)
            )
            return LeaseBook(reset_at=now.replace(microsecond=0))

    def save(self, book: LeaseBook) -> None:
        """Write the book atomically (call under `locked()`)."""
        data = (json.dumps(book.to_json(), indent=2) + "\n").encode("utf-8")
        try:
            publish(self.path, data, mode=0o600)
        except OSError as exc:
            raise LeaseStoreError(f"{self.path}: cannot write: {exc.strerror or exc}") from None

    def update(self, change: Callable[[LeaseBook], LeaseBook]) -> LeaseBook:
        """Under the lock: read, apply `change`, write when it changed anything (or the
        book was set aside just now: its `reset_at` must outlive this call)."""
        with self.locked():
            book = self.load_or_set_aside()
            new = change(book)
            set_aside = book.reset_at is not None and not self.path.exists()
            if new != book or set_aside:
                self.save(new)
            return new


# --------------------------------------------------------------------------------------
# Minting and revoking (I/O)


def remembered_service_account(store: LeaseStore, project_id: str) -> ServiceAccountRecord | None:
    """The service account remembered for `project_id`; None when there is none or the
    book is damaged (the next change under the lock sets it aside)."""
    try:
        return store.load().service_account_for(project_id)
    except LeaseStoreError:
        return None


async def ensure_service_account(
    store: LeaseStore,
    client: AdminClient,
    project_id: str,
    now: datetime,
    *,
    configured: str | None = None,
    name: str = DEFAULT_SERVICE_ACCOUNT_NAME,
) -> ServiceAccountRecord:
    """The service account to mint leases for: `configured` (TOKENSETTLE_LEASE_SERVICE_ACCOUNT)
    when given; else the one remembered for `project_id`; else a new one, created with
    `create_service_account_only` (role none, no key) and remembered. Creation holds the
    store's lock, so concurrent first uses (processes or coroutines) create one account.

    Raises AdminApiError subclasses (the Default or an archived project: AdminRequestError)
    and LeaseStoreError.
    """
    if configured:
        return ServiceAccountRecord(configured, project_id, configured, now, created_by_us=False)
    known = await asyncio.to_thread(remembered_service_account, store, project_id)
    if known is not None:
        return known
    async with store.alocked():
        book = await asyncio.to_thread(store.load_or_set_aside)
        known = book.service_account_for(project_id)
        if known is not None:
            return known
        account = await client.create_service_account(
            project_id, name, create_service_account_only=True
        )
        record = ServiceAccountRecord(account.id, project_id, account.name, now)
        await asyncio.to_thread(store.save, book.with_service_account(record))
    log.info("lease.service_account_created", project_id=project_id, service_account_id=record.id)
    return record


async def mint_lease(
    store: LeaseStore,
    client: AdminClient,
    account: ServiceAccountRecord,
    *,
    ttl: timedelta,
    now: datetime,
    framework: str | None = None,
    run_dir: Path | None = None,
) -> tuple[Lease, LeasedKey]:
    """Create a key for `account` expiring in `ttl`, record its lease (state active),
    and return both. The LeasedKey is the only object holding the value: the caller hands
    it to the run. `run_dir` must be absolute. Raises AdminApiError (a 404: the account
    is gone) or LeaseStoreError; if recording fails, the key is deleted again first."""
    if run_dir is not None and not run_dir.is_absolute():
        raise ValueError(f"run_dir {run_dir} is not absolute")
    seconds = max(1, int(ttl.total_seconds()))
    key = await client.create_key(
        account.project_id,
        account.id,
        name=key_name(framework, now),
        expires_in_seconds=seconds,
    )
    created = datetime.fromtimestamp(key.created_at, UTC)
    expires = (
        datetime.fromtimestamp(key.expires_at, UTC)
        if key.expires_at is not None
        else created + timedelta(seconds=seconds)
    )
    lease = Lease(
        key_id=key.id,
        project_id=account.project_id,
        service_account_id=account.id,
        created_at=created,
        expires_at=expires,
        framework=framework,
        run_dir=str(run_dir) if run_dir is not None else None,
    )
    try:
        await asyncio.to_thread(store.update, lambda book: book.with_lease(lease))
    except LeaseStoreError:
        with contextlib.suppress(AdminApiError):
            await client.delete_key(account.project_id, key.id)
        raise
    log.info(
        "lease.created",
        key_id=key.id,
        project_id=account.project_id,
        service_account_id=account.id,
        framework=framework,
        run_dir=lease.run_dir,
        expires_at=_iso(expires),
    )
    return lease, key


@dataclass(frozen=True, slots=True)
class RevokeOutcome:
    """What one delete did. `error` is one line without secrets; `auth_error` marks a
    401/403 (the admin key may not delete keys: a configuration problem to show)."""

    key_id: str
    project_id: str
    revoked: bool
    already_gone: bool = False
    error: str | None = None
    auth_error: bool = False
    failures: int = 0
    next_revoke_at: datetime | None = None


async def _delete(client: AdminClient, lease: Lease) -> RevokeOutcome:
    try:
        await client.delete_key(lease.project_id, lease.key_id)
    except AdminNotFoundError:
        return RevokeOutcome(lease.key_id, lease.project_id, revoked=True, already_gone=True)
    except AdminApiError as exc:
        auth = isinstance(exc, AdminAuthError)
        return RevokeOutcome(
            lease.key_id, lease.project_id, revoked=False, error=str(exc), auth_error=auth
        )
    return RevokeOutcome(lease.key_id, lease.project_id, revoked=True)


async def revoke(
    store: LeaseStore,
    client: AdminClient,
    leases: Sequence[Lease],
    now: datetime,
    *,
    policy: RevokePolicy = RevokePolicy(),
) -> list[RevokeOutcome]:
    """Delete the keys of `leases`, one after another, and record each result: revoked
    (a 404 counts: the key is gone), or a failure with backoff. Never raises for a failed
    delete. After a 401/403 the rest are not tried (the same key would be refused) and
    carry the same error. Leases not in the store (a lost record) are deleted unrecorded."""
    outcomes: list[RevokeOutcome] = []
    refused: RevokeOutcome | None = None
    for lease in leases:
        if refused is not None:
            outcomes.append(replace(refused, key_id=lease.key_id, project_id=lease.project_id))
            continue
        outcome = await _delete(client, lease)
        if outcome.auth_error:
            refused = outcome
        outcomes.append(outcome)

    recorded: dict[str, Lease] = {}

    def apply(book: LeaseBook) -> LeaseBook:
        for outcome in outcomes:
            current = book.get(outcome.key_id)
            if current is None or current.state is LeaseState.REVOKED:
                continue  # unrecorded, or revoked meanwhile by another process
            if outcome.revoked:
                moved = revoked(current, now)
            else:
                moved = revoke_failed(current, now, outcome.error or "failed", policy)
            recorded[outcome.key_id] = moved
            book = book.with_lease(moved)
        return book

    await asyncio.to_thread(store.update, apply)
    final = [
        replace(o, failures=r.revoke_failures, next_revoke_at=r.next_revoke_at)
        if (r := recorded.get(o.key_id)) is not None
        else o
        for o in outcomes
    ]
    for outcome in final:
        _log_outcome(outcome, recorded.get(outcome.key_id))
    return final


def _log_outcome(outcome: RevokeOutcome, lease: Lease | None) -> None:
    where = {
        "key_id": outcome.key_id,
        "project_id": outcome.project_id,
        "framework": lease.framework if lease is not None else None,
        "run_dir": lease.run_dir if lease is not None else None,
    }
    if outcome.revoked:
        log.info("lease.revoked", already_gone=outcome.already_gone, **where)
    else:
        log.warning(
            "lease.revoke_failed",
            error=outcome.error,
            auth_error=outcome.auth_error,
            failures=outcome.failures,
            next_revoke_at=_iso(outcome.next_revoke_at),
            **where,
        )


def _has_work(
    book: LeaseBook, settled: frozenset[str], adoptable: Sequence[LeaseDeclaration], now: datetime
) -> bool:
    """Whether a round would change or delete anything (pure; no logging)."""
    if any(book.get(d.key_id) is None for d in adoptable):
        return True
    return any(
        (lease.state is LeaseState.ACTIVE and lease.key_id in settled)
        or expire(lease, now) != lease
        or is_due(lease, now)
        for lease in book.leases
    )


async def revoke_due(
    store: LeaseStore,
    client: AdminClient,
    settled_key_ids: Iterable[str],
    now: datetime,
    *,
    policy: RevokePolicy = RevokePolicy(),
    declared: Iterable[LeaseDeclaration] = (),
    lease_project: str | None = None,
) -> list[RevokeOutcome]:
    """The daemon's and reconcile's call, once per round: mark settled the leases whose
    key ids are in `settled_key_ids` (every run declaring the key is settled), mark
    expired the ones past `expires_at`, then delete the keys that are due (settled, not
    backing off) and record the results. Returns one outcome per delete tried; never
    raises for a failed delete (AdminApiError is in the outcome, 401/403 as
    `auth_error`). May raise LeaseStoreError when `leases.json` cannot be written.

    `declared`: the `lease` objects of settled runs' declarations. One whose key the store
    does not know (a lost `leases.json`) is adopted as a settled lease when its project is
    `lease_project`, so its key is still deleted; other projects are never touched, and
    neither are pool leases (their keys are released by `pool.release_due`, never deleted).
    """
    settled = frozenset(settled_key_ids)
    adoptable = [
        d
        for d in declared
        if not d.pool and d.project_id is not None and d.project_id == lease_project
        if d.key_id in settled
    ]
    try:
        current = await asyncio.to_thread(store.load)
    except LeaseStoreError:
        current = None  # damaged: the locked update below sets it aside
    if current is not None and not _has_work(current, settled, adoptable, now):
        return []  # an idle round takes no lock and writes nothing
    due: list[Lease] = []

    def mark(book: LeaseBook) -> LeaseBook:
        for decl in adoptable:
            if book.get(decl.key_id) is None and decl.project_id is not None:
                adopted = Lease(
                    key_id=decl.key_id,
                    project_id=decl.project_id,
                    service_account_id=None,
                    created_at=decl.created_at,
                    expires_at=decl.expires_at,
                )
                book = book.with_lease(adopted)
        book = advance(book, settled, now)
        due.extend(lease for lease in book.leases if is_due(lease, now))
        return book

    await asyncio.to_thread(store.update, mark)
    if not due:
        return []
    return await revoke(store, client, due, now, policy=policy)

"""The Anthropic key pool: Console-made keys leased to one run at a time.

Anthropic's Admin API cannot create or delete keys (admin-api-notes.md section 7), so
`tokensettle lease --provider anthropic` hands out keys the user made by hand: their ids
in `[leases.anthropic] keys`, their values in a credentials file of `ID=VALUE` lines.
Each key has one `PoolLease` record in `leases.json` (its current or last lease), changed
only under the store's lock, so two `lease exec` never hold the same key.

The rule that keeps a key's minutes apart (pure, `free_after`): a run's window is
`[floor_minute(start), ceil_minute(end) + grace)` (windows.Activity). A key returned to
the pool is handed out again only once the minute *after* the last minute the previous
lease could have used has passed: `free_after(last_use) = window end of last_use + 1
minute`. The next run starts no earlier, so its window (from the floor of its start)
begins at least one empty minute after the previous run's window ends, and no minute of
the usage report holds two runs' usage under one key. `last_use` is the latest of what
is known: the declaring runs' recorded ends and the time `lease exec`'s command exited;
when some run's end is not known (a finished run the daemon only has as an index row),
the moment of release, which is later than every settled run's end.

A lease is released (never deleted: the key stays the user's) when:

* every run that declares it (`(key_id, created_at)`: a pool key serves many leases) is
  settled, and its command has exited (or its `lease exec` stopped renewing: it died);
* `lease exec`'s command exits and the run directory holds no `metrics.json` (no run
  will ever settle it: a crashed experiment does not keep its key for a TTL);
* its TTL passes without renewal (`lease exec` renews it while the command runs, so the
  TTL bounds a crash of `lease exec` itself, or a `lease new` runner that never settles);
* the user says so (`lease revoke KEY_ID`), unless a live `lease exec` still holds it.

An acquisition that found nothing free waits (the caller polls `take`), never shares.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import structlog

from tokensettle.config import KeyPool, PoolKey, Settings, secrets_dirs
from tokensettle.errors import ConfigError
from tokensettle.leases import LeaseBook, LeaseStore, LeaseStoreError, PoolLease, PoolState
from tokensettle.usage_scope import ANTHROPIC_KEY_ID_PATTERN
from tokensettle.windows import MINUTE, Activity

__all__ = [
    "POOL_VALUES_FILE",
    "HandRelease",
    "PoolBusy",
    "PoolConfigError",
    "PoolSlot",
    "acquire",
    "expire_due",
    "finish",
    "free_after",
    "holder_alive",
    "last_use",
    "load_pool_values",
    "match_pool",
    "parse_pool_values",
    "pool_values_path",
    "pool_view",
    "release",
    "release_by_hand",
    "release_due",
    "release_unused",
    "renew",
    "renew_interval",
    "settle_due",
    "take",
]

#: The credentials file's name in $CREDENTIALS_DIRECTORY or /run/secrets.
POOL_VALUES_FILE: Final = "anthropic_pool_keys"
POOL_SETTING: Final = "leases.anthropic.keys ([leases.anthropic] keys in the TOML config)"
FILE_SETTING: Final = "anthropic_pool_file (TOKENSETTLE_ANTHROPIC_POOL_FILE)"
_MAX_VALUES_BYTES: Final = 1024 * 1024
_RENEW_MIN: Final = timedelta(seconds=0.2)
_RENEW_MAX: Final = timedelta(minutes=5)
#: A `lease exec` that missed this many renewals is gone (killed, or its host is).
_STALE_RENEWALS: Final = 3

log = structlog.get_logger("tokensettle.leases")
Identity = tuple[str, datetime]


class PoolConfigError(ConfigError):
    """The pool's ids and values do not fit. `str()` is one line, never a value."""


class PoolBusy(Exception):
    """No pool key became free within the wait. Carries the pool as last seen."""

    def __init__(self, slots: Sequence[PoolSlot]) -> None:
        super().__init__("no free pool key")
        self.slots = tuple(slots)


# --------------------------------------------------------------------------------------
# The values file (ids and secret values; parsing is pure)


def parse_pool_values(text: str, *, source: str) -> dict[str, str]:
    """`apikey_...=VALUE` lines (blank lines and `#` comments ignored) -> {id: value}.
    Raises PoolConfigError naming the line, never showing it (it may hold a value)."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key_id, sep, value = (part.strip() for part in stripped.partition("="))
        if not sep or not ANTHROPIC_KEY_ID_PATTERN.fullmatch(key_id):
            raise PoolConfigError(
                f"{source}: line {number} is not apikey_...=VALUE (the line is not shown)"
            )
        if not value or not value.isascii() or not value.isprintable() or re.search(r"\s", value):
            raise PoolConfigError(
                f"{source}: line {number} ({key_id}): the value is empty or holds spaces, "
                "control or non-ASCII characters (a copy-paste error?); it is not shown"
            )
        if key_id in out:
            raise PoolConfigError(f"{source}: line {number}: {key_id} has a value already")
        out[key_id] = value
    return out


def match_pool(keys: Sequence[PoolKey], values: Mapping[str, str], *, source: str) -> None:
    """Every configured id has a value and every value a configured id (PoolConfigError
    naming the first that does not)."""
    configured = {key.id for key in keys}
    for key_id in values:
        if key_id not in configured:
            raise PoolConfigError(
                f"{source}: {key_id} has a value but is not in {POOL_SETTING}; add it there "
                "or remove its line"
            )
    for key in keys:
        if key.id not in values:
            raise PoolConfigError(
                f"{POOL_SETTING}: {key.id} has no value in {source}; add a line {key.id}=..."
            )


def pool_values_path(settings: Settings, environ: Mapping[str, str] | None = None) -> Path:
    """ANTHROPIC_POOL_FILE, else `anthropic_pool_keys` in $CREDENTIALS_DIRECTORY or
    /run/secrets (the first that exists); PoolConfigError when there is none."""
    if settings.anthropic_pool_file is not None:
        return settings.anthropic_pool_file
    for directory in secrets_dirs(environ):
        candidate = directory / POOL_VALUES_FILE
        if candidate.is_file():
            return candidate
    raise PoolConfigError(
        f"{FILE_SETTING}: not set, and no {POOL_VALUES_FILE} in $CREDENTIALS_DIRECTORY or "
        "/run/secrets; put the pool keys' values there as apikey_...=VALUE lines"
    )


def load_pool_values(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The configured pool keys' values, checked against `[leases.anthropic] keys`.
    Blocking. PoolConfigError (one line, exit 2) for every way it does not fit."""
    keys = settings.leases.anthropic.keys
    if not keys:
        raise PoolConfigError(
            f"{POOL_SETTING}: no pool keys; list the apikey_... ids of Console-made keys, "
            'e.g. keys = [{id = "apikey_...", workspace_id = "wrkspc_..."}]'
        )
    path = pool_values_path(settings, environ)
    where = f"{FILE_SETTING}: {path}"
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_VALUES_BYTES + 1)
    except FileNotFoundError:
        raise PoolConfigError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise PoolConfigError(f"{where} is a directory; give the file") from None
    except OSError as exc:
        raise PoolConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > _MAX_VALUES_BYTES:
        raise PoolConfigError(f"{where} is over 1 MiB; it holds apikey_...=VALUE lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PoolConfigError(f"{where} is not UTF-8 text") from None
    values = parse_pool_values(text, source=str(path))
    match_pool(keys, values, source=str(path))
    return values


# --------------------------------------------------------------------------------------
# The rules (pure)


def free_after(last: datetime, grace: timedelta) -> datetime:
    """When a key last usable at `last` may be handed out again: the end of the window
    an activity ending at `last` has (with `grace`), plus one whole minute."""
    t = last.timestamp()
    window_end = Activity(t, t, int(grace.total_seconds())).window.end
    return datetime.fromtimestamp(window_end + MINUTE, UTC)


def renew_interval(ttl: timedelta) -> timedelta:
    """How often `lease exec` renews its lease: a third of the TTL, within 0.2 s..5 min
    (so even a TTL of seconds is renewed well before it runs out)."""
    return max(_RENEW_MIN, min(_RENEW_MAX, ttl / 3))


def holder_alive(record: PoolLease, now: datetime) -> bool:
    """Whether a `lease exec` still runs the lease's command: it has not recorded the
    command's exit and renewed recently (a killed one stops renewing)."""
    if record.holder != "exec" or record.ended_at is not None or record.renewed_at is None:
        return False
    interval = renew_interval(record.expires_at - record.renewed_at)
    return now < record.renewed_at + _STALE_RENEWALS * interval and now < record.expires_at


def last_use(record: PoolLease, ends: Sequence[datetime | None], now: datetime) -> datetime:
    """The latest moment the lease's runs could have used the key: the runs' recorded
    ends and the command's exit, or `now` when a run's end or the command's fate is not
    known."""
    if not ends or any(e is None for e in ends):
        return now
    if record.holder == "exec" and record.ended_at is None:
        return now  # the holder died: when its command stopped is not known
    known = [e for e in ends if e is not None]
    if record.ended_at is not None:
        known.append(record.ended_at)
    return max(known)


def release(
    record: PoolLease, now: datetime, reason: str, grace: timedelta, last: datetime
) -> PoolLease:
    """active -> released: back in the pool from `free_after(last, grace)`."""
    return replace(
        record,
        state=PoolState.RELEASED,
        released_at=now,
        release_reason=reason,
        free_at=free_after(last, grace),
    )


def expire_due(book: LeaseBook, now: datetime, grace: timedelta) -> LeaseBook:
    """Release the active pool leases whose TTL passed without renewal."""
    out = book
    for record in book.pool:
        if record.state is PoolState.ACTIVE and now >= record.expires_at:
            out = out.with_pool_lease(release(record, now, "expired", grace, now))
    return out


def settle_due(
    book: LeaseBook,
    settled: Mapping[Identity, Sequence[datetime | None]],
    unsettled: Iterable[Identity],
    now: datetime,
    grace: timedelta,
) -> LeaseBook:
    """Release the active pool leases every declaring run of which is settled
    (`settled`: identity -> the runs' ends, None where unknown) and none is not, once
    the command holding the key has exited or its `lease exec` is gone."""
    pending = frozenset(unsettled)
    out = book
    for record in book.pool:
        identity = (record.key_id, record.created_at)
        if record.state is not PoolState.ACTIVE or identity in pending:
            continue
        ends = settled.get(identity)
        if ends is None or holder_alive(record, now):
            continue
        out = out.with_pool_lease(
            release(record, now, "settled", grace, last_use(record, ends, now))
        )
    return out


@dataclass(frozen=True, slots=True)
class PoolSlot:
    """One pool key as `lease list` and the acquirer see it.

    status: `free`; `cooling` (released, free from `free_at`); `leased`; `held` (not
    recorded in a book that was reset: which keys were in use is unknown until
    `free_at`); `unconfigured` (recorded, no longer in the configuration)."""

    key_id: str
    workspace_id: str | None
    status: str
    record: PoolLease | None = None
    free_at: datetime | None = None
    order: int = 0


def pool_view(
    keys: Sequence[PoolKey], book: LeaseBook, now: datetime, hold: timedelta
) -> list[PoolSlot]:
    """Every configured key, then every recorded key no longer configured."""
    slots: list[PoolSlot] = []
    for order, key in enumerate(keys):
        record = book.pool_lease(key.id)
        if record is None:
            held_until = book.reset_at + hold if book.reset_at is not None else None
            if held_until is not None and now < held_until:
                slots.append(PoolSlot(key.id, key.workspace_id, "held", None, held_until, order))
            else:
                slots.append(PoolSlot(key.id, key.workspace_id, "free", None, None, order))
        elif record.state is PoolState.ACTIVE:
            slots.append(PoolSlot(key.id, key.workspace_id, "leased", record, None, order))
        else:
            status = "free" if record.free_at is None or record.free_at <= now else "cooling"
            slots.append(PoolSlot(key.id, key.workspace_id, status, record, record.free_at, order))
    configured = {key.id for key in keys}
    for record in book.pool:
        if record.key_id not in configured:
            slots.append(
                PoolSlot(record.key_id, record.workspace_id, "unconfigured", record, None, -1)
            )
    return slots


def choose(slots: Sequence[PoolSlot]) -> PoolSlot | None:
    """The free key that has been free the longest (never used first), then in
    configuration order; None when none is free."""
    free = [s for s in slots if s.status == "free"]
    if not free:
        return None
    never = datetime.min.replace(tzinfo=UTC)
    return min(free, key=lambda s: (s.free_at or never, s.order))


def acquire(
    book: LeaseBook,
    keys: Sequence[PoolKey],
    now: datetime,
    *,
    ttl: timedelta,
    hold: timedelta,
    grace: timedelta,
    framework: str | None = None,
    run_dir: str | None = None,
    holder: str = "exec",
    pid: int | None = None,
) -> tuple[LeaseBook, PoolLease | None, list[PoolSlot]]:
    """Take a free key (pure; the caller holds the lock): the new book, the lease or
    None, and the pool as seen. Leases past their TTL are released first."""
    book = expire_due(book, now, grace)
    slots = pool_view(keys, book, now, hold)
    slot = choose(slots)
    if slot is None:
        return book, None, slots
    start = now.replace(microsecond=0)
    lease = PoolLease(
        key_id=slot.key_id,
        workspace_id=slot.workspace_id,
        created_at=start,
        expires_at=start + ttl,
        framework=framework,
        run_dir=run_dir,
        holder=holder,
        pid=pid,
        renewed_at=start,
    )
    return book.with_pool_lease(lease), lease, slots


# --------------------------------------------------------------------------------------
# The store (I/O: every change under the store's lock)


def _now() -> datetime:
    return datetime.now(UTC)


def _log_released(record: PoolLease) -> None:
    log.info(
        "lease.released",
        provider="anthropic",
        key_id=record.key_id,
        reason=record.release_reason,
        free_at=record.free_at.isoformat().replace("+00:00", "Z") if record.free_at else None,
        framework=record.framework,
        run_dir=record.run_dir,
    )


def _released(before: LeaseBook, after: LeaseBook) -> list[PoolLease]:
    return [
        record
        for record in after.pool
        if record.state is PoolState.RELEASED and record not in before.pool
    ]


def _take_once(
    store: LeaseStore,
    pool: KeyPool,
    now: datetime,
    *,
    ttl: timedelta,
    hold: timedelta,
    grace: timedelta,
    framework: str | None,
    run_dir: str | None,
    holder: str,
    pid: int,
) -> tuple[PoolLease | None, list[PoolSlot], list[PoolLease]]:
    """One look at the pool under the lock: the lease taken (or None), the pool as seen,
    and the leases released on the way (past their TTL)."""
    seen: list[tuple[PoolLease | None, list[PoolSlot], list[PoolLease]]] = []

    def change(book: LeaseBook) -> LeaseBook:
        new, lease, slots = acquire(
            book,
            pool.keys,
            now,
            ttl=ttl,
            hold=hold,
            grace=grace,
            framework=framework,
            run_dir=run_dir,
            holder=holder,
            pid=pid,
        )
        seen.append((lease, slots, _released(book, new)))
        return new

    store.update(change)
    return seen[-1]


async def take(
    store: LeaseStore,
    pool: KeyPool,
    *,
    ttl: timedelta,
    hold: timedelta,
    grace: timedelta,
    wait: timedelta,
    framework: str | None = None,
    run_dir: str | None = None,
    holder: str = "exec",
    on_wait: Callable[[Sequence[PoolSlot], float], None] | None = None,
    poll: float = 1.0,
    clock: Callable[[], datetime] = _now,
) -> PoolLease:
    """Take a pool key exclusively, waiting up to `wait` for one (checking every `poll`
    seconds, each check a short hold of the lock); `on_wait(slots, waited_seconds)` after
    every check that found none. Raises PoolBusy after the wait, LeaseStoreError."""
    started = time.monotonic()
    once = functools.partial(
        _take_once,
        store,
        pool,
        ttl=ttl,
        hold=hold,
        grace=grace,
        framework=framework,
        run_dir=run_dir,
        holder=holder,
        pid=os.getpid(),
    )
    while True:
        lease, slots, released = await asyncio.to_thread(once, clock())
        for record in released:
            _log_released(record)
        if lease is not None:
            log.info(
                "lease.created",
                provider="anthropic",
                key_id=lease.key_id,
                workspace_id=lease.workspace_id,
                framework=framework,
                run_dir=run_dir,
                expires_at=lease.expires_at.isoformat().replace("+00:00", "Z"),
            )
            return lease
        waited = time.monotonic() - started
        if on_wait is not None:
            on_wait(slots, waited)
        remaining = wait.total_seconds() - waited
        if remaining <= 0:
            raise PoolBusy(slots)
        await asyncio.sleep(min(poll, remaining))


def renew(store: LeaseStore, lease: PoolLease, now: datetime, ttl: timedelta) -> PoolLease | None:
    """Push the lease's TTL to `now + ttl` (`lease exec`, while its command runs). A
    record lost with a damaged book is put back. None when the key's record is another
    lease now, or this one was released (by hand, or after a missed TTL)."""
    out: list[PoolLease | None] = []

    def change(book: LeaseBook) -> LeaseBook:
        record = book.pool_lease(lease.key_id)
        if record is None:
            record = lease
            log.warning("lease.pool_reasserted", key_id=lease.key_id, run_dir=lease.run_dir)
        elif record.created_at != lease.created_at or record.state is not PoolState.ACTIVE:
            out.append(None)
            return book
        renewed = replace(record, renewed_at=now, expires_at=max(record.expires_at, now + ttl))
        out.append(renewed)
        return book.with_pool_lease(renewed)

    store.update(change)
    return out[-1]


def _change_own(
    store: LeaseStore, lease: PoolLease, move: Callable[[PoolLease], PoolLease]
) -> PoolLease | None:
    """Apply `move` to the key's record if it is still this active lease."""
    out: list[PoolLease | None] = [None]

    def change(book: LeaseBook) -> LeaseBook:
        record = book.pool_lease(lease.key_id)
        if (
            record is None
            or record.created_at != lease.created_at
            or record.state is not PoolState.ACTIVE
        ):
            return book
        moved = move(record)
        out[0] = moved
        return book.with_pool_lease(moved)

    store.update(change)
    if out[0] is not None and out[0].state is PoolState.RELEASED:
        _log_released(out[0])
    return out[0]


def finish(
    store: LeaseStore,
    lease: PoolLease,
    now: datetime,
    grace: timedelta,
    *,
    run_written: bool,
) -> PoolLease | None:
    """`lease exec`'s command exited at `now`: record it; without a run file it is
    released at once (nothing will settle it), else it waits for its runs to settle."""

    def move(record: PoolLease) -> PoolLease:
        ended = replace(record, ended_at=now)
        return ended if run_written else release(ended, now, "no_run", grace, now)

    return _change_own(store, lease, move)


def release_unused(store: LeaseStore, lease: PoolLease, now: datetime) -> PoolLease | None:
    """The key was never given to a command (its declaration or its start failed): free
    again one second after its start (a later lease must differ in `created_at`)."""

    def move(record: PoolLease) -> PoolLease:
        return replace(
            record,
            state=PoolState.RELEASED,
            released_at=now,
            release_reason="unused",
            free_at=record.created_at + timedelta(seconds=1),
        )

    return _change_own(store, lease, move)


@dataclass(frozen=True, slots=True)
class HandRelease:
    """What `lease revoke KEY_ID` did to a pool key: `record` when it was released now,
    `refused` when it may not be (unknown key, a live holder); `line` for the user."""

    line: str
    record: PoolLease | None = None
    refused: bool = False


def release_by_hand(
    store: LeaseStore, pool: KeyPool, key_id: str, now: datetime, grace: timedelta
) -> HandRelease:
    """`lease revoke KEY_ID`: release the key now (free after the minute rule, counted
    from now). Refused while a live `lease exec` runs its command. A configured key the
    book does not know (after a reset) is recorded as released."""
    workspace = {key.id: key.workspace_id for key in pool.keys}
    out: list[HandRelease] = []

    def change(book: LeaseBook) -> LeaseBook:
        record = book.pool_lease(key_id)
        if record is None and key_id not in workspace:
            out.append(HandRelease(f"{key_id}: not a pool key ({POOL_SETTING})", refused=True))
            return book
        if record is None:
            start = now.replace(microsecond=0)
            record = PoolLease(key_id, workspace[key_id], start, start + timedelta(seconds=1))
        elif record.state is PoolState.RELEASED:
            out.append(HandRelease(f"{key_id}: already released ({record.release_reason})"))
            return book
        elif holder_alive(record, now):
            line = (
                f"{key_id}: in use by a running `lease exec` (pid {record.pid}); stop it, or "
                "wait for its run to settle"
            )
            out.append(HandRelease(line, refused=True))
            return book
        moved = release(record, now, "revoked", grace, now)
        out.append(HandRelease(f"{key_id}: released, free from {_hhmm(moved.free_at)}", moved))
        return book.with_pool_lease(moved)

    store.update(change)
    if out[-1].record is not None:
        _log_released(out[-1].record)
    return out[-1]


def _hhmm(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def release_due(
    store: LeaseStore,
    settled: Mapping[Identity, Sequence[datetime | None]],
    unsettled: Iterable[Identity],
    now: datetime,
    grace: timedelta,
) -> list[PoolLease]:
    """The daemon's and reconcile's call, once per round: release the pool leases whose
    runs are all settled and those past their TTL. An idle round takes no lock and
    writes nothing. Returns the released records; raises LeaseStoreError."""
    pending = frozenset(unsettled)

    def due(book: LeaseBook) -> LeaseBook:
        return settle_due(expire_due(book, now, grace), settled, pending, now, grace)

    try:
        current = await asyncio.to_thread(store.load)
    except LeaseStoreError:
        current = None  # damaged: the locked update below sets it aside
    if current is not None and due(current) == current:
        return []
    released: list[PoolLease] = []

    def change(book: LeaseBook) -> LeaseBook:
        new = due(book)
        released[:] = _released(book, new)
        return new

    await asyncio.to_thread(store.update, change)
    for record in released:
        _log_released(record)
    return released

"""The Anthropic key pool, pure parts: the minute-separation rule, taking a key
exclusively, release on settle / exit / TTL, the records, the values file, the pool
settings, and the run's environment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokensettle.admin_api import LeasedKey
from tokensettle.config import ConfigError, KeyPool, PoolKey, load_settings
from tokensettle.lease_cli import child_environment, framework_variable, lease_variables
from tokensettle.leasekeeper import LeasedRuns
from tokensettle.leases import LeaseBook, PoolLease, PoolState
from tokensettle.pool import (
    PoolConfigError,
    acquire,
    choose,
    expire_due,
    free_after,
    holder_alive,
    last_use,
    match_pool,
    parse_pool_values,
    pool_view,
    release,
    renew_interval,
    settle_due,
)
from tokensettle.usage_scope import Declaration, LeaseDeclaration
from tokensettle.windows import Activity

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
GRACE = timedelta(minutes=1)
TTL = timedelta(hours=24)
KEYS = [PoolKey(id="apikey_01A", workspace_id="wrkspc_R"), PoolKey(id="apikey_02B")]
SECRET = "sk-ant-api03-THE-SECRET-VALUE-0123456789"


def at(minutes: float = 0, seconds: float = 0) -> datetime:
    return T0 + timedelta(minutes=minutes, seconds=seconds)


def take(book: LeaseBook, now: datetime, **kw: object) -> tuple[LeaseBook, PoolLease | None]:
    options: dict[str, object] = {"ttl": TTL, "hold": TTL, "grace": GRACE, **kw}
    new, lease, _ = acquire(book, KEYS, now, **options)  # type: ignore[arg-type]
    return new, lease


def window(start: datetime, end: datetime) -> tuple[int, int]:
    w = Activity(start.timestamp(), end.timestamp(), int(GRACE.total_seconds())).window
    return w.start, w.end


# ---------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("last", "expected"),
    [
        (at(0, 0), at(2)),  # on a boundary: window ends at 12:01 (end + grace), free at 12:02
        (at(0, 1), at(3)),  # 12:00:01 -> ceil 12:01, + grace 12:02, + a minute
        (at(0, 59.5), at(3)),
        (at(7, 30), at(10)),
    ],
)
def test_a_key_is_free_the_minute_after_the_last_window_minute(
    last: datetime, expected: datetime
) -> None:
    assert free_after(last, GRACE) == expected
    # the separation holds for any later run: its window starts after an empty minute
    _, previous_end = window(last - timedelta(minutes=5), last)
    next_start, _ = window(expected, expected + timedelta(minutes=3))
    assert next_start - previous_end == 60


def test_without_grace_the_empty_minute_stays() -> None:
    assert free_after(at(3, 20), timedelta(0)) == at(5)
    assert free_after(at(3), timedelta(0)) == at(5)  # a window is at least one minute


@pytest.mark.parametrize("offset", [0, 1, 29, 30, 59, 61, 119, 3599])
def test_no_two_leases_of_a_key_share_a_window_minute(offset: int) -> None:
    """A run that ends at any second, and the next run of the key as soon as the rule
    lets it start, at any second: no minute is in both windows, and one lies between."""
    end = at(10) + timedelta(seconds=offset)
    first = window(at(0), end)
    start = free_after(end, GRACE)
    for late in (0, 1, 59):
        second = window(start + timedelta(seconds=late), start + timedelta(seconds=late + 90))
        assert second[0] >= first[1] + 60


# ---------------------------------------------------------------------------- taking a key


def test_two_takes_never_get_the_same_key_and_a_third_finds_none() -> None:
    book, first = take(LeaseBook(), at(0), framework="claude", run_dir="/r/1")
    book, second = take(book, at(0, 1), run_dir="/r/2")
    assert first is not None and second is not None
    assert {first.key_id, second.key_id} == {"apikey_01A", "apikey_02B"}
    assert first.workspace_id == "wrkspc_R" and first.framework == "claude"
    assert first.created_at == at(0) and first.expires_at == at(0) + TTL
    again, third = take(book, at(0, 2))
    assert third is None and again == book
    assert [s.status for s in pool_view(KEYS, book, at(0, 2), TTL)] == ["leased", "leased"]


def test_a_released_key_cools_until_its_free_time_then_is_taken_again() -> None:
    one = [KEYS[0]]
    book, lease = acquire(LeaseBook(), one, at(0), ttl=TTL, hold=TTL, grace=GRACE)[:2]
    assert lease is not None
    book = book.with_pool_lease(release(lease, at(40), "settled", GRACE, at(5, 10)))
    # last use 12:05:10 -> window end 12:07 -> free at 12:08
    assert acquire(book, one, at(7, 59), ttl=TTL, hold=TTL, grace=GRACE)[1] is None
    (slot,) = pool_view(one, book, at(7, 59), TTL)
    assert (slot.status, slot.free_at) == ("cooling", at(8))
    book, again = acquire(book, one, at(8), ttl=TTL, hold=TTL, grace=GRACE)[:2]
    assert again is not None and again.created_at == at(8) and again.state is PoolState.ACTIVE
    assert book.pool_lease("apikey_01A") == again  # one record per key


def test_the_key_free_the_longest_is_taken_first() -> None:
    book = LeaseBook()
    for key, free in (("apikey_01A", at(5)), ("apikey_02B", at(3))):
        book = book.with_pool_lease(
            PoolLease(key, None, at(0), at(0) + TTL, state=PoolState.RELEASED, free_at=free)
        )
    chosen = choose(pool_view(KEYS, book, at(10), TTL))
    assert chosen is not None and chosen.key_id == "apikey_02B"
    never = choose(pool_view([*KEYS, PoolKey(id="apikey_03C")], book, at(10), TTL))
    assert never is not None and never.key_id == "apikey_03C"  # never used goes first


def test_start_times_are_whole_seconds() -> None:
    _, lease = take(LeaseBook(), at(0, 12.75))
    assert lease is not None and lease.created_at == at(0, 12)


def test_a_lease_past_its_ttl_is_released_when_someone_looks() -> None:
    book, lease = take(LeaseBook(), at(0), ttl=timedelta(hours=2))
    assert lease is not None
    book, _ = take(book, at(1))  # the second key
    later = at(121, 30)
    book, third = take(book, later)
    assert third is None  # released at 14:01:30, free from 14:04
    record = book.pool_lease(lease.key_id)
    assert record is not None and record.release_reason == "expired"
    assert record.free_at == free_after(later, GRACE) == at(124)


def test_a_reset_book_holds_keys_it_does_not_know() -> None:
    reset = LeaseBook(reset_at=at(0))
    assert take(reset, at(30))[1] is None
    (slot, _) = pool_view(KEYS, reset, at(30), TTL)
    assert slot.status == "held" and slot.free_at == at(0) + TTL
    assert take(reset, at(0) + TTL)[1] is not None


def test_a_key_no_longer_configured_is_shown_never_taken() -> None:
    record = PoolLease("apikey_gone", None, at(0), at(1), state=PoolState.RELEASED, free_at=at(1))
    book = LeaseBook().with_pool_lease(record)
    slots = pool_view([], book, at(10), TTL)
    assert [(s.key_id, s.status) for s in slots] == [("apikey_gone", "unconfigured")]
    assert choose(slots) is None


# ---------------------------------------------------------------------------- releasing


def exec_lease(**kw: object) -> PoolLease:
    values: dict[str, object] = {
        "key_id": "apikey_01A",
        "workspace_id": "wrkspc_R",
        "created_at": at(0),
        "expires_at": at(0) + TTL,
        "holder": "exec",
        "pid": 4242,
        "renewed_at": at(0),
        **kw,
    }
    return PoolLease(**values)  # type: ignore[arg-type]


def ident(record: PoolLease) -> tuple[str, datetime]:
    return (record.key_id, record.created_at)


def test_settled_runs_release_their_lease_after_the_command_exited() -> None:
    record = exec_lease(ended_at=at(20, 5))
    book = LeaseBook().with_pool_lease(record)
    done = settle_due(book, {ident(record): [at(20)]}, set(), at(55), GRACE)
    got = done.pool_lease("apikey_01A")
    assert got is not None and got.state is PoolState.RELEASED
    assert (got.release_reason, got.released_at) == ("settled", at(55))
    assert got.free_at == free_after(at(20, 5), GRACE)  # the exit, later than the run's end


def test_a_run_still_unsettled_or_a_command_still_running_keeps_the_key() -> None:
    record = exec_lease(ended_at=at(20))
    book = LeaseBook().with_pool_lease(record)
    assert settle_due(book, {ident(record): [at(20)]}, {ident(record)}, at(55), GRACE) is book
    assert settle_due(book, {}, set(), at(55), GRACE) is book
    running = LeaseBook().with_pool_lease(exec_lease(renewed_at=at(54)))
    assert holder_alive(running.pool[0], at(55))
    assert settle_due(running, {ident(record): [at(20)]}, set(), at(55), GRACE) is running


def test_an_older_lease_of_the_same_key_releases_nothing() -> None:
    """A pool key serves many leases: a settled run of the previous lease must not
    release the current one (the run holding it now may not have written its file)."""
    current = exec_lease(created_at=at(60), expires_at=at(60) + TTL, renewed_at=at(60))
    book = LeaseBook().with_pool_lease(current)
    old = ("apikey_01A", at(0))
    assert settle_due(book, {old: [at(20)]}, set(), at(61), GRACE) is book


def test_a_dead_lease_exec_releases_on_settle_from_the_moment_of_release() -> None:
    record = exec_lease(renewed_at=at(0), expires_at=at(0) + timedelta(hours=3))
    # renewals every 5 min (a third of 3h, capped); three missed: gone
    assert renew_interval(timedelta(hours=3)) == timedelta(minutes=5)
    assert renew_interval(timedelta(seconds=3)) == timedelta(seconds=1)
    assert renew_interval(timedelta(seconds=0.3)) == timedelta(seconds=0.2)
    assert holder_alive(record, at(14)) and not holder_alive(record, at(15))
    book = LeaseBook().with_pool_lease(record)
    got = settle_due(book, {ident(record): [at(10)]}, set(), at(40), GRACE).pool[0]
    assert got.state is PoolState.RELEASED and got.free_at == free_after(at(40), GRACE)


def test_last_use_is_the_latest_known_or_now() -> None:
    now = at(90)
    new = exec_lease(holder="new", renewed_at=None)
    assert last_use(new, [at(20), at(30)], now) == at(30)
    assert last_use(new, [at(20), None], now) == now  # a finished run seen without its end
    assert last_use(new, [], now) == now
    assert last_use(exec_lease(ended_at=at(31)), [at(30)], now) == at(31)
    assert last_use(exec_lease(ended_at=at(29)), [at(30)], now) == at(30)
    assert last_use(exec_lease(), [at(30)], now) == now  # command's fate unknown


def test_expiry_releases_only_what_is_past_its_ttl() -> None:
    live = exec_lease()
    old = exec_lease(key_id="apikey_02B", expires_at=at(30))
    book = LeaseBook().with_pool_lease(live).with_pool_lease(old)
    out = expire_due(book, at(30), GRACE)
    assert out.pool_lease("apikey_01A") == live
    gone = out.pool_lease("apikey_02B")
    assert gone is not None and gone.release_reason == "expired"
    assert gone.free_at == free_after(at(30), GRACE)
    assert expire_due(out, at(31), GRACE) is out


def test_leased_runs_tell_pool_leases_apart_and_keep_minted_ones_as_before() -> None:
    first = LeaseDeclaration("apikey_01A", "wrkspc_R", at(0), at(0) + TTL, pool=True)
    second = LeaseDeclaration("apikey_01A", "wrkspc_R", at(60), at(60) + TTL, pool=True)
    minted = LeaseDeclaration("key_abc", "proj_leases", at(0), at(0) + TTL)
    runs = LeasedRuns()
    runs.add(first, "verified", at(20))
    runs.add(first, "expired")  # an index row: end unknown
    runs.add(second, "pending")
    runs.add(minted, "verified")
    assert runs.pool_settled == {first.identity: [at(20), None]}
    assert runs.pool_unsettled == {second.identity}
    # a pool key never reaches the Admin API's delete path
    assert runs.settled_keys == {"key_abc"} and "apikey_01A" not in runs.unsettled


# ---------------------------------------------------------------------------- records


def test_pool_records_and_the_reset_mark_round_trip_without_values() -> None:
    record = exec_lease(framework="claude", run_dir="/srv/runs/claude/r1", ended_at=at(9))
    released = release(record, at(40), "settled", GRACE, at(9))
    book = (
        LeaseBook(reset_at=at(-5))
        .with_pool_lease(released)
        .with_pool_lease(exec_lease(key_id="apikey_02B", holder="new"))
    )
    again = LeaseBook.from_json(book.to_json())
    assert again == book and [r.key_id for r in again.pool] == ["apikey_01A", "apikey_02B"]
    assert "value" not in str(book.to_json()) and SECRET not in str(book.to_json())
    # a book without pool records (before this version) reads as an empty pool
    legacy = {"version": 1, "service_accounts": [], "leases": []}
    assert LeaseBook.from_json(legacy).pool == ()


@pytest.mark.parametrize(
    "raw",
    [
        {"version": 1, "pool": {}},
        {"version": 1, "pool": [{"key_id": 7}]},
        {"version": 1, "pool": [{**exec_lease().to_json(), "holder": "cron"}]},
        {"version": 1, "pool": [{**exec_lease().to_json(), "pid": "12"}]},
        {"version": 1, "pool": [{**exec_lease().to_json(), "state": "borrowed"}]},
    ],
)
def test_a_damaged_pool_record_is_refused(raw: object) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        LeaseBook.from_json(raw)


# ---------------------------------------------------------------------------- values file


def test_the_values_file_is_id_equals_value_lines() -> None:
    text = f"# pool keys\n\napikey_01A = {SECRET}\n  apikey_02B=sk-ant-two  \n"
    assert parse_pool_values(text, source="f") == {"apikey_01A": SECRET, "apikey_02B": "sk-ant-two"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (f"{SECRET}\n", "f: line 1 is not apikey_...=VALUE (the line is not shown)"),
        (f"key_01A={SECRET}\n", "f: line 1 is not apikey_...=VALUE"),
        ("# c\napikey_01A=\n", "f: line 2 (apikey_01A): the value is empty"),
        (f"apikey_01A={SECRET} x\n", "holds spaces"),
        (f"apikey_01A={SECRET}\napikey_01A={SECRET}\n", "line 2: apikey_01A has a value already"),
    ],
)
def test_a_bad_values_line_is_named_never_shown(text: str, needle: str) -> None:
    with pytest.raises(PoolConfigError) as err:
        parse_pool_values(text, source="f")
    assert needle in str(err.value) and SECRET not in str(err.value)
    assert isinstance(err.value, ConfigError)  # exit 2


def test_ids_and_values_must_match_one_to_one() -> None:
    match_pool(KEYS, {"apikey_01A": "a", "apikey_02B": "b"}, source="f")
    with pytest.raises(PoolConfigError, match=r"f: apikey_03C has a value but is not in leases"):
        match_pool(KEYS, {"apikey_01A": "a", "apikey_02B": "b", "apikey_03C": "c"}, source="f")
    with pytest.raises(PoolConfigError, match=r"apikey_02B has no value in f; add a line"):
        match_pool(KEYS, {"apikey_01A": "a"}, source="f")


# ---------------------------------------------------------------------------- settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokensettle.toml"
    path.write_text(text)
    return path


def test_the_pool_is_configured_in_toml_with_ids_only(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[leases.anthropic]\nkeys = [{id = "apikey_01A", workspace_id = "wrkspc_R"}, '
        '{id = "apikey_02B"}]\n',
    )
    settings = load_settings({}, config_file=path, environ={})
    assert settings.leases.anthropic == KeyPool(keys=KEYS)
    assert load_settings({}, environ={}).leases.anthropic.keys == []
    env = {"TOKENSETTLE_ANTHROPIC_POOL_FILE": str(tmp_path / "v")}
    assert load_settings({}, environ=env).anthropic_pool_file == tmp_path / "v"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[leases.anthropc]\nkeys = []\n", "leases.anthropc: unknown key; did you mean anthropic?"),
        ("[leases.anthropic]\nkey = []\n", "leases.anthropic.key: unknown key; did you mean keys?"),
        (
            '[leases.anthropic]\nkeys = [{id = "apikey_1", workspace = "wrkspc_1"}]\n',
            "leases.anthropic.keys.0.workspace: unknown key; did you mean workspace_id?",
        ),
        (
            '[leases.anthropic]\nkeys = [{id = "key_1"}]\n',
            "leases.anthropic.keys.0.id: 'key_1' is not an Anthropic key id (apikey_...)",
        ),
        (
            '[leases.anthropic]\nkeys = [{id = "apikey_1", workspace_id = "proj_1"}]\n',
            "'proj_1' is not an Anthropic workspace id (wrkspc_...)",
        ),
        (
            '[leases.anthropic]\nkeys = [{id = "apikey_1"}, {id = "apikey_1"}]\n',
            "leases.anthropic.keys: apikey_1 is listed twice",
        ),
        (
            '[leases.anthropic]\nkeys = [{id = "apikey_1", value = "sk-ant-x"}]\n',
            "leases.anthropic.keys.0.value: unknown key",
        ),
    ],
)
def test_a_pool_setting_typo_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({}, config_file=write(tmp_path, text), environ={})
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "sk-ant-x" not in str(err.value)


# ---------------------------------------------------------------------------- environment


def test_a_pool_run_gets_anthropic_variables_and_no_admin_or_pool_file() -> None:
    decl = Declaration.for_pool_lease("apikey_01A", "wrkspc_R", at(0), at(0) + TTL)
    key = LeasedKey("apikey_01A", "pool", 0, None, SECRET)
    lease_env = lease_variables(key, decl, framework="claude-code", run_dir=Path("/r/1"))
    assert framework_variable("claude-code", "anthropic") == "ANTHROPIC_API_KEY_CLAUDE_CODE"
    base = {
        "PATH": "/usr/bin",
        "ANTHROPIC_API_KEY": "sk-ant-the-callers-own",
        "ANTHROPIC_ADMIN_KEY": "sk-ant-admin-x",
        "TOKENSETTLE_ANTHROPIC_POOL_FILE": "/etc/tokensettle/pool",
        "tokensettle_anthropic_pool_file": "/etc/tokensettle/pool",
        "CREDENTIALS_DIRECTORY": "/run/credentials/x",
    }
    env = child_environment(base, lease_env)
    assert env == {
        "PATH": "/usr/bin",
        "ANTHROPIC_API_KEY": SECRET,
        "ANTHROPIC_API_KEY_CLAUDE_CODE": SECRET,
        "TOKENSETTLE_LEASE_KEY_ID": "apikey_01A",
        "TOKENSETTLE_RUN_DIR": "/r/1",
        "TOKENSETTLE_USAGE_SCOPE": lease_env["TOKENSETTLE_USAGE_SCOPE"],
    }
    assert "OPENAI_API_KEY" not in env

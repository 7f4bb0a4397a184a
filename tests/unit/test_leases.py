"""Leases, pure parts: the state machine, the book, the child's environment, and the
Admin API client's parsing and secret hygiene."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokensettle.admin_api import (
    AdminMalformedResponseError,
    LeasedKey,
    mask_secrets,
    parse_deleted,
    parse_key_page,
    parse_leased_key,
    parse_service_account,
    redacted_matches,
)
from tokensettle.config import load_settings
from tokensettle.lease_cli import (
    child_environment,
    framework_variable,
    is_admin_variable,
    lease_variables,
)
from tokensettle.leases import (
    Lease,
    LeaseBook,
    LeaseState,
    RevokePolicy,
    ServiceAccountRecord,
    advance,
    effective_state,
    expire,
    is_due,
    key_name,
    revoke_failed,
    revoked,
    settle,
)
from tokensettle.usage_scope import Declaration

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = RevokePolicy(retry_delay=timedelta(minutes=2), max_backoff=timedelta(minutes=30))
SECRET = "sk-svcacct-THIS-IS-THE-SECRET-VALUE-0123456789"


def lease(key_id: str = "key_a", **kw: object) -> Lease:
    values: dict[str, object] = {
        "key_id": key_id,
        "project_id": "proj_leases",
        "service_account_id": "svc_acct_1",
        "created_at": T0,
        "expires_at": T0 + timedelta(hours=24),
        "framework": "chatdev",
        "run_dir": "/srv/runs/chatdev/r1",
        **kw,
    }
    return Lease(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- states


def test_settle_makes_an_active_lease_due_at_once() -> None:
    now = T0 + timedelta(hours=1)
    got = settle(lease(), now)
    assert got.state is LeaseState.SETTLED and got.settled_at == now
    assert got.next_revoke_at == now and is_due(got, now)
    assert not is_due(lease(), now)  # an active lease is never deleted


@pytest.mark.parametrize("state", [LeaseState.SETTLED, LeaseState.REVOKED, LeaseState.EXPIRED])
def test_settle_leaves_other_states_alone(state: LeaseState) -> None:
    before = lease(state=state, settled_at=T0, next_revoke_at=T0 + timedelta(minutes=8))
    assert settle(before, T0 + timedelta(hours=2)) == before


def test_a_failed_revoke_keeps_it_settled_and_backs_off_to_the_cap() -> None:
    now = T0 + timedelta(hours=1)
    current = settle(lease(), now)
    waits = []
    for _ in range(7):
        current = revoke_failed(current, now, "Admin API DELETE ... answered HTTP 500", POLICY)
        assert current.state is LeaseState.SETTLED
        assert current.next_revoke_at is not None
        waits.append(current.next_revoke_at - now)
        assert not is_due(current, now)
        assert is_due(current, current.next_revoke_at)
    assert [w.total_seconds() / 60 for w in waits] == [2, 4, 8, 16, 30, 30, 30]
    assert current.revoke_failures == 7 and "HTTP 500" in (current.last_revoke_error or "")


def test_thousands_of_failures_never_overflow() -> None:
    huge = revoke_failed(
        Lease(
            key_id="key_a",
            project_id="proj_leases",
            service_account_id=None,
            created_at=T0,
            expires_at=T0 + timedelta(days=1),
            state=LeaseState.SETTLED,
            revoke_failures=10**6,
        ),
        T0,
        "x" * 10_000,
        POLICY,
    )
    assert huge.next_revoke_at == T0 + POLICY.max_backoff
    assert len(huge.last_revoke_error or "") == 300


def test_a_successful_revoke_is_final() -> None:
    now = T0 + timedelta(hours=1)
    failed = revoke_failed(settle(lease(), now), now, "boom", POLICY)
    done = revoked(failed, now + timedelta(minutes=3))
    assert done.state is LeaseState.REVOKED and done.revoked_at == now + timedelta(minutes=3)
    assert done.next_revoke_at is None and done.last_revoke_error is None
    assert done.revoke_failures == 1  # history kept
    assert not is_due(done, now + timedelta(hours=1))
    assert expire(done, T0 + timedelta(days=9)) == done


def test_expiry_ends_active_and_settled_leases() -> None:
    end = T0 + timedelta(hours=24)
    assert expire(lease(), end - timedelta(seconds=1)).state is LeaseState.ACTIVE
    assert expire(lease(), end).state is LeaseState.EXPIRED
    settled = settle(lease(), T0 + timedelta(hours=1))
    gone = expire(settled, end)
    assert gone.state is LeaseState.EXPIRED and gone.next_revoke_at is None
    assert not is_due(settled, end)  # an expired key is not retried even before marking
    assert effective_state(lease(), end) is LeaseState.EXPIRED
    assert effective_state(lease(), T0) is LeaseState.ACTIVE


def test_advance_settles_only_the_named_keys_and_expires_the_old() -> None:
    old = lease("key_old", created_at=T0 - timedelta(days=2), expires_at=T0 - timedelta(days=1))
    book = LeaseBook(leases=(lease("key_a"), lease("key_b"), old))
    now = T0 + timedelta(hours=1)
    after = advance(book, {"key_b", "key_unknown"}, now)
    states = {x.key_id: x.state for x in after.leases}
    assert states == {
        "key_a": LeaseState.ACTIVE,
        "key_b": LeaseState.SETTLED,
        "key_old": LeaseState.EXPIRED,
    }
    assert advance(after, {"key_b"}, now) is after  # nothing left to change: same book


# ---------------------------------------------------------------------------- the book


def test_the_book_round_trips_and_holds_no_value() -> None:
    account = ServiceAccountRecord("svc_acct_1", "proj_leases", "tokensettle-leases", T0)
    book = (
        LeaseBook()
        .with_service_account(account)
        .with_lease(lease("key_b", created_at=T0 + timedelta(minutes=1)))
        .with_lease(revoke_failed(settle(lease("key_a"), T0), T0, "HTTP 503", POLICY))
    )
    assert [x.key_id for x in book.leases] == ["key_a", "key_b"]  # by creation
    again = LeaseBook.from_json(book.to_json())
    assert again == book
    assert book.service_account_for("proj_leases") == account
    assert book.service_account_for("proj_other") is None
    assert book.without_service_account("proj_leases", "svc_acct_1").service_accounts == ()
    fields = set(book.to_json()["leases"][0])
    assert fields == {
        "key_id",
        "project_id",
        "service_account_id",
        "framework",
        "run_dir",
        "created_at",
        "expires_at",
        "state",
        "settled_at",
        "revoked_at",
        "revoke_failures",
        "last_revoke_error",
        "next_revoke_at",
    }


def test_with_lease_replaces_the_record_of_the_same_key() -> None:
    book = LeaseBook().with_lease(lease("key_a"))
    book = book.with_lease(settle(lease("key_a"), T0))
    assert len(book.leases) == 1 and book.leases[0].state is LeaseState.SETTLED


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"version": 2, "leases": []},
        {"version": 1, "leases": {}},
        {"version": 1, "leases": [{"key_id": "key_a"}]},
        {"version": 1, "leases": [{**lease().to_json(), "state": "paused"}]},
        {"version": 1, "leases": [{**lease().to_json(), "created_at": "yesterday"}]},
        {"version": 1, "leases": [{**lease().to_json(), "revoke_failures": -1}]},
    ],
)
def test_a_damaged_book_is_refused(obj: object) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        LeaseBook.from_json(obj)


def test_key_names_are_readable_and_unique() -> None:
    names = {key_name("chatdev", T0) for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith("tokensettle-chatdev-20260301T120000Z-") for n in names)
    assert key_name(None, T0).startswith("tokensettle-run-")


# ---------------------------------------------------------------------------- environment


@pytest.mark.parametrize(
    "name",
    [
        "TOKENSETTLE_ADMIN_KEY",
        "tokensettle_admin_key",  # pydantic-settings would read this one too
        "OPENAI_ADMIN_KEY",
        "OPENAI_API_KEY_USAGE_TRACKING",
        "TOKENSETTLE_ANTHROPIC_ADMIN_KEY",
        "ANTHROPIC_ADMIN_KEY",
        "CREDENTIALS_DIRECTORY",
        "TOKENSETTLE_CONFIG",
        "OPENAI_ADMIN_KEY_FILE",
        "MY_ORG_ADMIN_KEY",
    ],
)
def test_admin_variables_are_recognised(name: str) -> None:
    assert is_admin_variable(name)


@pytest.mark.parametrize(
    "name",
    ["OPENAI_API_KEY", "OPENAI_API_KEY_CHATDEV", "OPENAI_API_KEY_CHATDEV_ID", "PATH", "HOME"],
)
def test_ordinary_variables_are_kept(name: str) -> None:
    assert not is_admin_variable(name)


def test_the_childs_environment() -> None:
    key = LeasedKey("key_abc", "n", 1, 2, SECRET)
    decl = Declaration.for_lease("key_abc", "proj_leases", T0, T0 + timedelta(hours=1))
    base = {
        "PATH": "/usr/bin",
        "OPENAI_API_KEY": "sk-proj-callers-own",
        "OPENAI_API_KEY_BAES": "sk-proj-baes",
        "TOKENSETTLE_ADMIN_KEY": "sk-admin-1",
        "OPENAI_ADMIN_KEY": "sk-admin-2",
        "OPENAI_API_KEY_USAGE_TRACKING": "sk-admin-3",
        "ANTHROPIC_ADMIN_KEY": "sk-ant-admin",
        "CREDENTIALS_DIRECTORY": "/run/credentials/tokensettle.service",
        "TOKENSETTLE_STATE_DIR": "/var/lib/tokensettle",
    }
    added = lease_variables(key, decl, framework="gh-spec", run_dir=None)
    env = child_environment(base, added)
    assert env == {
        "PATH": "/usr/bin",
        "OPENAI_API_KEY": SECRET,  # the lease replaces the caller's own key
        "OPENAI_API_KEY_BAES": "sk-proj-baes",
        "OPENAI_API_KEY_GH_SPEC": SECRET,
        "TOKENSETTLE_LEASE_KEY_ID": "key_abc",
        "TOKENSETTLE_USAGE_SCOPE": (
            '{"provider":"openai","api_key_ids":["key_abc"],"project_ids":["proj_leases"],'
            '"lease":{"key_id":"key_abc","project_id":"proj_leases",'
            '"created_at":"2026-03-01T12:00:00Z","expires_at":"2026-03-01T13:00:00Z"}}'
        ),
        "TOKENSETTLE_STATE_DIR": "/var/lib/tokensettle",
    }
    assert SECRET not in env["TOKENSETTLE_USAGE_SCOPE"]
    with_dir = lease_variables(key, decl, framework=None, run_dir=Path("/r"))
    assert with_dir["TOKENSETTLE_RUN_DIR"] == "/r" and "OPENAI_API_KEY_CHATDEV" not in with_dir
    assert framework_variable("chatdev") == "OPENAI_API_KEY_CHATDEV"


def test_a_tokensettle_command_inside_a_lease_accepts_what_the_lease_set() -> None:
    """Every TOKENSETTLE_* variable `lease exec` gives its command is accepted by the
    settings (a `tokensettle list` run by the experiment must not exit 2 on them)."""
    key = LeasedKey("key_abc", "n", 1, 2, SECRET)
    decl = Declaration.for_lease("key_abc", "proj_leases", T0, T0 + timedelta(hours=1))
    added = lease_variables(key, decl, framework="baes", run_dir=Path("/r"))
    ours = {k: v for k, v in added.items() if k.startswith("TOKENSETTLE_")}
    assert len(ours) >= 3
    load_settings(environ=ours)


# ---------------------------------------------------------------------------- admin parsing


def test_a_leased_key_never_shows_its_value() -> None:
    key = LeasedKey("key_abc", "name", 1, 2, SECRET)
    for text in (repr(key), str(key), f"{key}", repr([key]), repr({"k": key})):
        assert SECRET not in text and "key_abc" in text
    assert key.value == SECRET


def test_secret_shapes_are_masked() -> None:
    text = f"Incorrect API key provided: {SECRET}. Also sk-admin-abcdefgh and sk-abc."
    masked = mask_secrets(text)
    assert SECRET not in masked and "sk-admin-abcdefgh" not in masked
    assert "sk-abc." in masked  # too short to be a key


@pytest.mark.parametrize(
    ("redacted", "expected"),
    [
        ("sk-svcac...6789", True),
        ("sk-svcac...6788", False),
        ("sk-proj-...6789", False),
        ("sk-svcacct-THIS-IS-THE-SECRET-VALUE-0123456789", False),  # no "...": not redacted
        ("sk-s****6789", True),
    ],
)
def test_redacted_matches(redacted: str, expected: bool) -> None:
    assert redacted_matches(redacted, SECRET) is expected


def test_a_malformed_create_answer_never_quotes_the_body() -> None:
    body = {"object": "organization.project.service_account.api_key", "value": SECRET, "id": 7}
    with pytest.raises(AdminMalformedResponseError) as err:
        parse_leased_key(body, "POST /x")
    assert SECRET not in str(err.value) and "'id' is not an integer" not in str(err.value)
    assert "'id' is not a string" in str(err.value)
    with pytest.raises(AdminMalformedResponseError) as err:
        parse_leased_key({**body, "object": SECRET}, "POST /x")
    assert SECRET not in str(err.value)


def test_service_account_answers() -> None:
    only = parse_service_account(
        {
            "object": "organization.project.service_account",
            "id": "svc_acct_1",
            "name": "tokensettle-leases",
            "role": "none",
            "created_at": 1,
            "api_key": None,
        },
        "POST /x",
    )
    assert only.role == "none" and only.api_key is None


def test_list_pages_and_deletes() -> None:
    keys, more, last = parse_key_page(
        {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}, "G"
    )
    assert (keys, more, last) == ([], False, None)
    with pytest.raises(AdminMalformedResponseError, match="'has_more' is not a boolean"):
        parse_key_page({"object": "list", "data": []}, "G")
    parse_deleted(
        {"object": "organization.project.api_key.deleted", "id": "key_a", "deleted": True},
        "key_a",
        "D",
    )
    with pytest.raises(AdminMalformedResponseError, match="not the key"):
        parse_deleted(
            {"object": "organization.project.api_key.deleted", "id": "key_b", "deleted": True},
            "key_a",
            "D",
        )

"""A run's scope declaration: parsing (pure), rendering, and the atomic exclusive write."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokensettle.usage import Scope, Usage, UsageRow
from tokensettle.usage_scope import (
    MAX_SCOPE_BYTES,
    SCOPE_FILE,
    Declaration,
    LeaseDeclaration,
    ScopeDeclarationError,
    declaration_from_metrics,
    load_declaration,
    parse_declaration,
    render_declaration,
    write_declaration,
)

SRC = "runs/chatdev/r1/usage_scope.json"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = {
    "key_id": "key_abc",
    "project_id": "proj_leases",
    "created_at": "2026-03-01T12:00:00Z",
    "expires_at": "2026-03-02T12:00:00Z",
}


def test_a_key_id_list_is_a_scope_of_those_keys() -> None:
    decl = parse_declaration({"api_key_ids": ["key_b", "key_a", "key_b"]}, source=SRC)
    assert decl.provider == "openai"
    assert decl.api_key_ids == ("key_a", "key_b")  # sorted, unique
    assert decl.project_ids == () and decl.lease is None
    scope = decl.scope()
    assert scope == Scope(frozenset({"key_a", "key_b"}))
    assert scope.matches(UsageRow(0, _usage(), api_key_id="key_a", project_id="proj_x"))
    assert not scope.matches(UsageRow(0, _usage(), api_key_id="key_c", project_id="proj_x"))


def _usage() -> Usage:
    return Usage(1, 1, 1)


def test_projects_alone_are_a_scope_and_both_must_match() -> None:
    assert parse_declaration({"project_ids": ["proj_a"]}, source=SRC).scope() == Scope(
        frozenset(), frozenset({"proj_a"})
    )
    both = parse_declaration(
        {"api_key_ids": ["key_a"], "project_ids": ["proj_a"]}, source=SRC
    ).scope()
    assert not both.matches(UsageRow(0, _usage(), api_key_id="key_a", project_id="proj_b"))


def test_a_lease_declaration_round_trips_through_its_file_bytes() -> None:
    decl = Declaration.for_lease("key_abc", "proj_leases", T0, T0 + timedelta(days=1))
    raw = render_declaration(decl)
    assert raw.endswith(b"}\n") and b'\n  "provider": "openai",' in raw  # indent=2
    assert json.loads(raw)["lease"] == LEASE
    again = load_declaration(raw, source=SRC)
    assert again == decl and again.source == SRC
    assert again.lease == LeaseDeclaration("key_abc", "proj_leases", T0, T0 + timedelta(days=1))
    assert again.scope() == Scope(frozenset({"key_abc"}), frozenset({"proj_leases"}))


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ([], "usage scope: is a list, expected a JSON object"),
        ({"api_key_id": ["key_a"]}, "unknown key 'api_key_id'; did you mean 'api_key_ids'?"),
        ({"api_key_ids": ["key_a"], "projects": []}, "did you mean 'project_ids'?"),
        ({"api_key_ids": ["key_a"], "zzz": 1}, "unknown key 'zzz'; known: provider, api_key_ids"),
        ({"api_key_ids": "key_a"}, "api_key_ids: is a string, expected a list of key ids"),
        ({"api_key_ids": [7]}, "api_key_ids[0]: is a number, expected a key id"),
        ({"api_key_ids": ["sk-proj-abc"]}, "api_key_ids[0]: 'sk-proj-abc' is not a key id (key_"),
        ({"project_ids": ["key_a"]}, "project_ids[0]: 'key_a' is not a project id (proj_"),
        ({}, "names no api_key_ids and no project_ids"),
        ({"api_key_ids": [], "project_ids": None}, "names no api_key_ids and no project_ids"),
        (
            {"provider": "anthropic", "api_key_ids": ["key_a"]},
            "api_key_ids[0]: 'key_a' is not a key id (apikey_...) for provider 'anthropic'",
        ),
        ({"provider": "claude", "api_key_ids": ["key_a"]}, "known: openai, anthropic"),
        ({"provider": "opneai", "api_key_ids": ["key_a"]}, "did you mean 'openai'?"),
        ({"provider": 1, "api_key_ids": ["key_a"]}, "provider: is a number, expected a string"),
        ({"api_key_ids": ["key_a"], "lease": "key_a"}, "lease: is a string, expected an object"),
        ({"api_key_ids": ["key_abc"], "lease": {**LEASE, "key": 1}}, "did you mean 'key_id'?"),
        (
            {
                "api_key_ids": ["key_abc"],
                "lease": {k: v for k, v in LEASE.items() if k != "key_id"},
            },
            "lease: lacks 'key_id'",
        ),
        ({"api_key_ids": ["key_other"], "lease": LEASE}, "lease.key_id: key_abc is not in"),
        (
            {"api_key_ids": ["key_abc"], "project_ids": ["proj_x"], "lease": LEASE},
            "lease.project_id: proj_leases is not in project_ids",
        ),
        (
            {"api_key_ids": ["key_abc"], "lease": {**LEASE, "created_at": "2026-03-01T12:00"}},
            "lease.created_at: '2026-03-01T12:00' has no time zone",
        ),
        (
            {"api_key_ids": ["key_abc"], "lease": {**LEASE, "expires_at": 1772366400}},
            "lease.expires_at: is a number, expected an ISO 8601 time",
        ),
        (
            {"api_key_ids": ["key_abc"], "lease": {**LEASE, "expires_at": "soon"}},
            "lease.expires_at: 'soon' is not an ISO 8601 time",
        ),
        (
            {"api_key_ids": ["key_abc"], "lease": {**LEASE, "expires_at": LEASE["created_at"]}},
            "lease.expires_at: is not after lease.created_at",
        ),
        (
            {"api_key_ids": ["key_abc"], "lease": {**LEASE, "project_id": None}},
            "lease.project_id: null is not a project id",
        ),
    ],
)
def test_a_bad_declaration_is_one_line_naming_file_and_field(obj: object, needle: str) -> None:
    with pytest.raises(ScopeDeclarationError) as err:
        parse_declaration(obj, source=SRC)
    message = str(err.value)
    assert message.startswith(f"{SRC}: ") and "\n" not in message
    assert needle in message, message


POOL = {
    "key_id": "apikey_01Abc",
    "project_id": "wrkspc_01Runs",
    "created_at": "2026-03-01T12:00:00Z",
    "expires_at": "2026-03-02T12:00:00Z",
    "pool": True,
}
ANT = {"provider": "anthropic", "api_key_ids": ["apikey_01Abc"], "project_ids": ["wrkspc_01Runs"]}


def test_an_anthropic_declaration_names_keys_and_workspaces() -> None:
    decl = parse_declaration(ANT, source=SRC)
    assert decl.provider == "anthropic" and decl.lease is None
    scope = decl.scope()
    assert scope == Scope(frozenset({"apikey_01Abc"}), frozenset({"wrkspc_01Runs"}), "anthropic")
    # workspace ids sit where OpenAI's project ids do: the same filter works on both
    assert scope.matches(
        UsageRow(0, _usage(), api_key_id="apikey_01Abc", project_id="wrkspc_01Runs")
    )
    alone = parse_declaration({"provider": "anthropic", "project_ids": ["wrkspc_a"]}, source=SRC)
    assert alone.scope().project_ids == frozenset({"wrkspc_a"})


def test_a_pool_lease_round_trips_and_is_told_apart_by_its_start() -> None:
    decl = Declaration.for_pool_lease("apikey_01Abc", "wrkspc_01Runs", T0, T0 + timedelta(days=1))
    assert decl.to_json() == {**ANT, "lease": POOL}
    again = load_declaration(render_declaration(decl), source=SRC)
    assert again == decl and again.lease is not None and again.lease.pool
    assert again.lease.identity == ("apikey_01Abc", T0)
    later = Declaration.for_pool_lease(
        "apikey_01Abc", None, T0 + timedelta(hours=2), T0 + timedelta(days=1)
    )
    assert later.lease is not None and later.lease.identity != again.lease.identity
    # a pool key without a configured workspace: no project_ids, no project_id in the lease
    assert "project_id" not in later.to_json()["lease"] and later.project_ids == ()
    assert load_declaration(render_declaration(later), source=SRC) == later


def test_an_openai_lease_is_written_as_before() -> None:
    """The index and older files hold OpenAI lease objects without a `pool` field."""
    decl = Declaration.for_lease("key_abc", "proj_leases", T0, T0 + timedelta(days=1))
    assert decl.to_json()["lease"] == LEASE
    assert decl.lease is not None and not decl.lease.pool


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        (
            {**ANT, "project_ids": ["proj_x"]},
            "project_ids[0]: 'proj_x' is not a workspace id (wrkspc_...) for provider 'anthropic'",
        ),
        ({"api_key_ids": ["apikey_01Abc"]}, "'apikey_01Abc' is not a key id (key_...)"),
        ({**ANT, "lease": {**POOL, "pool": "yes"}}, "lease.pool: is a string, expected true or"),
        (
            {**ANT, "lease": {**POOL, "pool": False}},
            "lease.key_id: 'apikey_01Abc' is not a key id (key_",
        ),
        ({**ANT, "lease": LEASE}, "an Anthropic lease is a pool lease"),
        (
            {"api_key_ids": ["key_abc"], "lease": {**LEASE, "pool": True}},
            "lease.key_id: 'key_abc' is not a key id (apikey_",
        ),
        (
            {"api_key_ids": ["apikey_01Abc"], "lease": POOL},
            "'apikey_01Abc' is not a key id (key_...)",
        ),
        (
            {
                "provider": "openai",
                "api_key_ids": ["key_a"],
                "lease": {**POOL, "key_id": "apikey_x"},
            },
            "lease.pool: a pool lease needs provider 'anthropic', not 'openai'",
        ),
        (
            {**ANT, "lease": {**POOL, "project_id": "proj_x"}},
            "lease.project_id: 'proj_x' is not a workspace id",
        ),
        (
            {**ANT, "lease": {**POOL, "key_id": "apikey_other"}},
            "lease.key_id: apikey_other is not in",
        ),
        (
            {"provider": "anthropic", "project_ids": ["wrkspc_01Runs"], "lease": POOL},
            "api_key_ids: must name the pool lease's key apikey_01Abc",
        ),
        (
            {**ANT, "lease": {**POOL, "project_id": "wrkspc_other"}},
            "wrkspc_other is not in project_ids",
        ),
        ({**ANT, "lease": {**POOL, "kind": "pool"}}, "unknown key 'kind'"),
        (
            {**ANT, "lease": {k: v for k, v in POOL.items() if k != "created_at"}},
            "lacks 'created_at'",
        ),
    ],
)
def test_a_bad_anthropic_declaration_is_one_line(obj: object, needle: str) -> None:
    with pytest.raises(ScopeDeclarationError) as err:
        parse_declaration(obj, source=SRC)
    message = str(err.value)
    assert message.startswith(f"{SRC}: ") and "\n" not in message
    assert needle in message, message


def test_a_pool_lease_needs_no_workspace() -> None:
    lease = {k: v for k, v in POOL.items() if k != "project_id"}
    decl = parse_declaration(
        {"provider": "anthropic", "api_key_ids": ["apikey_01Abc"], "lease": lease}, source=SRC
    )
    assert decl.lease == LeaseDeclaration(
        "apikey_01Abc", None, T0, T0 + timedelta(days=1), pool=True
    )
    assert (
        parse_declaration({**ANT, "lease": {**POOL, "project_id": None}}, source=SRC).lease
        is not None
    )


def test_a_lease_alone_needs_its_key_declared() -> None:
    """A lease object without api_key_ids declares nothing: the scope must name the key."""
    with pytest.raises(ScopeDeclarationError, match="names no api_key_ids"):
        parse_declaration({"lease": LEASE}, source=SRC)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{", "file: is not JSON (JSONDecodeError at byte 1)"),
        (b"\xff\xfe", "file: is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "file: "),
        (b" " * (MAX_SCOPE_BYTES + 1), "a declaration is at most 64 KiB"),
    ],
)
def test_bytes_that_are_not_a_declaration(raw: bytes, needle: str) -> None:
    with pytest.raises(ScopeDeclarationError) as err:
        load_declaration(raw, source=SRC)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_declaration_inside_metrics_json() -> None:
    src = "runs/chatdev/r1/metrics.json"
    assert declaration_from_metrics({"run_id": "r1"}, source=src) is None
    assert declaration_from_metrics({"usage_scope": None}, source=src) is None
    decl = declaration_from_metrics({"usage_scope": {"api_key_ids": ["key_a"]}}, source=src)
    assert decl is not None and decl.api_key_ids == ("key_a",)
    with pytest.raises(ScopeDeclarationError, match=r"^runs/chatdev/r1/metrics.json: usage_scope"):
        declaration_from_metrics({"usage_scope": {"api_keys": []}}, source=src)


ids = st.lists(st.from_regex(r"key_[A-Za-z0-9_-]{1,12}", fullmatch=True), max_size=5)
projects = st.lists(st.from_regex(r"proj_[A-Za-z0-9]{1,8}", fullmatch=True), max_size=3)


@given(keys=ids, projs=projects)
def test_every_valid_declaration_round_trips(keys: list[str], projs: list[str]) -> None:
    if not keys and not projs:
        return
    decl = parse_declaration({"api_key_ids": keys, "project_ids": projs}, source=SRC)
    assert load_declaration(render_declaration(decl), source=SRC) == decl
    assert decl.scope() == Scope(frozenset(keys), frozenset(projs))


# ---------------------------------------------------------------------------- writing


def test_write_creates_the_run_directory_and_the_file(tmp_path: Path) -> None:
    decl = Declaration.for_lease("key_abc", "proj_leases", T0, T0 + timedelta(hours=1))
    run_dir = tmp_path / "runs" / "chatdev" / "r1"
    path = write_declaration(run_dir, decl)
    assert path == run_dir / SCOPE_FILE
    assert path.read_bytes() == render_declaration(decl)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in run_dir.iterdir()) == [SCOPE_FILE]  # no temp left


def test_write_never_replaces_an_existing_declaration(tmp_path: Path) -> None:
    first = Declaration(api_key_ids=("key_first",))
    second = Declaration(api_key_ids=("key_second",))
    path = write_declaration(tmp_path, first)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_declaration(tmp_path, second)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [SCOPE_FILE]
    write_declaration(tmp_path, second, replace=True)
    assert load_declaration(path.read_bytes(), source="x") == second


def test_write_refuses_a_symlinked_declaration(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    (tmp_path / SCOPE_FILE).symlink_to(target)
    with pytest.raises(FileExistsError):
        write_declaration(tmp_path, Declaration(api_key_ids=("key_a",)), replace=True)
    assert target.read_text() == "{}"

"""The server-side filter of a batched Usage API request: narrow enough that a poll of
leased runs does not fetch the whole organisation, never narrower than any due run's
scope (rows are matched to scopes locally as well). Pure: no network."""

from __future__ import annotations

import itertools

from tokensettle.reconcile import filters_for
from tokensettle.usage import Scope, Usage, UsageRow
from tokensettle.usage_api import Filters
from tokensettle.usage_scope import Declaration

PROJECT = "proj_leases"


def leased(key_id: str) -> Scope:
    """What `tokensettle lease` declares: that key, in the lease project."""
    return Declaration(api_key_ids=(key_id,), project_ids=(PROJECT,)).scope()


def passes(filters: Filters, row: UsageRow) -> bool:
    """What the Usage API returns under `filters` (each set dimension must match)."""
    if filters.api_key_ids and row.api_key_id not in filters.api_key_ids:
        return False
    return not (filters.project_ids and row.project_id not in filters.project_ids)


def test_leased_runs_are_fetched_by_their_keys_in_one_filter() -> None:
    # Each lease declares its key and its project: the batch names every key (and the
    # project), as issue 8 asks, instead of fetching every key of the organisation.
    scopes = [leased(f"key_{i}") for i in range(50)]
    assert filters_for(scopes) == Filters(
        api_key_ids=frozenset(f"key_{i}" for i in range(50)), project_ids=frozenset({PROJECT})
    )


def test_a_dimension_is_filtered_only_when_every_scope_sets_it() -> None:
    key_only = Scope(frozenset({"key_fw"}))
    project_only = Scope(project_ids=frozenset({"proj_fw"}))
    assert filters_for([key_only, leased("key_a")]) == Filters(
        api_key_ids=frozenset({"key_fw", "key_a"})
    )
    assert filters_for([project_only, leased("key_a")]) == Filters(
        project_ids=frozenset({"proj_fw", PROJECT})
    )
    assert filters_for([key_only, project_only]) == Filters()
    assert filters_for([leased("key_a"), Scope()]) == Filters()  # the organisation
    assert filters_for([]) == Filters()


def test_no_row_any_scope_owns_is_filtered_out() -> None:
    scopes = [
        leased("key_a"),
        Scope(frozenset({"key_b"})),
        Scope(frozenset({"key_c"}), frozenset({"proj_x"})),
        Scope(project_ids=frozenset({"proj_y"})),
    ]
    dims = ["key_a", "key_b", "key_c", "key_z", None]
    projects = [PROJECT, "proj_x", "proj_y", "proj_z", None]
    rows = [UsageRow(0, Usage(1, 1, 1), k, p) for k, p in itertools.product(dims, projects)]
    for n in range(1, len(scopes) + 1):
        for batch in itertools.combinations(scopes, n):
            filters = filters_for(batch)
            for row in rows:
                if any(s.matches(row) for s in batch):
                    assert passes(filters, row), (batch, row)

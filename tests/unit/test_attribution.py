"""Attribution: minute buckets shared out among owners (runs in a scope, steps in a run)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.attribution import Owner, apportion, attribute, rows_of, split_usage
from tokensettle.usage import ALL_FIELDS, OPTIONAL_FIELDS, REQUIRED_FIELDS, Scope, Usage, UsageRow
from tokensettle.windows import MINUTE, Activity

T0 = 1_760_960_160  # a minute start


# ------------------------------------------------------------------ apportion


@settings(max_examples=300)
@given(
    st.integers(min_value=0, max_value=10**12),
    st.lists(st.integers(min_value=1, max_value=60_000), min_size=1, max_size=8),
)
def test_apportion_parts_sum_to_total_and_stay_within_one_of_quota(
    total: int, weights: list[int]
) -> None:
    parts = apportion(total, weights)
    assert len(parts) == len(weights)
    assert all(isinstance(p, int) and p >= 0 for p in parts)
    assert sum(parts) == total
    whole = sum(weights)
    for part, w in zip(parts, weights, strict=True):
        quota = Fraction(total * w, whole)
        assert abs(part - quota) < 1
    assert apportion(total, list(weights)) == parts  # deterministic


@settings(max_examples=100)
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=1, max_value=8))
def test_apportion_equal_weights_differ_by_at_most_one_and_favour_earlier(
    total: int, n: int
) -> None:
    parts = apportion(total, [7] * n)
    assert max(parts) - min(parts) <= 1
    assert parts == sorted(parts, reverse=True)


def test_apportion_examples() -> None:
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(2174, [1000, 3000]) == [544, 1630]  # a tie goes to the earlier
    assert apportion(0, [5, 9]) == [0, 0]
    assert apportion(5, [1]) == [5]


@pytest.mark.parametrize("weights", [[], [0], [1, 0], [3, -1]])
def test_apportion_refuses_bad_weights(weights: list[int]) -> None:
    with pytest.raises(ValueError, match="weight"):
        apportion(10, weights)


# ------------------------------------------------------------------ split_usage

counts = st.integers(min_value=0, max_value=10**7)


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    values: dict[str, int | None] = {name: draw(counts) for name in REQUIRED_FIELDS}
    # A few optional fields, present or absent, keep generation cheap.
    for name in draw(st.sets(st.sampled_from(OPTIONAL_FIELDS), max_size=3)):
        values[name] = draw(counts)
    return Usage(**values)  # type: ignore[arg-type]


@settings(max_examples=150)
@given(usages(), st.lists(st.integers(min_value=1, max_value=60_000), min_size=1, max_size=5))
def test_split_usage_sums_back_and_keeps_absent_fields_absent(
    usage: Usage, weights: list[int]
) -> None:
    parts = split_usage(usage, weights)
    assert len(parts) == len(weights)
    assert Usage.total(parts) == usage
    for name in OPTIONAL_FIELDS:
        if getattr(usage, name) is None:
            assert all(getattr(p, name) is None for p in parts)
        else:
            assert all(getattr(p, name) is not None for p in parts)


# ------------------------------------------------------------------ attribute: properties

# Rows: the three required counters plus two optional ones that may be absent.
row_usages = st.builds(
    Usage,
    input_tokens=counts,
    output_tokens=counts,
    num_model_requests=st.integers(min_value=0, max_value=50),
    input_cached_tokens=st.none() | counts,
    output_audio_tokens=st.none() | counts,
)

KEYS = ("key_a", "key_b", "key_c")
PROJECTS = ("proj_a", "proj_b")


@st.composite
def scopes(draw: st.DrawFn) -> Scope:
    if draw(st.booleans()):
        return Scope()  # the organisation
    return Scope(
        frozenset(draw(st.sets(st.sampled_from(KEYS[:2]), max_size=1))),
        frozenset(draw(st.sets(st.sampled_from(PROJECTS), max_size=1))),
    )


@st.composite
def owner_lists(draw: st.DrawFn) -> list[Owner]:
    n = draw(st.integers(min_value=0, max_value=5))
    owners = []
    for i in range(n):
        start = T0 + draw(st.integers(min_value=0, max_value=400)) + draw(st.sampled_from([0, 0.5]))
        length = draw(st.sampled_from([0, 4, 30, 60, 61]) | st.integers(min_value=0, max_value=400))
        grace = draw(st.sampled_from([0, MINUTE]))
        owners.append(Owner(f"o{i}", Activity(start, start + length, grace), draw(scopes())))
    return owners


@st.composite
def row_lists(draw: st.DrawFn) -> list[UsageRow]:
    n = draw(st.integers(min_value=0, max_value=10))
    return [
        UsageRow(
            minute=T0 + MINUTE * draw(st.integers(min_value=-1, max_value=15)),
            usage=draw(row_usages),
            api_key_id=draw(st.sampled_from((*KEYS, None))),
            project_id=draw(st.sampled_from((*PROJECTS, None))),
            model=draw(st.sampled_from(("gpt-4o-mini", "gpt-4o", None))),
        )
        for _ in range(n)
    ]


def _candidates(row: UsageRow, owners: list[Owner]) -> tuple[list[Owner], bool]:
    """Independent model: the owners that compete for `row`, and whether they are active."""
    present = [
        o for o in owners if o.scope.matches(row) and o.activity.window.contains_minute(row.minute)
    ]
    named = [o for o in present if row.api_key_id in o.scope.api_key_ids]
    present = named or present  # a key named explicitly is not shared with broad scopes
    active = [o for o in present if o.activity.weight(row.minute) > 0]
    return (active, True) if active else (present, False)


@settings(max_examples=100, deadline=None)
@given(row_lists(), owner_lists())
def test_attribute_conserves_every_field_and_follows_the_rule(
    rows: list[UsageRow], owners: list[Owner]
) -> None:
    result = attribute(rows, owners)
    # Conservation: per-owner values + unowned == the rows, field by field (None stays None).
    assert set(result.shares) == {o.key for o in owners}
    got = Usage.total([s.usage for s in result.shares.values()]) + result.unowned
    want = Usage.total(r.usage for r in rows)
    for name in ALL_FIELDS:
        assert getattr(got, name) == getattr(want, name), name
    for share in result.shares.values():
        assert Usage.total(share.per_minute.values()) == share.usage
    # The rule, row by row, against an independent model.
    exact: dict[str, Usage] = {o.key: Usage() for o in owners}
    unowned = Usage()
    shared: dict[str, dict[int, set[str]]] = {o.key: {} for o in owners}
    eligible: dict[str, set[int]] = {o.key: set() for o in owners}
    for row in rows:
        cands, _ = _candidates(row, owners)
        if not cands:
            unowned = unowned + row.usage
        elif len(cands) == 1:
            exact[cands[0].key] = exact[cands[0].key] + row.usage
        else:
            keys = {o.key for o in cands}
            for o in cands:
                shared[o.key].setdefault(row.minute, set()).update(keys - {o.key})
        for o in cands:
            eligible[o.key].add(row.minute)
    assert result.unowned == unowned
    for o in owners:
        share = result.share(o.key)
        assert share.exact == exact[o.key]
        assert {m: set(v) for m, v in share.shared_with.items()} == shared[o.key]
        # An owner only ever receives minutes it competed for.
        assert set(share.per_minute) <= eligible[o.key]


# ------------------------------------------------------------------ attribute: cases


def _row(minute: int, tin: int, tout: int = 0, **dims: str | None) -> UsageRow:
    return UsageRow(
        minute=minute,
        usage=Usage(input_tokens=tin, output_tokens=tout, num_model_requests=1),
        **dims,
    )


def test_single_active_owner_gets_its_minutes_exactly_including_grace() -> None:
    run = Owner("run1", Activity(T0 + 10, T0 + 70, MINUTE))  # window T0 .. T0+180
    rows = [_row(T0, 100, 10), _row(T0 + 60, 50, 5), _row(T0 + 120, 7, 1), _row(T0 + 180, 9)]
    result = attribute(rows, [run])
    share = result.share("run1")
    assert share.exact == Usage(input_tokens=157, output_tokens=16, num_model_requests=3)
    assert share.apportioned == Usage()
    assert share.apportioned_fraction == 0.0
    assert share.shared_with == {}
    assert result.unowned == Usage(input_tokens=9, num_model_requests=1)  # after the grace


def test_shared_minute_is_apportioned_by_active_seconds_and_names_the_others() -> None:
    a = Owner("run_a", Activity(T0, T0 + 45, 0))  # 45 s in minute T0
    b = Owner("run_b", Activity(T0 + 45, T0 + 60, 0))  # 15 s in minute T0
    result = attribute([_row(T0, 1000, 400)], [a, b])
    sa, sb = result.share("run_a"), result.share("run_b")
    assert sa.apportioned.input_tokens == 750
    assert sb.apportioned.input_tokens == 250
    assert sa.apportioned.output_tokens == 300
    assert sb.apportioned.output_tokens == 100
    assert sa.exact == Usage()
    assert sb.exact == Usage()
    assert sa.shared_with == {T0: ("run_b",)}
    assert sb.shared_with == {T0: ("run_a",)}
    assert sa.apportioned_fraction == 1.0
    assert result.unowned == Usage()


def test_grace_only_owner_does_not_take_a_minute_from_a_running_owner() -> None:
    # run_a ended at T0+50: minute T0+60 is only its grace minute. run_b runs in it.
    a = Owner("run_a", Activity(T0, T0 + 50, MINUTE))
    b = Owner("run_b", Activity(T0 + 70, T0 + 100, MINUTE))
    result = attribute([_row(T0, 10), _row(T0 + 60, 20), _row(T0 + 120, 40)], [a, b])
    assert result.share("run_a").exact.input_tokens == 10
    assert result.share("run_a").apportioned == Usage()
    # T0+60 is b's active minute, T0+120 b's grace minute: both exactly b's.
    assert result.share("run_b").exact.input_tokens == 60
    assert result.share("run_b").shared_with == {}


def test_minute_claimed_only_by_grace_is_split_evenly() -> None:
    a = Owner("run_a", Activity(T0, T0 + 30, MINUTE))
    b = Owner("run_b", Activity(T0 + 5, T0 + 55, MINUTE))
    result = attribute([_row(T0 + 60, 11)], [a, b])
    assert result.share("run_a").apportioned.input_tokens == 6
    assert result.share("run_b").apportioned.input_tokens == 5
    assert result.share("run_a").shared_with == {T0 + 60: ("run_b",)}


def test_four_second_step_across_a_minute_boundary_gets_both_minutes() -> None:
    # Run 23f46f6b: step 1760960219..1760960223 sits alone in both minutes.
    step = Owner("step4", Activity(1760960219, 1760960223, MINUTE))
    prev = Owner("step3", Activity(1760960100, 1760960150, MINUTE))
    rows = [_row(1760960160, 1200, 300), _row(1760960220, 974, 100)]
    result = attribute(rows, [prev, step])
    # Minute :160 has step3 only by grace and step4 actively: step4 takes it.
    assert result.share("step4").exact.input_tokens == 2174
    assert result.share("step3").usage == Usage()


def test_scope_decides_candidates_and_other_scopes_get_nothing() -> None:
    window = Activity(T0, T0 + 60, MINUTE)
    chatdev = Owner("chatdev/r1", window, Scope(api_key_ids=frozenset({"key_chatdev"})))
    baes = Owner("baes/r1", window, Scope(api_key_ids=frozenset({"key_baes"})))
    both = Owner(
        "ghspec/r1",
        window,
        Scope(api_key_ids=frozenset({"key_gh"}), project_ids=frozenset({"proj_gh"})),
    )
    rows = [
        _row(T0, 100, api_key_id="key_chatdev", project_id="proj_x"),
        _row(T0, 30, api_key_id="key_baes", project_id=None),
        _row(T0, 5, api_key_id="key_gh", project_id="proj_other"),  # AND: project mismatch
        _row(T0, 7, api_key_id="key_gh", project_id="proj_gh"),
        _row(T0, 1000, api_key_id="key_unknown"),
    ]
    result = attribute(rows, [chatdev, baes, both])
    assert result.share("chatdev/r1").exact.input_tokens == 100
    assert result.share("baes/r1").exact.input_tokens == 30
    assert result.share("ghspec/r1").exact.input_tokens == 7
    for key in ("chatdev/r1", "baes/r1", "ghspec/r1"):
        assert result.share(key).apportioned == Usage()
    assert result.unowned.input_tokens == 1005


def test_organisation_scope_matches_every_row() -> None:
    org = Owner("r", Activity(T0, T0 + 60, MINUTE))
    rows = [_row(T0, 1, api_key_id="k1"), _row(T0, 2, project_id="p"), _row(T0, 4)]
    assert attribute(rows, [org]).share("r").exact.input_tokens == 7


def test_no_owners_everything_unowned_and_unknown_share_is_empty() -> None:
    result = attribute([_row(T0, 3), _row(T0 + 60, 4)], [])
    assert result.shares == {}
    assert result.unowned.input_tokens == 7
    assert result.share("nobody").usage == Usage()


def test_models_are_tracked_per_share() -> None:
    run = Owner("r", Activity(T0, T0 + 60, MINUTE))
    rows = [_row(T0, 3, model="gpt-4o-mini"), _row(T0, 4, model="gpt-4o"), _row(T0, 5)]
    share = attribute(rows, [run]).share("r")
    assert share.models["gpt-4o-mini"].input_tokens == 3
    assert share.models["gpt-4o"].input_tokens == 4
    assert set(share.models) == {"gpt-4o-mini", "gpt-4o"}
    assert share.usage.input_tokens == 12


def test_rows_of_feeds_steps_and_steps_sum_to_the_run() -> None:
    run = Owner("r", Activity(T0 + 10, T0 + 150, MINUTE))
    rows = [_row(T0, 100, 10), _row(T0 + 60, 200, 20), _row(T0 + 120, 50, 5)]
    run_share = attribute(rows, [run]).share("r")
    step_rows = rows_of(run_share.per_minute)
    assert [r.minute for r in step_rows] == [T0, T0 + 60, T0 + 120]
    steps = [
        Owner("1", Activity(T0 + 10, T0 + 80, 0)),
        Owner("2", Activity(T0 + 80, T0 + 150, 0)),
    ]
    step_result = attribute(step_rows, steps)
    total = Usage.total(s.usage for s in step_result.shares.values()) + step_result.unowned
    assert total == run_share.usage
    assert step_result.share("1").exact.input_tokens == 100


def test_a_minute_split_among_thousands_of_steps_costs_linear_memory() -> None:
    # The field trial: 16,000 steps in a 1.8 MB file took 152 s and 1.65 GB, because each
    # owner of a shared minute kept its own tuple of all the others (k^2 per minute).
    import tracemalloc

    n = 4000
    owners = [Owner(str(i), Activity(T0 + i * 60 / n, T0 + (i + 1) * 60 / n, 60)) for i in range(n)]
    rows = rows_of({T0: Usage(10**7, 10**6, n)})
    tracemalloc.start()
    try:
        result = attribute(rows, owners)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(s.usage.input_tokens for s in result.shares.values()) == 10**7
    assert result.share("7").co_owners() == {str(i) for i in range(n)} - {"7"}
    # k^2 references would be 16M pointers (> 128 MB); linear is a few MB.
    assert peak < 40 * 1024 * 1024, peak


def test_a_key_named_by_one_owner_is_that_owners_exactly_even_beside_broad_scopes() -> None:
    # A leased run declares its own key; an unscoped framework (the organisation) and a
    # project-scoped one are active in the same minute: the leased key's rows are the
    # leased run's alone, the other rows are shared among the broad scopes as before.
    leased = Owner("leased", Activity(T0, T0 + 60, 60), Scope(frozenset({"key_L"})))
    org = Owner("org", Activity(T0, T0 + 60, 60), Scope())
    proj = Owner("proj", Activity(T0, T0 + 60, 60), Scope(project_ids=frozenset({"proj_1"})))
    rows = [
        UsageRow(T0, Usage(1000, 100, 2), api_key_id="key_L", project_id="proj_1"),
        UsageRow(T0, Usage(300, 30, 1), api_key_id="key_X", project_id="proj_1"),
    ]
    result = attribute(rows, [leased, org, proj])
    got = result.share("leased")
    assert got.exact == Usage(1000, 100, 2) and got.apportioned == Usage()
    assert got.co_owners() == set()
    assert result.share("org").usage + result.share("proj").usage == Usage(300, 30, 1)
    assert result.share("org").apportioned.input_tokens > 0

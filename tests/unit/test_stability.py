"""Stability: attempt history + a new attempt -> status, message, next due time."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.stability import (
    TERMINAL,
    AttemptRecord,
    Policy,
    Status,
    Totals,
    Verdict,
    backoff,
    decide,
    fingerprint,
    next_due,
    owners_fingerprint,
    parse_status,
    stable_count,
)
from tokensettle.usage import Usage

POLICY = Policy(
    min_age=timedelta(minutes=30),
    max_age=timedelta(hours=24),
    stability_interval=timedelta(minutes=10),
    stable_polls=2,
    max_backoff=timedelta(minutes=30),
    retry_delay=timedelta(minutes=2),
    apportion_tolerance=0.01,
)
RUN_END = datetime(2025, 10, 18, 4, 30, 16, tzinfo=UTC)
DEADLINE = RUN_END + POLICY.max_age
EMPTY = Totals(0, 0, 0, 0)


def tot(tin: int, tout: int | None = None, calls: int = 1, cached: int = 0) -> Totals:
    if tin == 0 and tout is None:
        return EMPTY
    return Totals(tin, tin // 4 if tout is None else tout, calls, cached)


def ok(at: datetime, totals: Totals, fp: str | None = None) -> AttemptRecord:
    return AttemptRecord(at, totals, fp)


def failed(at: datetime, error: str = "503 Service Unavailable") -> AttemptRecord:
    return AttemptRecord(at, None, None, error)


def replay(
    attempts: Sequence[AttemptRecord],
    *,
    policy: Policy = POLICY,
    written: Totals | None = None,
    apportioned_fraction: float = 0.0,
) -> list[Verdict]:
    """Feed attempts one by one as the reconciler does, carrying the status forward."""
    verdicts: list[Verdict] = []
    status: Status | None = None
    for i, new in enumerate(attempts):
        v = decide(
            list(attempts[:i]),
            new,
            previous_status=status,
            run_end=RUN_END,
            policy=policy,
            apportioned_fraction=apportioned_fraction,
            written=written,
        )
        verdicts.append(v)
        status = v.status
    return verdicts


def statuses(verdicts: Sequence[Verdict]) -> list[Status]:
    return [v.status for v in verdicts]


def at(minutes: float) -> datetime:
    """A time `minutes` after the run's end."""
    return RUN_END + timedelta(minutes=minutes)


# ------------------------------------------------------------------ field histories


def test_seed_history_19066_3711_19066_19066_verifies_and_the_drop_is_a_warning() -> None:
    # baes/a7528f73: step 1 came back 0 on the second attempt.
    good, bad = Totals(19066, 5223, 11, 0), Totals(3711, 522, 3, 0)
    attempts = [ok(at(233), good), ok(at(272), bad), ok(at(316), good), ok(at(360), good)]
    verdicts = replay(attempts)
    assert statuses(verdicts) == [Status.PENDING, Status.WARNING, Status.PENDING, Status.VERIFIED]
    assert "went down" in verdicts[1].message
    assert verdicts[1].next_due == at(272) + POLICY.stability_interval
    assert verdicts[3].verified_at == at(360)
    assert verdicts[3].writes_tokens
    assert not verdicts[1].writes_tokens


def test_seed_history_238085_190252_238085_238085_verifies() -> None:
    # chatdev/7c997ab4: step 6 returned 0 once.
    good, bad = Totals(238085, 70000, 90, 1000), Totals(190252, 60000, 80, 1000)
    attempts = [ok(at(40), good), ok(at(60), bad), ok(at(80), good), ok(at(100), good)]
    assert statuses(replay(attempts)) == [
        Status.PENDING,
        Status.WARNING,
        Status.PENDING,
        Status.VERIFIED,
    ]


def test_seed_history_empty_empty_then_data_then_stable() -> None:
    # baes/6d5f179c: attempts 0, 0, then data, then the same data >= 10 min later.
    data = Totals(25156, 6694, 12, 0)
    attempts = [ok(at(3), EMPTY), ok(at(5), EMPTY), ok(at(7), data), ok(at(17), data)]
    assert statuses(replay(attempts)) == [
        Status.DATA_NOT_AVAILABLE,
        Status.DATA_NOT_AVAILABLE,
        Status.PENDING,
        Status.VERIFIED,
    ]


def test_identical_polls_six_seconds_apart_are_not_verified() -> None:
    # baes/23f46f6b was "verified" by the seed from polls 6 s apart (interval 0).
    data = Totals(21342, 5000, 14, 0)
    t = at(40)
    verdicts = replay([ok(t, data), ok(t + timedelta(seconds=6), data)])
    assert statuses(verdicts) == [Status.PENDING, Status.PENDING]
    assert verdicts[1].next_due == t + timedelta(seconds=6) + POLICY.stability_interval
    # A third poll 10 min after the first counts it, and the run verifies.
    v = replay(
        [ok(t, data), ok(t + timedelta(seconds=6), data), ok(t + timedelta(minutes=10), data)]
    )
    assert v[-1].status == Status.VERIFIED
    assert v[-1].stable_count == 2


def test_stable_at_the_lower_value_never_verifies() -> None:
    good, bad = tot(19066), tot(3711)
    attempts = [ok(at(40), good)] + [ok(at(50 + 20 * i), bad) for i in range(4)]
    assert statuses(replay(attempts))[1:] == [Status.WARNING] * 4


def test_data_still_arriving_is_pending_and_names_the_growth() -> None:
    verdicts = replay([ok(at(35), tot(1000)), ok(at(45), tot(1500))])
    assert statuses(verdicts) == [Status.PENDING, Status.PENDING]
    assert "+500 in" in verdicts[1].message
    assert verdicts[1].stable_count == 1


def test_same_totals_but_different_minute_data_is_not_stable() -> None:
    data = tot(5000)
    attempts = [ok(at(40), data, "sha256:aaaa"), ok(at(60), data, "sha256:bbbb")]
    assert replay(attempts)[-1].status == Status.PENDING
    attempts = [ok(at(40), data, "sha256:aaaa"), ok(at(60), data, "sha256:aaaa")]
    assert replay(attempts)[-1].status == Status.VERIFIED


def test_attempts_without_fingerprint_compare_totals() -> None:
    data = tot(5000)
    attempts = [ok(at(40), data, None), ok(at(60), data, "sha256:aaaa")]
    assert replay(attempts)[-1].status == Status.VERIFIED


def test_three_stable_polls_needed_when_configured() -> None:
    p3 = dataclasses.replace(POLICY, stable_polls=3)
    data = tot(800)
    attempts = [ok(at(30), data), ok(at(40), data), ok(at(50), data)]
    assert statuses(replay(attempts, policy=p3)) == [
        Status.PENDING,
        Status.PENDING,
        Status.VERIFIED,
    ]


# ------------------------------------------------------------------ failed attempts


def test_failed_attempt_keeps_previous_status_and_never_counts_as_zero() -> None:
    data = tot(19066)
    verdicts = replay([ok(at(30), data), failed(at(40)), ok(at(41), data)])
    assert statuses(verdicts) == [Status.PENDING, Status.PENDING, Status.VERIFIED]
    assert "failed" in verdicts[1].message
    # The failure is neither data_not_available nor a warning (a drop to zero).
    assert verdicts[1].status not in (Status.DATA_NOT_AVAILABLE, Status.WARNING)


@pytest.mark.parametrize(
    "previous", [Status.DATA_NOT_AVAILABLE, Status.WARNING, Status.PENDING, None]
)
def test_failed_attempt_keeps_each_non_terminal_status(previous: Status | None) -> None:
    v = decide(
        [ok(at(30), tot(100))],
        failed(at(40)),
        previous_status=previous,
        run_end=RUN_END,
        policy=POLICY,
    )
    assert v.status == (previous or Status.PENDING)
    assert not v.writes_tokens
    assert v.verified_at is None


def test_failed_attempts_between_stable_polls_do_not_break_the_chain() -> None:
    data = tot(7777)
    attempts = [ok(at(30), data), failed(at(32)), failed(at(36)), ok(at(40), data)]
    assert statuses(replay(attempts))[-1] == Status.VERIFIED


def test_failed_attempts_alone_never_verify() -> None:
    attempts = [failed(at(30 + 15 * i)) for i in range(6)]
    assert set(statuses(replay(attempts))) == {Status.PENDING}


def test_failed_attempt_backoff_starts_at_retry_delay_and_doubles() -> None:
    history = [ok(at(30), tot(100))]
    dues = []
    for i in range(6):
        history.append(failed(at(40 + i)))
        due = next_due(history, Status.PENDING, RUN_END, POLICY)
        assert due is not None
        dues.append(due - history[-1].timestamp)
    assert dues == [timedelta(minutes=m) for m in (2, 4, 8, 16, 30, 30)]


def test_error_record_with_totals_is_not_ok() -> None:
    record = AttemptRecord(at(40), tot(100), None, "malformed body")
    assert not record.ok
    assert stable_count([ok(at(30), tot(100)), record], POLICY.stability_interval) == 1


# ------------------------------------------------------------------ empty data


def test_empty_data_backoff_doubles_from_interval_capped_at_max_backoff() -> None:
    history: list[AttemptRecord] = []
    gaps = []
    t = at(30)
    for _ in range(5):
        new = ok(t, EMPTY)
        v = decide(history, new, previous_status=None, run_end=RUN_END, policy=POLICY)
        assert v.status == Status.DATA_NOT_AVAILABLE
        assert v.next_due is not None
        gaps.append(v.next_due - t)
        history.append(new)
        t = v.next_due
    assert gaps == [timedelta(minutes=m) for m in (10, 20, 30, 30, 30)]


def test_window_empty_after_data_is_a_warning_not_data_not_available() -> None:
    verdicts = replay([ok(at(30), tot(500)), ok(at(40), EMPTY)])
    assert verdicts[1].status == Status.WARNING
    assert "empty" in verdicts[1].message


def test_all_zero_totals_never_verify() -> None:
    attempts = [ok(at(30 + 15 * i), EMPTY) for i in range(5)]
    assert set(statuses(replay(attempts))) == {Status.DATA_NOT_AVAILABLE}


# ------------------------------------------------------------------ written totals


def test_written_totals_higher_than_new_totals_is_a_warning() -> None:
    written = Totals(258207, 73872, 120, 9000)
    lower = Totals(27068, 7000, 12, 1000)
    verdicts = replay([ok(at(30), lower), ok(at(40), lower), ok(at(50), lower)], written=written)
    assert set(statuses(verdicts)) == {Status.WARNING}
    assert not any(v.writes_tokens for v in verdicts)


def test_written_totals_equal_to_new_totals_verify() -> None:
    written = Totals(258207, 73872, 120, 9000)
    verdicts = replay([ok(at(30), written), ok(at(40), written)], written=written)
    assert verdicts[-1].status == Status.VERIFIED


# ------------------------------------------------------------------ ambiguous, expired


def test_ambiguous_when_apportioned_fraction_exceeds_tolerance() -> None:
    data = tot(5000)
    attempts = [ok(at(30), data), ok(at(40), data)]
    v = replay(attempts, apportioned_fraction=0.02)[-1]
    assert v.status == Status.AMBIGUOUS
    assert v.writes_tokens
    assert v.next_due is None
    assert v.verified_at == at(40)
    assert "shared with other runs" in v.message
    assert replay(attempts, apportioned_fraction=0.01)[-1].status == Status.VERIFIED


@pytest.mark.parametrize("totals", [EMPTY, Totals(100, 10, 1, 0)])
def test_expired_at_or_after_deadline_without_verification(totals: Totals) -> None:
    for when in (DEADLINE, DEADLINE + timedelta(minutes=5)):
        v = decide(
            [ok(at(30), Totals(100, 10, 1, 0))] if totals != EMPTY else [],
            ok(when, totals),
            previous_status=Status.PENDING,
            run_end=RUN_END,
            policy=POLICY,
        )
        if totals == EMPTY:
            assert v.status == Status.EXPIRED
        else:
            # Identical data 24 h apart is stable: verification wins over expiry.
            assert v.status == Status.VERIFIED
    v = decide(
        [],
        ok(DEADLINE - timedelta(seconds=1), EMPTY),
        previous_status=None,
        run_end=RUN_END,
        policy=POLICY,
    )
    assert v.status == Status.DATA_NOT_AVAILABLE
    assert v.next_due == DEADLINE


def test_expired_on_failed_attempt_after_deadline() -> None:
    v = decide(
        [ok(at(30), tot(100))],
        failed(DEADLINE),
        previous_status=Status.PENDING,
        run_end=RUN_END,
        policy=POLICY,
    )
    assert v.status == Status.EXPIRED
    assert v.next_due is None
    assert not v.writes_tokens


# ------------------------------------------------------------------ next_due


def test_next_due_first_poll_is_run_end_plus_min_age() -> None:
    assert next_due([], None, RUN_END, POLICY) == RUN_END + POLICY.min_age


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_next_due_terminal_is_none(status: Status) -> None:
    assert next_due([ok(at(30), tot(5))], status, RUN_END, POLICY) is None


# ------------------------------------------------------------------ properties

POOL = [EMPTY, Totals(100, 20, 1, 0), Totals(150, 20, 2, 0), Totals(150, 25, 2, 5)]


@st.composite
def histories(draw: st.DrawFn) -> list[AttemptRecord]:
    n = draw(st.integers(min_value=1, max_value=8))
    t = RUN_END + timedelta(minutes=draw(st.integers(min_value=0, max_value=60)))
    out = []
    for _ in range(n):
        t += timedelta(seconds=draw(st.sampled_from([0, 6, 300, 599, 600, 601, 1800, 40000])))
        if draw(st.integers(min_value=0, max_value=4)) == 0:
            out.append(failed(t))
            continue
        totals = draw(st.sampled_from(POOL))
        fp = draw(st.sampled_from([None, f"sha256:{totals.fields()}"]))
        # Mostly the same co-owners; now and then a neighbour appears or goes.
        owners = draw(st.sampled_from([None] * 6 + ["sha256:one", "sha256:two"]))
        out.append(AttemptRecord(t, totals, fp, None, owners))
    return out


def _same_owners_suffix(attempts: Sequence[AttemptRecord]) -> list[AttemptRecord]:
    """Independent of since_owners_changed: the ok attempts after the last ok attempt
    whose owners differ from the newest's."""
    newest = attempts[-1]
    out: list[AttemptRecord] = []
    for a in reversed(attempts[:-1]):
        if a.ok and a.owners != newest.owners:
            break
        if a.ok:
            out.append(a)
    return out


def _has_stable_chain(attempts: Sequence[AttemptRecord], policy: Policy) -> bool:
    """Independent check: stable_polls ok attempts with the newest's data, spaced apart."""
    newest = attempts[-1]
    if not newest.ok or newest.totals is None or newest.totals.is_empty:
        return False
    same = [
        a
        for a in [*_same_owners_suffix(attempts), newest]
        if a.ok and a.totals == newest.totals and a.owners == newest.owners
    ]
    count, last = 0, None
    for a in reversed(same):
        if last is None or last - a.timestamp >= policy.stability_interval:
            count += 1
            last = a.timestamp
    return count >= policy.stable_polls


@settings(max_examples=300, deadline=None)
@given(histories(), st.floats(min_value=0, max_value=0.05), st.sampled_from([None, *POOL[1:]]))
def test_decide_properties(
    attempts: list[AttemptRecord], fraction: float, written: Totals | None
) -> None:
    verdicts = replay(attempts, apportioned_fraction=fraction, written=written)
    for i, v in enumerate(verdicts):
        seen = attempts[: i + 1]
        new = seen[-1]
        before = verdicts[i - 1].status if i else None
        if not new.ok and before in TERMINAL:
            # A failed re-poll of a settled run keeps its status and writes nothing new.
            assert v.status == before
            assert v.verified_at is None
            assert v.next_due is None
            continue
        if v.status in (Status.VERIFIED, Status.AMBIGUOUS):
            assert _has_stable_chain(seen, POLICY)
            assert v.writes_tokens
            assert new.totals is not None
            # Never lower than any earlier ok attempt of the same attribution, nor than
            # what was written.
            for earlier in [a.totals for a in _same_owners_suffix(seen) if a.totals]:
                assert all(
                    x >= y for x, y in zip(new.totals.fields(), earlier.fields(), strict=True)
                )
            if written is not None:
                assert not new.totals.lower_than(written)
            assert (v.status == Status.AMBIGUOUS) == (fraction > POLICY.apportion_tolerance)
            assert v.next_due is None
        else:
            assert not v.writes_tokens
            assert v.verified_at is None
        if not new.ok:
            assert v.status in (
                Status.PENDING,
                Status.DATA_NOT_AVAILABLE,
                Status.WARNING,
                Status.EXPIRED,
            )
        if v.status == Status.EXPIRED:
            assert new.timestamp >= DEADLINE
        if v.status not in TERMINAL:
            assert v.next_due is not None
            assert v.next_due <= DEADLINE
            assert v.next_due > new.timestamp or v.next_due == DEADLINE


@settings(max_examples=200, deadline=None)
@given(histories(), st.sampled_from([None, *Status]))
def test_next_due_never_exceeds_the_deadline(
    attempts: list[AttemptRecord], status: Status | None
) -> None:
    due = next_due(attempts, status, RUN_END, POLICY)
    if status in TERMINAL:
        assert due is None
    else:
        assert due is not None
        assert due <= DEADLINE
        assert due >= min(attempts[-1].timestamp, DEADLINE)


# ------------------------------------------------------------------ small pieces


def test_stable_count_counts_polls_spaced_by_interval() -> None:
    d = tot(10)
    history = [ok(at(0), d), ok(at(5), d), ok(at(10), d), ok(at(20), d)]
    assert stable_count(history, POLICY.stability_interval) == 3  # 20, 10, 0
    assert stable_count([ok(at(0), EMPTY)], POLICY.stability_interval) == 0
    assert stable_count([], POLICY.stability_interval) == 0
    assert stable_count([ok(at(0), d), failed(at(10))], POLICY.stability_interval) == 1


def test_fingerprint_equal_data_equal_fingerprint() -> None:
    a = {60: Usage(input_tokens=5, output_tokens=1), 0: Usage(input_tokens=3)}
    b = {0: Usage(input_tokens=3), 60: Usage(input_tokens=5, output_tokens=1)}
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a).startswith("sha256:")
    # Same totals, different minutes: different data.
    c = {0: Usage(input_tokens=5, output_tokens=1), 60: Usage(input_tokens=3)}
    assert fingerprint(a) != fingerprint(c)
    assert fingerprint(a) != fingerprint({**a, 60: Usage(input_tokens=5, output_tokens=2)})
    assert fingerprint(a) != fingerprint({**a, 0: Usage(input_tokens=3, input_cached_tokens=1)})


def test_totals_helpers() -> None:
    t = Totals.of(Usage(input_tokens=10, output_tokens=2, num_model_requests=1))
    assert t == Totals(10, 2, 1, 0)
    assert not t.is_empty
    assert Totals(0, 0, 0, 0).is_empty
    assert Totals(5, 9, 1, 0).lower_than(Totals(6, 2, 1, 1)) == ["tokens_in", "cached_tokens"]


def test_parse_status() -> None:
    assert parse_status("verified") is Status.VERIFIED
    assert parse_status("already_verified") is None
    assert parse_status(None) is None


# ------------------------------------------------------------------ field trial (issue 7)


@pytest.mark.parametrize("n", [1, 2, 39, 41, 1000, 5000])
def test_backoff_never_overflows_however_many_polls_failed_or_came_back_empty(n: int) -> None:
    # The harness: the 39th empty poll (or the 41st failed one) overflowed timedelta
    # (`base * 2**(n-1)` before the cap) and crashed the daemon ~19 h after the run.
    t = RUN_END + POLICY.min_age
    empties = [ok(t + timedelta(minutes=i), EMPTY) for i in range(n)]
    failures = [failed(t + timedelta(minutes=i)) for i in range(n)]
    for history, status, base in (
        (empties, Status.DATA_NOT_AVAILABLE, POLICY.stability_interval),
        (failures, Status.PENDING, POLICY.retry_delay),
    ):
        due = next_due(history, status, RUN_END, POLICY)
        assert due is not None
        gap = due - history[-1].timestamp
        assert gap == min(POLICY.max_backoff, base * 2 ** min(n - 1, 10)) or due == DEADLINE
        verdict = decide(
            history[:-1], history[-1], previous_status=status, run_end=RUN_END, policy=POLICY
        )
        assert verdict.status in (status, Status.EXPIRED)


def test_backoff_caps_before_it_multiplies() -> None:
    assert backoff(timedelta(minutes=2), 10**6, timedelta(minutes=30)) == timedelta(minutes=30)
    assert backoff(timedelta(minutes=2), 3, timedelta(minutes=30)) == timedelta(minutes=8)
    assert backoff(timedelta(minutes=2), 0, timedelta(minutes=30)) == timedelta(minutes=2)
    assert backoff(timedelta(0), 50, timedelta(minutes=30)) == timedelta(0)


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_failed_attempt_on_a_settled_run_keeps_its_status(status: Status) -> None:
    # `reconcile --force` on verified runs while the API failed turned them `pending`,
    # and `report` then showed 0 tokens for them.
    data = tot(5000)
    history = [ok(at(40), data), ok(at(50), data)]
    v = decide(history, failed(at(70)), previous_status=status, run_end=RUN_END, policy=POLICY)
    assert v.status == status
    assert v.next_due is None
    assert v.verified_at is None  # the file's verified_at stays what it was
    assert "kept" in v.message and "503" in v.message


def test_a_new_co_owner_restarts_stability_and_its_drop_is_no_warning() -> None:
    # A run polled before its same-key neighbour was discovered took the neighbour's
    # tokens; once the neighbour appeared the correct, lower total read as "totals went
    # down" and the run stayed `warning` until MAX_AGE.
    alone, shared = owners_fingerprint([]), owners_fingerprint(["runs/chatdev/b/metrics.json"])
    attempts = [
        AttemptRecord(at(40), tot(9000), "sha256:alone", None, alone),
        AttemptRecord(at(50), tot(6000), "sha256:shared", None, shared),
        AttemptRecord(at(60), tot(6000), "sha256:shared", None, shared),
    ]
    verdicts = replay(attempts)
    assert statuses(verdicts) == [Status.PENDING, Status.PENDING, Status.VERIFIED]
    assert "sharing its minutes changed" in verdicts[1].message
    assert verdicts[2].stable_count == 2


def test_the_first_poll_after_a_neighbour_appears_does_not_confirm_the_old_data() -> None:
    alone, shared = owners_fingerprint([]), owners_fingerprint(["other"])
    attempts = [
        AttemptRecord(at(40), tot(9000), "sha256:x", None, alone),
        AttemptRecord(at(50), tot(9000), "sha256:x", None, shared),  # nothing moved... yet
    ]
    assert statuses(replay(attempts)) == [Status.PENDING, Status.PENDING]


def test_a_drop_with_the_same_co_owners_is_still_a_warning_until_the_data_comes_back() -> None:
    same = owners_fingerprint(["other"])
    attempts = [
        AttemptRecord(at(40), tot(9000), "sha256:a", None, same),
        AttemptRecord(at(50), tot(6000), "sha256:b", None, same),
        AttemptRecord(at(60), tot(9000), "sha256:a", None, same),
        AttemptRecord(at(70), tot(9000), "sha256:a", None, same),
    ]
    assert statuses(replay(attempts)) == [
        Status.PENDING,
        Status.WARNING,
        Status.PENDING,
        Status.VERIFIED,
    ]


def test_a_warning_from_an_older_version_clears_once_co_owners_are_recorded() -> None:
    # Files of runs stuck in `warning` carry attempts without owners: the first attempt
    # that records them starts a new chain, so the run settles instead of expiring.
    now_owned = owners_fingerprint(["runs/chatdev/b/metrics.json"])
    attempts = [
        ok(at(40), tot(9000)),
        ok(at(50), tot(6000)),  # the old `warning`
        AttemptRecord(at(60), tot(6000), None, None, now_owned),
        AttemptRecord(at(70), tot(6000), None, None, now_owned),
    ]
    assert statuses(replay(attempts)) == [
        Status.PENDING,
        Status.WARNING,
        Status.PENDING,
        Status.VERIFIED,
    ]


def test_owners_fingerprint_is_a_set_fingerprint() -> None:
    assert owners_fingerprint(["b", "a", "a"]) == owners_fingerprint(["a", "b"])
    assert owners_fingerprint([]) != owners_fingerprint(["a"])

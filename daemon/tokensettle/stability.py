"""Attempt history + a new attempt -> status, message and when to look again.

Pure: every time is passed in. Rules (DESIGN.md, "Stability and statuses"):

* a failed request is an error of the attempt: it never counts as data or as zero and
  never advances stability; the status stays what it was and the run is retried soon;
* empty data is `data_not_available`, polled again with doubling backoff;
* totals below anything seen before is `warning`: the lower numbers are never written;
* `stable_polls` successful polls, each at least `stability_interval` after the previous
  counted one, with identical non-empty per-minute data, is `verified` (or `ambiguous`
  when too much of it was apportioned with another run);
* `max_age` after the run's end without verification is `expired`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from tokensettle.durations import format_duration
from tokensettle.usage import Usage


class Status(StrEnum):
    PENDING = "pending"
    DATA_NOT_AVAILABLE = "data_not_available"
    WARNING = "warning"
    VERIFIED = "verified"
    AMBIGUOUS = "ambiguous"
    EXPIRED = "expired"
    ERROR = "error"


TERMINAL = frozenset({Status.VERIFIED, Status.AMBIGUOUS, Status.EXPIRED})
WRITES_TOKENS = frozenset({Status.VERIFIED, Status.AMBIGUOUS})


def parse_status(value: object) -> Status | None:
    try:
        return Status(str(value)) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Totals:
    tokens_in: int
    tokens_out: int
    api_calls: int
    cached: int

    @staticmethod
    def of(usage: Usage) -> Totals:
        return Totals(
            usage.input_tokens, usage.output_tokens, usage.num_model_requests, usage.cached_tokens
        )

    @property
    def is_empty(self) -> bool:
        return self.tokens_in == 0 and self.tokens_out == 0 and self.api_calls == 0

    def fields(self) -> tuple[int, int, int, int]:
        return (self.tokens_in, self.tokens_out, self.api_calls, self.cached)

    def lower_than(self, other: Totals) -> list[str]:
        """Names of the counters in which self is below other."""
        names = ("tokens_in", "tokens_out", "api_calls", "cached_tokens")
        return [n for n, a, b in zip(names, self.fields(), other.fields(), strict=True) if a < b]


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One poll as recorded in the file. `totals is None` means the attempt failed."""

    timestamp: datetime
    totals: Totals | None
    fingerprint: str | None = None
    error: str | None = None
    #: fingerprint of the other runs this poll shared the run's minutes with (None: not
    #: recorded, e.g. an older tokensettle or another tool)
    owners: str | None = None

    @property
    def ok(self) -> bool:
        return self.totals is not None and self.error is None


@dataclass(frozen=True, slots=True)
class Policy:
    min_age: timedelta
    max_age: timedelta
    stability_interval: timedelta
    stable_polls: int
    max_backoff: timedelta
    retry_delay: timedelta
    apportion_tolerance: float
    #: longest run window polled; a longer one is an error of the run (None: no bound)
    max_window: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status
    message: str
    next_due: datetime | None
    verified_at: datetime | None = None
    stable_count: int = 0

    @property
    def writes_tokens(self) -> bool:
        return self.status in WRITES_TOKENS


def fingerprint(per_minute: Mapping[int, Usage]) -> str:
    """A short hash of the per-minute values: equal data <=> equal fingerprint."""
    h = hashlib.sha256()
    for minute in sorted(per_minute):
        u = per_minute[minute]
        h.update(
            f"{minute}:{u.input_tokens}:{u.output_tokens}:{u.num_model_requests}:"
            f"{u.cached_tokens};".encode()
        )
    return "sha256:" + h.hexdigest()[:16]


def owners_fingerprint(others: Iterable[str]) -> str:
    """A short hash of the set of other owners a run's minutes were shared with."""
    h = hashlib.sha256()
    for key in sorted(set(others)):
        h.update(key.encode("utf-8", "surrogateescape") + b"\0")
    return "sha256:" + h.hexdigest()[:16]


def since_owners_changed(
    history: Sequence[AttemptRecord], new: AttemptRecord
) -> list[AttemptRecord]:
    """The attempts that still describe the same attribution as `new`: those after the
    last successful attempt whose set of co-owners differs. When a neighbour appears (or
    goes), the run's share of its minutes changes, so earlier polls no longer confirm it
    and a drop they show is explained, not a warning. Failed attempts carry no owners and
    do not break the run."""
    kept: list[AttemptRecord] = []
    for attempt in reversed(history):
        if attempt.ok and attempt.owners != new.owners:
            break
        kept.append(attempt)
    kept.reverse()
    return kept


def _same_data(a: AttemptRecord, b: AttemptRecord) -> bool:
    if a.owners != b.owners:
        return False
    if a.fingerprint is not None and b.fingerprint is not None:
        return a.fingerprint == b.fingerprint
    # Attempts written by other tools carry totals only.
    return a.totals == b.totals


def _ok_attempts(history: Sequence[AttemptRecord]) -> list[AttemptRecord]:
    return [a for a in history if a.ok]


def stable_count(history: Sequence[AttemptRecord], interval: timedelta) -> int:
    """Polls, newest first, agreeing with the newest successful one, each counted poll at
    least `interval` before the one counted after it. Failed polls are skipped; a poll
    with other data ends the chain."""
    ok = _ok_attempts(history)
    if not ok or ok[-1].totals is None or ok[-1].totals.is_empty:
        return 0
    newest = ok[-1]
    count = 1
    last_counted = newest.timestamp
    for attempt in reversed(ok[:-1]):
        if not _same_data(attempt, newest):
            break
        if last_counted - attempt.timestamp >= interval:
            count += 1
            last_counted = attempt.timestamp
    return count


def _consecutive_failures(history: Sequence[AttemptRecord]) -> int:
    n = 0
    for attempt in reversed(history):
        if attempt.ok:
            break
        n += 1
    return n


def _consecutive_empty(history: Sequence[AttemptRecord]) -> int:
    n = 0
    for attempt in reversed(_ok_attempts(history)):
        if attempt.totals is None or not attempt.totals.is_empty:
            break
        n += 1
    return n


def backoff(base: timedelta, n: int, cap: timedelta) -> timedelta:
    """`base` doubled `n - 1` times, capped at `cap`: the one backoff rule (failed polls,
    empty windows, failed writes). Doubling stops at the cap, so a run that fails or stays
    empty for thousands of polls never overflows timedelta."""
    grown = base
    for _ in range(max(0, n - 1)):
        if grown >= cap or grown <= timedelta(0):
            break
        grown = grown * 2
    return min(grown, cap)


def next_due(
    history: Sequence[AttemptRecord],
    status: Status | None,
    run_end: datetime,
    policy: Policy,
) -> datetime | None:
    """When the run should be polled next, from what its file records. None = never."""
    if status in TERMINAL:
        return None
    if not history:
        return run_end + policy.min_age
    last = history[-1]
    failures = _consecutive_failures(history)
    if failures:
        due = last.timestamp + backoff(policy.retry_delay, failures, policy.max_backoff)
    elif status == Status.DATA_NOT_AVAILABLE:
        empties = _consecutive_empty(history)
        due = last.timestamp + backoff(policy.stability_interval, empties, policy.max_backoff)
    else:
        due = last.timestamp + policy.stability_interval
    return min(due, run_end + policy.max_age)


def _fmt(n: int) -> str:
    return f"{n:,}"


def decide(
    history: Sequence[AttemptRecord],
    new: AttemptRecord,
    *,
    previous_status: Status | None,
    run_end: datetime,
    policy: Policy,
    apportioned_fraction: float = 0.0,
    written: Totals | None = None,
) -> Verdict:
    """Classify `new` against the run's earlier attempts.

    `written` is what an earlier verification put in the file: new totals below it are a
    warning, never an overwrite. Only the attempts since the run's co-owners last changed
    (`since_owners_changed`) count toward stability or make a drop a warning.
    """
    attempts = [*history, new]
    deadline = run_end + policy.max_age
    now = new.timestamp

    def pending(status: Status, message: str) -> Verdict:
        due = next_due(attempts, status, run_end, policy)
        if now >= deadline:
            return Verdict(
                Status.EXPIRED,
                f"max age ({format_duration(policy.max_age)}) passed without verification; "
                f"last: {message}",
                None,
            )
        return Verdict(status, message, due)

    if not new.ok or new.totals is None:
        if previous_status in TERMINAL:
            # A forced re-poll of a settled run failed: the run keeps what it had.
            assert previous_status is not None
            return Verdict(
                previous_status,
                f"{previous_status.value}; the numbers are kept: a later attempt failed "
                f"({new.error})",
                None,
            )
        return pending(
            previous_status or Status.PENDING, f"attempt failed, will retry: {new.error}"
        )

    totals = new.totals
    relevant = since_owners_changed(history, new)
    owners_changed = len(_ok_attempts(relevant)) < len(_ok_attempts(history))
    earlier_ok = [a.totals for a in _ok_attempts(relevant) if a.totals is not None]
    floors = [*earlier_ok, written] if written is not None else earlier_ok
    peak = (
        Totals(*(max(f) for f in zip(*(t.fields() for t in floors), strict=True)))
        if floors
        else None
    )

    if peak is not None and (lower := totals.lower_than(peak)):
        if totals.is_empty:
            what = "the window came back empty after data had been seen"
        else:
            what = "totals went down (" + ", ".join(lower) + ")"
        return pending(
            Status.WARNING,
            f"{what}: now {_fmt(totals.tokens_in)} in / {_fmt(totals.tokens_out)} out, "
            f"earlier {_fmt(peak.tokens_in)} in / {_fmt(peak.tokens_out)} out; "
            "the higher numbers are kept and polling goes on",
        )

    if totals.is_empty:
        n = _consecutive_empty(attempts)
        return pending(
            Status.DATA_NOT_AVAILABLE,
            f"no usage in the window yet (attempt {len(attempts)}, {n} empty in a row)",
        )

    count = stable_count([*relevant, new], policy.stability_interval)
    summary = f"{_fmt(totals.tokens_in)} in, {_fmt(totals.tokens_out)} out"
    if count >= policy.stable_polls:
        if apportioned_fraction > policy.apportion_tolerance:
            return Verdict(
                Status.AMBIGUOUS,
                f"stable across {count} polls ({summary}) but {apportioned_fraction:.1%} "
                f"was shared with other runs in the same scope "
                f"(tolerance {policy.apportion_tolerance:.1%})",
                None,
                verified_at=now,
                stable_count=count,
            )
        return Verdict(
            Status.VERIFIED,
            f"verified: {count} identical polls at least "
            f"{format_duration(policy.stability_interval)} apart ({summary})",
            None,
            verified_at=now,
            stable_count=count,
        )
    earlier = _ok_attempts(relevant)
    previous = earlier[-1].totals if earlier else None
    if owners_changed and previous is None:
        message = (
            f"the runs sharing its minutes changed ({summary} now); earlier polls no "
            "longer count, confirming again"
        )
    elif previous is None or previous.is_empty:
        message = f"data seen ({summary}); confirming"
    elif previous != totals:
        message = (
            f"data still arriving (+{_fmt(totals.tokens_in - previous.tokens_in)} in, "
            f"+{_fmt(totals.tokens_out - previous.tokens_out)} out since the last poll)"
        )
    else:
        message = f"{count}/{policy.stable_polls} identical polls ({summary}); confirming"
    verdict = pending(Status.PENDING, message)
    return Verdict(verdict.status, verdict.message, verdict.next_due, None, count)

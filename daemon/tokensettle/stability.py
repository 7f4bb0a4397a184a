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
from collections.abc import Mapping, Sequence
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


def _same_data(a: AttemptRecord, b: AttemptRecord) -> bool:
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


def _backoff(base: timedelta, n: int, cap: timedelta) -> timedelta:
    grown: timedelta = base * (2 ** max(0, n - 1))
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
        due = last.timestamp + _backoff(policy.retry_delay, failures, policy.max_backoff)
    elif status == Status.DATA_NOT_AVAILABLE:
        empties = _consecutive_empty(history)
        due = last.timestamp + _backoff(policy.stability_interval, empties, policy.max_backoff)
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
    warning, never an overwrite.
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
        keep = previous_status if previous_status not in (None, *TERMINAL) else Status.PENDING
        return pending(keep or Status.PENDING, f"attempt failed, will retry: {new.error}")

    totals = new.totals
    earlier_ok = [a.totals for a in _ok_attempts(history) if a.totals is not None]
    if written is not None:
        earlier_ok.append(written)
    peak = (
        Totals(*(max(f) for f in zip(*(t.fields() for t in earlier_ok), strict=True)))
        if earlier_ok
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

    count = stable_count(attempts, policy.stability_interval)
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
    earlier = _ok_attempts(history)
    previous = earlier[-1].totals if earlier else None
    if previous is None or previous.is_empty:
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

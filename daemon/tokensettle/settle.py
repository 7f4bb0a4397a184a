"""One attempt's result -> verdict and file patch. Pure: no files, no network, no clock.

`reconcile` does the I/O around this: it fetches, attributes, calls `settle`, and writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tokensettle.attribution import Share
from tokensettle.breakdown import breakdown_of_share
from tokensettle.compare import DEFAULT_TOLERANCE, compare
from tokensettle.pricing import price_models
from tokensettle.runfile import Patch, RunRecord, iso
from tokensettle.stability import (
    AttemptRecord,
    Policy,
    Totals,
    Verdict,
    decide,
    fingerprint,
    owners_fingerprint,
)
from tokensettle.usage import OPENAI, Scope, Usage


@dataclass(frozen=True)
class Observation:
    """What one poll saw for one run: its share of the rows, or why there is none."""

    share: Share | None
    error: str | None = None
    step_values: Mapping[int, Usage] | None = None
    step_unowned: Usage | None = None
    overlaps: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class Settled:
    verdict: Verdict
    patch: Patch
    totals: Usage | None
    #: (kind, message) pairs worth a log line: unpriced models, bad local counts, odd usage
    findings: tuple[tuple[str, str], ...] = ()
    #: the framework's own counts against ours (`match`, `mismatch`, ...), once settled
    local_verdict: str | None = None


def query_window(record: RunRecord, grace: int) -> dict[str, Any]:
    window = record.window
    return {
        "start": window.start,
        "end": window.end,
        "start_iso": iso(datetime.fromtimestamp(window.start, UTC)),
        "end_iso": iso(datetime.fromtimestamp(window.end, UTC)),
        "grace_seconds": grace,
    }


def _failed(
    record: RunRecord,
    error: str,
    *,
    policy: Policy,
    now: datetime,
    grace: int,
    prov: dict[str, Any],
) -> Settled:
    verdict = decide(
        record.attempts,
        AttemptRecord(now, None, None, error),
        previous_status=record.status,
        run_end=record.end,
        policy=policy,
    )
    attempt = {
        "timestamp": iso(now),
        "total_tokens_in": None,
        "total_tokens_out": None,
        "total_api_calls": None,
        "total_cached_tokens": None,
        "query_window": query_window(record, grace),
        "status": verdict.status.value,
        "error": error,
    }
    return Settled(verdict, Patch(verdict, attempt, now, prov), None)


def settle(
    record: RunRecord,
    seen: Observation,
    *,
    policy: Policy,
    now: datetime,
    grace: int,
    provenance: dict[str, Any],
    local_tolerance: float = DEFAULT_TOLERANCE,
    provider: str = OPENAI,
    scope: Scope | None = None,
) -> Settled:
    """Decide the run's status from this attempt and build the patch for its file.

    A run that settles is also priced at its own start time in its provider's price table,
    its tokens broken down by cache and modality, and its framework's own counts (if any)
    compared with ours."""
    share = seen.share
    if share is None:
        error = seen.error or "no data"
        return _failed(record, error, policy=policy, now=now, grace=grace, prov=provenance)
    usage = share.usage
    totals = Totals.of(usage)
    fp = fingerprint(share.per_minute)
    # Who else shares the run's minutes, and under which scope the run itself was read:
    # a change of either (a neighbour found late, a declaration written after a poll)
    # restarts stability, and a drop it explains is not a warning.
    basis = [*share.co_owners()]
    if scope is not None:
        basis.append("scope:" + json.dumps(scope.to_json(), sort_keys=True))
    owners = owners_fingerprint(basis)
    verdict = decide(
        record.attempts,
        AttemptRecord(now, totals, fp, None, owners),
        previous_status=record.status,
        run_end=record.end,
        policy=policy,
        apportioned_fraction=share.apportioned_fraction,
        written=record.written,
    )
    step_values = dict(seen.step_values or {})
    steps_with_tokens = sum(1 for v in step_values.values() if not v.is_empty)
    attempt = {
        "timestamp": iso(now),
        "total_tokens_in": totals.tokens_in,
        "total_tokens_out": totals.tokens_out,
        "total_api_calls": totals.api_calls if usage.requests_counted else None,
        "total_cached_tokens": totals.cached,
        "query_window": query_window(record, grace),
        "fingerprint": fp,
        "owners": owners,
        "status": verdict.status.value,
        "exact_tokens": share.exact.total_tokens,
        "apportioned_tokens": share.apportioned.total_tokens,
        "steps_with_tokens": steps_with_tokens,
        "total_steps": len(record.steps),
        "error": None,
    }
    attribution: dict[str, Any] = {
        "exact": share.exact.present(),
        "apportioned": share.apportioned.present(),
        "apportioned_fraction": round(share.apportioned_fraction, 6),
        "tolerance": policy.apportion_tolerance,
        "minutes": len(share.per_minute),
        "shared_minutes": len(share.shared_with),
        "models": {m: u.present() for m, u in sorted(share.models.items())},
    }
    if record.steps:
        attribution["steps_unattributed"] = (seen.step_unowned or Usage()).present()
    extra: dict[str, Any] = {
        "steps_with_tokens": steps_with_tokens,
        "total_steps": len(record.steps),
        "attribution": attribution,
        "overlaps": list(seen.overlaps),
    }
    cost_usd: float | None = None
    cost_breakdown: dict[str, Any] | None = None
    cached: int | None = None
    findings: list[tuple[str, str]] = []
    local_verdict: str | None = None
    if verdict.writes_tokens:
        cost = price_models(share.models, record.start, total=usage, provider_id=provider)
        breakdown = breakdown_of_share(share, configured_model=record.model)
        comparison = compare(
            record.local,
            usage,
            cost.total_usd if cost.complete else None,
            tolerance=local_tolerance,
        )
        extra["cost"] = cost.to_json()
        extra["token_breakdown"] = breakdown.to_json()
        extra["local_vs_provider"] = {**comparison.to_json(), "local": record.local.to_json()}
        local_verdict = comparison.verdict
        cost_usd, cost_breakdown = cost.cost_usd_value(), cost.seed_cost_breakdown()
        cached = breakdown.cached_tokens
        findings += [("unpriced", f"{m}: {u.reason}") for m, u in sorted(cost.unpriced.items())]
        findings += [("usage_problem", p) for p in breakdown.problems]
        findings += [("local_counts_invalid", i.reason) for i in record.local.invalid]
        if breakdown.model_warning:
            findings.append(("model_mismatch", breakdown.model_warning))
    patch = Patch(
        verdict,
        attempt,
        now,
        provenance,
        totals=usage,
        step_values=step_values,
        extra_block=extra,
        cost_usd=cost_usd,
        cost_breakdown=cost_breakdown,
        cached_tokens=cached,
    )
    return Settled(verdict, patch, usage, tuple(findings), local_verdict)

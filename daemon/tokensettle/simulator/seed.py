"""Ground truth from existing run files: `tokensettle simulate --seed-from RUNS_DIR`.

Each run file under the directory becomes virtual requests of its framework's key, so that
reconciling the same runs (tokens zeroed) against the simulator gives back the totals the
files recorded. Deterministic; the rules (also in docs/simulator.md):

* **Totals**: the last attempt with totals of a `verified` or `ambiguous`
  `usage_api_reconciliation` block (what the verification wrote); else `aggregate_metrics`
  (`TOK_IN`, `TOK_OUT`, `API_CALLS`, `CACHED_TOKENS`). A run recording no tokens is skipped.
  A counter the file does not record: cached tokens stay *not carried*; model requests are
  estimated as one per owner (below).
* **Owners**: the steps that carry tokens, when their `tokens_in` and `tokens_out` add up to
  the totals (each step keeps its own counts; its `api_calls` and `cached_tokens` too when
  they add up, else the run's are apportioned by the steps' tokens); otherwise the run.
* **Spread**: each owner's counters are split over the minutes it was active, by active
  seconds (largest remainder, the attribution rule), one virtual request per minute, timed
  at the middle of the minute slot.
* **Identity**: key id from `--key-id FW=KEY`, else the first id of the framework scope
  convention `OPENAI_API_KEY_<FW>_ID`, else `key_<framework>`; project `--project-id`;
  model the run's own `model`, else `--model`.

Runs are seeded at their own recorded times: replaying old runs needs `reconcile --force`
(or a `MAX_AGE` that reaches them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tokensettle.atomic import read_snapshot
from tokensettle.attribution import apportion, split_usage
from tokensettle.config import frameworks_from_env
from tokensettle.discovery import scan_all
from tokensettle.runfile import BLOCK, RunFileError, RunRecord, load_document, parse_run
from tokensettle.simulator.scenario import (
    DEFAULT_SEED_MODEL,
    DEFAULT_SEED_PROJECT,
    Revision,
    ScenarioError,
    VirtualRequest,
)
from tokensettle.usage import Usage
from tokensettle.windows import MINUTE, Activity, floor_minute

#: A run active longer than this is not spread (one bad timestamp would mean millions of
#: virtual requests); it is skipped with that reason.
MAX_SEED_MINUTES: Final = 7 * 1440
_GRACE: Final = MINUTE  # weights ignore grace minutes, so the value does not matter
_WEIGHT_SCALE: Final = 1000  # active seconds as integer milliseconds, as attribution does
_KEY_FLAG = re.compile(r"^(?P<fw>[^=\s]+)=(?P<key>\S+)$")


@dataclass(frozen=True, slots=True)
class Recorded:
    """The totals a run file records, and where they came from."""

    tokens_in: int
    tokens_out: int
    api_calls: int | None
    cached: int | None
    source: str


@dataclass(frozen=True, slots=True)
class SeedIdentity:
    """Who the seeded usage belongs to, per framework."""

    keys: Mapping[str, str]
    project_id: str = DEFAULT_SEED_PROJECT
    model: str = DEFAULT_SEED_MODEL

    def key_for(self, framework: str) -> str:
        return self.keys.get(framework, f"key_{framework}")


@dataclass(frozen=True, slots=True)
class SeededRun:
    path: Path
    framework: str
    run_id: str
    api_key_id: str
    recorded: Recorded
    spread_over: str  # "steps" or "minutes"
    requests: tuple[VirtualRequest, ...]


@dataclass(frozen=True, slots=True)
class SeedSkip:
    path: Path
    reason: str


@dataclass(frozen=True, slots=True)
class SeedPlan:
    runs: tuple[SeededRun, ...]
    skipped: tuple[SeedSkip, ...]

    @property
    def requests(self) -> list[VirtualRequest]:
        return [r for run in self.runs for r in run.requests]


def key_ids(environ: Mapping[str, str], flags: Sequence[str]) -> dict[str, str]:
    """Framework -> key id: the scope convention's first id, overridden by `FW=KEY` flags."""
    keys = {fw: ids[0] for fw, ids in frameworks_from_env(environ).items() if ids}
    for flag in flags:
        match = _KEY_FLAG.match(flag)
        if match is None:
            raise ScenarioError(f"--key-id {flag!r}: expected FRAMEWORK=KEY_ID")
        keys[match.group("fw").lower()] = match.group("key")
    return keys


# ------------------------------------------------------------------------------- totals


def _count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def recorded_totals(doc: Mapping[str, Any], record: RunRecord) -> Recorded | None:
    """What the file says the run used, or None when it records no tokens."""
    if record.written is not None:
        w = record.written
        if w.tokens_in or w.tokens_out:
            return Recorded(w.tokens_in, w.tokens_out, w.api_calls, w.cached, BLOCK)
    agg = doc.get("aggregate_metrics")
    if isinstance(agg, Mapping):
        tin, tout = _count(agg.get("TOK_IN")), _count(agg.get("TOK_OUT"))
        if (tin or tout) and tin is not None and tout is not None:
            calls, cached = _count(agg.get("API_CALLS")), _count(agg.get("CACHED_TOKENS"))
            return Recorded(tin, tout, calls, cached, "aggregate_metrics")
    return None


# ------------------------------------------------------------------------------- spread


def _step_counts(doc: Mapping[str, Any], record: RunRecord) -> list[tuple[Activity, list[int]]]:
    """(activity, [in, out, calls, cached]) of each timed step that carries tokens; counts
    the step lacks are -1."""
    raw_steps = doc.get("steps")
    out: list[tuple[Activity, list[int]]] = []
    if not isinstance(raw_steps, list):
        return out
    for info in record.steps:
        step = raw_steps[info.index]
        values = [_count(step.get(k)) for k in ("tokens_in", "tokens_out")]
        if not any(values):
            continue
        extra = [_count(step.get(k)) for k in ("api_calls", "cached_tokens")]
        if info.activity is None:
            return []  # tokens without a window: spread over the run instead
        out.append((info.activity, [v if v is not None else -1 for v in [*values, *extra]]))
    return out


def _column(steps: list[tuple[Activity, list[int]]], i: int, total: int | None) -> list[int]:
    """Column `i` of the steps' counts when complete and adding up to `total`; otherwise
    `total` (or one per step when unknown) apportioned by the steps' tokens."""
    own = [counts[i] for _, counts in steps]
    if all(v >= 0 for v in own) and (total is None or sum(own) == total):
        return own
    weights = [max(1, counts[0] + counts[1]) for _, counts in steps]
    return apportion(len(steps) if total is None else total, weights)


def owners(
    doc: Mapping[str, Any], record: RunRecord, rec: Recorded
) -> tuple[str, list[tuple[Activity, Usage]]]:
    """How the totals are spread: ("steps", one owner per step with tokens) or ("minutes",
    the run as the only owner)."""
    steps = _step_counts(doc, record)
    if (
        steps
        and all(c[0] >= 0 and c[1] >= 0 for _, c in steps)
        and sum(c[0] for _, c in steps) == rec.tokens_in
        and sum(c[1] for _, c in steps) == rec.tokens_out
    ):
        calls = _column(steps, 2, rec.api_calls)
        cached = _column(steps, 3, rec.cached) if rec.cached is not None else None
        return "steps", [
            (
                activity,
                Usage(
                    input_tokens=counts[0],
                    output_tokens=counts[1],
                    num_model_requests=calls[i],
                    input_cached_tokens=None if cached is None else cached[i],
                ),
            )
            for i, (activity, counts) in enumerate(steps)
        ]
    usage = Usage(
        input_tokens=rec.tokens_in,
        output_tokens=rec.tokens_out,
        num_model_requests=1 if rec.api_calls is None else rec.api_calls,
        input_cached_tokens=rec.cached,
    )
    return "minutes", [(record.activity, usage)]


def spread(activity: Activity, usage: Usage) -> list[tuple[int, Usage]]:
    """`usage` split over the minutes `activity` was active in, by active seconds."""
    minutes = [
        (m, w) for m in activity.window.minute_starts() if (w := activity.weight(m)) > 0
    ] or [(floor_minute(activity.start), 1.0)]
    weights = [max(1, round(w * _WEIGHT_SCALE)) for _, w in minutes]
    parts = split_usage(usage, weights)
    return [(m, part) for (m, _), part in zip(minutes, parts, strict=True) if not part.is_empty]


def seed_run(
    raw: bytes, path: Path, framework: str, identity: SeedIdentity, *, registered_at: float
) -> SeededRun | SeedSkip:
    """The virtual requests that replay one run file, or why it cannot be replayed."""
    try:
        doc = load_document(raw)
        record = parse_run(raw, path, framework, _GRACE)
    except RunFileError as exc:
        return SeedSkip(path, str(exc))
    rec = recorded_totals(doc, record)
    if rec is None:
        return SeedSkip(path, "records no tokens (neither a verified block nor aggregate_metrics)")
    if record.window.minutes > MAX_SEED_MINUTES:
        return SeedSkip(
            path, f"window of {record.window.minutes:,} minutes is longer than seven days"
        )
    model = doc.get("model")
    model = model if isinstance(model, str) and model else identity.model
    key = identity.key_for(framework)
    how, parts = owners(doc, record, rec)
    requests = tuple(
        VirtualRequest(
            time=minute + MINUTE / 2,
            api_key_id=key,
            project_id=identity.project_id,
            model=model,
            revisions=(Revision(after=0.0, usage=part),),
            registered_at=registered_at,
        )
        for activity, usage in parts
        for minute, part in spread(activity, usage)
    )
    return SeededRun(path, framework, record.run_id, key, rec, how, requests)


def plan_seed(roots: Iterable[Path], identity: SeedIdentity, *, registered_at: float) -> SeedPlan:
    """Read every run file under `roots` (discovery's rules) into a seed plan."""
    runs: list[SeededRun] = []
    skipped: list[SeedSkip] = []
    for found in scan_all(list(roots)):
        if found.skip_reason is not None:
            skipped.append(SeedSkip(found.path, found.skip_reason))
            continue
        try:
            raw = read_snapshot(found.path).raw
        except OSError as exc:
            skipped.append(SeedSkip(found.path, f"cannot read: {exc.strerror or exc}"))
            continue
        result = seed_run(raw, found.path, found.framework, identity, registered_at=registered_at)
        if isinstance(result, SeededRun):
            runs.append(result)
        else:
            skipped.append(result)
    return SeedPlan(tuple(runs), tuple(skipped))

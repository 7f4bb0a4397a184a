"""One run as the reports see it: `RunSummary`, read from a metrics.json without raising.

Pure: bytes or a parsed document in, a summary out (the caller reads the file). The status
is the one `tokensettle list` shows for the file (see `reconcile.describe`, mirrored here so
the reports need no reconciler): a file that is not a readable run is `error` with the
reason, one discovery refused is `skipped`, an unsettled run past `MAX_AGE` is `too_old`,
and an unknown status string reads as `pending`.

Token figures are the provider's and exist only for settled runs (`verified`, `ambiguous`).
What is estimated says so: `apportioned_tokens` (tokens shared by proportion with another
run, also on verified runs within tolerance) and `unpriced_models` (models genai-prices could
not price; such a run has no cost, whatever partial sum its block records).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from tokensettle.runfile import BLOCK, RunFileError, RunRecord, load_document, parse_run
from tokensettle.stability import Status, parse_status
from tokensettle.states import shown_state
from tokensettle.usage import counts_requests

SETTLED = ("verified", "ambiguous")
UNREADABLE = ("error", "skipped")

UNKNOWN_MODEL = "model not recorded"

CostState = Literal["complete", "unpriced", "none"]


@dataclass(frozen=True)
class RunSummary:
    framework: str
    run_id: str
    status: str
    tokens_in: int | None = None
    tokens_out: int | None = None
    cached_tokens: int | None = None
    api_calls: int | None = None
    #: as recorded; with `cost_complete` False only the priced models' part (not a cost)
    cost_usd: Decimal | None = None
    cost_complete: bool = True
    run_end: datetime | None = None
    verified_at: datetime | None = None
    local_vs_provider: str | None = None
    models: tuple[str, ...] = ()
    #: models the price table could not price (the run then has no cost)
    unpriced_models: tuple[str, ...] = ()
    #: input + output tokens apportioned with other runs (an estimate), where recorded
    apportioned_tokens: int | None = None
    #: why the file is `error`/`skipped`, or the block's verification message
    message: str | None = None
    #: "genai-prices 0.2.3 (bundled)" as the cost block records it
    price_source: str | None = None
    priced_at: datetime | None = None
    #: "tokensettle 0.1.0" from the block's provenance; None: another tool settled it
    settled_by: str | None = None
    endpoint: str | None = None
    #: whose usage report settled it ("openai", "anthropic"), as its provenance says
    provider: str | None = None
    #: the Usage API query window [start, end) the tokens come from
    window: tuple[datetime, datetime] | None = None

    @property
    def settled(self) -> bool:
        return self.status in SETTLED

    @property
    def time_to_verify(self) -> timedelta | None:
        if self.run_end is None or self.verified_at is None:
            return None
        return self.verified_at - self.run_end

    @property
    def cached_share(self) -> float | None:
        if self.cached_tokens is None or not self.tokens_in:
            return None
        return self.cached_tokens / self.tokens_in

    @property
    def total_tokens(self) -> int | None:
        if self.tokens_in is None and self.tokens_out is None:
            return None
        return (self.tokens_in or 0) + (self.tokens_out or 0)

    @property
    def estimated(self) -> bool:
        """The token counts are (partly) apportioned between runs, not exact."""
        return self.settled and (self.status == "ambiguous" or bool(self.apportioned_tokens))

    @property
    def cost_state(self) -> CostState:
        if self.unpriced_models or (self.cost_usd is not None and not self.cost_complete):
            return "unpriced"
        return "complete" if self.cost_usd is not None else "none"

    @property
    def unpriced_names(self) -> tuple[str, ...]:
        """The models that make the cost incomplete, as shown ("unpriced (<model>)")."""
        if self.cost_state != "unpriced":
            return ()
        return self.unpriced_models or (UNKNOWN_MODEL,)

    @property
    def cost(self) -> Decimal | None:
        """The run's cost: only when every model was priced."""
        return self.cost_usd if self.cost_state == "complete" else None

    def to_json(self) -> dict[str, Any]:
        ttv = self.time_to_verify
        share = self.cached_share
        state = self.cost_state
        return {
            "framework": self.framework,
            "run_id": self.run_id,
            "status": self.status,
            "message": self.message,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cached_tokens": self.cached_tokens,
            "cached_share": None if share is None else round(share, 6),
            "api_calls": self.api_calls,
            "tokens_estimated": self.estimated,
            "apportioned_tokens": self.apportioned_tokens,
            "cost_usd": None if self.cost is None else float(self.cost),
            "cost_complete": None if state == "none" else state == "complete",
            "cost_status": state,
            "unpriced_models": list(self.unpriced_names),
            "cost_priced_part_usd": float(self.cost_usd)
            if state == "unpriced" and self.cost_usd is not None
            else None,
            "run_end": iso(self.run_end),
            "verified_at": iso(self.verified_at),
            "time_to_verify_s": None if ttv is None else round(ttv.total_seconds(), 3),
            "local_vs_provider": self.local_vs_provider,
            "models": list(self.models),
            "window": None if self.window is None else [iso(w) for w in self.window],
            "price_source": self.price_source,
            "priced_at": iso(self.priced_at),
            "settled_by": self.settled_by,
        }


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).isoformat()


# ------------------------------------------------------------------ field readers


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _decimal(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, str):
            result = Decimal(value)
        elif isinstance(value, int | float):
            result = Decimal(repr(value))
        else:
            return None
    except InvalidOperation:
        return None
    return result if result.is_finite() and result >= 0 else None


def _when(value: object) -> datetime | None:
    """ISO 8601 (naive = UTC, as the seed writes) or Unix seconds; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return None
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            try:
                return _when(float(value))
            except (ValueError, OverflowError):
                return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _run_end(doc: Mapping[str, Any]) -> datetime | None:
    end = _when(doc.get("end_timestamp"))
    if end is not None:
        return end
    steps = doc.get("steps")
    if isinstance(steps, list):
        ends = [e for s in steps if isinstance(s, Mapping) and (e := _when(s.get("end_timestamp")))]
        if ends:
            return max(ends)
    return None


def _last_attempt(block: Mapping[str, Any]) -> Mapping[str, Any]:
    attempts = block.get("attempts")
    if isinstance(attempts, list):
        for attempt in reversed(attempts):
            if isinstance(attempt, Mapping) and _int(attempt.get("total_tokens_in")) is not None:
                return attempt
    return {}


def _first(*values: object) -> int | None:
    for value in values:
        found = _int(value)
        if found is not None:
            return found
    return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _query_window(attempt: Mapping[str, Any]) -> tuple[datetime, datetime] | None:
    window = _mapping(attempt.get("query_window"))
    start, end = _when(window.get("start")), _when(window.get("end"))
    return (start, end) if start is not None and end is not None and start < end else None


def _price_source(cost_block: Mapping[str, Any]) -> str | None:
    source = _mapping(cost_block.get("source"))
    name, version = _text(source.get("name")), _text(source.get("version"))
    if name is None:
        return None
    data = _text(source.get("data"))
    return f"{name} {version or '?'}" + (f" ({data})" if data else "")


# ------------------------------------------------------------------ summaries


def summary_from_document(
    doc: Mapping[str, Any],
    framework: str,
    *,
    run_id: str | None = None,
    window: tuple[datetime, datetime] | None = None,
) -> RunSummary:
    """A run's summary from its metrics.json (any schema in the field; never raises).

    Token figures come from the reconciliation block of a verified/ambiguous run: its
    totals, else its last attempt with totals, else `aggregate_metrics` (which such a run's
    reconciler wrote). Other runs carry none. The cost, breakdown and local-vs-provider
    verdict come from the block's `cost`, `token_breakdown` and `local_vs_provider` keys.
    """
    block = _mapping(doc.get(BLOCK))
    status = (parse_status(block.get("verification_status")) or Status.PENDING).value
    name = doc.get("run_id")
    rid = name if isinstance(name, str) and name else (run_id or "?")
    attempt = _last_attempt(block)

    tokens_in = tokens_out = cached = calls = apportioned = None
    if status in SETTLED:
        agg = _mapping(doc.get("aggregate_metrics"))
        breakdown_input = _mapping(
            _mapping(_mapping(block.get("token_breakdown")).get("total")).get("input")
        )
        tokens_in = _first(
            block.get("total_tokens_in"), attempt.get("total_tokens_in"), agg.get("TOK_IN")
        )
        tokens_out = _first(
            block.get("total_tokens_out"), attempt.get("total_tokens_out"), agg.get("TOK_OUT")
        )
        provider = _mapping(block.get("provenance")).get("provider")
        # A provider that counts no requests (Anthropic): the file's API_CALLS is the
        # framework's, not the provider's, and no count is shown rather than a 0.
        if not isinstance(provider, str) or counts_requests(provider):
            calls = _first(
                block.get("total_api_calls"), attempt.get("total_api_calls"), agg.get("API_CALLS")
            )
        cached = _first(
            breakdown_input.get("cached"),
            block.get("total_cached_tokens"),
            attempt.get("total_cached_tokens"),
            agg.get("CACHED_TOKENS"),
        )
        shared = _mapping(_mapping(block.get("attribution")).get("apportioned"))
        if shared:
            apportioned = (_int(shared.get("input_tokens")) or 0) + (
                _int(shared.get("output_tokens")) or 0
            )

    cost_block = _mapping(block.get("cost"))
    cost = _decimal(cost_block.get("total_usd_exact"))
    if cost is None:
        cost = _decimal(cost_block.get("total_usd"))
    complete = cost_block.get("complete") is not False
    unpriced = tuple(sorted(str(m) for m in _mapping(cost_block.get("unpriced"))))
    if not complete and not unpriced and cost_block:
        unpriced = (UNKNOWN_MODEL,)  # incomplete all the same: not a cost

    verdict = _mapping(block.get("local_vs_provider")).get("verdict")
    models: list[str] = []
    for source in (
        _mapping(block.get("token_breakdown")).get("models"),
        _mapping(block.get("attribution")).get("models"),
    ):
        if isinstance(source, Mapping) and source:
            models = sorted(str(m) for m in source)
            break
    if not models and isinstance(doc.get("model"), str):
        models = [doc["model"]]

    provenance = _mapping(block.get("provenance"))
    tool = _text(provenance.get("tool"))
    return RunSummary(
        framework=framework,
        run_id=rid,
        status=status,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        cached_tokens=cached,
        api_calls=calls,
        cost_usd=cost,
        cost_complete=complete,
        run_end=_run_end(doc),
        verified_at=_when(block.get("verified_at")),
        local_vs_provider=str(verdict) if isinstance(verdict, str) else None,
        models=tuple(models),
        unpriced_models=unpriced,
        apportioned_tokens=apportioned,
        message=_text(block.get("verification_message")),
        price_source=_price_source(cost_block),
        priced_at=_when(cost_block.get("priced_at")),
        settled_by=None if tool is None else f"{tool} {_text(provenance.get('version')) or '?'}",
        endpoint=_text(provenance.get("endpoint")),
        provider=_text(provenance.get("provider")),
        window=window or _query_window(attempt),
    )


def unreadable(framework: str, run_id: str, reason: str, *, skipped: bool = False) -> RunSummary:
    """A file `list` shows as `error` (or `skipped`, when discovery refused it)."""
    return RunSummary(framework, run_id, "skipped" if skipped else "error", message=reason)


def summary_of_record(
    record: RunRecord, raw: bytes, *, now: datetime | None = None, max_age: timedelta | None = None
) -> RunSummary:
    """The summary of a parsed run, with the state `list` gives it at `now`."""
    window = record.window
    summary = summary_from_document(
        load_document(raw),
        record.framework,
        run_id=record.run_id,
        window=(
            datetime.fromtimestamp(window.start, UTC),
            datetime.fromtimestamp(window.end, UTC),
        ),
    )
    state = (
        shown_state(record, now, max_age)
        if now is not None and max_age is not None
        else (record.status or Status.PENDING).value
    )
    return replace(summary, status=state, run_id=record.run_id, run_end=record.end)


def summary_of_file(
    raw: bytes,
    path: Path,
    framework: str,
    *,
    grace: int,
    now: datetime | None = None,
    max_age: timedelta | None = None,
) -> RunSummary:
    """The summary of one run file's bytes, with the status `list` gives it at `now`."""
    try:
        record = parse_run(raw, path, framework, grace)
    except RunFileError as exc:
        return unreadable(framework, path.parent.name, str(exc))
    return summary_of_record(record, raw, now=now, max_age=max_age)

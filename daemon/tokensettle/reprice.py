"""`tokensettle reprice`: price settled runs again, show the differences, then write.

Runs tokensettle settled carry their per-model usage in the block (`attribution.models`);
those are priced exactly. Runs settled by other tools carry only totals: they are priced
from the run's configured `model` and the aggregate counts, and the block says so. Files
are rewritten through the same atomic compare-and-swap as everything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from tokensettle.atomic import ConflictError, UnsafeFileError, check_inside, read_snapshot, rewrite
from tokensettle.discovery import Found
from tokensettle.pricing import RunCost, price_models
from tokensettle.runfile import (
    BLOCK,
    RunFileError,
    RunRecord,
    detect_style,
    load_document,
    parse_run,
)
from tokensettle.stability import WRITES_TOKENS
from tokensettle.usage import ANTHROPIC, OPENAI, PROVIDERS, Usage, is_claude


@dataclass(frozen=True)
class Repriced:
    path: Path
    framework: str
    run_id: str
    old_usd: Decimal | None
    new: RunCost | None
    basis: str
    note: str = ""
    written: bool = False

    @property
    def new_usd(self) -> Decimal | None:
        return self.new.total_usd if self.new is not None and self.new.complete else None

    @property
    def changed(self) -> bool:
        return self.new_usd is not None and self.new_usd != self.old_usd


def _old_cost(doc: Mapping[str, Any]) -> Decimal | None:
    block = doc.get(BLOCK)
    cost = block.get("cost") if isinstance(block, dict) else None
    if isinstance(cost, dict) and isinstance(cost.get("total_usd_exact"), str):
        return Decimal(cost["total_usd_exact"])
    agg = doc.get("aggregate_metrics")
    value = agg.get("COST_USD") if isinstance(agg, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(str(value))
    return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def provider_of(doc: Mapping[str, Any], record: RunRecord) -> str:
    """Whose price table: the provider the run was settled against (its provenance); for a
    file settled before providers were recorded, Anthropic's for a Claude model."""
    block = doc.get(BLOCK)
    provenance = block.get("provenance") if isinstance(block, dict) else None
    named = provenance.get("provider") if isinstance(provenance, dict) else None
    if named in PROVIDERS:
        return str(named)
    return ANTHROPIC if is_claude(record.model) else OPENAI


def usage_by_model(
    doc: Mapping[str, Any], record: RunRecord, assume_model: str | None = None
) -> tuple[dict[str, Usage], str]:
    """Per-model usage to price, and what it is based on. `assume_model` prices runs that
    record no model (the user says which one their framework used)."""
    block = doc.get(BLOCK)
    attribution = block.get("attribution") if isinstance(block, dict) else None
    models = attribution.get("models") if isinstance(attribution, dict) else None
    if isinstance(models, dict) and models:
        return {
            name: Usage.from_fields({k: v for k, v in fields.items() if isinstance(v, int)})
            for name, fields in models.items()
            if isinstance(fields, dict)
        }, "usage per model"
    agg = doc.get("aggregate_metrics")
    model = record.model or assume_model
    if model is None or not isinstance(agg, dict):
        return {}, "no model recorded (use --model)"
    usage = Usage(
        input_tokens=_int(agg.get("TOK_IN")),
        output_tokens=_int(agg.get("TOK_OUT")),
        num_model_requests=_int(agg.get("API_CALLS")),
        input_cached_tokens=_int(agg.get("CACHED_TOKENS")),
    )
    basis = "configured model" if record.model else "--model"
    return {model: usage}, f"{basis} and aggregate counts"


def plan(doc: Mapping[str, Any], record: RunRecord, assume_model: str | None = None) -> Repriced:
    """Pure: the new cost of one settled run (None when it cannot be priced)."""
    models, basis = usage_by_model(doc, record, assume_model)
    old = _old_cost(doc)
    if not models:
        return Repriced(record.path, record.framework, record.run_id, old, None, basis, basis)
    cost = price_models(models, record.start, provider_id=provider_of(doc, record))
    note = "" if cost.complete else "; ".join(u.reason for u in cost.unpriced.values())
    return Repriced(record.path, record.framework, record.run_id, old, cost, basis, note)


def apply(doc: Mapping[str, Any], result: Repriced) -> dict[str, Any]:
    """Pure: `doc` with the new cost in the block, COST_USD and cost_breakdown."""
    out = dict(doc)
    cost = result.new
    if cost is None:
        return out
    block = dict(out.get(BLOCK) or {})
    block["cost"] = {**cost.to_json(), "basis": result.basis}
    out[BLOCK] = block
    agg = out.get("aggregate_metrics")
    value = cost.cost_usd_value()
    if value is not None and isinstance(agg, dict) and "COST_USD" in agg:
        out["aggregate_metrics"] = {**agg, "COST_USD": value}
    breakdown = cost.seed_cost_breakdown()
    if breakdown is not None and isinstance(out.get("cost_breakdown"), dict):
        out["cost_breakdown"] = {**out["cost_breakdown"], **breakdown}
    return out


def reprice_runs(
    found: list[Found], grace: int, *, dry_run: bool, assume_model: str | None = None
) -> list[Repriced]:
    """Price every settled run of `found`; write the changed ones unless `dry_run`."""
    results: list[Repriced] = []
    for item in found:
        if item.skip_reason is not None:
            continue
        try:
            check_inside(item.path, item.root)
            snap = read_snapshot(item.path)
            record = parse_run(snap.raw, item.path, item.framework, grace)
        except (RunFileError, UnsafeFileError, OSError):
            continue
        if record.status not in WRITES_TOKENS:
            continue
        result = plan(load_document(snap.raw), record, assume_model)
        if dry_run or not result.changed:
            results.append(result)
            continue

        def transform(raw: bytes, result: Repriced = result) -> bytes | None:
            try:
                doc = load_document(raw)
            except RunFileError:
                return None
            return detect_style(raw).dumps(apply(doc, result))

        try:
            written = rewrite(item.path, transform, first=snap).written
        except (ConflictError, OSError):
            written = False
        results.append(Repriced(**{**result.__dict__, "written": written}))
    return results

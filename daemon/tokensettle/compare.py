"""Local vs provider: were the framework's own counts right? Pure.

Input: the counts a run file carried *before* reconciliation (`aggregate_metrics.TOK_IN`,
`TOK_OUT`, `API_CALLS`, `COST_USD`), and the provider's (Usage API totals, and the cost
priced from them). Output: per field the local and provider values, the difference and the
relative difference, and a verdict against a tolerance.

Rules (they are the documented behaviour):

* A local value of 0, or a missing field, means "not counted locally" (the seed writes 0 at
  run end and only reconciliation fills the true numbers): the field is not compared.
* A local count that is negative, not an integer (1.5, "12", true), not finite, or a cost
  that is negative or not a number, is *invalid*: it is listed with a message and excluded.
  An integer-valued float (12.0) is accepted as 12.
* `diff = local - provider` (positive: the framework counted more than the provider saw).
  `diff_pct = 100 * diff / provider`, relative to the provider's value.
* Provider value 0 (and a non-zero local value): the relative difference is undefined, so
  `diff_pct` is null and the field is outside any tolerance (the framework counted usage the
  provider never saw). A provider cost that is unknown (model not priced) is not compared.
* Verdict: `invalid_local_counts` if any local field is invalid (the valid ones are still
  compared and shown); else `no_local_counts` if no field could be compared; else `match`
  if every compared field is within the tolerance (|diff| <= tolerance * provider, exact
  arithmetic), else `mismatch`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Literal

from tokensettle.usage import Usage

DEFAULT_TOLERANCE = 0.05
COUNT_FIELDS: tuple[str, ...] = ("TOK_IN", "TOK_OUT", "API_CALLS")
COST_FIELD = "COST_USD"
FIELDS: tuple[str, ...] = (*COUNT_FIELDS, COST_FIELD)
BLOCK = "usage_api_reconciliation"
BLOCK_KEY = "local_vs_provider"

Verdict = Literal["match", "mismatch", "no_local_counts", "invalid_local_counts"]
Number = int | Decimal


@dataclass(frozen=True, slots=True)
class Invalid:
    field: str
    value: object
    reason: str

    def to_json(self) -> dict[str, Any]:
        value = self.value
        if not (value is None or isinstance(value, bool | int | float | str)):
            value = repr(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = repr(value)  # JSON has no NaN/Infinity
        return {"field": self.field, "value": value, "reason": self.reason}


@dataclass(frozen=True)
class LocalCounts:
    """What the file counted itself: valid non-zero values, and what was refused."""

    values: Mapping[str, Number] = field(default_factory=dict)
    invalid: tuple[Invalid, ...] = ()
    not_counted: tuple[str, ...] = ()
    #: where they were read from, and why none could be (if so)
    source: str = "aggregate_metrics"
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in self.values.items()}


def _json_number(value: Number) -> int | float:
    return value if isinstance(value, int) else float(value)


def _count(name: str, raw: object) -> tuple[int | None, Invalid | None]:
    if isinstance(raw, bool):
        return None, Invalid(name, raw, f"{name} is a boolean, expected a non-negative integer")
    if isinstance(raw, float):
        if not math.isfinite(raw):
            return None, Invalid(name, raw, f"{name} is {raw}, expected a non-negative integer")
        if not raw.is_integer():
            return None, Invalid(name, raw, f"{name} is {raw}, not a whole number of tokens")
        raw = int(raw)
    if not isinstance(raw, int):
        kind = type(raw).__name__
        return None, Invalid(name, raw, f"{name} is a {kind}, expected a non-negative integer")
    if raw < 0:
        return None, Invalid(name, raw, f"{name} is negative ({raw})")
    return raw, None


def _cost(raw: object) -> tuple[Decimal | None, Invalid | None]:
    name = COST_FIELD
    if isinstance(raw, bool) or not isinstance(raw, int | float | Decimal):
        kind = type(raw).__name__
        return None, Invalid(name, raw, f"{name} is a {kind}, expected a non-negative number")
    try:
        # repr() keeps what the JSON said (0.1 stays 0.1, not its binary expansion)
        value = raw if isinstance(raw, Decimal) else Decimal(repr(raw))
    except InvalidOperation:  # pragma: no cover - repr of an int/float always parses
        return None, Invalid(name, raw, f"{name} is not a number")
    if not value.is_finite():
        return None, Invalid(name, raw, f"{name} is {raw}, expected a non-negative number")
    if value < 0:
        return None, Invalid(name, raw, f"{name} is negative ({raw})")
    return value, None


def local_counts(aggregate: Mapping[str, Any] | None) -> LocalCounts:
    """Read and validate local counts from an `aggregate_metrics` mapping."""
    if not isinstance(aggregate, Mapping):
        return LocalCounts(not_counted=FIELDS, note="the file has no aggregate_metrics")
    values: dict[str, Number] = {}
    invalid: list[Invalid] = []
    not_counted: list[str] = []
    for name in FIELDS:
        raw = aggregate.get(name)
        if raw is None:
            not_counted.append(name)
            continue
        value: Number | None
        value, problem = _cost(raw) if name == COST_FIELD else _count(name, raw)
        if problem is not None:
            invalid.append(problem)
        elif value is None or value == 0:
            not_counted.append(name)
        else:
            values[name] = value
    return LocalCounts(values, tuple(invalid), tuple(not_counted))


_WRITES_TOKENS = ("verified", "ambiguous")


def local_counts_from_document(doc: Mapping[str, Any], *, tool: str = "tokensettle") -> LocalCounts:
    """The local counts of a metrics.json, wherever they still are.

    1. Kept in our block (`usage_api_reconciliation.local_vs_provider.local`): those, since
       `aggregate_metrics` then holds the provider's numbers.
    2. Our own block, not yet verified/ambiguous: `aggregate_metrics` is untouched, so local.
    3. The seed tool's block with recorded attempts: it overwrote `aggregate_metrics` on every
       attempt, so the local counts are gone (`no_local_counts`, with that reason).
    4. No block (or no attempts): `aggregate_metrics` is what the framework wrote.
    """
    block = doc.get(BLOCK)
    aggregate = doc.get("aggregate_metrics")
    if not isinstance(block, Mapping):
        return local_counts(aggregate if isinstance(aggregate, Mapping) else None)
    kept = block.get(BLOCK_KEY)
    if isinstance(kept, Mapping) and isinstance(kept.get("local"), Mapping):
        found = local_counts(kept["local"])
        return LocalCounts(
            found.values, found.invalid, found.not_counted, source=f"{BLOCK}.{BLOCK_KEY}.local"
        )
    provenance = block.get("provenance")
    ours = isinstance(provenance, Mapping) and provenance.get("tool") == tool
    status = block.get("verification_status")
    if ours:
        if status in _WRITES_TOKENS:
            return LocalCounts(
                not_counted=FIELDS,
                source="none",
                note=f"aggregate_metrics already holds the provider's counts ({status}) and "
                "no local counts were kept",
            )
        return local_counts(aggregate if isinstance(aggregate, Mapping) else None)
    attempts = block.get("attempts")
    if isinstance(attempts, list) and any(
        isinstance(a, Mapping) and a.get("total_tokens_in") is not None for a in attempts
    ):
        return LocalCounts(
            not_counted=FIELDS,
            source="none",
            note="an earlier reconciler overwrote aggregate_metrics with its own Usage API "
            "counts; the framework's local counts are lost",
        )
    return local_counts(aggregate if isinstance(aggregate, Mapping) else None)


@dataclass(frozen=True, slots=True)
class FieldDiff:
    field: str
    local: Number
    provider: Number
    tolerance: float

    @property
    def diff(self) -> Number:
        return self.local - self.provider

    @property
    def relative(self) -> Fraction | None:
        if self.provider == 0:
            return None
        return Fraction(self.diff) / Fraction(self.provider)

    @property
    def within(self) -> bool:
        rel = self.relative
        if rel is None:
            return self.local == self.provider
        return abs(rel) <= Fraction(str(self.tolerance))  # 0.05 as 1/20, not its binary value

    def to_json(self) -> dict[str, Any]:
        rel = self.relative
        return {
            "local": _json_number(self.local),
            "provider": _json_number(self.provider),
            "diff": _json_number(self.diff),
            "diff_pct": None if rel is None else round(float(rel * 100), 3),
            "within_tolerance": self.within,
        }


@dataclass(frozen=True)
class Comparison:
    verdict: Verdict
    tolerance: float
    local: LocalCounts
    provider: Mapping[str, Number]
    fields: tuple[FieldDiff, ...]
    not_compared: Mapping[str, str]
    message: str

    def to_json(self) -> dict[str, Any]:
        """The `local_vs_provider` block."""
        return {
            "verdict": self.verdict,
            "tolerance": self.tolerance,
            "message": self.message,
            "local": self.local.to_json(),
            "local_source": self.local.source,
            "provider": {k: _json_number(v) for k, v in self.provider.items()},
            "fields": {d.field: d.to_json() for d in self.fields},
            "not_compared": dict(self.not_compared),
            "invalid": [i.to_json() for i in self.local.invalid],
        }


def _check_tolerance(tolerance: float) -> None:
    if isinstance(tolerance, bool) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")


def _describe(d: FieldDiff) -> str:
    rel = d.relative
    if rel is None:
        return f"{d.field}: local {d.local} where the provider has 0"
    direction = "above" if rel > 0 else "below"
    pct = abs(float(rel)) * 100
    return f"{d.field}: local {d.local} is {pct:.1f}% {direction} the provider's {d.provider}"


def compare(
    local: LocalCounts,
    provider: Usage,
    provider_cost_usd: Decimal | None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Comparison:
    """Compare local counts with the provider's usage (and cost, None if unpriced)."""
    _check_tolerance(tolerance)
    theirs: dict[str, Number] = {
        "TOK_IN": provider.input_tokens,
        "TOK_OUT": provider.output_tokens,
        "API_CALLS": provider.num_model_requests,
    }
    if provider_cost_usd is not None:
        theirs[COST_FIELD] = provider_cost_usd
    diffs: list[FieldDiff] = []
    not_compared: dict[str, str] = {}
    for name in FIELDS:
        if name in local.values:
            if name not in theirs:
                not_compared[name] = "the provider's cost is unknown (a model is not priced)"
                continue
            diffs.append(FieldDiff(name, local.values[name], theirs[name], tolerance))
        elif name in local.not_counted:
            not_compared[name] = "not counted locally (0 or absent)"
    for bad in local.invalid:
        not_compared[bad.field] = f"invalid local value: {bad.reason}"

    outside = [d for d in diffs if not d.within]
    verdict: Verdict
    if local.invalid:
        verdict = "invalid_local_counts"
        message = "invalid local counts: " + "; ".join(i.reason for i in local.invalid)
    elif not diffs:
        verdict = "no_local_counts"
        message = local.note or "the file carried no non-zero local counts to compare"
    elif outside:
        verdict = "mismatch"
        message = "; ".join(_describe(d) for d in outside)
    else:
        verdict = "match"
        message = f"local counts within {tolerance * 100:g}% of the provider's"
    return Comparison(
        verdict=verdict,
        tolerance=tolerance,
        local=local,
        provider=theirs,
        fields=tuple(diffs),
        not_compared=not_compared,
        message=message,
    )

"""What a run's usage cost, at the run's own prices, from the genai-prices table.

Pure: no file, network or clock access. The price table is the one bundled with the installed
genai-prices package (its version is recorded with every price); nothing here starts
genai-prices' background updater, but a snapshot someone else installed with it is used and
reported as such.

* The model is the **snapshot name from the usage data** ("gpt-4o-mini-2024-07-18"). The table
  matches most snapshots itself; one it does not know is looked up again as its base model
  ("gpt-4o-mini") and the result says so (`matched == "base_model"`), since a snapshot's
  price can differ from its alias's.
* Prices are those in force **at** the time passed in (the run's time): genai-prices keeps
  dated price histories (e.g. o3's cut on 2025-06-10) and picks the one active then.
* Usage fields map onto genai-prices' usage keys as follows. genai-prices' keys form a
  hierarchy in which a key *includes* its more specific descendants (`input_tokens` includes
  `cache_read_tokens`, `input_audio_tokens` includes `cache_audio_read_tokens`), and the
  library prices each token at the most specific price the model has:

  =========================  ===============================================================
  genai-prices               from our Usage (the normalised schema, `usage` module)
  =========================  ===============================================================
  input_tokens               input_tokens (already includes cached and cache-write tokens)
  cache_read_tokens          input_cached_tokens
  cache_write_tokens         input_cache_write_tokens
  cache_write_5m_tokens      input_cache_write_5m_tokens (Anthropic)
  cache_write_1h_tokens      input_cache_write_1h_tokens (Anthropic)
  output_tokens              output_tokens
  input_<m>_tokens           input_<m>_tokens + input_cached_<m>_tokens (m = text/audio/image;
                             OpenAI's per-modality input fields are *uncached* only)
  cache_<m>_read_tokens      input_cached_<m>_tokens
  output_<m>_tokens          output_<m>_tokens
  web_searches               web_search_requests (Anthropic's server tool; priced per 1,000)
  =========================  ===============================================================

  Absent optional fields are not passed (genai-prices then treats them as 0, or refuses when
  the model prices a split the data does not carry, which gives `Unpriced`). Claude models
  price cache writes kept 1 hour above those kept 5 minutes; the table gives the 5-minute
  price as the plain cache-write price, which genai-prices applies to the writes left once
  the 1-hour ones are priced.
* The provider (`provider_id`, "openai" by default, "anthropic" for Claude) selects the
  table the model is looked up in: the scope's provider, never a guess from the name.
* Standard tier unless told: a run's usage rows are not grouped by `service_tier`/`batch`,
  so a run is priced at standard prices. The bill check's daily rows are, and pass a
  *price context* (`price_context(service_tier, batch)`: `{"processing": "batch"}`,
  `{"service_tier": "flex"}`, ...), which selects genai-prices' price variants. A context
  no variant of the model prices (batch usage of a model the table has no batch price for)
  is `Unpriced` (`no_variant_price`), never the standard price.
* The Usage API sums many requests. Prices that depend on one request's size (tiers above a
  prompt length) are exact only when the whole usage stays below the first tier or is one
  request; otherwise the model is `Unpriced` rather than priced at a guessed tier. The same
  holds for per-request prices. Usage that counts no requests (Anthropic's) is exact below
  the first tier only: no request can have passed it; above it, which did is unknown.

A model the table does not know, or usage it cannot price, is `Unpriced(model, reason)`:
never a zero price.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

import genai_prices
from genai_prices.data_units import unit_data
from genai_prices.decompose import compute_leaf_values
from genai_prices.types import (
    ModelInfo,
    ModelPrice,
    PriceCalculation,
    StartDateConstraint,
    TieredPrices,
    TimeOfDateConstraint,
    calc_unit_price,
)
from genai_prices.units import UnitDef, UnitRegistry

from tokensettle.breakdown import NO_MODEL, base_model, usage_problems
from tokensettle.usage import Usage

PRICE_SOURCE = "genai-prices"
PRICE_SOURCE_VERSION: str = genai_prices.__version__
DEFAULT_PROVIDER = "openai"
MTOK = 1_000_000

UnpricedKind = Literal[
    "unknown_model",
    "invalid_usage",
    "tiered_price",
    "per_request_price",
    "no_model",
    "no_variant_price",
]
#: The service tier whose prices are the table's standard ones.
STANDARD_TIER = "default"

_REGISTRY = UnitRegistry(unit_data)
_UNIT_BY_DIMENSIONS: dict[frozenset[tuple[str, str]], UnitDef] = {
    frozenset(u.dimensions.items()): u for u in _REGISTRY.units.values()
}
#: genai-prices usage key -> component name in our output
_COMPONENT_NAMES: dict[str, str] = {
    "input_tokens": "uncached_input",
    "cache_read_tokens": "cached_input",
    "cache_write_tokens": "cache_write",
    "output_tokens": "output",
    "requests": "requests",
    "web_searches": "web_search",
}
#: components shown even when zero (the ones the seed's cost_breakdown has)
_ALWAYS_SHOWN = frozenset({"uncached_input", "cached_input", "output"})


def _component_name(usage_key: str) -> str:
    if usage_key in _COMPONENT_NAMES:
        return _COMPONENT_NAMES[usage_key]
    # cache_audio_read_tokens -> cached_input_audio, input_audio_tokens -> input_audio, ...
    key = usage_key.removesuffix("_tokens")
    for modality in ("text", "audio", "image", "video"):
        if key == f"cache_{modality}_read":
            return f"cached_input_{modality}"
        if key == f"cache_{modality}_write":
            return f"cache_write_{modality}"
    return key


def decimal_text(value: Decimal) -> str:
    """A Decimal as plain text without exponent or trailing zeros ("0.0054939")."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _money(value: Decimal) -> float:
    """JSON number for an exact amount: one rounding, at the very end."""
    return float(value)


# ------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class Component:
    """One priced part of a usage: `count` units at `unit_price` USD per `per` units."""

    name: str
    usage_key: str
    count: int
    unit_price: Decimal
    per: int
    usd: Decimal

    def to_json(self) -> dict[str, Any]:
        if self.per == MTOK:
            return {
                "tokens": self.count,
                "usd_per_mtok": _money(self.unit_price),
                "usd": _money(self.usd),
            }
        return {
            "count": self.count,
            "usd_per": _money(self.unit_price),
            "per": self.per,
            "usd": _money(self.usd),
        }


@dataclass(frozen=True)
class Priced:
    """A model's usage priced by genai-prices. Amounts are exact Decimals (USD)."""

    model: str
    priced_as: str
    lookup: str
    matched: Literal["table", "base_model"]
    provider: str
    at: datetime
    total_usd: Decimal
    input_usd: Decimal
    output_usd: Decimal
    components: tuple[Component, ...]
    cache_savings_usd: Decimal
    effective_from: date | None
    effective_until: date | None
    notes: tuple[str, ...] = ()
    source: str = PRICE_SOURCE
    source_version: str = PRICE_SOURCE_VERSION
    #: "bundled" (the table shipped with the package) or when an auto-update fetched it
    data_snapshot: str = "bundled"
    #: The price context the variants were chosen by (empty: standard prices)
    context: tuple[tuple[str, str], ...] = ()

    def component(self, name: str) -> Decimal:
        return sum((c.usd for c in self.components if c.name == name), Decimal(0))

    def to_json(self) -> dict[str, Any]:
        return {
            "priced_as": self.priced_as,
            "matched": self.matched,
            "total_usd": _money(self.total_usd),
            "total_usd_exact": decimal_text(self.total_usd),
            "components": {c.name: c.to_json() for c in self.components},
            "cache_savings_usd": _money(self.cache_savings_usd),
            "price_effective_from": self.effective_from.isoformat()
            if self.effective_from
            else None,
            "price_effective_until": self.effective_until.isoformat()
            if self.effective_until
            else None,
            "notes": list(self.notes),
            **({"price_context": dict(self.context)} if self.context else {}),
        }


@dataclass(frozen=True, slots=True)
class Unpriced:
    """A model whose usage could not be priced, and why. Never a zero price."""

    model: str
    reason: str
    kind: UnpricedKind = "unknown_model"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason}


# ------------------------------------------------------------------ pricing one model


def genai_usage_values(usage: Usage) -> dict[str, int]:
    """Our Usage as genai-prices usage keys (see the module docstring's table)."""
    values: dict[str, int] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
    }
    if usage.input_cached_tokens is not None:
        values["cache_read_tokens"] = usage.input_cached_tokens
    if usage.input_cache_write_tokens is not None:
        values["cache_write_tokens"] = usage.input_cache_write_tokens
    if usage.input_cache_write_5m_tokens is not None:
        values["cache_write_5m_tokens"] = usage.input_cache_write_5m_tokens
    if usage.input_cache_write_1h_tokens is not None:
        values["cache_write_1h_tokens"] = usage.input_cache_write_1h_tokens
    if usage.web_search_requests is not None:
        values["web_searches"] = usage.web_search_requests
    for modality in ("text", "audio", "image"):
        uncached: int | None = getattr(usage, f"input_{modality}_tokens")
        cached: int | None = getattr(usage, f"input_cached_{modality}_tokens")
        output: int | None = getattr(usage, f"output_{modality}_tokens")
        if uncached is not None or cached is not None:
            values[f"input_{modality}_tokens"] = (uncached or 0) + (cached or 0)
        if cached is not None:
            values[f"cache_{modality}_read_tokens"] = cached
        if output is not None:
            values[f"output_{modality}_tokens"] = output
    return values


def _priced_units(model_price: ModelPrice) -> list[tuple[UnitDef, Decimal | TieredPrices]]:
    units: list[tuple[UnitDef, Decimal | TieredPrices]] = []
    # A ModelPrice keeps the prices it has in its __dict__ and answers None for every other
    # registered key through __getattr__, which costs a registry lookup per key and run.
    prices = vars(model_price)
    for unit in _REGISTRY.units.values():
        value = prices.get(unit.price_key)
        if value is not None:
            units.append((unit, value))
    return units


def _applied(price: Decimal | TieredPrices, total_input: int) -> Decimal:
    """The per-unit price genai-prices applies (its tier rule: highest tier passed)."""
    if not isinstance(price, TieredPrices):
        return price
    applied = price.base
    for tier in sorted(price.tiers, key=lambda t: t.start):
        if total_input > tier.start:
            applied = tier.price
    return applied


def _size_dependent(
    units: list[tuple[UnitDef, Decimal | TieredPrices]], usage: Usage, model: str
) -> Unpriced | None:
    """Prices genai-prices computes per request, which summed usage cannot reproduce."""
    counted = usage.requests_counted
    if usage.num_model_requests > 1 or not counted:
        starts = [
            t.start for _, p in units if isinstance(p, TieredPrices) and p.tiers for t in p.tiers
        ]
        if starts and usage.input_tokens > min(starts):
            over = (
                f"over {usage.num_model_requests:,} requests"
                if counted
                else "in usage data that counts no requests"
            )
            return Unpriced(
                model,
                f"{model} has prices tiered by prompt size (from {min(starts):,} input tokens "
                f"per request); {usage.input_tokens:,} input tokens {over} cannot tell which "
                "requests passed it",
                "tiered_price",
            )
    if (usage.num_model_requests != 1 or not counted) and any(
        u.usage_key == "requests" for u, _ in units
    ):
        holds = f"{usage.num_model_requests:,}" if counted else "an uncounted number"
        return Unpriced(
            model,
            f"{model} has a per-request price, which genai-prices applies to one request; "
            f"the usage holds {holds}",
            "per_request_price",
        )
    return None


def _effective(
    model: ModelInfo, chosen: ModelPrice, at: datetime
) -> tuple[date | None, date | None, list[str]]:
    """When the chosen price took effect and until when it held, from the table's history."""
    if isinstance(model.prices, ModelPrice):
        return None, None, []
    notes: list[str] = []
    history = model.prices
    index = next((i for i, c in enumerate(history) if c.prices is chosen), None)
    if index is None:  # a price variant replaced it; the history no longer applies
        return None, None, []
    constraint = history[index].constraint
    start = constraint.start_date if isinstance(constraint, StartDateConstraint) else None
    if isinstance(constraint, TimeOfDateConstraint):
        notes.append(
            f"time-of-day price ({constraint.start_time}-{constraint.end_time} UTC) "
            f"in force at {at.isoformat()}"
        )
    later = [
        c.constraint.start_date
        for c in history
        if isinstance(c.constraint, StartDateConstraint)
        and c.constraint.start_date > (start or date.min)
    ]
    until = min(later) if later else None
    if start is not None and at.astimezone(UTC).date() < start:
        notes.append(
            f"the table has no price for {model.id} before {start.isoformat()}; "
            "priced at the earliest one it has"
        )
    return start, until, notes


def _components(
    calc: PriceCalculation, gp_usage: genai_prices.Usage, usage: Usage
) -> tuple[list[Component], Decimal]:
    """Split genai-prices' total into priced parts, with genai-prices' own decomposition."""
    units = _priced_units(calc.model_price)
    by_key = {u.usage_key: u for u, _ in units if u.usage_key != "requests"}
    leaves = compute_leaf_values(set(by_key), gp_usage, by_key)
    total_input = usage.input_tokens
    components: list[Component] = []
    savings = Decimal(0)
    for unit, price in units:
        count = 1 if unit.usage_key == "requests" else leaves.get(unit.usage_key, 0)
        usd = calc_unit_price(price, count, total_input, unit.per)
        name = _component_name(unit.usage_key)
        if count or name in _ALWAYS_SHOWN:
            components.append(
                Component(
                    name, unit.usage_key, int(count), _applied(price, total_input), unit.per, usd
                )
            )
        if unit.dimensions.get("token_type") == "cache_read" and count:
            plain = _uncached_counterpart(unit, by_key)
            plain_price = next(p for u, p in units if u is plain)
            savings += calc_unit_price(plain_price, count, total_input, plain.per) - usd
    # inputs before outputs, each in the table's unit order
    components.sort(
        key=lambda c: _REGISTRY.units[c.usage_key].dimensions.get("direction") != "input"
    )
    return components, savings


def _uncached_counterpart(unit: UnitDef, priced: Mapping[str, UnitDef]) -> UnitDef:
    """The price a cached token would have had uncached: same modality, else plain input."""
    dims = {k: v for k, v in unit.dimensions.items() if k not in ("token_type", "cache_ttl")}
    for candidate in (dims, {k: v for k, v in dims.items() if k != "modality"}):
        found = _UNIT_BY_DIMENSIONS.get(frozenset(candidate.items()))
        if found is not None and found.usage_key in priced:
            return found
    return priced["input_tokens"]


def price_context(service_tier: str | None, batch: bool | None) -> dict[str, str]:
    """The genai-prices price context of usage in `service_tier` (None or "default": the
    standard prices) and, when `batch`, of the Batch API."""
    context: dict[str, str] = {}
    if batch:
        context["processing"] = "batch"
    if service_tier is not None and service_tier != STANDARD_TIER:
        context["service_tier"] = service_tier
    return context


def _context_words(key: str, value: str) -> str:
    if key == "processing" and value == "batch":
        return "batch"
    if key == "service_tier":
        return f"service tier {value!r}"
    return f"{key}={value!r}"


def _unvaried(calc: PriceCalculation, context: Mapping[str, str], at: datetime) -> list[str]:
    """The parts of `context` no price variant of the chosen model prices at `at` (genai-prices
    then silently keeps the standard price for them)."""
    if not any(calc.model is m for m in calc.provider.models):
        # a model borrowed from another provider's table: genai-prices ignores the context
        return [_context_words(k, v) for k, v in sorted(context.items())]
    missing: list[str] = []
    for key, value in sorted(context.items()):
        covered = any(
            variant.when.get(key) == value
            and all(context.get(k) == v for k, v in variant.when.items())
            and (variant.constraint is None or variant.constraint.active(at))
            for variant in calc.model.price_variants or ()
        )
        if not covered:
            missing.append(_context_words(key, value))
    return missing


def _lookup(
    usage_values: dict[str, int],
    name: str,
    provider_id: str,
    at: datetime,
    context: Mapping[str, str] | None = None,
) -> PriceCalculation:
    return genai_prices.calc_price(
        genai_prices.Usage(**usage_values),
        name,
        provider_id=provider_id,
        genai_request_timestamp=at,
        price_context=context or None,
    )


def _require_aware(at: datetime) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("price time must be timezone-aware (prices change at UTC midnight)")


def price(
    model: str,
    usage: Usage,
    at: datetime,
    *,
    provider_id: str = DEFAULT_PROVIDER,
    context: Mapping[str, str] | None = None,
) -> Priced | Unpriced:
    """Price `usage` of `model` (a snapshot name from usage data) at the prices of `at`, in
    the price `context` (`price_context(...)`; none: standard prices)."""
    context = dict(context or {})
    _require_aware(at)
    problems = usage_problems(usage)
    if problems:
        return Unpriced(
            model, "cannot price inconsistent usage: " + "; ".join(problems), "invalid_usage"
        )
    values = genai_usage_values(usage)
    lookup = model
    matched: Literal["table", "base_model"] = "table"
    notes: list[str] = []
    try:
        calc = _lookup(values, model, provider_id, at, context)
    except LookupError as first:
        base = base_model(model)
        if base is None:
            return Unpriced(model, f"genai-prices {PRICE_SOURCE_VERSION}: {first}")
        try:
            calc = _lookup(values, base, provider_id, at, context)
        except LookupError as second:
            return Unpriced(
                model,
                f"genai-prices {PRICE_SOURCE_VERSION}: {first}; nor its base model: {second}",
            )
        except ValueError as exc:
            return Unpriced(model, f"genai-prices refused the usage: {exc}", "invalid_usage")
        lookup, matched = base, "base_model"
        notes.append(
            f"genai-prices has no entry for snapshot {model!r}; priced as its base model "
            f"{base!r} (a snapshot's price can differ from its alias's)"
        )
    except ValueError as exc:
        return Unpriced(model, f"genai-prices refused the usage: {exc}", "invalid_usage")

    unvaried = _unvaried(calc, context, at) if context else []
    if unvaried:
        return Unpriced(
            model,
            f"genai-prices {PRICE_SOURCE_VERSION} has no {' or '.join(unvaried)} price for "
            f"{calc.model.id}; the standard price would be a guess",
            "no_variant_price",
        )
    size_problem = _size_dependent(_priced_units(calc.model_price), usage, model)
    if size_problem is not None:
        return size_problem
    gp_usage = genai_prices.Usage(**values)
    components, savings = _components(calc, gp_usage, usage)
    parts = sum((c.usd for c in components), Decimal(0))
    if parts != calc.total_price:
        notes.append(
            f"components add up to {decimal_text(parts)} USD, genai-prices' total is "
            f"{decimal_text(calc.total_price)} USD; the total is genai-prices'"
        )
    # with a context, genai-prices answers a copy of the dated price it varied
    dated = calc.model.get_prices(at) if context else calc.model_price
    start, until, more = _effective(calc.model, dated, at)
    notes += more
    auto = calc.auto_update_timestamp
    return Priced(
        model=model,
        priced_as=calc.model.id,
        lookup=lookup,
        matched=matched,
        provider=calc.provider.id,
        at=at,
        total_usd=calc.total_price,
        input_usd=calc.input_price,
        output_usd=calc.output_price,
        components=tuple(components),
        cache_savings_usd=savings,
        effective_from=start,
        effective_until=until,
        notes=tuple(notes),
        data_snapshot="bundled" if auto is None else f"auto-update {auto.isoformat()}",
        context=tuple(sorted(context.items())),
    )


# ------------------------------------------------------------------ a run


@dataclass(frozen=True)
class RunCost:
    """A run's cost over every model it used. `complete` only if every model with usage
    was priced; `total_usd` is then the run's cost, else a sum over the priced models only."""

    at: datetime
    priced: Mapping[str, Priced] = field(default_factory=dict)
    unpriced: Mapping[str, Unpriced] = field(default_factory=dict)
    provider: str = DEFAULT_PROVIDER

    @property
    def complete(self) -> bool:
        return not self.unpriced

    @property
    def total_usd(self) -> Decimal:
        return sum((p.total_usd for p in self.priced.values()), Decimal(0))

    @property
    def cache_savings_usd(self) -> Decimal:
        return sum((p.cache_savings_usd for p in self.priced.values()), Decimal(0))

    def components(self) -> dict[str, Decimal]:
        out: dict[str, Decimal] = {}
        for name in sorted(self.priced):
            for c in self.priced[name].components:
                out[c.name] = out.get(c.name, Decimal(0)) + c.usd
        return out

    @property
    def data_snapshot(self) -> str:
        snapshots = sorted({p.data_snapshot for p in self.priced.values()})
        return ", ".join(snapshots) if snapshots else "bundled"

    def cost_usd_value(self) -> float | None:
        """What `aggregate_metrics.COST_USD` should hold, or None (leave it) if incomplete."""
        return _money(self.total_usd) if self.complete else None

    def seed_cost_breakdown(self) -> dict[str, Any] | None:
        """Values for the seed's `cost_breakdown` keys, or None if the cost is incomplete.

        `uncached_input_cost` is every input token not billed at a cache rate (cache-write
        and modality components included), as the seed's formula meant it; server tool
        calls (web searches) are in none of the three token costs, only in the total."""
        if not self.complete:
            return None
        comps = self.components()
        cached = comps.get("cached_input", Decimal(0))
        output = sum(
            (v for k, v in comps.items() if k == "output" or k.startswith("output_")),
            Decimal(0),
        )
        # server tool calls (web searches) are neither input nor output tokens
        tools = sum(
            (
                c.usd
                for p in self.priced.values()
                for c in p.components
                if _REGISTRY.units[c.usage_key].dimensions.get("family") == "tool_calls"
            ),
            Decimal(0),
        )
        uncached = self.total_usd - cached - output - tools
        models = sorted(self.priced)
        return {
            "uncached_input_cost": _money(uncached),
            "cached_input_cost": _money(cached),
            "output_cost": _money(output),
            "cache_savings": _money(self.cache_savings_usd),
            "model": models[0] if len(models) == 1 else ", ".join(models),
        }

    def to_json(self) -> dict[str, Any]:
        """The `cost` block."""
        total = self.total_usd
        return {
            "currency": "USD",
            "complete": self.complete,
            "total_usd": _money(total),
            "total_usd_exact": decimal_text(total),
            "components_usd": {k: _money(v) for k, v in self.components().items()},
            "cache_savings_usd": _money(self.cache_savings_usd),
            "priced_at": self.at.isoformat(),
            "source": {
                "name": PRICE_SOURCE,
                "version": PRICE_SOURCE_VERSION,
                "data": self.data_snapshot,
                "provider": self.provider,
            },
            "models": {m: p.to_json() for m, p in sorted(self.priced.items())},
            "unpriced": {m: u.to_json() for m, u in sorted(self.unpriced.items())},
        }


def price_models(
    models: Mapping[str, Usage],
    at: datetime,
    *,
    total: Usage | None = None,
    provider_id: str = DEFAULT_PROVIDER,
) -> RunCost:
    """Price each model's usage at `at`. With `total` (the run's whole usage), usage that
    no model accounts for (rows not grouped by model) is listed as unpriced. A model with
    no usage at all costs nothing whether or not the table knows it, and is not listed."""
    _require_aware(at)
    priced: dict[str, Priced] = {}
    unpriced: dict[str, Unpriced] = {}
    for name, usage in sorted(models.items()):
        result = price(name, usage, at, provider_id=provider_id)
        if isinstance(result, Priced):
            priced[name] = result
        elif not usage.is_empty:
            unpriced[name] = result
    if total is not None:
        summed = Usage.total(models.values())
        rest = (
            total.input_tokens - summed.input_tokens,
            total.output_tokens - summed.output_tokens,
            total.num_model_requests - summed.num_model_requests,
        )
        if any(v < 0 for v in rest):
            unpriced[NO_MODEL] = Unpriced(
                NO_MODEL, "per-model usage adds up to more than the run's total", "invalid_usage"
            )
        elif any(rest):
            unpriced[NO_MODEL] = Unpriced(
                NO_MODEL,
                f"{rest[0]:,} input / {rest[1]:,} output tokens carry no model "
                "(usage not grouped by model), so no price applies",
                "no_model",
            )
    return RunCost(at=at, priced=priced, unpriced=unpriced, provider=provider_id)

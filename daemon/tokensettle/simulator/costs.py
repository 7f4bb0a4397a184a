"""The simulator's costs endpoint (`GET /v1/organization/costs`), billed from its requests.

Pure, like `scenario`: the HTTP layer (`server.py`) parses HTTP and calls `respond_costs`.

What it bills, consistently with the usage it answers: every virtual request visible at
`now`, priced with genai-prices (`tokensettle.pricing.price`) at the request's own time, in
its own price context (batch, service tier), split into one line item per priced part, in
the daily bucket of the request's minute slot. A request genai-prices cannot price (a model
it does not know, a tier it has no price for) is billed at the `list_prices` the billing
knobs give its model, or not at all.

Line items are named `"<model>, <part>"`, the part being `input` (uncached), `cached
input`, `cache write`, `output`, or a modality's (`input audio`, `output audio`, ...), with
`, batch` and `, <tier>` (other than default) appended: "gpt-4o-mini-2024-07-18, cached
input, batch". The spec leaves line-item names open; this naming is the simulator's choice,
as is `quantity` in `tokens`. The *billing knobs* (`Billing`) add what a test needs:
`price_factors` bills a model's line items at a factor of the table's price (a price
error), `list_prices` prices a model the table lacks, and `line_items` adds line items
(embeddings, web search, or an amount on a model's line: another price error).

Validation, like the usage endpoint's (and 400 `invalid_request_error` where the real API
is undocumented): integer times, `bucket_width` only `1d`, `limit` 1-180 (default 7),
`group_by` a subset of `project_id`, `line_item`, `api_key_id`; `project_ids` and
`api_key_ids` filter; pages by `next_page` cursors. Without `group_by` line_item, a result's
`quantity` and `quantity_unit` are null, as the spec says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from tokensettle.pricing import MTOK, Priced, price, price_context
from tokensettle.simulator.scenario import (
    Scenario,
    ScenarioError,
    UsageQuery,
    VirtualRequest,
    _bad_request,
    _sort_key,
    decode_cursor,
    encode_cursor,
    grid_for,
    parse_group_by,
    parse_limit,
    parse_range,
    split_params,
)
from tokensettle.usage import Usage
from tokensettle.windows import floor_minute

__all__ = [
    "COSTS_PATH",
    "COSTS_RESULT_OBJECT",
    "GROUP_BY_VALUES",
    "BilledLine",
    "Billing",
    "CostsQuery",
    "ExtraLine",
    "ListPrice",
    "billed_lines",
    "costs_page",
    "parse_costs_query",
    "request_lines",
    "respond_costs",
]

COSTS_PATH: Final = "/v1/organization/costs"
COSTS_RESULT_OBJECT: Final = "organization.costs.result"
GROUP_BY_VALUES: Final = ("project_id", "line_item", "api_key_id")
DEFAULT_LIMIT, MAX_LIMIT = 7, 180
_ARRAYS: Final = frozenset({"project_ids", "api_key_ids", "group_by"})
_SCALARS: Final = frozenset({"start_time", "end_time", "bucket_width", "limit", "page"})
_PART_NAMES: Final = {"uncached_input": "input"}


# ------------------------------------------------------------------ the billing knobs


def _decimal(value: object, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ScenarioError(f"{what} must be a number, got {value!r}")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ScenarioError(f"{what} must be a number, got {value!r}") from None
    if not number.is_finite():
        raise ScenarioError(f"{what} must be finite, got {value!r}")
    return number


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{what} must be an object, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ListPrice:
    """USD per million tokens of a model genai-prices does not know."""

    input: Decimal
    cached_input: Decimal
    output: Decimal

    @staticmethod
    def from_json(obj: object, model: str) -> ListPrice:
        raw = _object(obj, f"list_prices[{model!r}]")
        unknown = set(raw) - {"input", "cached_input", "output"}
        if unknown or "input" not in raw or "output" not in raw:
            raise ScenarioError(
                f"list_prices[{model!r}] must be {{'input', 'cached_input'?, 'output'}} "
                "(USD per million tokens)"
            )
        price_in = _decimal(raw["input"], f"list_prices[{model!r}].input")
        return ListPrice(
            input=price_in,
            cached_input=_decimal(raw.get("cached_input", raw["input"]), "cached_input"),
            output=_decimal(raw["output"], f"list_prices[{model!r}].output"),
        )

    def to_json(self) -> dict[str, float]:
        return {
            "input": float(self.input),
            "cached_input": float(self.cached_input),
            "output": float(self.output),
        }


_EXTRA_KEYS: Final = frozenset(
    {"time", "project_id", "api_key_id", "line_item", "amount", "quantity", "quantity_unit"}
)


@dataclass(frozen=True, slots=True)
class ExtraLine:
    """A line item the scenario adds (one not from a completions request)."""

    time: float
    project_id: str
    line_item: str
    amount: Decimal
    api_key_id: str | None = None
    quantity: Decimal | None = None
    quantity_unit: str | None = None

    @staticmethod
    def from_json(obj: object) -> ExtraLine:
        raw = _object(obj, "a line item")
        unknown = set(raw) - _EXTRA_KEYS
        if unknown:
            raise ScenarioError(f"unknown line item fields: {sorted(unknown)}")
        strings: dict[str, str | None] = {}
        for name in ("project_id", "line_item", "api_key_id", "quantity_unit"):
            value = raw.get(name)
            required = name in ("project_id", "line_item")
            if (value is None and required) or (
                value is not None and (not isinstance(value, str) or not value)
            ):
                raise ScenarioError(f"line item {name!r} must be a non-empty string")
            strings[name] = value
        time = _decimal(raw.get("time"), "line item 'time'")
        quantity = raw.get("quantity")
        return ExtraLine(
            time=float(time),
            project_id=str(strings["project_id"]),
            line_item=str(strings["line_item"]),
            amount=_decimal(raw.get("amount"), "line item 'amount'"),
            api_key_id=strings["api_key_id"],
            quantity=None if quantity is None else _decimal(quantity, "line item 'quantity'"),
            quantity_unit=strings["quantity_unit"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "project_id": self.project_id,
            "api_key_id": self.api_key_id,
            "line_item": self.line_item,
            "amount": float(self.amount),
            "quantity": None if self.quantity is None else float(self.quantity),
            "quantity_unit": self.quantity_unit,
        }


@dataclass(slots=True)
class Billing:
    """The billing knobs: price errors and what the completions usage does not cover."""

    price_factors: dict[str, Decimal] = field(default_factory=dict)
    list_prices: dict[str, ListPrice] = field(default_factory=dict)
    line_items: list[ExtraLine] = field(default_factory=list)

    @staticmethod
    def from_json(obj: object) -> Billing:
        """`{"price_factors": {model: factor}, "list_prices": {model: {"input",
        "cached_input"?, "output"}}, "line_items": [...]}`, every key optional."""
        raw = _object(obj, "billing")
        unknown = set(raw) - {"price_factors", "list_prices", "line_items"}
        if unknown:
            raise ScenarioError(f"unknown billing fields: {sorted(unknown)}")
        factors = {
            str(model): _decimal(value, f"price_factors[{model!r}]")
            for model, value in _object(raw.get("price_factors", {}), "price_factors").items()
        }
        if any(f < 0 for f in factors.values()):
            raise ScenarioError("a price factor must not be negative")
        lists = {
            str(model): ListPrice.from_json(value, str(model))
            for model, value in _object(raw.get("list_prices", {}), "list_prices").items()
        }
        extra = raw.get("line_items", [])
        if not isinstance(extra, list):
            raise ScenarioError("'line_items' must be a list")
        return Billing(factors, lists, [ExtraLine.from_json(e) for e in extra])

    def to_json(self) -> dict[str, Any]:
        return {
            "price_factors": {m: float(f) for m, f in sorted(self.price_factors.items())},
            "list_prices": {m: p.to_json() for m, p in sorted(self.list_prices.items())},
            "line_items": [e.to_json() for e in self.line_items],
        }


# ------------------------------------------------------------------ what is billed


@dataclass(frozen=True, slots=True)
class BilledLine:
    """One billed amount at a time, with the dimensions the costs endpoint groups by."""

    minute: int
    project_id: str
    api_key_id: str | None
    line_item: str
    amount: Decimal
    quantity: Decimal | None = None
    quantity_unit: str | None = None


def _suffix(req: VirtualRequest) -> str:
    parts = (["batch"] if req.batch else []) + (
        [req.service_tier] if req.service_tier != "default" else []
    )
    return "".join(f", {p}" for p in parts)


def _list_priced(usage: Usage, prices: ListPrice) -> list[tuple[str, int, Decimal]]:
    cached = usage.input_cached_tokens or 0
    parts = [
        ("input", usage.input_tokens - cached, prices.input),
        ("cached input", cached, prices.cached_input),
        ("output", usage.output_tokens, prices.output),
    ]
    return [(name, n, Decimal(n) * p / MTOK) for name, n, p in parts if n]


def request_lines(req: VirtualRequest, usage: Usage, billing: Billing) -> list[BilledLine]:
    """What one request's usage is billed as: a line per priced part, at its own time."""
    at = datetime.fromtimestamp(req.time, UTC)
    result = price(req.model, usage, at, context=price_context(req.service_tier, req.batch))
    parts: list[tuple[str, int | None, Decimal]]
    if isinstance(result, Priced):
        parts = [
            (
                _PART_NAMES.get(c.name, c.name.replace("_", " ")),
                c.count if c.per == MTOK else None,
                c.usd,
            )
            for c in result.components
            if c.usd
        ]
    elif req.model in billing.list_prices:
        parts = list(_list_priced(usage, billing.list_prices[req.model]))
    else:
        return []
    factor = billing.price_factors.get(req.model, Decimal(1))
    return [
        BilledLine(
            minute=req.minute,
            project_id=req.project_id,
            api_key_id=req.api_key_id,
            line_item=f"{req.model}, {name}{_suffix(req)}",
            amount=usd * factor,
            quantity=None if count is None else Decimal(count),
            quantity_unit=None if count is None else "tokens",
        )
        for name, count, usd in parts
    ]


def billed_lines(scenario: Scenario, billing: Billing, now: float) -> list[BilledLine]:
    """Everything billed at `now`: the visible requests' lines and the extra line items."""
    lines: list[BilledLine] = []
    for req in scenario.requests:
        usage = req.usage_at(now)
        if usage is not None:
            lines += request_lines(req, usage, billing)
    lines += [
        BilledLine(
            minute=floor_minute(e.time),
            project_id=e.project_id,
            api_key_id=e.api_key_id,
            line_item=e.line_item,
            amount=e.amount,
            quantity=e.quantity,
            quantity_unit=e.quantity_unit,
        )
        for e in billing.line_items
    ]
    return lines


# ------------------------------------------------------------------ the query and the page


@dataclass(frozen=True, slots=True)
class CostsQuery:
    """A validated costs query; `paging` holds its range, width, limit and cursor."""

    paging: UsageQuery
    group_by: tuple[str, ...] = ()
    project_ids: frozenset[str] = frozenset()
    api_key_ids: frozenset[str] = frozenset()


def parse_costs_query(pairs: Sequence[tuple[str, str]]) -> CostsQuery:
    """Validate a costs query (ApiError 400 otherwise)."""
    scalars, arrays = split_params(pairs, _ARRAYS, _SCALARS)
    start, end = parse_range(scalars)
    width = scalars.get("bucket_width", "1d")
    if width != "1d":
        raise _bad_request(
            f"Invalid value for 'bucket_width': {width!r}. Only '1d' is supported.",
            "bucket_width",
        )
    limit = parse_limit(scalars, width, DEFAULT_LIMIT, MAX_LIMIT)
    group_by = parse_group_by(arrays["group_by"], GROUP_BY_VALUES)
    paging = UsageQuery(
        start_time=start,
        end_time=end,
        bucket_width="1d",
        limit=limit,
        page=scalars.get("page") or None,
    )
    return CostsQuery(
        paging=paging,
        group_by=group_by,
        project_ids=frozenset(arrays["project_ids"]),
        api_key_ids=frozenset(arrays["api_key_ids"]),
    )


def _matches(query: CostsQuery, line: BilledLine) -> bool:
    if query.project_ids and line.project_id not in query.project_ids:
        return False
    return not (query.api_key_ids and line.api_key_id not in query.api_key_ids)


def _results(query: CostsQuery, lines: Iterable[BilledLine]) -> list[dict[str, Any]]:
    """One result per combination of the grouped dimensions (all null ungrouped)."""
    groups: dict[tuple[str | None, ...], list[BilledLine]] = {}
    for line in lines:
        key = tuple(getattr(line, name) for name in query.group_by)
        groups.setdefault(key, []).append(line)
    by_item = "line_item" in query.group_by
    results = []
    for key in sorted(groups, key=_sort_key):
        members = groups[key]
        dims = dict(zip(query.group_by, key, strict=True))
        quantities = [m.quantity for m in members if m.quantity is not None]
        units = {m.quantity_unit for m in members}
        one_unit = by_item and quantities and len(units) == 1
        results.append(
            {
                "object": COSTS_RESULT_OBJECT,
                "amount": {
                    "value": float(sum((m.amount for m in members), Decimal(0))),
                    "currency": "usd",
                },
                "line_item": dims.get("line_item"),
                "project_id": dims.get("project_id"),
                "api_key_id": dims.get("api_key_id"),
                "quantity": float(sum(quantities, Decimal(0))) if one_unit else None,
                "quantity_unit": next(iter(units)) if one_unit else None,
            }
        )
    return results


def costs_page(query: CostsQuery, lines: Iterable[BilledLine], now: float) -> dict[str, Any]:
    """The 200 answer for `query` over what is billed at `now`."""
    grid = grid_for(query.paging, now)
    first = decode_cursor(query.paging, grid)
    last = min(first + query.paging.limit, len(grid))  # exclusive
    per_bucket: dict[int, list[BilledLine]] = {}
    if first < last:
        lo, hi = grid.bucket(first)[0], grid.bucket(last - 1)[1]
        for line in lines:
            if lo <= line.minute < hi and _matches(query, line):
                per_bucket.setdefault(grid.index_of(line.minute), []).append(line)
    data = []
    for k in range(first, last):
        b_start, b_end = grid.bucket(k)
        results = _results(query, per_bucket.get(k, ()))
        data.append(
            {"object": "bucket", "start_time": b_start, "end_time": b_end, "results": results}
        )
    has_more = last < len(grid)
    return {
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": encode_cursor(query.paging, grid.bucket(last)[0]) if has_more else None,
    }


def respond_costs(
    scenario: Scenario, billing: Billing, pairs: Sequence[tuple[str, str]], now: float
) -> dict[str, Any]:
    """The 200 costs page for a query (raises ApiError for a 400)."""
    query = parse_costs_query(pairs)
    return costs_page(query, billed_lines(scenario, billing, now), now)

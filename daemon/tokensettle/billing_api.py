"""The two reads of the bill check: the costs OpenAI bills and the daily completions usage.

* `GET {base}/organization/costs` with `bucket_width=1d`, `group_by=project_id` and
  `group_by=line_item` over whole UTC days;
* `GET {base}/organization/usage/completions` with `bucket_width=1d` and
  `group_by=project_id,model,service_tier,batch` over the same days.

Both go through `UsageClient.fetch_pages`, the machinery of every usage read (rate limit,
retries honouring `Retry-After`, the key only in the header and scrubbed from messages,
bounded bodies, pagination guards), so a failure is the same typed `UsageApiError`: an
`AuthError` when the admin key is refused or lacks `api.usage.read`, which the costs
endpoint needs as the usage endpoints do. Page sizes are the API's defaults (7 daily
buckets a page): a week is one request per endpoint, a month five.

Costs come as JSON numbers in currency units (the spec's `amount.value`); an amount given
as a decimal string, as some clients report seeing, is read the same way. Either becomes a
`Decimal` of its shortest decimal form, never a float sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from tokensettle.bill import COSTS_GROUP_BY, DAY, USAGE_GROUP_BY, CostLine, DailyUsage
from tokensettle.usage_api import (
    USAGE_PATH,
    MalformedResponseError,
    UsageClient,
    page_buckets,
    page_envelope,
    query_params,
    result_dimension,
    result_usage,
)

__all__ = [
    "COSTS_PATH",
    "COSTS_RESULT_OBJECT",
    "BillData",
    "CostsPage",
    "DailyUsagePage",
    "costs_query",
    "daily_usage_query",
    "day_range",
    "fetch_bill_data",
    "fetch_costs",
    "fetch_daily_usage",
    "parse_costs_page",
    "parse_daily_usage_page",
]

COSTS_PATH: Final = "/organization/costs"
COSTS_RESULT_OBJECT: Final = "organization.costs.result"


def _malformed(message: str) -> MalformedResponseError:
    return MalformedResponseError(f"malformed costs page: {message}")


@dataclass(frozen=True, slots=True)
class CostsPage:
    lines: tuple[CostLine, ...]
    bucket_starts: tuple[int, ...]
    has_more: bool
    next_page: str | None


@dataclass(frozen=True, slots=True)
class DailyUsagePage:
    rows: tuple[DailyUsage, ...]
    bucket_starts: tuple[int, ...]
    has_more: bool
    next_page: str | None


@dataclass(frozen=True, slots=True)
class BillData:
    """What the check compares, and what it took to read it."""

    costs: tuple[CostLine, ...]
    usage: tuple[DailyUsage, ...]
    requests: int
    params: Mapping[str, Mapping[str, str | list[str]]]  # per path: the query sent


# ------------------------------------------------------------------ queries


def day_range(start: date, end: date) -> tuple[int, int]:
    """Unix seconds of the UTC midnights `start` and `end` (exclusive)."""
    if end <= start:
        raise ValueError(f"the day range {start}..{end} is empty")
    lo = int(datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp())
    hi = int(datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp())
    return lo, hi


def _base(start: date, end: date) -> list[tuple[str, str]]:
    lo, hi = day_range(start, end)
    return [("start_time", str(lo)), ("end_time", str(hi)), ("bucket_width", "1d")]


def costs_query(start: date, end: date, project_ids: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The costs query of the UTC days `[start, end)`; arrays as repeated keys."""
    pairs = _base(start, end)
    pairs += [("group_by", dim) for dim in COSTS_GROUP_BY]
    pairs += [("project_ids", p) for p in sorted(set(project_ids))]
    return pairs


def daily_usage_query(
    start: date, end: date, project_ids: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """The daily completions usage query of the same days."""
    pairs = _base(start, end)
    pairs += [("group_by", dim) for dim in USAGE_GROUP_BY]
    pairs += [("project_ids", p) for p in sorted(set(project_ids))]
    return pairs


# ------------------------------------------------------------------ pages


def _decimal(value: object, what: str) -> Decimal:
    """A JSON number, or a decimal string, as an exact finite Decimal."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _malformed(f"{what} {value!r} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _malformed(f"{what} {value!r} is not finite")
    try:
        number = Decimal(str(value))  # a float's shortest repr, not its binary expansion
    except InvalidOperation:
        raise _malformed(f"{what} {value!r} is not a number") from None
    if not number.is_finite():
        raise _malformed(f"{what} {value!r} is not finite")
    return number


def _cost_line(result: Mapping[str, Any], start: int) -> CostLine:
    where = f"bucket {start}"
    if result.get("object") != COSTS_RESULT_OBJECT:
        raise _malformed(f"{where}: result object is {result.get('object')!r}")
    amount = result.get("amount")
    if not isinstance(amount, Mapping):
        raise _malformed(f"{where}: 'amount' is not an object")
    currency = amount.get("currency")
    if not isinstance(currency, str) or not currency:
        raise _malformed(f"{where}: amount currency {currency!r} is not a string")
    quantity = result.get("quantity")
    unit = result.get("quantity_unit")
    if unit is not None and not isinstance(unit, str):
        raise _malformed(f"{where}: quantity_unit {unit!r} is not a string")
    try:
        project = result_dimension(result, "project_id")
        line_item = result_dimension(result, "line_item")
    except MalformedResponseError as exc:
        raise _malformed(f"{where}: {exc}") from None
    return CostLine(
        day=start - start % DAY,
        project_id=project,
        line_item=line_item,
        amount=_decimal(amount.get("value"), f"{where}: amount value"),
        currency=currency.lower(),
        quantity=None if quantity is None else _decimal(quantity, f"{where}: quantity"),
        quantity_unit=unit,
    )


def parse_costs_page(body: object) -> CostsPage:
    """A decoded costs page, checked strictly (MalformedResponseError otherwise)."""
    data, has_more, next_page = page_envelope(body)
    lines: list[CostLine] = []
    starts: list[int] = []
    for start, results in page_buckets(data):
        starts.append(start)
        lines.extend(_cost_line(result, start) for result in results)
    return CostsPage(tuple(lines), tuple(starts), has_more, next_page)


def parse_daily_usage_page(body: object) -> DailyUsagePage:
    """A decoded page of daily completions usage grouped by `USAGE_GROUP_BY`."""
    data, has_more, next_page = page_envelope(body)
    rows: list[DailyUsage] = []
    starts: list[int] = []
    for start, results in page_buckets(data):
        starts.append(start)
        for result in results:
            usage = result_usage(result, start, bucket_seconds=DAY)
            batch = result.get("batch")
            if batch is not None and not isinstance(batch, bool):
                raise MalformedResponseError(
                    f"malformed Usage API page: bucket {start}: 'batch' is "
                    f"{type(batch).__name__}, expected boolean"
                )
            rows.append(
                DailyUsage(
                    day=start - start % DAY,
                    project_id=result_dimension(result, "project_id"),
                    model=result_dimension(result, "model"),
                    service_tier=result_dimension(result, "service_tier"),
                    batch=batch,
                    usage=usage,
                )
            )
    return DailyUsagePage(tuple(rows), tuple(starts), has_more, next_page)


# ------------------------------------------------------------------ fetching


def _span(start: date, end: date) -> str:
    return f"the days {start.isoformat()}..{end.isoformat()}"


async def fetch_costs(
    client: UsageClient, start: date, end: date, project_ids: Iterable[str] = ()
) -> tuple[list[CostLine], int]:
    """Every cost line of the UTC days `[start, end)`, and the HTTP requests it took."""
    pages, requests = await client.fetch_pages(
        COSTS_PATH, costs_query(start, end, project_ids), parse_costs_page, what=_span(start, end)
    )
    return [line for page in pages for line in page.lines], requests


async def fetch_daily_usage(
    client: UsageClient, start: date, end: date, project_ids: Iterable[str] = ()
) -> tuple[list[DailyUsage], int]:
    """Every daily completions usage row of the same days, and the requests it took."""
    pages, requests = await client.fetch_pages(
        USAGE_PATH,
        daily_usage_query(start, end, project_ids),
        parse_daily_usage_page,
        what=_span(start, end),
    )
    return [row for page in pages for row in page.rows], requests


async def fetch_bill_data(
    client: UsageClient, start: date, end: date, project_ids: Iterable[str] = ()
) -> BillData:
    """Both sides of the check. The costs first: a key without the scope fails there."""
    projects = tuple(project_ids)
    costs, cost_requests = await fetch_costs(client, start, end, projects)
    usage, usage_requests = await fetch_daily_usage(client, start, end, projects)
    return BillData(
        costs=tuple(costs),
        usage=tuple(usage),
        requests=cost_requests + usage_requests,
        params={
            COSTS_PATH: query_params(costs_query(start, end, projects)),
            USAGE_PATH: query_params(daily_usage_query(start, end, projects)),
        },
    )

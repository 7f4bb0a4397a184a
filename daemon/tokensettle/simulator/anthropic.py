"""The simulator's Anthropic usage report: `GET /v1/organizations/usage_report/messages`.

Pure, like `scenario`: the HTTP layer (`server.py`) reads the headers and the query, applies
faults and calls `check_headers` and `respond`. It answers the scenario's Anthropic requests
(`Scenario.anthropic_requests`, registered with `"provider": "anthropic"`) and no others, as
the OpenAI endpoints answer only OpenAI's.

Contract followed (../shared/reference/usage-api-notes.md section 6; there is no OpenAPI
extract, so `tests/integration/test_anthropic_contract.py` states it as explicit checks):

* auth by `x-api-key` (an Anthropic admin key) and a required `anthropic-version` header;
  errors in Anthropic's envelope `{"type": "error", "error": {"type", "message"}}` with
  its error types (`invalid_request_error` 400, `authentication_error` 401,
  `permission_error` 403, `rate_limit_error` 429, `api_error` 500, `overloaded_error` 529);
* `starting_at` (required) and `ending_at` as RFC 3339 strings; `bucket_width` 1m/1h/1d
  (default 1d) with `limit` default and maximum per width as OpenAI's (60/1440, 24/168,
  7/31); `page` = the previous answer's `next_page`;
* arrays bracketed (`group_by[]=model`, `api_key_ids[]=...`); `group_by` any of the notes'
  nine values (`speed` only with the `anthropic-beta: fast-mode-2026-02-01` header);
  filters `api_key_ids`, `workspace_ids`, `models`, `service_tiers`, `context_window`,
  `inference_geos`, `speeds` (and `account_ids`, `service_account_ids`);
* a page `{"data": [{"starting_at", "ending_at", "results"}], "has_more", "next_page"}`
  with no `object` keys; a result carries `uncached_input_tokens`,
  `cache_read_input_tokens`, `cache_creation` `{ephemeral_5m_input_tokens,
  ephemeral_1h_input_tokens}`, `output_tokens`, `server_tool_use` `{web_search_requests}`
  and every dimension field, null unless grouped; no request count.

Decisions of the fake where no source decides (recorded, not observed):

* Buckets are whole UTC minutes/hours/days (the docs say they are "snapped"), the first the
  one holding `starting_at`; a bucket is returned when it ends at or before `ending_at`
  (half-open: the docs' "end before" read as the range's end), and while it starts before
  now (the current bucket holds what is visible so far). Empty buckets have `results: []`.
* An array parameter without brackets (`group_by=model`) is a 400, not ignored: a real
  API that ignored it would answer ungrouped rows, which no run could be attributed from,
  so a client that sends it must fail loudly here. Comma-joined values are not split.
* A time that is not RFC 3339 (Unix seconds, a date alone, no offset), `ending_at` not
  after `starting_at`, an unknown width, group or enumerated filter value, a `limit` out of
  range, a scalar given twice and a cursor that is not one of this query's bucket starts
  are 400 `invalid_request_error`. The cursor is `page_` + base64 of the next bucket's
  start, as the docs' example cursors look.
* Dimensions the simulator does not model: `context_window` is "0-200k", `inference_geo`
  "not_available", `speed` "standard", `account_id` and `service_account_id` null (API-key
  traffic); filters on the last two match nothing. The Default workspace is null.
* A key in the scenario's `anthropic_unscoped_keys` (a key that is not an admin key) gets
  403 `permission_error`; any other unknown key 401 `authentication_error`. The key is
  never echoed back.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from tokensettle.anthropic_api import ANTHROPIC_VERSION, format_rfc3339, parse_rfc3339
from tokensettle.simulator.scenario import (
    BUCKET_WIDTHS,
    LIMITS,
    ApiError,
    Fault,
    Scenario,
    TieredRow,
    _sort_key,
    aggregate_tiered,
    parse_group_by,
    parse_limit,
)
from tokensettle.usage import Usage, usage_to_anthropic

__all__ = [
    "ANTHROPIC_VERSIONS",
    "GROUP_BY_VALUES",
    "RESULT_DIMENSIONS",
    "SPEED_BETA",
    "USAGE_REPORT_PATH",
    "AnthropicError",
    "ReportQuery",
    "betas",
    "bucket_count",
    "build_report",
    "check_headers",
    "decode_cursor",
    "encode_cursor",
    "fault_error",
    "parse_report_query",
    "respond",
    "truth_rows",
    "visible_rows",
]

USAGE_REPORT_PATH: Final = "/v1/organizations/usage_report/messages"
#: API versions the fake takes in `anthropic-version` (the Admin API documents the first).
ANTHROPIC_VERSIONS: Final = frozenset({ANTHROPIC_VERSION, "2023-01-01"})
#: The beta header value grouping by `speed` needs.
SPEED_BETA: Final = "fast-mode-2026-02-01"
#: Every `group_by` value (usage-api-notes section 6), in the docs' order; the dimension
#: fields of a result, null unless grouped.
RESULT_DIMENSIONS: Final = (
    "api_key_id",
    "workspace_id",
    "model",
    "service_tier",
    "context_window",
    "inference_geo",
    "account_id",
    "service_account_id",
    "speed",
)
GROUP_BY_VALUES: Final = frozenset(RESULT_DIMENSIONS)
#: Filter -> the dimension it restricts.
FILTERS: Final[Mapping[str, str]] = {
    "api_key_ids": "api_key_id",
    "workspace_ids": "workspace_id",
    "models": "model",
    "service_tiers": "service_tier",
    "context_window": "context_window",
    "inference_geos": "inference_geo",
    "account_ids": "account_id",
    "service_account_ids": "service_account_id",
    "speeds": "speed",
}
#: Filters whose values the docs enumerate (others take any string).
FILTER_VALUES: Final[Mapping[str, frozenset[str]]] = {
    "context_window": frozenset({"0-200k", "200k-1M"}),
    "inference_geos": frozenset({"global", "us", "not_available"}),
}
ARRAY_PARAMS: Final = frozenset({"group_by", *FILTERS})
SCALAR_PARAMS: Final = frozenset({"starting_at", "ending_at", "bucket_width", "limit", "page"})
DEFAULT_BUCKET_WIDTH: Final = "1d"
#: What the simulator reports for dimensions it does not model.
UNMODELLED: Final[Mapping[str, str | None]] = {
    "context_window": "0-200k",
    "inference_geo": "not_available",
    "account_id": None,
    "service_account_id": None,
    "speed": "standard",
}
#: HTTP status -> Anthropic's error type.
ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}
_CURSOR_PREFIX: Final = "page_"


class AnthropicError(Exception):
    """An error answer of the fake Anthropic API, in Anthropic's error envelope."""

    def __init__(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = ERROR_TYPES.get(status, "api_error")
        self.headers = dict(headers or {})

    def envelope(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}


def _invalid(message: str) -> AnthropicError:
    return AnthropicError(400, message)


@contextlib.contextmanager
def _anthropic_errors() -> Iterator[None]:
    """The shared validators of `scenario` raise OpenAI's ApiError: same status and
    message, Anthropic's envelope."""
    try:
        yield
    except ApiError as err:
        raise AnthropicError(err.status, err.message) from None


# --------------------------------------------------------------------------------------
# Headers


def check_headers(
    headers: Mapping[str, str], accepted: Iterable[str], unscoped: Iterable[str]
) -> AnthropicError | None:
    """None when `x-api-key` holds an accepted admin key and `anthropic-version` a known
    version; otherwise the error (401 without or with an unknown key, 403 for a key that
    is not an admin key, 400 without or with an unknown version). Header names are
    case-insensitive (the mapping should be aiohttp's CIMultiDict or lower-cased)."""
    key = (headers.get("x-api-key") or "").strip()
    if not key:
        hint = (
            " (an Authorization: Bearer header is not how Anthropic authenticates)"
            if headers.get("authorization")
            else ""
        )
        return AnthropicError(401, f"x-api-key header is required{hint}")
    if key in set(unscoped):
        return AnthropicError(
            403, "This API key cannot use the Admin API: use an admin key (sk-ant-admin...)."
        )
    if key not in set(accepted):
        return AnthropicError(401, "invalid x-api-key")
    version = headers.get("anthropic-version")
    if not version:
        return _invalid("anthropic-version: header is required")
    if version not in ANTHROPIC_VERSIONS:
        return _invalid(f"anthropic-version: {version!r} is not a valid version")
    return None


def betas(headers: Mapping[str, str]) -> frozenset[str]:
    """The `anthropic-beta` header's comma-separated values."""
    raw = headers.get("anthropic-beta") or ""
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


# --------------------------------------------------------------------------------------
# The query


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """A validated usage report query (times in Unix seconds)."""

    starting_at: int
    ending_at: int | None = None
    bucket_width: str = DEFAULT_BUCKET_WIDTH
    limit: int = LIMITS[DEFAULT_BUCKET_WIDTH][0]
    group_by: tuple[str, ...] = ()
    #: filter name -> accepted values (only the filters given)
    filters: Mapping[str, frozenset[str]] = field(default_factory=dict)
    page: str | None = None

    @property
    def width_seconds(self) -> int:
        return BUCKET_WIDTHS[self.bucket_width]


def _time(scalars: Mapping[str, str], name: str) -> int:
    raw = scalars[name]
    try:
        return parse_rfc3339(raw)
    except ValueError:
        raise _invalid(
            f"{name}: expected an RFC 3339 date-time string like '2025-08-01T00:00:00Z', "
            f"got {raw!r}"
        ) from None


def _split(pairs: Sequence[tuple[str, str]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Scalars and bracketed arrays; an array without brackets, an unknown parameter given
    with brackets and a scalar given twice are refused."""
    scalars: dict[str, str] = {}
    arrays: dict[str, list[str]] = {}
    for raw, value in pairs:
        name = raw.removesuffix("[]")
        bracketed = raw.endswith("[]")
        if name in ARRAY_PARAMS:
            if not bracketed:
                raise _invalid(f"{name}: an array parameter is sent as {name}[]=value")
            arrays.setdefault(name, []).append(value)
        elif name in SCALAR_PARAMS:
            if bracketed:
                raise _invalid(f"{name}: is not an array parameter")
            if name in scalars:
                raise _invalid(f"{name}: given more than once")
            scalars[name] = value
    return scalars, arrays


def parse_report_query(
    pairs: Sequence[tuple[str, str]], *, beta: frozenset[str] = frozenset()
) -> ReportQuery:
    """Validate a query given as decoded (key, value) pairs (module docstring). Unknown
    parameters are ignored. Raises AnthropicError (400)."""
    scalars, arrays = _split(pairs)
    if "starting_at" not in scalars:
        raise _invalid("starting_at: field required")
    start = _time(scalars, "starting_at")
    end: int | None = None
    if "ending_at" in scalars:
        end = _time(scalars, "ending_at")
        if end <= start:
            raise _invalid("ending_at: must be after starting_at")
    width = scalars.get("bucket_width", DEFAULT_BUCKET_WIDTH)
    if width not in BUCKET_WIDTHS:
        raise _invalid(f"bucket_width: {width!r} is not one of '1d', '1h', '1m'")
    with _anthropic_errors():
        limit = parse_limit(scalars, width, *LIMITS[width])
        group_by = parse_group_by(arrays.get("group_by", ()), RESULT_DIMENSIONS)
    if "speed" in group_by and SPEED_BETA not in beta:
        raise _invalid(f"group_by: 'speed' requires the anthropic-beta header {SPEED_BETA}")
    filters: dict[str, frozenset[str]] = {}
    for name in FILTERS:
        if name not in arrays:
            continue
        values = frozenset(arrays[name])
        allowed = FILTER_VALUES.get(name)
        bad = sorted(values - allowed) if allowed is not None else []
        if bad:
            raise _invalid(f"{name}: {bad[0]!r} is not one of {', '.join(sorted(allowed or ()))}")
        filters[name] = values
    return ReportQuery(
        starting_at=start,
        ending_at=end,
        bucket_width=width,
        limit=limit,
        group_by=group_by,
        filters=filters,
        page=scalars.get("page") or None,
    )


# --------------------------------------------------------------------------------------
# Buckets, results and pages


def bucket_count(query: ReportQuery, now: float) -> tuple[int, int]:
    """The first bucket's start and how many buckets the query spans (module docstring:
    whole buckets ending by `ending_at`, starting before now)."""
    width = query.width_seconds
    first = (query.starting_at // width) * width
    by_now = max(0, math.ceil((math.floor(now) - first) / width))
    if query.ending_at is None:
        return first, by_now
    return first, max(0, min(by_now, (query.ending_at - first) // width))


def encode_cursor(bucket_start: int) -> str:
    return _CURSOR_PREFIX + base64.b64encode(format_rfc3339(bucket_start).encode()).decode()


def decode_cursor(query: ReportQuery, first: int, total: int) -> int:
    """Index of the bucket the query's `page` cursor names (0 without one)."""
    if query.page is None:
        return 0
    invalid = _invalid("page: the cursor is not valid for this query")
    if not query.page.startswith(_CURSOR_PREFIX):
        raise invalid
    try:
        text = base64.b64decode(query.page[len(_CURSOR_PREFIX) :], validate=True).decode()
        at = parse_rfc3339(text)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid from None
    k, rest = divmod(at - first, query.width_seconds)
    if rest or not 0 < k < total:
        raise invalid
    return k


def _dimensions(row: TieredRow) -> dict[str, str | None]:
    return {
        "api_key_id": row.api_key_id,
        "workspace_id": row.project_id or None,  # DEFAULT_WORKSPACE is reported as null
        "model": row.model,
        "service_tier": row.service_tier,
        **UNMODELLED,
    }


def _matches(query: ReportQuery, dims: Mapping[str, str | None]) -> bool:
    return all(dims[FILTERS[name]] in values for name, values in query.filters.items())


def result_object(
    usage: Usage, dims: Mapping[str, str | None], rng: random.Random | None
) -> dict[str, Any]:
    """One result: the counters in Anthropic's shape and every dimension field (null
    unless given). Key order shuffled by `rng`."""
    items: list[tuple[str, Any]] = list(usage_to_anthropic(usage).items())
    items.extend((name, dims.get(name)) for name in RESULT_DIMENSIONS)
    if rng is not None:
        rng.shuffle(items)
    return dict(items)


def build_report(
    query: ReportQuery, rows: Iterable[TieredRow], now: float, *, seed: int | None = 0
) -> dict[str, Any]:
    """The 200 answer for `query` over `rows` (the Anthropic rows visible at `now`)."""
    width = query.width_seconds
    first, total = bucket_count(query, now)
    k0 = decode_cursor(query, first, total)
    k1 = min(k0 + query.limit, total)  # exclusive
    lo, hi = first + k0 * width, first + k1 * width
    groups: dict[int, dict[tuple[str | None, ...], Usage]] = {}
    for row in rows:
        dims = _dimensions(row)
        if not lo <= row.minute < hi or not _matches(query, dims):
            continue
        key = tuple(dims[name] for name in query.group_by)
        bucket = groups.setdefault((row.minute - first) // width, {})
        bucket[key] = bucket[key] + row.usage if key in bucket else row.usage
    data = []
    for k in range(k0, k1):
        start = first + k * width
        rng = None if seed is None else random.Random(f"anthropic:{seed}:{start}")
        results = [
            result_object(usage, dict(zip(query.group_by, key, strict=True)), rng)
            for key, usage in sorted(groups.get(k, {}).items(), key=lambda kv: _sort_key(kv[0]))
        ]
        data.append(
            {
                "starting_at": format_rfc3339(start),
                "ending_at": format_rfc3339(start + width),
                "results": results,
            }
        )
    has_more = k1 < total
    return {
        "data": data,
        "has_more": has_more,
        "next_page": encode_cursor(first + k1 * width) if has_more else None,
    }


def visible_rows(scenario: Scenario, now: float) -> list[TieredRow]:
    """The latest visible revision of every Anthropic request, summed per minute, key,
    workspace, model and service tier."""
    visible = ((r, r.usage_at(now)) for r in scenario.anthropic_requests)
    return aggregate_tiered((r, u) for r, u in visible if u is not None)


def truth_rows(scenario: Scenario) -> list[dict[str, Any]]:
    """Final revisions of every Anthropic request, per minute, key, workspace and model:
    what the report settles to, normalised (`usage`) and in the report's shape."""
    rows = aggregate_tiered((r, r.final_usage) for r in scenario.anthropic_requests)
    summed: dict[tuple[int, str | None, str | None, str | None], Usage] = {}
    for row in rows:
        key = (row.minute, row.api_key_id, row.project_id, row.model)
        summed[key] = summed[key] + row.usage if key in summed else row.usage
    return [
        {
            "minute": minute,
            "api_key_id": key_id,
            "workspace_id": workspace or None,
            "model": model,
            "usage": usage.present(),
            "report": usage_to_anthropic(usage),
        }
        for (minute, key_id, workspace, model), usage in sorted(
            summed.items(), key=lambda kv: _sort_key(kv[0])
        )
    ]


def respond(
    scenario: Scenario,
    pairs: Sequence[tuple[str, str]],
    now: float,
    *,
    beta: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The 200 page for a query (raises AnthropicError for a 400)."""
    query = parse_report_query(pairs, beta=beta)
    return build_report(query, visible_rows(scenario, now), now, seed=scenario.seed)


# --------------------------------------------------------------------------------------
# Faults


def fault_error(fault: Fault) -> AnthropicError | None:
    """The error answer a fault forces on the Anthropic endpoint, in Anthropic's envelope;
    None for the kinds that are not an error envelope (502's HTML page, hang, the
    hostile bodies: the server applies those as for every endpoint)."""
    headers = {"retry-after": str(fault.retry_after)} if fault.retry_after is not None else None
    messages = {
        "429": (429, "Number of request tokens has exceeded your per-minute rate limit"),
        "500": (500, "Internal server error"),
        "503": (503, "Service unavailable"),
        "529": (529, "Overloaded"),
        "401": (401, "invalid x-api-key"),
        "403": (403, "This API key cannot use the Admin API: use an admin key (sk-ant-admin...)."),
    }
    if fault.kind not in messages:
        return None
    status, message = messages[fault.kind]
    return AnthropicError(status, message, headers=headers)

"""The aiohttp client for Anthropic's usage report, `GET /v1/organizations/usage_report/messages`.

The second provider's truth, read the way `usage_api` reads OpenAI's: one `fetch` reads one
minute-aligned interval with one-minute buckets, grouped by `api_key_id`, `workspace_id` and
`model`, following every page, and returns the same `usage_api.FetchResult` (rows of
`UsageRow(minute, usage, api_key_id, project_id=<workspace_id>, model)`, the usage in the
normalised schema of `usage.usage_from_anthropic`). Everything between the query and the
page is `usage_api.UsageClient`'s, which this client extends: the leaky-bucket rate limit
(Anthropic asks for about one request a minute sustained: 10 a minute by default), the
timeout, retries with backoff and full jitter honouring `retry-after` on 429, 5xx (529
"overloaded" included) and transport errors, bounded bodies, the repeated-cursor,
`has_more`-without-cursor and `max_pages` guards, and the typed errors (401/403 are
`usage_api.AuthError`, so a refused Anthropic key exits 3 and pauses polling as OpenAI's).

What differs (usage-api-notes.md section 6): the key goes in `x-api-key` with
`anthropic-version: 2023-06-01` (never a bearer token); times are RFC 3339 strings, not Unix
seconds; arrays are sent bracketed (`group_by[]=model`); a page has no `object` keys; a
bucket is `{"starting_at", "ending_at", "results"}`; error bodies are
`{"type": "error", "error": {"type", "message"}}`; and a result counts no requests.

`ending_at` is documented as "buckets that end before" it. Read strictly, a query ending
at the interval's end would leave out its last minute, so the query asks for one minute
more (`END_MARGIN`) and the extra bucket is dropped: either reading gives every minute of
the interval, and a missed minute would be an undercount nobody sees.

The admin key is sent only in the `x-api-key` header: it is not stored in any exception,
repr or log event, and server messages are scrubbed of it before use (UsageClient).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp

from tokensettle import usage_api
from tokensettle.usage import UsageRow, UsageRowError, implausibility, usage_from_anthropic
from tokensettle.usage_api import (
    DEFAULT_MAX_PAGE_BYTES,
    FetchResult,
    Filters,
    MalformedResponseError,
    Page,
    RetryPolicy,
    UsageClient,
)
from tokensettle.windows import MAX_BUCKETS_PER_PAGE, MINUTE, Interval, floor_minute

__all__ = [
    "ANTHROPIC_VERSION",
    "DEFAULT_RATE_LIMIT_PER_MIN",
    "END_MARGIN",
    "GROUP_BY",
    "PROVIDER",
    "USAGE_REPORT_PATH",
    "AnthropicUsageClient",
    "build_query",
    "client_for",
    "format_rfc3339",
    "page_envelope",
    "parse_page",
    "parse_rfc3339",
    "query_params",
]

PROVIDER: Final = "anthropic"
USAGE_REPORT_PATH: Final = "/v1/organizations/usage_report/messages"
#: The API version every request names (the one the Admin API documents).
ANTHROPIC_VERSION: Final = "2023-06-01"
GROUP_BY: Final = ("api_key_id", "workspace_id", "model")
DEFAULT_RATE_LIMIT_PER_MIN: Final = 10.0
#: Seconds asked for past the interval's end (module docstring: `ending_at`).
END_MARGIN: Final = MINUTE
#: Array parameters, sent as `name[]=value` (the official cookbook's encoding).
ARRAY_PARAMS: Final = frozenset({"group_by", "api_key_ids", "workspace_ids"})

#: Defaults of the signatures (frozen, so one instance serves every call).
NO_FILTERS: Final = Filters()
DEFAULT_RETRY: Final = RetryPolicy()

_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)


# --------------------------------------------------------------------------------------
# Pure parts: times, the query and the page


def format_rfc3339(t: int) -> str:
    """Unix seconds as the RFC 3339 UTC timestamp Anthropic takes, "2025-08-01T00:00:00Z"."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: object) -> int:
    """An RFC 3339 timestamp ("2025-08-01T00:00:00Z", an offset, up to nanoseconds) as Unix
    seconds (floored). ValueError for anything else: a number, a date alone, a time without
    its offset (which would be read as local time)."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError(f"{value!r} is not an RFC 3339 timestamp")
    text = value.upper().replace(" ", "T")
    head, dot, rest = text.partition(".")
    if dot:  # datetime reads at most microseconds: cut the digits beyond (a floor anyway)
        digits = re.match(r"[0-9]+", rest)
        assert digits is not None
        text = f"{head}.{digits.group()[:6]}{rest[digits.end() :]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid date and time") from None
    return int(parsed.timestamp() // 1)


def build_query(
    interval: Interval, filters: Filters = NO_FILTERS, page: str | None = None
) -> list[tuple[str, str]]:
    """The query for `interval` as (key, value) pairs in the order sent: minute-aligned RFC
    3339 `starting_at` and `ending_at` (one minute past the interval, `END_MARGIN`),
    one-minute buckets, as many per page as the interval (and that minute) need up to 1,440,
    `group_by[]` of the three dimensions, then the filters (`Filters.api_key_ids` as
    `api_key_ids[]`, `Filters.project_ids` as `workspace_ids[]`), sorted."""
    minutes = interval.minutes + END_MARGIN // MINUTE
    pairs: list[tuple[str, str]] = [
        ("starting_at", format_rfc3339(interval.start)),
        ("ending_at", format_rfc3339(interval.end + END_MARGIN)),
        ("bucket_width", "1m"),
        ("limit", str(min(MAX_BUCKETS_PER_PAGE, minutes))),
    ]
    pairs.extend(("group_by[]", dim) for dim in GROUP_BY)
    pairs.extend(("api_key_ids[]", key) for key in sorted(filters.api_key_ids))
    pairs.extend(("workspace_ids[]", ws) for ws in sorted(filters.project_ids))
    if page is not None:
        pairs.append(("page", page))
    return pairs


def query_params(pairs: Sequence[tuple[str, str]]) -> dict[str, str | list[str]]:
    """The pairs as a mapping for a run's provenance (`group_by`, `api_key_ids`,
    `workspace_ids` as lists without their brackets)."""
    return usage_api.query_params(pairs, ARRAY_PARAMS)


def _malformed(message: str) -> MalformedResponseError:
    return MalformedResponseError(f"malformed Anthropic usage report page: {message}")


def page_envelope(body: object) -> tuple[list[Any], bool, str | None]:
    """The `data`, `has_more` and `next_page` of a decoded page, checked strictly (there is
    no `object` key to check, unlike OpenAI's pages)."""
    return usage_api.page_envelope(body, page_object=False, malformed=_malformed)


def _bucket_time(bucket: Mapping[str, Any], name: str) -> int:
    try:
        return parse_rfc3339(bucket.get(name))
    except ValueError as exc:
        raise _malformed(f"bucket {name}: {exc}") from None


def _dimension(result: Mapping[str, Any], name: str, where: str) -> str | None:
    value = result.get(name)
    if value is not None and not isinstance(value, str):
        raise _malformed(f"{where}: {name!r} is {type(value).__name__}, expected string")
    return value


def parse_page(body: object, interval: Interval) -> Page:
    """Check a decoded page strictly and turn its results into rows.

    Buckets must be one minute wide (we ask for `1m`: a wider bucket would spread a day's
    usage over one minute's owners), in increasing order, with a `results` list of
    objects; each result is parsed by `usage_from_anthropic` and checked against the
    plausibility bounds. A row's minute is its bucket's start; buckets outside `interval`
    (the `END_MARGIN` minute among them) are ignored. Raises MalformedResponseError.
    """
    data, has_more, next_page = page_envelope(body)
    rows: list[UsageRow] = []
    starts: list[int] = []
    previous: int | None = None
    for bucket in data:
        if not isinstance(bucket, Mapping):
            raise _malformed("a bucket is not an object")
        start = _bucket_time(bucket, "starting_at")
        end = _bucket_time(bucket, "ending_at")
        where = f"bucket {format_rfc3339(start)}"
        if start % MINUTE or end - start != MINUTE:
            raise _malformed(
                f"{where} ends at {format_rfc3339(end)}: not a one-minute bucket (asked: 1m)"
            )
        if previous is not None and start <= previous:
            raise _malformed(f"{where} does not follow bucket {format_rfc3339(previous)}")
        previous = start
        results = bucket.get("results")
        if not isinstance(results, list):
            raise _malformed(f"{where} has no 'results' list")
        minute = floor_minute(start)
        if not interval.contains_minute(minute):
            continue
        starts.append(start)
        for result in results:
            if not isinstance(result, Mapping):
                raise _malformed(f"a result in {where} is not an object")
            try:
                usage = usage_from_anthropic(result)
            except UsageRowError as exc:
                raise _malformed(f"{where}: {exc}") from None
            problem = implausibility(usage, bucket_seconds=MINUTE)
            if problem is not None:
                raise _malformed(f"{where}: implausible counts: {problem}")
            rows.append(
                UsageRow(
                    minute=minute,
                    usage=usage,
                    api_key_id=_dimension(result, "api_key_id", where),
                    project_id=_dimension(result, "workspace_id", where),
                    model=_dimension(result, "model", where),
                )
            )
    return Page(
        rows=tuple(rows), bucket_starts=tuple(starts), has_more=has_more, next_page=next_page
    )


# --------------------------------------------------------------------------------------
# The client


class AnthropicUsageClient(UsageClient):
    """Reads the Messages API usage of an interval from Anthropic's Admin API. One instance
    per daemon (shares the rate limiter); the aiohttp session is owned by the caller.

    `base_url` is the API's root, `https://api.anthropic.com` (the Anthropic SDKs' base);
    a trailing `/v1` (OpenAI's convention) is tolerated rather than doubled.
    """

    API_NAME = "Anthropic usage report"
    LOG_EVENT = "anthropic_api.request"
    PATH = USAGE_REPORT_PATH

    def __init__(
        self,
        *,
        base_url: str,
        admin_key: str,
        session: aiohttp.ClientSession,
        rate_limit_per_min: float = DEFAULT_RATE_LIMIT_PER_MIN,
        request_timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_pages: int = 500,
        max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES,
    ) -> None:
        super().__init__(
            base_url=base_url.rstrip("/").removesuffix("/v1"),
            admin_key=admin_key,
            session=session,
            rate_limit_per_min=rate_limit_per_min,
            request_timeout=request_timeout,
            retry=retry,
            max_pages=max_pages,
            max_page_bytes=max_page_bytes,
        )

    def _auth_headers(self, key: str) -> Mapping[str, str]:
        return {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}

    async def fetch(self, interval: Interval, filters: Filters = NO_FILTERS) -> FetchResult:
        """All rows of `interval` (every page), `Filters.project_ids` being workspace ids.
        Raises a `usage_api.UsageApiError` subclass on failure, never returns partial rows."""
        base = build_query(interval, filters)
        pages, requests = await self.fetch_pages(
            self.PATH,
            base,
            lambda body: parse_page(body, interval),
            what=f"{format_rfc3339(interval.start)}..{format_rfc3339(interval.end)}",
        )
        return FetchResult(
            interval=interval,
            rows=tuple(row for page in pages for row in page.rows),
            requests=requests,
            pages=len(pages),
            params=query_params(base),
        )


def client_for(
    settings: Any, session: aiohttp.ClientSession, *, quick: bool = False
) -> AnthropicUsageClient:
    """The Anthropic usage report client of a tokensettle Settings
    (`anthropic_admin_key`, `anthropic_api_base_url`, `anthropic_rate_limit_per_min`,
    `request_timeout`, `request_attempts`), as `usage_api.client_for` is OpenAI's. `quick`
    (doctor) tries twice with a short timeout. Raises ConfigError without the key."""
    from tokensettle.errors import ConfigError  # noqa: PLC0415 - light, no cycle at import

    secret = settings.anthropic_admin_key
    key = secret.get_secret_value() if secret is not None else None
    if not key:
        raise ConfigError(
            "anthropic_admin_key: not set; export TOKENSETTLE_ANTHROPIC_ADMIN_KEY (or "
            "ANTHROPIC_ADMIN_KEY) with an Anthropic Admin API key (sk-ant-admin...), or "
            "put it in the credential file anthropic_admin_key"
        )
    return AnthropicUsageClient(
        base_url=settings.anthropic_api_base_url,
        admin_key=key,
        session=session,
        rate_limit_per_min=settings.anthropic_rate_limit_per_min,
        request_timeout=10.0 if quick else settings.request_timeout.total_seconds(),
        retry=RetryPolicy(attempts=2) if quick else RetryPolicy(attempts=settings.request_attempts),
    )

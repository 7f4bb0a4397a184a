"""The aiohttp client for `GET {base}/organization/usage/completions`.

One `fetch` reads one minute-aligned interval with one-minute buckets, grouped by
api_key_id, project_id and model, following every page; `fetch_pages` is the same
machinery for any other paged query of the same page shape (the bill check's daily usage
and costs, `billing_api`). Each HTTP request is rate limited
(leaky bucket), bounded by a timeout, and retried on 429, 5xx, transport errors and
malformed bodies with exponential backoff and full jitter, honouring `Retry-After`. A
failed fetch always raises a typed `UsageApiError`; it never yields empty or zero rows.

Hostile answers are that request's failure, never a crash or data: a body is read
incrementally (aiohttp decompresses as it streams) and abandoned past `max_page_bytes`
decoded bytes; JSON nested too deeply or holding an integer Python will not read is
malformed; counts beyond the plausibility bounds of `usage.implausibility` are malformed.

The admin key is sent only in the `Authorization` header: it is not stored in any
exception, repr or log event, and server messages are scrubbed of it before use.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import aiohttp
import structlog
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from tokensettle.usage import Usage, UsageRow, UsageRowError, implausibility, usage_from_result
from tokensettle.windows import MAX_BUCKETS_PER_PAGE, Interval, floor_minute

__all__ = [
    "DEFAULT_MAX_PAGE_BYTES",
    "GROUP_BY",
    "USAGE_PATH",
    "ApiRequestError",
    "AuthError",
    "BadRequestError",
    "CappedAnswer",
    "FetchResult",
    "Filters",
    "MalformedResponseError",
    "Page",
    "PageLike",
    "PaginationError",
    "RateLimitedError",
    "ResponseTooLargeError",
    "RetryPolicy",
    "ServerError",
    "TransportError",
    "UsageApiError",
    "UsageClient",
    "build_query",
    "decode_page",
    "page_buckets",
    "page_envelope",
    "parse_page",
    "query_params",
    "request_capped",
    "result_dimension",
    "result_usage",
]

USAGE_PATH: Final = "/organization/usage/completions"
#: Pages smaller than this are decoded on the event loop; larger ones in a worker thread.
_DECODE_ON_LOOP: Final = 64 * 1024
GROUP_BY: Final = ("api_key_id", "project_id", "model")
RESULT_OBJECT: Final = "organization.usage.completions.result"
_MESSAGE_LIMIT: Final = 500
#: Decoded bytes of one page we read before giving up on it (docs/decisions.md, "HTTP
#: client"): a 1,440-bucket page fits ~27 results a minute carrying every field (~850
#: bytes each), ~48 with eight counters; parsing one at the cap peaks at ~165 MB RSS.
DEFAULT_MAX_PAGE_BYTES: Final = 32 * 1024 * 1024
#: Of an error answer we read this much: enough for any error envelope's message.
_ERROR_BODY_LIMIT: Final = 64 * 1024
_REDACTED: Final = "[REDACTED]"

log = structlog.get_logger("tokensettle.usage_api")


# --------------------------------------------------------------------------------------
# Errors


class ApiRequestError(Exception):
    """An HTTP API request failed (the base of `UsageApiError` and of the Admin API's
    `AdminApiError`). `retryable` says whether trying again later may help; `str()` is
    the one-line message, never holding a secret."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.attempt = attempt

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status!r})"


class UsageApiError(ApiRequestError):
    """A Usage API request failed. `retryable` says whether trying again later may help."""


class AuthError(UsageApiError):
    """401/403: the key is wrong or lacks the `api.usage.read` scope. Never retried."""

    status: int

    def __init__(self, message: str, *, status: int, attempt: int | None = None) -> None:
        super().__init__(message, status=status, attempt=attempt)


class BadRequestError(UsageApiError):
    """400/404/422 (and other 4xx): the request is wrong. Never retried."""


class RateLimitedError(UsageApiError):
    """429 still failing after the retries, or a `Retry-After` longer than allowed."""

    retryable = True


class ServerError(UsageApiError):
    """5xx still failing after the retries."""

    retryable = True


class TransportError(UsageApiError):
    """Connection errors or timeouts still failing after the retries."""

    retryable = True


class MalformedResponseError(UsageApiError):
    """A body that is not JSON or not the documented page shape, after the retries."""

    retryable = True


class ResponseTooLargeError(MalformedResponseError):
    """A page whose decoded body exceeds the client's `max_page_bytes`. Not retried at
    once: the same query gives the same page; the attempt fails and is tried later."""

    retryable = False


class PaginationError(UsageApiError):
    """The pages do not chain: repeated cursor, `has_more` without a cursor, too many pages,
    or buckets repeated across pages."""


# --------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True, slots=True)
class Filters:
    """Server-side filters; empty means no filter on that dimension."""

    api_key_ids: frozenset[str] = frozenset()
    project_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5  # total tries per HTTP request
    base: float = 0.5  # exponential backoff base seconds (full jitter)
    cap: float = 30.0  # max backoff seconds
    max_retry_after: float = 120.0  # a longer Retry-After is not waited for

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.base < 0 or self.cap < 0 or self.max_retry_after < 0:
            raise ValueError("RetryPolicy delays must not be negative")

    def backoff(self, failed_attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(n-1))] after the n-th failure."""
        ceiling = min(self.cap, self.base * 2.0 ** (failed_attempt - 1))
        return rng.uniform(0.0, ceiling)

    def retrying(self, rng: random.Random) -> AsyncRetrying:
        """tenacity's loop for one HTTP request (shared by the Usage and Admin clients).

        An error is tried again when its `retryable` attribute is true, after its
        `retry_after` seconds when it carries one, else after `backoff`; an error asking
        for more than `max_retry_after` fails at once (waiting that long is the caller's
        decision). The last error is re-raised."""

        def should_retry(exc: BaseException) -> bool:
            if not getattr(exc, "retryable", False):
                return False
            retry_after = getattr(exc, "retry_after", None)
            return retry_after is None or retry_after <= self.max_retry_after

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome is not None else None
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:
                return float(retry_after)
            return self.backoff(state.attempt_number, rng)

        return AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait,
            retry=retry_if_exception(should_retry),
            reraise=True,
        )


@dataclass(frozen=True, slots=True)
class FetchResult:
    interval: Interval
    rows: tuple[UsageRow, ...]  # one per result object, minute = bucket minute slot start
    requests: int  # HTTP requests actually sent, retries included
    pages: int  # pages followed
    params: dict[str, str | list[str]]  # base query parameters sent (without `page`)


@dataclass(frozen=True, slots=True)
class Page:
    """One parsed response page."""

    rows: tuple[UsageRow, ...]
    bucket_starts: tuple[int, ...]
    has_more: bool
    next_page: str | None


class PageLike(Protocol):
    """What `UsageClient.fetch_pages` needs of a parsed page to follow the cursors."""

    @property
    def bucket_starts(self) -> tuple[int, ...]: ...
    @property
    def has_more(self) -> bool: ...
    @property
    def next_page(self) -> str | None: ...


P = TypeVar("P", bound=PageLike)


# --------------------------------------------------------------------------------------
# Pure parts: the query and the page


def build_query(
    interval: Interval, filters: Filters = Filters(), page: str | None = None
) -> list[tuple[str, str]]:
    """The query for `interval` as (key, value) pairs; arrays as repeated keys, sorted."""
    pairs: list[tuple[str, str]] = [
        ("start_time", str(int(interval.start))),
        ("end_time", str(int(interval.end))),
        ("bucket_width", "1m"),
        ("limit", str(min(MAX_BUCKETS_PER_PAGE, interval.minutes))),
    ]
    pairs.extend(("group_by", dim) for dim in GROUP_BY)
    pairs.extend(("api_key_ids", key) for key in sorted(filters.api_key_ids))
    pairs.extend(("project_ids", project) for project in sorted(filters.project_ids))
    if page is not None:
        pairs.append(("page", page))
    return pairs


_ARRAY_KEYS: Final = frozenset({"group_by", "api_key_ids", "project_ids"})


def query_params(
    pairs: Sequence[tuple[str, str]], arrays: frozenset[str] = _ARRAY_KEYS
) -> dict[str, str | list[str]]:
    """The pairs as a mapping for a run's provenance: the `arrays` parameters as lists
    under their names (without the brackets Anthropic's queries send), scalars as strings."""
    out: dict[str, str | list[str]] = {}
    for key, value in pairs:
        name = key.removesuffix("[]")
        if name in arrays:
            existing = out.setdefault(name, [])
            assert isinstance(existing, list)
            existing.append(value)
        else:
            out[name] = value
    return out


def _malformed(message: str) -> MalformedResponseError:
    return MalformedResponseError(f"malformed Usage API page: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def page_envelope(
    body: object,
    *,
    page_object: bool = True,
    malformed: Callable[[str], MalformedResponseError] | None = None,
) -> tuple[list[Any], bool, str | None]:
    """The `data`, `has_more` and `next_page` of a decoded page (the page object every
    usage endpoint and the costs endpoint answer), checked strictly. `page_object`: the
    body must say `"object": "page"` (Anthropic's pages have no `object` key);
    `malformed` builds the error (its provider's words)."""
    bad = malformed or _malformed
    if not isinstance(body, Mapping):
        raise bad(f"body is {type(body).__name__}, expected an object")
    if page_object and body.get("object") != "page":
        raise bad(f"object is {body.get('object')!r}, expected 'page'")
    data = body.get("data")
    if not isinstance(data, list):
        raise bad("'data' is not a list")
    has_more = body.get("has_more")
    if not isinstance(has_more, bool):
        raise bad("'has_more' is not a boolean")
    next_page = body.get("next_page")
    if next_page is not None and not isinstance(next_page, str):
        raise bad("'next_page' is neither a string nor null")
    return data, has_more, next_page


def page_buckets(data: Sequence[Any]) -> Iterator[tuple[int, list[Mapping[str, Any]]]]:
    """Each bucket's `start_time` and result objects, checked: integer times, a results
    list of objects, buckets in increasing order."""
    previous: int | None = None
    for bucket in data:
        if not isinstance(bucket, Mapping):
            raise _malformed("a bucket is not an object")
        start = bucket.get("start_time")
        if not _is_int(start):
            raise _malformed(f"bucket start_time {start!r} is not an integer")
        assert isinstance(start, int)
        end = bucket.get("end_time")
        if end is not None and not _is_int(end):
            raise _malformed(f"bucket end_time {end!r} is not an integer")
        results = bucket.get("results")
        if not isinstance(results, list):
            raise _malformed(f"bucket {start} has no 'results' list")
        if previous is not None and start <= previous:
            raise _malformed(f"bucket {start} does not follow bucket {previous}")
        previous = start
        for result in results:
            if not isinstance(result, Mapping):
                raise _malformed(f"a result in bucket {start} is not an object")
        yield start, results


def result_usage(result: Mapping[str, Any], start: int, *, bucket_seconds: int) -> Usage:
    """The counters of one completions result of the bucket starting at `start`, checked
    for shape and plausibility over a bucket `bucket_seconds` wide."""
    if result.get("object") != RESULT_OBJECT:
        raise _malformed(f"result object is {result.get('object')!r}")
    try:
        usage = usage_from_result(result)
    except UsageRowError as exc:
        raise _malformed(f"bucket {start}: {exc}") from None
    problem = implausibility(usage, bucket_seconds=bucket_seconds)
    if problem is not None:
        raise _malformed(f"bucket {start}: implausible counts: {problem}")
    return usage


def result_dimension(result: Mapping[str, Any], name: str) -> str | None:
    """A string dimension of a result (`project_id`, `model`, ...): a string or null."""
    value = result.get(name)
    if value is not None and not isinstance(value, str):
        raise _malformed(f"result field {name!r} is {type(value).__name__}, expected string")
    return value


def parse_page(body: object, interval: Interval) -> Page:
    """Check a decoded page strictly and turn its results into rows.

    A row's minute is the bucket's minute slot (`floor_minute(bucket.start_time)`; the
    first bucket may start at the requested, unaligned start). Buckets whose slot lies
    outside `interval` are ignored. Raises MalformedResponseError on any shape problem.
    """
    data, has_more, next_page = page_envelope(body)
    rows: list[UsageRow] = []
    starts: list[int] = []
    for start, results in page_buckets(data):
        minute = floor_minute(start)
        if not interval.contains_minute(minute):
            continue
        starts.append(start)
        for result in results:
            usage = result_usage(result, start, bucket_seconds=60)  # we ask for 1m buckets
            rows.append(
                UsageRow(
                    minute=minute,
                    usage=usage,
                    api_key_id=result_dimension(result, "api_key_id"),
                    project_id=result_dimension(result, "project_id"),
                    model=result_dimension(result, "model"),
                )
            )
    return Page(
        rows=tuple(rows), bucket_starts=tuple(starts), has_more=has_more, next_page=next_page
    )


def _load_json(raw: bytes | bytearray) -> object:
    """json.loads, with every way a hostile body can make it fail as one clear line."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _malformed(
            f"body is not JSON ({exc.__class__.__name__} at byte {_pos(exc)})"
        ) from None
    except RecursionError:
        raise _malformed("body is JSON nested too deeply to read") from None
    except ValueError:
        # int() refuses integers of more than sys.get_int_max_str_digits() digits (4300)
        raise _malformed("body holds an integer too long to read") from None


def decode_page(raw: bytes | bytearray, interval: Interval) -> Page:
    return parse_page(_load_json(raw), interval)


def _pos(exc: Exception) -> int:
    return getattr(exc, "pos", getattr(exc, "start", -1))


async def read_capped(content: aiohttp.StreamReader, limit: int) -> tuple[bytearray, bool]:
    """Up to `limit` bytes of a body as aiohttp decodes it, chunk by chunk; and whether
    that was all of it. Memory stays within `limit` plus one chunk whatever is sent."""
    buf = bytearray()
    async for chunk in content.iter_any():
        buf += chunk
        if len(buf) > limit:
            del buf[limit:]
            return buf, False
    return buf, True


@dataclass(frozen=True, slots=True)
class CappedAnswer:
    """An HTTP answer read up to a cap: `complete` is false when the body went past it."""

    status: int
    body: bytearray
    complete: bool
    headers: dict[str, str]
    reason: str


async def request_capped(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    key: str,
    client_timeout: aiohttp.ClientTimeout,
    ok_limit: int,
    params: Sequence[tuple[str, str]] | None = None,
    payload: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> CappedAnswer:
    """One request with `key` as the bearer credential (only in that header), no
    redirects, the body of a 200 read up to `ok_limit` bytes and of any other answer up to
    64 KiB. Raises TimeoutError and aiohttp.ClientError as they come. `headers`, when
    given, are sent *instead of* the bearer header: another provider's authentication
    (Anthropic's `x-api-key`), which then carries the key."""
    async with session.request(
        method,
        url,
        params=list(params) if params else None,
        json=payload,
        headers=dict(headers) if headers is not None else {"Authorization": f"Bearer {key}"},
        timeout=client_timeout,
        allow_redirects=False,
    ) as resp:
        limit = ok_limit if resp.status == 200 else _ERROR_BODY_LIMIT
        body, complete = await read_capped(resp.content, limit)
        return CappedAnswer(
            resp.status, body, complete, dict(resp.headers.items()), resp.reason or ""
        )


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or HTTP date);
    header names are matched case-insensitively. None when absent or unusable."""
    headers = {k.lower(): v for k, v in headers.items()}
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - now
        return max(seconds, 0.0)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# --------------------------------------------------------------------------------------
# The client


class UsageSource(Protocol):
    """A provider's usage report: one-minute rows of an interval (UsageClient,
    anthropic_api.AnthropicUsageClient)."""

    @property
    def requests_sent(self) -> int: ...

    async def fetch(self, interval: Interval, filters: Filters = ...) -> FetchResult: ...


class UsageClient:
    """Reads the completions usage of an interval. One instance per daemon (shares the
    rate limiter); the aiohttp session is owned by the caller.

    Another provider's usage report of the same page shape (data, has_more, next_page) is a
    subclass: it sets `API_NAME`, `LOG_EVENT` and `PATH`, sends its own authentication
    headers (`_auth_headers`) and its own query (`fetch`); the retries, rate limit, typed
    errors, bounded bodies, redaction and page chaining are these."""

    #: How messages name the API ("Usage API answered HTTP 401: ...").
    API_NAME: str = "Usage API"
    #: The log event of each HTTP request.
    LOG_EVENT: str = "usage_api.request"
    #: The path `fetch` reads, under the base URL.
    PATH: str = USAGE_PATH

    def __init__(
        self,
        *,
        base_url: str,
        admin_key: str,
        session: aiohttp.ClientSession,
        rate_limit_per_min: float = 30.0,
        request_timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        max_pages: int = 500,
        max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES,
    ) -> None:
        if rate_limit_per_min <= 0:
            raise ValueError("rate_limit_per_min must be positive")
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        if max_page_bytes < 1:
            raise ValueError("max_page_bytes must be at least 1")
        self._base = base_url.rstrip("/")
        self._url = self._base + self.PATH
        self.__key = admin_key
        self._session = session
        self._limiter = AsyncLimiter(rate_limit_per_min, 60)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._retry = retry
        self._max_pages = max_pages
        self._max_page_bytes = max_page_bytes
        self._requests_sent = 0
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self._url!r}, requests_sent={self._requests_sent})"

    @property
    def endpoint(self) -> str:
        """The URL `fetch` reads (for a run's provenance); it holds no credential."""
        return self._url

    def _auth_headers(self, key: str) -> Mapping[str, str] | None:
        """The headers that carry `key`, or None for `Authorization: Bearer`."""
        return None

    @property
    def requests_sent(self) -> int:
        """HTTP requests sent over the client's life, retries included."""
        return self._requests_sent

    def _redact(self, text: str) -> str:
        text = text.replace(self.__key, _REDACTED) if self.__key else text
        return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."

    async def fetch(self, interval: Interval, filters: Filters = Filters()) -> FetchResult:
        """All rows of `interval` (every page). Raises a UsageApiError subclass on failure."""
        base = build_query(interval, filters)
        pages, requests = await self.fetch_pages(
            USAGE_PATH,
            base,
            lambda body: parse_page(body, interval),
            what=f"{interval.start}..{interval.end}",
        )
        return FetchResult(
            interval=interval,
            rows=tuple(row for page in pages for row in page.rows),
            requests=requests,
            pages=len(pages),
            params=query_params(base),
        )

    async def fetch_pages(
        self,
        path: str,
        base: list[tuple[str, str]],
        parse: Callable[[object], P],
        *,
        what: str,
    ) -> tuple[list[P], int]:
        """Every page of the query `base` to `{base_url}{path}`, following `next_page`, each
        decoded JSON body turned into a page by `parse` (which raises
        MalformedResponseError); and the HTTP requests sent, retries included. Pages must
        chain: no repeated cursor, no `has_more` without one, no bucket twice, at most
        `max_pages`. `what` names the range in errors."""
        url = self._base + path
        requests = 0  # this fetch's own count: other fetches may share the client
        pages: list[P] = []
        cursors: set[str] = set()
        cursor: str | None = None
        last_bucket: int | None = None
        while True:
            if len(pages) >= self._max_pages:
                raise PaginationError(
                    f"more than {self._max_pages} pages for {what}; "
                    "giving up rather than reading a partial range"
                )
            pairs = base if cursor is None else [*base, ("page", cursor)]
            page, tries = await self._get_page(url, pairs, parse, len(pages) + 1)
            requests += tries
            pages.append(page)
            number = len(pages)
            if page.bucket_starts:
                if last_bucket is not None and page.bucket_starts[0] <= last_bucket:
                    raise PaginationError(
                        f"page {number} repeats buckets (starts at {page.bucket_starts[0]}, "
                        f"previous page ended at bucket {last_bucket})"
                    )
                last_bucket = page.bucket_starts[-1]
            if not page.has_more:
                break
            if not page.next_page:
                raise PaginationError(f"page {number} says has_more but gives no next_page cursor")
            if page.next_page in cursors:
                raise PaginationError(f"page {number} repeats an earlier next_page cursor")
            cursors.add(page.next_page)
            cursor = page.next_page
        return pages, requests

    async def _get_page(
        self, url: str, pairs: list[tuple[str, str]], parse: Callable[[object], P], page_no: int
    ) -> tuple[P, int]:
        """The page and the number of HTTP requests it took (retries included)."""
        async for attempt in self._retry.retrying(self._rng):
            with attempt:
                number = attempt.retry_state.attempt_number
                return await self._send(url, pairs, parse, page_no, number), number
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _send(
        self,
        url: str,
        pairs: list[tuple[str, str]],
        parse: Callable[[object], P],
        page_no: int,
        attempt: int,
    ) -> P:
        """One HTTP request: its page, or the typed error for its outcome."""
        of = f"attempt {attempt} of {self._retry.attempts}"
        async with self._limiter:
            self._requests_sent += 1
            began = time.monotonic()
            try:
                answer = await request_capped(
                    self._session,
                    "GET",
                    url,
                    key=self.__key,
                    client_timeout=self._timeout,
                    ok_limit=self._max_page_bytes,
                    params=pairs,
                    headers=self._auth_headers(self.__key),
                )
            except TimeoutError:
                self._log(None, page_no, attempt, began, error="timeout")
                raise TransportError(
                    f"{self.API_NAME} request timed out after {self._timeout.total}s ({of})",
                    attempt=attempt,
                ) from None
            except aiohttp.ClientError as exc:
                self._log(None, page_no, attempt, began, error=type(exc).__name__)
                detail = self._redact(str(exc))
                raise TransportError(
                    f"{self.API_NAME} request failed: {type(exc).__name__}: {detail} ({of})",
                    attempt=attempt,
                ) from None
        status, body = answer.status, answer.body
        if status == 200 and not answer.complete:
            self._log(status, page_no, attempt, began, error="too_large")
            raise ResponseTooLargeError(
                f"malformed {self.API_NAME} page: larger than {self._max_page_bytes:,} bytes "
                f"decoded (max_page_bytes); not read further ({of})",
                status=200,
                attempt=attempt,
            )
        self._log(status, page_no, attempt, began)
        if status == 200:
            try:
                if len(body) < _DECODE_ON_LOOP:
                    return parse(_load_json(body))
                # A big page takes a while to decode: not on the event loop.
                return await asyncio.to_thread(lambda: parse(_load_json(body)))
            except MalformedResponseError as exc:
                raise MalformedResponseError(f"{exc} ({of})", status=200, attempt=attempt) from None
        raise self._status_error(
            status, reason=answer.reason, headers=answer.headers, body=body, of=of, attempt=attempt
        )

    def _status_error(
        self,
        status: int,
        *,
        reason: str,
        headers: Mapping[str, str],
        body: bytes | bytearray,
        of: str,
        attempt: int,
    ) -> UsageApiError:
        message = self._redact(_error_message(body) or reason or "no message")
        text = f"{self.API_NAME} answered HTTP {status}: {message}"
        if status in (401, 403):
            return AuthError(text, status=status, attempt=attempt)
        retry_after = parse_retry_after(headers, time.time())
        if retry_after is not None and retry_after > self._retry.max_retry_after:
            # RetryPolicy.retrying gives up on these: waiting that long is the caller's call
            text += f" (Retry-After {retry_after:g}s exceeds {self._retry.max_retry_after:g}s)"
        if status == 429:
            return RateLimitedError(
                f"{text} ({of})", status=status, retry_after=retry_after, attempt=attempt
            )
        if status >= 500:
            return ServerError(
                f"{text} ({of})", status=status, retry_after=retry_after, attempt=attempt
            )
        if status == 408:
            return TransportError(
                f"{text} ({of})", status=status, retry_after=retry_after, attempt=attempt
            )
        if 400 <= status < 500:
            return BadRequestError(text, status=status, attempt=attempt)
        return MalformedResponseError(
            f"unexpected HTTP {status} ({of})", status=status, attempt=attempt
        )

    def _log(
        self, status: int | None, page: int, attempt: int, began: float, error: str | None = None
    ) -> None:
        duration_ms = round((time.monotonic() - began) * 1000.0, 1)
        if status == 200:
            log.info(
                self.LOG_EVENT,
                status=status,
                page=page,
                attempt=attempt,
                duration_ms=duration_ms,
            )
        else:
            log.warning(
                self.LOG_EVENT,
                status=status,
                page=page,
                attempt=attempt,
                duration_ms=duration_ms,
                error=error,
            )


def _error_message(body: bytes | bytearray) -> str | None:
    """`error.message` of the standard envelope, if the body is one; prefixed with
    `error.type` in Anthropic's (`{"type": "error", "error": {"type", "message"}}`), whose
    types name the failure (`authentication_error`, `rate_limit_error`, ...)."""
    try:
        obj = _load_json(body)
    except MalformedResponseError:
        return None
    if isinstance(obj, Mapping):
        err = obj.get("error")
        if isinstance(err, Mapping) and isinstance(err.get("message"), str) and err["message"]:
            kind = err.get("type")
            if obj.get("type") == "error" and isinstance(kind, str) and kind:
                return f"{kind}: {err['message']}"
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
    return None


def client_for(
    settings: Any, session: aiohttp.ClientSession, *, quick: bool = False
) -> UsageClient:
    """The Usage API client of a tokensettle Settings (base URL, admin key, rate limit,
    timeout, attempts): the one recipe of every command and the daemon. `quick` (doctor)
    tries twice with a short timeout. Raises ConfigError without an admin key."""
    from tokensettle.errors import ConfigError  # noqa: PLC0415 - light, no cycle at import

    key = settings.secret_key()
    if not key:
        raise ConfigError(
            "admin_key: not set; export TOKENSETTLE_ADMIN_KEY (or OPENAI_ADMIN_KEY / "
            "OPENAI_API_KEY_USAGE_TRACKING) with an admin key that has api.usage.read"
        )
    return UsageClient(
        base_url=settings.api_base_url,
        admin_key=key,
        session=session,
        rate_limit_per_min=settings.rate_limit_per_min,
        request_timeout=10.0 if quick else settings.request_timeout.total_seconds(),
        retry=RetryPolicy(attempts=2) if quick else RetryPolicy(attempts=settings.request_attempts),
    )

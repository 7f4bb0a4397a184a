"""Token counts as the providers' usage reports give them, and the rows that carry them.

`Usage` is an exact, additive bag of integer counters. The three fields the API always
sends are plain ints; every other field is optional (`None` = the data did not carry it),
because the field set has changed over time and old buckets lack the breakdown.

One normalised schema serves both providers (docs/decisions.md, "Anthropic"). Its names
are OpenAI's, and `input_tokens` is *all* input, cached and cache-written tokens included,
as OpenAI reports it. Anthropic reports input disjointly; `usage_from_anthropic` adds it up:

=============================  ==========================================================
Usage                          from an Anthropic usage report result
=============================  ==========================================================
input_tokens                   uncached_input_tokens + cache_read_input_tokens
                               + cache_creation.ephemeral_5m_input_tokens
                               + cache_creation.ephemeral_1h_input_tokens
input_uncached_tokens          uncached_input_tokens
input_cached_tokens            cache_read_input_tokens
input_cache_write_tokens       ephemeral_5m_input_tokens + ephemeral_1h_input_tokens
input_cache_write_5m_tokens    cache_creation.ephemeral_5m_input_tokens
input_cache_write_1h_tokens    cache_creation.ephemeral_1h_input_tokens
output_tokens                  output_tokens
web_search_requests            server_tool_use.web_search_requests (absent: not carried)
num_model_requests             0, with `requests_counted` False: the report has no count
=============================  ==========================================================

A counter the provider sends is data only when it is plausible: see `implausibility` and
the bounds below (docs/decisions.md, "HTTP client"). Anything beyond them is a malformed
answer, never a number we store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

REQUIRED_FIELDS: tuple[str, ...] = ("input_tokens", "output_tokens", "num_model_requests")
OPTIONAL_FIELDS: tuple[str, ...] = (
    "input_cached_tokens",
    "input_cache_write_tokens",
    "input_uncached_tokens",
    "input_text_tokens",
    "output_text_tokens",
    "input_cached_text_tokens",
    "input_audio_tokens",
    "input_cached_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "input_cached_image_tokens",
    "output_image_tokens",
)
#: Optional fields the official SDK (openai 3.57.0, generated from a newer spec than our
#: extract) knows and the extract does not: cache writes split by retention. "May be absent
#: or null for older responses"; together they make up `input_cache_write_tokens`.
#: Kept apart from OPTIONAL_FIELDS, which is the extract's list (the contract tests).
SDK_OPTIONAL_FIELDS: tuple[str, ...] = (
    "input_cache_write_30m_tokens",
    "input_cache_write_12h_tokens",
)
#: What an OpenAI completions result may carry beyond the required fields.
OPENAI_OPTIONAL_FIELDS: tuple[str, ...] = OPTIONAL_FIELDS + SDK_OPTIONAL_FIELDS
#: Optional fields only Anthropic's usage report fills: cache writes by their time to live
#: (together `input_cache_write_tokens`) and the server tool's web searches (a count of
#: searches, not tokens; priced per search).
ANTHROPIC_OPTIONAL_FIELDS: tuple[str, ...] = (
    "input_cache_write_5m_tokens",
    "input_cache_write_1h_tokens",
    "web_search_requests",
)
ALL_OPTIONAL_FIELDS: tuple[str, ...] = OPENAI_OPTIONAL_FIELDS + ANTHROPIC_OPTIONAL_FIELDS
#: The optional fields each provider's usage data can carry: what a breakdown lists as
#: "not carried" when absent (a field a provider never reports is not news).
PROVIDER_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "openai": OPENAI_OPTIONAL_FIELDS,
        "anthropic": (
            "input_cached_tokens",
            "input_cache_write_tokens",
            "input_uncached_tokens",
            *ANTHROPIC_OPTIONAL_FIELDS,
        ),
    }
)
ALL_FIELDS: tuple[str, ...] = REQUIRED_FIELDS + ALL_OPTIONAL_FIELDS
DIMENSIONS: tuple[str, ...] = ("api_key_id", "project_id", "model")
#: `Usage.requests_counted` in `present()` and `from_fields` (written only when False).
REQUESTS_COUNTED = "requests_counted"
#: Whether a provider's usage data counts model requests. Anthropic's usage report does
#: not: its runs have no provider request count, and API_CALLS must not be written from it.
PROVIDER_COUNTS_REQUESTS: Mapping[str, bool] = MappingProxyType(
    {"openai": True, "anthropic": False}
)


def counts_requests(provider: str) -> bool:
    """Whether usage data of `provider` carries a model-request count (unknown: no)."""
    return PROVIDER_COUNTS_REQUESTS.get(provider, False)


def provider_fields(provider: str) -> tuple[str, ...]:
    """The optional fields `provider`'s usage data can carry (unknown: all of them)."""
    return PROVIDER_FIELDS.get(provider, ALL_OPTIONAL_FIELDS)


def _add_optional(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


@dataclass(frozen=True, slots=True)
class Usage:
    """Counters for some set of model requests. Addition is exact and associative.

    `requests_counted` is False when the data behind it does not count model requests
    (Anthropic's usage report): `num_model_requests` is then 0 and means "not reported",
    never "no requests". A sum is counted only when every part was (False wins), so an
    uncounted part can never hide in a total; the empty Usage() is counted, being the
    identity of addition. Whether a *provider* counts requests at all, whatever a
    particular total says (an empty share), is `counts_requests(provider)`.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    num_model_requests: int = 0
    input_cached_tokens: int | None = None
    input_cache_write_tokens: int | None = None
    input_uncached_tokens: int | None = None
    input_text_tokens: int | None = None
    output_text_tokens: int | None = None
    input_cached_text_tokens: int | None = None
    input_audio_tokens: int | None = None
    input_cached_audio_tokens: int | None = None
    output_audio_tokens: int | None = None
    input_image_tokens: int | None = None
    input_cached_image_tokens: int | None = None
    output_image_tokens: int | None = None
    input_cache_write_30m_tokens: int | None = None
    input_cache_write_12h_tokens: int | None = None
    input_cache_write_5m_tokens: int | None = None
    input_cache_write_1h_tokens: int | None = None
    web_search_requests: int | None = None
    requests_counted: bool = True

    def __add__(self, other: Usage) -> Usage:
        values: dict[str, int | None] = {}
        for name in REQUIRED_FIELDS:
            values[name] = getattr(self, name) + getattr(other, name)
        for name in ALL_OPTIONAL_FIELDS:
            values[name] = _add_optional(getattr(self, name), getattr(other, name))
        counted = self.requests_counted and other.requests_counted
        return Usage(**values, requests_counted=counted)  # type: ignore[arg-type]

    @property
    def cached_tokens(self) -> int:
        """Cached input tokens; 0 where the data does not carry the field."""
        return self.input_cached_tokens or 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def is_empty(self) -> bool:
        return self.input_tokens == 0 and self.output_tokens == 0 and self.num_model_requests == 0

    def present(self) -> dict[str, int]:
        """The fields this usage carries (required ones always), for JSON output; and
        `"requests_counted": false` when requests are not counted (never written when they
        are, so OpenAI's output is as it was)."""
        out: dict[str, int] = {}
        for name in ALL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if not self.requests_counted:
            out[REQUESTS_COUNTED] = False
        return out

    def replace(self, **changes: int | None) -> Usage:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @staticmethod
    def from_fields(values: Mapping[str, int | None]) -> Usage:
        """The inverse of `present()`: counters by name (unknown names ignored), and
        `requests_counted` when the mapping has it."""
        kept: dict[str, Any] = {k: v for k, v in values.items() if k in ALL_FIELDS}
        counted = values.get(REQUESTS_COUNTED)
        if counted is not None:
            kept[REQUESTS_COUNTED] = bool(counted)
        return Usage(**kept)

    @staticmethod
    def total(items: Iterable[Usage]) -> Usage:
        acc = Usage()
        for item in items:
            acc = acc + item
        return acc


class UsageRowError(ValueError):
    """A result object in a Usage API response does not have the documented shape."""


# Plausibility bounds for what one Usage API result may report (reasoning and sources in
# docs/decisions.md, "HTTP client"). They are far above anything real, and far below what
# breaks a signed 64-bit column or the sums of many rows.

#: Largest value a counter may have at all: what SQLite and every int64 column hold.
INT64_MAX = 2**63 - 1
#: Tokens (input + output) one model request may average: 100x the largest context
#: window of a current OpenAI model (GPT-4.1: 1,047,576 tokens, output included).
MAX_TOKENS_PER_REQUEST = 100_000_000
#: Tokens (input + output) one result may report per minute of its bucket: 100x the
#: highest published per-model rate limit (about 1e9 TPM on Tier 5 mini models), enough
#: for a whole Tier 5 batch queue (1.5e10) completing in one minute.
MAX_TOKENS_PER_MINUTE = 100_000_000_000
#: Model requests one result may report per minute of its bucket: 10,000x the highest
#: published per-model request limit (30,000 RPM on Tier 5).
MAX_REQUESTS_PER_MINUTE = 300_000_000


#: Counters of calls rather than tokens, bounded like model requests (a web search is one
#: call of a server tool, a few per model request at most).
_REQUEST_COUNTERS: frozenset[str] = frozenset({"num_model_requests", "web_search_requests"})


def _show(value: float) -> str:
    """A count for a message; huge ones as a power of ten (never a float conversion,
    which overflows past 1e308)."""
    if value < 10**12:
        return f"{value:,.0f}"
    exponent = round(int(value).bit_length() * 0.30103)
    return f"~1e{exponent}"


def implausibility(usage: Usage, *, bucket_seconds: int = 60) -> str | None:
    """Why `usage` (one result of a bucket `bucket_seconds` wide) cannot be real, or None.

    Checked: every counter fits a signed 64-bit integer; tokens (input + output, and each
    token counter alone), requests and web searches per minute of the bucket; tokens per
    request where the result counts requests (tokens without requests, Anthropic's among
    them, are left to the per-minute bound).
    """
    minutes = max(1, -(-bucket_seconds // 60))
    per = "minute" if minutes == 1 else f"{minutes} minutes"
    token_limit = MAX_TOKENS_PER_MINUTE * minutes
    for name in ALL_FIELDS:
        value = getattr(usage, name)
        if value is None:
            continue
        if value > INT64_MAX:
            return f"{name} ({_show(value)}) does not fit a signed 64-bit integer"
        if name == "web_search_requests" and value > MAX_REQUESTS_PER_MINUTE * minutes:
            return (
                f"{name} ({_show(value)}) exceeds the plausible "
                f"{_show(MAX_REQUESTS_PER_MINUTE * minutes)} per {per}"
            )
        if name not in _REQUEST_COUNTERS and value > token_limit:
            return f"{name} ({_show(value)}) exceeds the plausible {_show(token_limit)} per {per}"
    tokens = usage.input_tokens + usage.output_tokens
    if tokens > token_limit:
        return f"{_show(tokens)} tokens exceed the plausible {_show(token_limit)} per {per}"
    requests = usage.num_model_requests
    if requests > MAX_REQUESTS_PER_MINUTE * minutes:
        return (
            f"{_show(requests)} model requests exceed the plausible "
            f"{_show(MAX_REQUESTS_PER_MINUTE * minutes)} per {per}"
        )
    if requests and tokens > MAX_TOKENS_PER_REQUEST * requests:
        return (
            f"{_show(tokens // requests)} tokens per model request exceed the plausible "
            f"{_show(MAX_TOKENS_PER_REQUEST)}"
        )
    return None


def _int_field(result: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = result.get(name)
    if value is None:
        if required:
            raise UsageRowError(f"result lacks required field {name!r}")
        return None
    # bool is an int subclass in Python; the API never sends booleans for counters.
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageRowError(f"field {name!r} is {type(value).__name__}, expected integer")
    if value < 0:
        raise UsageRowError(f"field {name!r} is negative ({value})")
    return value


def usage_from_result(result: Mapping[str, Any]) -> Usage:
    """Parse one `organization.usage.completions.result` object (unknown keys ignored,
    Anthropic's field names among them)."""
    values: dict[str, int | None] = {}
    for name in REQUIRED_FIELDS:
        values[name] = _int_field(result, name, required=True)
    for name in OPENAI_OPTIONAL_FIELDS:
        values[name] = _int_field(result, name, required=False)
    return Usage(**values)  # type: ignore[arg-type]


def _object_field(result: Mapping[str, Any], name: str, *, required: bool) -> Mapping[str, Any]:
    value = result.get(name)
    if value is None:
        if required:
            raise UsageRowError(f"result lacks required object {name!r}")
        return {}
    if not isinstance(value, Mapping):
        raise UsageRowError(f"field {name!r} is {type(value).__name__}, expected object")
    return value


def _counter(
    result: Mapping[str, Any], name: str, *, within: str | None = None, required: bool = True
) -> int | None:
    """A counter of `result` (an object nested as `within`, for the message)."""
    try:
        return _int_field(result, name, required=required)
    except UsageRowError as exc:
        raise UsageRowError(f"{within}: {exc}" if within else str(exc)) from None


def _required_int(result: Mapping[str, Any], name: str, *, within: str | None = None) -> int:
    value = _counter(result, name, within=within)
    if value is None:  # pragma: no cover - _int_field raised already
        raise UsageRowError(f"result lacks required field {name!r}")
    return value


def usage_from_anthropic(result: Mapping[str, Any]) -> Usage:
    """Parse one result of Anthropic's `GET /v1/organizations/usage_report/messages`
    (dimension fields and unknown keys ignored) into the normalised schema (module
    docstring): total input = uncached + cache read + cache writes (5m + 1h).

    Strict, like `usage_from_result`: the four token counts and the `cache_creation`
    object are required (without them the total input is unknown), every counter must be
    a non-negative integer (no floats, booleans or strings). `server_tool_use` and its
    `web_search_requests` may be absent or null (web searches then not carried). The
    report counts no requests: `num_model_requests` is 0 and `requests_counted` False.
    """
    uncached = _required_int(result, "uncached_input_tokens")
    cache_read = _required_int(result, "cache_read_input_tokens")
    output = _required_int(result, "output_tokens")
    creation = _object_field(result, "cache_creation", required=True)
    write_5m = _required_int(creation, "ephemeral_5m_input_tokens", within="cache_creation")
    write_1h = _required_int(creation, "ephemeral_1h_input_tokens", within="cache_creation")
    tools = _object_field(result, "server_tool_use", required=False)
    web_search = _counter(tools, "web_search_requests", within="server_tool_use", required=False)
    return Usage(
        input_tokens=uncached + cache_read + write_5m + write_1h,
        output_tokens=output,
        num_model_requests=0,
        input_cached_tokens=cache_read,
        input_cache_write_tokens=write_5m + write_1h,
        input_uncached_tokens=uncached,
        input_cache_write_5m_tokens=write_5m,
        input_cache_write_1h_tokens=write_1h,
        web_search_requests=web_search,
        requests_counted=False,
    )


def usage_to_anthropic(usage: Usage) -> dict[str, Any]:
    """The counters of an Anthropic usage report result for `usage` (the inverse of
    `usage_from_anthropic`, for the simulator). ValueError when `usage` lacks a part
    Anthropic reports (uncached, cache read, a TTL's writes) or its parts do not add up
    to its input: there is no Anthropic result that says so."""
    parts = {
        "uncached_input_tokens": usage.input_uncached_tokens,
        "cache_read_input_tokens": usage.input_cached_tokens,
        "ephemeral_5m_input_tokens": usage.input_cache_write_5m_tokens,
        "ephemeral_1h_input_tokens": usage.input_cache_write_1h_tokens,
    }
    missing = sorted(k for k, v in parts.items() if v is None)
    if missing:
        raise ValueError(f"usage lacks what Anthropic reports: {', '.join(missing)}")
    counted = {k: v for k, v in parts.items() if v is not None}
    if sum(counted.values()) != usage.input_tokens:
        raise ValueError(
            f"the parts of the input ({sum(counted.values()):,}) are not its total "
            f"({usage.input_tokens:,})"
        )
    out: dict[str, Any] = {
        "uncached_input_tokens": counted["uncached_input_tokens"],
        "cache_creation": {
            "ephemeral_5m_input_tokens": counted["ephemeral_5m_input_tokens"],
            "ephemeral_1h_input_tokens": counted["ephemeral_1h_input_tokens"],
        },
        "cache_read_input_tokens": counted["cache_read_input_tokens"],
        "output_tokens": usage.output_tokens,
        "server_tool_use": {"web_search_requests": usage.web_search_requests or 0},
    }
    return out


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One result of one one-minute bucket: usage of one (key, project, model) in a minute.

    `minute` is the bucket's minute slot start (Unix seconds, a multiple of 60).
    """

    minute: int
    usage: Usage
    api_key_id: str | None = None
    project_id: str | None = None
    model: str | None = None

    def dims(self) -> tuple[str | None, str | None, str | None]:
        return (self.api_key_id, self.project_id, self.model)


@dataclass(frozen=True, slots=True)
class Scope:
    """Which usage belongs to a framework or a run: whose usage report (`provider`), and
    in it, which keys and which containers (OpenAI projects, Anthropic workspaces: both
    are `project_ids`). Each configured dimension must match (AND); no keys and no
    containers is the whole organisation of that provider."""

    api_key_ids: frozenset[str] = field(default_factory=frozenset)
    project_ids: frozenset[str] = field(default_factory=frozenset)
    provider: str = "openai"

    @property
    def is_organisation(self) -> bool:
        return not self.api_key_ids and not self.project_ids

    def matches(self, row: UsageRow) -> bool:
        if self.api_key_ids and row.api_key_id not in self.api_key_ids:
            return False
        return not (self.project_ids and row.project_id not in self.project_ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "api_key_ids": sorted(self.api_key_ids),
            "project_ids": sorted(self.project_ids),
            "organisation_wide": self.is_organisation,
        }

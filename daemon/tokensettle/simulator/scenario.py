"""The simulator's pure model: virtual requests, their revisions, and the Usage API answer.

Nothing here does I/O or reads a clock: every function that depends on time takes `now`
(Unix seconds). The HTTP layer (`server.py`) only parses HTTP, applies faults and calls
into this module, so the whole contract of the fake can be tested without sockets.

Contract followed (see ../shared/reference/usage-api-notes.md, section 7):

* a query returns buckets aligned to UTC minute/hour/day boundaries, the first clipped to
  `start_time` and the last to `min(end_time, now)`; empty buckets are present with
  `results: []`;
* a minute slot's usage is counted only when the slot *start* lies in the query range, so a
  query starting in the middle of a minute does not see that minute;
* without `group_by` a non-empty bucket has one result whose dimension fields are all
  null; with `group_by` one result per combination of the grouped fields;
* pages hold `limit` buckets; `next_page` is an opaque `page_<base64>` cursor.

Decisions of the fake where the real API is undocumented (recorded here, not observed):
non-integer times, out-of-range `limit`, unknown `bucket_width`/`group_by` values, a
cursor that does not decode or belongs to another query, and `end_time <= start_time` are
all answered with HTTP 400 `invalid_request_error`. The simulator has no user dimension:
grouping by `user_id` yields null and a `user_ids` filter matches nothing. A request's
`service_tier` ("default" unless registered otherwise) and `batch` (false unless
registered otherwise) are grouped and filtered on like the real API's (`simulator.costs`
bills them at their own prices).
Nor has it Agents API traffic: grouping by `api_source` (known to the official SDK, not to
our spec extract) yields `"unlabeled"`, which the SDK documents for "all records without
published source attribution"; ungrouped, `api_source` is null, as the SDK says.
"""

from __future__ import annotations

import base64
import binascii
import math
import random
import re
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from tokensettle.usage import (
    OPENAI_OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    Usage,
    UsageRow,
    UsageRowError,
    usage_from_anthropic,
    usage_to_anthropic,
)
from tokensettle.windows import floor_minute

#: What `simulate --seed-from` records runs under when it is not told otherwise.
DEFAULT_SEED_PROJECT: Final = "proj_simulator"
DEFAULT_SEED_MODEL: Final = "gpt-4o-mini-2024-07-18"
#: Admin key the simulator accepts when the scenario names no admin keys (dev and demo).
SIMULATOR_ADMIN_KEY: Final = "sk-admin-simulator-0000"
#: Whose usage a virtual request is (its `provider`, "openai" unless registered otherwise).
#: Each provider's endpoint answers only its own requests (`simulator.anthropic`).
PROVIDERS: Final = ("openai", "anthropic")
#: Anthropic admin key the simulator accepts when the scenario names none.
SIMULATOR_ANTHROPIC_ADMIN_KEY: Final = "sk-ant-admin-simulator-0000"
#: How an Anthropic request of the Default workspace (`"workspace_id": null`, which is how
#: the report shows that workspace) is kept: no real workspace id is empty.
DEFAULT_WORKSPACE: Final = ""
#: Anthropic's service tier when a request names none.
ANTHROPIC_STANDARD_TIER: Final = "standard"

RESULT_OBJECT: Final = "organization.usage.completions.result"
#: Bucket width name -> seconds.
BUCKET_WIDTHS: Final[Mapping[str, int]] = {"1m": 60, "1h": 3600, "1d": 86400}
#: Bucket width name -> (default limit, max limit).
LIMITS: Final[Mapping[str, tuple[int, int]]] = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
DEFAULT_BUCKET_WIDTH: Final = "1d"
#: The dimension fields of a completions result: the spec's six in its order, then
#: `api_source`, which the official SDK (openai 3.57.0) adds to result and `group_by`.
RESULT_DIMENSIONS: Final = (
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
    "service_tier",
    "api_source",
)
#: Every `group_by` value the official SDK sends for usage/completions.
GROUP_BY_VALUES: Final = frozenset(RESULT_DIMENSIONS)
#: What a grouped `api_source` says for traffic without source attribution (all of ours).
UNLABELED_SOURCE: Final = "unlabeled"
ARRAY_PARAMS: Final = frozenset({"project_ids", "user_ids", "api_key_ids", "models", "group_by"})
SCALAR_PARAMS: Final = frozenset(
    {"start_time", "end_time", "bucket_width", "limit", "page", "batch"}
)
FAULT_KINDS: Final = (
    "429",
    "500",
    "502",
    "503",
    "hang",
    "bad_json",
    "401",
    "403",
    "huge_page",
    "gzip_bomb",
    "deep_json",
    "huge_int",
    "529",
)
#: Hostile-body faults -> (what their `size` counts, default, maximum). The maxima keep a
#: typo from making the simulator itself stream for hours.
SIZED_FAULTS: Final[Mapping[str, tuple[str, int, int]]] = {
    "huge_page": ("decoded bytes of the page", 200 * 2**20, 16 * 2**30),
    "gzip_bomb": ("decoded bytes of the page", 2**30, 16 * 2**30),
    "deep_json": ("levels of nesting", 100_000, 10_000_000),
    "huge_int": ("digits of the integer", 5_000, 10_000_000),
}
#: Which requests a fault waits for: the Usage API (the default), the Admin API endpoints,
#: the model endpoints (chat completions, responses), or Anthropic's usage report.
FAULT_TARGETS: Final = ("usage", "admin", "model", "anthropic")
MISSING_SCOPE_MESSAGE: Final = (
    "You have insufficient permissions for this operation. Missing scopes: api.usage.read."
)
_INTEGER = re.compile(r"[0-9]{1,12}")
_MAX_TIME: Final = 10**11


class ScenarioError(ValueError):
    """A scenario document, registration body or fault description is invalid."""


class ApiError(Exception):
    """An error answer of the fake API, carrying the standard OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _bad_request(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param=param)


# --------------------------------------------------------------------------------------
# Virtual requests


@dataclass(frozen=True, slots=True)
class Revision:
    """The usage a request reports from `registered_at + after` seconds on."""

    after: float
    usage: Usage


@dataclass(frozen=True, slots=True)
class VirtualRequest:
    """One model request as the provider records it: completion `time`, dimensions, and
    the revisions of its counters over time (the latest visible one counts)."""

    time: float
    api_key_id: str
    project_id: str
    model: str
    revisions: tuple[Revision, ...]
    registered_at: float = 0.0
    service_tier: str = "default"
    batch: bool = False
    #: whose usage report holds it; for "anthropic", `project_id` is the workspace id
    #: (`DEFAULT_WORKSPACE` for the Default workspace) and the usage is Anthropic's
    #: normalised (`usage.usage_from_anthropic`)
    provider: str = "openai"

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ScenarioError(
                f"unknown provider {self.provider!r}; known: {', '.join(PROVIDERS)}"
            )
        if not self.revisions:
            raise ScenarioError("a virtual request needs at least one revision")
        if any(r.after < 0 for r in self.revisions):
            raise ScenarioError("revision delays must not be negative")
        ordered = tuple(sorted(self.revisions, key=lambda r: r.after))
        object.__setattr__(self, "revisions", ordered)

    @property
    def minute(self) -> int:
        """The minute slot the request is recorded in."""
        return floor_minute(self.time)

    def usage_at(self, now: float) -> Usage | None:
        """The latest revision visible at `now`, or None while the request is invisible."""
        elapsed = now - self.registered_at
        current: Usage | None = None
        for revision in self.revisions:
            if revision.after <= elapsed:
                current = revision.usage
            else:
                break
        return current

    @property
    def final_usage(self) -> Usage:
        return self.revisions[-1].usage

    def to_json(self) -> dict[str, Any]:
        if self.provider == "anthropic":
            return _anthropic_request_json(self)
        return {
            "time": self.time,
            "api_key_id": self.api_key_id,
            "project_id": self.project_id,
            "model": self.model,
            "registered_at": self.registered_at,
            "revisions": [{"after": r.after, "usage": r.usage.present()} for r in self.revisions],
            **_tier_json(self),
        }


def _anthropic_request_json(req: VirtualRequest) -> dict[str, Any]:
    """An Anthropic request as `request_from_json` reads it (its usage in Anthropic's shape)."""
    out: dict[str, Any] = {
        "provider": "anthropic",
        "time": req.time,
        "api_key_id": req.api_key_id,
        "workspace_id": req.project_id or None,
        "model": req.model,
        "registered_at": req.registered_at,
        "revisions": [
            {"after": r.after, "usage": usage_to_anthropic(r.usage)} for r in req.revisions
        ],
    }
    if req.service_tier != ANTHROPIC_STANDARD_TIER:
        out["service_tier"] = req.service_tier
    return out


def _tier_json(req: VirtualRequest) -> dict[str, Any]:
    """A request's service tier and batch flag, where they are not the defaults."""
    out: dict[str, Any] = {}
    if req.service_tier != "default":
        out["service_tier"] = req.service_tier
    if req.batch:
        out["batch"] = True
    return out


def _tier_fields(obj: Mapping[str, Any]) -> tuple[str, bool]:
    """`service_tier` (default "default") and `batch` (default false) of a request object."""
    tier = obj.get("service_tier", "default")
    if not isinstance(tier, str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", tier):
        raise ScenarioError(f"'service_tier' must be a tier name like 'flex', got {tier!r}")
    batch = obj.get("batch", False)
    if not isinstance(batch, bool):
        raise ScenarioError(f"'batch' must be true or false, got {batch!r}")
    return tier, batch


def _number(obj: Mapping[str, Any], name: str, default: float | None = None) -> float:
    value = obj.get(name, default)
    if value is None:
        raise ScenarioError(f"{name!r} is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(f"{name!r} must be a finite number, got {value!r}")
    return float(value)


def _string(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise ScenarioError(f"{name!r} must be a non-empty string, got {value!r}")
    return value


_OPENAI_FIELDS: Final = frozenset(REQUIRED_FIELDS + OPENAI_OPTIONAL_FIELDS)


def usage_from_json(obj: object) -> Usage:
    """Token counters from a JSON object; unknown fields are refused (typos would
    otherwise silently become zeros), and so are fields only Anthropic reports (an OpenAI
    result never carries them). Missing required counters default to 0."""
    if not isinstance(obj, Mapping):
        raise ScenarioError(f"usage must be an object, got {type(obj).__name__}")
    values: dict[str, int | None] = {}
    for name, value in obj.items():
        if name not in _OPENAI_FIELDS:
            raise ScenarioError(f"unknown usage field {name!r}")
        if value is None and name not in REQUIRED_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ScenarioError(f"usage field {name!r} must be a non-negative integer")
        values[name] = value
    return Usage.from_fields(values)


#: The counters of an Anthropic request's usage, as the usage report names them
#: (nested objects -> their members); a missing one is 0.
ANTHROPIC_USAGE_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "uncached_input_tokens": frozenset(),
    "cache_read_input_tokens": frozenset(),
    "cache_creation": frozenset({"ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"}),
    "output_tokens": frozenset(),
    "server_tool_use": frozenset({"web_search_requests"}),
}


def anthropic_usage_from_json(obj: object) -> Usage:
    """An Anthropic request's counters, given in the usage report's shape (`{"uncached_input_
    tokens", "cache_read_input_tokens", "cache_creation": {"ephemeral_5m_input_tokens",
    "ephemeral_1h_input_tokens"}, "output_tokens", "server_tool_use": {"web_search_
    requests"}}`), as the normalised Usage the client would read from them. Unknown fields
    are refused (a typo would be a silent zero); missing ones are 0."""
    if not isinstance(obj, Mapping):
        raise ScenarioError(f"usage must be an object, got {type(obj).__name__}")
    full: dict[str, Any] = {}
    for name, members in ANTHROPIC_USAGE_KEYS.items():
        value = obj.get(name, {} if members else 0)
        if members:
            if not isinstance(value, Mapping) or set(value) - members:
                raise ScenarioError(
                    f"usage field {name!r} must be an object of {', '.join(sorted(members))}"
                )
            value = {m: value.get(m, 0) for m in sorted(members)}
        full[name] = value
    unknown = set(obj) - set(ANTHROPIC_USAGE_KEYS)
    if unknown:
        raise ScenarioError(
            f"unknown Anthropic usage fields: {sorted(unknown)}; known: "
            + ", ".join(ANTHROPIC_USAGE_KEYS)
        )
    try:
        return usage_from_anthropic(full)
    except UsageRowError as exc:
        raise ScenarioError(
            f"Anthropic usage: {exc} (counters are non-negative integers)"
        ) from None


def _revisions(obj: Mapping[str, Any], read: Callable[[object], Usage]) -> tuple[Revision, ...]:
    """A request's `usage` (+ `visible_after`) and/or `revisions`, each usage read by `read`."""
    revisions: list[Revision] = []
    if "usage" in obj:
        after = _number(obj, "visible_after", 0.0)
        revisions.append(Revision(after=after, usage=read(obj["usage"])))
    elif "visible_after" in obj:
        raise ScenarioError("'visible_after' needs 'usage'")
    raw_revisions = obj.get("revisions", [])
    if not isinstance(raw_revisions, list):
        raise ScenarioError("'revisions' must be a list")
    for raw in raw_revisions:
        if not isinstance(raw, Mapping) or set(raw) - {"after", "usage"}:
            raise ScenarioError(f"a revision must be {{'after', 'usage'}}, got {raw!r}")
        revisions.append(Revision(after=_number(raw, "after"), usage=read(raw["usage"])))
    if not revisions:
        raise ScenarioError("a request needs 'usage' or 'revisions'")
    return tuple(revisions)


_REQUEST_KEYS: Final = frozenset(
    {"time", "api_key_id", "project_id", "model", "usage", "visible_after", "revisions"}
    | {"registered_at", "service_tier", "batch", "provider"}
)
_ANTHROPIC_REQUEST_KEYS: Final = (_REQUEST_KEYS - {"project_id", "batch"}) | {"workspace_id"}


def request_from_json(obj: object, *, registered_at: float) -> VirtualRequest:
    """Parse one request of `POST /_sim/requests` or of a scenario file.

    `usage` (visible `visible_after` seconds after registration, default 0) and/or
    `revisions` (`[{"after": s, "usage": {...}}]`) give the counters over time. A
    `registered_at` in the object (as written by `Scenario.to_json`) wins over the argument.
    `provider` (default "openai") says whose usage report holds it: an "anthropic" request
    names a `workspace_id` (null or absent: the Default workspace) instead of a
    `project_id`, its `usage` is in the usage report's shape (`anthropic_usage_from_json`),
    its `service_tier` defaults to "standard" and it has no `batch` flag (Anthropic's batch
    usage is the tier "batch").
    """
    if not isinstance(obj, Mapping):
        raise ScenarioError(f"a request must be an object, got {type(obj).__name__}")
    provider = obj.get("provider", "openai")
    if provider not in PROVIDERS:
        raise ScenarioError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    anthropic = provider == "anthropic"
    unknown = set(obj) - (_ANTHROPIC_REQUEST_KEYS if anthropic else _REQUEST_KEYS)
    if unknown:
        raise ScenarioError(f"unknown {provider} request fields: {sorted(unknown)}")
    revisions = _revisions(obj, anthropic_usage_from_json if anthropic else usage_from_json)
    if anthropic:
        workspace = obj.get("workspace_id")
        tier, _ = _tier_fields({"service_tier": ANTHROPIC_STANDARD_TIER, **obj})
        container = DEFAULT_WORKSPACE if workspace is None else _string(obj, "workspace_id")
        batch = False
    else:
        tier, batch = _tier_fields(obj)
        container = _string(obj, "project_id")
    return VirtualRequest(
        time=_number(obj, "time"),
        api_key_id=_string(obj, "api_key_id"),
        project_id=container,
        model=_string(obj, "model"),
        revisions=revisions,
        registered_at=_number(obj, "registered_at", registered_at),
        service_tier=tier,
        batch=batch,
        provider=provider,
    )


K = TypeVar("K", bound=tuple[Any, ...])


def _summed(items: Iterable[tuple[K, Usage]]) -> list[tuple[K, Usage]]:
    """Usage summed per key, sorted by key."""
    acc: dict[K, Usage] = {}
    for k, usage in items:
        acc[k] = acc[k] + usage if k in acc else usage
    return sorted(acc.items(), key=lambda kv: _sort_key(kv[0]))


def aggregate(
    items: Iterable[tuple[int, str | None, str | None, str | None, Usage]],
) -> list[UsageRow]:
    """Sum usage per (minute, api_key_id, project_id, model), sorted by that key."""
    return [
        UsageRow(minute=m, usage=u, api_key_id=k, project_id=p, model=mo)
        for (m, k, p, mo), u in _summed(((m, k, p, mo), u) for m, k, p, mo, u in items)
    ]


@dataclass(frozen=True, slots=True)
class TieredRow(UsageRow):
    """A row of the usage answer: per minute, key, project, model, service tier and batch."""

    service_tier: str = "default"
    batch: bool = False


def aggregate_tiered(items: Iterable[tuple[VirtualRequest, Usage]]) -> list[TieredRow]:
    """Sum each request's usage per minute, key, project, model, tier and batch."""
    keyed = (
        ((r.minute, r.api_key_id, r.project_id, r.model, r.service_tier, r.batch), u)
        for r, u in items
    )
    return [
        TieredRow(m, u, k, p, mo, service_tier=tier, batch=batch)
        for (m, k, p, mo, tier, batch), u in _summed(keyed)
    ]


def _sort_key(values: Sequence[object]) -> tuple[tuple[int, str], ...]:
    """Order tuples that may hold None, ints, bools and strings (None first)."""
    return tuple(
        (0, "") if v is None else (1, f"{v:020d}" if isinstance(v, int) else str(v)) for v in values
    )


# --------------------------------------------------------------------------------------
# Faults


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure, consumed by the next request of its `target` (FIFO per
    target; "usage" by default).

    `size` parameterises the hostile-body kinds (`SIZED_FAULTS`); 0 means their default.
    """

    kind: str
    retry_after: int | None = None
    seconds: float = 0.0
    size: int = 0
    target: str = "usage"

    def __post_init__(self) -> None:
        if self.target not in FAULT_TARGETS:
            raise ScenarioError(
                f"unknown fault target {self.target!r}; known: {', '.join(FAULT_TARGETS)}"
            )
        if self.kind not in FAULT_KINDS:
            raise ScenarioError(
                f"unknown fault kind {self.kind!r}; known: {', '.join(FAULT_KINDS)}"
            )
        if self.size:
            if self.kind not in SIZED_FAULTS:
                raise ScenarioError(f"'size' only applies to {', '.join(SIZED_FAULTS)} faults")
            what, _, most = SIZED_FAULTS[self.kind]
            if not 1 <= self.size <= most:
                raise ScenarioError(f"'size' ({what}) must be between 1 and {most}")
        if self.kind == "529" and self.target != "anthropic":
            raise ScenarioError("a 529 fault (Anthropic's 'overloaded') needs target 'anthropic'")
        if self.retry_after is not None:
            if self.kind not in ("429", "503", "529"):
                raise ScenarioError("'retry_after' only applies to 429, 503 and 529 faults")
            if self.retry_after < 1:
                raise ScenarioError("'retry_after' must be an integer >= 1")
        if self.seconds < 0 or (self.kind == "hang" and self.seconds == 0):
            raise ScenarioError("a hang fault needs 'seconds' > 0")

    @property
    def effective_size(self) -> int:
        """`size`, or the kind's default."""
        return self.size or SIZED_FAULTS[self.kind][1]

    @staticmethod
    def from_json(obj: object) -> Fault:
        if not isinstance(obj, Mapping) or set(obj) - {
            "kind",
            "retry_after",
            "seconds",
            "size",
            "target",
        }:
            raise ScenarioError(
                "a fault must be {'kind', 'retry_after'?, 'seconds'?, 'size'?, 'target'?}, "
                f"got {obj!r}"
            )
        kind = obj.get("kind")
        if isinstance(kind, int) and not isinstance(kind, bool):
            kind = str(kind)
        if not isinstance(kind, str):
            raise ScenarioError(f"fault 'kind' must be a string, got {kind!r}")
        retry_after = obj.get("retry_after")
        if retry_after is not None and (
            isinstance(retry_after, bool) or not isinstance(retry_after, int)
        ):
            raise ScenarioError("'retry_after' must be an integer number of seconds")
        seconds = _number(obj, "seconds", 0.0)
        size = obj.get("size", 0)
        if isinstance(size, bool) or not isinstance(size, int):
            raise ScenarioError("'size' must be an integer")
        target = obj.get("target", "usage")
        if not isinstance(target, str):
            raise ScenarioError(f"fault 'target' must be a string, got {target!r}")
        return Fault(kind=kind, retry_after=retry_after, seconds=seconds, size=size, target=target)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        if self.seconds:
            out["seconds"] = self.seconds
        if self.size:
            out["size"] = self.size
        if self.target != "usage":
            out["target"] = self.target
        return out


# --------------------------------------------------------------------------------------
# The scenario


class Scenario:
    """Virtual requests, keys and pending faults. Mutable; no clock reads."""

    def __init__(
        self,
        requests: Iterable[VirtualRequest] = (),
        *,
        admin_keys: Iterable[str] = (),
        unscoped_keys: Iterable[str] = (),
        faults: Iterable[Fault] = (),
        seed: int = 0,
        admin: Mapping[str, Any] | None = None,
        anthropic_admin_keys: Iterable[str] = (),
        anthropic_unscoped_keys: Iterable[str] = (),
    ) -> None:
        self.admin_keys: set[str] = set(admin_keys)
        self.unscoped_keys: set[str] = set(unscoped_keys)
        #: OpenAI's requests: everything that reads `requests` (the usage and costs
        #: endpoints, truth, seeding) sees OpenAI usage only
        self.requests: list[VirtualRequest] = []
        #: Anthropic's requests, answered only by its usage report (`simulator.anthropic`)
        self.anthropic_requests: list[VirtualRequest] = []
        #: Anthropic Admin API keys (`x-api-key`), and keys that are not admin keys (403)
        self.anthropic_admin_keys: set[str] = set(anthropic_admin_keys)
        self.anthropic_unscoped_keys: set[str] = set(anthropic_unscoped_keys)
        for req in requests:
            self.add(req)
        self.faults: deque[Fault] = deque(faults)
        self.seed = seed
        #: The "admin" section (projects, static keys, knobs) as given; the server builds
        #: `simulator.admin.AdminModel` from it (None: the default projects).
        self.admin = admin

    def __repr__(self) -> str:
        # Keys are secrets even in a simulator: never print them.
        return (
            f"Scenario(requests={len(self.requests)}, admin_keys={len(self.admin_keys)}, "
            f"unscoped_keys={len(self.unscoped_keys)}, faults={len(self.faults)}, "
            f"anthropic_requests={len(self.anthropic_requests)}, "
            f"anthropic_admin_keys={len(self.anthropic_admin_keys)})"
        )

    def add(self, req: VirtualRequest) -> None:
        """Register a request with its provider's usage (`requests` or `anthropic_requests`)."""
        (self.anthropic_requests if req.provider == "anthropic" else self.requests).append(req)

    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def next_fault(self, target: str = "usage") -> Fault | None:
        """The oldest pending fault for `target`, removed from the queue."""
        for fault in self.faults:
            if fault.target == target:
                self.faults.remove(fault)
                return fault
        return None

    def reset(self) -> None:
        """Forget requests (both providers') and pending faults (keys stay)."""
        self.requests.clear()
        self.anthropic_requests.clear()
        self.faults.clear()

    @property
    def accepted_keys(self) -> frozenset[str]:
        return frozenset(self.admin_keys) if self.admin_keys else frozenset({SIMULATOR_ADMIN_KEY})

    @property
    def anthropic_accepted_keys(self) -> frozenset[str]:
        """The Anthropic admin keys, or the simulator's default one when none are named."""
        keys = self.anthropic_admin_keys
        return frozenset(keys) if keys else frozenset({SIMULATOR_ANTHROPIC_ADMIN_KEY})

    def check_auth(self, authorization: str | None) -> ApiError | None:
        """None when the `Authorization` header carries an accepted admin key."""
        return check_auth(authorization, self.accepted_keys, frozenset(self.unscoped_keys))

    def visible_rows(self, now: float) -> list[UsageRow]:
        """The latest visible revision of every request, summed per (minute, key, project,
        model). Requests not yet visible at `now` are absent."""
        items = []
        for req in self.requests:
            usage = req.usage_at(now)
            if usage is not None:
                items.append((req.minute, req.api_key_id, req.project_id, req.model, usage))
        return aggregate(items)

    def truth(self) -> list[UsageRow]:
        """Final revisions of every request, aggregated: what the API settles to."""
        return aggregate(
            (r.minute, r.api_key_id, r.project_id, r.model, r.final_usage) for r in self.requests
        )

    def visible_tiered_rows(self, now: float) -> list[TieredRow]:
        """`visible_rows`, kept apart by service tier and batch too (what the API answers)."""
        visible = ((r, r.usage_at(now)) for r in self.requests)
        return aggregate_tiered((r, u) for r, u in visible if u is not None)

    def respond(self, pairs: Sequence[tuple[str, str]], now: float) -> dict[str, Any]:
        """The 200 page for a query (raises ApiError for a 400)."""
        query = parse_query(pairs)
        return build_page(query, self.visible_tiered_rows(now), now, seed=self.seed)

    @staticmethod
    def from_json(obj: object, *, registered_at: float = 0.0) -> Scenario:
        """Load `{"admin_keys", "unscoped_keys", "seed", "requests", "faults", "admin"}`
        (all optional). Requests without their own `registered_at` get the argument.
        `admin` is only checked to be an object here (`simulator.admin` reads it)."""
        if not isinstance(obj, Mapping):
            raise ScenarioError("a scenario must be a JSON object")
        unknown = set(obj) - _SCENARIO_KEYS
        if unknown:
            raise ScenarioError(f"unknown scenario fields: {sorted(unknown)}")
        admin = _string_list(obj.get("admin_keys", []), "admin_keys")
        unscoped = _string_list(obj.get("unscoped_keys", []), "unscoped_keys")
        ant_admin = _string_list(obj.get("anthropic_admin_keys", []), "anthropic_admin_keys")
        ant_unscoped = _string_list(
            obj.get("anthropic_unscoped_keys", []), "anthropic_unscoped_keys"
        )
        seed = obj.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ScenarioError("'seed' must be an integer")
        raw_requests = obj.get("requests", [])
        raw_faults = obj.get("faults", [])
        if not isinstance(raw_requests, list) or not isinstance(raw_faults, list):
            raise ScenarioError("'requests' and 'faults' must be lists")
        admin_section = obj.get("admin")
        if admin_section is not None and not isinstance(admin_section, Mapping):
            raise ScenarioError("'admin' must be an object")
        return Scenario(
            (request_from_json(r, registered_at=registered_at) for r in raw_requests),
            admin_keys=admin,
            unscoped_keys=unscoped,
            faults=(Fault.from_json(f) for f in raw_faults),
            seed=seed,
            admin=admin_section,
            anthropic_admin_keys=ant_admin,
            anthropic_unscoped_keys=ant_unscoped,
        )

    def to_json(self) -> dict[str, Any]:
        anthropic_keys: dict[str, Any] = {}
        if self.anthropic_admin_keys or self.anthropic_unscoped_keys:
            anthropic_keys = {
                "anthropic_admin_keys": sorted(self.anthropic_admin_keys),
                "anthropic_unscoped_keys": sorted(self.anthropic_unscoped_keys),
            }
        return {
            "admin_keys": sorted(self.admin_keys),
            "unscoped_keys": sorted(self.unscoped_keys),
            "seed": self.seed,
            "requests": [r.to_json() for r in [*self.requests, *self.anthropic_requests]],
            "faults": [f.to_json() for f in self.faults],
            **({"admin": dict(self.admin)} if self.admin is not None else {}),
            **anthropic_keys,
        }


_SCENARIO_KEYS: Final = frozenset(
    {"admin_keys", "unscoped_keys", "seed", "requests", "faults", "admin"}
    | {"anthropic_admin_keys", "anthropic_unscoped_keys"}
)


def _string_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ScenarioError(f"{name!r} must be a list of non-empty strings")
    return list(value)


def check_auth(
    authorization: str | None, accepted: frozenset[str], unscoped: frozenset[str]
) -> ApiError | None:
    """401 for a missing, non-Bearer or unknown key, 403 for a key without the usage scope.

    The key is never echoed back (the real API shows a masked key; the fake shows none).
    """
    if not authorization:
        return ApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return ApiError(
            401,
            "Incorrect API key provided. Use an admin key with Bearer authentication.",
            code="invalid_api_key",
        )
    if key in unscoped:
        return ApiError(403, MISSING_SCOPE_MESSAGE)
    if key not in accepted:
        return ApiError(
            401,
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )
    return None


# --------------------------------------------------------------------------------------
# Queries


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A validated `GET /organization/usage/completions` query."""

    start_time: int
    end_time: int | None = None
    bucket_width: str = DEFAULT_BUCKET_WIDTH
    limit: int = LIMITS[DEFAULT_BUCKET_WIDTH][0]
    group_by: tuple[str, ...] = ()
    project_ids: frozenset[str] = field(default_factory=frozenset)
    user_ids: frozenset[str] = field(default_factory=frozenset)
    api_key_ids: frozenset[str] = field(default_factory=frozenset)
    models: frozenset[str] = field(default_factory=frozenset)
    batch: bool | None = None
    page: str | None = None

    @property
    def width_seconds(self) -> int:
        return BUCKET_WIDTHS[self.bucket_width]


def _parse_time(name: str, value: str) -> int:
    if not _INTEGER.fullmatch(value) or int(value) > _MAX_TIME:
        raise _bad_request(
            f"Invalid type for '{name}': expected an integer (Unix seconds), but got {value!r}.",
            name,
        )
    return int(value)


def split_params(
    pairs: Sequence[tuple[str, str]], array_params: frozenset[str], scalar_params: frozenset[str]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The scalars and arrays of a query. Arrays as repeated `k=v`, `k[]=v` or comma-joined
    `k=a,b` (and any mixture); a scalar given twice is a 400; unknown keys are ignored."""
    scalars: dict[str, str] = {}
    arrays: dict[str, list[str]] = {name: [] for name in array_params}
    for raw_key, value in pairs:
        key = raw_key[:-2] if raw_key.endswith("[]") else raw_key
        if key in array_params:
            arrays[key].extend(part for part in value.split(",") if part)
        elif raw_key in scalar_params:
            if raw_key in scalars:
                raise _bad_request(f"'{raw_key}' was given more than once.", raw_key)
            scalars[raw_key] = value
    return scalars, arrays


def parse_range(scalars: Mapping[str, str]) -> tuple[int, int | None]:
    """`start_time` (required) and `end_time` (optional, after the start)."""
    if "start_time" not in scalars:
        raise _bad_request("Missing required parameter: 'start_time'.", "start_time")
    start = _parse_time("start_time", scalars["start_time"])
    end: int | None = None
    if "end_time" in scalars:
        end = _parse_time("end_time", scalars["end_time"])
        if end <= start:
            raise _bad_request("'end_time' must be greater than 'start_time'.", "end_time")
    return start, end


def parse_limit(scalars: Mapping[str, str], width: str, default: int, most: int) -> int:
    """`limit`: buckets per page, 1..`most`, `default` when absent."""
    if "limit" not in scalars:
        return default
    raw = scalars["limit"]
    if not _INTEGER.fullmatch(raw) or not 1 <= int(raw) <= most:
        raise _bad_request(
            f"Invalid value for 'limit': {raw!r}. With bucket_width={width} the limit "
            f"must be an integer between 1 and {most}.",
            "limit",
        )
    return int(raw)


def parse_group_by(values: Iterable[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """`group_by` values, each one of `allowed`, repeats dropped, in the order given."""
    group_by: list[str] = []
    for value in values:
        if value not in allowed:
            raise _bad_request(
                f"Invalid value for 'group_by': {value!r}. Supported values are "
                + ", ".join(f"'{v}'" for v in allowed)
                + ".",
                "group_by",
            )
        if value not in group_by:
            group_by.append(value)
    return tuple(group_by)


def parse_query(pairs: Sequence[tuple[str, str]]) -> UsageQuery:
    """Validate a query given as decoded (key, value) pairs, in order.

    Arrays are accepted as repeated `k=v`, as `k[]=v` and as comma-joined `k=a,b` (and any
    mixture). A scalar given twice is refused. Unknown parameters are ignored.
    """
    scalars, arrays = split_params(pairs, ARRAY_PARAMS, SCALAR_PARAMS)
    start, end = parse_range(scalars)
    width = scalars.get("bucket_width", DEFAULT_BUCKET_WIDTH)
    if width not in BUCKET_WIDTHS:
        raise _bad_request(
            f"Invalid value for 'bucket_width': {width!r}. Supported values are '1m', '1h' "
            "and '1d'.",
            "bucket_width",
        )
    limit = parse_limit(scalars, width, *LIMITS[width])
    group_by = parse_group_by(arrays["group_by"], RESULT_DIMENSIONS)
    batch: bool | None = None
    if "batch" in scalars:
        raw = scalars["batch"].lower()
        if raw not in ("true", "false"):
            raise _bad_request("Invalid value for 'batch': expected true or false.", "batch")
        batch = raw == "true"
    page = scalars.get("page") or None
    return UsageQuery(
        start_time=start,
        end_time=end,
        bucket_width=width,
        limit=limit,
        group_by=group_by,
        project_ids=frozenset(arrays["project_ids"]),
        user_ids=frozenset(arrays["user_ids"]),
        api_key_ids=frozenset(arrays["api_key_ids"]),
        models=frozenset(arrays["models"]),
        batch=batch,
        page=page,
    )


# --------------------------------------------------------------------------------------
# Buckets and pages


@dataclass(frozen=True, slots=True)
class BucketGrid:
    """The buckets of `[start, end)` for one width: UTC-aligned, first and last clipped."""

    start: int
    end: int
    width: int

    @property
    def first_boundary(self) -> int:
        return (self.start // self.width) * self.width + self.width

    def __len__(self) -> int:
        if self.end <= self.start:
            return 0
        f = self.first_boundary
        if self.end <= f:
            return 1
        return 1 + math.ceil((self.end - f) / self.width)

    def bucket(self, k: int) -> tuple[int, int]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        f = self.first_boundary
        lo = self.start if k == 0 else f + (k - 1) * self.width
        return lo, min(f + k * self.width, self.end)

    def index_of(self, t: int) -> int:
        """Index of the bucket containing `t` (which must lie in `[start, end)`)."""
        f = self.first_boundary
        return 0 if t < f else (t - f) // self.width + 1

    def index_starting_at(self, t: int) -> int | None:
        """Index of the bucket that starts exactly at `t`, if any."""
        if not self.start <= t < self.end:
            return None
        k = self.index_of(t)
        return k if self.bucket(k)[0] == t else None


def effective_end(query: UsageQuery, now: float) -> int:
    """The last bucket ends at `min(end_time, now)`; without `end_time` at `now`."""
    now_s = math.floor(now)
    return now_s if query.end_time is None else min(query.end_time, now_s)


def grid_for(query: UsageQuery, now: float) -> BucketGrid:
    return BucketGrid(query.start_time, effective_end(query, now), query.width_seconds)


_CURSOR = struct.Struct(">qqq")


def encode_cursor(query: UsageQuery, bucket_start: int) -> str:
    """Opaque cursor naming the next bucket of this query (its start time and width)."""
    raw = _CURSOR.pack(query.start_time, query.width_seconds, bucket_start)
    return "page_" + base64.urlsafe_b64encode(raw).decode("ascii")


def decode_cursor(query: UsageQuery, grid: BucketGrid) -> int:
    """Index of the first bucket of the page `query.page` names (0 without a cursor)."""
    if query.page is None:
        return 0
    invalid = _bad_request(
        "Invalid value for 'page': the cursor is not valid for this query.", "page"
    )
    cursor = query.page
    if not cursor.startswith("page_"):
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor[len("page_") :].encode("ascii"))
        start, width, bucket_start = _CURSOR.unpack(raw)
    except (binascii.Error, struct.error, UnicodeEncodeError, ValueError):
        raise invalid from None
    if start != query.start_time or width != query.width_seconds:
        raise invalid
    k = grid.index_starting_at(bucket_start)
    if k is None or k == 0:
        raise invalid
    return k


def _dimension(row: UsageRow, name: str) -> str | bool | None:
    if isinstance(row, TieredRow) and name in ("service_tier", "batch"):
        return row.service_tier if name == "service_tier" else row.batch
    if name == "api_key_id":
        return row.api_key_id
    if name == "project_id":
        return row.project_id
    if name == "model":
        return row.model
    if name == "api_source":
        return UNLABELED_SOURCE  # no simulated request comes from the Agents API
    return None  # user_id: not modelled; service_tier, batch: only on tiered rows


def _row_matches(query: UsageQuery, row: UsageRow) -> bool:
    if query.api_key_ids and row.api_key_id not in query.api_key_ids:
        return False
    if query.project_ids and row.project_id not in query.project_ids:
        return False
    if query.models and row.model not in query.models:
        return False
    if query.user_ids:
        return False  # no request carries a user
    batch = row.batch if isinstance(row, TieredRow) else False
    return query.batch is None or query.batch == batch


def result_object(
    usage: Usage, dims: Mapping[str, str | bool | None], rng: random.Random | None
) -> dict[str, Any]:
    """One completions result: required counters, the optional counters the usage carries,
    and all six dimension fields (null unless given). Key order shuffled by `rng`."""
    items: list[tuple[str, Any]] = [("object", RESULT_OBJECT)]
    items.extend(usage.present().items())
    items.extend((name, dims.get(name)) for name in RESULT_DIMENSIONS)
    if rng is not None:
        rng.shuffle(items)
    return dict(items)


def bucket_results(
    query: UsageQuery, rows: Iterable[UsageRow], *, rng: random.Random | None = None
) -> list[dict[str, Any]]:
    """The results of one bucket from the (already filtered) rows that fall in it."""
    groups: dict[tuple[str | bool | None, ...], Usage] = {}
    for row in rows:
        key = tuple(_dimension(row, name) for name in query.group_by)
        groups[key] = groups[key] + row.usage if key in groups else row.usage
    results = []
    for key in sorted(groups, key=_sort_key):
        dims = dict(zip(query.group_by, key, strict=True))
        results.append(result_object(groups[key], dims, rng))
    return results


def build_page(
    query: UsageQuery, rows: Iterable[UsageRow], now: float, *, seed: int | None = 0
) -> dict[str, Any]:
    """The 200 answer for `query` over `rows` (the rows visible at `now`).

    `seed` makes the shuffled key order reproducible; None keeps a fixed order.
    """
    grid = grid_for(query, now)
    first = decode_cursor(query, grid)
    total = len(grid)
    last = min(first + query.limit, total)  # exclusive
    per_bucket: dict[int, list[UsageRow]] = {}
    if first < last:
        lo = grid.bucket(first)[0]
        hi = grid.bucket(last - 1)[1]
        for row in rows:
            if lo <= row.minute < hi and _row_matches(query, row):
                per_bucket.setdefault(grid.index_of(row.minute), []).append(row)
    data = []
    for k in range(first, last):
        b_start, b_end = grid.bucket(k)
        rng = None if seed is None else random.Random(f"{seed}:{b_start}")
        data.append(
            {
                "object": "bucket",
                "start_time": b_start,
                "end_time": b_end,
                "results": bucket_results(query, per_bucket.get(k, ()), rng=rng),
            }
        )
    has_more = last < total
    return {
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": encode_cursor(query, grid.bucket(last)[0]) if has_more else None,
    }

"""The client's requests and the simulator's answers, checked against Anthropic's usage
report contract as the reference notes give it (usage-api-notes.md section 6, from the API
reference pages and the official cookbook).

There is no OpenAPI extract for Anthropic's Admin API, so the contract is written out here
as explicit checks (`request_problems`, `page_problems`, `error_problems`), each with a test
that it catches what it should: a check that cannot fail would prove nothing.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from tokensettle.anthropic_api import AnthropicUsageClient
from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.usage_api import Filters, RetryPolicy
from tokensettle.windows import Interval, floor_minute

KEY = "sk-ant-admin01-contract-0000"
NOT_ADMIN = "sk-ant-api03-contract-0000"
DAY = 86_400

# ---------------------------------------------------------------------------- the contract

PATH = "/v1/organizations/usage_report/messages"
VERSION = "2023-06-01"
BUCKET_WIDTHS = {"1m": 1440, "1h": 168, "1d": 31}  # width -> max limit
SCALARS = {"starting_at", "ending_at", "bucket_width", "limit", "page"}
GROUP_BY = {
    "api_key_id",
    "workspace_id",
    "model",
    "service_tier",
    "context_window",
    "inference_geo",
    "account_id",
    "service_account_id",
    "speed",
}
ARRAYS = {
    "group_by",
    "api_key_ids",
    "workspace_ids",
    "models",
    "service_tiers",
    "context_window",
    "inference_geos",
    "account_ids",
    "service_account_ids",
    "speeds",
}
RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})"
)
MINUTE_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:00Z")
COUNTERS = ("uncached_input_tokens", "cache_read_input_tokens", "output_tokens")
CACHE_CREATION = {"ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"}
#: Dimension fields a result carries, null unless grouped (the docs' example shows these)
DIMENSIONS = ("api_key_id", "workspace_id", "model", "service_tier", "context_window")
ERROR_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
}


def request_problems(method: str, url: str, headers: Mapping[str, str]) -> list[str]:
    """What a usage report request breaks of the contract (empty: nothing)."""
    problems: list[str] = []
    parts = urlsplit(url)
    if method != "GET":
        problems.append(f"method {method}")
    if parts.path != PATH:
        problems.append(f"path {parts.path}")
    lowered = {k.lower(): v for k, v in headers.items()}
    if not lowered.get("x-api-key"):
        problems.append("no x-api-key header")
    if "authorization" in lowered:
        problems.append("an Authorization header (Anthropic takes x-api-key)")
    if lowered.get("anthropic-version") != VERSION:
        problems.append(f"anthropic-version is {lowered.get('anthropic-version')!r}")
    scalars: dict[str, str] = {}
    arrays: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        name = key.removesuffix("[]")
        if name in ARRAYS:
            if not key.endswith("[]"):
                problems.append(f"array {name!r} sent without brackets")
            arrays.setdefault(name, []).append(value)
        elif key in SCALARS:
            if key in scalars:
                problems.append(f"{key!r} sent twice")
            scalars[key] = value
        else:
            problems.append(f"undeclared parameter {key!r}")
    for name in ("starting_at", "ending_at"):
        value = scalars.get(name)
        if value is None:
            if name == "starting_at":
                problems.append("no starting_at")
        elif not RFC3339.fullmatch(value):
            problems.append(f"{name} {value!r} is not RFC 3339")
        elif not MINUTE_UTC.fullmatch(value):
            problems.append(f"{name} {value!r} is not on a UTC minute boundary")
    if "ending_at" in scalars and scalars.get("starting_at", "") >= scalars["ending_at"]:
        problems.append("ending_at is not after starting_at")
    width = scalars.get("bucket_width", "1d")
    if width not in BUCKET_WIDTHS:
        problems.append(f"bucket_width {width!r}")
    elif "limit" in scalars and not (
        scalars["limit"].isdigit() and 1 <= int(scalars["limit"]) <= BUCKET_WIDTHS[width]
    ):
        problems.append(f"limit {scalars['limit']!r} for bucket_width {width}")
    problems += [f"group_by {g!r}" for g in arrays.get("group_by", []) if g not in GROUP_BY]
    return problems


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def page_problems(body: object) -> list[str]:
    """What a 200 answer breaks of the contract (empty: nothing)."""
    if not isinstance(body, dict):
        return ["body is not an object"]
    problems: list[str] = []
    if set(body) != {"data", "has_more", "next_page"}:
        problems.append(f"page keys {sorted(body)}")
    if not isinstance(body.get("has_more"), bool):
        problems.append("has_more is not a boolean")
    nxt = body.get("next_page")
    if nxt is not None and not isinstance(nxt, str):
        problems.append("next_page is neither a string nor null")
    if body.get("has_more") and not nxt:
        problems.append("has_more without next_page")
    data = body.get("data")
    if not isinstance(data, list):
        return [*problems, "data is not a list"]
    for bucket in data:
        if not isinstance(bucket, dict) or set(bucket) != {"starting_at", "ending_at", "results"}:
            problems.append(f"bucket {bucket!r:.80}")
            continue
        for name in ("starting_at", "ending_at"):
            if not isinstance(bucket[name], str) or not RFC3339.fullmatch(bucket[name]):
                problems.append(f"bucket {name} {bucket[name]!r} is not an RFC 3339 string")
        if not isinstance(bucket["results"], list):
            problems.append("results is not a list")
            continue
        for result in bucket["results"]:
            problems += _result_problems(result)
    return problems


def _result_problems(result: object) -> list[str]:
    if not isinstance(result, dict):
        return ["a result is not an object"]
    problems = [f"{c} is not a count" for c in COUNTERS if not _is_count(result.get(c))]
    creation = result.get("cache_creation")
    if not isinstance(creation, dict) or set(creation) != CACHE_CREATION:
        problems.append(f"cache_creation {creation!r}")
    elif not all(_is_count(v) for v in creation.values()):
        problems.append("cache_creation holds a non-count")
    tools = result.get("server_tool_use")
    if not isinstance(tools, dict) or not _is_count(tools.get("web_search_requests")):
        problems.append(f"server_tool_use {tools!r}")
    for name in DIMENSIONS:
        if name not in result:
            problems.append(f"dimension {name} missing (null unless grouped)")
        elif result[name] is not None and not isinstance(result[name], str):
            problems.append(f"dimension {name} is {type(result[name]).__name__}")
    for foreign in ("object", "input_tokens", "num_model_requests"):
        if foreign in result:
            problems.append(f"OpenAI's {foreign!r} in an Anthropic result")
    return problems


def error_problems(status: int, body: object) -> list[str]:
    """What an error answer breaks of Anthropic's envelope."""
    if status < 400:
        return [f"status {status}"]
    if not isinstance(body, dict) or body.get("type") != "error":
        return [f"not an error envelope: {body!r:.80}"]
    err = body.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return ["error has no message"]
    return [] if err.get("type") in ERROR_TYPES else [f"error type {err.get('type')!r}"]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def t0() -> int:
    return floor_minute(time.time()) - 3 * DAY


@pytest.fixture
async def sim(t0: int) -> AsyncIterator[RunningSimulator]:
    requests = [
        {
            "provider": "anthropic",
            "time": t0 + 60 * m + 3,
            "api_key_id": f"apikey_{m % 2}",
            "workspace_id": None if m % 3 == 0 else f"wrkspc_{m % 3}",
            "model": "claude-haiku-4-5-20251001" if m % 2 else "claude-sonnet-4-5-20250929",
            "usage": {
                "uncached_input_tokens": 100 + m,
                "cache_read_input_tokens": 40 if m % 4 == 0 else 0,
                "cache_creation": {"ephemeral_5m_input_tokens": m, "ephemeral_1h_input_tokens": 1},
                "output_tokens": 10,
                **({"server_tool_use": {"web_search_requests": 2}} if m % 5 == 0 else {}),
            },
        }
        for m in (0, 1, 2, 5, 8, 60, 61, 1500, 2999)
    ]
    scenario = Scenario.from_json(
        {
            "anthropic_admin_keys": [KEY],
            "anthropic_unscoped_keys": [NOT_ADMIN],
            "seed": 7,
            "requests": requests,
        }
    )
    async with RunningSimulator(scenario) as running:
        yield running


@dataclass
class Sent:
    method: str
    url: str
    headers: dict[str, str]


@pytest.fixture
async def traced() -> AsyncIterator[tuple[aiohttp.ClientSession, list[Sent]]]:
    """A session that records every request it sends (method, URL, headers)."""
    sent: list[Sent] = []

    async def on_start(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any) -> None:
        sent.append(Sent(params.method, str(params.url), dict(params.headers)))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as s:
        yield s, sent


# ---------------------------------------------------------------------------- requests


async def test_the_clients_real_requests_conform(
    sim: RunningSimulator, traced: tuple[aiohttp.ClientSession, list[Sent]], t0: int
) -> None:
    session, sent = traced
    c = AnthropicUsageClient(
        base_url=sim.anthropic_base_url,
        admin_key=KEY,
        session=session,
        rate_limit_per_min=600,
        retry=RetryPolicy(base=0.01),
    )
    await c.fetch(Interval(t0, t0 + 600))
    await c.fetch(
        Interval(t0, t0 + 3000 * 60),
        Filters(api_key_ids=frozenset({"apikey_0", "apikey_1"}), project_ids=frozenset({"w"})),
    )
    assert len(sent) == 4 and [e.status for e in sim.anthropic_request_log] == [200] * 4
    assert sum("page=" in s.url for s in sent) == 2  # 3,001 minutes: three pages
    for request in sent:
        assert request_problems(request.method, request.url, request.headers) == [], request.url
        assert request.headers["x-api-key"] == KEY


GOOD_URL = (
    f"http://h{PATH}?starting_at=2025-08-01T00:00:00Z&ending_at=2025-08-01T00:10:00Z"
    "&bucket_width=1m&limit=10&group_by[]=api_key_id&group_by[]=model"
)
GOOD_HEADERS = {"x-api-key": "k", "anthropic-version": VERSION}


@pytest.mark.parametrize(
    ("url", "headers", "needle"),
    [
        (GOOD_URL.replace("starting_at=2025-08-01T00:00:00Z", "starting_at=1754006400"), {}, "RFC"),
        (GOOD_URL.replace("00:10:00Z", "00:10:30Z"), {}, "minute boundary"),
        (GOOD_URL.replace("00:10:00Z", "00:00:00Z"), {}, "not after"),
        (GOOD_URL.replace("group_by[]=model", "group_by=model"), {}, "without brackets"),
        (GOOD_URL.replace("group_by[]=model", "group_by[]=region"), {}, "group_by 'region'"),
        (GOOD_URL.replace("limit=10", "limit=1441"), {}, "limit '1441'"),
        (GOOD_URL.replace("bucket_width=1m", "bucket_width=5m"), {}, "bucket_width"),
        (GOOD_URL + "&project_ids[]=p", {}, "undeclared parameter 'project_ids[]'"),
        (GOOD_URL + "&limit=3", {}, "sent twice"),
        (GOOD_URL.replace("/messages", "/message"), {}, "path"),
        (GOOD_URL, {"anthropic-version": None}, "anthropic-version"),
        (GOOD_URL, {"x-api-key": None}, "no x-api-key"),
        (GOOD_URL, {"Authorization": "Bearer k"}, "Authorization"),
    ],
)
def test_the_request_check_catches_what_it_should(
    url: str, headers: dict[str, str | None], needle: str
) -> None:
    merged = {k: v for k, v in {**GOOD_HEADERS, **headers}.items() if v is not None}
    assert request_problems("GET", GOOD_URL, GOOD_HEADERS) == []
    problems = request_problems("GET", url, merged)
    assert any(needle in p for p in problems), problems


# ---------------------------------------------------------------------------- responses


def _queries(t0: int) -> list[str]:
    def at(t: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    grouped = "&group_by[]=api_key_id&group_by[]=workspace_id&group_by[]=model"
    return [
        f"starting_at={at(t0)}&ending_at={at(t0 + 600)}&bucket_width=1m{grouped}",
        f"starting_at={at(t0)}&ending_at={at(t0 + 600)}&bucket_width=1m",  # ungrouped
        f"starting_at={at(t0 + 30)}&ending_at={at(t0 + 600)}&bucket_width=1m&group_by[]=model",
        f"starting_at={at(t0)}&bucket_width=1h&limit=3&group_by[]=service_tier",  # paged
        f"starting_at={at(t0 - DAY + 17)}&bucket_width=1d&limit=2",  # day buckets, paged
        f"starting_at={at(t0)}&ending_at={at(t0 + 3000 * 60)}&bucket_width=1m&limit=1440{grouped}",
        f"starting_at={at(t0)}&ending_at={at(t0 + 600)}&bucket_width=1m&api_key_ids[]=apikey_9",
        f"starting_at={at(t0)}&bucket_width=1d&group_by[]=context_window&group_by[]=inference_geo",
    ]


async def _get(
    session: aiohttp.ClientSession,
    sim: RunningSimulator,
    query: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    url = f"{sim.anthropic_base_url}{PATH}?{query}"
    sent = {"x-api-key": KEY, "anthropic-version": VERSION} if headers is None else headers
    async with session.get(url, headers=sent) as resp:
        lowered = {k.lower(): v for k, v in resp.headers.items()}
        return resp.status, await resp.json(), lowered


async def test_simulator_pages_conform(
    sim: RunningSimulator, traced: tuple[aiohttp.ClientSession, list[Sent]], t0: int
) -> None:
    session, _ = traced
    pages = 0
    for query in _queries(t0):
        cursor: str | None = None
        while True:
            status, body, _ = await _get(
                session, sim, query + (f"&page={cursor}" if cursor else "")
            )
            assert status == 200, body
            assert page_problems(body) == [], query
            pages += 1
            if not body["has_more"]:
                break
            cursor = body["next_page"]
    assert pages > len(_queries(t0))  # some queries paged


async def test_tampered_pages_fail_the_check(
    sim: RunningSimulator, traced: tuple[aiohttp.ClientSession, list[Sent]], t0: int
) -> None:
    session, _ = traced
    _, good, _ = await _get(session, sim, _queries(t0)[0])
    assert page_problems(good) == [] and good["data"][0]["results"]

    def tampered(change: Any) -> dict[str, Any]:
        page = copy.deepcopy(good)
        change(page)
        return page

    def result(page: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = page["data"][0]["results"][0]
        return found

    cases = [
        lambda p: p.update(object="page"),
        lambda p: p.update(has_more=True, next_page=None),
        lambda p: p["data"][0].update(starting_at=1_754_006_400),
        lambda p: result(p).update(output_tokens=1.0),
        lambda p: result(p).update(cache_creation={"ephemeral_5m_input_tokens": 1}),
        lambda p: result(p).pop("server_tool_use"),
        lambda p: result(p).pop("workspace_id"),
        lambda p: result(p).update(num_model_requests=1),
        lambda p: result(p).update(model=5),
    ]
    for change in cases:
        assert page_problems(tampered(change)), change


async def test_error_answers_are_anthropics_envelope(
    sim: RunningSimulator, traced: tuple[aiohttp.ClientSession, list[Sent]], t0: int
) -> None:
    session, _ = traced
    good = _queries(t0)[0]
    cases: list[tuple[str, dict[str, str] | None, int, str]] = [
        (f"starting_at={t0}&bucket_width=1m", None, 400, "invalid_request_error"),  # Unix
        (good.replace("group_by[]", "group_by"), None, 400, "invalid_request_error"),
        (good + "&limit=1441", None, 400, "invalid_request_error"),
        (good, {"x-api-key": KEY}, 400, "invalid_request_error"),  # no anthropic-version
        (good, {"anthropic-version": VERSION}, 401, "authentication_error"),
        (good, {"x-api-key": "sk-ant-wrong", "anthropic-version": VERSION}, 401, "authentication"),
        (good, {"x-api-key": NOT_ADMIN, "anthropic-version": VERSION}, 403, "permission_error"),
    ]
    for query, headers, status, type_ in cases:
        got, body, _ = await _get(session, sim, query, headers)
        assert (got, error_problems(got, body)) == (status, []), (query, body)
        assert body["error"]["type"].startswith(type_)
        assert KEY not in str(body) and NOT_ADMIN not in str(body)
    fault = {"kind": "429", "retry_after": 3, "target": "anthropic"}
    async with session.post(f"{sim.root_url}/_sim/faults", json={"faults": [fault]}) as resp:
        assert resp.status == 200
    got, body, headers = await _get(session, sim, good)
    assert (got, error_problems(got, body)) == (429, [])
    assert body["error"]["type"] == "rate_limit_error" and headers["retry-after"] == "3"


def test_the_error_check_catches_what_it_should() -> None:
    openai_style = {"error": {"message": "x", "type": "invalid_request_error", "code": None}}
    assert error_problems(400, openai_style)
    assert error_problems(400, {"type": "error", "error": {"type": "oops", "message": "x"}})
    assert error_problems(400, {"type": "error", "error": {"type": "api_error"}})
    assert (
        error_problems(400, {"type": "error", "error": {"type": "api_error", "message": "x"}}) == []
    )

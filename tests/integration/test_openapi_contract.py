"""The simulator's answers and the client's requests, checked against the official OpenAPI
extract (../shared/reference/openai-usage-api.yaml) with openapi-core.

Two things about openapi-core 0.23 shape these checks:

* Query arrays use the OpenAPI default (style=form, explode=true): repeated keys. They are
  only all validated when the request's query is a MultiDict (`getlist`); a plain dict
  keeps one value. And a parameter the operation does not declare (`group_by[]`, a typo)
  is silently ignored, not reported. So every check below also asserts that each sent key
  is declared and comes back unmarshalled with all of its values.
* `UsageTimeBucket.results` is a `oneOf` with `discriminator: {propertyName: object}` and
  no `mapping`. Per OpenAPI the implicit mapping takes the discriminator value as a schema
  name (`#/components/schemas/organization.usage.completions.result`), which does not
  exist, so openapi-core rejects every real page. We add the explicit mapping the spec
  implies (each member's `object` enum value -> that member), derived from the spec itself,
  which keeps the check as strict as the author intended.

The extract declares only 200 and 429 for the endpoint; other error answers are checked
against `components.schemas.ErrorResponse` directly.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.templating.responses.exceptions import ResponseNotFound
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.request.exceptions import SecurityValidationError
from openapi_core.validation.response.exceptions import InvalidData
from openapi_schema_validator import OAS31Validator
from werkzeug.datastructures import ImmutableMultiDict

from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.usage_api import Filters, RetryPolicy, UsageClient
from tokensettle.windows import Interval, floor_minute

KEY = "sk-admin-contract-0000"
UNSCOPED = "sk-proj-contract-noscope"
SPEC_HOST = "https://api.openai.com"  # servers[0].url is https://api.openai.com/v1
SPEC_PATH = "/organization/usage/completions"
DAY = 86_400
RESULT_OBJECT = "organization.usage.completions.result"


# ---------------------------------------------------------------------------- spec loading


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def add_discriminator_mappings(raw: dict[str, Any]) -> int:
    """Give every mapping-less discriminator over `$ref`s the mapping its members imply."""
    schemas = raw["components"]["schemas"]
    patched = 0
    for node in list(_walk(raw)):
        disc = node.get("discriminator")
        if not isinstance(disc, dict) or "mapping" in disc or "oneOf" not in node:
            continue
        prop = disc["propertyName"]
        mapping: dict[str, str] = {}
        for member in node["oneOf"]:
            ref = member["$ref"]
            enum = schemas[ref.rsplit("/", 1)[1]]["properties"][prop]["enum"]
            assert len(enum) == 1, f"{ref}: discriminator property is not a constant"
            assert enum[0] not in mapping, f"{enum[0]} names two members"
            mapping[enum[0]] = ref
        disc["mapping"] = mapping
        patched += 1
    return patched


@functools.cache
def load(path: Path) -> tuple[OpenAPI, dict[str, Any]]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw["servers"][0]["url"] == SPEC_HOST + "/v1"
    assert add_discriminator_mappings(raw) == 1  # only UsageTimeBucket.results
    return OpenAPI.from_dict(raw), raw


@pytest.fixture
def spec(openapi_spec_path: Path) -> OpenAPI:
    return load(openapi_spec_path)[0]


@pytest.fixture
def raw_spec(openapi_spec_path: Path) -> dict[str, Any]:
    return load(openapi_spec_path)[1]


def declared(raw: dict[str, Any], path: str = SPEC_PATH) -> dict[str, dict[str, Any]]:
    params = raw["paths"][path]["get"]["parameters"]
    return {p["name"]: p["schema"] for p in params}


def error_validator(raw: dict[str, Any]) -> OAS31Validator:
    schema = {"$ref": "#/components/schemas/ErrorResponse", "components": raw["components"]}
    return OAS31Validator(schema)


# ---------------------------------------------------------------------------- helpers


def spec_request(
    raw_query: str, auth_scheme: str | None = "Bearer", path: str = SPEC_PATH
) -> MockRequest:
    """An openapi-core request for the URL the spec describes, from a raw query string."""
    args = ImmutableMultiDict(parse_qsl(raw_query, keep_blank_values=True))
    headers = {"Authorization": f"{auth_scheme} redacted-credential"} if auth_scheme else {}
    return MockRequest(SPEC_HOST, "get", "/v1" + path, args=args, headers=headers)


def request_problems(
    spec: OpenAPI, raw: dict[str, Any], raw_query: str, auth: str | None, path: str = SPEC_PATH
) -> list[str]:
    """Everything wrong with a request: openapi-core errors, plus keys it would ignore or
    values that do not come back unmarshalled (so nothing passes by being skipped)."""
    result = spec.unmarshal_request(spec_request(raw_query, auth, path))
    problems = [repr(e) for e in result.errors]
    params = declared(raw, path)
    sent: dict[str, list[str]] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        sent.setdefault(key, []).append(value)
    got = result.parameters.query if result.parameters else {}
    for key, values in sent.items():
        if key not in params:
            problems.append(f"undeclared parameter {key!r} (openapi-core ignores it)")
            continue
        kind = params[key].get("type")
        if kind == "array":
            if got.get(key) != values:
                problems.append(f"{key}: sent {values}, validated {got.get(key)!r}")
        elif len(values) != 1:
            problems.append(f"scalar {key!r} sent {len(values)} times")
        elif key not in got:
            problems.append(f"{key}: not validated")
        elif kind == "integer" and got[key] != int(values[0]):
            problems.append(f"{key}: {values[0]!r} became {got[key]!r}")
    return problems


async def get(
    session: aiohttp.ClientSession, sim: RunningSimulator, query: str, key: str | None = KEY
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get(f"{sim.base_url}{SPEC_PATH}?{query}", headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def spec_response(status: int, headers: dict[str, str], body: bytes) -> MockResponse:
    return MockResponse(
        body,
        status_code=status,
        headers=headers,
        content_type=headers.get("Content-Type", ""),
    )


@pytest.fixture
def t0() -> int:
    return floor_minute(time.time()) - 3 * DAY


@pytest.fixture
async def sim(t0: int) -> AsyncIterator[RunningSimulator]:
    scenario = Scenario.from_json(
        {
            "admin_keys": [KEY],
            "unscoped_keys": [UNSCOPED],
            "seed": 7,
            "requests": [
                {
                    "time": t0 + 60 * m + 3,
                    "api_key_id": f"key_{m % 2}",
                    "project_id": f"proj_{m % 3}",
                    "model": "gpt-4o-mini-2024-07-18" if m % 2 else "gpt-4o-2024-08-06",
                    "usage": {
                        "input_tokens": 100 + m,
                        "output_tokens": 10,
                        "num_model_requests": 1,
                        **(
                            {"input_cached_tokens": 40, "input_audio_tokens": 0}
                            if m % 4 == 0
                            else {}
                        ),
                        # the SDK's newer fields: cache writes by retention
                        **(
                            {
                                "input_cache_write_tokens": 30,
                                "input_cache_write_30m_tokens": 20,
                                "input_cache_write_12h_tokens": 10,
                            }
                            if m % 3 == 0
                            else {}
                        ),
                    },
                }
                for m in (0, 1, 2, 5, 8, 60, 61, 1500, 2999)
            ],
        }
    )
    async with RunningSimulator(scenario) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# ---------------------------------------------------------------------------- requests


async def test_the_clients_real_requests_conform(
    spec: OpenAPI,
    raw_spec: dict[str, Any],
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    t0: int,
) -> None:
    c = UsageClient(
        base_url=sim.base_url,
        admin_key=KEY,
        session=session,
        retry=RetryPolicy(base=0.01),
    )
    await c.fetch(Interval(t0, t0 + 600))
    await c.fetch(
        Interval(t0, t0 + 3000 * 60),
        Filters(api_key_ids=frozenset({"key_0", "key_1"}), project_ids=frozenset({"proj_0"})),
    )
    log = sim.request_log
    assert len(log) == 4 and [e.status for e in log] == [200] * 4  # 1 + 3 pages
    assert sum("page=" in e.query for e in log) == 2
    for entry in log:
        assert request_problems(spec, raw_spec, entry.query, entry.auth_scheme) == [], entry.query


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("start_time=1760612579.93&bucket_width=1m", "start_time"),  # the field bug
        ("bucket_width=1m", "MissingRequiredParameter"),
        ("start_time=60&group_by=model&group_by=region", "group_by"),  # 2nd repeat checked
        ("start_time=60&group_by=model,project_id", "group_by"),  # comma form is not the spec's
        ("start_time=60&group_by[]=model", "undeclared parameter 'group_by[]'"),
        ("start_time=60&bucket_width=5m", "bucket_width"),
        ("start_time=60&limit=ten", "limit"),
        ("start_time=60&start_time=120", "sent 2 times"),
    ],
)
def test_request_check_catches_what_it_should(
    spec: OpenAPI, raw_spec: dict[str, Any], query: str, needle: str
) -> None:
    problems = request_problems(spec, raw_spec, query, "Bearer")
    assert problems and any(needle in p for p in problems), problems


def test_request_without_bearer_auth_violates_the_security_scheme(spec: OpenAPI) -> None:
    with pytest.raises(SecurityValidationError):
        spec.validate_request(spec_request("start_time=60", auth_scheme=None))
    spec.validate_request(spec_request("start_time=60", auth_scheme="Bearer"))


# ---------------------------------------------------------------------------- responses


def _page_queries(t0: int) -> list[str]:
    grouped = "&group_by=api_key_id&group_by=project_id&group_by=model"
    return [
        f"start_time={t0}&end_time={t0 + 600}&bucket_width=1m{grouped}",
        f"start_time={t0}&end_time={t0 + 600}&bucket_width=1m",  # ungrouped: six null dims
        f"start_time={t0 + 30}&end_time={t0 + 600}&bucket_width=1m&group_by=model",  # clipped
        f"start_time={t0}&bucket_width=1h&limit=3&group_by=project_id",  # paged, to now
        f"start_time={t0 - DAY + 17}&bucket_width=1d&limit=2",  # clipped day buckets, paged
        f"start_time={t0}&end_time={t0 + 3000 * 60}&bucket_width=1m&limit=1440{grouped}",
        f"start_time={t0}&end_time={t0 + 600}&bucket_width=1m&api_key_ids=key_9",  # all empty
        f"start_time={t0}&end_time={t0 + 600}&bucket_width=1m&group_by=api_source&group_by=model",
    ]


async def test_simulator_pages_conform(
    spec: OpenAPI, sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    pages = results = 0
    for query in _page_queries(t0):
        cursor: str | None = None
        while True:
            full = query + (f"&{urlencode({'page': cursor})}" if cursor else "")
            status, headers, body = await get(session, sim, full)
            assert status == 200, body
            spec.validate_response(spec_request(full), spec_response(status, headers, body))
            page = json.loads(body)
            pages += 1
            for bucket in page["data"]:
                for result in bucket["results"]:
                    assert result["object"] == RESULT_OBJECT  # the spec also allows others
                    results += 1
            if not page["has_more"]:
                break
            cursor = page["next_page"]
    assert pages >= 12 and results >= 15  # the walk really covered paged, non-empty answers


#: The `group_by` enum of the official SDK (openai 3.57.0) for usage/completions: the
#: extract's six values, and `api_source`, which the extract does not know yet.
SDK_GROUP_BY = (
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
    "service_tier",
    "api_source",
)


async def test_every_group_by_value_the_sdk_sends_is_answered(
    spec: OpenAPI,
    raw_spec: dict[str, Any],
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    t0: int,
) -> None:
    """`group_by=api_source` was a 400 (issue 7, item 10). The SDK sends arrays as
    `group_by[]=...`; every value alone and all together give a page that conforms."""
    enum = declared(raw_spec)["group_by"]["items"]["enum"]
    assert set(enum) == set(SDK_GROUP_BY) - {"api_source"}  # what the extract lacks
    base = f"start_time={t0}&end_time={t0 + 600}&bucket_width=1m"
    for values in [*((v,) for v in SDK_GROUP_BY), SDK_GROUP_BY]:
        query = base + "".join(f"&group_by[]={v}" for v in values)
        status, headers, body = await get(session, sim, query)
        assert status == 200, (query, body)
        spec.validate_response(spec_request(query), spec_response(status, headers, body))
        results = [r for b in json.loads(body)["data"] for r in b["results"]]
        assert results, query
        if "api_source" in values:
            assert {r["api_source"] for r in results} == {"unlabeled"}
        else:
            assert {r["api_source"] for r in results} == {None}


async def test_the_sdk_cache_write_fields_reach_the_client(
    sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    c = UsageClient(base_url=sim.base_url, admin_key=KEY, session=session)
    rows = (await c.fetch(Interval(t0, t0 + 600))).rows
    by_minute = {r.minute: r.usage for r in rows}
    assert by_minute[t0].input_cache_write_30m_tokens == 20  # m = 0
    assert by_minute[t0].input_cache_write_12h_tokens == 10
    assert by_minute[t0 + 60].input_cache_write_30m_tokens is None  # m = 1: not carried


async def test_tampered_pages_fail_validation(
    spec: OpenAPI, sim: RunningSimulator, session: aiohttp.ClientSession, t0: int
) -> None:
    query = _page_queries(t0)[0]
    status, headers, body = await get(session, sim, query)
    for bad in (
        body.replace(b'"input_tokens": 100', b'"input_tokens": "100"'),
        body.replace(b'"has_more": false', b'"has_more": "no"'),
        body.replace(b'"object": "bucket"', b'"object": "bin"', 1),
    ):
        assert bad != body
        with pytest.raises(InvalidData):
            spec.validate_response(spec_request(query), spec_response(status, headers, bad))


@pytest.mark.parametrize("retry_after", [None, 1, 30])
async def test_simulator_429_conforms(
    spec: OpenAPI,
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    t0: int,
    retry_after: int | None,
) -> None:
    fault: dict[str, Any] = {"kind": "429"}
    if retry_after is not None:
        fault["retry_after"] = retry_after
    async with session.post(f"{sim.root_url}/_sim/faults", json={"faults": [fault]}) as resp:
        assert resp.status == 200
    query = f"start_time={t0}&bucket_width=1m"
    status, headers, body = await get(session, sim, query)
    assert status == 429
    assert headers.get("Retry-After") == (None if retry_after is None else str(retry_after))
    spec.validate_response(spec_request(query), spec_response(status, headers, body))


async def test_error_envelopes_conform(
    spec: OpenAPI,
    raw_spec: dict[str, Any],
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    t0: int,
) -> None:
    validator = error_validator(raw_spec)
    cases: list[tuple[str, str | None, int]] = [
        ("start_time=1760612579.93", KEY, 400),
        (f"start_time={t0}&bucket_width=2m", KEY, 400),
        (f"start_time={t0}&bucket_width=1m&limit=1441", KEY, 400),
        (f"start_time={t0}&page=page_bogus", KEY, 400),
        (f"start_time={t0}", None, 401),
        (f"start_time={t0}", "sk-admin-unknown", 401),
        (f"start_time={t0}", UNSCOPED, 403),
    ]
    for query, key, expected in cases:
        status, headers, body = await get(session, sim, query, key)
        assert status == expected, (query, body)
        envelope = json.loads(body)
        validator.validate(envelope)
        assert headers["Content-Type"].startswith("application/json")
        # The extract declares no such status, so openapi-core cannot check it itself:
        with pytest.raises(ResponseNotFound):
            spec.validate_response(spec_request(query), spec_response(status, headers, body))
    for kind in ("500", "503", "401", "403"):
        async with session.post(
            f"{sim.root_url}/_sim/faults", json={"faults": [{"kind": kind}]}
        ) as resp:
            assert resp.status == 200
        status, _, body = await get(session, sim, f"start_time={t0}")
        assert status == int(kind)
        validator.validate(json.loads(body))
    bad = {"error": {"message": "m", "type": "t"}}  # param and code are required keys
    assert not validator.is_valid(bad)

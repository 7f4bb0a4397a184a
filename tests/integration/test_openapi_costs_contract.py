"""The simulator's costs answers and the bill check's requests, checked against the official
OpenAPI extract (../shared/reference/openai-usage-api.yaml, which has /organization/costs)
with openapi-core, as test_openapi_contract.py checks the usage endpoint (its helpers; its
notes on openapi-core apply here too).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from openapi_core import OpenAPI
from openapi_core.templating.responses.exceptions import ResponseNotFound
from openapi_core.validation.response.exceptions import InvalidData

from tests.integration.test_openapi_contract import (
    declared,
    error_validator,
    load,
    request_problems,
    spec_request,
    spec_response,
)
from tokensettle.bill import DAY
from tokensettle.billing_api import COSTS_PATH, fetch_bill_data
from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.simulator.server import COSTS
from tokensettle.usage_api import USAGE_PATH, UsageClient

KEY = "sk-admin-costs-contract"
UNSCOPED = "sk-proj-costs-noscope"
MINI = "gpt-4o-mini-2024-07-18"
TODAY = int(time.time()) // DAY * DAY
COSTS_RESULT = "organization.costs.result"


@pytest.fixture
def spec(openapi_spec_path: Any) -> OpenAPI:
    return load(openapi_spec_path)[0]


@pytest.fixture
def raw_spec(openapi_spec_path: Any) -> dict[str, Any]:
    return load(openapi_spec_path)[1]


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    requests = [
        {
            "time": TODAY - n * DAY + 3600 * (n % 5),
            "api_key_id": f"key_{n % 2}",
            "project_id": f"proj_{n % 3}",
            "model": MINI if n % 2 else "gpt-5-mini-2025-08-07",
            "usage": {
                "input_tokens": 10_000 * n,
                "output_tokens": 1_000 * n,
                "num_model_requests": n,
                "input_cached_tokens": 1_000 * n,
            },
            **({"batch": True} if n % 3 == 0 else {}),
            **({"service_tier": "flex"} if n % 4 == 0 and n % 2 == 0 else {}),
        }
        for n in range(1, 12)
    ]
    scenario = Scenario.from_json(
        {"admin_keys": [KEY], "unscoped_keys": [UNSCOPED], "requests": requests}
    )
    async with RunningSimulator(scenario) as running:
        async with aiohttp.ClientSession() as s:
            knobs = {
                "line_items": [
                    {
                        "time": TODAY - 2 * DAY,
                        "project_id": "proj_1",
                        "api_key_id": "key_1",
                        "line_item": "text-embedding-3-small, input",
                        "amount": 0.42,
                        "quantity": 21_000_000,
                        "quantity_unit": "tokens",
                    }
                ]
            }
            async with s.post(f"{running.root_url}/_sim/billing", json=knobs) as resp:
                assert resp.status == 200
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def get(
    session: aiohttp.ClientSession, sim: RunningSimulator, query: str, key: str | None = KEY
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get(f"{sim.base_url}{COSTS_PATH}?{query}", headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def test_the_extract_declares_what_the_simulator_validates(raw_spec: dict[str, Any]) -> None:
    params = declared(raw_spec, COSTS_PATH)
    assert set(params["group_by"]["items"]["enum"]) == {"project_id", "line_item", "api_key_id"}
    assert params["bucket_width"]["enum"] == ["1d"]
    assert params["limit"]["default"] == 7


async def test_the_bill_checks_real_requests_conform(
    spec: OpenAPI, raw_spec: dict[str, Any], sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    client = UsageClient(base_url=sim.base_url, admin_key=KEY, session=session)
    end = datetime.fromtimestamp(TODAY, UTC).date()
    await fetch_bill_data(client, end - timedelta(days=10), end, ["proj_1", "proj_2"])
    costs_log, usage_log = sim.app[COSTS].log, sim.request_log
    assert len(costs_log) == 2 and len(usage_log) == 2  # paged: 10 days, 7 a page
    for path, log in ((COSTS_PATH, costs_log), (USAGE_PATH, usage_log)):
        for entry in log:
            assert entry.status == 200
            problems = request_problems(spec, raw_spec, entry.query, entry.auth_scheme, path)
            assert problems == [], (path, entry.query)


def _queries() -> list[str]:
    start = TODAY - 12 * DAY
    return [
        f"start_time={start}&group_by=project_id&group_by=line_item",  # the bill check's
        f"start_time={start}",  # ungrouped: one result a day, all dimensions null
        f"start_time={start + 17}&end_time={TODAY}&group_by=line_item&limit=3",  # clipped, paged
        f"start_time={start}&group_by=api_key_id&group_by=project_id&limit=180",
        f"start_time={start}&bucket_width=1d&project_ids=proj_1&api_key_ids=key_1"
        "&group_by=line_item",
        f"start_time={start}&project_ids=proj_none",  # all empty
    ]


async def test_simulator_costs_pages_conform(
    spec: OpenAPI, sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    pages = results = 0
    for query in _queries():
        cursor: str | None = None
        while True:
            full = query + (f"&{urlencode({'page': cursor})}" if cursor else "")
            status, headers, body = await get(session, sim, full)
            assert status == 200, body
            spec.validate_response(
                spec_request(full, path=COSTS_PATH), spec_response(status, headers, body)
            )
            page = json.loads(body)
            pages += 1
            for bucket in page["data"]:
                assert bucket["end_time"] - bucket["start_time"] <= DAY
                for result in bucket["results"]:
                    assert result["object"] == COSTS_RESULT
                    assert result["amount"]["currency"] == "usd"
                    grouped_by_item = "group_by=line_item" in full
                    assert (result["quantity"] is not None) == grouped_by_item
                    results += 1
            if not page["has_more"]:
                break
            cursor = page["next_page"]
    assert pages >= 10 and results >= 40  # the walk covered paged, non-empty answers


async def test_tampered_costs_pages_fail_validation(
    spec: OpenAPI, sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    query = _queries()[0]
    status, headers, body = await get(session, sim, query)
    assert b'"currency": "usd"' in body
    for bad in (
        body.replace(b'"currency": "usd"', b'"currency": 840', 1),
        body.replace(b'"object": "organization.costs.result"', b'"object": "costs"', 1),
    ):
        assert bad != body
        with pytest.raises(InvalidData):
            spec.validate_response(
                spec_request(query, path=COSTS_PATH), spec_response(status, headers, bad)
            )


async def test_costs_error_envelopes_conform(
    spec: OpenAPI, raw_spec: dict[str, Any], sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    validator = error_validator(raw_spec)
    start = TODAY - 3 * DAY
    cases: list[tuple[str, str | None, int, str | None]] = [
        ("bucket_width=1d", KEY, 400, "start_time"),
        (f"start_time={start}.5", KEY, 400, "start_time"),
        (f"start_time={start}&bucket_width=1h", KEY, 400, "bucket_width"),
        (f"start_time={start}&limit=181", KEY, 400, "limit"),
        (f"start_time={start}&limit=0", KEY, 400, "limit"),
        (f"start_time={start}&group_by=model", KEY, 400, "group_by"),
        (f"start_time={start}&end_time={start}", KEY, 400, "end_time"),
        (f"start_time={start}&page=page_bogus", KEY, 400, "page"),
        (f"start_time={start}", None, 401, None),
        (f"start_time={start}", "sk-admin-unknown", 401, None),
        (f"start_time={start}", UNSCOPED, 403, None),
    ]
    for query, key, expected, param in cases:
        status, headers, body = await get(session, sim, query, key)
        assert status == expected, (query, body)
        envelope = json.loads(body)
        validator.validate(envelope)
        assert envelope["error"]["param"] == param, query
        if status == 403:
            assert "api.usage.read" in envelope["error"]["message"]
        with pytest.raises(ResponseNotFound):
            spec.validate_response(
                spec_request(query, path=COSTS_PATH), spec_response(status, headers, body)
            )
    assert [e.status for e in sim.app[COSTS].log] == [c[2] for c in cases]


async def test_costs_pages_conform_to_the_admin_extract(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    """The admin extract narrows bucket results to CostsResult: a costs page must hold
    nothing else (a completions result would pass the usage extract's oneOf)."""
    import yaml

    from tests.conftest import SHARED, need_shared

    path = need_shared(SHARED / "reference" / "openai-admin-api.yaml")
    admin = OpenAPI.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
    for query in _queries()[:3]:
        status, headers, body = await get(session, sim, query)
        assert status == 200
        admin.validate_response(
            spec_request(query, path=COSTS_PATH), spec_response(status, headers, body)
        )
    query = _queries()[0]
    status, headers, body = await get(session, sim, query)
    usage_result = b'"object": "organization.usage.completions.result"'
    wrong = body.replace(b'"object": "organization.costs.result"', usage_result, 1)
    assert wrong != body
    with pytest.raises(InvalidData):
        admin.validate_response(
            spec_request(query, path=COSTS_PATH), spec_response(status, headers, wrong)
        )

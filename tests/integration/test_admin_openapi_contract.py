"""The Admin API client's real requests and the simulator's answers (admin and model
endpoints), checked against the official extract ../shared/reference/openai-admin-api.yaml
with openapi-core, the way test_openapi_contract.py checks the usage endpoint.

Requests are captured on the wire (aiohttp trace hooks: method, URL, body) as the client
sends them to the simulator; every path must be one the extract declares. The extract
declares only 200 (and 400 for two operations, 429 for the model endpoints); other error
answers are checked against `components.schemas.ErrorResponse` directly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.response.exceptions import InvalidData
from openapi_schema_validator import OAS31Validator
from werkzeug.datastructures import ImmutableMultiDict

from tests.conftest import SHARED, need_shared
from tokensettle.admin_api import AdminClient
from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.usage_api import RetryPolicy

KEY = "sk-admin-contract-admin-0000"
SPEC_HOST = "https://api.openai.com"
LEASES = "proj_leases"
OPERATIONS = {
    ("get", "/organization/projects/{project_id}"),
    ("post", "/organization/projects/{project_id}/service_accounts"),
    ("post", "/organization/projects/{project_id}/service_accounts/{service_account_id}/api_keys"),
    ("get", "/organization/projects/{project_id}/api_keys"),
    ("get", "/organization/projects/{project_id}/api_keys/{api_key_id}"),
    ("delete", "/organization/projects/{project_id}/api_keys/{api_key_id}"),
}


@functools.cache
def load(path: Path) -> tuple[OpenAPI, dict[str, Any]]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw["servers"][0]["url"] == SPEC_HOST + "/v1"
    return OpenAPI.from_dict(raw), raw


@pytest.fixture
def spec() -> tuple[OpenAPI, dict[str, Any]]:
    return load(need_shared(SHARED / "reference" / "openai-admin-api.yaml"))


@dataclass
class Sent:
    method: str
    url: str
    body: bytes = b""


@dataclass
class Wire:
    sent: list[Sent] = field(default_factory=list)

    def config(self) -> aiohttp.TraceConfig:
        trace = aiohttp.TraceConfig()

        async def start(_s: Any, _c: SimpleNamespace, params: Any) -> None:
            self.sent.append(Sent(params.method, str(params.url)))

        async def chunk(_s: Any, _c: SimpleNamespace, params: Any) -> None:
            self.sent[-1].body += params.chunk

        trace.on_request_start.append(start)
        trace.on_request_chunk_sent.append(chunk)
        return trace


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    scenario = Scenario.from_json(
        {
            "admin_keys": [KEY],
            "admin": {
                "projects": [
                    {"id": "proj_default", "default": True},
                    {"id": LEASES, "name": "Leases"},
                ],
                "usage_delay": 0,
            },
        }
    )
    async with RunningSimulator(scenario) as running:
        yield running


def spec_request(base_url: str, sent: Sent) -> MockRequest:
    """The request as the spec's server would see it (our base URL swapped for its)."""
    url = urlsplit(sent.url)
    path = url.path.removeprefix(urlsplit(base_url).path)
    args = ImmutableMultiDict(
        [tuple(p.split("=", 1)) for p in url.query.split("&") if p] if url.query else []
    )
    return MockRequest(
        SPEC_HOST,
        sent.method.lower(),
        "/v1" + path,
        args=args,
        headers={"Authorization": "Bearer redacted-credential"},
        data=sent.body or None,
    )


def spec_response(status: int, headers: dict[str, str], body: bytes) -> MockResponse:
    return MockResponse(
        body, status_code=status, headers=headers, content_type=headers.get("Content-Type", "")
    )


async def test_the_clients_requests_and_the_simulators_answers_conform(
    spec: tuple[OpenAPI, dict[str, Any]], sim: RunningSimulator
) -> None:
    openapi, _ = spec
    wire = Wire()
    trace = wire.config()
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        c = AdminClient(
            base_url=sim.base_url, admin_key=KEY, session=session, retry=RetryPolicy(attempts=1)
        )
        await c.get_project(LEASES)
        account = await c.create_service_account(LEASES, "tokensettle-leases")
        await c.create_service_account(
            LEASES, "member", create_service_account_only=False, expires_in_seconds=60
        )
        keys = [
            await c.create_key(LEASES, account.id, name=f"k{i}", expires_in_seconds=600)
            for i in range(3)
        ]
        await c.create_key(
            LEASES, account.id, name="s", expires_in_seconds=60, scopes=["api.responses.write"]
        )
        await c.list_keys(LEASES, page_size=2, owner_project_access="active")
        await c.get_key(LEASES, keys[0].id)
        await c.delete_key(LEASES, keys[0].id)
    assert len(wire.sent) == 12  # 10 calls; the list of 5 keys took 3 pages
    seen = set()
    for sent in wire.sent:
        request = spec_request(sim.base_url, sent)
        result = openapi.unmarshal_request(request)
        assert result.errors == [], (sent, result.errors)
        if sent.body:
            body = json.loads(sent.body)
            assert body == result.body, sent  # every field sent is one the schema reads
        seen.add(sent.method.lower())
    # and again by hand for the answers, which the trace does not carry
    async with aiohttp.ClientSession() as raw:
        headers = {"Authorization": f"Bearer {KEY}"}
        calls = [
            ("get", f"/organization/projects/{LEASES}", None),
            ("post", f"/organization/projects/{LEASES}/service_accounts", {"name": "a"}),
            (
                "post",
                f"/organization/projects/{LEASES}/service_accounts",
                {"name": "b", "create_service_account_only": True},
            ),
            (
                "post",
                f"/organization/projects/{LEASES}/service_accounts/{account.id}/api_keys",
                {"name": "c", "expires_in_seconds": 60},
            ),
            ("get", f"/organization/projects/{LEASES}/api_keys?limit=1", None),
            ("get", f"/organization/projects/{LEASES}/api_keys/{keys[1].id}", None),
            ("delete", f"/organization/projects/{LEASES}/api_keys/{keys[1].id}", None),
        ]
        for method, path, body in calls:
            async with raw.request(method, sim.base_url + path, headers=headers, json=body) as resp:
                status, got_headers, got = resp.status, dict(resp.headers), await resp.read()
            assert status == 200, got
            sent = Sent(method, sim.base_url + path, json.dumps(body).encode() if body else b"")
            openapi.validate_response(
                spec_request(sim.base_url, sent), spec_response(status, got_headers, got)
            )
    assert seen == {"get", "post", "delete"}


def _raw_paths(raw: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m, p) for p, item in raw["paths"].items() for m in item if m != "parameters"}


def test_every_admin_operation_of_the_extract_is_simulated(
    spec: tuple[OpenAPI, dict[str, Any]],
) -> None:
    _, raw = spec
    admin = {op for op in _raw_paths(raw) if op[1].startswith("/organization/projects")}
    # deleting a service account is the only one leases do not use
    assert admin - OPERATIONS == {
        ("delete", "/organization/projects/{project_id}/service_accounts/{service_account_id}")
    }


async def test_model_answers_conform(
    spec: tuple[OpenAPI, dict[str, Any]], sim: RunningSimulator
) -> None:
    openapi, _ = spec
    async with aiohttp.ClientSession() as session:
        c = AdminClient(base_url=sim.base_url, admin_key=KEY, session=session)
        account = await c.create_service_account(LEASES, "models")
        key = await c.create_key(LEASES, account.id, name="m", expires_in_seconds=60)
        bodies = {
            "/chat/completions": [
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]},
                {
                    "model": "gpt-4o-mini",
                    "messages": [
                        {"role": "developer", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    ],
                    "max_completion_tokens": 50,
                    "n": 2,
                    "metadata": {"run": "r1"},
                    "temperature": 0.2,
                },
            ],
            "/responses": [
                {"model": "gpt-4.1", "input": "Tell me a story."},
                {
                    "model": "gpt-4.1",
                    "instructions": "Be brief.",
                    "input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}],
                    "max_output_tokens": 64,
                },
            ],
        }
        for path, cases in bodies.items():
            for body in cases:
                sent = Sent("post", sim.base_url + path, json.dumps(body).encode())
                request = spec_request(sim.base_url, sent)
                assert openapi.unmarshal_request(request).errors == []
                async with session.post(
                    sim.base_url + path,
                    json=body,
                    headers={"Authorization": f"Bearer {key.value}"},
                ) as resp:
                    status, headers, got = resp.status, dict(resp.headers), await resp.read()
                assert status == 200, got
                openapi.validate_response(request, spec_response(status, headers, got))
                tampered = json.loads(got)
                tampered["usage"]["total_tokens"] = str(tampered["usage"]["total_tokens"])
                with pytest.raises(InvalidData):
                    openapi.validate_response(
                        request, spec_response(status, headers, json.dumps(tampered).encode())
                    )


async def test_error_answers_carry_the_usual_envelope(
    spec: tuple[OpenAPI, dict[str, Any]], sim: RunningSimulator
) -> None:
    _, raw = spec
    validator = OAS31Validator(
        {"$ref": "#/components/schemas/ErrorResponse", "components": raw["components"]}
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    cases: list[tuple[str, str, Any, dict[str, str], int]] = [
        ("get", "/organization/projects/proj_nope", None, auth, 404),
        ("post", "/organization/projects/proj_default/service_accounts", {"name": "x"}, auth, 400),
        ("post", f"/organization/projects/{LEASES}/service_accounts", {"nam": "x"}, auth, 400),
        ("post", f"/organization/projects/{LEASES}/service_accounts", [], auth, 400),
        ("get", f"/organization/projects/{LEASES}/api_keys?limit=0", None, auth, 400),
        ("delete", f"/organization/projects/{LEASES}/api_keys/key_nope", None, auth, 404),
        ("get", f"/organization/projects/{LEASES}", None, {}, 401),
        ("get", f"/organization/projects/{LEASES}", None, {"Authorization": "Bearer sk-x"}, 401),
        ("post", "/chat/completions", {"model": "m", "messages": []}, auth, 401),
    ]
    async with aiohttp.ClientSession() as session:
        for method, path, body, headers, expected in cases:
            async with session.request(
                method, sim.base_url + path, json=body, headers=headers
            ) as resp:
                assert resp.status == expected, (path, await resp.text())
                assert resp.headers["Content-Type"].startswith("application/json")
                validator.validate(await resp.json())


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        (
            "post",
            f"/organization/projects/{LEASES}/service_accounts",
            {"create_service_account_only": True},
        ),
        (
            "post",
            f"/organization/projects/{LEASES}/service_accounts",
            {"name": "x", "expires_in_seconds": "60"},
        ),
        (
            "post",
            f"/organization/projects/{LEASES}/service_accounts/svc_a/api_keys",
            {"scopes": "all"},
        ),
        ("get", f"/organization/projects/{LEASES}/api_keys?limit=ten", None),
        ("get", f"/organization/projects/{LEASES}/api_keys?owner_project_access=all", None),
        ("get", f"/organization/projects/{LEASES}/keys", None),
    ],
)
def test_the_request_check_catches_what_it_should(
    spec: tuple[OpenAPI, dict[str, Any]], method: str, path: str, body: Any
) -> None:
    """The check above can fail: requests the extract refuses are reported."""
    openapi, _ = spec
    base = "http://127.0.0.1:1/v1"
    sent = Sent(method, base + path, json.dumps(body).encode() if body is not None else b"")
    errors = openapi.unmarshal_request(spec_request(base, sent)).errors
    assert errors, (method, path, body)

"""The real AdminClient against the real simulator over loopback: mint, call the model,
list, delete; retries, refusals, and the key value kept out of every message."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from tokensettle.admin_api import (
    AdminAuthError,
    AdminClient,
    AdminMalformedResponseError,
    AdminNotFoundError,
    AdminRateLimitedError,
    AdminRequestError,
    AdminServerError,
    AdminTransportError,
    LeasedKey,
    redacted_matches,
)
from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.usage_api import Filters, RetryPolicy, UsageClient
from tokensettle.windows import Interval, floor_minute

KEY = "sk-admin-lease-integration-S3CRET"
USAGE_ONLY = "sk-admin-usage-only-S3CRET"
PROJECT_KEY = "sk-proj-unscoped-S3CRET"
LEASES = "proj_leases"
FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)
ADMIN = {
    "projects": [
        {"id": "proj_default", "name": "Default project", "default": True},
        {"id": LEASES, "name": "Leases"},
        {"id": "proj_old", "archived": True},
        {"id": "proj_capped", "max_key_lifetime": 3600},
    ],
    "usage_only_keys": [USAGE_ONLY],
    "usage_delay": 0,
}


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    scenario = Scenario.from_json(
        {"admin_keys": [KEY, USAGE_ONLY], "unscoped_keys": [PROJECT_KEY], "admin": ADMIN}
    )
    async with RunningSimulator(scenario) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def client(sim: RunningSimulator, session: aiohttp.ClientSession, **kw: Any) -> AdminClient:
    kw.setdefault("retry", FAST)
    kw.setdefault("admin_key", KEY)
    return AdminClient(base_url=sim.base_url, session=session, **kw)


async def faults(session: aiohttp.ClientSession, sim: RunningSimulator, *kinds: Any) -> None:
    body = [k if isinstance(k, dict) else {"kind": k, "target": "admin"} for k in kinds]
    async with session.post(f"{sim.root_url}/_sim/faults", json={"faults": body}) as resp:
        assert resp.status == 200, await resp.text()


async def new_key(c: AdminClient, ttl: int = 600) -> LeasedKey:
    account = await c.create_service_account(LEASES, "tokensettle-leases")
    return await c.create_key(LEASES, account.id, name="run", expires_in_seconds=ttl)


async def chat(
    session: aiohttp.ClientSession, sim: RunningSimulator, value: str, text: str, out: int
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        f"{sim.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {value}"},
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": text}],
            "max_completion_tokens": out,
        },
    ) as resp:
        return resp.status, await resp.json()


# ---------------------------------------------------------------------------- the route


async def test_mint_call_the_model_settle_by_key_and_delete(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    """The whole route of admin-api-notes.md section 1, on the wire."""
    c = client(sim, session)
    project = await c.get_project(LEASES)
    assert (project.id, project.name, project.archived) == (LEASES, "Leases", False)
    account = await c.create_service_account(LEASES, "tokensettle-leases")
    assert account.role == "none" and account.api_key is None
    keys = [
        await c.create_key(LEASES, account.id, name=f"run-{i}", expires_in_seconds=600)
        for i in range(2)
    ]
    for key in keys:
        assert key.id.startswith("key_") and key.expires_at == key.created_at + 600
    # two "runs" in the same minute, each with its own key
    for text, out, key in (("a" * 40, 30, keys[0]), ("b" * 8, 5, keys[1])):
        status, body = await chat(session, sim, key.value, text, out)
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] == len(text) // 4
        assert body["usage"]["completion_tokens"] == out
    minute = floor_minute(time.time())
    usage = UsageClient(base_url=sim.base_url, admin_key=KEY, session=session, retry=FAST)
    got = await usage.fetch(
        Interval(minute - 60, minute + 60), Filters(api_key_ids=frozenset({keys[0].id}))
    )
    assert [(r.api_key_id, r.usage.input_tokens, r.usage.output_tokens) for r in got.rows] == [
        (keys[0].id, 10, 30)
    ]
    listed = await c.list_keys(LEASES)
    assert {k.id for k in listed} == {k.id for k in keys}
    assert all(k.owner_type == "service_account" and k.owner_id == account.id for k in listed)
    assert all(k.last_used_at is not None for k in listed)
    assert redacted_matches(listed[0].redacted_value, keys[0].value)
    await c.delete_key(LEASES, keys[0].id)
    with pytest.raises(AdminNotFoundError):
        await c.get_key(LEASES, keys[0].id)
    with pytest.raises(AdminNotFoundError):
        await c.delete_key(LEASES, keys[0].id)
    status, body = await chat(session, sim, keys[0].value, "again", 5)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert (await c.get_key(LEASES, keys[1].id)).id == keys[1].id
    # the deleted key's past usage is still in the usage data
    again = await usage.fetch(Interval(minute - 60, minute + 60))
    assert {r.api_key_id for r in again.rows} == {k.id for k in keys}


async def test_a_service_account_with_its_first_key(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    c = client(sim, session)
    account = await c.create_service_account(
        LEASES, "with-key", create_service_account_only=False, expires_in_seconds=120
    )
    assert account.role == "member" and account.api_key is not None
    assert account.api_key.expires_at == account.api_key.created_at + 120
    assert account.api_key.value not in repr(account)
    status, _ = await chat(session, sim, account.api_key.value, "hi", 1)
    assert status == 200


async def test_list_follows_every_page(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    c = client(sim, session)
    account = await c.create_service_account(LEASES, "many")
    ids = [
        (await c.create_key(LEASES, account.id, name=f"k{i}", expires_in_seconds=60)).id
        for i in range(7)
    ]
    before = c.requests_sent
    listed = await c.list_keys(LEASES, page_size=3, owner_project_access="any")
    assert [k.id for k in listed] == ids
    assert c.requests_sent - before == 3  # 3 + 3 + 1
    pages = [e for e in sim.call_log if e.method == "GET" and e.path.endswith("/api_keys")]
    assert [e.query for e in pages] == [
        "limit=3&owner_project_access=any",
        f"limit=3&after={ids[2]}&owner_project_access=any",
        f"limit=3&after={ids[5]}&owner_project_access=any",
    ]


# ---------------------------------------------------------------------------- refusals


async def test_projects_that_cannot_hold_leases(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    c = client(sim, session)
    with pytest.raises(AdminRequestError, match="Default project cannot have service accounts"):
        await c.create_service_account("proj_default", "x")
    with pytest.raises(AdminRequestError, match="proj_old is archived") as err:
        await c.create_service_account("proj_old", "x")
    assert err.value.status == 400
    with pytest.raises(AdminNotFoundError, match="No such project"):
        await c.get_project("proj_nope")
    assert (await c.get_project("proj_old")).archived
    account = await c.create_service_account("proj_capped", "x")
    with pytest.raises(AdminRequestError, match="must not exceed 3600 seconds"):
        await c.create_key("proj_capped", account.id, name="k", expires_in_seconds=3601)
    assert (await c.create_key("proj_capped", account.id, name="k", expires_in_seconds=3600)).id


async def test_keys_that_may_not_manage_are_auth_errors_and_not_retried(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    for key, status in ((USAGE_ONLY, 403), (PROJECT_KEY, 403), ("sk-admin-unknown", 401)):
        c = client(sim, session, admin_key=key)
        with pytest.raises(AdminAuthError) as err:
            await c.get_project(LEASES)
        assert err.value.status == status and c.requests_sent == 1
        assert key not in str(err.value) and key not in repr(err.value)


# ---------------------------------------------------------------------------- faults


async def test_faults_on_admin_requests_are_retried(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    c = client(sim, session)
    key = await new_key(c)
    await faults(session, sim, "500", {"kind": "429", "retry_after": 1, "target": "admin"})
    began = time.monotonic()
    before = c.requests_sent
    await c.delete_key(LEASES, key.id)
    assert c.requests_sent - before == 3
    assert time.monotonic() - began >= 1.0  # Retry-After honoured
    assert [e.fault for e in sim.call_log[-3:]] == ["500", "429", None]
    with pytest.raises(AdminNotFoundError):
        await c.get_key(LEASES, key.id)


@pytest.mark.parametrize(
    ("kinds", "error"),
    [
        (["500", "503", "502"], AdminServerError),
        (["429", "429", "429"], AdminRateLimitedError),
        (["bad_json"], AdminMalformedResponseError),
        (
            [{"kind": "huge_page", "size": 2_000_000, "target": "admin"}],
            AdminMalformedResponseError,
        ),
    ],
)
async def test_failures_after_the_retries_are_typed(
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    kinds: list[Any],
    error: type[Exception],
) -> None:
    c = client(sim, session)
    await faults(session, sim, *kinds)
    with pytest.raises(error) as err:
        await c.get_project(LEASES)
    assert "\n" not in str(err.value) and KEY not in str(err.value)


async def test_a_hang_times_out_as_a_transport_error(
    sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    c = client(sim, session, request_timeout=0.2, retry=RetryPolicy(attempts=1))
    await faults(session, sim, {"kind": "hang", "seconds": 5, "target": "admin"})
    with pytest.raises(AdminTransportError, match=r"timed out after 0\.2s"):
        await c.get_project(LEASES)


async def test_no_secret_reaches_a_message_or_a_log_line(
    session: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that echoes the admin key and a key value in its error messages (a
    loopback server of the test's own: the simulator never echoes a key)."""
    value = "sk-svcacct-echoed-VALUE-abcdefghijkl"
    statuses = [400, 401, 404, 500]
    echo = {"message": f"bad key {KEY} near {value}", "type": "x", "param": None, "code": None}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"error": echo}, status=statuses.pop(0))

    app = web.Application()
    app.router.add_get("/v1/organization/projects/{project_id}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    structlog.configure(processors=[structlog.processors.JSONRenderer()])
    try:
        c = AdminClient(
            base_url=f"http://127.0.0.1:{port}/v1",
            admin_key=KEY,
            session=session,
            retry=RetryPolicy(attempts=1),
        )
        for expected in (AdminRequestError, AdminAuthError, AdminNotFoundError, AdminServerError):
            with pytest.raises(expected) as err:
                await c.get_project(LEASES)
            text = f"{err.value} {err.value!r}"
            assert KEY not in text and value not in text and "[REDACTED]" in text
    finally:
        await runner.cleanup()
        structlog.reset_defaults()
    out = capsys.readouterr()
    assert "admin_api.request" in out.out  # the failures were logged ...
    assert KEY not in out.out + out.err and value not in out.out + out.err  # ... cleanly
    assert KEY not in repr(c)

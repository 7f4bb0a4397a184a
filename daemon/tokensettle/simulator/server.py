"""The simulator's HTTP layer: the fake Usage API and its control endpoints (aiohttp.web).

Usage endpoint (admin-key auth, like the real one):
    GET  /v1/organization/usage/completions

Anthropic's usage report (`x-api-key` and `anthropic-version`; its model is
`simulator.anthropic`; it answers the requests registered with `"provider": "anthropic"`):
    GET  /v1/organizations/usage_report/messages

Admin API endpoints (admin-key auth) and model endpoints (project-key auth): see
`simulator.admin`, which holds their model; this module only routes and applies faults.

Control endpoints (no auth; answered only to loopback clients):
    POST /_sim/requests  {"requests": [{"time", "api_key_id", "project_id", "model",
                          "usage", "visible_after"?, "revisions"?}]}
    POST /_sim/faults    {"faults": [{"kind": "429", "retry_after"?: 1}, {"kind": "hang",
                          "seconds": 3}, {"kind": "gzip_bomb", "size"?: bytes}, ...]}
                          (FIFO per "target": usage (default), admin or model)
    POST /_sim/keys      {"admin_keys": [...], "unscoped_keys": [...],
                          "anthropic_admin_keys": [...], "anthropic_unscoped_keys": [...]}
    POST /_sim/reset     forget requests, faults and the request logs (keys stay)
    GET  /_sim/log       [{"query": raw query string, "status", "at", "fault"}]
    GET  /_sim/anthropic/log  the same for Anthropic's usage report
    GET  /_sim/stats     {"usage_requests": N, "by_status": {"200": n, ...}, ...}
    GET  /_sim/truth     {"rows": [...]} final revisions, aggregated per minute/key/project/model
                         (`?provider=anthropic`: Anthropic's, per workspace)
    GET  /_sim/admin     projects, service accounts, keys (ids and states, never values)
    POST /_sim/admin     {"projects": [...], "api_keys": [...], "usage_only_keys": [...],
                          "usage_delay": s, "key_auth_delay": s, "output_tokens": n}
    GET  /_sim/admin/log [{"target", "method", "path", "query", "status", "at", "fault"}]

Every usage request, whatever its key, consumes the next pending usage fault; every admin
(model, Anthropic usage report) request the next admin (model, anthropic) fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from tokensettle.simulator import anthropic
from tokensettle.simulator.admin import MANAGEMENT_MESSAGE, AdminModel
from tokensettle.simulator.costs import COSTS_PATH, Billing, respond_costs
from tokensettle.simulator.scenario import (
    MISSING_SCOPE_MESSAGE,
    SIMULATOR_ADMIN_KEY,
    SIZED_FAULTS,
    ApiError,
    Fault,
    Scenario,
    ScenarioError,
    request_from_json,
)

__all__ = [
    "SIMULATOR_ADMIN_KEY",
    "USAGE_PATH",
    "CallEntry",
    "LogEntry",
    "RunningSimulator",
    "create_app",
    "load_scenario_file",
    "serve_forever",
]

USAGE_PATH: Final = "/v1/organization/usage/completions"
_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})

log = structlog.get_logger("tokensettle.simulator")


@dataclass(slots=True)
class LogEntry:
    """One usage request the simulator received (never its headers or key)."""

    query: str
    at: float
    status: int = 0
    fault: str | None = None
    #: First word of the Authorization header (e.g. "Bearer"), never the credential.
    auth_scheme: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "status": self.status,
            "at": self.at,
            "fault": self.fault,
            "auth_scheme": self.auth_scheme,
        }


@dataclass(slots=True)
class CallEntry:
    """One admin or model request the simulator received (never a header, key or body)."""

    target: str
    method: str
    path: str
    query: str
    at: float
    status: int = 0
    fault: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "status": self.status,
            "at": self.at,
            "fault": self.fault,
        }


@dataclass(slots=True)
class _State:
    scenario: Scenario
    clock: Callable[[], float]
    admin: AdminModel
    log: list[LogEntry] = field(default_factory=list)
    calls: list[CallEntry] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    #: Anthropic usage report requests (never a header or key)
    anthropic_log: list[LogEntry] = field(default_factory=list)


STATE: Final = web.AppKey("tokensettle_simulator_state", _State)


def _error(err: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(err.envelope(), status=err.status, headers=headers)


_FORBIDDEN: Final = {"usage": MISSING_SCOPE_MESSAGE, "admin": MANAGEMENT_MESSAGE}
_API_NAMES: Final = {"usage": "the usage API", "admin": "the admin API", "model": "the API"}


def _fault_response(fault: Fault) -> web.Response | None:
    """The answer a fault forces, or None for faults that alter a normal answer."""
    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
    if fault.kind == "429":
        return _error(
            ApiError(
                429,
                f"Rate limit reached for requests to {_API_NAMES[fault.target]}. "
                "Please try again later.",
                type_="requests",
                code="rate_limit_exceeded",
            ),
            headers,
        )
    if fault.kind == "500":
        return _error(
            ApiError(
                500,
                "The server had an error while processing your request. Sorry about that!",
                type_="server_error",
            )
        )
    if fault.kind == "502":
        # What a gateway in front of the API answers: HTML, not the JSON envelope.
        return web.Response(
            status=502,
            text="<html><body><h1>502 Bad Gateway</h1></body></html>",
            content_type="text/html",
        )
    if fault.kind == "503":
        return _error(
            ApiError(
                503,
                "The server is overloaded or not ready yet.",
                type_="server_error",
            ),
            headers,
        )
    if fault.kind == "401":
        return _error(ApiError(401, "Incorrect API key provided.", code="invalid_api_key"))
    if fault.kind == "403":
        forbidden = _FORBIDDEN.get(fault.target, "You do not have access to this resource.")
        return _error(ApiError(403, forbidden))
    return None


_STREAM_CHUNK: Final = 1 << 20


async def _stream_padded(
    request: web.Request, page: bytes, size: int, *, gzip: bool
) -> web.StreamResponse:
    """The page with whitespace before its closing brace up to `size` decoded bytes (still
    valid JSON), streamed in chunks so the simulator's own memory stays small; gzip'ed
    lazily (level 9: about 1,000:1 on whitespace) for the bomb. No Content-Length: the
    client cannot refuse it up front, only by counting what it reads."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    if gzip:
        response.headers["Content-Encoding"] = "gzip"
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31) if gzip else None
    head = page[:-1]
    padding = max(0, size - len(page))
    blank = b" " * _STREAM_CHUNK

    def encode(data: bytes) -> bytes:
        return compressor.compress(data) if compressor is not None else data

    with contextlib.suppress(ConnectionError):  # the client stopped reading: fine
        await response.prepare(request)
        await response.write(encode(head))
        while padding:
            n = min(padding, _STREAM_CHUNK)
            chunk = encode(blank[:n])
            if chunk:
                await response.write(chunk)
            padding -= n
            await asyncio.sleep(0)  # a bomb never fills the socket: let a hang-up arrive
            if request.transport is None or request.transport.is_closing():
                break
        tail = encode(b"}") + (compressor.flush() if compressor is not None else b"")
        await response.write(tail)
        await response.write_eof()
    return response


def _prefixed(page: bytes, name: str, value: bytes) -> web.Response:
    """The page with `"name": value` as its first member: valid JSON, hostile value."""
    body = b'{"' + name.encode() + b'": ' + value + b", " + page[1:]
    return web.Response(status=200, body=body, content_type="application/json")


async def _hostile(request: web.Request, fault: Fault, answer: web.Response) -> web.StreamResponse:
    """The hostile-body faults: the normal 200 answer, made huge, a bomb, deep or with a
    huge integer. An error answer (a bad query) is served as it is."""
    page = answer.body if isinstance(answer.body, bytes) else b""
    if answer.status != 200 or not page.startswith(b"{"):
        return answer
    size = fault.effective_size
    if fault.kind in ("huge_page", "gzip_bomb"):
        return await _stream_padded(request, page, size, gzip=fault.kind == "gzip_bomb")
    if fault.kind == "deep_json":
        return _prefixed(page, "nested", b"[" * size + b"]" * size)
    return _prefixed(page, "count", b"9" * size)  # huge_int


def _answer(state: _State, request: web.Request) -> web.Response:
    denied = state.scenario.check_auth(request.headers.get("Authorization"))
    if denied is not None:
        return _error(denied)
    pairs = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True)
    try:
        page = state.scenario.respond(pairs, state.clock())
    except ApiError as err:
        return _error(err)
    return web.json_response(page)


def _auth_scheme(authorization: str | None) -> str | None:
    """ "Bearer" and the like; "invalid" for a header that is not `scheme credential` (it
    might be a bare key, which must not reach the log)."""
    if not authorization:
        return None
    scheme, sep, _ = authorization.partition(" ")
    return scheme if sep and scheme.isalpha() and len(scheme) <= 16 else "invalid"


Answer = Callable[[], Awaitable[web.Response]]


class _Entry(Protocol):
    status: int
    fault: str | None


async def _usage(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    entry = LogEntry(
        query=request.rel_url.raw_query_string,
        at=state.clock(),
        auth_scheme=_auth_scheme(request.headers.get("Authorization")),
    )
    state.log.append(entry)

    async def answer() -> web.Response:
        return _answer(state, request)

    return await _serve(request, "usage", entry, answer)


async def _serve(
    request: web.Request,
    target: str,
    entry: _Entry,
    answer: Answer,
    *,
    faults: Callable[[Fault], web.Response | None] = _fault_response,
) -> web.StreamResponse:
    """`answer()`, or what the next pending fault of `target` makes of it (an error
    answer by `faults`: the endpoint's own error envelope)."""
    state = request.app[STATE]
    fault = state.scenario.next_fault(target)
    entry.fault = fault.kind if fault else None
    response: web.Response | None = faults(fault) if fault else None
    if response is None and fault is not None and fault.kind == "hang":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.stopping.wait(), timeout=fault.seconds)
        if state.stopping.is_set():
            response = _error(
                ApiError(503, "The simulator is shutting down.", type_="server_error")
            )
    if response is None and fault is not None and fault.kind in SIZED_FAULTS:
        normal = await answer()
        entry.status = normal.status  # logged before streaming: the client may hang up
        return await _hostile(request, fault, normal)
    if response is None:
        response = await answer()
        if fault is not None and fault.kind == "bad_json":
            body = response.body if isinstance(response.body, bytes) else b""
            truncated = body[: max(1, len(body) // 2)] if response.status == 200 else b""
            response = web.Response(
                status=200,
                body=truncated or b'{"object": "page", "data": [',
                content_type="application/json",
            )
    entry.status = response.status
    return response


# --------------------------------------------------------------------------------------
# Anthropic's usage report (its model is simulator.anthropic)


def _anthropic_error(err: anthropic.AnthropicError) -> web.Response:
    return web.json_response(err.envelope(), status=err.status, headers=err.headers or None)


def _anthropic_fault(fault: Fault) -> web.Response | None:
    """A fault's error in Anthropic's envelope; 502 is the gateway's HTML page as anywhere."""
    err = anthropic.fault_error(fault)
    return _anthropic_error(err) if err is not None else _fault_response(fault)


async def _anthropic_usage(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    entry = LogEntry(
        query=request.rel_url.raw_query_string,
        at=state.clock(),
        auth_scheme="x-api-key" if request.headers.get("x-api-key") else None,
    )
    state.anthropic_log.append(entry)

    async def answer() -> web.Response:
        scenario = state.scenario
        denied = anthropic.check_headers(
            request.headers, scenario.anthropic_accepted_keys, scenario.anthropic_unscoped_keys
        )
        if denied is not None:
            return _anthropic_error(denied)
        pairs = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True)
        try:
            page = anthropic.respond(
                scenario, pairs, state.clock(), beta=anthropic.betas(request.headers)
            )
        except anthropic.AnthropicError as err:
            return _anthropic_error(err)
        return web.json_response(page)

    return await _serve(request, "anthropic", entry, answer, faults=_anthropic_fault)


async def _get_anthropic_log(request: web.Request) -> web.Response:
    return web.json_response([e.to_json() for e in request.app[STATE].anthropic_log])


# --------------------------------------------------------------------------------------
# Admin API and model endpoints (their model is simulator.admin)


async def _api_body(request: web.Request) -> dict[str, Any]:
    """The JSON object a POST carries; an ApiError (400, the usual envelope) otherwise."""
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _admin_denied(state: _State, authorization: str | None) -> ApiError | None:
    """401 for a key the usage endpoint would not take either; 403 for a project key or a
    usage-only admin key (they may not manage projects, service accounts or keys)."""
    key = (authorization or "").partition(" ")[2].strip()
    if key and key in state.scenario.unscoped_keys:
        return ApiError(403, MANAGEMENT_MESSAGE)
    return state.scenario.check_auth(authorization) or state.admin.check_admin(authorization)


AdminOp = Callable[[_State, web.Request], Awaitable[dict[str, Any]]]


def _call_entry(state: _State, request: web.Request, target: str) -> CallEntry:
    entry = CallEntry(
        target=target,
        method=request.method,
        path=request.path,
        query=request.rel_url.raw_query_string,
        at=state.clock(),
    )
    state.calls.append(entry)
    return entry


def _admin_route(op: AdminOp) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        entry = _call_entry(state, request, "admin")

        async def answer() -> web.Response:
            denied = _admin_denied(state, request.headers.get("Authorization"))
            if denied is not None:
                return _error(denied)
            try:
                return web.json_response(await op(state, request))
            except ApiError as err:
                return _error(err)

        return await _serve(request, "admin", entry, answer)

    return handler


def _ids(request: web.Request, *names: str) -> list[str]:
    return [request.match_info[name] for name in names]


async def _get_project(state: _State, request: web.Request) -> dict[str, Any]:
    return state.admin.get_project(*_ids(request, "project_id"))


async def _create_service_account(state: _State, request: web.Request) -> dict[str, Any]:
    body = await _api_body(request)
    return state.admin.create_service_account(request.match_info["project_id"], body, state.clock())


async def _create_key(state: _State, request: web.Request) -> dict[str, Any]:
    body = await _api_body(request) if request.can_read_body else {}
    project_id, account_id = _ids(request, "project_id", "service_account_id")
    return state.admin.create_key(project_id, account_id, body, state.clock())


async def _list_keys(state: _State, request: web.Request) -> dict[str, Any]:
    pairs = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True)
    return state.admin.list_keys(request.match_info["project_id"], pairs)


async def _get_key(state: _State, request: web.Request) -> dict[str, Any]:
    return state.admin.get_key(*_ids(request, "project_id", "api_key_id"))


async def _delete_key(state: _State, request: web.Request) -> dict[str, Any]:
    project_id, key_id = _ids(request, "project_id", "api_key_id")
    return state.admin.delete_key(project_id, key_id, state.clock())


def _model_route(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        entry = _call_entry(state, request, "model")

        async def answer() -> web.Response:
            now = state.clock()
            key = state.admin.model_key(request.headers.get("Authorization"), now)
            if isinstance(key, ApiError):
                return _error(key)
            try:
                body = await _api_body(request)
                if name == "chat":
                    call = state.admin.chat_completion(key, body, now)
                else:
                    call = state.admin.response(key, body, now)
            except ApiError as err:
                return _error(err)
            state.scenario.add(call.request)
            return web.json_response(call.response)

        return await _serve(request, "model", entry, answer)

    return handler


# --------------------------------------------------------------------------------------
# Control endpoints


@web.middleware
async def _loopback_only(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    if request.path.startswith("/_sim/") and request.remote not in _LOOPBACK:
        return web.json_response({"error": "control endpoints answer loopback only"}, status=403)
    response: web.StreamResponse = await handler(request)
    return response


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, too deep, huge ints
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"body is not usable JSON: {type(exc).__name__}"}),
            content_type="application/json",
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body must be a JSON object"}),
            content_type="application/json",
        )
    return body


def _invalid(exc: ScenarioError) -> web.Response:
    return web.json_response({"error": str(exc)}, status=400)


async def _register_requests(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    raw = body.get("requests")
    if not isinstance(raw, list):
        return web.json_response({"error": "'requests' must be a list"}, status=400)
    now = state.clock()
    try:
        parsed = [request_from_json(r, registered_at=now) for r in raw]
    except ScenarioError as exc:
        return _invalid(exc)
    for req in parsed:
        state.scenario.add(req)
    return web.json_response({"registered": len(parsed), "registered_at": now})


async def _queue_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    raw = body.get("faults")
    if not isinstance(raw, list):
        return web.json_response({"error": "'faults' must be a list"}, status=400)
    try:
        faults = [Fault.from_json(f) for f in raw]
    except ScenarioError as exc:
        return _invalid(exc)
    for fault in faults:
        state.scenario.add_fault(fault)
    return web.json_response({"queued": len(faults), "pending": len(state.scenario.faults)})


async def _set_keys(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    updates: dict[str, set[str]] = {}
    names = ("admin_keys", "unscoped_keys", "anthropic_admin_keys", "anthropic_unscoped_keys")
    for name in names:
        if name in body:
            value = body[name]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                return web.json_response(
                    {"error": f"{name!r} must be a list of strings"}, status=400
                )
            updates[name] = set(value)
    if "admin_keys" in updates:
        state.scenario.admin_keys = updates["admin_keys"]
    if "unscoped_keys" in updates:
        state.scenario.unscoped_keys = updates["unscoped_keys"]
    if "anthropic_admin_keys" in updates:
        state.scenario.anthropic_admin_keys = updates["anthropic_admin_keys"]
    if "anthropic_unscoped_keys" in updates:
        state.scenario.anthropic_unscoped_keys = updates["anthropic_unscoped_keys"]
    return web.json_response({name: len(getattr(state.scenario, name)) for name in names})


async def _reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.scenario.reset()
    state.log.clear()
    state.calls.clear()
    state.anthropic_log.clear()
    return web.json_response({"reset": True})


async def _get_admin(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(state.admin.inspect(state.clock()))


async def _set_admin(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    try:
        state.admin.configure(body)
    except ScenarioError as exc:
        return _invalid(exc)
    return web.json_response(state.admin.inspect(state.clock()))


async def _get_admin_log(request: web.Request) -> web.Response:
    return web.json_response([e.to_json() for e in request.app[STATE].calls])


def _stats(state: _State) -> dict[str, Any]:
    by_status = Counter(str(e.status) for e in state.log)
    anthropic_by_status = Counter(str(e.status) for e in state.anthropic_log)
    return {
        "usage_requests": len(state.log),
        "by_status": dict(sorted(by_status.items())),
        "registered_requests": len(state.scenario.requests),
        "pending_faults": len(state.scenario.faults),
        "anthropic_requests": len(state.anthropic_log),
        "anthropic_by_status": dict(sorted(anthropic_by_status.items())),
        "registered_anthropic_requests": len(state.scenario.anthropic_requests),
    }


async def _get_log(request: web.Request) -> web.Response:
    return web.json_response([e.to_json() for e in request.app[STATE].log])


async def _get_stats(request: web.Request) -> web.Response:
    return web.json_response(_stats(request.app[STATE]))


async def _get_truth(request: web.Request) -> web.Response:
    provider = request.query.get("provider", "openai")
    if provider == "anthropic":
        return web.json_response({"rows": anthropic.truth_rows(request.app[STATE].scenario)})
    if provider != "openai":
        return web.json_response({"error": "provider must be openai or anthropic"}, status=400)
    rows = request.app[STATE].scenario.truth()
    return web.json_response(
        {
            "rows": [
                {
                    "minute": r.minute,
                    "api_key_id": r.api_key_id,
                    "project_id": r.project_id,
                    "model": r.model,
                    "usage": r.usage.present(),
                }
                for r in rows
            ]
        }
    )


# --------------------------------------------------------------------------------------
# The costs endpoint (its model is simulator.costs) and its billing knobs


@dataclass(slots=True)
class CostsState:
    """The billing knobs and the costs requests received (never a header or key)."""

    billing: Billing = field(default_factory=Billing)
    log: list[LogEntry] = field(default_factory=list)


COSTS: Final = web.AppKey("tokensettle_simulator_costs", CostsState)


async def _costs(request: web.Request) -> web.Response:
    """`GET /v1/organization/costs`: admin-key auth like the usage endpoint. Costs requests
    take no faults (those are the usage endpoint's)."""
    state = request.app[STATE]
    costs = request.app[COSTS]
    entry = LogEntry(
        query=request.rel_url.raw_query_string,
        at=state.clock(),
        auth_scheme=_auth_scheme(request.headers.get("Authorization")),
    )
    costs.log.append(entry)
    denied = state.scenario.check_auth(request.headers.get("Authorization"))
    if denied is not None:
        response = _error(denied)
    else:
        pairs = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True)
        try:
            response = web.json_response(
                respond_costs(state.scenario, costs.billing, pairs, state.clock())
            )
        except ApiError as err:
            response = _error(err)
    entry.status = response.status
    return response


async def _set_billing(request: web.Request) -> web.Response:
    """`POST /_sim/billing`: replace the billing knobs (docs/simulator.md, "Costs")."""
    body = await _json_body(request)
    try:
        billing = Billing.from_json(body)
    except ScenarioError as exc:
        return _invalid(exc)
    request.app[COSTS].billing = billing
    return web.json_response(billing.to_json())


async def _get_billing(request: web.Request) -> web.Response:
    costs = request.app[COSTS]
    return web.json_response(
        {**costs.billing.to_json(), "requests": [e.to_json() for e in costs.log]}
    )


def _add_costs(app: web.Application) -> None:
    app[COSTS] = CostsState()
    app.router.add_get(COSTS_PATH, _costs)
    app.router.add_post("/_sim/billing", _set_billing)
    app.router.add_get("/_sim/billing", _get_billing)


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].stopping.set()  # wake hanging handlers so shutdown is not blocked


PROJECT_PATH: Final = "/v1/organization/projects/{project_id}"


def create_app(
    scenario: Scenario,
    *,
    clock: Callable[[], float] = time.time,
    admin: AdminModel | None = None,
) -> web.Application:
    """The simulator as an aiohttp application over `scenario`, reading time from `clock`.

    `admin` is the organisation's projects and keys; by default built from the scenario's
    "admin" section (raises ScenarioError when that is invalid)."""
    app = web.Application(middlewares=[_loopback_only])
    model = admin if admin is not None else AdminModel.from_json(scenario.admin)
    app[STATE] = _State(scenario=scenario, clock=clock, admin=model)
    app.router.add_get(USAGE_PATH, _usage)
    app.router.add_get(anthropic.USAGE_REPORT_PATH, _anthropic_usage)
    app.router.add_get("/_sim/anthropic/log", _get_anthropic_log)
    app.router.add_get(PROJECT_PATH, _admin_route(_get_project))
    app.router.add_post(f"{PROJECT_PATH}/service_accounts", _admin_route(_create_service_account))
    app.router.add_post(
        f"{PROJECT_PATH}/service_accounts/{{service_account_id}}/api_keys",
        _admin_route(_create_key),
    )
    app.router.add_get(f"{PROJECT_PATH}/api_keys", _admin_route(_list_keys))
    app.router.add_get(f"{PROJECT_PATH}/api_keys/{{api_key_id}}", _admin_route(_get_key))
    app.router.add_delete(f"{PROJECT_PATH}/api_keys/{{api_key_id}}", _admin_route(_delete_key))
    app.router.add_post("/v1/chat/completions", _model_route("chat"))
    app.router.add_post("/v1/responses", _model_route("responses"))
    app.router.add_get("/_sim/admin", _get_admin)
    app.router.add_post("/_sim/admin", _set_admin)
    app.router.add_get("/_sim/admin/log", _get_admin_log)
    app.router.add_post("/_sim/requests", _register_requests)
    app.router.add_post("/_sim/faults", _queue_faults)
    app.router.add_post("/_sim/keys", _set_keys)
    app.router.add_post("/_sim/reset", _reset)
    app.router.add_get("/_sim/log", _get_log)
    app.router.add_get("/_sim/stats", _get_stats)
    app.router.add_get("/_sim/truth", _get_truth)
    _add_costs(app)
    app.on_shutdown.append(_on_shutdown)
    return app


# --------------------------------------------------------------------------------------
# Running it


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class RunningSimulator:
    """`async with RunningSimulator(scenario) as sim:` serves on 127.0.0.1 (port 0 = any
    free port) until the block ends; `sim.base_url` is the API base for a client."""

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        admin: AdminModel | None = None,
    ) -> None:
        self.scenario = scenario if scenario is not None else Scenario()
        self.host = host
        self.app = create_app(self.scenario, clock=clock, admin=admin)
        self._requested_port = port
        self._port: int | None = None
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Self:
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self._port = int(address[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not running")
        return self._port

    @property
    def root_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def base_url(self) -> str:
        """API base, e.g. `http://127.0.0.1:8787/v1` (the client appends the path)."""
        return f"{self.root_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """Anthropic's API base, e.g. `http://127.0.0.1:8787` (TOKENSETTLE_ANTHROPIC_API_BASE_URL:
        the client appends `/v1/organizations/usage_report/messages`)."""
        return self.root_url

    @property
    def anthropic_request_log(self) -> list[LogEntry]:
        """The Anthropic usage report requests received so far (live list, arrival order)."""
        return self.app[STATE].anthropic_log

    @property
    def request_log(self) -> list[LogEntry]:
        """The usage requests received so far (live list, arrival order)."""
        return self.app[STATE].log

    @property
    def admin(self) -> AdminModel:
        """The simulated organisation's projects, service accounts and keys (live)."""
        return self.app[STATE].admin

    @property
    def call_log(self) -> list[CallEntry]:
        """The admin and model requests received so far (live list, arrival order)."""
        return self.app[STATE].calls

    def stats(self) -> dict[str, Any]:
        return _stats(self.app[STATE])


def load_scenario_file(path: str | Path, *, now: float | None = None) -> Scenario:
    """Read a scenario JSON file (`--scenario FILE`). Requests without `registered_at` are
    registered at `now` (default: the current time), so their delays count from startup."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {p}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"scenario {p} is not valid JSON: {exc}") from None
    try:
        scenario = Scenario.from_json(obj, registered_at=time.time() if now is None else now)
        AdminModel.from_json(scenario.admin)  # refuse a bad "admin" section at load time
    except ScenarioError as exc:
        raise ScenarioError(f"scenario {p}: {exc}") from None
    return scenario


async def serve_forever(
    host: str,
    port: int,
    scenario: Scenario,
    *,
    on_ready: Callable[[RunningSimulator], None] | None = None,
) -> None:
    """Serve until cancelled or until SIGINT/SIGTERM (used by `tokensettle simulate`).

    `on_ready` is called once the socket listens and the signal handlers are installed.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or no signal support: cancellation still works
        installed.append(sig)
    try:
        async with RunningSimulator(scenario, host=host, port=port) as sim:
            log.info(
                "simulator.listening",
                url=sim.base_url,
                requests=len(scenario.requests),
                admin_keys=len(scenario.accepted_keys),
                default_key=not scenario.admin_keys,
                anthropic_url=sim.anthropic_base_url,
                anthropic_requests=len(scenario.anthropic_requests),
                anthropic_default_key=not scenario.anthropic_admin_keys,
            )
            if on_ready is not None:
                on_ready(sim)
            await stop.wait()
            log.info("simulator.stopping")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)

"""The aiohttp client for the OpenAI Admin API operations a lease needs.

Projects (retrieve), project service accounts (create), service-account keys (create
with `expires_in_seconds`), project API keys (list, retrieve, delete); shapes as in
../shared/reference/openai-admin-api.yaml. Same discipline as `usage_api`: each request
is rate limited (leaky bucket), bounded by a timeout and a body cap, retried on 429, 5xx
and transport errors with backoff and full jitter honouring `Retry-After`; a failure is a
typed `AdminApiError`, never a default value.

Secrets: the admin key travels only in the `Authorization` header and is scrubbed from
every message; anything shaped like a secret key in a server message is masked too. A
new key's `value` lives only in `LeasedKey.value`, whose repr and str hide it, and no
exception message is ever built from a response body that carried one.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import quote

import aiohttp
import structlog
from aiolimiter import AsyncLimiter

from tokensettle.usage_api import ApiRequestError, RetryPolicy, parse_retry_after, request_capped

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "AdminApiError",
    "AdminAuthError",
    "AdminClient",
    "AdminMalformedResponseError",
    "AdminNotFoundError",
    "AdminRateLimitedError",
    "AdminRequestError",
    "AdminServerError",
    "AdminTransportError",
    "LeasedKey",
    "Project",
    "ProjectKey",
    "ServiceAccount",
    "mask_secrets",
    "redacted_matches",
]

#: Admin objects are small: a page of 100 keys is ~60 KB. A larger body is not read.
DEFAULT_MAX_BODY_BYTES: Final = 1024 * 1024
_MESSAGE_LIMIT: Final = 300
_REDACTED: Final = "[REDACTED]"
#: Secret keys as OpenAI writes them (sk-..., sk-proj-..., sk-svcacct-..., sk-admin-...).
_SECRET_SHAPE: Final = re.compile(r"sk-[A-Za-z0-9_\-]{6,}")
_LIST_LIMIT: Final = 100
_MAX_LIST_PAGES: Final = 1000
_DEFAULT_RETRY: Final = RetryPolicy()

log = structlog.get_logger("tokensettle.admin_api")


# --------------------------------------------------------------------------------------
# Errors


class AdminApiError(ApiRequestError):
    """An Admin API request failed. `retryable`: trying again later may help. `code` is
    the error envelope's `code` where the server gave one."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(message, status=status, retry_after=retry_after, attempt=attempt)
        self.code = code


class AdminAuthError(AdminApiError):
    """401/403: the admin key is wrong or may not manage projects, service accounts or
    keys. Never retried; callers exit 3."""


class AdminNotFoundError(AdminApiError):
    """404: no such project, service account or key (or no longer: a deleted key)."""


class AdminRequestError(AdminApiError):
    """400 and other 4xx: the server refused the request; the message says why (the
    Default project, an archived project, a key-lifetime policy, a bad field)."""


class AdminRateLimitedError(AdminApiError):
    """429 still failing after the retries, or a `Retry-After` longer than allowed."""

    retryable = True


class AdminServerError(AdminApiError):
    """5xx still failing after the retries."""

    retryable = True


class AdminTransportError(AdminApiError):
    """Connection errors or timeouts still failing after the retries."""

    retryable = True


class AdminMalformedResponseError(AdminApiError):
    """A 200 whose body is not the documented object. Not retried: a create that was
    answered this way may have created the object, and a second try would make another."""


# --------------------------------------------------------------------------------------
# Objects


@dataclass(frozen=True, slots=True)
class Project:
    """`organization.project`."""

    id: str
    name: str | None
    created_at: int
    status: str | None = None
    archived_at: int | None = None

    @property
    def archived(self) -> bool:
        return self.status == "archived" or self.archived_at is not None


@dataclass(frozen=True, slots=True)
class LeasedKey:
    """A key just created, with its secret `value` (shown once by the API). The value is
    never part of repr or str; hand it to the run and forget it."""

    id: str
    name: str
    created_at: int
    expires_at: int | None
    value: str = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"LeasedKey(id={self.id!r}, name={self.name!r}, created_at={self.created_at}, "
            f"expires_at={self.expires_at}, value=<hidden>)"
        )

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """`organization.project.service_account` as the create answer gives it."""

    id: str
    name: str
    role: str
    created_at: int
    api_key: LeasedKey | None = None


@dataclass(frozen=True, slots=True)
class ProjectKey:
    """`organization.project.api_key`: a key as list and retrieve show it (redacted)."""

    id: str
    name: str
    redacted_value: str
    created_at: int
    last_used_at: int | None
    owner_type: str | None
    owner_id: str | None
    expires_at: int | None = None
    owner_project_access: str | None = None


def redacted_matches(redacted: str, secret: str) -> bool:
    """Whether `secret` is the key a list shows as `redacted` (`sk-abc...wxyz`): the
    visible head and tail match. Used to find a known secret's key id without printing it."""
    head, sep, tail = redacted.partition("...")
    if not sep:
        head, sep, tail = redacted.partition("*")
        tail = tail.lstrip("*")
    if not sep or not head or len(head) + len(tail) >= len(secret):
        return False
    return secret.startswith(head) and secret.endswith(tail)


def mask_secrets(text: str) -> str:
    """`text` with everything shaped like a secret key replaced (a server may echo one)."""
    return _SECRET_SHAPE.sub("sk-" + _REDACTED, text)


# --------------------------------------------------------------------------------------
# Parsing (pure)


def _malformed(what: str, problem: str) -> AdminMalformedResponseError:
    return AdminMalformedResponseError(f"malformed Admin API answer to {what}: {problem}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str(obj: Mapping[str, Any], name: str, what: str, *, optional: bool = False) -> Any:
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _malformed(what, f"'{name}' is not a string")
    return value


def _int(obj: Mapping[str, Any], name: str, what: str, *, optional: bool = False) -> Any:
    value = obj.get(name)
    if value is None and optional:
        return None
    if not _is_int(value):
        raise _malformed(what, f"'{name}' is not an integer")
    return value


def _object(body: object, expected: str | None, what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise _malformed(what, "the body is not a JSON object")
    if expected is not None and body.get("object") != expected:
        # Never quote what the server sent: a create answer carries the key's value.
        raise _malformed(what, f"'object' is not {expected!r}")
    return body


def parse_project(body: object, what: str) -> Project:
    obj = _object(body, "organization.project", what)
    return Project(
        id=_str(obj, "id", what),
        name=_str(obj, "name", what, optional=True),
        created_at=_int(obj, "created_at", what),
        status=_str(obj, "status", what, optional=True),
        archived_at=_int(obj, "archived_at", what, optional=True),
    )


_KEY_OBJECT: Final = "organization.project.service_account.api_key"


def parse_leased_key(body: object, what: str) -> LeasedKey:
    """A created key. Messages never quote its fields: the body holds the secret."""
    obj = _object(body, _KEY_OBJECT, what)
    value = obj.get("value")
    if not isinstance(value, str) or not value:
        raise _malformed(what, "'value' is missing or not a string")
    return LeasedKey(
        id=_str(obj, "id", what),
        name=_str(obj, "name", what),
        created_at=_int(obj, "created_at", what),
        expires_at=_int(obj, "expires_at", what, optional=True),
        value=value,
    )


def parse_service_account(body: object, what: str) -> ServiceAccount:
    obj = _object(body, "organization.project.service_account", what)
    raw_key = obj.get("api_key")
    return ServiceAccount(
        id=_str(obj, "id", what),
        name=_str(obj, "name", what),
        role=_str(obj, "role", what),
        created_at=_int(obj, "created_at", what),
        api_key=None if raw_key is None else parse_leased_key(raw_key, what),
    )


def parse_project_key(body: object, what: str) -> ProjectKey:
    obj = _object(body, "organization.project.api_key", what)
    owner = obj.get("owner")
    owner_type = owner_id = None
    if isinstance(owner, Mapping):
        owner_type = owner.get("type") if isinstance(owner.get("type"), str) else None
        detail = owner.get(owner_type) if owner_type else None
        if isinstance(detail, Mapping) and isinstance(detail.get("id"), str):
            owner_id = detail["id"]
    elif owner is not None:
        raise _malformed(what, "'owner' is not an object")
    return ProjectKey(
        id=_str(obj, "id", what),
        name=_str(obj, "name", what),
        redacted_value=_str(obj, "redacted_value", what),
        created_at=_int(obj, "created_at", what),
        last_used_at=_int(obj, "last_used_at", what, optional=True),
        owner_type=owner_type,
        owner_id=owner_id,
        expires_at=_int(obj, "expires_at", what, optional=True),
        owner_project_access=_str(obj, "owner_project_access", what, optional=True),
    )


def parse_key_page(body: object, what: str) -> tuple[list[ProjectKey], bool, str | None]:
    """A list page: its keys, `has_more`, and `last_id` (the next `after`)."""
    obj = _object(body, "list", what)
    data = obj.get("data")
    if not isinstance(data, list):
        raise _malformed(what, "'data' is not a list")
    has_more = obj.get("has_more")
    if not isinstance(has_more, bool):
        raise _malformed(what, "'has_more' is not a boolean")
    keys = [parse_project_key(item, what) for item in data]
    last_id = _str(obj, "last_id", what, optional=True)
    return keys, has_more, last_id or (keys[-1].id if keys else None)


def parse_deleted(body: object, key_id: str, what: str) -> None:
    obj = _object(body, "organization.project.api_key.deleted", what)
    if obj.get("deleted") is not True:
        raise _malformed(what, "'deleted' is not true")
    if obj.get("id") != key_id:
        raise _malformed(what, "'id' is not the key that was deleted")


def error_envelope(raw: bytes | bytearray) -> tuple[str | None, str | None]:
    """(`error.message`, `error.code`) of the standard envelope, where the body is one."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None, None
    err = obj.get("error") if isinstance(obj, Mapping) else None
    if isinstance(err, str):
        return err or None, None
    if not isinstance(err, Mapping):
        return None, None
    message = err.get("message") if isinstance(err.get("message"), str) else None
    code = err.get("code") if isinstance(err.get("code"), str) else None
    return message or None, code


# --------------------------------------------------------------------------------------
# The client

Method = Literal["GET", "POST", "DELETE"]


def _seg(value: str) -> str:
    return quote(value, safe="")


class AdminClient:
    """Admin API operations for leases. The aiohttp session is owned by the caller."""

    def __init__(
        self,
        *,
        base_url: str,
        admin_key: str,
        session: aiohttp.ClientSession,
        rate_limit_per_min: float = 30.0,
        request_timeout: float = 30.0,
        retry: RetryPolicy = _DEFAULT_RETRY,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if rate_limit_per_min <= 0:
            raise ValueError("rate_limit_per_min must be positive")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        self._base = base_url.rstrip("/")
        self.__key = admin_key
        self._session = session
        self._limiter = AsyncLimiter(rate_limit_per_min, 60)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._retry = retry
        self._max_body_bytes = max_body_bytes
        self._requests_sent = 0
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"AdminClient(base_url={self._base!r}, requests_sent={self._requests_sent})"

    @property
    def requests_sent(self) -> int:
        """HTTP requests sent over the client's life, retries included."""
        return self._requests_sent

    # ------------------------------------------------------------------ operations

    async def get_project(self, project_id: str) -> Project:
        """`GET /organization/projects/{project_id}`."""
        path = f"/organization/projects/{_seg(project_id)}"
        body = await self._request("GET", path)
        return parse_project(body, f"GET {path}")

    async def create_service_account(
        self,
        project_id: str,
        name: str,
        *,
        create_service_account_only: bool = True,
        expires_in_seconds: int | None = None,
    ) -> ServiceAccount:
        """`POST /organization/projects/{project_id}/service_accounts`. With
        `create_service_account_only` (the default) the account has role `none` and no
        key; otherwise the answer carries its first key (value included)."""
        path = f"/organization/projects/{_seg(project_id)}/service_accounts"
        payload: dict[str, Any] = {
            "name": name,
            "create_service_account_only": create_service_account_only,
        }
        if expires_in_seconds is not None:
            payload["expires_in_seconds"] = expires_in_seconds
        body = await self._request("POST", path, payload=payload)
        return parse_service_account(body, f"POST {path}")

    async def create_key(
        self,
        project_id: str,
        service_account_id: str,
        *,
        name: str,
        expires_in_seconds: int,
        scopes: Sequence[str] | None = None,
    ) -> LeasedKey:
        """`POST /organization/projects/{p}/service_accounts/{sa}/api_keys`: a new key
        expiring in `expires_in_seconds`, with its id and (once only) its value."""
        path = (
            f"/organization/projects/{_seg(project_id)}/service_accounts/"
            f"{_seg(service_account_id)}/api_keys"
        )
        payload: dict[str, Any] = {"name": name, "expires_in_seconds": expires_in_seconds}
        if scopes is not None:
            payload["scopes"] = list(scopes)
        body = await self._request("POST", path, payload=payload)
        return parse_leased_key(body, f"POST {path}")

    async def list_keys(
        self,
        project_id: str,
        *,
        owner_project_access: Literal["active", "inactive", "any"] | None = None,
        page_size: int = _LIST_LIMIT,
    ) -> list[ProjectKey]:
        """`GET /organization/projects/{project_id}/api_keys`, every page (`after`)."""
        if not 1 <= page_size <= _LIST_LIMIT:
            raise ValueError(f"page_size must be between 1 and {_LIST_LIMIT}")
        path = f"/organization/projects/{_seg(project_id)}/api_keys"
        keys: list[ProjectKey] = []
        seen: set[str] = set()
        after: str | None = None
        for _ in range(_MAX_LIST_PAGES):
            params: list[tuple[str, str]] = [("limit", str(page_size))]
            if after is not None:
                params.append(("after", after))
            if owner_project_access is not None:
                params.append(("owner_project_access", owner_project_access))
            body = await self._request("GET", path, params=params)
            page, has_more, last = parse_key_page(body, f"GET {path}")
            keys.extend(page)
            if not has_more:
                return keys
            if last is None or last in seen:
                raise _malformed(f"GET {path}", "has_more without a new last_id to continue")
            seen.add(last)
            after = last
        raise _malformed(f"GET {path}", f"more than {_MAX_LIST_PAGES} pages")

    async def get_key(self, project_id: str, key_id: str) -> ProjectKey:
        """`GET /organization/projects/{project_id}/api_keys/{key_id}`."""
        path = f"/organization/projects/{_seg(project_id)}/api_keys/{_seg(key_id)}"
        body = await self._request("GET", path)
        return parse_project_key(body, f"GET {path}")

    async def delete_key(self, project_id: str, key_id: str) -> None:
        """`DELETE /organization/projects/{project_id}/api_keys/{key_id}`. A key that is
        already gone raises AdminNotFoundError; whether that counts as done is the
        caller's decision."""
        path = f"/organization/projects/{_seg(project_id)}/api_keys/{_seg(key_id)}"
        body = await self._request("DELETE", path)
        parse_deleted(body, key_id, f"DELETE {path}")

    # ------------------------------------------------------------------ transport

    def _redact(self, text: str) -> str:
        text = text.replace(self.__key, _REDACTED) if self.__key else text
        text = mask_secrets(text)
        return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."

    async def _request(
        self,
        method: Method,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        payload: Mapping[str, Any] | None = None,
    ) -> object:
        """The decoded JSON of a 200 answer, after retries; else the typed error."""
        async for attempt in self._retry.retrying(self._rng):
            with attempt:
                number = attempt.retry_state.attempt_number
                return await self._send(method, path, params, payload, number)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _send(
        self,
        method: Method,
        path: str,
        params: Sequence[tuple[str, str]],
        payload: Mapping[str, Any] | None,
        attempt: int,
    ) -> object:
        what = f"{method} {path}"
        of = f"attempt {attempt} of {self._retry.attempts}"
        async with self._limiter:
            self._requests_sent += 1
            began = time.monotonic()
            try:
                answer = await request_capped(
                    self._session,
                    method,
                    self._base + path,
                    key=self.__key,
                    client_timeout=self._timeout,
                    ok_limit=self._max_body_bytes,
                    params=params,
                    payload=payload,
                )
            except TimeoutError:
                self._log(what, None, attempt, began, error="timeout")
                raise AdminTransportError(
                    f"Admin API {what} timed out after {self._timeout.total}s ({of})",
                    attempt=attempt,
                ) from None
            except aiohttp.ClientError as exc:
                self._log(what, None, attempt, began, error=type(exc).__name__)
                raise AdminTransportError(
                    f"Admin API {what} failed: {type(exc).__name__}: "
                    f"{self._redact(str(exc))} ({of})",
                    attempt=attempt,
                ) from None
        status = answer.status
        self._log(what, status, attempt, began)
        if status == 200:
            if not answer.complete:
                raise _malformed(what, f"larger than {self._max_body_bytes:,} bytes; not read")
            try:
                return json.loads(answer.body)
            except (ValueError, RecursionError):
                raise _malformed(what, "the body is not JSON") from None
        raise self._status_error(
            what,
            status,
            reason=answer.reason,
            headers=answer.headers,
            raw=answer.body,
            of=of,
            attempt=attempt,
        )

    def _status_error(
        self,
        what: str,
        status: int,
        *,
        reason: str,
        headers: Mapping[str, str],
        raw: bytes | bytearray,
        of: str,
        attempt: int,
    ) -> AdminApiError:
        message, code = error_envelope(raw)
        detail = self._redact(message or reason or "")
        text = f"Admin API {what} answered HTTP {status}" + (f": {detail}" if detail else "")
        if status in (401, 403):
            return AdminAuthError(text, status=status, code=code, attempt=attempt)
        if status == 404:
            return AdminNotFoundError(text, status=status, code=code, attempt=attempt)
        retry_after = parse_retry_after(headers, time.time())
        if retry_after is not None and retry_after > self._retry.max_retry_after:
            text += f" (Retry-After {retry_after:g}s exceeds {self._retry.max_retry_after:g}s)"
        kind: type[AdminApiError]
        if status == 429:
            kind = AdminRateLimitedError
        elif status >= 500:
            kind = AdminServerError
        elif status == 408:
            kind = AdminTransportError
        elif 400 <= status < 500:
            return AdminRequestError(text, status=status, code=code, attempt=attempt)
        else:
            return AdminMalformedResponseError(
                f"Admin API {what}: unexpected HTTP {status}", status=status, attempt=attempt
            )
        return kind(
            f"{text} ({of})", status=status, code=code, retry_after=retry_after, attempt=attempt
        )

    def _log(
        self, what: str, status: int | None, attempt: int, began: float, error: str | None = None
    ) -> None:
        duration_ms = round((time.monotonic() - began) * 1000.0, 1)
        level = log.debug if status == 200 else log.warning
        level(
            "admin_api.request",
            request=what,
            status=status,
            attempt=attempt,
            duration_ms=duration_ms,
            **({"error": error} if error else {}),
        )


def client_for(settings: Any, session: aiohttp.ClientSession, admin_key: str) -> AdminClient:
    """The Admin API client for `settings` (a tokensettle Settings: base URL, rate limit,
    timeout and attempts, shared with the Usage API client)."""
    return AdminClient(
        base_url=settings.api_base_url,
        admin_key=admin_key,
        session=session,
        rate_limit_per_min=settings.rate_limit_per_min,
        request_timeout=settings.request_timeout.total_seconds(),
        retry=RetryPolicy(attempts=settings.request_attempts),
    )

"""The simulator's Admin API and model endpoints, as a pure model (no I/O, no clock).

Admin endpoints (admin-key auth; shapes of ../shared/reference/openai-admin-api.yaml):

    GET    /v1/organization/projects/{project_id}
    POST   /v1/organization/projects/{project_id}/service_accounts
    POST   /v1/organization/projects/{project_id}/service_accounts/{sa_id}/api_keys
    GET    /v1/organization/projects/{project_id}/api_keys  (limit, after, owner_project_access)
    GET    /v1/organization/projects/{project_id}/api_keys/{key_id}
    DELETE /v1/organization/projects/{project_id}/api_keys/{key_id}

Model endpoints (project-key auth: the value of a live key):

    POST   /v1/chat/completions
    POST   /v1/responses

A model call is answered with a deterministic usage and recorded as a virtual request of
that key's id, project and model at `now`, visible `usage_delay` seconds later. Input
tokens are ceil(characters of text / 4) (at least 1): message contents for chat, and
`instructions` plus `input` for responses; output tokens are `max_completion_tokens`,
`max_tokens` or `max_output_tokens` when given, else `DEFAULT_OUTPUT_TOKENS` (times `n`
for chat); one model request, no cached tokens.

Decisions where no source decides (admin-api-notes.md section 8): the Default project
refuses service accounts with 400 and the usual envelope, as an archived project does;
unknown projects, service accounts and keys are 404; an expired, deleted or unknown key
on a model call is 401; a new key authenticates `key_auth_delay` seconds after creation
(default at once); a deleted key disappears from list and retrieve (404) while its past
usage stays in the usage data. Key values are stored only as SHA-256 digests: no
endpoint returns a value after the create answer that carried it.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tokensettle.simulator.scenario import ApiError, Revision, ScenarioError, VirtualRequest
from tokensettle.usage import Usage

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "DEFAULT_PROJECTS",
    "DEFAULT_USAGE_DELAY",
    "MANAGEMENT_MESSAGE",
    "MAX_EXPIRES_IN_SECONDS",
    "AdminModel",
    "ModelCall",
    "SimKey",
    "SimProject",
    "SimServiceAccount",
]

DEFAULT_OUTPUT_TOKENS: Final = 16
#: Seconds after a model call that its usage shows in the Usage API (settable).
DEFAULT_USAGE_DELAY: Final = 5.0
#: The range [REF-TR] gives for `expires_in_seconds`: one second to one year.
MAX_EXPIRES_IN_SECONDS: Final = 31_536_000
MANAGEMENT_MESSAGE: Final = (
    "You have insufficient permissions for this operation: managing projects, service "
    "accounts and API keys needs an admin key with write access to them."
)
#: Without an "admin" section a scenario has the organisation's Default project and one
#: named project for leases (the project the simulator's seeded usage uses too).
DEFAULT_PROJECTS: Final = (
    {"id": "proj_default", "name": "Default project", "default": True},
    {"id": "proj_simulator", "name": "Simulator"},
)
_LIST_DEFAULT, _LIST_MAX = 20, 100
_ADMIN_FIELDS: Final = frozenset(
    {"projects", "api_keys", "usage_only_keys", "usage_delay", "key_auth_delay", "output_tokens"}
)
_PROJECT_FIELDS: Final = frozenset(
    {"id", "name", "default", "archived", "max_key_lifetime", "created_at", "refuse_sa_key_delete"}
)
_STATIC_KEY_FIELDS: Final = frozenset({"id", "value", "project_id", "name", "created_at"})


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _redacted(value: str) -> str:
    return f"{value[:8]}...{value[-4:]}"


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _not_found(message: str) -> ApiError:
    return ApiError(404, message, code="not_found")


# --------------------------------------------------------------------------------------
# Objects


@dataclass(slots=True)
class SimProject:
    id: str
    name: str
    created_at: int = 1_700_000_000
    default: bool = False
    archived: bool = False
    #: An organisation or project policy capping key lifetime (seconds), or None.
    max_key_lifetime: int | None = None
    #: Answer DELETE of a service-account key with 400, as the spec's summary says
    #: (the SDK says such keys are deleted; admin-api-notes.md section 5).
    refuse_sa_key_delete: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "organization.project",
            "id": self.id,
            "name": self.name,
            "created_at": self.created_at,
            "archived_at": self.created_at if self.archived else None,
            "status": "archived" if self.archived else "active",
        }

    def config_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "created_at": self.created_at}
        for name in ("default", "archived", "refuse_sa_key_delete"):
            if getattr(self, name):
                out[name] = True
        if self.max_key_lifetime is not None:
            out["max_key_lifetime"] = self.max_key_lifetime
        return out


@dataclass(slots=True)
class SimServiceAccount:
    id: str
    project_id: str
    name: str
    role: str
    created_at: int


@dataclass(slots=True)
class SimKey:
    """A key as the simulator keeps it: the digest of its value, never the value."""

    id: str
    project_id: str
    name: str
    created_at: int
    expires_at: int | None
    owner_type: str  # "service_account" or "user"
    owner_id: str
    owner_name: str
    value_digest: str
    redacted_value: str
    scopes: tuple[str, ...] = ()
    deleted_at: float | None = None
    last_used_at: int | None = None
    calls: int = 0

    def state(self, now: float) -> str:
        if self.deleted_at is not None:
            return "deleted"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def to_json(self, owner: Mapping[str, Any]) -> dict[str, Any]:
        """`organization.project.api_key` (redacted)."""
        detail = {"id": self.owner_id, "name": self.owner_name, "created_at": self.created_at}
        if self.owner_type == "user":
            detail |= {"email": f"{self.owner_id}@example.com", "role": "owner"}
        else:
            detail["role"] = str(owner.get("role", "member"))
        return {
            "object": "organization.project.api_key",
            "redacted_value": self.redacted_value,
            "name": self.name,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "id": self.id,
            "owner_project_access": "active",
            "owner": {"type": self.owner_type, self.owner_type: detail},
            "expires_at": self.expires_at,
        }

    def inspect(self, now: float) -> dict[str, Any]:
        """What the control endpoint shows: everything but a value."""
        return {
            "id": self.id,
            "project_id": self.project_id,
            "name": self.name,
            "owner_type": self.owner_type,
            "owner_id": self.owner_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "deleted_at": self.deleted_at,
            "last_used_at": self.last_used_at,
            "calls": self.calls,
            "state": self.state(now),
        }


@dataclass(frozen=True, slots=True)
class ModelCall:
    """A model call's answer and the usage it records."""

    response: dict[str, Any]
    request: VirtualRequest


# --------------------------------------------------------------------------------------
# Validation of request bodies


_JSON_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def _type_word(value: object) -> str:
    for word, types in _JSON_TYPES.items():
        if isinstance(value, bool) and word != "boolean":
            continue
        if isinstance(value, types):
            return word
    return "null" if value is None else type(value).__name__


def _check_fields(
    body: Mapping[str, Any],
    fields: Mapping[str, tuple[str, ...]],
    required: Iterable[str] = (),
) -> None:
    """Unknown fields, missing required ones and wrong JSON types are 400, in the words
    the real API uses ("Unrecognized request argument supplied: ...")."""
    for name in body:
        if name not in fields:
            raise _bad(f"Unrecognized request argument supplied: {str(name)[:64]}", str(name))
    for name in required:
        if name not in body:
            raise _bad(f"Missing required parameter: '{name}'.", name)
    for name, value in body.items():
        allowed = fields[name]
        if value is None and "null" in allowed:
            continue
        word = _type_word(value)
        if word not in allowed and not (word == "integer" and "number" in allowed):
            expected = " or ".join(t for t in allowed if t != "null")
            raise _bad(
                f"Invalid type for '{name}': expected {expected}, but got {word} instead.", name
            )


def _bounded(body: Mapping[str, Any], name: str, lo: float, hi: float) -> None:
    value = body.get(name)
    if value is not None and not lo <= value <= hi:
        raise _bad(f"Invalid '{name}': {value} is not between {lo:g} and {hi:g}.", name)


_SA_FIELDS: Final = {
    "name": ("string",),
    "create_service_account_only": ("boolean", "null"),
    "expires_in_seconds": ("integer", "null"),
}
_KEY_FIELDS: Final = {
    "name": ("string",),
    "scopes": ("array",),
    "expires_in_seconds": ("integer", "null"),
}
_METADATA: Final = ("object", "null")
_COMMON_MODEL_FIELDS: Final = {
    "model": ("string",),
    "metadata": _METADATA,
    "store": ("boolean", "null"),
    "stream": ("boolean", "null"),
    "temperature": ("number", "null"),
    "top_p": ("number", "null"),
    "user": ("string",),
    "safety_identifier": ("string", "null"),
    "prompt_cache_key": ("string", "null"),
    "service_tier": ("string", "null"),
}
_CHAT_FIELDS: Final = {
    **_COMMON_MODEL_FIELDS,
    "messages": ("array",),
    "max_completion_tokens": ("integer", "null"),
    "max_tokens": ("integer", "null"),
    "n": ("integer", "null"),
    "stream_options": ("object", "null"),
}
_RESPONSES_FIELDS: Final = {
    **_COMMON_MODEL_FIELDS,
    "input": ("string", "array"),
    "instructions": ("string", "null"),
    "max_output_tokens": ("integer", "null"),
    "previous_response_id": ("string", "null"),
}
_ROLES: Final = frozenset({"developer", "system", "user", "assistant", "tool", "function"})


def _expires_in(body: Mapping[str, Any], project: SimProject) -> int | None:
    """`expires_in_seconds` checked against its range and the project's lifetime policy."""
    value = body.get("expires_in_seconds")
    if value is not None and not 1 <= value <= MAX_EXPIRES_IN_SECONDS:
        raise _bad(
            f"Invalid 'expires_in_seconds': {value}; it must be between 1 and "
            f"{MAX_EXPIRES_IN_SECONDS}.",
            "expires_in_seconds",
        )
    cap = project.max_key_lifetime
    if cap is not None and (value is None or value > cap):
        raise _bad(
            f"A key lifetime policy applies to project {project.id}: 'expires_in_seconds' "
            f"must be provided and must not exceed {cap} seconds.",
            "expires_in_seconds",
        )
    return int(value) if value is not None else None


def _text_chars(content: object) -> int:
    """Characters of text in a message content or input item (strings and text parts)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(_text_chars(part) for part in content)
    if isinstance(content, Mapping):
        text = content.get("text")
        if isinstance(text, str):
            return len(text)
        return _text_chars(content.get("content"))
    return 0


def _tokens_for(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


# --------------------------------------------------------------------------------------
# The model


class AdminModel:
    """Projects, service accounts and keys of one simulated organisation. Mutable; every
    function that depends on time takes `now` (Unix seconds)."""

    def __init__(
        self,
        projects: Iterable[SimProject] = (),
        *,
        usage_only_keys: Iterable[str] = (),
        usage_delay: float = DEFAULT_USAGE_DELAY,
        key_auth_delay: float = 0.0,
        output_tokens: int = DEFAULT_OUTPUT_TOKENS,
    ) -> None:
        self.projects: dict[str, SimProject] = {p.id: p for p in projects}
        self.service_accounts: dict[str, SimServiceAccount] = {}
        self.keys: dict[str, SimKey] = {}  # creation order
        self._by_digest: dict[str, str] = {}
        #: Admin keys the usage endpoint accepts but the admin endpoints refuse (403).
        self.usage_only_keys: set[str] = set(usage_only_keys)
        self.usage_delay = usage_delay
        self.key_auth_delay = key_auth_delay
        self.output_tokens = output_tokens

    def __repr__(self) -> str:
        return (
            f"AdminModel(projects={len(self.projects)}, "
            f"service_accounts={len(self.service_accounts)}, keys={len(self.keys)})"
        )

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def from_json(obj: object) -> AdminModel:
        """An "admin" scenario section: `{"projects": [{"id", "name"?, "default"?,
        "archived"?, "max_key_lifetime"?, "refuse_sa_key_delete"?}], "api_keys": [{"id",
        "value", "project_id", "name"?}], "usage_only_keys": [...], "usage_delay": s,
        "key_auth_delay": s, "output_tokens": n}`, every key optional."""
        if obj is None:
            obj = {}
        if not isinstance(obj, Mapping):
            raise ScenarioError("'admin' must be an object")
        unknown = set(obj) - _ADMIN_FIELDS
        if unknown:
            raise ScenarioError(f"unknown admin fields: {sorted(unknown)}")
        raw_projects = obj.get("projects", list(DEFAULT_PROJECTS))
        if not isinstance(raw_projects, list):
            raise ScenarioError("'admin.projects' must be a list")
        model = AdminModel(
            (_project_from_json(p) for p in raw_projects),
            usage_only_keys=_strings(obj.get("usage_only_keys", []), "admin.usage_only_keys"),
            usage_delay=_seconds(obj, "usage_delay", DEFAULT_USAGE_DELAY),
            key_auth_delay=_seconds(obj, "key_auth_delay", 0.0),
            output_tokens=_count(obj, "output_tokens", DEFAULT_OUTPUT_TOKENS),
        )
        raw_keys = obj.get("api_keys", [])
        if not isinstance(raw_keys, list):
            raise ScenarioError("'admin.api_keys' must be a list")
        for raw in raw_keys:
            model.add_static_key(raw)
        return model

    def configure(self, obj: Mapping[str, Any]) -> None:
        """`POST /_sim/admin`: add or replace projects, add static keys, set the knobs."""
        unknown = set(obj) - _ADMIN_FIELDS
        if unknown:
            raise ScenarioError(f"unknown admin fields: {sorted(unknown)}")
        projects = obj.get("projects", [])
        if not isinstance(projects, list):
            raise ScenarioError("'projects' must be a list")
        parsed = [_project_from_json(p) for p in projects]
        keys = obj.get("api_keys", [])
        if not isinstance(keys, list):
            raise ScenarioError("'api_keys' must be a list")
        if "usage_only_keys" in obj:
            self.usage_only_keys = set(_strings(obj["usage_only_keys"], "usage_only_keys"))
        self.usage_delay = _seconds(obj, "usage_delay", self.usage_delay)
        self.key_auth_delay = _seconds(obj, "key_auth_delay", self.key_auth_delay)
        self.output_tokens = _count(obj, "output_tokens", self.output_tokens)
        for project in parsed:
            self.projects[project.id] = project
        for raw in keys:
            self.add_static_key(raw)

    def add_static_key(self, raw: object) -> SimKey:
        """A project key the scenario owns (e.g. a framework's shared key), by value."""
        if not isinstance(raw, Mapping) or set(raw) - _STATIC_KEY_FIELDS:
            raise ScenarioError(f"an api key must be {sorted(_STATIC_KEY_FIELDS)}, got {raw!r}")
        for name in ("id", "value", "project_id"):
            if not isinstance(raw.get(name), str) or not raw[name]:
                raise ScenarioError(f"api key {name!r} must be a non-empty string")
        key_id: str = raw["id"]
        value: str = raw["value"]
        project_id: str = raw["project_id"]
        if project_id not in self.projects:
            raise ScenarioError(f"api key {key_id}: unknown project {project_id}")
        if key_id in self.keys or digest(value) in self._by_digest:
            raise ScenarioError(f"api key {key_id}: id or value given twice")
        name = raw.get("name", key_id)
        created = raw.get("created_at", 1_700_000_000)
        if not isinstance(name, str) or isinstance(created, bool) or not isinstance(created, int):
            raise ScenarioError(f"api key {key_id}: 'name' must be a string, 'created_at' an int")
        key = SimKey(
            id=key_id,
            project_id=project_id,
            name=name,
            created_at=created,
            expires_at=None,
            owner_type="user",
            owner_id="user_simulator",
            owner_name="Simulator User",
            value_digest=digest(value),
            redacted_value=_redacted(value),
        )
        self._add_key(key)
        return key

    def config_json(self) -> dict[str, Any]:
        """The configuration part (projects and knobs) for `Scenario.to_json`; minted
        keys and static key values are not written back."""
        return {
            "projects": [p.config_json() for p in self.projects.values()],
            "usage_only_keys": sorted(self.usage_only_keys),
            "usage_delay": self.usage_delay,
            "key_auth_delay": self.key_auth_delay,
            "output_tokens": self.output_tokens,
        }

    def inspect(self, now: float) -> dict[str, Any]:
        """`GET /_sim/admin`: projects, service accounts and keys (ids and states only)."""
        return {
            "projects": [p.config_json() for p in self.projects.values()],
            "service_accounts": [
                {
                    "id": sa.id,
                    "project_id": sa.project_id,
                    "name": sa.name,
                    "role": sa.role,
                    "created_at": sa.created_at,
                }
                for sa in self.service_accounts.values()
            ],
            "keys": [k.inspect(now) for k in self.keys.values()],
            "usage_delay": self.usage_delay,
            "key_auth_delay": self.key_auth_delay,
        }

    # ------------------------------------------------------------------ auth

    def check_admin(self, authorization: str | None) -> ApiError | None:
        """After the usage endpoint's admin-key check: 403 for a usage-only admin key."""
        _, _, key = (authorization or "").partition(" ")
        if key.strip() in self.usage_only_keys:
            return ApiError(403, MANAGEMENT_MESSAGE)
        return None

    def model_key(self, authorization: str | None, now: float) -> SimKey | ApiError:
        """The live key whose value the `Authorization: Bearer` header carries, or 401."""
        scheme, _, value = (authorization or "").partition(" ")
        value = value.strip()
        if not authorization or scheme.lower() != "bearer" or not value:
            return ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        key_id = self._by_digest.get(digest(value))
        key = self.keys.get(key_id) if key_id is not None else None
        invalid = ApiError(
            401,
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )
        if key is None or key.state(now) == "deleted":
            return invalid
        if key.state(now) == "expired":
            return ApiError(401, "The API key provided has expired.", code="invalid_api_key")
        project = self.projects.get(key.project_id)
        if project is None or project.archived:
            return invalid
        if now < key.created_at + self.key_auth_delay:
            return invalid
        return key

    # ------------------------------------------------------------------ admin operations

    def _project(self, project_id: str) -> SimProject:
        project = self.projects.get(project_id)
        if project is None:
            raise _not_found(f"No such project: '{project_id[:64]}'.")
        return project

    def _open_project(self, project_id: str) -> SimProject:
        """The project, when it can take service accounts (not Default, not archived)."""
        project = self._project(project_id)
        if project.default:
            raise _bad(
                "The Default project cannot have service accounts: it inherits the "
                "organization's configuration. Create a project and use it instead."
            )
        if project.archived:
            raise _bad(f"Project {project.id} is archived.")
        return project

    def get_project(self, project_id: str) -> dict[str, Any]:
        return self._project(project_id).to_json()

    def create_service_account(
        self, project_id: str, body: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        project = self._project(project_id)
        _check_fields(body, _SA_FIELDS, required=("name",))
        if not body["name"].strip():
            raise _bad("Invalid 'name': must not be empty.", "name")
        only = bool(body.get("create_service_account_only"))
        if only and body.get("expires_in_seconds") is not None:
            raise _bad(
                "'expires_in_seconds' cannot be used when 'create_service_account_only' is true.",
                "expires_in_seconds",
            )
        project = self._open_project(project.id)
        expires_in = None if only else _expires_in(body, project)
        created = int(now)
        account = SimServiceAccount(
            id=f"svc_acct_{secrets.token_hex(8)}",
            project_id=project.id,
            name=body["name"],
            role="none" if only else "member",
            created_at=created,
        )
        self.service_accounts[account.id] = account
        answer: dict[str, Any] = {
            "object": "organization.project.service_account",
            "id": account.id,
            "name": account.name,
            "role": account.role,
            "created_at": created,
            "api_key": None,
        }
        if not only:
            answer["api_key"] = self._mint(account, "Secret Key", expires_in, (), now)
        return answer

    def create_key(
        self, project_id: str, account_id: str, body: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        project = self._project(project_id)
        account = self.service_accounts.get(account_id)
        if account is None or account.project_id != project.id:
            raise _not_found(f"No such service account: '{account_id[:64]}'.")
        _check_fields(body, _KEY_FIELDS)
        scopes = body.get("scopes", [])
        if not all(isinstance(s, str) for s in scopes):
            raise _bad("Invalid type for 'scopes': expected an array of strings.", "scopes")
        project = self._open_project(project.id)
        expires_in = _expires_in(body, project)
        return self._mint(account, body.get("name", "Secret Key"), expires_in, scopes, now)

    def _add_key(self, key: SimKey) -> None:
        self.keys[key.id] = key
        self._by_digest[key.value_digest] = key.id

    def _mint(
        self,
        account: SimServiceAccount,
        name: str,
        expires_in: int | None,
        scopes: Sequence[str],
        now: float,
    ) -> dict[str, Any]:
        """A new key of `account`: the create answer is the only place its value is."""
        value = f"sk-svcacct-{secrets.token_urlsafe(36)}"
        created = int(now)
        key = SimKey(
            id=f"key_{secrets.token_hex(8)}",
            project_id=account.project_id,
            name=name,
            created_at=created,
            expires_at=created + expires_in if expires_in is not None else None,
            owner_type="service_account",
            owner_id=account.id,
            owner_name=account.name,
            value_digest=digest(value),
            redacted_value=_redacted(value),
            scopes=tuple(scopes),
        )
        self._add_key(key)
        return {
            "object": "organization.project.service_account.api_key",
            "value": value,
            "name": key.name,
            "created_at": key.created_at,
            "id": key.id,
            "expires_at": key.expires_at,
        }

    def _key_json(self, key: SimKey) -> dict[str, Any]:
        account = self.service_accounts.get(key.owner_id)
        return key.to_json({"role": account.role} if account is not None else {})

    def list_keys(self, project_id: str, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        project = self._project(project_id)
        params: dict[str, str] = {}
        for name, value in pairs:
            if name in ("limit", "after", "owner_project_access"):
                if name in params:
                    raise _bad(f"'{name}' was given more than once.", name)
                params[name] = value
        raw_limit = params.get("limit", str(_LIST_DEFAULT))
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= _LIST_MAX:
            raise _bad(
                f"Invalid value for 'limit': {raw_limit[:32]!r}; it must be an integer between "
                f"1 and {_LIST_MAX}.",
                "limit",
            )
        access = params.get("owner_project_access")
        if access is not None and access not in ("active", "inactive", "any"):
            raise _bad(
                "Invalid value for 'owner_project_access': expected 'active', 'inactive' or 'any'.",
                "owner_project_access",
            )
        ordered = [k for k in self.keys.values() if k.project_id == project.id]
        start = 0
        if "after" in params:
            ids = [k.id for k in ordered]
            if params["after"] not in ids:
                raise _bad("Invalid value for 'after': no such object in this list.", "after")
            start = ids.index(params["after"]) + 1
        live = [k for k in ordered[start:] if k.deleted_at is None]
        if access == "inactive":
            live = []  # every owner of a simulated key has access to its project
        page = live[: int(raw_limit)]
        return {
            "object": "list",
            "data": [self._key_json(k) for k in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(live) > len(page),
        }

    def _live_key(self, project_id: str, key_id: str) -> SimKey:
        project = self._project(project_id)
        key = self.keys.get(key_id)
        if key is None or key.project_id != project.id or key.deleted_at is not None:
            raise _not_found(f"No such API key: '{key_id[:64]}'.")
        return key

    def get_key(self, project_id: str, key_id: str) -> dict[str, Any]:
        return self._key_json(self._live_key(project_id, key_id))

    def delete_key(self, project_id: str, key_id: str, now: float) -> dict[str, Any]:
        key = self._live_key(project_id, key_id)
        if (
            key.owner_type == "service_account"
            and self.projects[key.project_id].refuse_sa_key_delete
        ):
            raise _bad("This API key belongs to a service account and cannot be deleted here.")
        key.deleted_at = now
        return {"object": "organization.project.api_key.deleted", "id": key.id, "deleted": True}

    # ------------------------------------------------------------------ model calls

    def _record(
        self, key: SimKey, model: str, prompt: int, completion: int, now: float
    ) -> VirtualRequest:
        """The call as the provider records it: one request, no cached tokens."""
        usage = Usage(prompt, completion, 1, input_cached_tokens=0)
        key.calls += 1
        key.last_used_at = int(now)
        return VirtualRequest(
            time=now,
            api_key_id=key.id,
            project_id=key.project_id,
            model=model,
            revisions=(Revision(after=self.usage_delay, usage=usage),),
            registered_at=now,
        )

    def chat_completion(self, key: SimKey, body: Mapping[str, Any], now: float) -> ModelCall:
        _check_fields(body, _CHAT_FIELDS, required=("model", "messages"))
        _model_common(body)
        messages = body["messages"]
        if not messages:
            raise _bad("Invalid 'messages': empty array. Expected an array with minimum length 1.")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or message.get("role") not in _ROLES:
                raise _bad(f"Invalid value for 'messages[{i}].role'.", f"messages[{i}].role")
        _bounded(body, "n", 1, 128)
        n = body.get("n") or 1
        out = body.get("max_completion_tokens") or body.get("max_tokens") or self.output_tokens
        prompt = _tokens_for(sum(_text_chars(m.get("content")) for m in messages))
        completion = int(out) * int(n)
        created = int(now)
        answer = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": created,
            "model": body["model"],
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": "Simulated answer.",
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "length",
                }
                for i in range(int(n))
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
        }
        return ModelCall(answer, self._record(key, body["model"], prompt, completion, now))

    def response(self, key: SimKey, body: Mapping[str, Any], now: float) -> ModelCall:
        _check_fields(body, _RESPONSES_FIELDS, required=("model", "input"))
        _model_common(body)
        out_limit = body.get("max_output_tokens")
        if out_limit is not None and out_limit < 16:
            raise _bad(
                f"Invalid 'max_output_tokens': integer below minimum value. Expected a value "
                f">= 16, but got {out_limit} instead.",
                "max_output_tokens",
            )
        chars = _text_chars(body.get("instructions")) + _text_chars(body["input"])
        prompt = _tokens_for(chars)
        completion = int(out_limit or self.output_tokens)
        created = int(now)
        answer = {
            "id": f"resp_{secrets.token_hex(16)}",
            "object": "response",
            "created_at": created,
            "status": "completed",
            "completed_at": created,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": out_limit,
            "model": body["model"],
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{secrets.token_hex(16)}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [
                        {
                            "type": "output_text",
                            "text": "Simulated answer.",
                            "annotations": [],
                            "logprobs": [],
                        }
                    ],
                }
            ],
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "tool_choice": "auto",
            "tools": [],
            "metadata": body.get("metadata") or {},
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            },
        }
        return ModelCall(answer, self._record(key, body["model"], prompt, completion, now))


def _model_common(body: Mapping[str, Any]) -> None:
    if body.get("stream"):
        raise _bad("The simulator does not stream: send 'stream': false or leave it out.", "stream")
    if not body["model"]:
        raise _bad("Invalid 'model': must not be empty.", "model")
    _bounded(body, "temperature", 0, 2)
    _bounded(body, "top_p", 0, 1)
    metadata = body.get("metadata")
    if metadata is not None and (
        len(metadata) > 16 or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise _bad("Invalid 'metadata': at most 16 string values.", "metadata")
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if value is not None and value < 1:
            raise _bad(f"Invalid '{name}': must be a positive integer.", name)


# --------------------------------------------------------------------------------------
# Configuration helpers


def _strings(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ScenarioError(f"{name!r} must be a list of non-empty strings")
    return list(value)


def _seconds(obj: Mapping[str, Any], name: str, default: float) -> float:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        raise ScenarioError(f"'{name}' must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _count(obj: Mapping[str, Any], name: str, default: int) -> int:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ScenarioError(f"'{name}' must be an integer between 1 and 1000000, got {value!r}")
    return value


def _project_from_json(raw: object) -> SimProject:
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"a project must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _PROJECT_FIELDS
    if unknown:
        raise ScenarioError(f"unknown project fields: {sorted(unknown)}")
    project_id = raw.get("id")
    if not isinstance(project_id, str) or not project_id.startswith("proj_"):
        raise ScenarioError(f"a project 'id' must be a 'proj_...' string, got {project_id!r}")
    name = raw.get("name", project_id)
    if not isinstance(name, str):
        raise ScenarioError(f"project {project_id}: 'name' must be a string")
    flags = {}
    for flag in ("default", "archived", "refuse_sa_key_delete"):
        value = raw.get(flag, False)
        if not isinstance(value, bool):
            raise ScenarioError(f"project {project_id}: {flag!r} must be true or false")
        flags[flag] = value
    cap = raw.get("max_key_lifetime")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ScenarioError(f"project {project_id}: 'max_key_lifetime' must be seconds >= 1")
    created = raw.get("created_at", 1_700_000_000)
    if isinstance(created, bool) or not isinstance(created, int):
        raise ScenarioError(f"project {project_id}: 'created_at' must be an integer")
    return SimProject(
        id=project_id,
        name=name,
        created_at=created,
        default=flags["default"],
        archived=flags["archived"],
        max_key_lifetime=cap,
        refuse_sa_key_delete=flags["refuse_sa_key_delete"],
    )

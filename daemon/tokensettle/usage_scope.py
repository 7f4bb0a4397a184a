"""A run's own scope declaration: which usage is the run's, by key id and/or project.

A run declares its scope in `usage_scope.json` beside its `metrics.json`, or in a
`usage_scope` object inside `metrics.json`:

    {"provider": "openai",                      # optional: "openai" or "anthropic"
     "api_key_ids": ["key_..."],                # and/or
     "project_ids": ["proj_..."],
     "lease": {"key_id": "key_...", "project_id": "proj_...",   # optional, written by
               "created_at": "...Z", "expires_at": "...Z"}}     # `tokensettle lease`

For `"provider": "anthropic"` the ids are Anthropic's: keys `apikey_...`, and in
`project_ids` *workspace* ids `wrkspc_...` (both are containers of keys). Anthropic keys
cannot be minted, so its leases come from a pool of Console-made keys: the lease says so
with `"pool": true`, names its key in `api_key_ids`, and its `project_id` (the workspace)
is optional. An OpenAI lease is never a pool lease, an Anthropic lease always is.

A declared scope replaces the framework's scope for that run. Parsing is pure and strict:
an unknown key is refused with the closest valid name (a typo would otherwise widen the
scope silently), ids must look like the provider's ids, and a declaration must name at
least one key or project (an empty one would mean the whole organisation, never what a
run means).

`write_declaration` is the one I/O function: an atomic, exclusive create of the file.
"""

from __future__ import annotations

import difflib
import errno
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from tokensettle.atomic import publish
from tokensettle.usage import Scope

__all__ = [
    "ANTHROPIC_KEY_ID_PATTERN",
    "ID_KINDS",
    "KEY_ID_PATTERN",
    "MAX_SCOPE_BYTES",
    "METRICS_FIELD",
    "PROJECT_ID_PATTERN",
    "PROVIDERS",
    "SCOPE_FILE",
    "WORKSPACE_ID_PATTERN",
    "Declaration",
    "IdKinds",
    "LeaseDeclaration",
    "ScopeDeclarationError",
    "declaration_from_metrics",
    "lease_from_json",
    "load_declaration",
    "parse_declaration",
    "render_declaration",
    "write_declaration",
]

SCOPE_FILE: Final = "usage_scope.json"
#: The key of the same object inside metrics.json.
METRICS_FIELD: Final = "usage_scope"
#: A declaration is a few hundred bytes; a larger file is a mistake, not a scope.
MAX_SCOPE_BYTES: Final = 64 * 1024
DEFAULT_PROVIDER: Final = "openai"
#: Providers a declaration may name.
PROVIDERS: Final = ("openai", "anthropic")
KEY_ID_PATTERN: Final = re.compile(r"^key_[A-Za-z0-9_-]+$")
PROJECT_ID_PATTERN: Final = re.compile(r"^proj_[A-Za-z0-9_-]+$")
ANTHROPIC_KEY_ID_PATTERN: Final = re.compile(r"^apikey_[A-Za-z0-9_-]+$")
WORKSPACE_ID_PATTERN: Final = re.compile(r"^wrkspc_[A-Za-z0-9_-]+$")
_MAX_IDS: Final = 1000
_TOP_KEYS: Final = ("provider", "api_key_ids", "project_ids", "lease")
_LEASE_KEYS: Final = ("key_id", "project_id", "created_at", "expires_at", "pool")
_REQUIRED_LEASE_KEYS: Final = ("key_id", "created_at", "expires_at")


@dataclass(frozen=True, slots=True)
class IdKinds:
    """What a provider's ids look like: its keys, and its key containers (OpenAI
    projects, Anthropic workspaces; both are `project_ids` in a declaration)."""

    key: re.Pattern[str]
    container: re.Pattern[str]
    container_kind: str


ID_KINDS: Final[Mapping[str, IdKinds]] = {
    "openai": IdKinds(KEY_ID_PATTERN, PROJECT_ID_PATTERN, "project"),
    "anthropic": IdKinds(ANTHROPIC_KEY_ID_PATTERN, WORKSPACE_ID_PATTERN, "workspace"),
}


class ScopeDeclarationError(ValueError):
    """A declaration that cannot be used. `str()` is one line naming the source and field."""


@dataclass(frozen=True, slots=True)
class LeaseDeclaration:
    """The lease a declaration was written for (by `tokensettle lease`).

    A minted OpenAI key (`pool` False) is its lease: `key_id` names both. A pool key
    (Anthropic, `pool` True) serves many leases one after another, so a pool lease is
    `(key_id, created_at)`; its `project_id` is the key's workspace, when configured.
    """

    key_id: str
    project_id: str | None
    created_at: datetime
    expires_at: datetime
    pool: bool = False

    @property
    def identity(self) -> tuple[str, datetime]:
        """What tells two leases of one pool key apart (for a minted key: the key)."""
        return (self.key_id, self.created_at)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key_id": self.key_id}
        if self.project_id is not None or not self.pool:
            out["project_id"] = self.project_id
        out["created_at"] = _iso(self.created_at)
        out["expires_at"] = _iso(self.expires_at)
        if self.pool:
            out["pool"] = True
        return out


@dataclass(frozen=True, slots=True)
class Declaration:
    """A run's declared scope. Ids are kept sorted and unique."""

    api_key_ids: tuple[str, ...] = ()
    project_ids: tuple[str, ...] = ()
    provider: str = DEFAULT_PROVIDER
    lease: LeaseDeclaration | None = None
    #: Where it was read from (a path, or "PATH: usage_scope"); not part of the JSON.
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_key_ids", tuple(sorted(set(self.api_key_ids))))
        object.__setattr__(self, "project_ids", tuple(sorted(set(self.project_ids))))

    def scope(self) -> Scope:
        """The usage filter this declaration means (each named dimension must match)."""
        return Scope(frozenset(self.api_key_ids), frozenset(self.project_ids), self.provider)

    def to_json(self) -> dict[str, Any]:
        """The declaration as written to `usage_scope.json` (and into provenance)."""
        out: dict[str, Any] = {
            "provider": self.provider,
            "api_key_ids": list(self.api_key_ids),
            "project_ids": list(self.project_ids),
        }
        if self.lease is not None:
            out["lease"] = self.lease.to_json()
        return out

    @staticmethod
    def for_lease(
        key_id: str, project_id: str, created_at: datetime, expires_at: datetime
    ) -> Declaration:
        """What `tokensettle lease` declares: that key, in that project."""
        return Declaration(
            api_key_ids=(key_id,),
            project_ids=(project_id,),
            lease=LeaseDeclaration(key_id, project_id, created_at, expires_at),
        )

    @staticmethod
    def for_pool_lease(
        key_id: str, workspace_id: str | None, created_at: datetime, expires_at: datetime
    ) -> Declaration:
        """What `tokensettle lease --provider anthropic` declares: that pool key (in its
        workspace, when the pool configuration names one)."""
        return Declaration(
            api_key_ids=(key_id,),
            project_ids=(workspace_id,) if workspace_id else (),
            provider="anthropic",
            lease=LeaseDeclaration(key_id, workspace_id, created_at, expires_at, pool=True),
        )


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------- parsing


def _fail(source: str, where: str, problem: str) -> ScopeDeclarationError:
    prefix = f"{source}: " if source else ""
    return ScopeDeclarationError(f"{prefix}{where}: {problem}")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _refuse_unknown(
    obj: Mapping[str, Any], allowed: tuple[str, ...], source: str, where: str
) -> None:
    for key in obj:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(allowed)}"
        raise _fail(source, where, f"unknown key {str(key)[:64]!r}{hint}")


def _ids(
    obj: Mapping[str, Any],
    name: str,
    pattern: re.Pattern[str],
    kind: str,
    source: str,
    *,
    note: str = "",
) -> tuple[str, ...]:
    value = obj.get(name, [])
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(source, name, f"is {_type_name(value)}, expected a list of {kind} ids")
    if len(value) > _MAX_IDS:
        raise _fail(source, name, f"has {len(value)} ids; at most {_MAX_IDS}")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(source, f"{name}[{i}]", f"is {_type_name(item)}, expected a {kind} id")
        if not pattern.fullmatch(item):
            raise _fail(
                source,
                f"{name}[{i}]",
                f"{item[:64]!r} is not a {kind} id ({_prefix(pattern)}){note}",
            )
        out.append(item)
    return tuple(out)


def _prefix(pattern: re.Pattern[str]) -> str:
    return pattern.pattern[1:].split("[", 1)[0] + "..."


def _time(obj: Mapping[str, Any], name: str, source: str) -> datetime:
    where = f"lease.{name}"
    value = obj.get(name)
    if not isinstance(value, str):
        raise _fail(source, where, f"is {_type_name(value)}, expected an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(source, where, f"{value[:64]!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise _fail(source, where, f"{value[:64]!r} has no time zone (write 'Z' for UTC)")
    return parsed.astimezone(UTC)


def lease_from_json(value: object, *, source: str) -> LeaseDeclaration:
    """A `lease` object as `LeaseDeclaration.to_json` writes it (ScopeDeclarationError).
    It describes itself: `"pool": true` means Anthropic ids, otherwise OpenAI's."""
    if not isinstance(value, Mapping):
        raise _fail(source, "lease", f"is {_type_name(value)}, expected an object")
    _refuse_unknown(value, _LEASE_KEYS, source, "lease")
    pool = value.get("pool", False)
    if not isinstance(pool, bool):
        raise _fail(source, "lease.pool", f"is {_type_name(pool)}, expected true or false")
    kinds = ID_KINDS["anthropic" if pool else "openai"]
    for name in (*_REQUIRED_LEASE_KEYS, *(() if pool else ("project_id",))):
        if name not in value:
            raise _fail(source, "lease", f"lacks {name!r}")
    key_id, project_id = value["key_id"], value.get("project_id")
    for name, item, pattern, kind in (
        ("key_id", key_id, kinds.key, "key"),
        ("project_id", project_id, kinds.container, kinds.container_kind),
    ):
        if item is None and name == "project_id" and pool:
            continue  # a pool key without a configured workspace
        if not isinstance(item, str) or not pattern.fullmatch(item):
            shown = repr(item[:64]) if isinstance(item, str) else _type_name(item)
            raise _fail(source, f"lease.{name}", f"{shown} is not a {kind} id ({_prefix(pattern)})")
    created, expires = _time(value, "created_at", source), _time(value, "expires_at", source)
    if expires <= created:
        raise _fail(source, "lease.expires_at", "is not after lease.created_at")
    return LeaseDeclaration(key_id, project_id, created, expires, pool=pool)


def parse_declaration(obj: object, *, source: str) -> Declaration:
    """Check a decoded declaration and return it; `source` names it in every message.

    Raises ScopeDeclarationError (one line: "SOURCE: FIELD: problem") for an object that
    is not one, unknown keys (with the closest valid name), wrong types, ids that are not
    the provider's (`key_...`/`proj_...`, or `apikey_...`/`wrkspc_...` for Anthropic), an
    unknown provider, a declaration naming neither keys nor projects, a lease whose key or
    project the declaration does not name, and a lease of the wrong kind for the provider
    (Anthropic leases are pool leases and name their key in `api_key_ids`).
    """
    if not isinstance(obj, Mapping):
        raise _fail(source, "usage scope", f"is {_type_name(obj)}, expected a JSON object")
    _refuse_unknown(obj, _TOP_KEYS, source, "usage scope")
    provider = obj.get("provider", DEFAULT_PROVIDER)
    if not isinstance(provider, str):
        raise _fail(source, "provider", f"is {_type_name(provider)}, expected a string")
    if provider not in PROVIDERS:
        close = difflib.get_close_matches(provider, PROVIDERS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(PROVIDERS)}"
        raise _fail(source, "provider", f"unknown provider {provider[:64]!r}{hint}")
    kinds = ID_KINDS[provider]
    note = "" if provider == DEFAULT_PROVIDER else f" for provider {provider!r}"
    keys = _ids(obj, "api_key_ids", kinds.key, "key", source, note=note)
    container = kinds.container_kind
    projects = _ids(obj, "project_ids", kinds.container, container, source, note=note)
    lease = lease_from_json(obj["lease"], source=source) if obj.get("lease") is not None else None
    if not keys and not projects:
        raise _fail(
            source,
            "usage scope",
            "names no api_key_ids and no project_ids; declare at least one",
        )
    if lease is not None:
        _check_lease(lease, provider, keys, projects, source)
    return Declaration(
        api_key_ids=keys, project_ids=projects, provider=provider, lease=lease, source=source
    )


def _check_lease(
    lease: LeaseDeclaration,
    provider: str,
    keys: tuple[str, ...],
    projects: tuple[str, ...],
    source: str,
) -> None:
    if lease.pool and provider != "anthropic":
        raise _fail(
            source, "lease.pool", f"a pool lease needs provider 'anthropic', not {provider!r}"
        )
    if not lease.pool and provider == "anthropic":
        raise _fail(
            source,
            "lease",
            "an Anthropic lease is a pool lease (Anthropic keys cannot be minted); "
            'add "pool": true',
        )
    if lease.pool and not keys:
        # Without its key, the scope would be the whole workspace: every pool key in it.
        raise _fail(source, "api_key_ids", f"must name the pool lease's key {lease.key_id}")
    if keys and lease.key_id not in keys:
        raise _fail(source, "lease.key_id", f"{lease.key_id} is not in api_key_ids")
    if projects and lease.project_id is not None and lease.project_id not in projects:
        raise _fail(source, "lease.project_id", f"{lease.project_id} is not in project_ids")


def load_declaration(raw: bytes, *, source: str) -> Declaration:
    """`parse_declaration` of the bytes of a `usage_scope.json` (JSON errors in one line)."""
    if len(raw) > MAX_SCOPE_BYTES:
        raise _fail(source, "file", f"is {len(raw):,} bytes; a declaration is at most 64 KiB")
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = getattr(exc, "pos", getattr(exc, "start", -1))
        raise _fail(source, "file", f"is not JSON ({type(exc).__name__} at byte {where})") from None
    except (RecursionError, ValueError):
        raise _fail(source, "file", "is JSON too deep or too long to read") from None
    return parse_declaration(obj, source=source)


def declaration_from_metrics(doc: Mapping[str, Any], *, source: str) -> Declaration | None:
    """The `usage_scope` object of a decoded metrics.json, or None when it has none."""
    if doc.get(METRICS_FIELD) is None:
        return None
    return parse_declaration(doc[METRICS_FIELD], source=f"{source}: {METRICS_FIELD}")


def render_declaration(decl: Declaration) -> bytes:
    """The bytes of `usage_scope.json`: `json.dumps(indent=2)` and a newline."""
    return (json.dumps(decl.to_json(), indent=2) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------- writing


def write_declaration(run_dir: Path, decl: Declaration, *, replace: bool = False) -> Path:
    """Write `run_dir/usage_scope.json` atomically (creating `run_dir` if missing).

    Without `replace`, an existing declaration is never overwritten: FileExistsError, so
    a second lease cannot silently take over a run directory that already names a key.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SCOPE_FILE
    if path.is_symlink():
        raise FileExistsError(errno.EEXIST, "is a symlink; not written", str(path))
    publish(path, render_declaration(decl), replace=replace)
    return path

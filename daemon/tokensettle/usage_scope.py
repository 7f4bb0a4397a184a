"""A run's own scope declaration: which usage is the run's, by key id and/or project.

A run declares its scope in `usage_scope.json` beside its `metrics.json`, or in a
`usage_scope` object inside `metrics.json`:

    {"provider": "openai",                      # optional; "anthropic" is reserved
     "api_key_ids": ["key_..."],                # and/or
     "project_ids": ["proj_..."],
     "lease": {"key_id": "key_...", "project_id": "proj_...",   # optional, written by
               "created_at": "...Z", "expires_at": "...Z"}}     # `tokensettle lease`

A declared scope replaces the framework's scope for that run. Parsing is pure and strict:
an unknown key is refused with the closest valid name (a typo would otherwise widen the
scope silently), ids must look like ids, and a declaration must name at least one key or
project (an empty one would mean the whole organisation, never what a run means).

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
    "KEY_ID_PATTERN",
    "MAX_SCOPE_BYTES",
    "METRICS_FIELD",
    "PROJECT_ID_PATTERN",
    "PROVIDERS",
    "SCOPE_FILE",
    "Declaration",
    "LeaseDeclaration",
    "ScopeDeclarationError",
    "declaration_from_metrics",
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
#: Providers a declaration may name; only "openai" is settled today ("anthropic" is
#: reserved for the key-pool route of admin-api-notes.md section 7).
PROVIDERS: Final = ("openai", "anthropic")
SUPPORTED_PROVIDERS: Final = frozenset({"openai"})
KEY_ID_PATTERN: Final = re.compile(r"^key_[A-Za-z0-9_-]+$")
PROJECT_ID_PATTERN: Final = re.compile(r"^proj_[A-Za-z0-9_-]+$")
_MAX_IDS: Final = 1000
_TOP_KEYS: Final = ("provider", "api_key_ids", "project_ids", "lease")
_LEASE_KEYS: Final = ("key_id", "project_id", "created_at", "expires_at")


class ScopeDeclarationError(ValueError):
    """A declaration that cannot be used. `str()` is one line naming the source and field."""


@dataclass(frozen=True, slots=True)
class LeaseDeclaration:
    """The lease a declaration was written for (by `tokensettle lease`)."""

    key_id: str
    project_id: str
    created_at: datetime
    expires_at: datetime

    def to_json(self) -> dict[str, str]:
        return {
            "key_id": self.key_id,
            "project_id": self.project_id,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
        }


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
    obj: Mapping[str, Any], name: str, pattern: re.Pattern[str], kind: str, source: str
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
            prefix = pattern.pattern[1:].split("[", 1)[0]
            raise _fail(source, f"{name}[{i}]", f"{item[:64]!r} is not a {kind} id ({prefix}...)")
        out.append(item)
    return tuple(out)


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
    """A `lease` object as `LeaseDeclaration.to_json` writes it (ScopeDeclarationError)."""
    if not isinstance(value, Mapping):
        raise _fail(source, "lease", f"is {_type_name(value)}, expected an object")
    _refuse_unknown(value, _LEASE_KEYS, source, "lease")
    for name in _LEASE_KEYS:
        if name not in value:
            raise _fail(source, "lease", f"lacks {name!r}")
    key_id, project_id = value["key_id"], value["project_id"]
    for name, pattern, kind in (
        ("key_id", KEY_ID_PATTERN, "key"),
        ("project_id", PROJECT_ID_PATTERN, "project"),
    ):
        item = value[name]
        if not isinstance(item, str) or not pattern.fullmatch(item):
            shown = repr(item[:64]) if isinstance(item, str) else _type_name(item)
            raise _fail(source, f"lease.{name}", f"{shown} is not a {kind} id")
    created, expires = _time(value, "created_at", source), _time(value, "expires_at", source)
    if expires <= created:
        raise _fail(source, "lease.expires_at", "is not after lease.created_at")
    return LeaseDeclaration(key_id, project_id, created, expires)


def parse_declaration(obj: object, *, source: str) -> Declaration:
    """Check a decoded declaration and return it; `source` names it in every message.

    Raises ScopeDeclarationError (one line: "SOURCE: FIELD: problem") for an object that
    is not one, unknown keys (with the closest valid name), wrong types, ids that are not
    `key_...`/`proj_...`, an unsupported provider, a declaration naming neither keys nor
    projects, and a lease whose key or project the declaration does not name.
    """
    if not isinstance(obj, Mapping):
        raise _fail(source, "usage scope", f"is {_type_name(obj)}, expected a JSON object")
    _refuse_unknown(obj, _TOP_KEYS, source, "usage scope")
    provider = obj.get("provider", DEFAULT_PROVIDER)
    if not isinstance(provider, str):
        raise _fail(source, "provider", f"is {_type_name(provider)}, expected a string")
    if provider not in PROVIDERS:
        close = difflib.get_close_matches(provider, PROVIDERS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _fail(source, "provider", f"unknown provider {provider[:64]!r}{hint}")
    if provider not in SUPPORTED_PROVIDERS:
        raise _fail(source, "provider", f"{provider!r} is reserved and not supported yet")
    keys = _ids(obj, "api_key_ids", KEY_ID_PATTERN, "key", source)
    projects = _ids(obj, "project_ids", PROJECT_ID_PATTERN, "project", source)
    lease = lease_from_json(obj["lease"], source=source) if obj.get("lease") is not None else None
    if not keys and not projects:
        raise _fail(
            source,
            "usage scope",
            "names no api_key_ids and no project_ids; declare at least one",
        )
    if lease is not None:
        if keys and lease.key_id not in keys:
            raise _fail(source, "lease.key_id", f"{lease.key_id} is not in api_key_ids")
        if projects and lease.project_id not in projects:
            raise _fail(source, "lease.project_id", f"{lease.project_id} is not in project_ids")
    return Declaration(
        api_key_ids=keys, project_ids=projects, provider=provider, lease=lease, source=source
    )


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

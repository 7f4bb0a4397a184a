"""Token counts as the Usage API reports them, and the rows that carry them.

`Usage` is an exact, additive bag of integer counters. The three fields the API always
sends are plain ints; every other field is optional (`None` = the data did not carry it),
because the field set has changed over time and old buckets lack the breakdown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

REQUIRED_FIELDS: tuple[str, ...] = ("input_tokens", "output_tokens", "num_model_requests")
OPTIONAL_FIELDS: tuple[str, ...] = (
    "input_cached_tokens",
    "input_cache_write_tokens",
    "input_uncached_tokens",
    "input_text_tokens",
    "output_text_tokens",
    "input_cached_text_tokens",
    "input_audio_tokens",
    "input_cached_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "input_cached_image_tokens",
    "output_image_tokens",
)
ALL_FIELDS: tuple[str, ...] = REQUIRED_FIELDS + OPTIONAL_FIELDS
DIMENSIONS: tuple[str, ...] = ("api_key_id", "project_id", "model")


def _add_optional(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


@dataclass(frozen=True, slots=True)
class Usage:
    """Counters for some set of model requests. Addition is exact and associative."""

    input_tokens: int = 0
    output_tokens: int = 0
    num_model_requests: int = 0
    input_cached_tokens: int | None = None
    input_cache_write_tokens: int | None = None
    input_uncached_tokens: int | None = None
    input_text_tokens: int | None = None
    output_text_tokens: int | None = None
    input_cached_text_tokens: int | None = None
    input_audio_tokens: int | None = None
    input_cached_audio_tokens: int | None = None
    output_audio_tokens: int | None = None
    input_image_tokens: int | None = None
    input_cached_image_tokens: int | None = None
    output_image_tokens: int | None = None

    def __add__(self, other: Usage) -> Usage:
        values: dict[str, int | None] = {}
        for name in REQUIRED_FIELDS:
            values[name] = getattr(self, name) + getattr(other, name)
        for name in OPTIONAL_FIELDS:
            values[name] = _add_optional(getattr(self, name), getattr(other, name))
        return Usage(**values)  # type: ignore[arg-type]

    @property
    def cached_tokens(self) -> int:
        """Cached input tokens; 0 where the data does not carry the field."""
        return self.input_cached_tokens or 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def is_empty(self) -> bool:
        return self.input_tokens == 0 and self.output_tokens == 0 and self.num_model_requests == 0

    def present(self) -> dict[str, int]:
        """The fields this usage carries (required ones always), for JSON output."""
        out: dict[str, int] = {}
        for name in ALL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def replace(self, **changes: int | None) -> Usage:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @staticmethod
    def from_fields(values: Mapping[str, int | None]) -> Usage:
        return Usage(**{k: v for k, v in values.items() if k in ALL_FIELDS})  # type: ignore[arg-type]

    @staticmethod
    def total(items: Iterable[Usage]) -> Usage:
        acc = Usage()
        for item in items:
            acc = acc + item
        return acc


class UsageRowError(ValueError):
    """A result object in a Usage API response does not have the documented shape."""


def _int_field(result: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = result.get(name)
    if value is None:
        if required:
            raise UsageRowError(f"result lacks required field {name!r}")
        return None
    # bool is an int subclass in Python; the API never sends booleans for counters.
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageRowError(f"field {name!r} is {type(value).__name__}, expected integer")
    if value < 0:
        raise UsageRowError(f"field {name!r} is negative ({value})")
    return value


def usage_from_result(result: Mapping[str, Any]) -> Usage:
    """Parse one `organization.usage.completions.result` object (unknown keys ignored)."""
    values: dict[str, int | None] = {}
    for name in REQUIRED_FIELDS:
        values[name] = _int_field(result, name, required=True)
    for name in OPTIONAL_FIELDS:
        values[name] = _int_field(result, name, required=False)
    return Usage(**values)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One result of one one-minute bucket: usage of one (key, project, model) in a minute.

    `minute` is the bucket's minute slot start (Unix seconds, a multiple of 60).
    """

    minute: int
    usage: Usage
    api_key_id: str | None = None
    project_id: str | None = None
    model: str | None = None

    def dims(self) -> tuple[str | None, str | None, str | None]:
        return (self.api_key_id, self.project_id, self.model)


@dataclass(frozen=True, slots=True)
class Scope:
    """Which usage belongs to a framework. Each configured dimension must match (AND);
    an empty scope is the whole organisation."""

    api_key_ids: frozenset[str] = field(default_factory=frozenset)
    project_ids: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_organisation(self) -> bool:
        return not self.api_key_ids and not self.project_ids

    def matches(self, row: UsageRow) -> bool:
        if self.api_key_ids and row.api_key_id not in self.api_key_ids:
            return False
        return not (self.project_ids and row.project_id not in self.project_ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "api_key_ids": sorted(self.api_key_ids),
            "project_ids": sorted(self.project_ids),
            "organisation_wide": self.is_organisation,
        }

"""The token breakdown of a run: what the usage data says about cache and modality, per model.

Pure. Only fields the data carries are reported: an optional Usage API field that no bucket
carried is *absent* (and listed in `not_carried`), never 0, because old buckets lack the
breakdown and a 0 would claim "nothing cached" where the truth is "not reported". The same
holds for the request count of a provider that does not report one (Anthropic): `requests`
is then absent and listed in `not_carried`, never 0.

Names in the block map 1:1 to the fields of the normalised `usage.Usage` (OpenAI's names,
current spec, see shared/reference/usage-api-notes.md section 2.3; Anthropic's usage maps
onto them, `usage` module docstring; the 5m/1h cache writes and web searches are only
Anthropic's):

=====================  ============================  =====================================
block                  Usage API field               meaning
=====================  ============================  =====================================
input.total            input_tokens                  all input, incl. cached + cache-write
input.cached           input_cached_tokens           read from the cache
input.cache_write      input_cache_write_tokens      written to the cache
input.cache_write_30m  input_cache_write_30m_tokens  of those, kept 30 minutes
input.cache_write_12h  input_cache_write_12h_tokens  of those, kept 12 hours
input.cache_write_5m   input_cache_write_5m_tokens   of those, kept 5 minutes (Anthropic)
input.cache_write_1h   input_cache_write_1h_tokens   of those, kept 1 hour (Anthropic)
input.uncached         input_uncached_tokens         neither read from nor written to it
input.uncached_text    input_text_tokens             uncached text input
input.uncached_audio   input_audio_tokens            uncached audio input
input.uncached_image   input_image_tokens            uncached image input
input.cached_text      input_cached_text_tokens      cached text input
input.cached_audio     input_cached_audio_tokens     cached audio input
input.cached_image     input_cached_image_tokens     cached image input
output.total           output_tokens                 all output
output.text            output_text_tokens            text output
output.audio           output_audio_tokens           audio output
output.image           output_image_tokens           image output
tools.web_search_      web_search_requests           web searches of the server tool
requests                                             (a count of searches, not tokens)
requests               num_model_requests            model requests (absent when the
                                                     provider does not count them)
=====================  ============================  =====================================

Validation: a part larger than its whole (e.g. cached > input), or carried parts that add up to
more than the whole, is a data *problem* with a clear message; nothing is clamped, and no
cached share is computed from data with a problem. Carried parts that add up to *less* than
the whole are only a *note*: summing buckets where some lack a field (usage.Usage treats an
absent field as "not carried", not 0) produces exactly that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokensettle.attribution import Share
from tokensettle.usage import ALL_FIELDS, Usage, provider_fields

#: block group -> (block name, Usage API field), in output order.
LAYOUT: dict[str, tuple[tuple[str, str], ...]] = {
    "input": (
        ("total", "input_tokens"),
        ("cached", "input_cached_tokens"),
        ("cache_write", "input_cache_write_tokens"),
        ("cache_write_30m", "input_cache_write_30m_tokens"),
        ("cache_write_12h", "input_cache_write_12h_tokens"),
        ("cache_write_5m", "input_cache_write_5m_tokens"),
        ("cache_write_1h", "input_cache_write_1h_tokens"),
        ("uncached", "input_uncached_tokens"),
        ("uncached_text", "input_text_tokens"),
        ("uncached_audio", "input_audio_tokens"),
        ("uncached_image", "input_image_tokens"),
        ("cached_text", "input_cached_text_tokens"),
        ("cached_audio", "input_cached_audio_tokens"),
        ("cached_image", "input_cached_image_tokens"),
    ),
    "output": (
        ("total", "output_tokens"),
        ("text", "output_text_tokens"),
        ("audio", "output_audio_tokens"),
        ("image", "output_image_tokens"),
    ),
    "tools": (("web_search_requests", "web_search_requests"),),
}
REQUESTS_BLOCK = "requests"
#: Groups shown even when empty; `tools` only where a provider reports server tools.
_ALWAYS_SHOWN = frozenset({"input", "output"})
BLOCK_NAME: dict[str, str] = {
    api: f"{group}.{name}" for group, pairs in LAYOUT.items() for name, api in pairs
} | {"num_model_requests": REQUESTS_BLOCK}

#: whole -> parts that add up to it, when every part is carried (usage-api-notes 2.3).
IDENTITIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_tokens", ("input_cached_tokens", "input_cache_write_tokens", "input_uncached_tokens")),
    ("input_uncached_tokens", ("input_text_tokens", "input_audio_tokens", "input_image_tokens")),
    (
        "input_cached_tokens",
        ("input_cached_text_tokens", "input_cached_audio_tokens", "input_cached_image_tokens"),
    ),
    ("output_tokens", ("output_text_tokens", "output_audio_tokens", "output_image_tokens")),
    ("input_cache_write_tokens", ("input_cache_write_30m_tokens", "input_cache_write_12h_tokens")),
    ("input_cache_write_tokens", ("input_cache_write_5m_tokens", "input_cache_write_1h_tokens")),
)

NO_MODEL = "(no model)"


def usage_problems(usage: Usage) -> list[str]:
    """Data problems: negative counters, a part above its whole, carried parts above it."""
    problems: list[str] = []
    for name in ALL_FIELDS:
        value = getattr(usage, name)
        if value is not None and value < 0:
            problems.append(f"{name} is negative ({value})")
    for whole, parts in IDENTITIES:
        total = getattr(usage, whole)
        if total is None:
            continue
        carried = [(p, getattr(usage, p)) for p in parts if getattr(usage, p) is not None]
        over = [(p, v) for p, v in carried if v > total]
        for part, value in over:
            problems.append(
                f"{part} ({value:,}) exceeds {whole} ({total:,}): "
                "the provider's data is inconsistent; not clamped"
            )
        if not over and len(carried) > 1 and sum(v for _, v in carried) > total:
            listed = " + ".join(f"{p} ({v:,})" for p, v in carried)
            problems.append(
                f"{listed} = {sum(v for _, v in carried):,} exceeds {whole} ({total:,})"
            )
    return problems


def usage_notes(usage: Usage) -> list[str]:
    """Breakdowns that are carried in full but add up to less than their whole."""
    notes: list[str] = []
    for whole, parts in IDENTITIES:
        total = getattr(usage, whole)
        values = [getattr(usage, p) for p in parts]
        if total is None or any(v is None for v in values):
            continue
        found = sum(v for v in values if v is not None)
        if found < total:
            notes.append(
                f"{' + '.join(parts)} = {found:,} is less than {whole} ({total:,}): "
                "some buckets may not carry the breakdown"
            )
    return notes


def cached_tokens_value(usage: Usage) -> int | None:
    """What `aggregate_metrics.CACHED_TOKENS` should hold: the cached input tokens, or None
    when the data does not carry them (then leave the field as it is) or they are invalid."""
    cached = usage.input_cached_tokens
    if cached is None or cached < 0 or cached > usage.input_tokens:
        return None
    return cached


def cached_share(usage: Usage) -> float | None:
    """Cached input / input, or None when not carried, input is 0, or the data is invalid."""
    cached = cached_tokens_value(usage)
    if cached is None or usage.input_tokens <= 0:
        return None
    return cached / usage.input_tokens


def counts_json(usage: Usage) -> dict[str, Any]:
    """One usage in the block's layout; absent optional fields are left out, and so are
    `requests` when the data does not count them."""
    out: dict[str, Any] = {}
    for group, pairs in LAYOUT.items():
        values = {name: getattr(usage, api) for name, api in pairs}
        carried = {k: v for k, v in values.items() if v is not None}
        if carried or group in _ALWAYS_SHOWN:
            out[group] = carried
    if usage.requests_counted:
        out[REQUESTS_BLOCK] = usage.num_model_requests
    share = cached_share(usage) if not usage_problems(usage) else None
    if share is not None:
        out["cached_share"] = round(share, 6)
    return out


def not_carried(usage: Usage, provider: str = "openai") -> list[str]:
    """Block names of the optional fields `provider` reports that this usage does not
    carry (and `requests` when it does not count them)."""
    fields = provider_fields(provider)
    absent = [BLOCK_NAME[name] for name in fields if getattr(usage, name) is None]
    return absent if usage.requests_counted else [*absent, REQUESTS_BLOCK]


def _difference(total: Usage, part: Usage) -> Usage:
    """total - part, field by field; an optional field absent from `total` stays absent."""
    values: dict[str, int | None] = {}
    for name in ALL_FIELDS:
        whole, piece = getattr(total, name), getattr(part, name)
        values[name] = None if whole is None else whole - (piece or 0)
    counted = total.requests_counted and part.requests_counted
    return Usage.from_fields(values).replace(requests_counted=counted)


# ------------------------------------------------------------------ models

_DATED = re.compile(r"^(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|20\d{6}|(?:0[1-9]|1[0-2])\d{2})$")


def _normal(name: str) -> str:
    name = name.strip().lower()
    return name.removeprefix("openai/")


def base_model(name: str) -> str | None:
    """The alias of a dated snapshot ("gpt-4o-mini-2024-07-18" -> "gpt-4o-mini"; also
    "-20240718" and the old "-0613" style), or None when the name carries no date."""
    match = _DATED.match(name.strip())
    return match.group("base") if match else None


def same_model(configured: str, seen: str) -> bool:
    """Whether usage of snapshot `seen` is what a run configured with `configured` asked for:
    equal names, or `seen` is a dated snapshot of the alias `configured`."""
    want, got = _normal(configured), _normal(seen)
    if want == got:
        return True
    base = base_model(got)
    return base is not None and base == want


def model_mismatch(configured: str | None, seen: Iterable[str]) -> str | None:
    """A warning when usage shows a model that is not the run's configured one, else None.

    An alias matching its own dated snapshot is not a mismatch ("gpt-4o-mini" vs
    "gpt-4o-mini-2024-07-18"); a different model that shares a prefix is
    ("gpt-4o" vs "gpt-4o-mini-2024-07-18"). No configured model: nothing to compare.
    """
    if configured is None or not configured.strip():
        return None
    others = sorted({s for s in seen if s and not same_model(configured, s)})
    if not others:
        return None
    listed = ", ".join(repr(s) for s in others)
    noun, verb = ("model", "differs") if len(others) == 1 else ("models", "differ")
    return f"usage shows {noun} {listed} that {verb} from the run's configured model {configured!r}"


# ------------------------------------------------------------------ the block


@dataclass(frozen=True)
class TokenBreakdown:
    total: Usage
    models: Mapping[str, Usage] = field(default_factory=dict)
    #: usage of rows that named no model (only when models were reported at all)
    without_model: Usage | None = None
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    model_warning: str | None = None
    #: whose usage this is: decides which absent fields `not_carried` lists
    provider: str = "openai"

    @property
    def cached_tokens(self) -> int | None:
        return cached_tokens_value(self.total)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The `token_breakdown` block (see the module docstring for the names)."""
        out: dict[str, Any] = {"total": counts_json(self.total)}
        out["models"] = {m: counts_json(u) for m, u in sorted(self.models.items())}
        if self.without_model is not None:
            out["without_model"] = counts_json(self.without_model)
        out["not_carried"] = not_carried(self.total, self.provider)
        out["problems"] = list(self.problems)
        out["notes"] = list(self.notes)
        out["model_warning"] = self.model_warning
        return out


def build_breakdown(
    total: Usage,
    models: Mapping[str, Usage],
    *,
    configured_model: str | None = None,
    provider: str = "openai",
) -> TokenBreakdown:
    """The breakdown of a run's usage `total` and its per-model usages (snapshot names),
    from `provider`'s usage data."""
    problems = [f"total: {p}" for p in usage_problems(total)]
    notes = [f"total: {n}" for n in usage_notes(total)]
    for name, usage in sorted(models.items()):
        problems += [f"{name}: {p}" for p in usage_problems(usage)]
        notes += [f"{name}: {n}" for n in usage_notes(usage)]
    without: Usage | None = None
    if models:
        rest = _difference(total, Usage.total(models.values()))
        if rest.input_tokens < 0 or rest.output_tokens < 0 or rest.num_model_requests < 0:
            problems.append("per-model usage adds up to more than the run's total")
        elif not rest.is_empty:
            without = rest
            notes.append(
                f"{rest.input_tokens:,} input / {rest.output_tokens:,} output tokens carry no model"
            )
    return TokenBreakdown(
        total=total,
        models=dict(models),
        without_model=without,
        problems=tuple(problems),
        notes=tuple(notes),
        model_warning=model_mismatch(configured_model, models.keys()),
        provider=provider,
    )


def breakdown_of_share(
    share: Share, *, configured_model: str | None = None, provider: str = "openai"
) -> TokenBreakdown:
    """The breakdown of what attribution gave one run of `provider`'s scope."""
    return build_breakdown(
        share.usage, share.models, configured_model=configured_model, provider=provider
    )

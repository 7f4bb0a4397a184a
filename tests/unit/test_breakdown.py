"""Token breakdown: only carried fields, data problems named, model mismatch warnings."""

from __future__ import annotations

import json
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.attribution import Share
from tokensettle.breakdown import (
    LAYOUT,
    base_model,
    breakdown_of_share,
    build_breakdown,
    cached_share,
    cached_tokens_value,
    counts_json,
    model_mismatch,
    not_carried,
    same_model,
    usage_notes,
    usage_problems,
)
from tokensettle.usage import ALL_OPTIONAL_FIELDS, OPENAI_OPTIONAL_FIELDS, Usage

SNAPSHOT = "gpt-4o-mini-2024-07-18"
OLD_STYLE = Usage(
    input_tokens=20_150, output_tokens=5_335, num_model_requests=12, input_cached_tokens=9_728
)


def test_every_usage_field_has_one_place_in_the_block() -> None:
    placed = [api for pairs in LAYOUT.values() for _, api in pairs] + ["num_model_requests"]
    assert sorted(placed) == sorted(
        {*ALL_OPTIONAL_FIELDS, "input_tokens", "output_tokens", "num_model_requests"}
    )
    assert len(placed) == len(set(placed))


def test_old_buckets_report_only_what_they_carry() -> None:
    counts = counts_json(OLD_STYLE)
    assert counts == {
        "input": {"total": 20_150, "cached": 9_728},
        "output": {"total": 5_335},
        "requests": 12,
        "cached_share": round(9_728 / 20_150, 6),
    }
    absent = not_carried(OLD_STYLE)
    assert "input.cache_write" in absent
    assert "input.uncached" in absent
    assert "output.audio" in absent
    assert "input.cached" not in absent
    assert len(absent) == len(OPENAI_OPTIONAL_FIELDS) - 1


def test_no_cache_field_means_no_cached_share_and_no_cached_tokens_value() -> None:
    usage = Usage(input_tokens=100, output_tokens=1, num_model_requests=1)
    assert cached_tokens_value(usage) is None
    assert cached_share(usage) is None
    assert "cached_share" not in counts_json(usage)
    assert "cached" not in counts_json(usage)["input"]


def test_cached_zero_is_carried_zero() -> None:
    usage = Usage(input_tokens=100, output_tokens=1, num_model_requests=1, input_cached_tokens=0)
    assert cached_tokens_value(usage) == 0
    assert counts_json(usage)["input"]["cached"] == 0
    assert counts_json(usage)["cached_share"] == 0.0


def test_full_new_style_breakdown() -> None:
    usage = Usage(
        input_tokens=1_000,
        output_tokens=300,
        num_model_requests=4,
        input_cached_tokens=400,
        input_cache_write_tokens=100,
        input_cache_write_30m_tokens=60,
        input_cache_write_12h_tokens=40,
        input_uncached_tokens=500,
        input_text_tokens=450,
        input_audio_tokens=30,
        input_image_tokens=20,
        input_cached_text_tokens=390,
        input_cached_audio_tokens=10,
        input_cached_image_tokens=0,
        output_text_tokens=280,
        output_audio_tokens=20,
        output_image_tokens=0,
    )
    assert usage_problems(usage) == []
    assert usage_notes(usage) == []
    assert not_carried(usage) == []
    counts = counts_json(usage)
    assert counts["input"] == {
        "total": 1_000,
        "cached": 400,
        "cache_write": 100,
        "cache_write_30m": 60,
        "cache_write_12h": 40,
        "uncached": 500,
        "uncached_text": 450,
        "uncached_audio": 30,
        "uncached_image": 20,
        "cached_text": 390,
        "cached_audio": 10,
        "cached_image": 0,
    }
    assert counts["output"] == {"total": 300, "text": 280, "audio": 20, "image": 0}


def test_cached_above_input_is_a_clear_problem_and_never_clamped() -> None:
    bad = Usage(input_tokens=100, output_tokens=0, num_model_requests=1, input_cached_tokens=140)
    problems = usage_problems(bad)
    assert problems == [
        "input_cached_tokens (140) exceeds input_tokens (100): "
        "the provider's data is inconsistent; not clamped"
    ]
    assert cached_tokens_value(bad) is None
    counts = counts_json(bad)
    assert counts["input"]["cached"] == 140  # reported as the data says
    assert "cached_share" not in counts
    block = build_breakdown(bad, {SNAPSHOT: bad}).to_json()
    assert any(p.startswith("total: input_cached_tokens (140) exceeds") for p in block["problems"])
    assert any(p.startswith(f"{SNAPSHOT}: input_cached_tokens (140)") for p in block["problems"])


def test_parts_adding_up_to_more_than_the_whole_is_a_problem() -> None:
    bad = Usage(
        input_tokens=100,
        output_tokens=0,
        num_model_requests=1,
        input_cached_tokens=60,
        input_uncached_tokens=60,
    )
    (problem,) = usage_problems(bad)
    assert "= 120 exceeds input_tokens (100)" in problem


def test_parts_adding_up_to_less_is_only_a_note() -> None:
    partial = Usage(
        input_tokens=100,
        output_tokens=10,
        num_model_requests=1,
        output_text_tokens=4,
        output_audio_tokens=2,
        output_image_tokens=0,
    )
    assert usage_problems(partial) == []
    (note,) = usage_notes(partial)
    assert "less than output_tokens (10)" in note


def test_negative_counter_is_a_problem() -> None:
    assert usage_problems(Usage(input_tokens=-1)) == ["input_tokens is negative (-1)"]


# ------------------------------------------------------------------ models


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5.2-20251211", "gpt-5.2"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-4o-mini", None),
        ("gpt-4-1106-preview", None),
        ("o3", None),
        ("model-2048", None),  # 20/48 is no month/day
    ],
)
def test_base_model(name: str, base: str | None) -> None:
    assert base_model(name) == base


@pytest.mark.parametrize(
    ("configured", "seen", "same"),
    [
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", True),
        ("gpt-4o-mini", "gpt-4o-mini", True),
        ("GPT-4o-mini", "gpt-4o-mini-2024-07-18", True),
        ("openai/gpt-4o-mini", "gpt-4o-mini-2024-07-18", True),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini-2024-07-18", True),
        ("gpt-4o", "gpt-4o-mini-2024-07-18", False),  # a prefix is not the same model
        ("gpt-4o-mini", "gpt-4o-2024-08-06", False),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini-2025-01-01", False),
        ("gpt-4o-mini", "gpt-4o-mini-audio-preview-2024-12-17", False),
    ],
)
def test_same_model(configured: str, seen: str, same: bool) -> None:
    assert same_model(configured, seen) is same


def test_model_mismatch_warns_with_the_models_named() -> None:
    assert model_mismatch("gpt-4o-mini", [SNAPSHOT]) is None
    assert model_mismatch(None, ["anything"]) is None
    assert model_mismatch("gpt-4o-mini", []) is None
    warning = model_mismatch("gpt-4o-mini", [SNAPSHOT, "gpt-4o-2024-08-06"])
    assert warning == (
        "usage shows model 'gpt-4o-2024-08-06' that differs from the run's configured model "
        "'gpt-4o-mini'"
    )
    two = model_mismatch("gpt-4o", ["o3-2025-04-16", "gpt-4o-mini-2024-07-18"])
    assert two is not None
    assert "models 'gpt-4o-mini-2024-07-18', 'o3-2025-04-16'" in two


aliases = st.from_regex(r"[a-z][a-z0-9.]{0,6}(-[a-z0-9.]{1,6}){0,2}", fullmatch=True).filter(
    lambda a: base_model(a) is None
)
dates = st.dates(min_value=date(2020, 1, 1)).map(lambda d: d.isoformat())


@settings(max_examples=200)
@given(aliases, dates)
def test_an_alias_matches_its_own_dated_snapshots(alias: str, day: str) -> None:
    assert same_model(alias, f"{alias}-{day}")
    assert model_mismatch(alias, [f"{alias}-{day}"]) is None


@settings(max_examples=200)
@given(aliases, aliases, dates)
def test_a_different_alias_never_matches(alias: str, other: str, day: str) -> None:
    if alias.lower() == other.lower():
        return
    assert not same_model(alias, f"{other}-{day}")
    assert model_mismatch(alias, [f"{other}-{day}"]) is not None


# ------------------------------------------------------------------ the block


def test_breakdown_of_a_share_per_model_and_total() -> None:
    mini = OLD_STYLE
    big = Usage(input_tokens=1_000, output_tokens=100, num_model_requests=2, input_cached_tokens=0)
    share = Share(exact=mini + big, models={SNAPSHOT: mini, "gpt-4o-2024-08-06": big})
    breakdown = breakdown_of_share(share, configured_model="gpt-4o-mini")
    block = json.loads(json.dumps(breakdown.to_json(), allow_nan=False))
    assert block["total"]["input"] == {"total": 21_150, "cached": 9_728}
    assert block["total"]["requests"] == 14
    assert set(block["models"]) == {SNAPSHOT, "gpt-4o-2024-08-06"}
    assert block["models"][SNAPSHOT]["input"]["cached"] == 9_728
    assert "without_model" not in block
    assert block["problems"] == []
    assert block["model_warning"] is not None
    assert "'gpt-4o-2024-08-06'" in block["model_warning"]
    assert breakdown.cached_tokens == 9_728
    assert breakdown.ok


def test_usage_without_a_model_is_shown_separately() -> None:
    total = OLD_STYLE + Usage(input_tokens=50, output_tokens=5, num_model_requests=1)
    breakdown = build_breakdown(total, {SNAPSHOT: OLD_STYLE})
    assert breakdown.without_model == Usage(
        input_tokens=50, output_tokens=5, num_model_requests=1, input_cached_tokens=0
    )
    assert any("carry no model" in n for n in breakdown.notes)


def test_no_model_grouping_gives_no_models_and_no_remainder() -> None:
    breakdown = build_breakdown(OLD_STYLE, {})
    block = breakdown.to_json()
    assert block["models"] == {}
    assert "without_model" not in block
    assert block["model_warning"] is None


def test_models_exceeding_the_total_is_a_problem() -> None:
    breakdown = build_breakdown(Usage(10, 1, 1), {SNAPSHOT: Usage(20, 1, 1)})
    assert "per-model usage adds up to more than the run's total" in breakdown.problems
    assert not breakdown.ok


@st.composite
def consistent_usage(draw: st.DrawFn) -> Usage:
    parts = {
        name: draw(st.integers(0, 10**6))
        for name in (
            "input_text_tokens",
            "input_audio_tokens",
            "input_image_tokens",
            "input_cached_text_tokens",
            "input_cached_audio_tokens",
            "input_cached_image_tokens",
            "input_cache_write_tokens",
            "output_text_tokens",
            "output_audio_tokens",
            "output_image_tokens",
        )
    }
    uncached = (
        parts["input_text_tokens"] + parts["input_audio_tokens"] + parts["input_image_tokens"]
    )
    cached = (
        parts["input_cached_text_tokens"]
        + parts["input_cached_audio_tokens"]
        + parts["input_cached_image_tokens"]
    )
    out = parts["output_text_tokens"] + parts["output_audio_tokens"] + parts["output_image_tokens"]
    usage = Usage(
        input_tokens=uncached + cached + parts["input_cache_write_tokens"],
        output_tokens=out,
        num_model_requests=draw(st.integers(0, 1000)),
        input_cached_tokens=cached,
        input_uncached_tokens=uncached,
        **parts,
    )
    # drop a random subset of optional fields: absent, as in old buckets
    dropped = draw(st.sets(st.sampled_from(ALL_OPTIONAL_FIELDS)))
    return usage.replace(**dict.fromkeys(dropped))


@settings(max_examples=300)
@given(consistent_usage())
def test_consistent_usage_has_no_problems_and_a_share_in_range(usage: Usage) -> None:
    assert usage_problems(usage) == []
    assert usage_notes(usage) == []
    share = cached_share(usage)
    if usage.input_cached_tokens is None or usage.input_tokens == 0:
        assert share is None
    else:
        assert share is not None
        assert 0.0 <= share <= 1.0
    counts = counts_json(usage)
    reported = sum(len(group) for group in (counts["input"], counts["output"]))
    assert reported == 2 + sum(1 for f in ALL_OPTIONAL_FIELDS if getattr(usage, f) is not None)


@settings(max_examples=200)
@given(consistent_usage(), st.integers(1, 10**6))
def test_cached_beyond_input_is_always_caught(usage: Usage, excess: int) -> None:
    bad = usage.replace(input_cached_tokens=usage.input_tokens + excess)
    assert any(
        "input_cached_tokens" in p and "exceeds input_tokens" in p for p in usage_problems(bad)
    )
    assert cached_tokens_value(bad) is None


def test_cache_writes_by_retention_are_laid_out_and_checked() -> None:
    # The SDK's newer fields: cache writes split into 30-minute and 12-hour retention.
    usage = Usage(
        1000,
        100,
        1,
        input_cached_tokens=200,
        input_cache_write_tokens=300,
        input_cache_write_30m_tokens=100,
        input_cache_write_12h_tokens=200,
        input_uncached_tokens=500,
    )
    out = build_breakdown(usage, {}).to_json()
    assert out["total"]["input"]["cache_write_30m"] == 100
    assert out["total"]["input"]["cache_write_12h"] == 200
    assert "input.cache_write_30m" not in out["not_carried"]
    bad = usage.replace(input_cache_write_12h_tokens=250)
    assert any("input_cache_write_tokens" in p for p in build_breakdown(bad, {}).problems)

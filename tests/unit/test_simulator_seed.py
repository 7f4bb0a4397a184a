"""`--seed-from`: which totals a run file records and how they are spread. Pure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tokensettle.simulator.scenario import ScenarioError
from tokensettle.simulator.seed import (
    SeededRun,
    SeedIdentity,
    SeedSkip,
    key_ids,
    seed_run,
)
from tokensettle.usage import Usage

T0 = 1_760_612_520  # a UTC minute
PATH = Path("/runs/baes/r1/metrics.json")
IDENTITY = SeedIdentity(keys={"baes": "key_baes"}, project_id="proj_x", model="gpt-x")


def doc(steps: list[dict[str, Any]], agg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"run_id": "r1", "steps": steps, "aggregate_metrics": agg, **extra}


def step(start: float, end: float, **tokens: int) -> dict[str, Any]:
    return {"start_timestamp": start, "end_timestamp": end, **tokens}


def seeded(document: dict[str, Any]) -> SeededRun:
    result = seed_run(json.dumps(document).encode(), PATH, "baes", IDENTITY, registered_at=5.0)
    assert isinstance(result, SeededRun), result
    return result


def total(run: SeededRun) -> Usage:
    return Usage.total(r.final_usage for r in run.requests)


def by_minute(run: SeededRun) -> dict[int, Usage]:
    out: dict[int, Usage] = {}
    for r in run.requests:
        out[r.minute] = out.get(r.minute, Usage()) + r.final_usage
    return out


def test_a_verified_block_is_what_the_file_records() -> None:
    block = {
        "verification_status": "verified",
        "attempts": [
            {"timestamp": "2025-10-16T12:00:00Z", "total_tokens_in": 900, "total_tokens_out": 90},
            {
                "timestamp": "2025-10-16T12:10:00Z",
                "total_tokens_in": 1000,
                "total_tokens_out": 100,
                "total_api_calls": 4,
                "total_cached_tokens": 64,
            },
        ],
    }
    run = seeded(
        doc(
            [step(T0, T0 + 90)],
            {"TOK_IN": 0, "TOK_OUT": 0},
            usage_api_reconciliation=block,
        )
    )
    assert run.recorded.source == "usage_api_reconciliation"
    assert total(run) == Usage(1000, 100, 4, input_cached_tokens=64)
    assert {r.api_key_id for r in run.requests} == {"key_baes"}
    assert {(r.project_id, r.model, r.registered_at) for r in run.requests} == {
        ("proj_x", "gpt-x", 5.0)
    }


def test_steps_that_add_up_keep_their_own_counts_over_their_own_minutes() -> None:
    steps = [
        step(T0, T0 + 120, tokens_in=600, tokens_out=60, api_calls=3, cached_tokens=10),
        step(T0 + 180, T0 + 200, tokens_in=400, tokens_out=40, api_calls=1, cached_tokens=0),
        step(T0 + 200, T0 + 230, tokens_in=0, tokens_out=0, api_calls=0, cached_tokens=0),
    ]
    agg = {"TOK_IN": 1000, "TOK_OUT": 100, "API_CALLS": 4, "CACHED_TOKENS": 10}
    run = seeded(doc(steps, agg, model="gpt-4o-mini"))
    assert run.spread_over == "steps" and run.recorded.source == "aggregate_metrics"
    minutes = by_minute(run)
    # the first step is active 60 s in each of its two minutes; the second only in T0+180
    assert minutes == {
        T0: Usage(300, 30, 2, input_cached_tokens=5),
        T0 + 60: Usage(300, 30, 1, input_cached_tokens=5),
        T0 + 180: Usage(400, 40, 1, input_cached_tokens=0),
    }
    assert {r.model for r in run.requests} == {"gpt-4o-mini"}  # the run's own model
    assert all(r.time == r.minute + 30 for r in run.requests)


def test_steps_that_do_not_add_up_spread_the_run_by_active_seconds() -> None:
    steps = [step(T0 + 30, T0 + 150, tokens_in=5, tokens_out=1)]  # the seed's bad step
    run = seeded(doc(steps, {"TOK_IN": 900, "TOK_OUT": 90}))
    assert run.spread_over == "minutes"
    # active 30 s, 60 s and 30 s in three minutes; requests unknown: one for the run, in
    # the minute with the largest share
    assert by_minute(run) == {
        T0: Usage(225, 23, 0),
        T0 + 60: Usage(450, 45, 1),
        T0 + 120: Usage(225, 22, 0),
    }
    assert total(run).input_cached_tokens is None  # not recorded: not carried


def test_run_level_window_without_steps() -> None:
    run = seeded(
        {
            "run_id": "r1",
            "start_timestamp": "2025-10-16T11:02:00Z",
            "end_timestamp": "2025-10-16T11:03:00Z",
            "aggregate_metrics": {"TOK_IN": 7, "TOK_OUT": 3, "API_CALLS": 2},
        }
    )
    assert by_minute(run) == {T0: Usage(7, 3, 2)}


def test_seeding_is_deterministic() -> None:
    steps = [step(T0 + 7.25, T0 + 301.5, tokens_in=12_345, tokens_out=678, api_calls=9)]
    document = doc(steps, {"TOK_IN": 12_345, "TOK_OUT": 678, "API_CALLS": 9})
    assert seeded(document).requests == seeded(document).requests
    assert total(seeded(document)) == Usage(12_345, 678, 9)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (json.dumps(doc([step(T0, T0 + 60)], {"TOK_IN": 0, "TOK_OUT": 0})), "records no tokens"),
        (json.dumps(doc([step(T0, T0 + 8 * 86_400)], {"TOK_IN": 1, "TOK_OUT": 1})), "seven"),
        ("{not json", "not valid JSON"),
        (json.dumps({"run_id": "r1", "aggregate_metrics": {"TOK_IN": 1}}), "no run window"),
    ],
)
def test_runs_that_cannot_be_replayed_are_skipped_with_a_reason(raw: str, reason: str) -> None:
    result = seed_run(raw.encode(), PATH, "baes", IDENTITY, registered_at=0.0)
    assert isinstance(result, SeedSkip) and reason in result.reason


def test_key_ids_follow_the_scope_convention_and_flags_win() -> None:
    environ = {"OPENAI_API_KEY_BAES_ID": "key_env1,key_env2", "OPENAI_API_KEY_GHSPEC_ID": "key_g"}
    assert key_ids(environ, ["baes=key_flag"]) == {"baes": "key_flag", "ghspec": "key_g"}
    assert key_ids(environ, []) == {"baes": "key_env1", "ghspec": "key_g"}
    assert SeedIdentity(keys={}).key_for("chatdev") == "key_chatdev"
    with pytest.raises(ScenarioError, match="FRAMEWORK=KEY_ID"):
        key_ids({}, ["baes"])

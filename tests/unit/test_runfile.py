"""runfile: metrics.json bytes -> RunRecord, formatting detection, and document patching.

Documents are built here, modelled on the schemas seen in the field (genai-devbench v1 with
step token fields, v2 without them, float step timestamps, ISO run-level timestamps).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.runfile import (
    AGGREGATE_TOKEN_KEYS,
    BLOCK,
    STEP_TOKEN_KEYS,
    JsonStyle,
    Patch,
    RunFileError,
    StepInfo,
    apply_patch,
    detect_style,
    parse_run,
)
from tokensettle.stability import Status, Totals, Verdict
from tokensettle.usage import Usage
from tokensettle.windows import MINUTE, Interval

PATH = Path("/runs/baes/6f0b2490-1548-4b4f-a943-a688ec972355/metrics.json")
NOW = datetime(2025, 10, 19, 11, 30, tzinfo=UTC)
TOKEN_KEYS = tuple(STEP_TOKEN_KEYS)


def v1_step(n: int, start: float, end: float, *, tokens: bool = True) -> dict[str, Any]:
    step: dict[str, Any] = {
        "step_number": n,
        "command": "Create a CRUD application with Python, FastAPI, and SQLite.",
        "duration_seconds": float(end - start),
        "success": True,
        "retry_count": 0,
        "hitl_count": 0,
    }
    if tokens:
        step.update({"tokens_in": 0, "tokens_out": 0, "api_calls": 0, "cached_tokens": 0})
    step.update({"start_timestamp": start, "end_timestamp": end})
    return step


def v1_doc(*, step_tokens: bool = True, top_status: bool = True) -> dict[str, Any]:
    """Modelled on runs/baes/6f0b2490 (v1 schema, int step timestamps)."""
    doc: dict[str, Any] = {
        "run_id": "6f0b2490-1548-4b4f-a943-a688ec972355",
        "model": "gpt-4o-mini",
        "start_timestamp": "2025-10-19T10:39:29.723556Z",
        "end_timestamp": "2025-10-19T10:41:18.574869Z",
        "steps": [
            v1_step(1, 1760870369, 1760870426, tokens=step_tokens),
            v1_step(2, 1760870426, 1760870441, tokens=step_tokens),
            v1_step(3, 1760870441, 1760870478, tokens=step_tokens),
        ],
        "aggregate_metrics": {
            "UTT": 6,
            "HIT": 0,
            "AUTR": 1.0,
            "TOK_IN": 0,
            "TOK_OUT": 0,
            "API_CALLS": 0,
            "CACHED_TOKENS": 0,
            "T_WALL_seconds": 108.85,
            "AEI": 0.0,
            "COST_USD": 0.0,
        },
        "cost_breakdown": {"model": "gpt-4o-mini", "output_cost": 0.0},
        "usage_api_verification": {"verified": False, "error": "Lazy evaluation - pending"},
    }
    if top_status:
        doc["verification_status"] = "pending"
    return doc


def raw(doc: Any, indent: int | str | None = 2) -> bytes:
    return json.dumps(doc, indent=indent).encode()


def parse(doc_or_bytes: Any, grace: int = MINUTE) -> Any:
    data = doc_or_bytes if isinstance(doc_or_bytes, bytes) else raw(doc_or_bytes)
    return parse_run(data, PATH, "baes", grace)


# ------------------------------------------------------------------ parse_run


def test_parse_v1_steps_with_token_fields_and_int_timestamps() -> None:
    rec = parse(v1_doc())
    assert rec.run_id == "6f0b2490-1548-4b4f-a943-a688ec972355"
    assert rec.framework == "baes"
    assert rec.model == "gpt-4o-mini"
    assert rec.window_source == "steps"
    assert rec.activity.start == 1760870369
    assert rec.activity.end == 1760870478
    assert rec.window == Interval(1760870340, 1760870580)  # floor start, ceil end + 1 min
    assert [s.label for s in rec.steps] == ["1", "2", "3"]
    assert all(s.token_keys == TOKEN_KEYS for s in rec.steps)
    assert rec.steps_have_tokens
    assert rec.attempts == ()
    assert rec.status is None
    assert rec.written is None
    assert not rec.ours
    assert rec.end == datetime.fromtimestamp(1760870478, UTC)


def test_parse_v2_steps_without_token_fields() -> None:
    doc = v1_doc(step_tokens=False)
    for step in doc["steps"]:
        step["step"] = f"sprint-{step.pop('step_number')}"
    rec = parse(doc)
    assert not rec.steps_have_tokens
    assert all(s.token_keys == () for s in rec.steps)
    assert [s.label for s in rec.steps] == ["sprint-1", "sprint-2", "sprint-3"]
    assert rec.window_source == "steps"


def test_parse_step_with_only_some_token_fields() -> None:
    # baes/801758a3: steps carry tokens_in/tokens_out only.
    doc = v1_doc()
    for step in doc["steps"]:
        del step["api_calls"], step["cached_tokens"]
    rec = parse(doc)
    assert all(s.token_keys == ("tokens_in", "tokens_out") for s in rec.steps)


def test_parse_float_step_timestamps() -> None:
    # baes/801758a3: float step timestamps (the run that validated the float fix).
    doc = v1_doc()
    doc["steps"] = [
        v1_step(1, 1760617771.4556596, 1760617800.5),
        v1_step(2, 1760617800.5, 1760617893.2863662),
    ]
    rec = parse(doc)
    assert rec.activity.start == pytest.approx(1760617771.4556596)
    assert rec.activity.end == pytest.approx(1760617893.2863662)
    assert rec.window == Interval(1760617740, 1760617920 + MINUTE)


def test_parse_falls_back_to_iso_run_timestamps_when_steps_lack_them() -> None:
    doc = v1_doc()
    for step in doc["steps"]:
        del step["start_timestamp"]
        step["end_timestamp"] = None
    rec = parse(doc)
    assert rec.window_source == "run"
    start = datetime(2025, 10, 19, 10, 39, 29, 723556, tzinfo=UTC).timestamp()
    end = datetime(2025, 10, 19, 10, 41, 18, 574869, tzinfo=UTC).timestamp()
    assert rec.activity.start == pytest.approx(start)
    assert rec.activity.end == pytest.approx(end)
    assert rec.window == Interval(1760870340, 1760870340 + 4 * MINUTE)
    assert all(s.activity is None for s in rec.steps)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2025-10-19T10:39:29", "2025-10-19T10:41:18"),  # naive = UTC
        ("2025-10-19T12:39:29+02:00", "2025-10-19T12:41:18+02:00"),
        (1760870369, 1760870478),
        ("1760870369", "1760870478.5"),
    ],
)
def test_parse_run_level_timestamp_forms(start: object, end: object) -> None:
    doc = {"run_id": "r", "start_timestamp": start, "end_timestamp": end}
    rec = parse(doc)
    assert rec.window_source == "run"
    assert int(rec.activity.start) == 1760870369
    assert int(rec.activity.end) == 1760870478


def test_parse_without_steps_and_run_id_from_directory() -> None:
    doc = {"start_timestamp": 1760870369, "end_timestamp": 1760870478, "steps": None}
    rec = parse(doc)
    assert rec.run_id == PATH.parent.name
    assert rec.steps == ()


def test_parse_reads_seed_attempts_and_written_totals() -> None:
    doc = v1_doc()
    doc[BLOCK] = {
        "verification_status": "verified",
        "verification_message": "Verified after 2 stable checks",
        "verified_at": "2025-10-18T09:46:53.493323+00:00",
        "attempts": [
            {
                "timestamp": "2025-10-18T08:23:35.176093+00:00",
                "steps": [{"step": 1, "status": "success", "tokens_in": 15355}],
                "total_tokens_in": 19066,
                "total_tokens_out": 5223,
                "total_api_calls": 11,
                "total_cached_tokens": 0,
            },
            {"timestamp": "2025-10-18T09:02:34+00:00", "error": "HTTP 500"},
            {"timestamp": "not a time", "total_tokens_in": 1, "total_tokens_out": 1},
            "garbage",
            {
                "timestamp": "2025-10-18T09:46:53.493323+00:00",
                "total_tokens_in": 19066.0,
                "total_tokens_out": 5223,
                "fingerprint": "sha256:abc",
            },
        ],
    }
    rec = parse(doc)
    assert rec.status is Status.VERIFIED
    assert rec.message == "Verified after 2 stable checks"
    assert len(rec.attempts) == 3
    first, bad, last = rec.attempts
    assert first.totals == Totals(19066, 5223, 11, 0)
    assert first.timestamp == datetime(2025, 10, 18, 8, 23, 35, 176093, tzinfo=UTC)
    assert not bad.ok
    assert bad.error == "HTTP 500"
    assert last.totals == Totals(19066, 5223, 0, 0)
    assert last.fingerprint == "sha256:abc"
    assert rec.written == Totals(19066, 5223, 0, 0)


def test_written_totals_only_for_verified_or_ambiguous() -> None:
    doc = v1_doc()
    doc[BLOCK] = {
        "verification_status": "pending",
        "attempts": [
            {"timestamp": "2025-10-18T08:23:35+00:00", "total_tokens_in": 5, "total_tokens_out": 1}
        ],
    }
    assert parse(doc).written is None


def test_ours_is_read_from_provenance() -> None:
    doc = v1_doc()
    doc[BLOCK] = {"provenance": {"tool": "tokensettle", "version": "0.1.0"}}
    assert parse(doc).ours
    doc[BLOCK] = {"provenance": {"tool": "genai-devbench"}}
    assert not parse(doc).ours


def _mutated(mutate: Any) -> bytes:
    doc = v1_doc()
    mutate(doc)
    return raw(doc)


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(doc: Any) -> None:
        target = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return mutate


def _drop_all_windows(doc: Any) -> None:
    del doc["start_timestamp"], doc["end_timestamp"]
    for step in doc["steps"]:
        del step["start_timestamp"], step["end_timestamp"]


BAD_FILES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "empty"),
    ("whitespace", b"  \n", "empty"),
    ("truncated", raw(v1_doc())[:200], "not valid JSON"),
    ("not utf-8", b'{"run_id": "\xff\xfe"}', "UTF-8|JSON"),
    ("array", b"[1, 2]", "list"),
    ("string", b'"metrics"', "str"),
    ("run_id number", _mutated(_set(("run_id",), 42)), "run_id"),
    ("run_id empty", _mutated(_set(("run_id",), "")), "run_id"),
    ("steps object", _mutated(_set(("steps",), {"1": {}})), "steps"),
    ("step not object", _mutated(_set(("steps", 1), [1760870426, 1760870441])), r"steps\[1\]"),
    ("step ts bool", _mutated(_set(("steps", 0, "start_timestamp"), True)), "boolean"),
    ("step ts list", _mutated(_set(("steps", 0, "end_timestamp"), [1])), r"steps\[0\]"),
    ("step ts garbage", _mutated(_set(("steps", 2, "end_timestamp"), "soon")), r"steps\[2\]"),
    (
        "step ts milliseconds",
        _mutated(_set(("steps", 0, "start_timestamp"), 1760870369000)),
        "plausible",
    ),
    ("step ts tiny", _mutated(_set(("steps", 0, "start_timestamp"), 1760870)), "plausible"),
    ("step ts nan", _mutated(_set(("steps", 0, "start_timestamp"), float("nan"))), "plausible"),
    ("step ends first", _mutated(_set(("steps", 0, "end_timestamp"), 1760870000)), "before"),
    ("step token str", _mutated(_set(("steps", 0, "tokens_in"), "12")), "tokens_in"),
    ("no window", _mutated(_drop_all_windows), "no run window"),
    ("aggregate list", _mutated(_set(("aggregate_metrics",), [])), "aggregate_metrics"),
    ("block string", _mutated(_set((BLOCK,), "verified")), BLOCK),
    ("attempts object", _mutated(_set((BLOCK,), {"attempts": {}})), "attempts"),
]


@pytest.mark.parametrize(("name", "data", "match"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_parse_run_errors_are_one_line(name: str, data: bytes, match: str) -> None:
    with pytest.raises(RunFileError, match=match) as info:
        parse(data)
    message = str(info.value)
    assert message
    assert "\n" not in message


def test_parse_run_level_window_errors() -> None:
    base = {"run_id": "r", "start_timestamp": "2025-10-19T10:39:29Z"}
    with pytest.raises(RunFileError, match="no run window"):
        parse(base)
    with pytest.raises(RunFileError, match="before"):
        parse({**base, "end_timestamp": "2025-10-19T10:00:00Z"})
    with pytest.raises(RunFileError, match="ISO 8601"):
        parse({**base, "end_timestamp": "yesterday"})
    with pytest.raises(RunFileError, match="plausible"):
        parse({**base, "end_timestamp": 1760870478123})


# ------------------------------------------------------------------ detect_style

json_keys = st.text(max_size=6)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["Python, FastAPI, and SQLite", 'a": b', "é ü 中文", "\t\n\\", "\u2028"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=8,
)
json_docs = st.dictionaries(json_keys, json_values, max_size=6)


@settings(max_examples=120, deadline=None)
@given(
    json_docs,
    st.sampled_from([2, 4, None, "\t"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, (", ", ": "), (",", ":"), (", ", ":"), (",", ": ")]),
)
def test_detect_style_round_trips_json_dumps_output(
    doc: dict[str, Any],
    indent: int | str | None,
    ensure_ascii: bool,
    newline: bool,
    separators: tuple[str, str] | None,
) -> None:
    text = json.dumps(doc, indent=indent, ensure_ascii=ensure_ascii, separators=separators)
    data = (text + ("\n" if newline else "")).encode()
    assert detect_style(data).dumps(json.loads(data)) == data
    assert detect_style(data, json.loads(data)) == detect_style(data)


def test_detect_style_reads_an_indented_file_without_parsing_it() -> None:
    """The separators of an indented file come from its structure, not from a string
    that looks like one (and no trial dump is needed to tell)."""
    data = b'{\n  "k": "say \\"a\\":b, ",\n  "n": [\n    1\n  ]\n}'
    assert detect_style(data) == JsonStyle(2, True, ",", ": ", False)
    spaced = json.dumps({"k": 'x":y', "n": [1, 2]}, indent=1, separators=(", ", ":")).encode()
    assert detect_style(spaced) == JsonStyle(1, True, ", ", ":", False)


@pytest.mark.parametrize("indent", [0, 1, 3, 8])
def test_detect_style_other_indents(indent: int) -> None:
    data = raw(v1_doc(), indent=indent)
    style = detect_style(data)
    assert style.indent == indent
    assert style.dumps(json.loads(data)) == data


def test_detect_style_values() -> None:
    assert detect_style(b'{\n  "a": 1\n}\n') == JsonStyle(2, True, ",", ": ", True)
    assert detect_style('{"a": "é", "b": 2}'.encode()) == JsonStyle(None, False, ", ", ": ", False)
    assert detect_style(b'{\n\t"a": [\n\t\t1\n\t]\n}').indent == "\t"


@pytest.mark.parametrize(
    "doc",
    [
        {"command": "Python, FastAPI, and SQLite", "n": 1},
        {"k": 'say "a": b'},
    ],
)
def test_detect_style_compact_files_with_separator_like_strings(doc: dict[str, Any]) -> None:
    data = json.dumps(doc, separators=(",", ":")).encode()
    assert detect_style(data).dumps(json.loads(data)) == data


# ------------------------------------------------------------------ apply_patch


def _verdict(status: Status) -> Verdict:
    writes = status in (Status.VERIFIED, Status.AMBIGUOUS)
    return Verdict(
        status,
        f"{status.value} for the test",
        None if writes else NOW + timedelta(minutes=10),
        verified_at=NOW if writes else None,
        stable_count=2 if writes else 1,
    )


TOTALS = Usage(
    input_tokens=20150, output_tokens=5335, num_model_requests=12, input_cached_tokens=9728
)
STEP_VALUES = {
    0: Usage(
        input_tokens=16439, output_tokens=4832, num_model_requests=9, input_cached_tokens=8448
    ),
    2: Usage(input_tokens=3711, output_tokens=503, num_model_requests=3, input_cached_tokens=1280),
}


def _patch(status: Status, totals: Usage | None = TOTALS, **extra: Any) -> Patch:
    return Patch(
        verdict=_verdict(status),
        attempt={
            "timestamp": NOW.isoformat(),
            "total_tokens_in": TOTALS.input_tokens,
            "total_tokens_out": TOTALS.output_tokens,
            "total_api_calls": TOTALS.num_model_requests,
            "total_cached_tokens": TOTALS.cached_tokens,
            "query_window": {"start": 1760870340, "end": 1760870580},
        },
        now=NOW,
        provenance={"tool": "tokensettle", "version": "0.1.0"},
        totals=totals,
        step_values=STEP_VALUES,
        cached_tokens=extra.pop("cached_tokens", totals.input_cached_tokens if totals else None),
        **extra,
    )


def _strip_token_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """Everything apply_patch may touch removed: what must stay byte-for-byte equal."""
    out = copy.deepcopy(doc)
    out.pop(BLOCK, None)
    out.pop("verification_status", None)
    agg = out.get("aggregate_metrics")
    if isinstance(agg, dict):
        for key in (*AGGREGATE_TOKEN_KEYS, "AEI"):
            agg.pop(key, None)
        if not agg:
            out.pop("aggregate_metrics")
    for step in out.get("steps") or []:
        for key in STEP_TOKEN_KEYS:
            step.pop(key, None)
    return out


@pytest.mark.parametrize("status", [Status.VERIFIED, Status.AMBIGUOUS])
def test_apply_patch_verified_writes_aggregates_steps_and_block(status: Status) -> None:
    doc = v1_doc()
    doc["steps"][1].pop("cached_tokens")
    rec = parse(doc)
    out = apply_patch(doc, _patch(status), rec.steps)
    agg = out["aggregate_metrics"]
    assert agg["TOK_IN"] == 20150
    assert agg["TOK_OUT"] == 5335
    assert agg["API_CALLS"] == 12
    assert agg["CACHED_TOKENS"] == 9728
    assert agg["AEI"] == pytest.approx(1.0 / math.log(20151))  # 0.1009 in the field
    assert out["steps"][0]["tokens_in"] == 16439
    assert out["steps"][0]["cached_tokens"] == 8448
    assert out["steps"][2]["api_calls"] == 3
    # A step with no usage gets zeros, and only the keys it had.
    assert {k: out["steps"][1][k] for k in ("tokens_in", "tokens_out", "api_calls")} == {
        "tokens_in": 0,
        "tokens_out": 0,
        "api_calls": 0,
    }
    assert "cached_tokens" not in out["steps"][1]
    block = out[BLOCK]
    assert block["verification_status"] == status.value
    assert block["verified_at"] == NOW.isoformat()
    assert block["total_tokens_in"] == 20150
    assert block["total_tokens_out"] == 5335
    assert block["steps_updated"] == ["1", "2", "3"]
    assert block["attempts"][-1]["total_tokens_in"] == 20150
    assert block["provenance"]["tool"] == "tokensettle"
    assert out["verification_status"] == status.value
    assert _strip_token_fields(out) == _strip_token_fields(doc)
    assert list(out)[: len(doc)] == list(doc)  # key order kept, block appended
    assert doc == v1_doc() | {"steps": doc["steps"]}  # input not mutated
    assert "cached_tokens" not in doc["steps"][1]


def test_a_provider_that_counts_no_requests_leaves_every_api_call_count_alone() -> None:
    """Anthropic's usage report has no request count: API_CALLS and the steps' api_calls
    keep what the run wrote (0 would be a number nobody measured); tokens are written."""
    doc = v1_doc()
    doc["aggregate_metrics"]["API_CALLS"] = 7
    doc["steps"][0]["api_calls"] = 5
    uncounted = TOTALS.replace(num_model_requests=0, requests_counted=False)
    patch = _patch(Status.VERIFIED, uncounted)
    patch = replace(
        patch,
        step_values={
            i: u.replace(num_model_requests=0, requests_counted=False)
            for i, u in STEP_VALUES.items()
        },
    )
    out = apply_patch(doc, patch, parse(doc).steps)
    assert out["aggregate_metrics"]["API_CALLS"] == 7
    assert out["steps"][0]["api_calls"] == 5
    assert out["steps"][2]["api_calls"] == doc["steps"][2]["api_calls"]
    assert out["aggregate_metrics"]["TOK_IN"] == 20150
    assert out["steps"][0]["tokens_in"] == 16439
    assert out[BLOCK]["total_api_calls"] is None


def test_apply_patch_never_adds_step_token_keys_to_v2_steps() -> None:
    doc = v1_doc(step_tokens=False)
    rec = parse(doc)
    out = apply_patch(doc, _patch(Status.VERIFIED), rec.steps)
    for before, after in zip(doc["steps"], out["steps"], strict=True):
        assert after == before
    assert out["aggregate_metrics"]["TOK_IN"] == 20150
    assert out[BLOCK]["steps_updated"] == []


def test_apply_patch_aei_only_where_autr_exists_and_zero_when_no_input() -> None:
    doc = v1_doc()
    del doc["aggregate_metrics"]["AUTR"], doc["aggregate_metrics"]["AEI"]
    out = apply_patch(doc, _patch(Status.VERIFIED), parse(doc).steps)
    assert "AEI" not in out["aggregate_metrics"]
    doc = v1_doc()
    zero = Usage()
    out = apply_patch(doc, _patch(Status.VERIFIED, totals=zero), parse(doc).steps)
    assert out["aggregate_metrics"]["AEI"] == 0.0
    assert out["aggregate_metrics"]["TOK_IN"] == 0


def test_apply_patch_top_level_status_only_where_present() -> None:
    doc = v1_doc(top_status=False)
    out = apply_patch(doc, _patch(Status.VERIFIED), parse(doc).steps)
    assert "verification_status" not in out
    assert out[BLOCK]["verification_status"] == "verified"


@pytest.mark.parametrize(
    "status", [Status.PENDING, Status.WARNING, Status.DATA_NOT_AVAILABLE, Status.EXPIRED]
)
def test_apply_patch_non_verified_changes_no_token_field(status: Status) -> None:
    doc = v1_doc()
    doc["aggregate_metrics"]["TOK_IN"] = 19066  # what an earlier verification wrote
    doc[BLOCK] = {
        "verification_status": "pending",
        "attempts": [{"timestamp": "2025-10-19T11:00:00+00:00", "total_tokens_in": 19066}],
        "provenance": {"tool": "tokensettle", "first_seen": "x"},
    }
    rec = parse(doc)
    out = apply_patch(doc, _patch(status), rec.steps)
    assert out["aggregate_metrics"] == doc["aggregate_metrics"]
    assert out["steps"] == doc["steps"]
    block = out[BLOCK]
    assert block["verification_status"] == status.value
    assert block["verification_message"] == f"{status.value} for the test"
    assert len(block["attempts"]) == 2
    assert block["attempts"][0] == doc[BLOCK]["attempts"][0]
    assert "total_tokens_in" not in block
    assert "verified_at" not in block
    assert block["provenance"] == {"tool": "tokensettle", "first_seen": "x", "version": "0.1.0"}
    assert out["verification_status"] == status.value
    assert _strip_token_fields(out) == _strip_token_fields(doc)


def test_apply_patch_without_appending_attempt() -> None:
    doc = v1_doc()
    out = apply_patch(doc, _patch(Status.PENDING), parse(doc).steps, append_attempt=False)
    assert out[BLOCK]["attempts"] == []


# Property: random extra fields and random subsets of step token keys.

extra_values = st.none() | st.booleans() | st.integers() | st.text(max_size=8)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc = v1_doc(top_status=draw(st.booleans()))
    for step in doc["steps"]:
        keep = draw(st.sets(st.sampled_from(TOKEN_KEYS)))
        for key in TOKEN_KEYS:
            if key not in keep:
                step.pop(key)
            else:
                step[key] = draw(st.integers(min_value=0, max_value=10**6))
        step.update(draw(st.dictionaries(st.sampled_from(["note", "x", "hitl"]), extra_values)))
    doc.update(draw(st.dictionaries(st.sampled_from(["extra", "notes", "commit"]), extra_values)))
    if not draw(st.booleans()):
        del doc["aggregate_metrics"]["AUTR"]
    return doc


@settings(max_examples=100, deadline=None)
@given(documents(), st.sampled_from(list(Status)))
def test_apply_patch_properties(doc: dict[str, Any], status: Status) -> None:
    rec = parse(doc)
    before = copy.deepcopy(doc)
    out = apply_patch(doc, _patch(status), rec.steps)
    assert doc == before
    assert _strip_token_fields(out) == _strip_token_fields(doc)
    for i, (s_in, s_out) in enumerate(zip(doc["steps"], out["steps"], strict=True)):
        assert set(s_out) == set(s_in)
        assert list(s_out) == list(s_in)
        if status in (Status.VERIFIED, Status.AMBIGUOUS):
            value = STEP_VALUES.get(i, Usage())
            for key, attr in STEP_TOKEN_KEYS.items():
                if key in s_in:
                    assert s_out[key] == getattr(value, attr)
        else:
            assert s_out == s_in
    if status in (Status.VERIFIED, Status.AMBIGUOUS):
        assert out["aggregate_metrics"]["TOK_IN"] == TOTALS.input_tokens
        assert ("AEI" in out["aggregate_metrics"]) == (
            "AEI" in doc["aggregate_metrics"] or "AUTR" in doc["aggregate_metrics"]
        )
    else:
        assert out["aggregate_metrics"] == doc["aggregate_metrics"]
    assert ("verification_status" in out) == ("verification_status" in doc)
    if "verification_status" in out:
        assert out["verification_status"] == status.value
    assert out[BLOCK]["attempts"][-1] == _patch(status).attempt
    # The patched document re-serialises in the original style.
    original = raw(doc, indent=4) + b"\n"
    style = detect_style(original)
    assert json.loads(style.dumps(out)) == out
    assert style.dumps(doc) == original


def test_stepinfo_indexes_point_into_the_document() -> None:
    rec = parse(v1_doc())
    assert [s.index for s in rec.steps] == [0, 1, 2]
    assert isinstance(rec.steps[0], StepInfo)


def test_cached_tokens_not_carried_leaves_the_file_value() -> None:
    doc = v1_doc()
    doc["aggregate_metrics"]["CACHED_TOKENS"] = 77
    out = apply_patch(doc, _patch(Status.VERIFIED, cached_tokens=None), parse(doc).steps)
    assert out["aggregate_metrics"]["CACHED_TOKENS"] == 77
    assert out["aggregate_metrics"]["TOK_IN"] == 20150


def test_cost_is_written_only_where_the_file_has_the_fields() -> None:
    breakdown = {
        "uncached_input_cost": 0.0015633,
        "cached_input_cost": 0.0007296,
        "output_cost": 0.003201,
        "cache_savings": 0.0007296,
        "model": "gpt-4o-mini-2024-07-18",
    }
    with_fields = v1_doc()
    with_fields["aggregate_metrics"]["COST_USD"] = 0.0
    with_fields["cost_breakdown"] = dict.fromkeys(breakdown, 0.0)
    patch = _patch(Status.VERIFIED, cost_usd=0.0054939, cost_breakdown=breakdown)
    out = apply_patch(with_fields, patch, parse(with_fields).steps)
    assert out["aggregate_metrics"]["COST_USD"] == 0.0054939
    assert out["cost_breakdown"] == breakdown
    without = v1_doc()
    without["aggregate_metrics"].pop("COST_USD", None)
    without.pop("cost_breakdown", None)
    out = apply_patch(without, patch, parse(without).steps)
    assert "COST_USD" not in out["aggregate_metrics"]
    assert "cost_breakdown" not in out
    pending = apply_patch(
        with_fields, _patch(Status.PENDING, cost_usd=1.0), parse(with_fields).steps
    )
    assert pending["aggregate_metrics"]["COST_USD"] == 0.0

"""runfile against documents we cannot round-trip and files built to crash us.

Every such file is either patched keeping it exactly (a UTF-8 byte-order mark, NaN in a
field we never touch) or refused at parse time with a one-line RunFileError (duplicate
keys, other encodings, non-finite numbers where we compute, absurd depth or digits);
nothing of another exception type ever escapes parse_run, apply_patch or dumps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_runfile import NOW, TOTALS, _patch, parse, raw, v1_doc
from tokensettle.logs import REDACTED
from tokensettle.runfile import (
    BLOCK,
    MAX_COUNT,
    RunFileError,
    apply_patch,
    detect_style,
    load_document,
    parse_run,
    redact_secrets,
)
from tokensettle.stability import Status

PATH = Path("/runs/baes/r/metrics.json")


def _roundtrip(data: bytes) -> bytes:
    return detect_style(data).dumps(load_document(data))


def _patched(data: bytes, status: Status = Status.VERIFIED, **kw: Any) -> bytes:
    rec = parse_run(data, PATH, "baes", 60)
    return detect_style(data).dumps(
        apply_patch(load_document(data), _patch(status), rec.steps, **kw)
    )


def _one_line_error(data: bytes) -> str:
    with pytest.raises(RunFileError) as info:
        parse_run(data, PATH, "baes", 60)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 300, message
    return message


# ------------------------------------------------------------------ item 14: round trips


@pytest.mark.parametrize(
    ("where", "data"),
    [
        ("top level", b'{"run_id": "a", "run_id": "b", "steps": []}'),
        (
            "aggregate_metrics twice",
            raw(v1_doc())[:-1] + b', "aggregate_metrics": {"TOK_IN": 0}}',
        ),
        ("nested", raw(v1_doc())[:-1] + b', "meta": {"k": 1, "x": {"k": 2, "k": 3}}}'),
    ],
)
def test_duplicate_keys_anywhere_are_refused(where: str, data: bytes) -> None:
    # json.loads keeps the last copy, so rewriting dropped the first: data lost.
    message = _one_line_error(data)
    assert "duplicate key" in message, where
    with pytest.raises(RunFileError, match="duplicate key"):
        load_document(data)


def test_a_utf8_byte_order_mark_is_kept() -> None:
    data = b"\xef\xbb\xbf" + raw(v1_doc()) + b"\n"
    assert _roundtrip(data) == data
    out = _patched(data)
    assert out.startswith(b"\xef\xbb\xbf{\n  ")
    assert json.loads(out[3:])["aggregate_metrics"]["TOK_IN"] == TOTALS.input_tokens


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_other_unicode_encodings_are_refused(encoding: str) -> None:
    # json.loads(bytes) guesses UTF-16/32 and parsed it; the write then crashed.
    message = _one_line_error(json.dumps(v1_doc()).encode(encoding))
    assert "not UTF-8" in message and "UTF-16 or UTF-32" in message


def test_latin1_is_refused_not_guessed() -> None:
    data = raw({**v1_doc(), "note": "caf\u00e9"}).replace(b"\\u00e9", "\u00e9".encode("latin-1"))
    assert "not UTF-8" in _one_line_error(data)


def test_nan_and_infinity_in_fields_we_never_touch_round_trip() -> None:
    doc = v1_doc()
    doc["extra"] = {"loss": float("nan"), "best": float("inf"), "worst": float("-inf")}
    doc["aggregate_metrics"]["UTT"] = float("nan")
    data = raw(doc)
    assert b"NaN" in data and b"-Infinity" in data
    assert _roundtrip(data) == data
    out = _patched(data)
    assert b'"loss": NaN' in out and b'"worst": -Infinity' in out and b'"UTT": NaN' in out


@pytest.mark.parametrize(
    "where",
    [
        ("aggregate_metrics", "TOK_IN"),
        ("aggregate_metrics", "API_CALLS"),
        ("aggregate_metrics", "AUTR"),
        ("aggregate_metrics", "AEI"),
        ("aggregate_metrics", "COST_USD"),
        ("cost_breakdown", "output_cost"),
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_where_we_compute_or_overwrite_are_refused(
    where: tuple[str, str], value: float
) -> None:
    doc = v1_doc()
    doc[where[0]][where[1]] = value
    message = _one_line_error(raw(doc))
    assert f"{where[0]}.{where[1]} is {json.dumps(value)}" in message


def test_non_finite_step_token_field_is_refused() -> None:
    doc = v1_doc()
    doc["steps"][1]["tokens_out"] = float("nan")
    assert "steps[1].tokens_out is NaN" in _one_line_error(raw(doc))


def test_a_float_literal_beyond_a_double_is_refused() -> None:
    # 1e400 parses as inf and would be written back as the non-JSON word Infinity.
    data = raw(v1_doc())[:-1] + b', "big": 1e400}'
    assert "beyond a 64-bit float" in _one_line_error(data)


def test_a_lone_surrogate_escape_is_written_back_as_an_escape() -> None:
    doc = v1_doc()
    doc["note"] = "\u00e9 \ud800"
    data = json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8", "backslashreplace")
    assert b"\\ud800" in data
    assert _roundtrip(data) == data
    assert b"\\ud800" in _patched(data)


# ------------------------------------------------------------------ item 15: never crash


def _with(field: str, literal: bytes) -> bytes:
    return raw(v1_doc())[:-1] + b', "' + field.encode() + b'": ' + literal + b"}"


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("600 levels", _with("deep", b"[" * 600 + b"]" * 600), "nested more than 100 levels"),
        ("600 objects", _with("deep", b'{"a": ' * 600 + b"1" + b"}" * 600), "nested more than"),
        ("100k levels", _with("deep", b"[" * 100_000 + b"]" * 100_000), "nested more than"),
        ("5,000-digit integer", _with("seed", b"7" * 5000), "integer of 5,000 digits"),
        ("negative", _with("seed", b"-" + b"7" * 400), "integer of 400 digits"),
        (
            "401-digit timestamp",
            b'{"run_id": "r", "start_timestamp": 1760870369, "end_timestamp": ' + b"9" * 401 + b"}",
            "integer of 401 digits",
        ),
    ],
)
def test_crash_loop_files_are_one_line_errors(name: str, data: bytes, match: str) -> None:
    # Seen: RecursionError in deepcopy/json.dumps, ValueError (int digit limit),
    # OverflowError (float of the timestamp): each crashed the daemon at every start.
    assert match in _one_line_error(data), name


@pytest.mark.parametrize(
    "value",
    [10**299, -(10**299), 1e308, "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"],
)
def test_implausible_timestamps_of_any_size_are_refused_by_name(value: object) -> None:
    doc = v1_doc()
    doc["steps"][0]["start_timestamp"] = value
    assert "steps[0].start_timestamp" in _one_line_error(raw(doc))


def test_absurd_attempt_times_and_counts_are_ignored_not_crashed_on() -> None:
    doc = v1_doc()
    good = {"timestamp": NOW.isoformat(), "total_tokens_in": 5, "total_tokens_out": 6}
    doc[BLOCK] = {
        "verification_status": "verified",
        "attempts": [
            {**good, "timestamp": "9999-12-31T23:59:59+00:00"},  # + interval would overflow
            {**good, "total_tokens_in": MAX_COUNT + 1},  # does not fit the index
            {**good, "total_tokens_in": -5},
            good,
        ],
    }
    rec = parse(doc)
    assert [a.totals is not None for a in rec.attempts] == [False, False, True]
    assert rec.written is not None and rec.written.tokens_in == 5


# Anything at all: parse_run raises RunFileError or returns; what it accepts, we can patch.

_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from([10**299, 1e308, "\ud800", "2025-10-19T10:39:29Z", "9999-12-31"])
)
_json = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` seven times in eight, anything at all otherwise."""
    return st.integers(0, 7).flatmap(lambda i: _leaf if i == 0 else valid)


_timestamps = _mostly(
    st.one_of(
        st.integers(min_value=10**9, max_value=4 * 10**9),
        st.floats(min_value=1e9, max_value=4e9),
        st.sampled_from(["2025-10-19T10:39:29Z", "2025-10-19 10:41:18", "1760870400"]),
    )
)
_counts = _mostly(st.integers(0, 10**6))
_AGGREGATES = ["TOK_IN", "TOK_OUT", "API_CALLS", "CACHED_TOKENS", "AUTR", "AEI", "COST_USD"]


@st.composite
def run_like(draw: st.DrawFn) -> dict[str, Any]:
    """A run file whose every field the parser reads may hold anything."""
    doc: dict[str, Any] = {"run_id": draw(_mostly(st.just("r")))}
    steps = []
    for n in range(draw(st.integers(0, 3))):
        start = draw(_timestamps)
        step = {"step_number": draw(_mostly(st.just(n + 1))), "start_timestamp": start}
        step["end_timestamp"] = draw(st.one_of(st.just(start), _timestamps))
        for key in draw(st.sets(st.sampled_from(["tokens_in", "tokens_out", "api_calls"]))):
            step[key] = draw(_counts)
        steps.append(step)
    if steps or draw(st.booleans()):
        doc["steps"] = steps
    if not steps or draw(st.booleans()):
        doc["start_timestamp"], doc["end_timestamp"] = draw(_timestamps), draw(_timestamps)
    doc["aggregate_metrics"] = draw(st.dictionaries(st.sampled_from(_AGGREGATES), _counts))
    if draw(st.booleans()):
        doc["cost_breakdown"] = draw(
            st.dictionaries(st.sampled_from(["output_cost", "model"]), _leaf)
        )
    if draw(st.booleans()):
        attempt = draw(
            st.dictionaries(
                st.sampled_from(["timestamp", "total_tokens_in", "total_tokens_out", "error"]),
                st.one_of(_counts, st.just(NOW.isoformat())),
            )
        )
        doc[BLOCK] = {
            "verification_status": draw(st.sampled_from(["verified", "pending", "x", None])),
            "attempts": [attempt],
            "provenance": draw(st.one_of(_json, st.just({"tool": "tokensettle"}))),
            "verification_message": draw(_leaf),
        }
    doc.update(draw(st.dictionaries(st.sampled_from(["extra", "model", "x"]), _json)))
    return doc


def _serialised(draw: st.DrawFn, doc: Any) -> bytes:
    text = json.dumps(
        doc, indent=draw(st.sampled_from([None, 2, 4])), ensure_ascii=draw(st.booleans())
    )
    data = text.encode("utf-8", "backslashreplace")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "run", "run", "run", "mutated run"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return _serialised(draw, draw(_json))
    data = _serialised(draw, draw(run_like()))
    if kind == "mutated run" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(min_size=0, max_size=4)) + data[at + 1 :]
    return data


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_bytes(), st.sampled_from(list(Status)))
def test_any_bytes_give_a_record_or_a_run_file_error_and_records_can_be_patched(
    data: bytes, status: Status
) -> None:
    try:
        record = parse_run(data, PATH, "baes", 60)
    except RunFileError as exc:
        message = str(exc)
        record = None
    if record is None:
        assert message and "\n" not in message
        return
    doc = load_document(data)
    out = detect_style(data).dumps(apply_patch(doc, _patch(status), record.steps))
    again = parse_run(out, PATH, "baes", 60)  # what we write, we can read back
    assert again.run_id == record.run_id


# ------------------------------------------------------------------ item 23: secrets


ADMIN_KEY = "sk-admin-FAKEFAKEFAKE0123456789"


def test_the_admin_key_is_redacted_from_everything_we_write() -> None:
    # A usage page whose `model` carried the admin key got it written into run files.
    doc = v1_doc()
    leaked = f"gpt-4o-{ADMIN_KEY}"
    patch = _patch(
        Status.VERIFIED,
        extra_block={
            "attribution": {"models": {leaked: {"input_tokens": 1}}},
            "cost": {"unpriced": {leaked: {"reason": f"unknown model {leaked}"}}},
        },
        cost_breakdown={"model": leaked},
    )
    doc["cost_breakdown"] = {"model": "gpt-4o-mini"}
    out = apply_patch(doc, patch, parse(doc).steps, redact=[ADMIN_KEY])
    data = detect_style(raw(doc)).dumps(out)
    assert ADMIN_KEY.encode() not in data
    block = out[BLOCK]
    assert list(block["attribution"]["models"]) == [f"gpt-4o-{REDACTED}"]
    assert block["cost"]["unpriced"][f"gpt-4o-{REDACTED}"]["reason"].endswith(REDACTED)
    assert out["cost_breakdown"]["model"] == f"gpt-4o-{REDACTED}"
    # Nothing else changed.
    assert redact_secrets(out, []) == out
    unredacted = apply_patch(doc, patch, parse(doc).steps)
    assert redact_secrets(unredacted, [ADMIN_KEY]) == out
    assert ADMIN_KEY in json.dumps(unredacted)


def test_redaction_without_a_secret_in_the_document_changes_nothing() -> None:
    data = raw(v1_doc())
    out = apply_patch(load_document(data), _patch(Status.PENDING), parse(data).steps)
    assert (
        apply_patch(
            load_document(data), _patch(Status.PENDING), parse(data).steps, redact=[ADMIN_KEY, ""]
        )
        == out
    )

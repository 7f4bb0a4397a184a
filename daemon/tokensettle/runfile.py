"""metrics.json: bytes -> RunRecord, and (document, patch) -> bytes. No I/O here.

Two schemas are seen in the field: steps that carry token fields (`tokens_in`, ...) and
steps that must not. Step timestamps are int or float Unix seconds; run-level timestamps
are ISO 8601 strings (or numbers). The window comes from the steps when they have one,
else from the run.

Formatting is kept by re-serialising with the file's own style (indent, separators,
ASCII escaping, trailing newline, a UTF-8 byte-order mark), detected from its bytes; every
fixture in the field round-trips byte-for-byte that way, so a patch changes only the
patched fields. A document that would not survive that (duplicate keys, not UTF-8, nested
or numbered beyond what we can re-serialise, a non-finite number where we compute or
overwrite) is refused at parse time with a one-line `RunFileError`, so nothing downstream
(patching, json.dumps, arithmetic, the index) can crash on it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tokensettle import TOOL_NAME
from tokensettle.compare import LocalCounts, local_counts_from_document
from tokensettle.logs import REDACTED
from tokensettle.stability import AttemptRecord, Status, Totals, Verdict, parse_status
from tokensettle.usage import Usage
from tokensettle.usage_scope import Declaration, ScopeDeclarationError, declaration_from_metrics
from tokensettle.windows import Activity, Interval

BLOCK = "usage_api_reconciliation"
STEP_TOKEN_KEYS: dict[str, str] = {
    "tokens_in": "input_tokens",
    "tokens_out": "output_tokens",
    "api_calls": "num_model_requests",
    "cached_tokens": "cached_tokens",
}
AGGREGATE_TOKEN_KEYS: dict[str, str] = {
    "TOK_IN": "input_tokens",
    "TOK_OUT": "output_tokens",
    "API_CALLS": "num_model_requests",
    "CACHED_TOKENS": "cached_tokens",
}
# Plausible Unix seconds: 2001 .. 2100. Anything else is a unit or type mix-up.
_MIN_TS, _MAX_TS = 1.0e9, 4.1e9
#: Deeper documents are refused: deepcopy and json.dumps recurse (a real run file is ~6 deep).
MAX_DEPTH = 100
#: Longer integer literals are refused: every int we keep then converts to a float and
#: back to text (Python refuses > 4,300 digits; float() overflows past 308).
MAX_INT_DIGITS = 300
#: A count we read (attempt totals, written totals) fits the index's signed 64-bit integer.
MAX_COUNT = 2**63 - 1
UTF8_BOM = b"\xef\xbb\xbf"
#: aggregate_metrics fields we overwrite or compute from; NaN/Infinity there is refused
_NUMERIC_AGGREGATES = (*AGGREGATE_TOKEN_KEYS, "COST_USD", "AUTR", "AEI")


class RunFileError(ValueError):
    """The file cannot be reconciled. `str()` is a one-line reason for logs and `list`."""


@dataclass(frozen=True, slots=True)
class StepInfo:
    index: int
    label: str
    activity: Activity | None
    token_keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunRecord:
    path: Path
    framework: str
    run_id: str
    activity: Activity
    steps: tuple[StepInfo, ...]
    attempts: tuple[AttemptRecord, ...]
    status: Status | None
    ours: bool
    written: Totals | None
    model: str | None
    window_source: str
    message: str | None = None
    #: the framework's own counts, as the file carried them before we wrote ours
    local: LocalCounts = field(default_factory=LocalCounts)
    #: the run's complete cost as we recorded it (None: not settled, or not fully priced)
    cost_usd: float | None = None
    #: the run's own scope (`usage_scope` in the file, or `usage_scope.json` beside it)
    declared: Declaration | None = None
    #: models the recorded cost could not price (the cost is then not complete)
    unpriced: tuple[str, ...] = ()

    @property
    def window(self) -> Interval:
        return self.activity.window

    @property
    def end(self) -> datetime:
        return datetime.fromtimestamp(self.activity.end, UTC)

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(self.activity.start, UTC)

    @property
    def steps_have_tokens(self) -> bool:
        return any(s.token_keys for s in self.steps)


# ---------------------------------------------------------------------------- reading


def _shown(value: object, limit: int = 40) -> str:
    """`repr(value)`, cut short: a reason stays one readable line whatever the file holds."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _timestamp(value: object, what: str) -> float:
    if isinstance(value, bool):
        raise RunFileError(f"{what} is a boolean, expected a timestamp")
    try:
        if isinstance(value, int | float):
            ts = float(value)
        elif isinstance(value, str):
            text = value.strip()
            try:
                ts = float(text)
            except ValueError:
                try:
                    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
                except ValueError:
                    raise RunFileError(
                        f"{what} {_shown(value)} is not ISO 8601 or Unix seconds"
                    ) from None
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=UTC)  # the seed writes naive UTC + 'Z'
                ts = parsed.timestamp()
        else:
            raise RunFileError(f"{what} is {type(value).__name__}, expected a timestamp")
    except (OverflowError, ValueError) as exc:
        if isinstance(exc, RunFileError):
            raise
        ts = math.inf
    if not math.isfinite(ts) or not _MIN_TS <= ts <= _MAX_TS:
        raise RunFileError(f"{what} {_shown(value)} is not a plausible Unix time in seconds")
    return ts


def _refuse_non_finite(value: object, what: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise RunFileError(
            f"{what} is {json.dumps(value)}, which tokensettle would overwrite or compute "
            "from; set it to a number"
        )


def _step_label(step: Mapping[str, Any], index: int) -> str:
    for key in ("step_number", "step"):
        value = step.get(key)
        if isinstance(value, int | str) and not isinstance(value, bool):
            return str(value)
    return str(index + 1)


def _parse_steps(raw_steps: object, grace: int) -> list[StepInfo]:
    if raw_steps is None:
        return []
    if not isinstance(raw_steps, list):
        raise RunFileError(f"'steps' is {type(raw_steps).__name__}, expected a list")
    steps: list[StepInfo] = []
    for i, step in enumerate(raw_steps):
        if not isinstance(step, dict):
            raise RunFileError(f"steps[{i}] is {type(step).__name__}, expected an object")
        label = _step_label(step, i)
        activity = None
        if step.get("start_timestamp") is not None and step.get("end_timestamp") is not None:
            start = _timestamp(step["start_timestamp"], f"steps[{i}].start_timestamp")
            end = _timestamp(step["end_timestamp"], f"steps[{i}].end_timestamp")
            if end < start:
                raise RunFileError(f"steps[{i}] ends before it starts")
            activity = Activity(start, end, grace)
        keys = tuple(k for k in STEP_TOKEN_KEYS if k in step)
        for k in keys:
            v = step[k]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise RunFileError(f"steps[{i}].{k} is {type(v).__name__}, expected a number")
            _refuse_non_finite(v, f"steps[{i}].{k}")
        steps.append(StepInfo(i, label, activity, keys))
    return steps


def _iso(value: object) -> datetime | None:
    """An attempt's ISO time, or None when it is not one (or not a plausible Unix time:
    a year-9999 attempt would overflow the next due time)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        ts = parsed.timestamp()
    except (ValueError, OverflowError):
        return None
    return parsed if _MIN_TS <= ts <= _MAX_TS else None


def _count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_COUNT:
        return value
    return None


def _attempt_record(raw: object) -> AttemptRecord | None:
    if not isinstance(raw, dict):
        return None
    ts = _iso(raw.get("timestamp"))
    if ts is None:
        return None
    error = raw.get("error")
    tin, tout = _count(raw.get("total_tokens_in")), _count(raw.get("total_tokens_out"))
    if error or tin is None or tout is None:
        return AttemptRecord(ts, None, None, str(error or "no totals recorded"))
    totals = Totals(
        tin,
        tout,
        _count(raw.get("total_api_calls")) or 0,
        _count(raw.get("total_cached_tokens")) or 0,
    )
    fp, owners = raw.get("fingerprint"), raw.get("owners")
    return AttemptRecord(
        ts,
        totals,
        fp if isinstance(fp, str) else None,
        None,
        owners if isinstance(owners, str) else None,
    )


def _written_totals(block: Mapping[str, Any]) -> Totals | None:
    """Totals an earlier verification wrote (by us or the seed tool)."""
    if parse_status(block.get("verification_status")) not in (Status.VERIFIED, Status.AMBIGUOUS):
        return None
    attempts = block.get("attempts")
    if not isinstance(attempts, list):
        return None
    for raw in reversed(attempts):
        record = _attempt_record(raw)
        if record is not None and record.totals is not None:
            return record.totals
    return None


def _recorded_cost(block: Mapping[str, Any]) -> float | None:
    cost = block.get("cost")
    if not isinstance(cost, dict) or cost.get("complete") is not True:
        return None
    value = cost.get("total_usd")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text(raw: bytes) -> tuple[str, bool]:
    """The file as text and whether it starts with a UTF-8 byte-order mark (kept on write).
    JSON is UTF-8 (RFC 8259); json.loads would also guess UTF-16/32, which we could not
    write back the same, so those are refused. A NUL byte is never in JSON text but is in
    every UTF-16/32 file of ASCII characters, which are otherwise valid UTF-8."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise RunFileError(
            "file is not UTF-8 text: it looks like UTF-16 or UTF-32; save it as UTF-8"
        )
    bom = raw.startswith(UTF8_BOM)
    body = raw[len(UTF8_BOM) :] if bom else raw
    try:
        return body.decode("utf-8"), bom
    except UnicodeDecodeError as exc:
        raise RunFileError(f"file is not UTF-8 text (byte {exc.start} is not UTF-8)") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise RunFileError(
            f"duplicate key {_shown(dup)} in one object; rewriting would drop one copy, so "
            "the file is left as it is (merge the copies to let tokensettle settle it)"
        )
    return obj


def _bounded_int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise RunFileError(
            f"an integer of {digits:,} digits (more than {MAX_INT_DIGITS}) is not a value "
            "tokensettle can keep"
        )
    return int(literal)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise RunFileError(f"the number {_shown(literal)} is beyond a 64-bit float")
    return value


def _refuse_deep(doc: Any) -> None:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RunFileError(f"JSON nested more than {MAX_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def _recorded_unpriced(block: Mapping[str, Any]) -> tuple[str, ...]:
    cost = block.get("cost")
    unpriced = cost.get("unpriced") if isinstance(cost, dict) else None
    if isinstance(unpriced, dict):
        return tuple(sorted(str(k) for k in unpriced))
    return ()


def load_document(raw: bytes) -> dict[str, Any]:
    """The JSON object of a run file, or RunFileError with a one-line reason for anything
    we could not write back intact."""
    if not raw.strip():
        raise RunFileError("file is empty")
    text, _bom = _text(raw)
    try:
        doc = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        raise RunFileError(f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise RunFileError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(doc, dict):
        raise RunFileError(f"top level is a JSON {type(doc).__name__}, expected an object")
    _refuse_deep(doc)
    return doc


def parse_run(raw: bytes, path: Path, framework: str, grace: int) -> RunRecord:
    """Read one metrics.json. Raises RunFileError with a one-line reason."""
    return run_of_document(load_document(raw), path, framework, grace)


def run_of_document(doc: Mapping[str, Any], path: Path, framework: str, grace: int) -> RunRecord:
    """The record of a document `load_document` returned (it is only read), for a caller
    that needs the document too and should not parse the bytes twice."""
    run_id = doc.get("run_id", path.parent.name)
    if not isinstance(run_id, str) or not run_id:
        raise RunFileError(f"'run_id' is {type(run_id).__name__}, expected a non-empty string")
    for key in ("aggregate_metrics", BLOCK):
        if key in doc and not isinstance(doc[key], dict):
            raise RunFileError(f"'{key}' is {type(doc[key]).__name__}, expected an object")
    for key in _NUMERIC_AGGREGATES:
        _refuse_non_finite(doc.get("aggregate_metrics", {}).get(key), f"aggregate_metrics.{key}")
    breakdown = doc.get("cost_breakdown")
    for key, value in breakdown.items() if isinstance(breakdown, dict) else ():
        _refuse_non_finite(value, f"cost_breakdown.{key}")
    steps = _parse_steps(doc.get("steps"), grace)
    timed = [s.activity for s in steps if s.activity is not None]
    if timed:
        activity = Activity(min(a.start for a in timed), max(a.end for a in timed), grace)
        source = "steps"
    elif doc.get("start_timestamp") is not None and doc.get("end_timestamp") is not None:
        start = _timestamp(doc["start_timestamp"], "start_timestamp")
        end = _timestamp(doc["end_timestamp"], "end_timestamp")
        if end < start:
            raise RunFileError("end_timestamp is before start_timestamp")
        activity = Activity(start, end, grace)
        source = "run"
    else:
        raise RunFileError(
            "no run window: neither steps[].start/end_timestamp nor start/end_timestamp"
        )
    block = doc.get(BLOCK) or {}
    raw_attempts = block.get("attempts", [])
    if not isinstance(raw_attempts, list):
        raise RunFileError(f"'{BLOCK}.attempts' is not a list")
    attempts = tuple(a for a in (_attempt_record(r) for r in raw_attempts) if a is not None)
    provenance = block.get("provenance")
    ours = isinstance(provenance, dict) and provenance.get("tool") == TOOL_NAME
    model = doc.get("model") if isinstance(doc.get("model"), str) else None
    try:
        declared = declaration_from_metrics(doc, source=str(path))
    except ScopeDeclarationError as exc:
        raise RunFileError(str(exc)) from None
    return RunRecord(
        path=path,
        framework=framework,
        run_id=run_id,
        activity=activity,
        steps=tuple(steps),
        attempts=attempts,
        status=parse_status(block.get("verification_status")),
        ours=ours,
        written=_written_totals(block),
        model=model,
        window_source=source,
        message=str(block["verification_message"]) if block.get("verification_message") else None,
        local=local_counts_from_document(doc, tool=TOOL_NAME),
        cost_usd=_recorded_cost(block),
        declared=declared,
        unpriced=_recorded_unpriced(block),
    )


# ---------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class JsonStyle:
    indent: int | str | None = 2
    ensure_ascii: bool = True
    item_sep: str = ","
    key_sep: str = ": "
    trailing_newline: bool = False
    bom: bool = False

    def dumps(self, doc: Any) -> bytes:
        text = json.dumps(
            doc,
            indent=self.indent,
            ensure_ascii=self.ensure_ascii,
            separators=(self.item_sep, self.key_sep),
        )
        text += "\n" if self.trailing_newline else ""
        # A lone surrogate (from a "\\udXXX" escape) cannot be UTF-8: write it back as the
        # same escape instead of failing.
        return (UTF8_BOM if self.bom else b"") + text.encode("utf-8", "backslashreplace")


#: a line that opens with an object key, and the key separator after it
_KEY_LINE = re.compile(r'\n[ \t]*"(?:[^"\\\n]|\\.)*"(: ?)')


def detect_style(raw: bytes, doc: Any = None) -> JsonStyle:
    """The json.dumps arguments that reproduce `raw` (exactly, for any file json.dumps wrote).

    An indented file's style is read off its text alone: JSON escapes every newline inside
    a string, so each newline of the text is structural, every item separator ends a line
    (`", "` leaves a space before it) and a line that opens with a string and a colon opens
    with a key. A compact file (one line) is confirmed by re-serialising `doc` (its parse
    of `raw`; parsed here when not given), since a string may contain ", " or ": "; that is
    one call of the C encoder per candidate. A file nothing reproduces keeps its indent.
    """
    try:
        text, bom = _text(raw)
    except RunFileError:
        return JsonStyle()
    trailing = text.endswith("\n")
    indent: int | str | None = None
    match = re.search(r"\n([ \t]+)\S", text)
    if match:
        ws = match.group(1)
        indent = len(ws) if set(ws) == {" "} else ws
    elif "\n" in text.strip():
        indent = 0
    # ensure_ascii=True never writes a non-ASCII character; on ASCII text it is exact
    ascii_text = text.isascii()
    if indent is not None:
        key = _KEY_LINE.search(text)
        return JsonStyle(
            indent,
            ascii_text,
            ", " if ", \n" in text else ",",
            key.group(1) if key else ": ",
            trailing,
            bom,
        )
    candidates = [
        JsonStyle(None, ascii_text, item_sep, key_sep, trailing, bom)
        for item_sep in (", ", ",")
        for key_sep in (": ", ":")
    ]
    if doc is None:
        try:
            doc = load_document(raw)
        except RunFileError:
            return candidates[0]
    for candidate in candidates:
        if candidate.dumps(doc) == raw:
            return candidate
    return candidates[0]


@dataclass(frozen=True)
class Patch:
    """Everything one attempt changes in a run's file."""

    verdict: Verdict
    attempt: dict[str, Any]
    now: datetime
    provenance: dict[str, Any]
    totals: Usage | None = None
    step_values: Mapping[int, Usage] = field(default_factory=dict)
    extra_block: Mapping[str, Any] = field(default_factory=dict)
    #: None: leave the file's value alone (cost not complete, cached tokens not carried)
    cost_usd: float | None = None
    cost_breakdown: Mapping[str, Any] | None = None
    cached_tokens: int | None = None


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


def _set_count(target: dict[str, Any], key: str, value: int) -> None:
    target[key] = value


def _aei(autr: object, tok_in: int) -> float | None:
    if isinstance(autr, bool) or not isinstance(autr, int | float):
        return None
    return 0.0 if tok_in == 0 else float(autr) / math.log(1 + tok_in)


def redact_secrets(value: Any, secrets: Iterable[str]) -> Any:
    """`value` (a JSON document) with every occurrence of each secret, in any string or
    key, replaced by the marker the logs use. Values without a secret are returned as they
    are, so a document without one comes back equal."""
    found = [s for s in secrets if s]
    if not found:
        return value

    def scrub(node: Any) -> Any:
        if isinstance(node, str):
            for secret in found:
                node = node.replace(secret, REDACTED)
            return node
        if isinstance(node, dict):
            return {scrub(k): scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(value)


def apply_patch(
    doc: Mapping[str, Any],
    patch: Patch,
    steps: Sequence[StepInfo],
    append_attempt: bool = True,
    *,
    redact: Iterable[str] = (),
) -> dict[str, Any]:
    """A patched deep copy of `doc`. Token fields change only for verified/ambiguous.
    `redact`: secrets (the admin key) that must appear nowhere in what we write, wherever
    they came from (a usage page's `model`, say)."""
    out: dict[str, Any] = copy.deepcopy(dict(doc))
    verdict = patch.verdict
    block: dict[str, Any] = out.get(BLOCK) if isinstance(out.get(BLOCK), dict) else {}  # type: ignore[assignment]
    out[BLOCK] = block
    attempts = block.get("attempts")
    if not isinstance(attempts, list):
        attempts = []
    if append_attempt:
        attempts.append(patch.attempt)
    block["verification_status"] = verdict.status.value
    block["verification_message"] = verdict.message
    block["attempts"] = attempts
    block["status"] = verdict.status.value
    block["reconciled_at"] = iso(patch.now)
    block["next_poll_at"] = iso(verdict.next_due) if verdict.next_due else None
    if verdict.verified_at is not None:
        block["verified_at"] = iso(verdict.verified_at)
    old_provenance = block.get("provenance")
    block["provenance"] = {
        **(old_provenance if isinstance(old_provenance, dict) else {}),
        **patch.provenance,
    }
    for key, value in patch.extra_block.items():
        block[key] = value

    if verdict.writes_tokens and patch.totals is not None:
        totals = patch.totals
        block["total_tokens_in"] = totals.input_tokens
        block["total_tokens_out"] = totals.output_tokens
        # A provider that counts no requests (Anthropic) leaves every API call count as
        # the run wrote it: 0 would be a number nobody measured.
        counted = totals.requests_counted
        block["total_api_calls"] = totals.num_model_requests if counted else None
        block["total_cached_tokens"] = totals.cached_tokens
        agg = out.get("aggregate_metrics")
        if not isinstance(agg, dict):
            agg = {}
            out["aggregate_metrics"] = agg
        for key, attr in AGGREGATE_TOKEN_KEYS.items():
            if key == "CACHED_TOKENS":
                if patch.cached_tokens is not None:
                    _set_count(agg, key, patch.cached_tokens)
                continue
            if key == "API_CALLS" and not counted:
                continue
            _set_count(agg, key, getattr(totals, attr))
        if patch.cost_usd is not None and "COST_USD" in agg:
            agg["COST_USD"] = patch.cost_usd
        breakdown = out.get("cost_breakdown")
        if patch.cost_breakdown is not None and isinstance(breakdown, dict):
            breakdown.update(patch.cost_breakdown)
        aei = _aei(agg.get("AUTR"), totals.input_tokens)
        if aei is not None:
            agg["AEI"] = aei
        updated: list[str] = []
        raw_steps = out.get("steps")
        if isinstance(raw_steps, list):
            for step in steps:
                if not step.token_keys:
                    continue
                value = patch.step_values.get(step.index, Usage())
                target = raw_steps[step.index]
                for key in step.token_keys:
                    if key == "api_calls" and not counted:
                        continue
                    _set_count(target, key, getattr(value, STEP_TOKEN_KEYS[key]))
                updated.append(step.label)
        block["steps_updated"] = updated
    if "verification_status" in out:
        out["verification_status"] = verdict.status.value
    return redact_secrets(out, redact)  # type: ignore[no-any-return]

"""Human and JSON renderings of `list` and `reconcile` results. Pure: strings in, out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tokensettle.durations import human_duration
from tokensettle.reconcile import BatchReport, RunOutcome
from tokensettle.runfile import iso


def next_poll(o: RunOutcome, now: datetime) -> str:
    if o.next_due is None:
        return "-"
    return "due" if o.next_due <= now else human_duration(o.next_due - now)


def _tokens(o: RunOutcome) -> str:
    if o.totals is None:
        return "-"
    return f"{o.totals.input_tokens:,} in / {o.totals.output_tokens:,} out"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def counts_line(outcomes: Sequence[RunOutcome]) -> str:
    counts = Counter(o.state for o in outcomes)
    if not counts:
        return "no runs"
    return ", ".join(
        f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def outcome_json(o: RunOutcome, now: datetime) -> dict[str, Any]:
    age = o.age(now)
    return {
        "framework": o.framework,
        # An unreadable file has no run id of its own: its directory's, as the report has.
        "run_id": o.run_id or o.path.parent.name,
        "path": str(o.path),
        "status": o.state,
        "message": o.message,
        "attempts": o.attempts,
        "age_seconds": int(age.total_seconds()) if age is not None else None,
        "run_end": iso(o.run_end) if o.run_end else None,
        "next_due": iso(o.next_due) if o.next_due else None,
        "polled": o.polled,
        "written": o.written,
        "write_error": o.write_error,
        "totals": o.totals.present() if o.totals is not None else None,
        "apportioned_fraction": round(o.apportioned_fraction, 6),
        "cost_usd": o.cost_usd,
    }


def report_json(report: BatchReport, now: datetime) -> dict[str, Any]:
    return {
        "at": iso(now),
        "dry_run": report.dry_run,
        "requests": report.requests,
        "windows": [
            {"start": i.start, "end": i.end, "minutes": i.minutes} for i in report.intervals
        ],
        "auth_error": report.auth_error,
        "counts": report.counts(),
        "runs": [outcome_json(o, now) for o in report.outcomes],
    }


def _detail(o: RunOutcome) -> str:
    """A failed write first: the status shown is what the attempt decided, not the file."""
    if o.write_error is None:
        return o.message
    return f"write failed, file unchanged: {o.write_error}"


def report_human(report: BatchReport, now: datetime) -> str:
    polled = [o for o in report.outcomes if o.polled]
    head = (
        f"{'[dry run] ' if report.dry_run else ''}polled {len(polled)} run(s) with "
        f"{report.requests} API request(s) over {len(report.intervals)} window(s)"
    )
    lines = [head]
    shown = [o for o in report.outcomes if o.polled or o.state in ("error", "skipped", "expired")]
    if shown:
        rows = [
            [o.framework, o.run_id or o.path.parent.name, o.state, _tokens(o), _detail(o)]
            for o in sorted(shown, key=lambda o: (o.framework, o.run_id or ""))
        ]
        lines += ["", table(["FRAMEWORK", "RUN", "STATUS", "TOKENS", "DETAIL"], rows)]
    lines += ["", f"summary: {counts_line(report.outcomes)}"]
    unwritten = sum(1 for o in report.outcomes if o.write_error is not None)
    if unwritten:
        lines.append(f"{unwritten} write(s) failed: those files are unchanged (exit 1)")
    if report.auth_error:
        lines.append(f"authentication failed, nothing was written: {report.auth_error}")
    return "\n".join(lines)


def list_human(outcomes: Sequence[RunOutcome], now: datetime) -> str:
    if not outcomes:
        return "no runs to show (use --all to include settled runs)"
    rows = [
        [
            o.framework,
            o.run_id or o.path.parent.name,
            human_duration(o.age(now)),
            o.state,
            str(o.attempts),
            next_poll(o, now),
            o.message,
        ]
        for o in sorted(outcomes, key=lambda o: (o.framework, o.run_end or now))
    ]
    body = table(["FRAMEWORK", "RUN", "AGE", "STATUS", "ATTEMPTS", "NEXT", "DETAIL"], rows)
    return f"{body}\n\nsummary: {counts_line(outcomes)}"

"""Run files -> `RunSummary` for the reports: the only I/O behind `tokensettle report`.

Files are read by `reconcile.load_runs`, the reader `list` and `reconcile` use (the same
safety checks, the same reasons), so a file `list` shows as `error` or `skipped` is shown
so in the report too, never as `pending`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from tokensettle.discovery import Found
from tokensettle.reconcile import load_runs
from tokensettle.summary import RunSummary, summary_of_record, unreadable


def read_summaries(
    found: Iterable[Found], *, grace: int, now: datetime, max_age: timedelta
) -> list[RunSummary]:
    out: list[RunSummary] = []
    for loaded in load_runs(found, grace):
        item = loaded.found
        if loaded.record is None or loaded.snapshot is None:
            out.append(
                unreadable(
                    item.framework,
                    item.path.parent.name,
                    loaded.error or "",
                    skipped=item.skip_reason is not None,
                )
            )
            continue
        out.append(summary_of_record(loaded.record, loaded.snapshot.raw, now=now, max_age=max_age))
    return out

"""Run files -> `RunSummary` for the reports: the only I/O behind `tokensettle report`.

Reads each file found as `list` does (the same safety checks, the same reasons), so a file
`list` shows as `error` or `skipped` is shown so in the report too, never as `pending`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from tokensettle.atomic import UnsafeFileError, check_inside, read_snapshot
from tokensettle.discovery import Found
from tokensettle.summary import RunSummary, summary_of_file, unreadable


def read_summary(item: Found, *, grace: int, now: datetime, max_age: timedelta) -> RunSummary:
    run_dir = item.path.parent.name
    if item.skip_reason is not None:
        return unreadable(item.framework, run_dir, item.skip_reason, skipped=True)
    try:
        check_inside(item.path, item.root)
        raw = read_snapshot(item.path).raw
    except UnsafeFileError as exc:
        return unreadable(item.framework, run_dir, exc.strerror or str(exc))
    except OSError as exc:
        return unreadable(item.framework, run_dir, f"cannot read: {exc.strerror or exc}")
    return summary_of_file(raw, item.path, item.framework, grace=grace, now=now, max_age=max_age)


def read_summaries(
    found: Iterable[Found], *, grace: int, now: datetime, max_age: timedelta
) -> list[RunSummary]:
    return [read_summary(f, grace=grace, now=now, max_age=max_age) for f in found]

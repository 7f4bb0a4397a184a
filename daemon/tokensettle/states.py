"""The state a run is shown in, by every command and view: one rule, so `list`, `report`,
`/runs` and the HTML report always agree.

Beyond the statuses a file records (`stability.Status`), a run can be `too_old` (never
settled and past `MAX_AGE`), `skipped` (discovery refused it: a symlink, a FIFO, ...) or
`not_due` (within one invocation: waiting for its next poll).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from tokensettle.runfile import RunRecord
from tokensettle.stability import TERMINAL, Status

NOT_DUE = "not_due"
TOO_OLD = "too_old"
SKIPPED = "skipped"
#: Shown states of a run that is still to settle (`too_old`: past MAX_AGE yet not expired)
WAITING = frozenset(
    {Status.PENDING.value, Status.DATA_NOT_AVAILABLE.value, Status.WARNING.value, TOO_OLD}
)


def shown_state(record: RunRecord, now: datetime, max_age: timedelta) -> str:
    """The file's status, or `too_old` for an unsettled run past `max_age`."""
    status = record.status or Status.PENDING
    if status not in TERMINAL and now >= record.end + max_age:
        return TOO_OLD
    return status.value

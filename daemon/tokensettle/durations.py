"""Durations with units: `90s`, `30m`, `24h`, `2d`. A bare number is refused, because a
silent unit guess is how a 30-minute wait becomes a 30-second one."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Literal

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")


def parse_duration(value: object) -> timedelta:
    """`90s`, `30m`, `24h`, `2d` -> timedelta. Bare numbers are refused."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a duration such as '30m', got {type(value).__name__}")
    text = str(value)
    match = _DURATION_RE.match(text)
    if match is None:
        if re.fullmatch(r"\s*\d+(\.\d+)?\s*", text):
            raise ValueError(
                f"'{text.strip()}' needs a unit: s, m, h or d (e.g. '{text.strip()}m')"
            )
        raise ValueError(f"'{text}' is not a duration; use a number and a unit, e.g. 90s, 30m, 24h")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:  # beyond timedelta's 999,999,999 days
        raise ValueError(f"'{text.strip()}' is too long to be a duration") from None


def parse_cli_duration(value: str, bare_unit: Literal["m", "h"]) -> timedelta:
    """Command-line `--min-age` / `--max-age`: a bare number means minutes / hours, as in
    the reconcile script users know; a number with a unit is taken as written."""
    if re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        return parse_duration(f"{value.strip()}{bare_unit}")
    return parse_duration(value)


def format_duration(td: timedelta) -> str:
    seconds = int(td.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def human_duration(td: timedelta | None) -> str:
    """A short reading form: 45s, 12m30s, 3h05m, 2d04h; `-` for none."""
    if td is None:
        return "-"
    seconds = round(td.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds}s"
    if seconds < 3600:
        return f"{sign}{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{sign}{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{sign}{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"

"""`tokensettle bill [--days N] [--project P]... [--json]`: the bill beside our prices.

For each of the last N complete UTC days (today, still being billed, is left out) and each
project: the costs OpenAI bills (`GET /organization/costs`) beside the same day's
completions usage priced by tokensettle, per model, with the difference in USD and percent
and a verdict against `BILL_TOLERANCE` (`tokensettle.bill` says how).

Exit codes: 0 every day within tolerance; 1 a day out of tolerance or incomplete (usage
we cannot price), or a request that kept failing; 2 a bad flag or setting, or no admin
key; 3 the admin key was refused or lacks `api.usage.read` (the scope the costs endpoint
needs, as the usage endpoints do). Errors are one line on stderr, never a traceback.

The top-level CLI needs two lines: `bill_cli.add_arguments(sub.add_parser("bill", help=...))`
in its parser and `return bill_cli.main(args)` for `args.command == "bill"`.
`python -m tokensettle.bill_cli ...` runs the same thing on its own. `check_for_report`
is the hook for a section of `tokensettle report`.

Like `cli`, it imports what it runs when it runs: building the parser loads neither the
settings model nor aiohttp nor the price table.
"""

# Imports inside the functions are the point (see above).
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tokensettle.errors import EXIT_AUTH, EXIT_OK, EXIT_RUNS_FAILED, EXIT_USAGE, ConfigError

if TYPE_CHECKING:
    from tokensettle.bill import BillCheck, BillUnavailable
    from tokensettle.config import Settings

__all__ = [
    "DEFAULT_DAYS",
    "MAX_DAYS",
    "add_arguments",
    "build_parser",
    "check_for_report",
    "days_window",
    "main",
    "run_check",
]

DEFAULT_DAYS: Final = 7
#: A guard against a typo, not a limit of the API (which pages on).
MAX_DAYS: Final = 366
SCOPE_HINT: Final = "the costs endpoint needs an admin key with the api.usage.read scope"
DESCRIPTION: Final = (
    "Per UTC day and project, the costs OpenAI bills beside the same completions usage "
    "priced by tokensettle, with the difference and a verdict against BILL_TOLERANCE."
)


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--days takes a whole number, got {text!r}") from None
    if not 1 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"--days must be between 1 and {MAX_DAYS}, got {days}")
    return days


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `bill`, on the parser of the command."""
    parser.add_argument("--config", type=Path, help="TOML config file (also TOKENSETTLE_CONFIG)")
    parser.add_argument(
        "--days",
        type=_days,
        default=DEFAULT_DAYS,
        metavar="N",
        help=f"check the last N complete UTC days (default {DEFAULT_DAYS})",
    )
    parser.add_argument(
        "--project",
        dest="projects",
        action="append",
        default=[],
        metavar="P",
        help="only this project id (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensettle bill", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def days_window(days: int, now: datetime) -> tuple[date, date]:
    """The last `days` complete UTC days before `now`: `[start, end)`, end = today."""
    end = now.astimezone(UTC).date()
    return end - timedelta(days=days), end


async def run_check(
    settings: Settings,
    *,
    days: int = DEFAULT_DAYS,
    projects: Sequence[str] = (),
    now: datetime | None = None,
) -> BillCheck:
    """Fetch both sides and compare. Raises ConfigError (no admin key) or UsageApiError."""
    import aiohttp

    from tokensettle.bill import compare
    from tokensettle.billing_api import fetch_bill_data
    from tokensettle.usage_api import client_for

    now = now or datetime.now(UTC)
    start, end = days_window(days, now)
    async with aiohttp.ClientSession() as session:
        # the client every command uses: timeouts, retries and rate limit from the settings
        data = await fetch_bill_data(client_for(settings, session), start, end, projects)
    return compare(
        data.costs,
        data.usage,
        start=start,
        end=end,
        tolerance=settings.bill_tolerance,
        projects=projects,
        generated_at=now,
    )


def check_for_report(
    settings: Settings,
    *,
    days: int = DEFAULT_DAYS,
    projects: Sequence[str] = (),
    now: datetime | None = None,
) -> BillCheck | BillUnavailable:
    """The bill check for a section of `tokensettle report` (`bill.report_section`): never
    raises for a missing key or a failed request, which the section then names."""
    from tokensettle.bill import BillUnavailable
    from tokensettle.usage_api import AuthError, UsageApiError

    try:
        import asyncio  # here: building the parser of every command needs none

        return asyncio.run(run_check(settings, days=days, projects=projects, now=now))
    except ConfigError as exc:
        return BillUnavailable(str(exc))
    except AuthError as exc:
        return BillUnavailable(f"{exc}; {SCOPE_HINT}")
    except UsageApiError as exc:
        return BillUnavailable(str(exc))


def main(args: argparse.Namespace) -> int:
    """Run `bill` with parsed arguments; the exit code (module docstring)."""
    from tokensettle.bill import render_json, render_table
    from tokensettle.config import load_settings
    from tokensettle.logs import configure, fatal
    from tokensettle.usage_api import AuthError, UsageApiError

    try:
        settings = load_settings({}, config_file=args.config)
    except ConfigError as exc:
        fatal(f"config error: {exc}", event="config.invalid")
        return EXIT_USAGE
    configure(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    try:
        import asyncio  # here, as above

        check = asyncio.run(run_check(settings, days=args.days, projects=args.projects))
    except ConfigError as exc:
        fatal(f"config error: {exc}", event="config.invalid")
        return EXIT_USAGE
    except AuthError as exc:
        fatal(f"bill: {exc}; {SCOPE_HINT}", event="bill.auth_failed")
        return EXIT_AUTH
    except UsageApiError as exc:
        fatal(f"bill: {exc}", event="bill.failed")
        return EXIT_RUNS_FAILED
    sys.stdout.write(render_json(check) if args.json else render_table(check))
    return EXIT_OK if check.passed else EXIT_RUNS_FAILED


def run(argv: Sequence[str] | None = None) -> int:
    """`python -m tokensettle.bill_cli`: parse, run, and the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(run())

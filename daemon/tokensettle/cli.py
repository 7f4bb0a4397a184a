"""Command line: `run`, `list`, `reconcile`, `report`, `reprice`, `doctor`, `simulate`, `demo`.

Exit codes (stable, scripts rely on them): 0 ok, 1 some runs failed, 2 usage or config
error, 3 authentication or scope error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from tokensettle import __version__
from tokensettle.config import ConfigError, Settings, load_settings
from tokensettle.daemon import run_daemon
from tokensettle.demo import run_demo
from tokensettle.discovery import Found, scan_all
from tokensettle.doctor import exit_code as doctor_exit_code
from tokensettle.doctor import render as render_checks
from tokensettle.doctor import run_checks
from tokensettle.durations import parse_cli_duration
from tokensettle.logs import configure
from tokensettle.reconcile import Reconciler, Selection
from tokensettle.render import list_human, outcome_json, report_human, report_json, table
from tokensettle.report import FORMATS as REPORT_FORMATS
from tokensettle.report import figure_files
from tokensettle.report import render as render_report
from tokensettle.report_files import read_summaries
from tokensettle.reprice import reprice_runs
from tokensettle.simulator.server import run_simulator_cli
from tokensettle.usage_api import RetryPolicy, UsageClient

EXIT_OK, EXIT_RUNS_FAILED, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 3


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _common() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML config file (also TOKENSETTLE_CONFIG)")
    common.add_argument(
        "--runs-dir",
        dest="runs_dirs",
        action="append",
        type=Path,
        help="a root to search for runs/<framework>/<run_id>/metrics.json (repeatable)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="tokensettle", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"tokensettle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("run", parents=[common], help="the daemon: watch, wait, poll, write")

    p_list = sub.add_parser("list", parents=[common], help="show pending runs")
    p_list.add_argument("framework", nargs="?")
    p_list.add_argument("--all", action="store_true", help="include settled runs")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")

    p_rec = sub.add_parser("reconcile", parents=[common], help="one attempt for every due run")
    p_rec.add_argument("framework", nargs="?")
    p_rec.add_argument("run_id", nargs="?")
    p_rec.add_argument(
        "--force", action="store_true", help="poll selected runs now, whatever their status or age"
    )
    p_rec.add_argument(
        "--min-age", help="first poll this long after a run ends (bare number: minutes)"
    )
    p_rec.add_argument("--max-age", help="give up this long after a run ends (bare number: hours)")
    p_rec.add_argument("--dry-run", action="store_true", help="poll and decide, but write nothing")
    p_rec.add_argument("--json", action="store_true", help="machine-readable output")

    p_rep = sub.add_parser("report", parents=[common], help="tokens, cost and checks per run")
    p_rep.add_argument("framework", nargs="?")
    p_rep.add_argument("--format", choices=REPORT_FORMATS, default="table")
    p_rep.add_argument("--out", type=Path, help="write to this file instead of stdout")
    p_rep.add_argument(
        "--include-ambiguous",
        action="store_true",
        help="count ambiguous runs (partly apportioned tokens) in the statistics",
    )
    p_rep.add_argument("--figures", type=Path, metavar="DIR", help="write each chart as DIR/*.svg")

    p_price = sub.add_parser("reprice", parents=[common], help="price settled runs again")
    p_price.add_argument("framework", nargs="?")
    p_price.add_argument("--dry-run", action="store_true", help="show the differences only")
    p_price.add_argument("--model", help="price runs that record no model as this model")

    sub.add_parser("doctor", parents=[common], help="check the configuration and the machine")

    p_sim = sub.add_parser("simulate", help="serve the built-in Usage API simulator")
    p_sim.add_argument("--host", default="127.0.0.1")
    p_sim.add_argument("--port", type=int, default=8787)
    p_sim.add_argument("--scenario", type=Path, help="scenario JSON file")

    sub.add_parser("demo", help="the whole story on the simulator, in about 20 seconds")
    return parser


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides: dict[str, Any] = {"runs_dirs": getattr(args, "runs_dirs", None), **extra}
    return load_settings(overrides, config_file=getattr(args, "config", None))


def _client(
    settings: Settings, session: aiohttp.ClientSession, *, quick: bool = False
) -> UsageClient:
    """The Usage API client; `quick` (doctor) tries twice with a short timeout."""
    key = settings.secret_key()
    if not key:
        raise ConfigError(
            "admin_key: not set; export TOKENSETTLE_ADMIN_KEY (or OPENAI_ADMIN_KEY / "
            "OPENAI_API_KEY_USAGE_TRACKING) with an admin key that has api.usage.read"
        )
    return UsageClient(
        base_url=settings.api_base_url,
        admin_key=key,
        session=session,
        rate_limit_per_min=settings.rate_limit_per_min,
        request_timeout=10.0 if quick else settings.request_timeout.total_seconds(),
        retry=RetryPolicy(attempts=2) if quick else RetryPolicy(attempts=settings.request_attempts),
    )


def _emit(text: str) -> None:
    sys.stdout.write(text + "\n")


async def _reconcile(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.min_age is not None:
        extra["min_age"] = parse_cli_duration(args.min_age, "m")
    if args.max_age is not None:
        extra["max_age"] = parse_cli_duration(args.max_age, "h")
    settings = _settings(args, **extra)
    configure(
        level=settings.log_level, fmt=settings.log_format, secrets=[settings.secret_key() or ""]
    )
    async with aiohttp.ClientSession() as session:
        reconciler = Reconciler(settings, _client(settings, session))
        selection = Selection(args.framework, args.run_id, args.force)
        report = await reconciler.run_once(selection, dry_run=args.dry_run)
    now = reconciler.clock()
    _emit(
        json.dumps(report_json(report, now), indent=2) if args.json else report_human(report, now)
    )
    if report.auth_error:
        return EXIT_AUTH
    return EXIT_RUNS_FAILED if report.failed else EXIT_OK


def _list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure(
        level=settings.log_level, fmt=settings.log_format, secrets=[settings.secret_key() or ""]
    )
    reconciler = Reconciler(settings, None)
    outcomes = reconciler.list_runs(Selection(args.framework), settled=args.all)
    now = datetime.now(UTC)
    if args.json:
        _emit(
            json.dumps(
                {"at": now.isoformat(), "runs": [outcome_json(o, now) for o in outcomes]}, indent=2
            )
        )
    else:
        _emit(list_human(outcomes, now))
    return EXIT_OK


def _found(settings: Settings, framework: str | None) -> list[Found]:
    return [f for f in scan_all(list(settings.runs_dirs)) if framework in (None, f.framework)]


def _report(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure(level=settings.log_level, fmt=settings.log_format)
    now = datetime.now(UTC)
    summaries = read_summaries(
        _found(settings, args.framework),
        grace=int(settings.window_grace.total_seconds()),
        now=now,
        max_age=settings.max_age,
    )
    text = render_report(
        summaries, args.format, generated_at=now, include_ambiguous=args.include_ambiguous
    )
    try:
        if args.figures is not None:
            args.figures.mkdir(parents=True, exist_ok=True)
            files = figure_files(summaries, include_ambiguous=args.include_ambiguous)
            for name, svg in files.items():
                (args.figures / name).write_text(svg + "\n", encoding="utf-8")
            sys.stderr.write(f"wrote {len(files)} figures to {args.figures}\n")
        if args.out is not None:
            args.out.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
            sys.stderr.write(f"wrote {args.out} ({len(summaries)} runs)\n")
    except OSError as exc:
        where = exc.filename or args.out or args.figures
        sys.stderr.write(f"tokensettle: cannot write {where}: {exc.strerror or exc}\n")
        return EXIT_USAGE
    if args.out is None:
        _emit(text.rstrip("\n"))
    return EXIT_OK


def _reprice(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure(level=settings.log_level, fmt=settings.log_format)
    grace = int(settings.window_grace.total_seconds())
    found = _found(settings, args.framework)
    results = reprice_runs(found, grace, dry_run=args.dry_run, assume_model=args.model)

    def usd(value: Decimal | None) -> str:
        return "-" if value is None else f"${value:.6f}"

    rows = [
        [
            r.framework,
            r.run_id,
            usd(r.old_usd),
            usd(r.new_usd),
            usd(r.new_usd - (r.old_usd or Decimal(0))) if r.new_usd is not None else "-",
            "written" if r.written else ("would write" if r.changed else "unchanged"),
            r.note or r.basis,
        ]
        for r in results
    ]
    head = ["FRAMEWORK", "RUN", "OLD", "NEW", "DIFF", "ACTION", "BASIS"]
    _emit(table(head, rows) if rows else "no settled runs to price")
    changed = sum(1 for r in results if r.changed)
    verb = "would change" if args.dry_run else "changed"
    unpriced = sum(1 for r in results if r.new_usd is None)
    _emit(f"\n{len(results)} settled run(s); {verb} {changed}; unpriced {unpriced}")
    return EXIT_OK


async def _doctor(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure(level="error", fmt=settings.log_format)
    async with aiohttp.ClientSession() as session:
        key = settings.secret_key()
        client = _client(settings, session, quick=True) if key else None
        checks = await run_checks(settings, client)
    _emit(render_checks(checks))
    return doctor_exit_code(checks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "run":
            return run_daemon({"runs_dirs": args.runs_dirs}, args.config)
        if args.command == "list":
            return _list(args)
        if args.command == "reconcile":
            return asyncio.run(_reconcile(args))
        if args.command == "report":
            return _report(args)
        if args.command == "reprice":
            return _reprice(args)
        if args.command == "doctor":
            return asyncio.run(_doctor(args))
        if args.command == "simulate":
            return run_simulator_cli(args.host, args.port, args.scenario)
        if args.command == "demo":
            return run_demo()
    except UsageError as exc:
        sys.stderr.write(f"tokensettle: {exc}\n")
        return EXIT_USAGE
    except ConfigError as exc:
        sys.stderr.write(f"tokensettle: config error: {exc}\n")
        return EXIT_USAGE
    except ValueError as exc:  # e.g. a bad --min-age
        sys.stderr.write(f"tokensettle: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE

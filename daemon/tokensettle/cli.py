"""Command line: `run`, `list`, `reconcile`, `report`, `reprice`, `doctor`, `simulate`, `demo`.

Exit codes (stable, scripts rely on them; README "Exit codes" has them per command):
0 ok, 1 some runs failed (or a run asked for does not exist), 2 usage or config error,
3 authentication or scope error. A user's mistake is one line naming the setting or path,
never a traceback.

Each command imports what it needs when it runs: the daemon, the HTTP client, the
simulator and the settings model are not loaded for `--version` or a usage error.
"""

# Imports inside the commands are the point: each command loads only what it runs.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tokensettle import __version__
from tokensettle.errors import (
    EXIT_AUTH,
    EXIT_OK,
    EXIT_RUNS_FAILED,
    EXIT_USAGE,
    CommandError,
    ConfigError,
)

if TYPE_CHECKING:
    import aiohttp

    from tokensettle.config import Settings
    from tokensettle.discovery import Found
    from tokensettle.reconcile import Loaded, Selection
    from tokensettle.usage_api import UsageClient

__all__ = ["EXIT_AUTH", "EXIT_OK", "EXIT_RUNS_FAILED", "EXIT_USAGE", "build_parser", "main"]

#: As a shell reports a command stopped by Ctrl-C or by a closed pipe (`| head`).
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _duration(unit: Literal["m", "h"]) -> Callable[[str], timedelta]:
    """An argparse type: a duration, a bare number in `unit` (the script users know)."""

    def parse(text: str) -> timedelta:
        from tokensettle.durations import parse_cli_duration

        try:
            return parse_cli_duration(text, unit)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


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
        "--min-age",
        type=_duration("m"),
        help="first poll this long after a run ends (bare number: minutes)",
    )
    p_rec.add_argument(
        "--max-age",
        type=_duration("h"),
        help="give up this long after a run ends (bare number: hours)",
    )
    p_rec.add_argument("--dry-run", action="store_true", help="poll and decide, but write nothing")
    p_rec.add_argument("--json", action="store_true", help="machine-readable output")

    p_rep = sub.add_parser("report", parents=[common], help="tokens, cost and checks per run")
    p_rep.add_argument("framework", nargs="?")
    p_rep.add_argument(
        "--format",
        choices=["table", "csv", "json", "html", "markdown", "latex"],
        default="table",
    )
    p_rep.add_argument("--out", type=Path, help="write to this file instead of stdout")
    p_rep.add_argument(
        "--include-ambiguous",
        action="store_true",
        help="count ambiguous runs (partly apportioned tokens) in the statistics",
    )
    p_rep.add_argument("--figures", type=Path, metavar="DIR", help="write each chart as DIR/*.svg")
    p_rep.add_argument(
        "--bill",
        nargs="?",
        const=7,
        type=int,
        metavar="DAYS",
        help="add the bill check of the last DAYS complete UTC days (default 7; table, "
        "markdown, html, json)",
    )

    p_price = sub.add_parser("reprice", parents=[common], help="price settled runs again")
    p_price.add_argument("framework", nargs="?")
    p_price.add_argument("--dry-run", action="store_true", help="show the differences only")
    p_price.add_argument("--model", help="price runs that record no model as this model")

    sub.add_parser("doctor", parents=[common], help="check the configuration and the machine")

    from tokensettle.simulator import cli as simulator_cli

    simulator_cli.add_arguments(
        sub.add_parser("simulate", help="serve the built-in Usage API simulator")
    )

    from tokensettle.bill_cli import add_arguments as bill_arguments
    from tokensettle.lease_args import add_arguments as lease_arguments

    lease_arguments(sub)
    bill_arguments(sub.add_parser("bill", help="what OpenAI bills beside our prices, per day"))

    sub.add_parser("demo", help="the whole story on the simulator, in about 20 seconds")
    return parser


# ------------------------------------------------------------------------------ shared


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    from tokensettle.config import load_settings

    overrides: dict[str, Any] = {"runs_dirs": getattr(args, "runs_dirs", None), **extra}
    return load_settings(overrides, config_file=getattr(args, "config", None))


def _readable_roots(settings: Settings) -> None:
    """Every root must be a directory we can read: a mistyped path is exit 2, not an
    empty list."""
    from tokensettle.config import roots_problem

    problem = roots_problem(list(settings.runs_dirs))
    if problem is not None:
        raise CommandError(str(problem), EXIT_USAGE)


def _logs(settings: Settings, *, level: str | None = None) -> None:
    from tokensettle.logs import configure

    configure(
        level=level or settings.log_level,
        fmt=settings.log_format,
        secrets=settings.secrets(),
    )


def _client(
    settings: Settings, session: aiohttp.ClientSession, *, quick: bool = False
) -> UsageClient:
    from tokensettle.usage_api import client_for

    return client_for(settings, session, quick=quick)


def _emit(text: str) -> None:
    sys.stdout.write(text + "\n")


def no_such_run(
    framework: str, run_id: str | None, runs: Iterable[tuple[str, str]], roots: Sequence[Path]
) -> CommandError:
    """Exit 1: what was asked for, and what there is (`runs`: framework, run directory)."""
    from tokensettle.config import closest

    runs = list(runs)
    known = sorted({fw for fw, _ in runs})
    where = ", ".join(str(r) for r in roots)
    if run_id is not None and framework in known:
        guess = closest(run_id, (run for fw, run in runs if fw == framework))
        hint = f"; did you mean {guess}?" if guess else ""
        tail = f"framework {framework} has no run {run_id} under {where}{hint}"
        return CommandError(f"no such run: {framework}/{run_id} ({tail})", EXIT_RUNS_FAILED)
    guess = closest(framework, known)
    hint = f"did you mean {guess}? " if guess else ""
    tail = f"{hint}frameworks under {where}: {', '.join(known) or 'none'}"
    asked = f"{framework}/{run_id}" if run_id else f"framework {framework}"
    return CommandError(f"no such run: {asked} ({tail})", EXIT_RUNS_FAILED)


def _runs(found: Iterable[Found]) -> list[tuple[str, str]]:
    return [(f.framework, f.path.parent.name) for f in found]


def _scan(settings: Settings) -> list[Found]:
    from tokensettle.discovery import scan_all

    return scan_all(list(settings.runs_dirs))


def _require_selected(settings: Settings, loaded: Sequence[Loaded], selection: Selection) -> None:
    if selection.framework is None:
        return
    for entry in loaded:
        run_id = entry.record.run_id if entry.record is not None else None
        if selection.wants(entry.found.framework, run_id, entry.found.path):
            return
    raise no_such_run(
        selection.framework,
        selection.run_id,
        _runs(e.found for e in loaded),
        list(settings.runs_dirs),
    )


def _found(settings: Settings, framework: str | None) -> list[Found]:
    """The run files of `framework` (all when None); exit 1 when it has none."""
    found = _scan(settings)
    chosen = [f for f in found if framework in (None, f.framework)]
    if framework is not None and not chosen:
        raise no_such_run(framework, None, _runs(found), settings.runs_dirs)
    return chosen


# ------------------------------------------------------------------------------ commands


def _run(args: argparse.Namespace) -> int:
    from tokensettle.daemon import run_daemon

    return run_daemon({"runs_dirs": args.runs_dirs}, args.config)


def _list(args: argparse.Namespace) -> int:
    from tokensettle.reconcile import Reconciler, Selection, describe
    from tokensettle.render import list_human, outcome_json

    settings = _settings(args)
    _readable_roots(settings)
    _logs(settings)
    reconciler = Reconciler(settings, None)
    selection = Selection(args.framework)
    loaded = reconciler.survey()
    _require_selected(settings, loaded, selection)
    now = reconciler.clock()
    outcomes = describe(loaded, selection, reconciler.policy, now, settled=args.all)
    if args.json:
        runs = [outcome_json(o, now) for o in outcomes]
        _emit(json.dumps({"at": now.isoformat(), "runs": runs}, indent=2))
    else:
        _emit(list_human(outcomes, now))
    return EXIT_OK


async def _reconcile_async(args: argparse.Namespace) -> int:
    import aiohttp

    from tokensettle.reconcile import Reconciler, Selection
    from tokensettle.render import report_human, report_json

    extra: dict[str, Any] = {}
    if args.min_age is not None:
        extra["min_age"] = args.min_age
    if args.max_age is not None:
        extra["max_age"] = args.max_age
    settings = _settings(args, **extra)
    _readable_roots(settings)
    _logs(settings)
    selection = Selection(args.framework, args.run_id, args.force)
    revoke_failed = 0
    async with aiohttp.ClientSession() as session:
        await _resolve_key_ids(settings, session)
        from tokensettle.sources import usage_sources

        reconciler = Reconciler(settings, None, clients=usage_sources(settings, session))
        report = await reconciler.run_once(selection, dry_run=args.dry_run)
        if not args.dry_run and not report.auth_error:
            from tokensettle.leasekeeper import LeaseKeeper, admin_client, leased_runs

            # Keys of leases whose runs are all settled now are deleted (with backoff).
            keeper = LeaseKeeper(lambda: settings, admin_client(settings, session))
            outcomes = await keeper.revoke(leased_runs(report.records), reconciler.clock())
            revoke_failed = sum(1 for o in outcomes if not o.revoked)
    # Every selected run ends in the report (polled, not due, settled, unreadable), unless
    # authentication stopped the batch first.
    if args.framework is not None and not report.outcomes and not report.auth_error:
        runs = _runs(_scan(settings))
        raise no_such_run(args.framework, args.run_id, runs, settings.runs_dirs)
    now = reconciler.clock()
    _emit(
        json.dumps(report_json(report, now), indent=2) if args.json else report_human(report, now)
    )
    if report.auth_error:
        return EXIT_AUTH
    return EXIT_RUNS_FAILED if report.failed or revoke_failed else EXIT_OK


async def _resolve_key_ids(settings: Settings, session: aiohttp.ClientSession) -> None:
    """Frameworks with a secret key in the environment and no key id get their id from the
    project key lists (keyids); nothing happens without such a framework."""
    from tokensettle import keyids
    from tokensettle.leasekeeper import admin_client

    wanted = keyids.unresolved_secrets(os.environ, settings)
    admin = admin_client(settings, session) if wanted else None
    if admin is not None:
        resolved = await keyids.resolve(admin, keyids.search_projects(settings), wanted)
        keyids.apply(settings, resolved)


def _reconcile(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_reconcile_async(args))


def _out_problem(path: Path, error: OSError, option: str = "--out") -> str:
    where = f"report {option} {path}"
    if isinstance(error, FileNotFoundError) and not path.parent.is_dir():
        return f"{where}: directory {path.parent} does not exist; create it or choose another file"
    if isinstance(error, IsADirectoryError):
        return f"{where}: is a directory; name a file in it, e.g. {path / 'report.html'}"
    if isinstance(error, NotADirectoryError):
        return f"{where}: a part of {path.parent} is a file, not a directory"
    if isinstance(error, PermissionError):
        return f"{where}: permission denied; choose a file this user can write"
    return f"{where}: cannot be written: {error.strerror or error}"


def _report(args: argparse.Namespace) -> int:
    import structlog

    from tokensettle.report import figure_files
    from tokensettle.report import render as render_report
    from tokensettle.report_files import read_summaries

    settings = _settings(args)
    _readable_roots(settings)
    _logs(settings)
    log = structlog.get_logger("tokensettle.cli")
    now = datetime.now(UTC)
    summaries = read_summaries(
        _found(settings, args.framework),
        grace=int(settings.window_grace.total_seconds()),
        now=now,
        max_age=settings.max_age,
    )
    # Unreadable files are rows of the report (as `list` shows them) and fail the command.
    unreadable = [s for s in summaries if s.status == "error"]
    for s in unreadable:
        log.warning("run.unreadable", framework=s.framework, run_id=s.run_id, reason=s.message)
    text = render_report(
        summaries, args.format, generated_at=now, include_ambiguous=args.include_ambiguous
    )
    if args.bill is not None:
        text = _with_bill(text, args, settings, now)
    if args.figures is not None:
        files = figure_files(summaries, include_ambiguous=args.include_ambiguous)
        try:
            args.figures.mkdir(parents=True, exist_ok=True)
            for name, svg in files.items():
                (args.figures / name).write_text(svg + "\n", encoding="utf-8")
        except OSError as exc:
            raise CommandError(_out_problem(args.figures, exc, "--figures"), EXIT_USAGE) from None
        log.info("report.figures_written", path=str(args.figures), figures=len(files))
    if args.out is not None:
        try:
            args.out.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        except OSError as exc:
            raise CommandError(_out_problem(args.out, exc), EXIT_USAGE) from None
        log.info("report.written", path=str(args.out), runs=len(summaries))
    else:
        _emit(text.rstrip("\n"))
    return EXIT_RUNS_FAILED if unreadable else EXIT_OK


def _with_bill(text: str, args: argparse.Namespace, settings: Settings, now: datetime) -> str:
    """The report with the bill check as its section; a check that cannot run (no key, a
    refused key, the API down) is a section saying why, not a failed report."""
    from tokensettle.bill import report_section, section_json
    from tokensettle.bill_cli import check_for_report
    from tokensettle.report import BILL_FORMATS, with_section

    if args.format not in BILL_FORMATS:
        raise CommandError(
            f"report --bill: not with --format {args.format}; use one of {', '.join(BILL_FORMATS)}",
            EXIT_USAGE,
        )
    if not 1 <= args.bill <= 366:
        raise CommandError("report --bill: DAYS must be 1 to 366", EXIT_USAGE)
    check = check_for_report(settings, days=args.bill, now=now)
    if args.format == "json":
        return with_section(text, "json", section_json(check))
    return with_section(text, args.format, report_section(check, args.format))


def _reprice(args: argparse.Namespace) -> int:
    from decimal import Decimal

    from tokensettle.render import table
    from tokensettle.reprice import Repriced, reprice_runs

    settings = _settings(args)
    _readable_roots(settings)
    _logs(settings)
    grace = int(settings.window_grace.total_seconds())
    found = _found(settings, args.framework)
    results = reprice_runs(found, grace, dry_run=args.dry_run, assume_model=args.model)

    def usd(value: Decimal | None) -> str:
        return "-" if value is None else f"${value:.6f}"

    def action(r: Repriced) -> str:
        if r.written:
            return "written"
        if not r.changed:
            return "unchanged"
        return "would write" if args.dry_run else "write failed"

    rows = [
        [
            r.framework,
            r.run_id,
            usd(r.old_usd),
            usd(r.new_usd),
            usd(r.new_usd - (r.old_usd or Decimal(0))) if r.new_usd is not None else "-",
            action(r),
            r.note or r.basis,
        ]
        for r in results
    ]
    head = ["FRAMEWORK", "RUN", "OLD", "NEW", "DIFF", "ACTION", "BASIS"]
    _emit(table(head, rows) if rows else "no settled runs to price")
    changed = sum(1 for r in results if r.changed)
    failed = sum(1 for r in results if action(r) == "write failed")
    verb = "would change" if args.dry_run else "changed"
    unpriced = sum(1 for r in results if r.new_usd is None)
    tail = f"; write failed {failed}" if failed else ""
    _emit(f"\n{len(results)} settled run(s); {verb} {changed}; unpriced {unpriced}{tail}")
    return EXIT_RUNS_FAILED if failed else EXIT_OK


async def _doctor_async(args: argparse.Namespace) -> int:
    import aiohttp

    from tokensettle.doctor import config_error_check, exit_code, render, run_checks

    try:
        settings = _settings(args)
    except ConfigError as exc:
        _emit(render([config_error_check(exc)]))
        return EXIT_USAGE
    _logs(settings, level="error")
    async with aiohttp.ClientSession() as session:
        key = settings.secret_key()
        client = _client(settings, session, quick=True) if key else None
        from tokensettle.anthropic_api import client_for as anthropic_client
        from tokensettle.leasekeeper import admin_client

        anthropic = (
            anthropic_client(settings, session, quick=True) if settings.anthropic_key() else None
        )
        checks = await run_checks(
            settings, client, admin=admin_client(settings, session), anthropic=anthropic
        )
    _emit(render(checks))
    return exit_code(checks)


def _doctor(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_doctor_async(args))


def _simulate(args: argparse.Namespace) -> int:
    from tokensettle.simulator import cli as simulator_cli

    return simulator_cli.main(args)


def _bill(args: argparse.Namespace) -> int:
    from tokensettle import bill_cli

    return bill_cli.main(args)


def _lease(args: argparse.Namespace) -> int:
    from tokensettle import lease_cli

    return lease_cli.main(args)


def _demo(_args: argparse.Namespace) -> int:
    from tokensettle.demo import run_demo

    return run_demo()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run,
    "list": _list,
    "reconcile": _reconcile,
    "report": _report,
    "reprice": _reprice,
    "doctor": _doctor,
    "simulate": _simulate,
    "lease": _lease,
    "bill": _bill,
    "demo": _demo,
}


def _fatal(message: str, event: str = "command.failed") -> None:
    from tokensettle.logs import fatal

    fatal(message, event=event)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        sys.stderr.write(f"tokensettle: {exc}\n")
        return EXIT_USAGE
    except ConfigError as exc:
        _fatal(f"config error: {exc}", "config.invalid")
        return EXIT_USAGE
    except CommandError as exc:
        _fatal(str(exc))
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader left (`| head`): say nothing more, and keep Python from complaining
        # about the unflushed stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        # Last resort, for a system error no command expected (the ones a user can cause
        # are handled where they happen, naming the setting or path).
        where = f": {exc.filename}" if exc.filename else ""
        _fatal(f"unexpected system error: {exc.strerror or exc}{where}", "command.os_error")
        return EXIT_RUNS_FAILED

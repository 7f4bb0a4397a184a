"""The options of `tokensettle lease` (cheap to import: the top-level parser builds them for
every command; `lease_cli` runs them)."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from tokensettle.durations import parse_duration
from tokensettle.usage_scope import SCOPE_FILE

_FRAMEWORK: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAX_TTL: Final = timedelta(days=365)
_MAX_WAIT: Final = timedelta(days=7)
#: How long `lease exec/new --provider anthropic` waits for a free pool key by default.
DEFAULT_WAIT: Final = timedelta(minutes=10)


def _ttl(text: str) -> timedelta:
    try:
        ttl = parse_duration(text)
    except ValueError as exc:  # argparse would say only "invalid _ttl value"
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not timedelta(seconds=1) <= ttl <= _MAX_TTL:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 1s and 365d")
    return ttl


def _wait(text: str) -> timedelta:
    try:
        wait = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not timedelta(0) <= wait <= _MAX_WAIT:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0s and 7d")
    return wait


def _framework(text: str) -> str:
    if not _FRAMEWORK.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:64]!r} is not a framework name (letters, digits, '_', '.', '-')"
        )
    return text


def _mint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provider",
        choices=["openai", "anthropic"],
        default="openai",
        help="openai: mint a key; anthropic: take a key of the [leases.anthropic] pool",
    )
    parser.add_argument(
        "--framework", type=_framework, help="also set OPENAI_API_KEY_<FW> (ANTHROPIC_...)"
    )
    parser.add_argument(
        "--run-dir",
        dest="run_dir",
        type=Path,
        help=f"the run's directory: {SCOPE_FILE} is written there (created if missing)",
    )
    parser.add_argument(
        "--ttl",
        type=_ttl,
        help="key lifetime, e.g. 6h (default TOKENSETTLE_LEASE_TTL, 24h); for a pool key "
        "the bound on a crashed holder",
    )
    parser.add_argument(
        "--wait",
        type=_wait,
        help="anthropic: how long to wait for a free pool key (default 10m; 0s: do not wait)",
    )


def add_arguments(subparsers: Any) -> None:
    """Add `lease` and its four commands to a top-level `add_subparsers()` action. The
    sub-commands use the same parser class as `lease` (so the caller's error handling
    applies)."""
    lease = subparsers.add_parser(
        "lease",
        help="a key per run, so parallel runs settle exactly",
        description="a key per run, so parallel runs settle exactly",
    )
    commands = lease.add_subparsers(dest="lease_command", required=True, parser_class=type(lease))
    config = type(lease)(add_help=False)
    config.add_argument("--config", type=Path, help="TOML config file (also TOKENSETTLE_CONFIG)")

    p_exec = commands.add_parser(
        "exec", parents=[config], help="mint a key, declare it, run CMD with it"
    )
    _mint_options(p_exec)
    p_exec.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    p_new = commands.add_parser(
        "new", parents=[config], help="mint a key and print it (for runners that start runs)"
    )
    _mint_options(p_new)
    p_new.add_argument("--format", choices=["env", "json"], default="env")

    p_list = commands.add_parser("list", parents=[config], help="every lease and its state")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")

    p_rev = commands.add_parser(
        "revoke", parents=[config], help="delete leased keys now (release pool keys)"
    )
    p_rev.add_argument("key_ids", nargs="*", metavar="KEY_ID", help="key_... or apikey_...")
    p_rev.add_argument("--settled", action="store_true", help="every settled lease")
    p_rev.add_argument(
        "--expired", action="store_true", help="every expired lease (and pool lease)"
    )

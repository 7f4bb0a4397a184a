"""`tokensettle simulate`: its arguments and its main, owned by the simulator package.

The top-level CLI needs two lines: `add_arguments(sub.add_parser("simulate", ...))` and
`return main(args)`. `python -m tokensettle.simulator` runs the same thing on its own.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tokensettle.simulator.scenario import (
    DEFAULT_SEED_MODEL,
    DEFAULT_SEED_PROJECT,
    FAULT_KINDS,
    SIMULATOR_ADMIN_KEY,
    Scenario,
    ScenarioError,
)

if TYPE_CHECKING:
    from tokensettle.simulator.seed import SeedIdentity

# The seed and the server load the settings model and aiohttp: only `main` imports them,
# so that building the command line stays cheap for every other command.
# ruff: noqa: PLC0415

EXIT_OK, EXIT_USAGE = 0, 2
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8787
_PROG: Final = "tokensettle simulate"

DESCRIPTION: Final = """\
Serve the built-in fake of the OpenAI Usage API (GET /v1/organization/usage/completions)
on loopback, from a scenario of virtual requests; register ground truth and faults
through its control endpoints. Full reference: docs/simulator.md."""
_FAULTS: Final = textwrap.fill(
    ", ".join(FAULT_KINDS), width=88, initial_indent=" " * 23, subsequent_indent=" " * 23
).lstrip()
EPILOG: Final = f"""\
admin key:
  Without "admin_keys" in the scenario it accepts {SIMULATOR_ADMIN_KEY}
  (Authorization: Bearer ...); keys in "unscoped_keys" get 403 "Missing scopes".

control endpoints (loopback only, no auth):
  POST /_sim/requests  register virtual requests (ground truth)
  POST /_sim/faults    queue faults, one per usage request, of the kinds
                       {_FAULTS}
  POST /_sim/keys      {{"admin_keys": [...], "unscoped_keys": [...]}}
  POST /_sim/reset     forget requests, faults and the request log
  GET  /_sim/truth     final usage per minute, key, project and model
  GET  /_sim/log, /_sim/stats   the usage requests received

register ground truth (a request that completed at Unix second 1760000000, visible
to the API 5 minutes after registration):
  curl -s http://127.0.0.1:8787/_sim/requests -H 'Content-Type: application/json' -d '
    {{"requests": [{{"time": 1760000000, "api_key_id": "key_chatdev", "project_id": "proj_a",
      "model": "gpt-4o-mini-2024-07-18", "visible_after": 300,
      "usage": {{"input_tokens": 1200, "output_tokens": 300, "num_model_requests": 2,
                "input_cached_tokens": 512}}}}]}}'

scenario file (--scenario, JSON; every key optional):
  {{"admin_keys": [...], "unscoped_keys": [...], "seed": 0,
   "requests": [<as for /_sim/requests, or with "revisions": [{{"after": s, "usage": {{}}}}]>],
   "faults": [{{"kind": "429", "retry_after": 2}}, {{"kind": "hang", "seconds": 5}}, ...]}}

--seed-from RUNS_DIR registers the totals that existing run files record (their
verified usage_api_reconciliation block, else aggregate_metrics), spread over each
run's active minutes, under the key of OPENAI_API_KEY_<FW>_ID or --key-id FW=KEY.
Logs are JSON lines on stdout unless stdout is a terminal (--log-format).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Everything `simulate` accepts, its description and its help epilog."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (loopback)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="TCP port; 0 picks a free one"
    )
    parser.add_argument("--scenario", type=Path, help="scenario JSON file (format below)")
    parser.add_argument(
        "--seed-from",
        dest="seed_from",
        action="append",
        type=Path,
        default=[],
        metavar="RUNS_DIR",
        help="register the totals recorded in the run files under RUNS_DIR (repeatable)",
    )
    parser.add_argument(
        "--key-id",
        dest="key_ids",
        action="append",
        default=[],
        metavar="FRAMEWORK=KEY_ID",
        help="key id of a framework's seeded usage (default: OPENAI_API_KEY_<FW>_ID, "
        "else key_<framework>)",
    )
    parser.add_argument(
        "--project-id", default=DEFAULT_SEED_PROJECT, help="project id of seeded usage"
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_SEED_MODEL,
        help="model of seeded usage for runs that name none",
    )
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info"
    )


def _fail(message: str) -> int:
    sys.stderr.write(f"{_PROG}: {message}\n")
    return EXIT_USAGE


def _address_problem(host: str, port: int) -> str | None:
    if not 0 <= port <= 65535:
        return f"--port {port} is not a TCP port: use 1-65535, or 0 for a free one"
    if not host.strip():
        return "--host is empty: give an address such as 127.0.0.1"
    return None


def _listen_problem(exc: OSError, host: str, port: int) -> str:
    """One line naming the option for a failure to listen."""
    if isinstance(exc, socket.gaierror):
        return f"--host {host!r} cannot be resolved ({exc.strerror or exc})"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"--port {port}: {host}:{port} is already in use; "
            "stop what listens there or pick another --port (0 picks a free one)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host!r} is not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"--port {port}: permission denied (ports below 1024 need privileges)"
    return f"cannot listen on --host {host!r} --port {port}: {exc.strerror or exc}"


def _seed(args: argparse.Namespace, scenario: Scenario, identity: SeedIdentity) -> None:
    """Add the runs under `--seed-from` to `scenario`, logging what was seeded."""
    import structlog

    from tokensettle.simulator.seed import plan_seed

    plan = plan_seed(args.seed_from, identity, registered_at=time.time())
    log = structlog.get_logger("tokensettle.simulator")  # configured by main
    for skip in plan.skipped:
        log.warning("simulator.seed_skipped", path=str(skip.path), reason=skip.reason)
    for run in plan.runs:
        log.debug(
            "simulator.seeded_run",
            path=str(run.path),
            framework=run.framework,
            run_id=run.run_id,
            api_key_id=run.api_key_id,
            tokens_in=run.recorded.tokens_in,
            tokens_out=run.recorded.tokens_out,
            source=run.recorded.source,
            spread_over=run.spread_over,
            requests=len(run.requests),
        )
        for req in run.requests:
            scenario.add(req)
    log.info(
        "simulator.seeded",
        roots=[str(r) for r in args.seed_from],
        runs=len(plan.runs),
        skipped=len(plan.skipped),
        requests=len(plan.requests),
        keys=dict(sorted({(run.framework, run.api_key_id) for run in plan.runs})),
    )


def main(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM: exit 0; a bad option, scenario or address: one line, 2."""
    import asyncio

    from tokensettle.logs import configure
    from tokensettle.simulator.seed import SeedIdentity, key_ids
    from tokensettle.simulator.server import load_scenario_file, serve_forever

    host, port = args.host, args.port
    problem = _address_problem(host, port)
    if problem is not None:
        return _fail(problem)
    try:
        scenario = load_scenario_file(args.scenario) if args.scenario else Scenario()
        identity = SeedIdentity(
            keys=key_ids(os.environ, args.key_ids), project_id=args.project_id, model=args.model
        )
    except ScenarioError as exc:
        return _fail(str(exc))
    for root in args.seed_from:
        if not root.is_dir():
            return _fail(f"--seed-from {root}: not a directory")
    configure(level=args.log_level, fmt=args.log_format, stream=sys.stdout)
    if args.seed_from:
        _seed(args, scenario, identity)
    try:
        asyncio.run(serve_forever(host, port, scenario))
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        return _fail(_listen_problem(exc, host, port))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG)
    add_arguments(parser)
    return parser

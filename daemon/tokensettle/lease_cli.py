"""`tokensettle lease`: a key per run, so parallel runs settle exactly.

    tokensettle lease exec [--framework FW] [--run-dir DIR] [--ttl D] -- CMD [ARG...]
    tokensettle lease new  [--framework FW] [--run-dir DIR] [--ttl D] [--format env|json]
    tokensettle lease list [--json]
    tokensettle lease revoke [KEY_ID...] [--settled] [--expired]

`exec` mints a service-account key in TOKENSETTLE_LEASE_PROJECT, records the lease in
STATE_DIR, writes `DIR/usage_scope.json` before the command starts, and runs the command
with the key in OPENAI_API_KEY (and OPENAI_API_KEY_<FW>), TOKENSETTLE_LEASE_KEY_ID,
TOKENSETTLE_RUN_DIR and TOKENSETTLE_USAGE_SCOPE (the declaration, for runners that write
it themselves), in the caller's environment less every admin key. It forwards SIGINT and
SIGTERM and exits with the command's code (128+N when a signal N killed it; 127/126 when
the command is not found / not executable, as `env` does). Nothing is run when the lease
cannot be made: 3 when the admin key is refused, 2 for a setting to fix, 1 when the Admin
API keeps failing. The key's value appears only in the command's environment and in the
output of `lease new`.

With `--provider anthropic` the key is not minted but taken, exclusively, from the pool
of Console-made keys (`[leases.anthropic] keys`, values from the pool's credentials
file; see `tokensettle.pool`): ANTHROPIC_API_KEY (and ANTHROPIC_API_KEY_<FW>) instead.
When every pool key is in use it waits (`--wait`, default 10m, a line on stderr every
30 s); after the wait: one line, exit 1, nothing run. While the command runs the lease
is renewed; when it exits its end is recorded (the key returns once its runs settle).

The options live in `lease_args` (cheap to import, for the top-level parser); `main(args)`
runs a parsed command. `python -m tokensettle.lease_cli ...` runs the same thing on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, NoReturn

import aiohttp
import structlog

from tokensettle.admin_api import (
    AdminApiError,
    AdminAuthError,
    AdminClient,
    AdminNotFoundError,
    AdminRequestError,
    LeasedKey,
    client_for,
)
from tokensettle.config import ADMIN_KEY_ALIASES, ConfigError, Settings, load_settings
from tokensettle.discovery import RUN_FILE
from tokensettle.durations import format_duration, human_duration
from tokensettle.lease_args import DEFAULT_WAIT, add_arguments
from tokensettle.leases import (
    Lease,
    LeaseBook,
    LeaseState,
    LeaseStore,
    LeaseStoreError,
    PoolLease,
    PoolState,
    RevokeOutcome,
    RevokePolicy,
    effective_state,
    ensure_service_account,
    lease_accounts,
    mint_lease,
    remembered_service_account,
    revoke,
)
from tokensettle.logs import configure
from tokensettle.pool import (
    PoolBusy,
    PoolSlot,
    expire_due,
    finish,
    load_pool_values,
    pool_view,
    release_by_hand,
    release_unused,
    renew,
    renew_interval,
    take,
)
from tokensettle.usage_scope import (
    ANTHROPIC_KEY_ID_PATTERN,
    KEY_ID_PATTERN,
    SCOPE_FILE,
    Declaration,
    write_declaration,
)

__all__ = [
    "ADMIN_VARIABLES",
    "LeaseProblem",
    "add_arguments",
    "admin_client",
    "build_parser",
    "child_environment",
    "is_admin_variable",
    "lease_variables",
    "main",
    "run",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 3
EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 126, 127
_PROG: Final = "tokensettle lease"

#: Variables an experiment must never see: every admin key tokensettle or the OpenAI and
#: Anthropic tools read, and the paths settings and credentials are read from (systemd's
#: credentials directory; tokensettle's TOML file, which may hold `admin_key`). Names are
#: compared upper-cased: pydantic-settings reads environment names case-insensitively.
ADMIN_VARIABLES: Final = frozenset(
    {
        *ADMIN_KEY_ALIASES,
        "TOKENSETTLE_ANTHROPIC_ADMIN_KEY",
        "ANTHROPIC_ADMIN_KEY",
        "CREDENTIALS_DIRECTORY",
        "TOKENSETTLE_CONFIG",
        # the file with every pool key's value (the run gets its own key only)
        "TOKENSETTLE_ANTHROPIC_POOL_FILE",
    }
)


def is_admin_variable(name: str) -> bool:
    """Whether the variable `name` holds (or points at) an admin credential: the names in
    ADMIN_VARIABLES, and any `*_ADMIN_KEY` or `*_ADMIN_KEY_*` (e.g. `..._ADMIN_KEY_FILE`)."""
    upper = name.upper()
    return upper in ADMIN_VARIABLES or upper.endswith("_ADMIN_KEY") or "_ADMIN_KEY_" in upper


#: The variable each provider's SDK reads its key from.
KEY_VARIABLES: Final = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


def framework_variable(framework: str, provider: str = "openai") -> str:
    """`OPENAI_API_KEY_<FW>` (or `ANTHROPIC_API_KEY_<FW>`), the runners' convention
    (non-alphanumerics become `_`)."""
    return f"{KEY_VARIABLES[provider]}_" + re.sub(r"[^A-Z0-9]", "_", framework.upper())


def lease_variables(
    key: LeasedKey, declaration: Declaration, *, framework: str | None, run_dir: Path | None
) -> dict[str, str]:
    """The variables a leased run gets (the key value among them), named for the
    declaration's provider."""
    env = {
        KEY_VARIABLES[declaration.provider]: key.value,
        "TOKENSETTLE_LEASE_KEY_ID": key.id,
        "TOKENSETTLE_USAGE_SCOPE": json.dumps(declaration.to_json(), separators=(",", ":")),
    }
    if framework is not None:
        env[framework_variable(framework, declaration.provider)] = key.value
    if run_dir is not None:
        env["TOKENSETTLE_RUN_DIR"] = str(run_dir)
    return env


def child_environment(base: Mapping[str, str], lease_env: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: `base` (the caller's) without any admin variable, with
    `lease_env` on top. Pure."""
    env = {k: v for k, v in base.items() if not is_admin_variable(k)}
    env.update(lease_env)
    return env


# --------------------------------------------------------------------------------------
# Errors and arguments


class LeaseProblem(Exception):
    """A lease cannot be made or used: one line for the user, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _StandaloneUsage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """For `python -m tokensettle.lease_cli`: errors as one line and exit 2, like cli.py."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise _StandaloneUsage(message)


def build_parser() -> argparse.ArgumentParser:
    """A parser with `lease` as its only command (for running this module on its own)."""
    parser = _Parser(prog="tokensettle")
    add_arguments(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return parser


# --------------------------------------------------------------------------------------
# Shared plumbing


def admin_client(settings: Settings, session: aiohttp.ClientSession) -> AdminClient:
    """The Admin API client the settings describe (raises LeaseProblem without a key)."""
    key = settings.secret_key()
    if not key:
        raise LeaseProblem(
            "admin_key: not set; export TOKENSETTLE_ADMIN_KEY (or OPENAI_ADMIN_KEY) with an "
            "admin key allowed to manage the lease project's service accounts and API keys"
        )
    return client_for(settings, session, key)


def _project(settings: Settings) -> str:
    if not settings.lease_project:
        raise LeaseProblem(
            "lease_project (TOKENSETTLE_LEASE_PROJECT): not set; name the proj_... id of a "
            "project (not the Default project) to hold the leased keys"
        )
    return settings.lease_project


def _emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


_AUTH_HINT: Final = (
    "leases need an admin key allowed to read the project and write its service accounts "
    "and API keys"
)


def _admin_problem(exc: AdminApiError, *, doing: str, settings: Settings) -> LeaseProblem:
    """One line for an Admin API failure while making a lease, naming what to fix."""
    project = settings.lease_project
    if isinstance(exc, AdminAuthError):
        return LeaseProblem(f"admin key refused ({exc}); {_AUTH_HINT}", EXIT_AUTH)
    if isinstance(exc, AdminNotFoundError) and doing == "project":
        return LeaseProblem(
            f"lease_project (TOKENSETTLE_LEASE_PROJECT): project {project} not found ({exc}); "
            "name a project of this organisation"
        )
    if isinstance(exc, AdminNotFoundError) and doing == "key":
        if settings.lease_service_account:
            return LeaseProblem(
                f"lease_service_account (TOKENSETTLE_LEASE_SERVICE_ACCOUNT): service account "
                f"{settings.lease_service_account} not found in {project} ({exc})"
            )
        return LeaseProblem(f"the lease service account of {project} vanished ({exc})", 1)
    if isinstance(exc, AdminRequestError) and doing == "service_account":
        return LeaseProblem(
            f"lease_project (TOKENSETTLE_LEASE_PROJECT): {project} refused a service account "
            f"({exc}); the Default project and archived projects cannot hold service "
            "accounts: create a project for leases and name it here"
        )
    if isinstance(exc, AdminRequestError) and doing == "key":
        return LeaseProblem(
            f"lease_ttl (TOKENSETTLE_LEASE_TTL or --ttl): the key was refused ({exc}); an "
            "organisation or project policy may cap key lifetime: use a TTL within it"
        )
    return LeaseProblem(f"the Admin API failed ({exc})", EXIT_FAILED)


@dataclass(frozen=True, slots=True)
class _Minted:
    lease: Lease
    key: LeasedKey
    declaration: Declaration
    run_dir: Path | None


async def _mint(
    settings: Settings,
    client: AdminClient,
    store: LeaseStore,
    *,
    framework: str | None,
    run_dir: Path | None,
    ttl: timedelta,
) -> _Minted:
    """Find or create the service account, mint the key, record the lease and write the
    declaration: two admin requests per run once the account exists (this create and the
    delete at revocation). The project is checked on first use, and whenever a create is
    refused, so the one line says what to fix. After the key exists, any failure deletes
    it again (best effort) and raises LeaseProblem: the command is not run."""
    project_id = _project(settings)
    now = datetime.now(UTC)
    lease, key = await _mint_key(
        settings, client, store, project_id, now, framework=framework, run_dir=run_dir, ttl=ttl
    )
    declaration = Declaration.for_lease(key.id, project_id, lease.created_at, lease.expires_at)
    if run_dir is not None:
        try:
            await asyncio.to_thread(write_declaration, run_dir, declaration)
        except OSError as exc:
            await _revoke_now(settings, store, client, [lease], datetime.now(UTC))
            raise LeaseProblem(
                f"--run-dir {run_dir}: cannot write {SCOPE_FILE}: "
                f"{exc.strerror or exc}; the key was revoked"
            ) from None
    return _Minted(lease, key, declaration, run_dir)


async def _mint_key(
    settings: Settings,
    client: AdminClient,
    store: LeaseStore,
    project_id: str,
    now: datetime,
    *,
    framework: str | None,
    run_dir: Path | None,
    ttl: timedelta,
) -> tuple[Lease, LeasedKey]:
    """The service account (configured, remembered or new) and a key of it. A remembered
    account that was deleted since (404) is forgotten and replaced once."""
    configured = settings.lease_service_account
    known = configured or remembered_service_account(store, project_id)
    if known is None:
        await _check_project(client, settings)  # first use: say what is wrong with it
    for attempt in (1, 2):
        try:
            account = await ensure_service_account(
                store, client, project_id, now, configured=configured
            )
        except AdminApiError as exc:
            raise _admin_problem(exc, doing="service_account", settings=settings) from None
        try:
            return await mint_lease(
                store, client, account, ttl=ttl, now=now, framework=framework, run_dir=run_dir
            )
        except AdminAuthError as exc:
            raise _admin_problem(exc, doing="key", settings=settings) from None
        except AdminApiError as exc:
            if isinstance(exc, AdminRequestError | AdminNotFoundError):
                await _check_project(client, settings)  # archived or gone since?
            if not isinstance(exc, AdminNotFoundError) or not account.created_by_us:
                raise _admin_problem(exc, doing="key", settings=settings) from None
            if attempt == 2:
                raise _admin_problem(exc, doing="key", settings=settings) from None
            await asyncio.to_thread(
                store.update, functools.partial(_forget_account, project_id, account.id)
            )
    raise AssertionError("unreachable: the second attempt returns or raises")


async def _check_project(client: AdminClient, settings: Settings) -> None:
    """LeaseProblem when the lease project is unknown, archived or not readable."""
    project_id = _project(settings)
    try:
        project = await client.get_project(project_id)
    except AdminApiError as exc:
        raise _admin_problem(exc, doing="project", settings=settings) from None
    if project.archived:
        raise LeaseProblem(
            f"lease_project (TOKENSETTLE_LEASE_PROJECT): {project_id} is archived; "
            "name an active project"
        )


def _forget_account(project_id: str, account_id: str, book: LeaseBook) -> LeaseBook:
    return book.without_service_account(project_id, account_id)


def _policy(settings: Settings) -> RevokePolicy:
    return RevokePolicy.from_settings(settings)


async def _revoke_now(
    settings: Settings,
    store: LeaseStore,
    client: AdminClient,
    leases: Sequence[Lease],
    now: datetime,
) -> list[RevokeOutcome]:
    """Delete these leases' keys now, as the settings say (backoff, lease account)."""
    return await revoke(
        store,
        client,
        leases,
        now,
        policy=_policy(settings),
        service_accounts=lease_accounts(settings),
    )


def _check_run_dir(run_dir: Path | None) -> Path | None:
    """The absolute run directory, refused before anything is minted when it cannot take
    a declaration (not a directory, or one that already declares a scope)."""
    if run_dir is None:
        return None
    path = Path(os.path.abspath(run_dir))
    if path.exists() and not path.is_dir():
        raise LeaseProblem(f"--run-dir {run_dir}: exists and is not a directory")
    scope = path / SCOPE_FILE
    if scope.exists() or scope.is_symlink():
        raise LeaseProblem(
            f"--run-dir {run_dir}: {SCOPE_FILE} exists already (a run directory declares one "
            "scope); use a fresh run directory"
        )
    return path


def _resolve_command(cmd: Sequence[str]) -> list[str]:
    argv = list(cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise LeaseProblem("exec: no command given: tokensettle lease exec [...] -- CMD [ARG...]")
    program = argv[0]
    if os.sep in program:
        if not Path(program).is_file():
            raise LeaseProblem(f"{program}: command not found", EXIT_NOT_FOUND)
        if not os.access(program, os.X_OK):
            raise LeaseProblem(f"{program}: not executable", EXIT_NOT_EXECUTABLE)
    elif shutil.which(program) is None:
        raise LeaseProblem(f"{program}: command not found", EXIT_NOT_FOUND)
    return argv


def _setup(args: argparse.Namespace) -> tuple[Settings, LeaseStore]:
    settings = load_settings({}, config_file=getattr(args, "config", None))
    configure(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    return settings, LeaseStore(settings.state_dir)


def _book(store: LeaseStore) -> LeaseBook:
    try:
        return store.load()
    except LeaseStoreError as exc:
        raise LeaseProblem(str(exc), EXIT_FAILED) from None


def _key(settings: Settings) -> str:
    return settings.secret_key() or ""


# --------------------------------------------------------------------------------------
# exec


def _terminal_sent(sig: int, child: int) -> bool:
    """Whether a SIGINT most likely came from the terminal's Ctrl-C, which the kernel
    delivers to the whole foreground process group, the child included: forwarding it
    would interrupt the child twice. Elsewhere (no terminal, a background job, a child in
    its own group, `kill -INT` from a script) the child gets it only from us."""
    if sig != signal.SIGINT:
        return False
    try:
        fd = sys.stdin.fileno()
        return (
            os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp() and os.getpgid(child) == os.getpgrp()
        )
    except (OSError, ValueError):
        return False


async def run_child(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run `argv` with `env` (stdio inherited), forwarding SIGINT and SIGTERM; its exit
    code, or 128+N when signal N killed it."""
    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(*argv, env=dict(env))
    log = structlog.get_logger("tokensettle.lease")

    def forward(sig: int) -> None:
        if proc.returncode is not None or _terminal_sent(sig, proc.pid):
            return
        log.info("lease.signal_forwarded", signal=signal.Signals(sig).name, pid=proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, forward, sig)
            installed.append(sig)
    try:
        code = await proc.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 128 - code if code < 0 else code


async def _lease_for(args: argparse.Namespace) -> tuple[Settings, LeaseStore, _Minted]:
    """`exec` and `new`: check the run directory, then make the lease the options ask for."""
    run_dir = _check_run_dir(args.run_dir)
    settings, store = _setup(args)
    ttl = args.ttl or settings.lease_ttl
    async with aiohttp.ClientSession() as session:
        client = admin_client(settings, session)
        minted = await _mint(
            settings, client, store, framework=args.framework, run_dir=run_dir, ttl=ttl
        )
    return settings, store, minted


async def _exec(args: argparse.Namespace) -> int:
    argv = _resolve_command(args.cmd)
    if _provider(args) == "anthropic":
        return await _exec_pool(args, argv)
    settings, store, minted = await _lease_for(args)
    run_dir = minted.run_dir
    # From here the value is a secret of this process: mask it in our own log lines too.
    configure(
        level=settings.log_level,
        fmt=settings.log_format,
        secrets=[*settings.secrets(), minted.key.value],
    )
    env = child_environment(
        os.environ,
        lease_variables(minted.key, minted.declaration, framework=args.framework, run_dir=run_dir),
    )
    log = structlog.get_logger("tokensettle.lease")
    log.info("lease.exec", key_id=minted.key.id, command=argv[0], run_dir=minted.lease.run_dir)
    try:
        code = await run_child(argv, env)
    except OSError as exc:  # vanished or unrunnable between the check and the start
        await _revoke_unused(settings, store, minted.lease)
        raise LeaseProblem(f"{argv[0]}: {exc.strerror or exc}; the key was revoked", 126) from None
    log.info("lease.exec_done", key_id=minted.key.id, exit_code=code)
    return code


async def _revoke_unused(settings: Settings, store: LeaseStore, lease: Lease) -> None:
    async with aiohttp.ClientSession() as session:
        client = admin_client(settings, session)
        await _revoke_now(settings, store, client, [lease], datetime.now(UTC))


# --------------------------------------------------------------------------------------
# exec and new from the Anthropic key pool


def _provider(args: argparse.Namespace) -> str:
    provider = str(getattr(args, "provider", "openai"))
    if provider == "openai" and getattr(args, "wait", None) is not None:
        raise LeaseProblem(
            "--wait: only for --provider anthropic (an OpenAI key is minted at once)"
        )
    return provider


@dataclass(frozen=True, slots=True)
class _Pooled:
    lease: PoolLease
    key: LeasedKey
    declaration: Declaration
    run_dir: Path | None
    ttl: timedelta


def _pool_summary(slots: Sequence[PoolSlot]) -> str:
    """`2 keys: 1 leased, 1 free from 12:03:00Z` (no values, ids only where useful)."""
    configured = [s for s in slots if s.status != "unconfigured"]
    counts: dict[str, int] = {}
    for slot in configured:
        counts[slot.status] = counts.get(slot.status, 0) + 1
    parts = [f"{counts[k]} {k}" for k in ("leased", "cooling", "held", "free") if counts.get(k)]
    soonest = min((s.free_at for s in configured if s.free_at is not None), default=None)
    tail = f", the first free from {_when(soonest)}" if soonest is not None else ""
    return f"{len(configured)} key(s): {', '.join(parts)}{tail}"


class _WaitNotice:
    """The waiting lines on stderr: at once, then every `every` seconds."""

    def __init__(self, wait: timedelta, every: float = 30.0) -> None:
        self.wait = wait
        self.every = every
        self.next_at = 0.0

    def __call__(self, slots: Sequence[PoolSlot], waited: float) -> None:
        if waited < self.next_at or waited >= self.wait.total_seconds():
            return
        self.next_at = waited + self.every
        sys.stderr.write(
            f"{_PROG}: waiting for a free anthropic pool key ({_pool_summary(slots)}); "
            f"waited {human_duration(timedelta(seconds=waited))} of "
            f"{format_duration(self.wait)}\n"
        )
        sys.stderr.flush()


async def _take_pool(
    args: argparse.Namespace, *, holder: str
) -> tuple[Settings, LeaseStore, _Pooled]:
    """`exec`/`new --provider anthropic`: check the run directory and the pool's ids and
    values, then take a free pool key (waiting for one) and write the declaration. A
    failure after the key is taken puts it back unused; nothing is run."""
    run_dir = _check_run_dir(args.run_dir)
    settings, store = _setup(args)
    values = await asyncio.to_thread(load_pool_values, settings)
    # Every pool value is a secret of this process: mask them all in our own log lines.
    configure(
        level=settings.log_level,
        fmt=settings.log_format,
        secrets=[*settings.secrets(), *values.values()],
    )
    ttl = args.ttl or settings.lease_ttl
    wait = args.wait if args.wait is not None else DEFAULT_WAIT
    try:
        lease = await take(
            store,
            settings.leases.anthropic,
            ttl=ttl,
            hold=settings.lease_ttl,
            grace=settings.window_grace,
            wait=wait,
            framework=args.framework,
            run_dir=str(run_dir) if run_dir is not None else None,
            holder=holder,
            on_wait=_WaitNotice(wait),
        )
    except PoolBusy as exc:
        what = "the command was not run" if holder == "exec" else "nothing was leased"
        raise LeaseProblem(
            f"no anthropic pool key became free within {format_duration(wait)} "
            f"({_pool_summary(exc.slots)}); {what}: wait longer (--wait) or add keys to "
            "[leases.anthropic] keys",
            EXIT_FAILED,
        ) from None
    declaration = Declaration.for_pool_lease(
        lease.key_id, lease.workspace_id, lease.created_at, lease.expires_at
    )
    if run_dir is not None:
        try:
            await asyncio.to_thread(write_declaration, run_dir, declaration)
        except OSError as exc:
            await asyncio.to_thread(release_unused, store, lease, datetime.now(UTC))
            raise LeaseProblem(
                f"--run-dir {run_dir}: cannot write {SCOPE_FILE}: {exc.strerror or exc}; "
                "the key went back to the pool"
            ) from None
    key = LeasedKey(
        id=lease.key_id,
        name="pool",
        created_at=int(lease.created_at.timestamp()),
        expires_at=int(lease.expires_at.timestamp()),
        value=values[lease.key_id],
    )
    return settings, store, _Pooled(lease, key, declaration, run_dir, ttl)


async def _keep_renewed(store: LeaseStore, lease: PoolLease, ttl: timedelta) -> None:
    """While the command runs: push the lease's TTL on, so a live run never loses its
    key; a `lease exec` that dies stops renewing, and the TTL bounds the crash."""
    log = structlog.get_logger("tokensettle.lease")
    every = renew_interval(ttl).total_seconds()
    while True:
        await asyncio.sleep(every)
        try:
            record = await asyncio.to_thread(renew, store, lease, datetime.now(UTC), ttl)
        except LeaseStoreError as exc:
            log.warning("lease.renew_failed", key_id=lease.key_id, error=str(exc))
            continue
        if record is None:
            log.warning("lease.pool_lost", key_id=lease.key_id, run_dir=lease.run_dir)
            sys.stderr.write(
                f"{_PROG}: {lease.key_id}: this run's lease was released or taken while the "
                "command runs (lease revoke, or leases.json lost); its usage may be shared\n"
            )
            return


async def _exec_pool(args: argparse.Namespace, argv: Sequence[str]) -> int:
    settings, store, pooled = await _take_pool(args, holder="exec")
    env = child_environment(
        os.environ,
        lease_variables(
            pooled.key, pooled.declaration, framework=args.framework, run_dir=pooled.run_dir
        ),
    )
    log = structlog.get_logger("tokensettle.lease")
    log.info(
        "lease.exec",
        provider="anthropic",
        key_id=pooled.key.id,
        command=argv[0],
        run_dir=pooled.lease.run_dir,
    )
    renewer = asyncio.create_task(_keep_renewed(store, pooled.lease, pooled.ttl))
    try:
        code = await run_child(argv, env)
    except OSError as exc:  # vanished or unrunnable between the check and the start
        await asyncio.to_thread(release_unused, store, pooled.lease, datetime.now(UTC))
        raise LeaseProblem(
            f"{argv[0]}: {exc.strerror or exc}; the key went back to the pool", 126
        ) from None
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
    written = pooled.run_dir is None or (pooled.run_dir / RUN_FILE).exists()
    try:
        await asyncio.to_thread(
            finish,
            store,
            pooled.lease,
            datetime.now(UTC),
            settings.window_grace,
            run_written=written,
        )
    except LeaseStoreError as exc:  # the command ran: its code stands; the TTL bounds it
        log.warning("lease.store_failed", key_id=pooled.key.id, error=str(exc))
    log.info("lease.exec_done", key_id=pooled.key.id, exit_code=code)
    return code


async def _new_pool(args: argparse.Namespace) -> int:
    _, _, pooled = await _take_pool(args, holder="new")
    env = lease_variables(
        pooled.key, pooled.declaration, framework=args.framework, run_dir=pooled.run_dir
    )
    if args.format == "json":
        lease = pooled.declaration.to_json()["lease"]
        out = {
            "provider": "anthropic",
            "key_id": pooled.key.id,
            "api_key": pooled.key.value,
            "workspace_id": pooled.lease.workspace_id,
            "framework": args.framework,
            "run_dir": pooled.lease.run_dir,
            "created_at": lease["created_at"],
            "expires_at": lease["expires_at"],
            "usage_scope": pooled.declaration.to_json(),
            "env": env,
        }
        _emit(json.dumps(out, indent=2))
    else:
        _emit(_env_lines(env))
    return EXIT_OK


# --------------------------------------------------------------------------------------
# new


def _env_lines(env: Mapping[str, str]) -> str:
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())


async def _new(args: argparse.Namespace) -> int:
    if _provider(args) == "anthropic":
        return await _new_pool(args)
    _, _, minted = await _lease_for(args)
    env = lease_variables(
        minted.key, minted.declaration, framework=args.framework, run_dir=minted.run_dir
    )
    if args.format == "json":
        out = {
            "key_id": minted.key.id,
            "api_key": minted.key.value,
            "project_id": minted.lease.project_id,
            "service_account_id": minted.lease.service_account_id,
            "framework": args.framework,
            "run_dir": minted.lease.run_dir,
            "created_at": minted.declaration.to_json()["lease"]["created_at"],
            "expires_at": minted.declaration.to_json()["lease"]["expires_at"],
            "usage_scope": minted.declaration.to_json(),
            "env": env,
        }
        _emit(json.dumps(out, indent=2))
    else:
        _emit(_env_lines(env))
    return EXIT_OK


# --------------------------------------------------------------------------------------
# list


def _when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _pool_slots(settings: Settings, book: LeaseBook, now: datetime) -> list[PoolSlot]:
    """The pool as of `now` (a lease past its TTL shows as released)."""
    current = expire_due(book, now, settings.window_grace)
    return pool_view(settings.leases.anthropic.keys, current, now, settings.lease_ttl)


_POOL_STATE: Final = {"leased": "active", "cooling": "released"}


def _pool_note(slot: PoolSlot, book: LeaseBook) -> str:
    record = slot.record
    if slot.status == "held":
        return (
            f"unknown since leases.json was reset {_when(book.reset_at)}; free from "
            f"{_when(slot.free_at)} (or lease revoke {slot.key_id})"
        )
    if slot.status == "unconfigured":
        return "not in [leases.anthropic] keys"
    if record is None:
        return "never leased"
    if record.state is PoolState.ACTIVE:
        if record.holder == "new":
            return "lease new: until its runs settle"
        if record.ended_at is not None:
            return f"command exited {_when(record.ended_at)}; until its runs settle"
        return f"lease exec pid {record.pid}, renewed {_when(record.renewed_at)}"
    released = f"{record.release_reason} {_when(record.released_at)}"
    if slot.status == "cooling":
        return f"{released}; free from {_when(record.free_at)}"
    return f"last lease {released}"


def _slot_json(slot: PoolSlot) -> dict[str, object]:
    return {
        "provider": "anthropic",
        "key_id": slot.key_id,
        "workspace_id": slot.workspace_id,
        "status": slot.status,
        "free_at": _when(slot.free_at) if slot.free_at is not None else None,
        "lease": slot.record.to_json() if slot.record is not None else None,
    }


def _list(args: argparse.Namespace) -> int:
    from tokensettle.render import table  # noqa: PLC0415 - render imports reconcile

    settings, store = _setup(args)
    now = datetime.now(UTC)
    book = _book(store)
    slots = _pool_slots(settings, book, now)
    if args.json:
        _emit(
            json.dumps(
                {
                    "at": now.isoformat().replace("+00:00", "Z"),
                    "state_dir": str(store.state_dir),
                    "service_accounts": [a.to_json() for a in book.service_accounts],
                    "leases": [
                        {
                            **lease.to_json(),
                            "provider": "openai",
                            "state": effective_state(lease, now).value,
                        }
                        for lease in book.leases
                    ],
                    "pool": [_slot_json(slot) for slot in slots],
                },
                indent=2,
            )
        )
        return EXIT_OK
    if not book.leases and not slots:
        _emit(f"no leases in {store.path}")
        return EXIT_OK
    rows = []
    for lease in book.leases:
        state = effective_state(lease, now)
        note = "-"
        if state is LeaseState.REVOKED:
            note = f"revoked {_when(lease.revoked_at)}"
        elif lease.revoke_failures:
            note = (
                f"{lease.revoke_failures} failed revoke(s), next {_when(lease.next_revoke_at)}: "
                f"{lease.last_revoke_error}"
            )
        rows.append(
            [
                lease.key_id,
                "openai",
                state.value,
                lease.framework or "-",
                lease.run_dir or "-",
                _when(lease.created_at),
                _when(lease.expires_at),
                note,
            ]
        )
    for slot in slots:
        record = slot.record
        rows.append(
            [
                slot.key_id,
                "anthropic",
                _POOL_STATE.get(slot.status, slot.status),
                (record.framework if record is not None else None) or "-",
                (record.run_dir if record is not None else None) or "-",
                _when(record.created_at) if record is not None else "-",
                _when(record.expires_at) if record is not None else "-",
                _pool_note(slot, book),
            ]
        )
    head = ["KEY", "PROVIDER", "STATE", "FRAMEWORK", "RUN DIR", "CREATED", "EXPIRES", "NOTE"]
    _emit(table(head, rows))
    return EXIT_OK


# --------------------------------------------------------------------------------------
# revoke


def _select(
    args: argparse.Namespace,
    key_ids: Sequence[str],
    settings: Settings,
    leases: Sequence[Lease],
    now: datetime,
) -> tuple[list[Lease], list[str]]:
    """The minted leases to delete (of `key_ids` and the flags), and notes about the
    ones skipped."""
    chosen: dict[str, Lease] = {}
    notes: list[str] = []
    by_id = {lease.key_id: lease for lease in leases}
    for key_id in key_ids:
        lease = by_id.get(key_id)
        if lease is None:
            # Not recorded (a lost leases.json): the run's declaration named it; delete it
            # in the lease project all the same.
            lease = Lease(key_id, _project(settings), None, now, now)
        elif lease.state is LeaseState.REVOKED:
            notes.append(f"{key_id}: already revoked {_when(lease.revoked_at)}")
            continue
        chosen[key_id] = lease
    for lease in leases:
        state = effective_state(lease, now)
        if (args.settled and state is LeaseState.SETTLED) or (
            args.expired and state is LeaseState.EXPIRED
        ):
            chosen.setdefault(lease.key_id, lease)
    return list(chosen.values()), notes


def _outcome_line(outcome: RevokeOutcome) -> str:
    if outcome.revoked:
        gone = f"already gone (no such key in {outcome.project_id})"
        return f"{outcome.key_id}: " + (gone if outcome.already_gone else "revoked")
    return f"{outcome.key_id}: not revoked: {outcome.error}"


def _release_pool(args: argparse.Namespace, settings: Settings, store: LeaseStore) -> list[bool]:
    """`revoke apikey_...` and `--expired` for the pool: release (no API call). Prints a
    line per key; one entry per key named or released, False where it was refused."""
    now = datetime.now(UTC)
    done: list[bool] = []
    for key_id in args.key_ids:
        if ANTHROPIC_KEY_ID_PATTERN.fullmatch(key_id):
            result = release_by_hand(
                store, settings.leases.anthropic, key_id, now, settings.window_grace
            )
            _emit(result.line)
            done.append(not result.refused)
    if args.expired:
        before = _book(store).pool
        after = store.update(lambda book: expire_due(book, now, settings.window_grace))
        for record in after.pool:
            if record.release_reason == "expired" and record not in before:
                _emit(f"{record.key_id}: expired, released; free from {_when(record.free_at)}")
                done.append(True)
    return done


async def _revoke(args: argparse.Namespace) -> int:
    ids = (KEY_ID_PATTERN, ANTHROPIC_KEY_ID_PATTERN)
    bad = [k for k in args.key_ids if not any(p.fullmatch(k) for p in ids)]
    if bad:
        raise LeaseProblem(f"revoke: {bad[0][:64]!r} is not a key id (key_... or apikey_...)")
    if not (args.key_ids or args.settled or args.expired):
        raise LeaseProblem("revoke: name KEY_IDs, or --settled and/or --expired")
    settings, store = _setup(args)
    pool = _release_pool(args, settings, store)
    now = datetime.now(UTC)
    minted = [k for k in args.key_ids if KEY_ID_PATTERN.fullmatch(k)]
    chosen, notes = _select(args, minted, settings, _book(store).leases, now)
    for note in notes:
        _emit(note)
    if not chosen:
        if not notes and not pool:
            _emit("nothing to revoke")
        return EXIT_OK if all(pool) else EXIT_FAILED
    async with aiohttp.ClientSession() as session:
        client = admin_client(settings, session)
        outcomes = await _revoke_now(settings, store, client, chosen, now)
    for outcome in outcomes:
        _emit(_outcome_line(outcome))
    if any(o.auth_error for o in outcomes):
        sys.stderr.write(f"{_PROG}: {_AUTH_HINT}\n")
        return EXIT_AUTH
    if any(o.not_ours for o in outcomes):
        return EXIT_USAGE  # a key id that is not a lease's: nothing of it was touched
    return EXIT_OK if all(pool) and all(o.revoked for o in outcomes) else EXIT_FAILED


# --------------------------------------------------------------------------------------
# Entry points


def main(args: argparse.Namespace) -> int:
    """Run the `lease` command `args` names; returns the exit code. Every failure a user
    can cause or fix is one line on stderr (never a traceback)."""
    try:
        if args.lease_command == "exec":
            return asyncio.run(_exec(args))
        if args.lease_command == "new":
            return asyncio.run(_new(args))
        if args.lease_command == "list":
            return _list(args)
        if args.lease_command == "revoke":
            return asyncio.run(_revoke(args))
        raise LeaseProblem(f"unknown lease command {args.lease_command!r}")
    except LeaseProblem as exc:
        sys.stderr.write(f"{_PROG}: {exc}\n")
        return exc.code
    except ConfigError as exc:
        sys.stderr.write(f"{_PROG}: config error: {exc}\n")
        return EXIT_USAGE
    except LeaseStoreError as exc:
        sys.stderr.write(f"{_PROG}: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def run(argv: Sequence[str] | None = None) -> int:
    """`python -m tokensettle.lease_cli lease ...`: parse and run."""
    try:
        args = build_parser().parse_args(argv)
    except _StandaloneUsage as exc:
        sys.stderr.write(f"tokensettle: {exc}\n")
        return EXIT_USAGE
    return main(args)


if __name__ == "__main__":
    sys.exit(run())

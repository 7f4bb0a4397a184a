"""`tokensettle doctor`: check what the daemon needs, and say how to fix what is missing.

Checks: the configuration loaded; an admin key is set; the key can read usage (one tiny
query for the last full minute); each framework that has runs has a scope (else the whole
organisation's usage counts); the inotify watch limit covers the directories under the
roots; each root exists and is writable; the state directory can be written; the HTTP
address can be bound (a bind test of that address only, closed at once).

The decisions are pure functions of what was observed (`inotify_check`, `root_verdict`,
`state_dir_verdict`, `http_verdict`, `scope_check`, `api_error_check`, ...), so most
tests need no I/O; `run_checks` gathers the observations. The verdicts on what the
settings name share their words with the daemon and the commands (`config.Problem`).
`render` gives one line per check and `exit_code` the command's status: 0 when everything
is ok or only warned, 1 on any failure, 3 when the Usage API refused the key (the CLI's
authentication exit code); a configuration that does not load is the CLI's exit 2.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp

from tokensettle import errors
from tokensettle.admin_api import AdminClient
from tokensettle.config import (
    ConfigError,
    Problem,
    Settings,
    StateDirView,
    current_user,
    http_addr_problem,
    look_at_state_dir,
    probe_write,
    root_problem,
    stat_path,
)
from tokensettle.config import state_dir_verdict as state_dir_problem_of
from tokensettle.discovery import Found, scan_all
from tokensettle.keyids import Resolution, search_projects, unresolved_secrets
from tokensettle.keyids import apply as apply_key_ids
from tokensettle.keyids import resolve as resolve_key_ids
from tokensettle.serve import probe_bind
from tokensettle.usage import Scope
from tokensettle.usage_api import AuthError, UsageApiError, UsageSource
from tokensettle.watcher import choose_mode, fs_type
from tokensettle.windows import MINUTE, Interval, floor_minute

__all__ = [
    "API_CHECK",
    "CREATE_KEY_FIX",
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_OK",
    "HTTP_CHECK",
    "INOTIFY_LIMIT_FILE",
    "Check",
    "admin_key_check",
    "api_error_check",
    "api_not_checked",
    "api_ok_check",
    "config_check",
    "config_error_check",
    "count_dirs",
    "exit_code",
    "framework_env_var",
    "http_verdict",
    "inotify_check",
    "inotify_not_used",
    "last_full_minute",
    "no_runs_check",
    "read_inotify_limit",
    "render",
    "root_verdict",
    "run_checks",
    "scope_check",
    "state_dir_verdict",
    "suggested_watch_limit",
]

EXIT_OK, EXIT_FAILED, EXIT_AUTH = errors.EXIT_OK, errors.EXIT_RUNS_FAILED, errors.EXIT_AUTH

CONFIG_CHECK: Final = "config"
KEY_CHECK: Final = "admin key"
API_CHECK: Final = "usage api"
ANTHROPIC_API_CHECK: Final = "anthropic usage"
INOTIFY_CHECK: Final = "inotify watches"
STATE_CHECK: Final = "state dir"
SCOPES_CHECK: Final = "scopes"
HTTP_CHECK: Final = "http addr"
KEY_IDS_CHECK: Final = "key ids"

INOTIFY_LIMIT_FILE: Final = Path("/proc/sys/fs/inotify/max_user_watches")
#: Fail when the roots need more than this share of the per-user watch limit...
INOTIFY_FAIL_SHARE: Final = 0.9
#: ...and warn above this one: every process of the user (IDEs too) draws on the same limit.
INOTIFY_WARN_SHARE: Final = 0.5
INOTIFY_SUGGESTED_MIN: Final = 524_288

CREATE_KEY_FIX: Final = (
    "create an admin key with api.usage.read (OpenAI platform: Organization settings > "
    "Admin keys) and set it as TOKENSETTLE_ADMIN_KEY or the admin_key credential file"
)
ANTHROPIC_KEY_FIX: Final = (
    "create an Admin API key in the Anthropic Console (Settings > Admin keys, "
    "sk-ant-admin...) and set it as TOKENSETTLE_ANTHROPIC_ADMIN_KEY or the "
    "anthropic_admin_key credential file"
)
_ENV_NAME: Final = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True, slots=True)
class Check:
    """One finding. `ok`: True ok, None a warning, False a failure."""

    name: str
    ok: bool | None
    detail: str
    fix: str | None = None


# --------------------------------------------------------------------------------------
# Pure decisions


def config_check(settings: Settings) -> Check:
    roots = ", ".join(str(r) for r in settings.runs_dirs) or "(none)"
    source = f"config file {settings.config}" if settings.config else "no config file"
    return Check(
        CONFIG_CHECK,
        True,
        f"loaded ({source}); runs dirs {roots}; state dir {settings.state_dir}; "
        f"API {settings.api_base_url}",
    )


def config_error_check(error: ConfigError) -> Check:
    """For the CLI when `load_settings` fails: render it, then exit 2 (a config error)."""
    return Check(
        CONFIG_CHECK,
        False,
        str(error),
        "correct the setting in the environment, the .env file or the TOML config",
    )


def admin_key_check(present: bool, anthropic: bool = False) -> Check:
    """The OpenAI admin key; with only an Anthropic one, OpenAI runs cannot settle."""
    if present:
        also = "; an Anthropic admin key too" if anthropic else ""
        return Check(KEY_CHECK, True, f"set (the value is never shown){also}")
    fix = (
        "set TOKENSETTLE_ADMIN_KEY (or OPENAI_ADMIN_KEY), or provide a file named admin_key "
        "(systemd: LoadCredential=admin_key:/etc/tokensettle/admin_key; Docker: the secret "
        "/run/secrets/admin_key)"
    )
    if anthropic:
        return Check(
            KEY_CHECK, None, "only an Anthropic admin key: OpenAI runs cannot be settled", fix
        )
    return Check(KEY_CHECK, False, "no admin key: nothing can be settled", fix)


def last_full_minute(now: float) -> Interval:
    """The last minute that has ended: `[m, m + 60)` with `m + 60 <= now`."""
    start = floor_minute(now) - MINUTE
    return Interval(start, start + MINUTE)


#: check name -> (what is read, what the key needs for it, the fix of a refused key)
_REPORTS: Final = {
    API_CHECK: ("the Usage API", " (api.usage.read)", CREATE_KEY_FIX),
    ANTHROPIC_API_CHECK: ("Anthropic's usage report", "", ANTHROPIC_KEY_FIX),
}


def api_ok_check(rows: int, interval: Interval, *, name: str = API_CHECK) -> Check:
    return Check(
        name,
        True,
        f"the key can read usage{_REPORTS[name][1]}: {rows} row(s) in the minute "
        f"{datetime.fromtimestamp(interval.start, UTC):%Y-%m-%d %H:%M} UTC",
    )


def api_error_check(
    error: UsageApiError | TimeoutError, base_url: str, *, name: str = API_CHECK
) -> Check:
    what, _, fix = _REPORTS[name]
    if isinstance(error, AuthError):
        return Check(name, False, str(error), fix)
    reason = str(error) if isinstance(error, UsageApiError) else "no answer in time"
    return Check(
        name,
        None,
        f"could not reach {what}: {reason}",
        f"check network access to {base_url} (proxy, firewall, DNS); the key was not "
        "checked. The daemon retries on its own.",
    )


def api_not_checked(reason: str, *, name: str = API_CHECK) -> Check:
    return Check(name, None, f"not checked: {reason}")


def framework_env_var(framework: str) -> str | None:
    """The seed-convention variable for a framework's key ids, if its name can be one."""
    if not _ENV_NAME.fullmatch(framework):
        return None
    return f"OPENAI_API_KEY_{framework.upper()}_ID"


def scope_check(framework: str, scope: Scope, runs: int) -> Check:
    name = f"scope {framework}"
    if not scope.is_organisation:
        parts = []
        if scope.api_key_ids:
            parts.append(f"api_key_ids {', '.join(sorted(scope.api_key_ids))}")
        if scope.project_ids:
            parts.append(f"project_ids {', '.join(sorted(scope.project_ids))}")
        return Check(name, True, f"{'; '.join(parts)} ({runs} run(s))")
    env = framework_env_var(framework)
    # Names that cannot be a variable are quoted: always a valid TOML key.
    key = framework.lower() if env else json.dumps(framework.lower())
    toml = f"[frameworks.{key}] api_key_ids = [...] in the TOML config"
    fix = f"set {env}=key_... (comma-separated key ids), or {toml}" if env else f"add {toml}"
    return Check(
        name,
        None,
        f"no api_key_ids/project_ids: usage of the whole organisation counts ({runs} run(s))",
        fix,
    )


def key_id_check(resolution: Resolution) -> Check:
    """A framework's key id found from its secret (OPENAI_API_KEY_<FW>), or why not."""
    name = f"{KEY_IDS_CHECK} ({resolution.framework})"
    env = f"OPENAI_API_KEY_{resolution.framework.upper()}"
    if resolution.key_id is not None:
        return Check(name, True, f"{env} is {resolution.key_id} (project {resolution.project_id})")
    return Check(
        name,
        None,
        f"{env} is set but its id was not found: {resolution.problem}",
        f"set {env}_ID=key_... by hand",
    )


def no_runs_check() -> Check:
    return Check(SCOPES_CHECK, True, "no runs under the roots yet: no framework to match")


def suggested_watch_limit(dirs: int) -> int:
    """A power of two with room for twice the directories, at least 524288."""
    want = max(2 * dirs, 1)
    return max(INOTIFY_SUGGESTED_MIN, 1 << math.ceil(math.log2(want)))


def inotify_check(limit: int, dirs: int) -> Check:
    """`dirs` directories (one watch each) against the per-user watch `limit`."""
    share = dirs / limit if limit > 0 else math.inf
    pct = f"{share:.0%}" if math.isfinite(share) else "all"
    detail = (
        f"{dirs} directories under the roots need {pct} of fs.inotify.max_user_watches "
        f"= {limit} (shared by every process of the user) at most: settled runs hold "
        "no watch, but a burst of unsettled ones holds one each"
    )
    if share <= INOTIFY_WARN_SHARE:
        return Check(INOTIFY_CHECK, True, detail)
    suggest = suggested_watch_limit(dirs)
    fix = (
        f"sudo sysctl fs.inotify.max_user_watches={suggest}, and keep it: echo "
        f"fs.inotify.max_user_watches={suggest} | sudo tee /etc/sysctl.d/90-tokensettle.conf "
        "(or TOKENSETTLE_WATCH_MODE=poll)"
    )
    ok: bool | None = None if share <= INOTIFY_FAIL_SHARE else False
    return Check(INOTIFY_CHECK, ok, detail, fix)


def inotify_not_used(reason: str) -> Check:
    return Check(INOTIFY_CHECK, True, f"not used: {reason}")


def _write_access_fix(path: Path, user: str) -> str:
    return (
        f"give {user} write access, e.g. chgrp -R <experiments group> {path} && "
        f"chmod -R g+rwX {path} && find {path} -type d -exec chmod g+s {{}} + "
        f"(with {user} in that group)"
    )


def root_verdict(
    root: Path,
    *,
    exists: bool,
    is_dir: bool,
    accessible: bool,
    probe_error: OSError | None,
    user: str,
    runs: int = 0,
    reach_error: OSError | None = None,
) -> Check:
    """A runs root: it must be a directory we can enter and write (create, then delete, a
    probe file). `accessible` is `os.access(root, W_OK | X_OK)`; `reach_error` is why
    `stat` failed other than "no such file" (EACCES on a directory above it)."""
    name = f"runs dir {root}"
    problem = root_problem(root, exists=exists, is_dir=is_dir, reach_error=reach_error, user=user)
    if problem is not None:
        return _failed(name, problem, with_subject=False)
    if probe_error is not None and probe_error.errno == errno.EROFS:
        return Check(
            name,
            False,
            "is on a read-only file system",
            "under systemd list it in ReadWritePaths= (ProtectSystem=strict); in Docker "
            "mount it without :ro",
        )
    if not accessible or (
        probe_error is not None and probe_error.errno in (errno.EACCES, errno.EPERM)
    ):
        why = f": {probe_error.strerror}" if probe_error is not None else ""
        return Check(name, False, f"not writable by {user}{why}", _write_access_fix(root, user))
    if probe_error is not None:
        return Check(
            name,
            False,
            f"a test file could not be written: {probe_error.strerror or probe_error}",
            "check the file system (space, quota, mount options)",
        )
    return Check(name, True, f"writable by {user}; {runs} run(s)")


def _failed(name: str, problem: Problem, *, with_subject: bool = True) -> Check:
    detail = f"{problem.subject} {problem.what}" if with_subject else problem.what
    return Check(name, False, detail, problem.fix)


def state_dir_verdict(view: StateDirView, user: str) -> Check:
    """The state directory (SQLite index): outside the watched roots, and writable, or
    creatable under its nearest existing ancestor (the words are the daemon's)."""
    problem = state_dir_problem_of(view, user)
    if problem is not None:
        return _failed(STATE_CHECK, problem)
    if view.exists:
        return Check(STATE_CHECK, True, f"{view.path} is writable by {user}")
    return Check(
        STATE_CHECK, True, f"{view.path} does not exist yet; it will be created in {view.ancestor}"
    )


def http_verdict(addr: str, error: OSError | None, *, daemon: str | None = None) -> Check:
    """The HTTP address: free to bind (`error` None), or taken by a tokensettle daemon
    that answers /healthz there (`daemon`, its version: a warning, as doctor is often run
    beside the service), or unusable for the daemon's HTTP server."""
    if not addr:
        return Check(HTTP_CHECK, True, "disabled (empty HTTP_ADDR): no /healthz, /metrics, /runs")
    if error is None:
        return Check(HTTP_CHECK, True, f"{addr} is free")
    if daemon is not None and error.errno == errno.EADDRINUSE:
        return Check(
            HTTP_CHECK,
            None,
            f"{addr} is served by a running tokensettle {daemon}; a second daemon with this "
            "address would not start",
        )
    return _failed(HTTP_CHECK, http_addr_problem(addr, error))


# --------------------------------------------------------------------------------------
# Output


_LABELS: Final = {True: "ok", None: "WARN", False: "FAIL"}


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def render(checks: Sequence[Check]) -> str:
    """One line per check (`ok`, `WARN` or `FAIL`, the name, the detail), and an indented
    `fix:` line under any check that has one. No trailing newline."""
    lines: list[str] = []
    for check in checks:
        lines.append(f"{_LABELS[check.ok]:<4}  {check.name}: {_one_line(check.detail)}")
        if check.fix:
            lines.append(f"      fix: {_one_line(check.fix)}")
    return "\n".join(lines)


def exit_code(checks: Iterable[Check]) -> int:
    """0 when all are ok or warnings, 3 when the Usage API refused the key, else 1 on any
    failure."""
    checks = list(checks)
    if any(c.name == API_CHECK and c.ok is False for c in checks):
        return EXIT_AUTH
    if any(c.ok is False for c in checks):
        return EXIT_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------------------
# Observations (I/O)


def read_inotify_limit(path: Path = INOTIFY_LIMIT_FILE) -> int | None:
    """The per-user watch limit, or None where there is no such file (not Linux)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def count_dirs(root: Path) -> int:
    """Directories under `root`, itself included: one inotify watch each. Symlinked
    directories are not followed (the watcher does not follow them either)."""
    count = 0
    stack = [root]
    while stack:
        directory = stack.pop()
        count += 1
        try:
            with os.scandir(directory) as entries:
                stack.extend(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue
    return count


def _root_check(root: Path, user: str, runs: int) -> Check:
    found = stat_path(root)
    accessible = found.is_dir and os.access(root, os.W_OK | os.X_OK)
    return root_verdict(
        root,
        exists=found.exists,
        is_dir=found.is_dir,
        accessible=accessible,
        probe_error=probe_write(root) if found.is_dir else None,
        user=user,
        runs=runs,
        reach_error=found.error,
    )


_LOOPBACK_FOR: Final = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - not bound here


async def _daemon_at(host: str, port: int) -> str | None:
    """The version of a tokensettle daemon answering /healthz at the address, or None."""
    target = _LOOPBACK_FOR.get(host, host)
    url = (
        f"http://[{target}]:{port}/healthz" if ":" in target else f"http://{target}:{port}/healthz"
    )
    body: Any = None
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as resp,
        ):
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    if isinstance(body, dict) and {"version", "tracked_runs", "status"} <= body.keys():
        return str(body["version"])
    return None


async def _http_check(settings: Settings) -> Check:
    bind = settings.http_bind()
    if bind is None:
        return http_verdict("", None)
    error = await asyncio.to_thread(probe_bind, *bind)
    daemon = None
    if error is not None and error.errno == errno.EADDRINUSE:
        daemon = await _daemon_at(*bind)
    return http_verdict(settings.http_addr, error, daemon=daemon)


def _inotify(settings: Settings, limit_file: Path) -> Check | None:
    roots = [r for r in settings.runs_dirs if stat_path(r).is_dir]
    watched = [r for r in roots if choose_mode(settings.watch_mode, fs_type(r)) == "inotify"]
    if not watched:
        if settings.watch_mode == "poll":
            return inotify_not_used("watch_mode=poll")
        return inotify_not_used("no root is watched with inotify")
    limit = read_inotify_limit(limit_file)
    if limit is None:
        return None  # no such file (not Linux): nothing to compare
    return inotify_check(limit, sum(count_dirs(r) for r in watched))


def _scan(roots: Sequence[Path]) -> list[Found]:
    """The runs under every root that can be read (an unreadable root is reported by its
    own check)."""
    found: dict[Path, Found] = {}
    for root in roots:
        try:
            items = scan_all([root])
        except OSError:
            continue
        for item in items:
            found.setdefault(item.path, item)
    return list(found.values())


def _filesystem_checks(settings: Settings, limit_file: Path) -> list[Check]:
    user = current_user()
    roots = list(settings.runs_dirs)
    found = _scan(roots)
    per_root = Counter(f.root for f in found)
    checks = [_root_check(r, user, per_root[r]) for r in roots]
    view = look_at_state_dir(Path(settings.state_dir), roots, probe=True)
    checks.append(state_dir_verdict(view, user))
    inotify = _inotify(settings, limit_file)
    if inotify is not None:
        checks.append(inotify)
    per_framework = Counter(f.framework for f in found)
    if not per_framework:
        checks.append(no_runs_check())
    checks.extend(
        scope_check(fw, settings.scope_for(fw), n) for fw, n in sorted(per_framework.items())
    )
    return checks


async def _api_check(
    client: UsageSource | None,
    now: float,
    seconds: float,
    *,
    base_url: str,
    missing: str | None,
    name: str = API_CHECK,
) -> Check:
    """One minute of a provider's usage report read with the configured key."""
    if missing is not None:
        return api_not_checked(missing, name=name)
    if client is None:
        return api_not_checked("no usage report client", name=name)
    interval = last_full_minute(now)
    try:
        async with asyncio.timeout(seconds):
            result = await client.fetch(interval)
    except (UsageApiError, TimeoutError) as exc:
        return api_error_check(exc, base_url, name=name)
    return api_ok_check(len(result.rows), interval, name=name)


async def run_checks(
    settings: Settings,
    client: UsageSource | None,
    *,
    clock: Callable[[], float] = time.time,
    inotify_limit_file: Path = INOTIFY_LIMIT_FILE,
    api_timeout: float = 60.0,
    admin: AdminClient | None = None,
    environ: Mapping[str, str] | None = None,
    anthropic: UsageSource | None = None,
) -> list[Check]:
    """Every check, in a stable order: config, admin key, Usage API (and Anthropic's usage
    report when its key is set), HTTP address, runs dirs, state dir, inotify, scopes. The
    API queries and the bind test run while the file system is looked at.

    `client` (OpenAI's) and `anthropic` may be None when there is no key to build one
    with. Give them few retries (`quick=True`): a doctor should answer in seconds.
    """
    has_anthropic = bool(settings.anthropic_key())
    head = [config_check(settings), admin_key_check(bool(settings.secret_key()), has_anthropic)]
    if admin is not None:
        wanted = unresolved_secrets(os.environ if environ is None else environ, settings)
        resolutions = await resolve_key_ids(admin, search_projects(settings), wanted)
        head += [key_id_check(r) for r in resolutions]
        # As the daemon and reconcile do: a resolved id is the framework's scope, so the
        # scope checks below judge what will really be used.
        apply_key_ids(settings, [r for r in resolutions if r.key_id is not None])
    now = clock()
    apis = [
        asyncio.create_task(
            _api_check(
                client,
                now,
                api_timeout,
                base_url=settings.api_base_url,
                missing=None if settings.secret_key() else "no admin key",
            )
        )
    ]
    if has_anthropic:
        apis.append(
            asyncio.create_task(
                _api_check(
                    anthropic,
                    now,
                    api_timeout,
                    base_url=settings.anthropic_api_base_url,
                    missing=None,
                    name=ANTHROPIC_API_CHECK,
                )
            )
        )
    http = asyncio.create_task(_http_check(settings))
    try:
        files = await asyncio.to_thread(_filesystem_checks, settings, inotify_limit_file)
    except BaseException:
        for task in (*apis, http):
            task.cancel()
        await asyncio.gather(*apis, http, return_exceptions=True)
        raise
    return [*head, *[await api for api in apis], await http, *files]

"""`tokensettle doctor` against the real simulator over loopback and real directories."""

from __future__ import annotations

import os
import pwd
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest

from tests.support.daemon import free_port
from tests.support.runs import SimControl
from tokensettle.config import PROBE_PREFIX, Settings, load_settings
from tokensettle.doctor import (
    API_CHECK,
    CREATE_KEY_FIX,
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_OK,
    HTTP_CHECK,
    Check,
    exit_code,
    last_full_minute,
    render,
    run_checks,
)
from tokensettle.simulator.server import SIMULATOR_ADMIN_KEY, RunningSimulator
from tokensettle.usage_api import RetryPolicy, UsageClient

SCOPED = {"OPENAI_API_KEY_CHATDEV_ID": "key_chatdevTEST001"}


def make_runs(root: Path, *runs: str) -> Path:
    """`framework/run_id` entries become root/framework/run_id/metrics.json."""
    root.mkdir(parents=True, exist_ok=True)
    for run in runs:
        path = root / run / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    return root


def make_settings(
    tmp_path: Path,
    base_url: str,
    key: str | None,
    *,
    environ: dict[str, str] | None = None,
    config_file: Path | None = None,
    **values: Any,
) -> Settings:
    given: dict[str, Any] = {
        "runs_dirs": [tmp_path / "runs"],
        "api_base_url": base_url,
        "state_dir": tmp_path / "state",
        "http_addr": f"127.0.0.1:{free_port()}",
        **values,
    }
    if key is not None:
        given["admin_key"] = key
    return load_settings(given, environ=environ or {}, config_file=config_file)


def client_for(settings: Settings, session: aiohttp.ClientSession) -> UsageClient:
    key = settings.secret_key()
    assert key is not None
    return UsageClient(
        base_url=settings.api_base_url,
        admin_key=key,
        session=session,
        request_timeout=10.0,
        retry=RetryPolicy(attempts=1),
    )


def pwd_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def no_probe_left(*directories: Path) -> bool:
    return not any(p.name.startswith(PROBE_PREFIX) for d in directories for p in d.rglob("*"))


def assert_key_hidden(checks: list[Check], key: str) -> None:
    assert key not in render(checks)
    assert all(key not in (c.fix or "") for c in checks)


# --------------------------------------------------------------------------------------
# The Usage API


async def test_a_healthy_setup_is_all_ok(
    tmp_path: Path, sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    root = make_runs(tmp_path / "runs", "chatdev/r1", "chatdev/r2")
    settings = make_settings(tmp_path, sim.base_url, SIMULATOR_ADMIN_KEY, environ=SCOPED)
    now = time.time()
    checks = await run_checks(settings, client_for(settings, session), clock=lambda: now)

    assert [c.name for c in checks] == [
        "config",
        "admin key",
        API_CHECK,
        HTTP_CHECK,
        f"runs dir {root}",
        "state dir",
        "inotify watches",
        "scope chatdev",
    ]
    assert [c.ok for c in checks] == [True] * len(checks), render(checks)
    assert exit_code(checks) == EXIT_OK
    assert "2 run(s)" in by_name(checks)[f"runs dir {root}"].detail
    # exactly one tiny query: the last full minute, one-minute buckets
    assert len(sim.request_log) == 1
    query = parse_qs(sim.request_log[0].query)
    minute = last_full_minute(now)
    assert query["start_time"] == [str(minute.start)]
    assert query["end_time"] == [str(minute.end)]
    assert query["bucket_width"] == ["1m"]
    assert no_probe_left(root)
    assert not (tmp_path / "state").exists(), "the doctor must not create the state dir"
    assert_key_hidden(checks, SIMULATOR_ADMIN_KEY)


async def test_a_key_without_the_usage_scope_fails_with_exit_3(
    tmp_path: Path,
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    control: SimControl,
) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    await control.keys([SIMULATOR_ADMIN_KEY], ["sk-proj-x"])
    settings = make_settings(tmp_path, sim.base_url, "sk-proj-x", environ=SCOPED)
    checks = await run_checks(settings, client_for(settings, session))

    api = by_name(checks)[API_CHECK]
    assert api.ok is False
    assert "403" in api.detail
    assert "Missing scopes: api.usage.read" in api.detail
    assert api.fix == CREATE_KEY_FIX
    assert exit_code(checks) == EXIT_AUTH
    assert_key_hidden(checks, "sk-proj-x")
    assert "FAIL  usage api:" in render(checks)
    assert "      fix: create an admin key with api.usage.read" in render(checks)


async def test_an_unknown_key_fails_with_exit_3(
    tmp_path: Path, sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    settings = make_settings(tmp_path, sim.base_url, "sk-admin-wrong", environ=SCOPED)
    checks = await run_checks(settings, client_for(settings, session))
    api = by_name(checks)[API_CHECK]
    assert api.ok is False and "401" in api.detail
    assert exit_code(checks) == EXIT_AUTH
    assert_key_hidden(checks, "sk-admin-wrong")


async def test_a_server_error_is_only_a_warning(
    tmp_path: Path,
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    control: SimControl,
) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    await control.faults({"kind": "500"})
    settings = make_settings(tmp_path, sim.base_url, SIMULATOR_ADMIN_KEY, environ=SCOPED)
    checks = await run_checks(settings, client_for(settings, session))
    api = by_name(checks)[API_CHECK]
    assert api.ok is None
    assert api.detail.startswith("could not reach the Usage API: ")
    assert "500" in api.detail
    assert exit_code(checks) == EXIT_OK
    assert sim.stats()["by_status"] == {"500": 1}


async def test_nothing_listening_is_only_a_warning(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"  # closed again: connection refused
    settings = make_settings(tmp_path, base, SIMULATOR_ADMIN_KEY, environ=SCOPED)
    checks = await run_checks(settings, client_for(settings, session))
    api = by_name(checks)[API_CHECK]
    assert api.ok is None
    assert api.detail.startswith("could not reach the Usage API: ")
    assert api.fix is not None and base in api.fix
    assert exit_code(checks) == EXIT_OK


async def test_an_api_that_never_answers_is_bounded_by_the_doctor(
    tmp_path: Path,
    sim: RunningSimulator,
    session: aiohttp.ClientSession,
    control: SimControl,
) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    await control.faults({"kind": "hang", "seconds": 60})
    settings = make_settings(tmp_path, sim.base_url, SIMULATOR_ADMIN_KEY, environ=SCOPED)
    began = time.monotonic()
    checks = await run_checks(settings, client_for(settings, session), api_timeout=0.5)
    assert time.monotonic() - began < 10
    api = by_name(checks)[API_CHECK]
    assert api.ok is None
    assert api.detail == "could not reach the Usage API: no answer in time"


async def test_without_a_key_nothing_is_sent(tmp_path: Path, sim: RunningSimulator) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED)
    checks = await run_checks(settings, None)
    found = by_name(checks)
    assert found["admin key"].ok is False
    assert found[API_CHECK] == Check(API_CHECK, None, "not checked: no admin key")
    assert exit_code(checks) == EXIT_FAILED
    assert sim.request_log == []


# --------------------------------------------------------------------------------------
# Scopes: the suggested fix, applied, makes the warning go away


async def test_an_unscoped_framework_warns_and_the_suggested_variable_fixes_it(
    tmp_path: Path, sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1", "baes/r1", "baes/r2")
    settings = make_settings(tmp_path, sim.base_url, SIMULATOR_ADMIN_KEY, environ=SCOPED)
    checks = await run_checks(settings, client_for(settings, session))
    baes = by_name(checks)["scope baes"]
    assert baes.ok is None
    assert baes.detail == (
        "no api_key_ids/project_ids: usage of the whole organisation counts (2 run(s))"
    )
    assert baes.fix is not None and baes.fix.startswith("set OPENAI_API_KEY_BAES_ID=key_")
    assert by_name(checks)["scope chatdev"].ok is True
    assert exit_code(checks) == EXIT_OK  # a warning is not a failure

    fixed = make_settings(
        tmp_path,
        sim.base_url,
        SIMULATOR_ADMIN_KEY,
        environ={**SCOPED, "OPENAI_API_KEY_BAES_ID": "key_baesTEST00001"},
    )
    again = by_name(await run_checks(fixed, client_for(fixed, session)))
    assert again["scope baes"].ok is True
    assert "key_baesTEST00001" in again["scope baes"].detail


async def test_a_framework_name_with_a_dash_gets_a_toml_fix_that_works(
    tmp_path: Path, sim: RunningSimulator, session: aiohttp.ClientSession
) -> None:
    make_runs(tmp_path / "runs", "gh-spec/r1")
    settings = make_settings(tmp_path, sim.base_url, SIMULATOR_ADMIN_KEY)
    check = by_name(await run_checks(settings, client_for(settings, session)))["scope gh-spec"]
    assert check.ok is None
    assert check.fix == 'add [frameworks."gh-spec"] api_key_ids = [...] in the TOML config'

    toml = tmp_path / "tokensettle.toml"
    toml.write_text('[frameworks."gh-spec"]\napi_key_ids = ["key_ghspecTEST0001"]\n')
    fixed = make_settings(tmp_path, sim.base_url, SIMULATOR_ADMIN_KEY, config_file=toml)
    again = by_name(await run_checks(fixed, client_for(fixed, session)))
    assert again["scope gh-spec"].ok is True
    assert f"config file {toml}" in again["config"].detail


async def test_no_runs_yet_is_fine(tmp_path: Path, sim: RunningSimulator) -> None:
    (tmp_path / "runs").mkdir()
    settings = make_settings(tmp_path, sim.base_url, None)
    found = by_name(await run_checks(settings, None))
    assert found["scopes"].ok is True
    assert not any(name.startswith("scope ") for name in found)


# --------------------------------------------------------------------------------------
# Roots and the state dir


async def test_missing_and_non_directory_roots_fail(tmp_path: Path, sim: RunningSimulator) -> None:
    good = make_runs(tmp_path / "runs", "chatdev/r1")
    missing = tmp_path / "nowhere"
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    settings = make_settings(
        tmp_path, sim.base_url, None, environ=SCOPED, runs_dirs=[good, missing, a_file]
    )
    found = by_name(await run_checks(settings, None))
    assert found[f"runs dir {good}"].ok is True
    assert found[f"runs dir {missing}"].ok is False
    assert found[f"runs dir {missing}"].detail == "does not exist"
    assert found[f"runs dir {a_file}"].ok is False
    assert found[f"runs dir {a_file}"].detail == "is not a directory"
    assert not missing.exists(), "the doctor must not create roots"


async def test_a_root_behind_a_directory_we_cannot_enter_fails_without_raising(
    tmp_path: Path, sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a non-root user sees for a root under a 0700 directory (or under /home with
    ProtectHome=yes): stat fails with EACCES, and pathlib's exists()/is_dir() raise it.
    Simulated, since these tests may run as root, for whom EACCES never happens."""
    good = make_runs(tmp_path / "runs", "chatdev/r1")
    hidden = make_runs(tmp_path / "private" / "runs", "baes/r1")
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(path) == hidden or hidden in Path(path).parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED, runs_dirs=[good, hidden])
    found = by_name(await run_checks(settings, None))
    assert found[f"runs dir {hidden}"].ok is False
    assert found[f"runs dir {hidden}"].detail.endswith(": Permission denied")
    assert found[f"runs dir {hidden}"].detail.startswith("cannot be reached by ")
    assert found[f"runs dir {good}"].ok is True
    assert "scope chatdev" in found
    assert "scope baes" not in found  # its runs could not be read


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any mode bits")
async def test_a_read_only_root_fails(tmp_path: Path, sim: RunningSimulator) -> None:
    root = make_runs(tmp_path / "runs", "chatdev/r1")
    root.chmod(0o555)
    try:
        settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED)
        check = by_name(await run_checks(settings, None))[f"runs dir {root}"]
    finally:
        root.chmod(0o755)
    assert check.ok is False
    assert check.detail.startswith("not writable by ")


async def test_a_state_dir_inside_a_root_fails(tmp_path: Path, sim: RunningSimulator) -> None:
    root = make_runs(tmp_path / "runs", "chatdev/r1")
    (root / ".state").mkdir()
    settings = make_settings(
        tmp_path, sim.base_url, None, environ=SCOPED, state_dir=root / ".state"
    )
    check = by_name(await run_checks(settings, None))["state dir"]
    assert check.ok is False
    assert f"inside the watched root {root}" in check.detail


async def test_an_existing_state_dir_is_probed_and_left_clean(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    state = tmp_path / "state"
    state.mkdir()
    (state / "index.sqlite").write_bytes(b"")
    settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED)
    check = by_name(await run_checks(settings, None))["state dir"]
    assert check == Check("state dir", True, f"{state} is writable by {pwd_name()}")
    assert sorted(p.name for p in state.iterdir()) == ["index.sqlite"]


async def test_a_state_dir_that_is_a_file_fails(tmp_path: Path, sim: RunningSimulator) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    (tmp_path / "state").write_text("")
    settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED)
    assert by_name(await run_checks(settings, None))["state dir"].ok is False


# --------------------------------------------------------------------------------------
# inotify


async def test_a_tree_too_big_for_the_watch_limit_fails(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    root = make_runs(tmp_path / "runs", *(f"chatdev/r{i}" for i in range(12)))
    limit = tmp_path / "max_user_watches"
    limit.write_text("10\n")  # 1 root + 1 framework + 12 runs = 14 directories
    settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED, watch_mode="inotify")
    checks = await run_checks(settings, None, inotify_limit_file=limit)
    check = by_name(checks)["inotify watches"]
    assert check.ok is False
    assert check.detail.startswith("14 directories under the roots need 140% ")
    assert check.fix is not None
    assert check.fix.startswith("sudo sysctl fs.inotify.max_user_watches=524288")
    assert exit_code(checks) == EXIT_FAILED

    limit.write_text("1000\n")
    assert by_name(await run_checks(settings, None, inotify_limit_file=limit))["inotify watches"].ok
    assert root.is_dir()


async def test_without_the_proc_file_the_watch_limit_is_not_checked(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED, watch_mode="inotify")
    checks = await run_checks(settings, None, inotify_limit_file=tmp_path / "absent")
    assert "inotify watches" not in by_name(checks)


async def test_polling_needs_no_watches(tmp_path: Path, sim: RunningSimulator) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    limit = tmp_path / "max_user_watches"
    limit.write_text("1\n")
    settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED, watch_mode="poll")
    check = by_name(await run_checks(settings, None, inotify_limit_file=limit))["inotify watches"]
    assert check == Check("inotify watches", True, "not used: watch_mode=poll")


# --------------------------------------------------------------------------------------
# HTTP address


async def test_a_free_http_addr_is_ok_and_left_free(tmp_path: Path, sim: RunningSimulator) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    port = free_port()
    settings = make_settings(
        tmp_path, sim.base_url, None, environ=SCOPED, http_addr=f"127.0.0.1:{port}"
    )
    check = by_name(await run_checks(settings, None))[HTTP_CHECK]
    assert check == Check(HTTP_CHECK, True, f"127.0.0.1:{port} is free")
    with socket.socket() as again:  # the bind test closed its socket
        again.bind(("127.0.0.1", port))


async def test_an_http_addr_in_use_fails_with_the_daemons_words(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED, http_addr=addr)
        checks = await run_checks(settings, None)
    check = by_name(checks)[HTTP_CHECK]
    assert check.ok is False
    assert check.detail == f"{addr} is in use by another process"
    assert check.fix is not None and "choose a free port" in check.fix
    assert exit_code(checks) == EXIT_FAILED


async def test_an_address_not_of_this_machine_fails(tmp_path: Path, sim: RunningSimulator) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    # TEST-NET-1 (RFC 5737): never assigned to an interface, so bind() says EADDRNOTAVAIL.
    settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED, http_addr="192.0.2.1:80")
    check = by_name(await run_checks(settings, None))[HTTP_CHECK]
    assert check.ok is False
    assert check.detail == "192.0.2.1:80 is not an address of this machine (192.0.2.1)"


async def test_no_http_server_is_fine(tmp_path: Path, sim: RunningSimulator) -> None:
    make_runs(tmp_path / "runs", "chatdev/r1")
    settings = make_settings(tmp_path, sim.base_url, None, environ=SCOPED, http_addr="")
    assert by_name(await run_checks(settings, None))[HTTP_CHECK].ok is True

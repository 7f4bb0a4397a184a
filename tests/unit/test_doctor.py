"""The doctor's decisions, without I/O: each verdict, the output format, the exit code."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokensettle.config import ConfigError, StateDirView, frameworks_from_env, load_settings
from tokensettle.doctor import (
    API_CHECK,
    CREATE_KEY_FIX,
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_OK,
    Check,
    admin_key_check,
    api_error_check,
    api_ok_check,
    config_check,
    config_error_check,
    exit_code,
    framework_env_var,
    inotify_check,
    last_full_minute,
    render,
    root_verdict,
    scope_check,
    state_dir_verdict,
    suggested_watch_limit,
)
from tokensettle.usage import Scope
from tokensettle.usage_api import AuthError, BadRequestError, ServerError, TransportError
from tokensettle.windows import Interval

ROOT = Path("/srv/experiments/runs")
BASE = "https://api.openai.com/v1"

# --------------------------------------------------------------------------------------
# inotify


def test_inotify_well_under_the_limit_is_ok() -> None:
    check = inotify_check(limit=8192, dirs=100)
    assert check.ok is True
    assert "100 directories" in check.detail and "8192" in check.detail
    assert check.fix is None


def test_inotify_over_half_the_shared_limit_warns() -> None:
    check = inotify_check(limit=1000, dirs=600)
    assert check.ok is None
    assert check.fix is not None and "sysctl fs.inotify.max_user_watches=" in check.fix


@pytest.mark.parametrize(("dirs", "ok"), [(900, None), (901, False), (5000, False)])
def test_inotify_fails_above_ninety_percent(dirs: int, ok: bool | None) -> None:
    check = inotify_check(limit=1000, dirs=dirs)
    assert check.ok is ok
    assert check.fix is not None
    assert f"fs.inotify.max_user_watches={suggested_watch_limit(dirs)}" in check.fix
    assert "/etc/sysctl.d/" in check.fix
    assert "TOKENSETTLE_WATCH_MODE=poll" in check.fix


def test_inotify_with_a_zero_limit_fails() -> None:
    assert inotify_check(limit=0, dirs=1).ok is False


@given(st.integers(min_value=0, max_value=10**8))
def test_the_suggested_limit_is_a_power_of_two_that_makes_the_check_pass(dirs: int) -> None:
    suggest = suggested_watch_limit(dirs)
    assert suggest & (suggest - 1) == 0
    assert suggest >= 524_288
    assert suggest >= 2 * dirs
    assert inotify_check(suggest, dirs).ok is True


_RANK = {True: 0, None: 1, False: 2}


@given(
    st.integers(min_value=1, max_value=10**7),
    st.integers(min_value=0, max_value=10**7),
    st.integers(min_value=0, max_value=10**7),
)
def test_more_directories_never_look_better(limit: int, a: int, b: int) -> None:
    fewer, more = sorted((a, b))
    assert _RANK[inotify_check(limit, fewer).ok] <= _RANK[inotify_check(limit, more).ok]


# --------------------------------------------------------------------------------------
# scopes


def test_a_framework_without_scope_warns_with_the_exact_variable() -> None:
    check = scope_check("chatdev", Scope(), runs=3)
    assert check.name == "scope chatdev"
    assert check.ok is None
    assert check.detail.startswith(
        "no api_key_ids/project_ids: usage of the whole organisation counts"
    )
    assert check.fix is not None
    assert check.fix.startswith("set OPENAI_API_KEY_CHATDEV_ID=key_")
    assert "[frameworks.chatdev]" in check.fix


def test_the_suggested_variable_is_the_one_config_reads() -> None:
    for framework in ("chatdev", "ChatDev", "gh_spec", "baes2"):
        env = framework_env_var(framework)
        assert env is not None
        assert frameworks_from_env({env: "key_1"}) == {framework.lower(): ["key_1"]}
        settings = load_settings({}, environ={env: "key_1"})
        assert settings.scope_for(framework) == Scope(frozenset({"key_1"}))


def test_a_name_no_variable_can_carry_gets_the_toml_fix_only() -> None:
    assert framework_env_var("gh-spec") is None
    check = scope_check("gh-spec", Scope(), runs=1)
    assert check.ok is None
    assert check.fix is not None
    assert "OPENAI_API_KEY" not in check.fix
    assert '[frameworks."gh-spec"] api_key_ids' in check.fix


def test_a_scoped_framework_is_ok_and_names_its_scope() -> None:
    check = scope_check("baes", Scope(frozenset({"key_b", "key_a"}), frozenset({"proj_1"})), 2)
    assert check.ok is True
    assert check.detail == "api_key_ids key_a, key_b; project_ids proj_1 (2 run(s))"
    assert check.fix is None


# --------------------------------------------------------------------------------------
# the Usage API


def test_an_auth_error_fails_with_the_message_and_the_fix() -> None:
    error = AuthError(
        "Usage API answered HTTP 403: ... Missing scopes: api.usage.read.", status=403
    )
    check = api_error_check(error, BASE)
    assert check.name == API_CHECK
    assert check.ok is False
    assert "Missing scopes: api.usage.read" in check.detail
    assert check.fix == CREATE_KEY_FIX
    assert check.fix.startswith("create an admin key with api.usage.read")


@pytest.mark.parametrize(
    "error",
    [
        ServerError("Usage API answered HTTP 503: busy", status=503),
        TransportError("Usage API request failed: ClientConnectorError"),
        BadRequestError("Usage API answered HTTP 400: bad", status=400),
        TimeoutError(),
    ],
)
def test_other_failures_warn_that_the_api_was_not_reached(
    error: ServerError | TransportError | BadRequestError | TimeoutError,
) -> None:
    check = api_error_check(error, BASE)
    assert check.ok is None
    assert check.detail.startswith("could not reach the Usage API: ")
    assert check.fix is not None and BASE in check.fix


def test_a_readable_key_is_ok() -> None:
    check = api_ok_check(4, Interval(1_700_000_040, 1_700_000_100))
    assert check.ok is True
    assert "4 row(s)" in check.detail and "2023-11-14 22:14 UTC" in check.detail


@given(st.floats(min_value=1e9, max_value=4e9, allow_nan=False))
def test_the_probe_minute_is_the_last_one_that_has_ended(now: float) -> None:
    minute = last_full_minute(now)
    assert minute.minutes == 1
    assert minute.end <= now < minute.end + 60


# --------------------------------------------------------------------------------------
# config and key


def test_config_check_names_roots_and_state_but_never_the_key(tmp_path: Path) -> None:
    settings = load_settings(
        {"runs_dirs": [tmp_path / "a", tmp_path / "b"], "admin_key": "sk-admin-SECRET-1"},
        environ={},
    )
    check = config_check(settings)
    assert check.ok is True
    assert str(tmp_path / "a") in check.detail and str(tmp_path / "b") in check.detail
    assert str(settings.state_dir) in check.detail
    checks = [check, admin_key_check(True)]
    assert "SECRET" not in render(checks)


def test_a_config_error_is_a_failure() -> None:
    check = config_error_check(ConfigError("min_age (TOKENSETTLE_MIN_AGE): needs a unit"))
    assert check.ok is False
    assert "TOKENSETTLE_MIN_AGE" in check.detail
    assert exit_code([check]) == EXIT_FAILED


def test_a_missing_key_fails_and_says_where_a_key_can_come_from() -> None:
    check = admin_key_check(False)
    assert check.ok is False
    assert check.fix is not None
    for where in ("TOKENSETTLE_ADMIN_KEY", "LoadCredential=admin_key:", "/run/secrets/admin_key"):
        assert where in check.fix
    assert admin_key_check(True).ok is True


# --------------------------------------------------------------------------------------
# runs roots


def _root(
    *,
    exists: bool = True,
    is_dir: bool = True,
    accessible: bool = True,
    probe_error: OSError | None = None,
) -> Check:
    return root_verdict(
        ROOT,
        exists=exists,
        is_dir=is_dir,
        accessible=accessible,
        probe_error=probe_error,
        user="tokensettle",
        runs=7,
    )


def test_a_writable_root_is_ok() -> None:
    check = _root()
    assert check == Check(f"runs dir {ROOT}", True, "writable by tokensettle; 7 run(s)")


def test_an_unreachable_root_fails_before_anything_else() -> None:
    check = root_verdict(
        ROOT,
        exists=False,
        is_dir=False,
        accessible=False,
        probe_error=None,
        user="tokensettle",
        reach_error=PermissionError(errno.EACCES, "Permission denied"),
    )
    assert check.ok is False
    assert check.detail == "cannot be reached by tokensettle: Permission denied"
    assert check.fix is not None and "ProtectHome=read-only" in check.fix


def test_a_missing_root_fails_with_mkdir() -> None:
    check = _root(exists=False, is_dir=False, accessible=False)
    assert check.ok is False and check.detail == "does not exist"
    assert check.fix is not None and f"mkdir -p {ROOT}" in check.fix


def test_a_file_as_root_fails() -> None:
    check = _root(is_dir=False, accessible=False)
    assert check.ok is False and check.detail == "is not a directory"


def test_a_root_without_write_permission_fails_with_a_group_fix() -> None:
    check = _root(accessible=False)
    assert check.ok is False
    assert check.detail == "not writable by tokensettle"
    assert check.fix is not None and "chmod -R g+rwX" in check.fix and "g+s" in check.fix


def test_a_probe_refused_despite_access_bits_fails() -> None:
    check = _root(probe_error=PermissionError(errno.EACCES, "Permission denied"))
    assert check.ok is False
    assert check.detail == "not writable by tokensettle: Permission denied"


def test_a_read_only_mount_points_at_read_write_paths() -> None:
    check = _root(probe_error=OSError(errno.EROFS, "Read-only file system"))
    assert check.ok is False
    assert check.fix is not None and "ReadWritePaths=" in check.fix and ":ro" in check.fix


def test_another_probe_error_fails_with_its_reason() -> None:
    check = _root(probe_error=OSError(errno.ENOSPC, "No space left on device"))
    assert check.ok is False
    assert "No space left on device" in check.detail


# --------------------------------------------------------------------------------------
# state dir

STATE = Path("/var/lib/tokensettle")


def _state(
    *,
    inside_root: Path | None = None,
    exists: bool = True,
    is_dir: bool = True,
    probe_error: OSError | None = None,
    ancestor: Path | None = None,
    ancestor_is_dir: bool = True,
    ancestor_writable: bool = False,
) -> Check:
    view = StateDirView(
        STATE,
        inside_root=inside_root,
        exists=exists,
        is_dir=is_dir,
        write_error=probe_error,
        ancestor=ancestor,
        ancestor_is_dir=ancestor_is_dir,
        ancestor_writable=ancestor_writable,
    )
    return state_dir_verdict(view, "tokensettle")


def test_a_writable_state_dir_is_ok() -> None:
    assert _state().ok is True


def test_a_state_dir_inside_a_root_fails() -> None:
    check = _state(inside_root=ROOT)
    assert check.ok is False
    assert str(ROOT) in check.detail
    assert check.fix is not None and "TOKENSETTLE_STATE_DIR" in check.fix


def test_a_state_dir_that_is_a_file_fails() -> None:
    check = _state(is_dir=False)
    assert check.ok is False
    assert check.detail == f"{STATE} is not a directory"
    assert check.fix is not None and "TOKENSETTLE_STATE_DIR" in check.fix


def test_a_state_dir_under_a_file_cannot_be_created() -> None:
    check = _state(exists=False, is_dir=False, ancestor=Path("/var/lib"), ancestor_is_dir=False)
    assert check.ok is False
    assert check.detail == f"{STATE} cannot be created: /var/lib is a file"


def test_an_unwritable_state_dir_fails() -> None:
    check = _state(probe_error=PermissionError(errno.EACCES, "Permission denied"))
    assert check.ok is False
    assert "Permission denied" in check.detail


def test_a_state_dir_to_be_created_needs_a_writable_ancestor() -> None:
    ok = _state(exists=False, is_dir=False, ancestor=Path("/var/lib"), ancestor_writable=True)
    assert ok.ok is True and "will be created in /var/lib" in ok.detail
    bad = _state(exists=False, is_dir=False, ancestor=Path("/var/lib"), ancestor_writable=False)
    assert bad.ok is False
    assert bad.fix is not None and f"mkdir -p {STATE}" in bad.fix


# --------------------------------------------------------------------------------------
# render and exit code

OK = Check("config", True, "loaded")
WARN = Check("scope chatdev", None, "no api_key_ids/project_ids", "set OPENAI_API_KEY_CHATDEV_ID")
FAIL = Check(f"runs dir {ROOT}", False, "does not exist", "mkdir -p it")
AUTH = Check(API_CHECK, False, "HTTP 403: Missing scopes: api.usage.read", CREATE_KEY_FIX)


def test_render_one_line_per_check_and_an_indented_fix() -> None:
    assert render([OK, WARN, FAIL]).splitlines() == [
        "ok    config: loaded",
        "WARN  scope chatdev: no api_key_ids/project_ids",
        "      fix: set OPENAI_API_KEY_CHATDEV_ID",
        f"FAIL  runs dir {ROOT}: does not exist",
        "      fix: mkdir -p it",
    ]


def test_render_keeps_a_multi_line_detail_on_one_line() -> None:
    out = render([Check("usage api", None, "first\n  second\n", "a\nb")])
    assert out == "WARN  usage api: first second\n      fix: a b"


def test_render_of_nothing_is_empty() -> None:
    assert render([]) == ""


@pytest.mark.parametrize(
    ("checks", "code"),
    [
        ([], EXIT_OK),
        ([OK], EXIT_OK),
        ([OK, WARN], EXIT_OK),
        ([OK, WARN, FAIL], EXIT_FAILED),
        ([OK, AUTH], EXIT_AUTH),
        ([FAIL, AUTH, WARN], EXIT_AUTH),
        ([admin_key_check(False)], EXIT_FAILED),
        ([Check(API_CHECK, None, "could not reach")], EXIT_OK),
    ],
)
def test_exit_code(checks: list[Check], code: int) -> None:
    assert exit_code(checks) == code
    assert exit_code(iter(checks)) == code  # any iterable, consumed once

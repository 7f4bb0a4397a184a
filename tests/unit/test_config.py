"""Settings: durations with units, sources and their precedence, framework scopes, secrets."""

from __future__ import annotations

import errno
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.config import (
    EXPORTED_ENV,
    ConfigError,
    FrameworkScope,
    Settings,
    StateDirView,
    frameworks_from_env,
    http_addr_problem,
    load_settings,
    parse_http_addr,
    roots_problem,
    state_dir_problem,
    state_dir_verdict,
)
from tokensettle.durations import format_duration, parse_cli_duration, parse_duration
from tokensettle.usage import Scope

SECRET = "sk-admin-DO-NOT-PRINT-0123456789abcdef"
KEY_ALIASES = ("TOKENSETTLE_ADMIN_KEY", "OPENAI_ADMIN_KEY", "OPENAI_API_KEY_USAGE_TRACKING")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TOKENSETTLE_*/OPENAI_* variables and no stray .env from the real cwd."""
    for name in list(os.environ):
        if name.upper().startswith(("TOKENSETTLE_", "OPENAI_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokensettle.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("24h", timedelta(hours=24)),
        ("2d", timedelta(days=2)),
        (" 1.5h ", timedelta(minutes=90)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration_accepts_units(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bare", ["30", "1.5", 30, 2.5])
def test_parse_duration_refuses_bare_numbers_naming_the_units(bare: object) -> None:
    with pytest.raises(ValueError, match="needs a unit") as info:
        parse_duration(bare)
    assert "s, m, h or d" in str(info.value)


@pytest.mark.parametrize(
    "garbage", ["", "m", "thirty minutes", "30 min", "-5m", "5w", "1e3s", "30m5s"]
)
def test_parse_duration_refuses_garbage(garbage: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(garbage)


@pytest.mark.parametrize("wrong", [True, None, [30], {"m": 30}])
def test_parse_duration_refuses_wrong_types(wrong: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(wrong)


def test_parse_duration_passes_timedelta_through() -> None:
    assert parse_duration(timedelta(minutes=7)) == timedelta(minutes=7)


@settings(max_examples=100)
@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["s", "m", "h", "d"]))
def test_parse_duration_integer_units(n: int, unit: str) -> None:
    size = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_duration(f"{n}{unit}") == timedelta(seconds=n * size)


@settings(max_examples=100)
@given(st.integers(min_value=0, max_value=10**7))
def test_format_duration_round_trips(seconds: int) -> None:
    td = timedelta(seconds=seconds)
    assert parse_duration(format_duration(td)) == td


def test_parse_cli_duration_bare_numbers_take_the_script_units() -> None:
    assert parse_cli_duration("30", "m") == timedelta(minutes=30)
    assert parse_cli_duration("24", "h") == timedelta(hours=24)
    assert parse_cli_duration("1.5", "h") == timedelta(minutes=90)
    assert parse_cli_duration("90s", "m") == timedelta(seconds=90)
    assert parse_cli_duration("2d", "h") == timedelta(days=2)
    with pytest.raises(ValueError, match="not a duration"):
        parse_cli_duration("soon", "m")


# ------------------------------------------------------------------ load_settings


def test_defaults() -> None:
    s = load_settings()
    assert s.min_age == timedelta(minutes=30)
    assert s.max_age == timedelta(hours=24)
    assert s.stability_interval == timedelta(minutes=10)
    assert s.stable_polls == 2
    assert s.max_backoff == timedelta(minutes=30)
    assert s.window_grace == timedelta(minutes=1)
    assert s.api_base_url == "https://api.openai.com/v1"
    assert s.admin_key is None
    assert s.secret_key() is None
    assert s.frameworks == {}
    assert s.scope_for("chatdev") == Scope()


def test_env_duration_without_unit_is_a_config_error_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENSETTLE_MIN_AGE", "30")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "min_age" in message
    assert "TOKENSETTLE_MIN_AGE" in message
    assert "unit" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "value", "setting"),
    [
        ("TOKENSETTLE_STABLE_POLLS", "1", "stable_polls"),
        ("TOKENSETTLE_WINDOW_GRACE", "90s", "window_grace"),
        ("TOKENSETTLE_WATCH_MODE", "fanotify", "watch_mode"),
        ("TOKENSETTLE_API_BASE_URL", "api.openai.com", "api_base_url"),
        ("TOKENSETTLE_HTTP_ADDR", "localhost", "http_addr"),
        ("TOKENSETTLE_MAX_AGE", "a day", "max_age"),
    ],
)
def test_bad_env_values_name_their_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, setting: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=setting):
        load_settings()


def test_env_values_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSETTLE_RUNS_DIRS", "a, b")
    monkeypatch.setenv("TOKENSETTLE_STABILITY_INTERVAL", "5m")
    monkeypatch.setenv("TOKENSETTLE_API_BASE_URL", "http://127.0.0.1:8787/v1/")
    monkeypatch.setenv("TOKENSETTLE_HTTP_ADDR", "")
    s = load_settings()
    assert s.runs_dirs == [Path("a"), Path("b")]
    assert s.stability_interval == timedelta(minutes=5)
    assert s.api_base_url == "http://127.0.0.1:8787/v1"
    assert s.http_addr == ""


@pytest.mark.parametrize("alias", KEY_ALIASES)
def test_admin_key_from_each_alias_never_printed(
    monkeypatch: pytest.MonkeyPatch, alias: str
) -> None:
    monkeypatch.setenv(alias, SECRET)
    s = load_settings()
    assert s.secret_key() == SECRET
    assert SECRET not in repr(s)
    assert SECRET not in str(s)
    assert SECRET not in repr(s.admin_key)
    assert SECRET not in s.model_dump_json()
    # A config error next to the key does not echo it either.
    monkeypatch.setenv("TOKENSETTLE_MIN_AGE", "30")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_admin_key_override_is_secret_too() -> None:
    s = load_settings({"admin_key": SECRET})
    assert s.secret_key() == SECRET
    assert SECRET not in repr(s)


def test_toml_frameworks_and_values(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'min_age = "45m"\nstable_polls = 3\n'
        '[frameworks.chatdev]\napi_key_ids = ["key_chatdev"]\n'
        '[frameworks.ghspec]\napi_key_ids = ["key_gh"]\nproject_ids = ["proj_gh"]\n',
    )
    s = load_settings(config_file=path)
    assert s.config == path
    assert s.min_age == timedelta(minutes=45)
    assert s.stable_polls == 3
    assert s.frameworks["chatdev"] == FrameworkScope(api_key_ids=["key_chatdev"])
    assert s.scope_for("ChatDev") == Scope(api_key_ids=frozenset({"key_chatdev"}))
    assert s.scope_for("ghspec") == Scope(frozenset({"key_gh"}), frozenset({"proj_gh"}))
    assert s.scope_for("baes").is_organisation


def test_toml_from_env_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'max_age = "2d"\n')
    monkeypatch.setenv("TOKENSETTLE_CONFIG", str(path))
    assert load_settings().max_age == timedelta(days=2)


def test_missing_or_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_file=tmp_path / "nope.toml")
    broken = write_toml(tmp_path, "min_age = \n[[[")
    with pytest.raises(ConfigError, match="config"):
        load_settings(config_file=broken)
    bad_value = write_toml(tmp_path, 'min_age = "30"\n')
    with pytest.raises(ConfigError, match="min_age"):
        load_settings(config_file=bad_value)


def test_seed_key_id_convention_merges_into_frameworks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path, '[frameworks.baes]\napi_key_ids = ["key_toml"]\n')
    monkeypatch.setenv("OPENAI_API_KEY_BAES_ID", "key_x")
    monkeypatch.setenv("OPENAI_API_KEY_CHATDEV_ID", "key_c1, key_c2")
    s = load_settings(config_file=path)
    assert s.frameworks["baes"].api_key_ids == ["key_toml", "key_x"]
    assert s.frameworks["chatdev"].api_key_ids == ["key_c1", "key_c2"]
    assert s.scope_for("baes") == Scope(api_key_ids=frozenset({"key_toml", "key_x"}))


def test_seed_key_id_merges_with_mixed_case_toml_framework(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(
        tmp_path, '[frameworks.ChatDev]\napi_key_ids = ["key_toml"]\nproject_ids = ["proj_1"]\n'
    )
    monkeypatch.setenv("OPENAI_API_KEY_CHATDEV_ID", "key_env")
    s = load_settings(config_file=path)
    assert s.scope_for("chatdev") == Scope(
        frozenset({"key_toml", "key_env"}), frozenset({"proj_1"})
    )


def test_precedence_overrides_over_env_over_toml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path, 'min_age = "45m"\nmax_age = "12h"\nstability_interval = "7m"\n')
    monkeypatch.setenv("TOKENSETTLE_MIN_AGE", "20m")
    monkeypatch.setenv("TOKENSETTLE_MAX_AGE", "6h")
    s = load_settings({"min_age": "10m", "max_age": None}, config_file=path)
    assert s.min_age == timedelta(minutes=10)  # override
    assert s.max_age == timedelta(hours=6)  # env (a None override is no override)
    assert s.stability_interval == timedelta(minutes=7)  # TOML
    monkeypatch.delenv("TOKENSETTLE_MIN_AGE")
    assert load_settings(config_file=path).min_age == timedelta(minutes=45)


def test_dotenv_in_cwd_is_read_below_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TOKENSETTLE_TICK=9s\nTOKENSETTLE_MAX_BACKOFF=1h\n")
    monkeypatch.setenv("TOKENSETTLE_MAX_BACKOFF", "15m")
    s = load_settings()
    assert s.tick == timedelta(seconds=9)
    assert s.max_backoff == timedelta(minutes=15)


def test_explicit_environ_is_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSETTLE_MAX_AGE", "2h")
    s = load_settings(environ={"TOKENSETTLE_MIN_AGE": "5m"})
    assert s.min_age == timedelta(minutes=5)
    assert s.max_age == timedelta(hours=24)


# ------------------------------------------------------------------ frameworks_from_env


def test_frameworks_from_env() -> None:
    env = {
        "OPENAI_API_KEY_BAES_ID": "key_x",
        "OPENAI_API_KEY_CHATDEV_ID": " key_a , key_b ",
        "OPENAI_API_KEY_GH_SPEC_ID": "key_g",
        "OPENAI_API_KEY_EMPTY_ID": "  ",
        "OPENAI_API_KEY_BAES": "sk-not-an-id",
        "OPENAI_API_KEY": "sk-whatever",
        "PATH": "/usr/bin",
    }
    assert frameworks_from_env(env) == {
        "baes": ["key_x"],
        "chatdev": ["key_a", "key_b"],
        "gh_spec": ["key_g"],
    }
    assert frameworks_from_env({}) == {}


# ------------------------------------------------------------------ HTTP_ADDR


@pytest.mark.parametrize(
    ("value", "bind"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[::]:9464", ("::", 9464)),
        ("localhost:9464", ("localhost", 9464)),
        ("tokensettle-0.internal:80", ("tokensettle-0.internal", 80)),
        (":9464", ("127.0.0.1", 9464)),
        ("", None),
    ],
)
def test_http_addr_is_parsed_once_for_everyone(value: str, bind: tuple[str, int] | None) -> None:
    assert parse_http_addr(value) == bind
    assert load_settings({"http_addr": value}, environ={}).http_bind() == bind


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("127.0.0.1:99999", "1 to 65535"),  # accepted before, then OverflowError at bind
        ("127.0.0.1:0", "1 to 65535"),
        ("127.0.0.1:-1", "1 to 65535"),
        ("127.0.0.1:http", "1 to 65535"),
        ("127.0.0.1:", "1 to 65535"),
        ("127.0.0.1", "HOST:PORT"),
        ("::1:9464", "brackets"),
        ("[::1:9464", "IPv6"),
        ("[127.0.0.1]:9464", "IPv6"),
        ("256.1.1.1:9464", "IPv4"),
        ("host_name:9464", "host name"),
        ("-bad.example:9464", "host name"),
        ("a b:9464", "host name"),
    ],
)
def test_a_bad_http_addr_is_a_config_error_naming_it(value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"http_addr": value}, environ={})
    message = str(info.value)
    assert message.startswith("http_addr (TOKENSETTLE_HTTP_ADDR): ")
    assert reason in message and "\n" not in message


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (OSError(errno.EADDRINUSE, "Address already in use"), "is in use by another process"),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign"), "not an address of this machine"),
        (PermissionError(errno.EACCES, "Permission denied"), "from 1024 up"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "cannot be resolved"),
        (OSError(errno.EMFILE, "Too many open files"), "Too many open files"),
    ],
)
def test_a_bind_failure_is_one_line_naming_the_setting(error: OSError, words: str) -> None:
    problem = http_addr_problem("10.9.8.7:80", error)
    line = str(problem)
    assert line.startswith("http_addr (TOKENSETTLE_HTTP_ADDR): 10.9.8.7:80 ")
    assert words in line and "\n" not in line


# ------------------------------------------------------------------ API_BASE_URL


def test_credentials_in_the_api_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"api_base_url": "http://proxyuser:hunter2pw@proxy.lan:3128/v1"}, environ={})
    message = str(info.value)
    assert message.startswith("api_base_url (TOKENSETTLE_API_BASE_URL): ")
    assert "user:password@" in message and "http://proxy.lan:3128/v1" in message
    assert "hunter2pw" not in message and "proxyuser" not in message


@pytest.mark.parametrize(
    "url", ["ftp://u:hunter2pw@h/v1", "http://u:hunter2pw@h:99999/v1", "http://u:hunter2pw@"]
)
def test_a_bad_api_url_never_echoes_a_password(url: str) -> None:
    with pytest.raises(ConfigError, match="api_base_url") as info:
        load_settings({"api_base_url": url}, environ={})
    assert "hunter2pw" not in str(info.value)


# ------------------------------------------------------------------ admin key


@pytest.mark.parametrize("key", ["sk-admin-abc\ndef", "sk-admin abc", "sk-admin-\x00abc", "sk-é"])
def test_a_pasted_key_with_junk_is_refused_without_showing_it(key: str) -> None:
    with pytest.raises(ConfigError, match="admin_key") as info:
        load_settings({"admin_key": key}, environ={})
    assert "abc" not in str(info.value) and "not shown" in str(info.value)


def test_surrounding_whitespace_is_not_part_of_the_key() -> None:
    assert load_settings({"admin_key": f" {SECRET}\n"}, environ={}).secret_key() == SECRET
    assert load_settings({"admin_key": "  "}, environ={}).secret_key() is None


def test_no_runs_dir_at_all_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSETTLE_RUNS_DIRS", " , ")
    with pytest.raises(ConfigError, match="runs_dirs"):
        load_settings()


# ------------------------------------------------------------------ unknown names


def test_an_unknown_env_variable_is_refused_naming_the_closest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENSETTLE_MIN_AEG", "5m")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        "TOKENSETTLE_MIN_AEG (environment): unknown setting; did you mean TOKENSETTLE_MIN_AGE?"
    )


def test_env_names_are_matched_without_case_as_pydantic_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("tokensettle_tick", "5s")
    assert load_settings().tick == timedelta(seconds=5)
    monkeypatch.setenv("tokensettle_tik", "5s")
    with pytest.raises(ConfigError, match=r"TOKENSETTLE_TIK .*did you mean TOKENSETTLE_TICK"):
        load_settings()


def test_a_name_like_nothing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSETTLE_ZZZZZZZZ", "1")
    with pytest.raises(ConfigError, match="no setting has a similar name"):
        load_settings()


def test_names_we_export_to_our_commands_are_not_typos(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in EXPORTED_ENV:
        monkeypatch.setenv(name, "/srv/runs/chatdev/r1")
    load_settings()
    load_settings(environ=dict.fromkeys(EXPORTED_ENV, "x"))


def test_every_field_of_the_model_is_a_valid_name() -> None:
    """The valid names come from Settings itself: a setting added there needs no list."""
    for name in Settings.model_fields:
        load_settings(environ={f"TOKENSETTLE_{name.upper()}": ""})


def test_an_explicit_environment_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"TOKENSETTLE_STATEDIR .*TOKENSETTLE_STATE_DIR"):
        load_settings(environ={"TOKENSETTLE_STATEDIR": "/x"})


def test_an_unknown_name_in_dotenv_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-whatever\nTOKENSETTLE_MAX_BACKOF=1h\n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        f"TOKENSETTLE_MAX_BACKOF ({tmp_path / '.env'}): unknown setting; "
        "did you mean TOKENSETTLE_MAX_BACKOFF?"
    )


def test_other_variables_in_dotenv_are_none_of_our_business(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-x\nHTTPS_PROXY=http://p:3128\n")
    load_settings()


def test_an_unknown_toml_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'stability_intervall = "5m"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    assert str(info.value) == (
        f"stability_intervall (config {path}): unknown setting; did you mean stability_interval?"
    )


def test_a_typo_under_a_framework_is_refused_not_made_organisation_wide(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[frameworks.chatdev]\napi_key_id = ["key_c"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    assert str(info.value) == (
        "frameworks.chatdev.api_key_id: unknown key; did you mean api_key_ids?"
    )


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"min_age = \n[[[", "is not valid TOML"),
        (b'min_age = "\xff30m"\n', "is not UTF-8 text"),
    ],
)
def test_a_broken_toml_file_names_the_file(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "tokensettle.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    assert str(info.value).startswith(f"config (TOKENSETTLE_CONFIG or --config): {path} {words}")


def test_a_directory_as_config_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory; give the TOML file"):
        load_settings(config_file=tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads through any mode bits")
def test_an_unreadable_config_file_says_so(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'min_age = "5m"\n')
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot be read: Permission denied"):
        load_settings(config_file=path)


# ------------------------------------------------------------------ what the settings name

STATE = Path("/var/lib/tokensettle")


def test_state_dir_verdicts() -> None:
    def verdict(**seen: object) -> str | None:
        problem = state_dir_verdict(StateDirView(STATE, **seen), "ts")  # type: ignore[arg-type]
        return None if problem is None else str(problem)

    assert verdict() is None
    assert (
        verdict(exists=False, is_dir=False, ancestor=Path("/var/lib"), ancestor_writable=True)
        is None
    )
    fix = "set TOKENSETTLE_STATE_DIR to a local directory outside the runs"
    for line in (
        verdict(inside_root=Path("/runs")),
        verdict(is_dir=False),
        verdict(write_error=PermissionError(errno.EACCES, "Permission denied")),
        verdict(exists=False, is_dir=False, ancestor=Path("/var"), ancestor_is_dir=False),
        verdict(exists=False, is_dir=False, ancestor=Path("/var/lib")),
    ):
        assert line is not None and line.startswith("state_dir (TOKENSETTLE_STATE_DIR): ")
        assert fix in line and "\n" not in line
    # A read-only mount: neither the cause nor the fix is ownership.
    ro = verdict(write_error=OSError(errno.EROFS, "Read-only file system"))
    assert ro is not None and "read-only file system" in ro and "chown" not in ro
    assert "mount it read-write" in ro and fix in ro


def test_a_state_dir_that_is_a_file_is_a_problem_for_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    problem = state_dir_problem(tmp_path / "state")
    assert problem is not None
    assert str(problem).startswith(
        f"state_dir (TOKENSETTLE_STATE_DIR): {tmp_path / 'state'} is not a directory; set "
    )
    under = state_dir_problem(tmp_path / "state" / "deeper")
    assert under is not None and f"{tmp_path / 'state'} is a file" in str(under)
    assert state_dir_problem(tmp_path / "new" / "state") is None
    assert state_dir_problem(tmp_path) is None
    runs = tmp_path / "runs"
    (runs / ".state").mkdir(parents=True)
    inside = state_dir_problem(runs / ".state", [runs])
    assert inside is not None and f"inside the watched root {runs}" in str(inside)
    assert not (tmp_path / "new").exists(), "a check creates nothing"


def test_roots_that_cannot_be_runs_dirs(tmp_path: Path) -> None:
    assert roots_problem([tmp_path]) is None
    missing = roots_problem([tmp_path, tmp_path / "nope"])
    assert missing is not None
    assert str(missing).startswith(
        f"runs_dirs (TOKENSETTLE_RUNS_DIRS or --runs-dir): {tmp_path / 'nope'} does not exist; "
    )
    (tmp_path / "file").write_text("")
    a_file = roots_problem([tmp_path / "file"])
    assert a_file is not None and "is not a directory" in str(a_file)


def test_a_duration_too_long_for_timedelta_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="too long"):
        parse_duration("99999999999d")
    with pytest.raises(ValueError, match="too long"):
        parse_cli_duration("99999999999999999", "m")


@pytest.mark.parametrize(
    "name", ["request_timeout", "poll_interval", "rescan_interval", "max_backoff", "retry_delay"]
)
def test_waits_that_would_spin_at_zero_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"{name} .*longer than 0s"):
        load_settings({name: "0s"}, environ={})


def test_tick_zero_is_allowed_the_scheduler_reads_it_as_no_rounding() -> None:
    assert load_settings({"tick": "0s"}, environ={}).tick == timedelta(0)


def test_a_structured_env_value_that_is_not_json_names_its_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENSETTLE_FRAMEWORKS", "chatdev=key_x")
    with pytest.raises(ConfigError, match=r"^frameworks \(TOKENSETTLE_FRAMEWORKS\): .*JSON"):
        load_settings()


def test_a_dotenv_line_that_cannot_be_parsed_is_refused_without_a_stray_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / ".env").write_text("TOKENSETTLE_TICK 5s\n")  # no '=': dotenv skips it
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        f"{tmp_path / '.env'}: could not parse statement starting at line 1; "
        "write NAME=value on each line"
    )
    assert not caplog.records

"""Settings: durations with units, sources and their precedence, framework scopes, secrets."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensettle.config import ConfigError, FrameworkScope, frameworks_from_env, load_settings
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

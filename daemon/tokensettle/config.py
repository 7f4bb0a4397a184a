"""Settings: command line > environment > .env > TOML file > defaults.

Durations carry units (`90s`, `30m`, `24h`, `2d`); a bare number is refused because a
silent unit guess is how a 30-minute wait becomes a 30-second one. The admin key is a
`SecretStr`: it is never printed, logged, or echoed back in an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tokensettle.durations import parse_duration
from tokensettle.usage import Scope

ENV_PREFIX = "TOKENSETTLE_"
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class ConfigError(Exception):
    """A setting has a bad value. `str()` is one line naming the setting."""


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class FrameworkScope(BaseModel):
    api_key_ids: list[str] = Field(default_factory=list)
    project_ids: list[str] = Field(default_factory=list)

    def scope(self) -> Scope:
        return Scope(frozenset(self.api_key_ids), frozenset(self.project_ids))


# The TOML file is chosen at run time (--config or TOKENSETTLE_CONFIG), so the source
# reads its path from here rather than from class configuration.
_toml_path: ContextVar[Path | None] = ContextVar("tokensettle_toml_path", default=None)
# When a caller passes its own environment (the demo, tests), the process environment and
# .env are not read at all; values come from that mapping instead.
_isolated: ContextVar[bool] = ContextVar("tokensettle_isolated", default=False)
ADMIN_KEY_ALIASES = (f"{ENV_PREFIX}ADMIN_KEY", "OPENAI_ADMIN_KEY", "OPENAI_API_KEY_USAGE_TRACKING")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    runs_dirs: Annotated[list[Path], NoDecode, BeforeValidator(_split_commas)] = Field(
        default_factory=lambda: [Path("runs")]
    )
    api_base_url: str = DEFAULT_BASE_URL
    admin_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("admin_key", *ADMIN_KEY_ALIASES),
    )
    min_age: Duration = timedelta(minutes=30)
    max_age: Duration = timedelta(hours=24)
    stability_interval: Duration = timedelta(minutes=10)
    stable_polls: int = Field(default=2, ge=2, le=10)
    window_grace: Duration = timedelta(minutes=1)
    settle_delay: Duration = timedelta(seconds=2)
    rescan_interval: Duration = timedelta(minutes=10)
    tick: Duration = timedelta(minutes=1)
    max_backoff: Duration = timedelta(minutes=30)
    request_timeout: Duration = timedelta(seconds=30)
    retry_delay: Duration = timedelta(minutes=2)
    max_window: Duration = timedelta(days=3)
    watch_mode: Literal["auto", "inotify", "poll"] = "auto"
    poll_interval: Duration = timedelta(seconds=10)
    rate_limit_per_min: float = Field(default=30.0, gt=0)
    request_attempts: int = Field(default=5, ge=1, le=20)
    apportion_tolerance: float = Field(default=0.01, ge=0, le=1)
    local_tolerance: float = Field(default=0.05, ge=0, le=10)
    state_dir: Path = Path.home() / ".local" / "state" / "tokensettle"
    http_addr: str = "127.0.0.1:9464"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    config: Path | None = None
    frameworks: dict[str, FrameworkScope] = Field(default_factory=dict)
    # Leases (tokensettle.lease_cli): the named project that holds per-run keys, their
    # lifetime (the Admin API allows 1 s to 365 d), and an existing service account.
    lease_project: str | None = Field(default=None, pattern=r"^proj_[A-Za-z0-9_-]+$")
    lease_ttl: Duration = Field(
        default=timedelta(hours=24), ge=timedelta(seconds=1), le=timedelta(days=365)
    )
    lease_service_account: str | None = None

    @field_validator("window_grace")
    @classmethod
    def _whole_minutes(cls, v: timedelta) -> timedelta:
        if v.total_seconds() % 60:
            raise ValueError("must be whole minutes (usage is stored per minute), e.g. '1m'")
        return v

    @field_validator("api_base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"'{v}' is not an http(s) URL")
        return v.rstrip("/")

    @field_validator("http_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        if v and not re.fullmatch(r"\[?[0-9A-Za-z.:\-]*\]?:\d{1,5}", v):
            raise ValueError(f"'{v}' is not HOST:PORT (empty disables the HTTP server)")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        if not _isolated.get():
            sources += [env_settings, dotenv_settings]
            secret_dirs = [d for d in secrets_dirs() if d.is_dir()]
            if secret_dirs:
                sources.append(SecretsSettingsSource(settings_cls, secrets_dir=secret_dirs))
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def scope_for(self, framework: str) -> Scope:
        fw = self.frameworks.get(framework.lower())
        return fw.scope() if fw is not None else Scope()

    def secret_key(self) -> str | None:
        return self.admin_key.get_secret_value() if self.admin_key is not None else None


def secrets_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where one-file-per-setting secrets may live (a file named `admin_key`): systemd's
    `$CREDENTIALS_DIRECTORY` (LoadCredential=) and Docker's `/run/secrets`."""
    env = os.environ if environ is None else environ
    dirs = [Path(env["CREDENTIALS_DIRECTORY"])] if env.get("CREDENTIALS_DIRECTORY") else []
    return [*dirs, Path("/run/secrets")]


_FW_KEY_ENV = re.compile(r"^OPENAI_API_KEY_(?P<fw>[A-Za-z0-9_]+)_ID$")


def frameworks_from_env(environ: Mapping[str, str]) -> dict[str, list[str]]:
    """The seed convention `OPENAI_API_KEY_<FW>_ID=key_...` -> {fw: [key ids]}."""
    out: dict[str, list[str]] = {}
    for name, value in environ.items():
        match = _FW_KEY_ENV.match(name)
        if match and value.strip():
            ids = [v.strip() for v in value.split(",") if v.strip()]
            out.setdefault(match.group("fw").lower(), []).extend(ids)
    return out


@dataclass(frozen=True)
class _ErrorLine:
    setting: str
    message: str


def _describe(exc: ValidationError) -> _ErrorLine:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(part) for part in err.get("loc", ())]
    setting = loc[0] if loc else "settings"
    env_name = f"{ENV_PREFIX}{setting.upper()}"
    where = f"{setting} ({env_name})" if setting != "frameworks" else ".".join(loc)
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    return _ErrorLine(where, message)


def _values_from(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings named in an explicit environment mapping (`TOKENSETTLE_<NAME>`, key aliases)."""
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        if name == "admin_key":
            continue
        raw = environ.get(f"{ENV_PREFIX}{name.upper()}")
        if raw is not None and raw != "":
            values[name] = raw
    for alias in ADMIN_KEY_ALIASES:
        if environ.get(alias):
            values["admin_key"] = environ[alias]
            break
    return values


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings from every source. Raises ConfigError with one line on a bad value.

    With `environ`, that mapping replaces the process environment and `.env` entirely.
    """
    env = os.environ if environ is None else environ
    init = {k: v for k, v in (overrides or {}).items() if v is not None}
    if environ is not None:
        init = {**_values_from(environ), **init}
    path = config_file or (
        Path(env[f"{ENV_PREFIX}CONFIG"]) if env.get(f"{ENV_PREFIX}CONFIG") else None
    )
    if path is not None and not path.is_file():
        raise ConfigError(f"config ({ENV_PREFIX}CONFIG): file {path} does not exist")
    token = _toml_path.set(path)
    isolated = _isolated.set(environ is not None)
    try:
        settings = Settings(**init)
    except ValidationError as exc:
        line = _describe(exc)
        raise ConfigError(f"{line.setting}: {line.message}") from None
    except (ValueError, OSError) as exc:  # e.g. a TOML syntax error
        raise ConfigError(f"config ({path}): {exc}") from None
    finally:
        _toml_path.reset(token)
        _isolated.reset(isolated)
    merged: dict[str, FrameworkScope] = {}
    for name, fw_scope in settings.frameworks.items():
        into = merged.setdefault(name.lower(), FrameworkScope())
        into.api_key_ids = sorted(set(into.api_key_ids) | set(fw_scope.api_key_ids))
        into.project_ids = sorted(set(into.project_ids) | set(fw_scope.project_ids))
    for fw, ids in frameworks_from_env(env).items():
        scope = merged.setdefault(fw, FrameworkScope())
        scope.api_key_ids = sorted(set(scope.api_key_ids) | set(ids))
    settings.frameworks = merged
    if path is not None:
        settings.config = path
    return settings

"""Settings: command line > environment > .env > TOML file > defaults.

Durations carry units (`90s`, `30m`, `24h`, `2d`); a bare number is refused because a
silent unit guess is how a 30-minute wait becomes a 30-second one. The admin key is a
`SecretStr`: it is never printed, logged, or echoed back in an error.

Names are checked as strictly as values: an unknown `TOKENSETTLE_*` variable (in the
environment or `.env`), an unknown key in the TOML file or under `[frameworks.<name>]` is a
`ConfigError` naming the closest valid name. The valid names are the fields of `Settings`,
so a setting added there is accepted everywhere at once.

The last part holds the checks of what the settings point at (the runs roots, the state
directory, the HTTP address): one `Problem` each, shared by the commands, the daemon and
`doctor`, so that each says the same thing in the same words.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import ipaddress
import logging
import os
import pwd
import re
import secrets
import socket
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from tokensettle.durations import parse_duration
from tokensettle.errors import ConfigError
from tokensettle.usage import Scope
from tokensettle.usage_scope import ANTHROPIC_KEY_ID_PATTERN, WORKSPACE_ID_PATTERN

__all__ = [
    "ADMIN_KEY_ALIASES",
    "DEFAULT_BASE_URL",
    "ENV_PREFIX",
    "EXPORTED_ENV",
    "PROBE_PREFIX",
    "ConfigError",
    "FrameworkScope",
    "KeyPool",
    "LeasePools",
    "PathStat",
    "PoolKey",
    "Problem",
    "Settings",
    "StateDirView",
    "closest",
    "current_user",
    "frameworks_from_env",
    "http_addr_problem",
    "load_settings",
    "look_at_state_dir",
    "parse_http_addr",
    "probe_write",
    "root_problem",
    "roots_problem",
    "secrets_dirs",
    "stat_path",
    "state_dir_problem",
    "state_dir_verdict",
]

ENV_PREFIX = "TOKENSETTLE_"
DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: Variables tokensettle sets for the commands it starts. They are not settings, but a
#: `tokensettle` run by such a command inherits them and must not refuse them as typos.
EXPORTED_ENV = frozenset({f"{ENV_PREFIX}RUN_DIR", f"{ENV_PREFIX}LEASE_KEY_ID"})


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class FrameworkScope(BaseModel):
    # A typo (`api_key_id`) would otherwise leave the framework organisation-wide, silently.
    model_config = ConfigDict(extra="forbid")

    api_key_ids: list[str] = Field(default_factory=list)
    project_ids: list[str] = Field(default_factory=list)
    #: whose usage report holds the framework's usage; None: not named (OpenAI, unless a
    #: run's model is a Claude model and an Anthropic admin key is configured)
    provider: Literal["openai", "anthropic"] | None = None
    #: Anthropic workspaces (the provider's containers, as projects are OpenAI's)
    workspace_ids: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _containers_of_the_provider(self) -> FrameworkScope:
        if self.workspace_ids and self.provider == "openai":
            raise ValueError("workspace_ids are Anthropic's; OpenAI frameworks use project_ids")
        if self.project_ids and self.provider == "anthropic":
            raise ValueError("project_ids are OpenAI's; Anthropic frameworks use workspace_ids")
        if self.workspace_ids and self.provider is None:
            self.provider = "anthropic"
        return self

    def scope(self) -> Scope:
        provider = self.provider or "openai"
        containers = self.workspace_ids if provider == "anthropic" else self.project_ids
        return Scope(frozenset(self.api_key_ids), frozenset(containers), provider)


class PoolKey(BaseModel):
    """One Console-made Anthropic key of the lease pool: its id (never its value, which
    comes from the pool's credentials file) and the workspace it belongs to."""

    model_config = ConfigDict(extra="forbid")

    id: str
    workspace_id: str | None = None

    @field_validator("id")
    @classmethod
    def _key_id(cls, v: str) -> str:
        if not ANTHROPIC_KEY_ID_PATTERN.fullmatch(v):
            raise ValueError(f"{v[:64]!r} is not an Anthropic key id (apikey_...)")
        return v

    @field_validator("workspace_id")
    @classmethod
    def _workspace_id(cls, v: str | None) -> str | None:
        if v is not None and not WORKSPACE_ID_PATTERN.fullmatch(v):
            raise ValueError(f"{v[:64]!r} is not an Anthropic workspace id (wrkspc_...)")
        return v


class KeyPool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[PoolKey] = Field(default_factory=list, max_length=1000)

    @field_validator("keys")
    @classmethod
    def _unique(cls, v: list[PoolKey]) -> list[PoolKey]:
        seen: set[str] = set()
        for key in v:
            if key.id in seen:
                raise ValueError(f"{key.id} is listed twice")
            seen.add(key.id)
        return v


class LeasePools(BaseModel):
    """`[leases.<provider>]`: pools of keys made by hand, leased one run at a time
    (`tokensettle lease --provider anthropic`); only Anthropic needs one."""

    model_config = ConfigDict(extra="forbid")

    anthropic: KeyPool = Field(default_factory=KeyPool)


# The TOML file is chosen at run time (--config or TOKENSETTLE_CONFIG) and read (and its
# names checked) by load_settings; the source takes the parsed table from here.
_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("tokensettle_toml", default=None)
# When a caller passes its own environment (the demo, tests), the process environment and
# .env are not read at all; values come from that mapping instead.
_isolated: ContextVar[bool] = ContextVar("tokensettle_isolated", default=False)
ADMIN_KEY_ALIASES = (f"{ENV_PREFIX}ADMIN_KEY", "OPENAI_ADMIN_KEY", "OPENAI_API_KEY_USAGE_TRACKING")
ANTHROPIC_KEY_ALIASES = (f"{ENV_PREFIX}ANTHROPIC_ADMIN_KEY", "ANTHROPIC_ADMIN_KEY")
DEFAULT_ANTHROPIC_URL = "https://api.anthropic.com"

_PORT = re.compile(r"[0-9]{1,5}")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def parse_http_addr(value: str) -> tuple[str, int] | None:
    """`HOST:PORT` or `[IPV6]:PORT` -> (host to bind, port); an empty host is 127.0.0.1;
    `""` -> None (no HTTP server). ValueError with the reason otherwise."""
    if value == "":
        return None
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(f"'{value}' is not HOST:PORT, e.g. 127.0.0.1:9464")
    if host.startswith("[") or host.endswith("]"):
        inner = host.removeprefix("[").removesuffix("]")
        try:
            if f"[{inner}]" != host:
                raise ValueError(host)
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"'{host}' is not a bracketed IPv6 address, e.g. [::1]") from None
        host = inner
    elif ":" in host:
        raise ValueError(f"'{value}': an IPv6 address needs brackets, e.g. [::1]:9464")
    elif host == "":
        host = "127.0.0.1"
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"'{host}' is not an IPv4 address") from None
    elif len(host) > 253 or not all(_HOST_LABEL.fullmatch(p) for p in host.split(".")):
        raise ValueError(f"'{host}' is not a host name or IP address")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port '{port_text}' is not a number from 1 to 65535")
    return host, int(port_text)


def _without_userinfo(url: SplitResult) -> str:
    netloc = url.netloc.rpartition("@")[2]
    return url._replace(netloc=netloc).geturl()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",  # unknown names are refused by load_settings, naming the closest
        populate_by_name=True,
    )

    runs_dirs: Annotated[list[Path], NoDecode, BeforeValidator(_split_commas)] = Field(
        default_factory=lambda: [Path("runs")], min_length=1
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
    rate_limit_per_min: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    request_attempts: int = Field(default=5, ge=1, le=20)
    apportion_tolerance: float = Field(default=0.01, ge=0, le=1)
    local_tolerance: float = Field(default=0.05, ge=0, le=10)
    #: `tokensettle bill`: how far our priced usage may differ from the bill (a fraction of
    #: the billed amount, 0.02 = 2%) before a day is a mismatch
    bill_tolerance: float = Field(default=0.02, ge=0, le=1)
    #: how often the daemon runs the bill check (0s: never)
    bill_check_interval: Duration = timedelta(hours=24)
    state_dir: Path = Path.home() / ".local" / "state" / "tokensettle"
    http_addr: str = "127.0.0.1:9464"
    #: with it, everything on HTTP_ADDR but /healthz and /metrics needs `Bearer <token>`
    http_token: SecretStr | None = None
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
    # Anthropic (the second provider): its Admin API key and base URL.
    anthropic_admin_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("anthropic_admin_key", *ANTHROPIC_KEY_ALIASES),
    )
    anthropic_api_base_url: str = DEFAULT_ANTHROPIC_URL
    #: requests a minute to Anthropic's Admin API (it asks for about one a minute sustained;
    #: bursts of a few are fine), apart from `rate_limit_per_min`, which is OpenAI's
    anthropic_rate_limit_per_min: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    # The Anthropic key pool of `tokensettle lease --provider anthropic`: the key ids in
    # `[leases.anthropic] keys`, their values in a credentials file (`ID=VALUE` lines):
    # this path, else `anthropic_pool_keys` in $CREDENTIALS_DIRECTORY or /run/secrets.
    leases: LeasePools = Field(default_factory=LeasePools)
    anthropic_pool_file: Path | None = None

    @field_validator("window_grace")
    @classmethod
    def _whole_minutes(cls, v: timedelta) -> timedelta:
        if v.total_seconds() % 60:
            raise ValueError("must be whole minutes (usage is stored per minute), e.g. '1m'")
        return v

    @field_validator(
        "request_timeout", "poll_interval", "rescan_interval", "max_backoff", "retry_delay"
    )
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("must be longer than 0s (0 would retry or poll without pause)")
        return v

    @field_validator("api_base_url", "anthropic_api_base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        # Never echo a password: errors show the URL without its user:password@ part.
        try:
            url = urlsplit(v.strip())
            url.port  # noqa: B018 - raises ValueError when out of range or not a number
        except ValueError as exc:  # urllib's reasons name no credentials
            raise ValueError(
                f"is not an http(s) URL ({exc}), e.g. https://api.openai.com/v1"
            ) from None
        if url.scheme not in ("http", "https") or not url.hostname or re.search(r"\s", v):
            raise ValueError(
                f"'{_without_userinfo(url)}' is not an http(s) URL, e.g. https://api.openai.com/v1"
            )
        if url.username is not None or url.password is not None:
            raise ValueError(
                f"must not carry credentials: remove the user:password@ part "
                f"({_without_userinfo(url)}); the admin key is sent in the Authorization "
                "header, which a login in the URL would replace"
            )
        return v.strip().rstrip("/")

    @field_validator("admin_key", "anthropic_admin_key", "http_token")
    @classmethod
    def _key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return None
        key = v.get_secret_value().strip()
        if not key:
            return None  # an empty variable is no key (the credential file may give one)
        if not key.isascii() or not key.isprintable() or re.search(r"\s", key):
            raise ValueError(
                "holds spaces, control or non-ASCII characters (a copy-paste error?); "
                "the value is not shown"
            )
        return SecretStr(key)

    @field_validator("http_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        v = v.strip()
        try:
            parse_http_addr(v)
        except ValueError as exc:
            raise ValueError(f"{exc} (empty disables the HTTP server)") from None
        return v

    def http_bind(self) -> tuple[str, int] | None:
        """(host, port) for the HTTP server, or None when it is disabled."""
        return parse_http_addr(self.http_addr)

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
        data = _toml_data.get()
        if data is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=data))
        return tuple(sources)

    def scope_for(self, framework: str) -> Scope:
        fw = self.frameworks.get(framework.lower())
        return fw.scope() if fw is not None else Scope()

    def provider_named(self, framework: str) -> str | None:
        """The provider a framework's configuration names, if any."""
        fw = self.frameworks.get(framework.lower())
        return fw.provider if fw is not None else None

    def anthropic_key(self) -> str | None:
        key = self.anthropic_admin_key
        return key.get_secret_value() if key is not None else None

    def secret_key(self) -> str | None:
        return self.admin_key.get_secret_value() if self.admin_key is not None else None

    def http_secret(self) -> str | None:
        return self.http_token.get_secret_value() if self.http_token is not None else None


def secrets_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where one-file-per-setting secrets may live (a file named `admin_key`): systemd's
    `$CREDENTIALS_DIRECTORY` (LoadCredential=) and Docker's `/run/secrets`."""
    env = os.environ if environ is None else environ
    dirs = [Path(env["CREDENTIALS_DIRECTORY"])] if env.get("CREDENTIALS_DIRECTORY") else []
    return [*dirs, Path("/run/secrets")]


_FW_KEY_ENV = re.compile(r"^OPENAI_API_KEY_(?P<fw>[A-Za-z0-9_]+)_ID$")
_FW_ANTHROPIC_KEY_ENV = re.compile(r"^ANTHROPIC_API_KEY_(?P<fw>[A-Za-z0-9_]+)_ID$")


def _ids_from_env(environ: Mapping[str, str], pattern: re.Pattern[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in environ.items():
        match = pattern.match(name)
        if match and value.strip():
            ids = [v.strip() for v in value.split(",") if v.strip()]
            out.setdefault(match.group("fw").lower(), []).extend(ids)
    return out


def frameworks_from_env(environ: Mapping[str, str]) -> dict[str, list[str]]:
    """The seed convention `OPENAI_API_KEY_<FW>_ID=key_...` -> {fw: [key ids]}."""
    return _ids_from_env(environ, _FW_KEY_ENV)


def anthropic_frameworks_from_env(environ: Mapping[str, str]) -> dict[str, list[str]]:
    """The same convention for Claude frameworks: `ANTHROPIC_API_KEY_<FW>_ID=apikey_...`."""
    return _ids_from_env(environ, _FW_ANTHROPIC_KEY_ENV)


# --------------------------------------------------------------------------------------
# Names


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name a typo most likely meant, if any is close enough."""
    found = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    return found[0] if found else None


def _unknown(name: str, valid: Iterable[str], where: str, *, prefix: str = "") -> ConfigError:
    """`name` (shown with `prefix`) is not one of `valid`: the error, with a suggestion."""
    guess = closest(name, valid)
    hint = f"did you mean {prefix}{guess}?" if guess else "no setting has a similar name"
    return ConfigError(f"{prefix}{name} ({where}): unknown setting; {hint}")


def _setting_names() -> set[str]:
    """Every name a setting answers to, lower case: its field name and its aliases."""
    names = set(Settings.model_fields)
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(c.lower() for c in alias.choices if isinstance(c, str))
    return names


def _check_env_names(names: Iterable[str], where: str) -> None:
    """Refuse `TOKENSETTLE_*` names (any case, as pydantic-settings reads them) that are
    neither a setting nor one we export to the commands we start."""
    valid = {n.upper() for n in Settings.model_fields}
    exported = {n.upper() for n in EXPORTED_ENV}
    for name in sorted(names):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in exported:
            continue
        rest = upper.removeprefix(ENV_PREFIX)
        if rest not in valid:
            raise _unknown(rest, valid, where, prefix=ENV_PREFIX)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _dotenv_names() -> tuple[list[str], Path]:
    """The names in the `.env` file pydantic-settings will read (lower case). A line
    python-dotenv cannot parse (it would skip it with a warning on stderr) is an error: it
    is a setting that would silently not be set."""
    env_file = Path(str(Settings.model_config.get("env_file") or ".env"))
    with contextlib.suppress(OSError):  # the working directory may be gone
        env_file = env_file.absolute()
    dotenv_log = logging.getLogger("dotenv.main")
    collect, propagate = _Collect(), dotenv_log.propagate
    dotenv_log.addHandler(collect)
    dotenv_log.propagate = False
    try:
        source = DotEnvSettingsSource(Settings)
    finally:
        dotenv_log.removeHandler(collect)
        dotenv_log.propagate = propagate
    if collect.messages:
        reason = collect.messages[0].removeprefix("python-dotenv ")
        raise ConfigError(f"{env_file}: {reason}; write NAME=value on each line")
    return list(source.env_vars), env_file


def _read_toml(path: Path) -> dict[str, Any]:
    where = f"config ({ENV_PREFIX}CONFIG or --config): {path}"
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{where} is a directory; give the TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
    valid = _setting_names()
    for key in data:
        if key.lower() not in valid:
            raise _unknown(key, valid, f"config {path}")
    return data


# --------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class _ErrorLine:
    setting: str
    message: str


def _describe(exc: ValidationError) -> _ErrorLine:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(part) for part in err.get("loc", ())]
    setting = loc[0] if loc else "settings"
    env_name = f"{ENV_PREFIX}{setting.upper()}"
    nested = setting in ("frameworks", "leases")
    where = ".".join(loc) if nested else f"{setting} ({env_name})"
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden" and setting == "frameworks" and len(loc) == 3:
        guess = closest(loc[2], FrameworkScope.model_fields)
        hint = f"did you mean {guess}?" if guess else "the keys are api_key_ids, project_ids"
        message = f"unknown key; {hint}"
    elif err.get("type") == "extra_forbidden" and setting == "leases":
        fields = _leases_fields(loc[1:-1])
        guess = closest(loc[-1], fields)
        hint = f"did you mean {guess}?" if guess else f"the keys are {', '.join(fields)}"
        message = f"unknown key; {hint}"
    return _ErrorLine(where, message)


def _leases_fields(path: Sequence[str]) -> list[str]:
    """The keys valid at `path` under `[leases]` (list indices skipped)."""
    nested: dict[str, type[BaseModel]] = {"anthropic": KeyPool, "keys": PoolKey}
    model: type[BaseModel] = LeasePools
    for part in path:
        model = nested.get(part, model)  # list indices leave it as it is
    return list(model.model_fields)


def _values_from(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings named in an explicit environment mapping (`TOKENSETTLE_<NAME>`, key aliases)."""
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        if name in ("admin_key", "anthropic_admin_key"):
            continue
        raw = environ.get(f"{ENV_PREFIX}{name.upper()}")
        if raw is not None and raw != "":
            values[name] = raw
    for field_name, aliases in (
        ("admin_key", ADMIN_KEY_ALIASES),
        ("anthropic_admin_key", ANTHROPIC_KEY_ALIASES),
    ):
        for alias in aliases:
            if environ.get(alias):
                values[field_name] = environ[alias]
                break
    return values


def _merged_frameworks(
    configured: Mapping[str, FrameworkScope], env: Mapping[str, str]
) -> dict[str, FrameworkScope]:
    """Framework scopes by lower-case name: the configured ones (mixed-case names merged)
    and the environment conventions `OPENAI_API_KEY_<FW>_ID` and
    `ANTHROPIC_API_KEY_<FW>_ID`. One framework lives in one provider's usage report."""
    merged: dict[str, FrameworkScope] = {}
    for name, fw_scope in configured.items():
        into = merged.setdefault(name.lower(), FrameworkScope())
        into.api_key_ids = sorted(set(into.api_key_ids) | set(fw_scope.api_key_ids))
        into.project_ids = sorted(set(into.project_ids) | set(fw_scope.project_ids))
        into.workspace_ids = sorted(set(into.workspace_ids) | set(fw_scope.workspace_ids))
        _one_provider(name, into, fw_scope.provider)
    for provider, found in (
        ("openai", frameworks_from_env(env)),
        ("anthropic", anthropic_frameworks_from_env(env)),
    ):
        for fw, ids in found.items():
            scope = merged.setdefault(fw, FrameworkScope())
            scope.api_key_ids = sorted(set(scope.api_key_ids) | set(ids))
            _one_provider(fw, scope, provider if provider == "anthropic" else scope.provider)
    return merged


def _one_provider(name: str, scope: FrameworkScope, provider: str | None) -> None:
    if provider is None:
        return
    if scope.provider not in (None, provider):
        raise ConfigError(
            f"frameworks.{name}: its usage is configured for both {scope.provider} and "
            f"{provider}; a framework's runs live in one provider (declare a run's own scope "
            "in usage_scope.json to mix them)"
        )
    scope.provider = provider  # type: ignore[assignment]


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings from every source. Raises ConfigError with one line on a bad value
    or an unknown name.

    With `environ`, that mapping replaces the process environment and `.env` entirely.
    """
    env = os.environ if environ is None else environ
    _check_env_names(env, "environment")
    if environ is None:
        try:
            names, dotenv = _dotenv_names()
        except (OSError, ValueError) as exc:
            raise ConfigError(f".env file of the working directory cannot be read: {exc}") from None
        _check_env_names(names, f"{dotenv}")
    init = {k: v for k, v in (overrides or {}).items() if v is not None}
    if environ is not None:
        init = {**_values_from(environ), **init}
    path = config_file or (
        Path(env[f"{ENV_PREFIX}CONFIG"]) if env.get(f"{ENV_PREFIX}CONFIG") else None
    )
    token = _toml_data.set(_read_toml(path) if path is not None else None)
    isolated = _isolated.set(environ is not None)
    try:
        settings = Settings(**init)
    except ValidationError as exc:
        line = _describe(exc)
        raise ConfigError(f"{line.setting}: {line.message}") from None
    except SettingsError as exc:  # e.g. TOKENSETTLE_FRAMEWORKS that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = field.group(1) if field else "settings"
        where = f"{name} ({ENV_PREFIX}{name.upper()})" if field else name
        raise ConfigError(f"{where}: {exc}; a structured value must be JSON") from None
    finally:
        _toml_data.reset(token)
        _isolated.reset(isolated)
    settings.frameworks = _merged_frameworks(settings.frameworks, env)
    if path is not None:
        settings.config = path
    return settings


# --------------------------------------------------------------------------------------
# What the settings point at


@dataclass(frozen=True, slots=True)
class Problem:
    """Why what a setting names cannot be used, and what to do. `str()` is the one line a
    command prints: `setting: subject what; fix`."""

    setting: str
    subject: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.subject} {self.what}; {self.fix}"


ROOTS_SETTING = f"runs_dirs ({ENV_PREFIX}RUNS_DIRS or --runs-dir)"
STATE_SETTING = f"state_dir ({ENV_PREFIX}STATE_DIR)"
HTTP_SETTING = f"http_addr ({ENV_PREFIX}HTTP_ADDR)"


def current_user() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True, slots=True)
class PathStat:
    exists: bool
    is_dir: bool
    error: OSError | None = None  # e.g. EACCES on a directory above it


def stat_path(path: Path) -> PathStat:
    """What `stat` says, without raising: pathlib's exists()/is_dir() raise on EACCES."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return PathStat(exists=False, is_dir=False)
    except OSError as exc:
        return PathStat(exists=False, is_dir=False, error=exc)
    return PathStat(exists=True, is_dir=stat.S_ISDIR(st.st_mode))


PROBE_PREFIX = ".tokensettle-probe-"


def probe_write(directory: Path) -> OSError | None:
    """Create and delete `.tokensettle-probe-<random>.tmp` in `directory`: the only sure
    answer to "can we write here" (access bits miss read-only mounts, ACLs, quotas)."""
    probe = directory / f"{PROBE_PREFIX}{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return exc
    os.close(fd)
    try:
        probe.unlink()
    except OSError as exc:
        return exc
    return None


def root_problem(
    root: Path, *, exists: bool, is_dir: bool, reach_error: OSError | None, user: str
) -> Problem | None:
    """A runs root must be a directory we can reach (what every command needs; `doctor`
    adds the write checks the daemon needs)."""
    if reach_error is not None:
        return Problem(
            ROOTS_SETTING,
            str(root),
            f"cannot be reached by {user}: {reach_error.strerror or reach_error}",
            f"give {user} search (x) permission on every directory above {root}; under "
            "systemd, ProtectHome=yes hides /home (use ProtectHome=read-only)",
        )
    pointer = (
        f"point {ENV_PREFIX}RUNS_DIRS or --runs-dir at the directory holding "
        "<framework>/<run_id>/metrics.json"
    )
    if not exists:
        return Problem(
            ROOTS_SETTING, str(root), "does not exist", f"create it (mkdir -p {root}) or {pointer}"
        )
    if not is_dir:
        return Problem(ROOTS_SETTING, str(root), "is not a directory", pointer)
    return None


def roots_problem(roots: Sequence[Path]) -> Problem | None:
    """The first root that cannot be read as a runs directory, or None."""
    user = current_user()
    for root in roots:
        found = stat_path(root)
        problem = root_problem(
            root, exists=found.exists, is_dir=found.is_dir, reach_error=found.error, user=user
        )
        if problem is not None:
            return problem
        if not os.access(root, os.R_OK | os.X_OK):
            return Problem(
                ROOTS_SETTING,
                str(root),
                f"cannot be read by {user}",
                f"give {user} read access (chmod -R g+rX {root}, with {user} in the group)",
            )
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class StateDirView:
    """What the file system says about the state directory (`look_at_state_dir`)."""

    path: Path
    inside_root: Path | None = None
    exists: bool = True
    is_dir: bool = True
    #: why it cannot be written (stat, access or a probe file); None when it can
    write_error: OSError | None = None
    #: its nearest existing ancestor, when it does not exist yet
    ancestor: Path | None = None
    ancestor_is_dir: bool = True
    ancestor_writable: bool = False


def look_at_state_dir(
    state_dir: Path, roots: Sequence[Path] = (), *, probe: bool = False
) -> StateDirView:
    """Observe the state directory: stat and access only, or with `probe` also create and
    delete a file in it (doctor)."""
    inside = next((r for r in roots if stat_path(r).is_dir and _inside(state_dir, r)), None)
    found = stat_path(state_dir)
    if found.error is not None:  # cannot even be looked at: as good as unwritable
        return StateDirView(state_dir, inside, write_error=found.error)
    if found.exists:
        error: OSError | None = None
        if found.is_dir and inside is None:
            if probe:
                error = probe_write(state_dir)
            elif not os.access(state_dir, os.W_OK | os.X_OK):
                error = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return StateDirView(state_dir, inside, is_dir=found.is_dir, write_error=error)
    ancestor = next((p for p in state_dir.absolute().parents if stat_path(p).exists), None)
    above = stat_path(ancestor) if ancestor is not None else PathStat(False, False)
    return StateDirView(
        state_dir,
        inside,
        exists=False,
        is_dir=False,
        ancestor=ancestor,
        ancestor_is_dir=above.is_dir,
        ancestor_writable=(
            ancestor is not None and above.is_dir and os.access(ancestor, os.W_OK | os.X_OK)
        ),
    )


def state_dir_verdict(view: StateDirView, user: str) -> Problem | None:
    """The state directory (the SQLite index) must be outside the watched roots and be a
    writable directory, or creatable under its nearest existing ancestor."""
    path = view.path
    move = (
        f"set {ENV_PREFIX}STATE_DIR to a local directory outside the runs (under systemd: "
        "StateDirectory= gives /var/lib/tokensettle)"
    )
    if view.inside_root is not None:
        return Problem(
            STATE_SETTING, str(path), f"is inside the watched root {view.inside_root}", move
        )
    if view.exists and not view.is_dir:
        return Problem(STATE_SETTING, str(path), "is not a directory", move)
    if view.exists and view.write_error is not None:
        reason = view.write_error.strerror or str(view.write_error)
        return Problem(
            STATE_SETTING,
            str(path),
            f"is not writable by {user}: {reason}",
            f"chown {user} {path}, or {move}",
        )
    if view.exists:
        return None
    if view.ancestor is not None and not view.ancestor_is_dir:
        return Problem(
            STATE_SETTING, str(path), f"cannot be created: {view.ancestor} is a file", move
        )
    if view.ancestor is None or not view.ancestor_writable:
        where = view.ancestor if view.ancestor is not None else path.anchor
        return Problem(
            STATE_SETTING,
            str(path),
            f"does not exist and cannot be created ({where} is not writable by {user})",
            f"mkdir -p {path} && chown {user} {path}, or {move}",
        )
    return None


def state_dir_problem(state_dir: Path, roots: Sequence[Path] = ()) -> Problem | None:
    """Why the daemon cannot keep its index in `state_dir`, or None. Writes nothing."""
    return state_dir_verdict(look_at_state_dir(state_dir, roots), current_user())


def http_addr_problem(addr: str, error: OSError) -> Problem:
    """The one line for an HTTP address that cannot be bound (the daemon at start; the
    doctor's bind test)."""
    host, _, port = addr.rpartition(":")
    disable = f"an empty {ENV_PREFIX}HTTP_ADDR disables the HTTP server"
    if isinstance(error, socket.gaierror):
        return Problem(
            HTTP_SETTING,
            addr,
            f"names a host that cannot be resolved ({error.strerror or error})",
            "use an IP address, e.g. 127.0.0.1:9464",
        )
    if error.errno == errno.EADDRINUSE:
        return Problem(
            HTTP_SETTING,
            addr,
            "is in use by another process",
            f"stop it (another tokensettle run?) or choose a free port; {disable}",
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return Problem(
            HTTP_SETTING,
            addr,
            f"is not an address of this machine ({host})",
            "use 127.0.0.1 or an address of one of its interfaces",
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return Problem(
            HTTP_SETTING,
            addr,
            f"may not be bound by {current_user()} (port {port})",
            "use a port from 1024 up (lower ports need privileges)",
        )
    return Problem(
        HTTP_SETTING,
        addr,
        f"cannot be bound: {error.strerror or error}",
        f"choose another address; {disable}",
    )

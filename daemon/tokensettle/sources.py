"""The usage reports tokensettle reads: one client per provider whose admin key is set.

OpenAI's Usage API needs `ADMIN_KEY`, Anthropic's usage report `ANTHROPIC_ADMIN_KEY`; a
deployment may have either or both. A run whose provider has no client is an `error`
naming the missing key (`Reconciler.run_problem`), the other runs settle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from tokensettle import anthropic_api, usage_api
from tokensettle.errors import ConfigError
from tokensettle.usage import ANTHROPIC, OPENAI

if TYPE_CHECKING:
    from tokensettle.config import Settings
    from tokensettle.usage_api import UsageSource

NO_KEY = (
    "admin_key: not set; export TOKENSETTLE_ADMIN_KEY (or OPENAI_ADMIN_KEY / "
    "OPENAI_API_KEY_USAGE_TRACKING) with an OpenAI admin key that has api.usage.read, "
    "or TOKENSETTLE_ANTHROPIC_ADMIN_KEY for Anthropic usage (or their credential files)"
)


def providers(settings: Settings) -> list[str]:
    """The providers whose admin key is configured, OpenAI first."""
    named = [(OPENAI, settings.secret_key()), (ANTHROPIC, settings.anthropic_key())]
    return [name for name, key in named if key]


def usage_sources(
    settings: Settings, session: aiohttp.ClientSession, *, quick: bool = False
) -> dict[str, UsageSource]:
    """provider -> its usage report client. Raises ConfigError when no admin key is set."""
    sources: dict[str, UsageSource] = {}
    for provider in providers(settings):
        if provider == OPENAI:
            sources[provider] = usage_api.client_for(settings, session, quick=quick)
        else:
            sources[provider] = anthropic_api.client_for(settings, session, quick=quick)
    if not sources:
        raise ConfigError(NO_KEY)
    return sources

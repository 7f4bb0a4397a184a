"""Key ids without hand work: a framework whose secret key is in the environment
(`OPENAI_API_KEY_<FW>`, the convention of the runners our users have) but whose id is not
(`OPENAI_API_KEY_<FW>_ID`) gets its id from the project API keys list, matched on the
`redacted_value` the list shows (`sk-proj-abc...wxyz`). The secret is only compared,
never printed, logged or stored.

Which projects are searched: the frameworks' `project_ids` and `LEASE_PROJECT` (the Admin
API has no organisation-wide key list). A secret that matches no key there, or more than
one, is reported and left unresolved: the framework then stays as configured.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from tokensettle.admin_api import AdminApiError, AdminClient, redacted_matches
from tokensettle.config import ADMIN_KEY_ALIASES, FrameworkScope, Settings

log = structlog.get_logger("tokensettle.config")

_SECRET_ENV = re.compile(r"^OPENAI_API_KEY_(?P<fw>[A-Za-z0-9_]+)$")


@dataclass(frozen=True, slots=True)
class Resolution:
    framework: str
    key_id: str | None
    project_id: str | None = None
    problem: str | None = None


def unresolved_secrets(environ: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """framework -> secret key, for frameworks with a secret in the environment and no
    key id (neither `OPENAI_API_KEY_<FW>_ID` nor configured `api_key_ids`)."""
    out: dict[str, str] = {}
    for name, value in environ.items():
        match = _SECRET_ENV.match(name)
        if not match or name in ADMIN_KEY_ALIASES or name.endswith("_ID") or not value.strip():
            continue
        framework = match.group("fw").lower()
        configured = settings.frameworks.get(framework)
        if configured is not None and configured.api_key_ids:
            continue
        out[framework] = value.strip()
    return out


def search_projects(settings: Settings) -> list[str]:
    projects = {p for fw in settings.frameworks.values() for p in fw.project_ids}
    if settings.lease_project:
        projects.add(settings.lease_project)
    return sorted(projects)


async def resolve(
    client: AdminClient, projects: Iterable[str], wanted: Mapping[str, str]
) -> list[Resolution]:
    """The key id of each wanted framework's secret, from the projects' key lists."""
    projects = list(projects)
    if not wanted:
        return []
    if not projects:
        return [
            Resolution(
                fw,
                None,
                problem="no project to search: set its project_ids or "
                "LEASE_PROJECT, or OPENAI_API_KEY_<FW>_ID",
            )
            for fw in sorted(wanted)
        ]
    listed: list[tuple[str, str, str]] = []  # (project, key id, redacted value)
    errors: list[str] = []
    for project in projects:
        try:
            keys = await client.list_keys(project)
        except AdminApiError as exc:
            errors.append(f"{project}: {exc}")
            continue
        listed.extend((project, k.id, k.redacted_value) for k in keys)
    out: list[Resolution] = []
    for framework, secret in sorted(wanted.items()):
        hits = [(p, k) for p, k, redacted in listed if redacted_matches(redacted, secret)]
        if len(hits) == 1:
            out.append(Resolution(framework, hits[0][1], hits[0][0]))
        elif hits:
            out.append(
                Resolution(
                    framework,
                    None,
                    problem=f"{len(hits)} keys look alike in their redacted form "
                    f"({', '.join(k for _, k in hits)}); set OPENAI_API_KEY_{framework.upper()}_ID",
                )
            )
        else:
            where = ", ".join(projects)
            why = f" ({'; '.join(errors)})" if errors else ""
            out.append(Resolution(framework, None, problem=f"no key of {where} matches it{why}"))
    return out


def apply(settings: Settings, resolutions: Iterable[Resolution]) -> None:
    """Put the resolved key ids into the frameworks' scopes, logging each (ids only)."""
    for r in resolutions:
        if r.key_id is None:
            log.warning(
                "config.key_id_unresolved",
                framework=r.framework,
                detail=f"OPENAI_API_KEY_{r.framework.upper()} is set but its key id is not: "
                f"{r.problem}",
            )
            continue
        scope = settings.frameworks.setdefault(r.framework, FrameworkScope())
        scope.api_key_ids = sorted({*scope.api_key_ids, r.key_id})
        log.info(
            "config.key_id_resolved",
            framework=r.framework,
            key_id=r.key_id,
            project_id=r.project_id,
            detail=f"from OPENAI_API_KEY_{r.framework.upper()} and the project's key list",
        )

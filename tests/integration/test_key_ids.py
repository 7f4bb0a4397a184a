"""Key ids without hand work: a framework's secret key in the environment, its id from the
project key list (matched on the redacted value), the secret never shown."""

from __future__ import annotations

import aiohttp

from tests.integration.conftest import Stage
from tests.support.runs import virtual_request, write_run
from tokensettle import keyids
from tokensettle.admin_api import client_for
from tokensettle.doctor import key_id_check, run_checks
from tokensettle.simulator.admin import AdminModel

SECRET = "sk-proj-chatdevRUNNERkey-7a1b2c3d4e5f6a7b8c9d"
PROJECT = "proj_test"


async def test_a_frameworks_secret_key_resolves_to_its_id_and_settles_by_it(
    stage: Stage, session: aiohttp.ClientSession
) -> None:
    admin: AdminModel = stage.sim.admin
    admin.configure(
        {
            "projects": [{"id": PROJECT, "name": "Experiments"}],
            "api_keys": [
                {"id": "key_chatdevREAL01", "value": SECRET, "project_id": PROJECT},
                {
                    "id": "key_other0000001",
                    "value": "sk-proj-somethingELSE-000",
                    "project_id": PROJECT,
                },
            ],
        }
    )
    reconciler = stage.reconciler(frameworks={"chatdev": {"project_ids": [PROJECT]}})
    settings = reconciler.settings
    settings.frameworks["chatdev"].api_key_ids = []  # only the secret is known
    environ = {"OPENAI_API_KEY_CHATDEV": SECRET, "OPENAI_API_KEY_GHSPEC": "sk-proj-unknown-1"}
    wanted = keyids.unresolved_secrets(environ, settings)
    assert set(wanted) == {"chatdev", "ghspec"}
    client = client_for(settings, session, settings.secret_key() or "")
    resolved = await keyids.resolve(client, keyids.search_projects(settings), wanted)
    by_fw = {r.framework: r for r in resolved}
    assert by_fw["chatdev"].key_id == "key_chatdevREAL01"
    assert by_fw["ghspec"].key_id is None and "matches" in (by_fw["ghspec"].problem or "")
    keyids.apply(settings, resolved)
    assert settings.scope_for("chatdev").api_key_ids == frozenset({"key_chatdevREAL01"})
    checks = [key_id_check(r) for r in resolved]
    assert all(SECRET not in c.detail and SECRET[-8:] not in c.detail for c in checks)

    end = stage.end
    path = write_run(stage.root, "chatdev", "by-secret", [(end - 100, end)])
    await stage.control.add(
        [
            {**virtual_request(end - 50, "chatdev", 500, 50, 1), "api_key_id": "key_chatdevREAL01"},
            virtual_request(end - 50, "chatdev", 99, 9, 1),  # another key of the framework's
        ]
    )
    assert await stage.settle(reconciler) == ["verified"]
    assert b'"TOK_IN": 500' in path.read_bytes()


async def test_doctor_judges_the_scope_with_the_resolved_id(
    stage: Stage, session: aiohttp.ClientSession
) -> None:
    """doctor said `ok key ids (chatdev): ... is key_...` and then warned that chatdev had
    no scope: it resolved the id but judged the scope without it."""
    stage.sim.admin.configure(
        {
            "projects": [{"id": PROJECT, "name": "Experiments"}],
            "api_keys": [{"id": "key_chatdevREAL01", "value": SECRET, "project_id": PROJECT}],
        }
    )
    end = stage.end
    write_run(stage.root, "autogen", "r1", [(end - 100, end)])
    # No scope configured at all: the key list of the lease project is where the id is.
    settings = stage.reconciler(lease_project=PROJECT).settings
    assert settings.scope_for("autogen").is_organisation
    checks = await run_checks(
        settings,
        None,
        admin=client_for(settings, session, settings.secret_key() or ""),
        environ={"OPENAI_API_KEY_AUTOGEN": SECRET},
    )
    found = {c.name: c for c in checks}
    assert found["key ids (autogen)"].ok is True, found
    scope = found["scope autogen"]
    assert scope.ok is True and "key_chatdevREAL01" in scope.detail, scope

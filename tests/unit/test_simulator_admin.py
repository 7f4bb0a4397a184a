"""The simulator's Admin API and model endpoints as a pure model (no sockets, no clock)."""

from __future__ import annotations

from typing import Any

import pytest

from tokensettle.simulator.admin import (
    DEFAULT_OUTPUT_TOKENS,
    AdminModel,
    SimKey,
)
from tokensettle.simulator.scenario import ApiError, Fault, Scenario, ScenarioError
from tokensettle.usage import Usage

NOW = 1_780_000_000.0
LEASES = "proj_leases"


def model(**admin: Any) -> AdminModel:
    projects = admin.pop(
        "projects",
        [
            {"id": "proj_default", "default": True},
            {"id": LEASES, "name": "Leases"},
            {"id": "proj_old", "archived": True},
            {"id": "proj_capped", "max_key_lifetime": 3600},
        ],
    )
    return AdminModel.from_json({"projects": projects, **admin})


def refused(call: Any, status: int, needle: str) -> ApiError:
    with pytest.raises(ApiError) as err:
        call()
    assert err.value.status == status, err.value.message
    assert needle in err.value.message, err.value.message
    assert set(err.value.envelope()["error"]) == {"message", "type", "param", "code"}
    return err.value


def account(m: AdminModel, project: str = LEASES, **body: Any) -> dict[str, Any]:
    return m.create_service_account(project, {"name": "tokensettle-leases", **body}, NOW)


def mint(m: AdminModel, project: str = LEASES, **body: Any) -> dict[str, Any]:
    sa = account(m, project, create_service_account_only=True)
    return m.create_key(project, sa["id"], {"name": "k", "expires_in_seconds": 600, **body}, NOW)


def bearer(value: str) -> str:
    return f"Bearer {value}"


# ---------------------------------------------------------------------------- projects


def test_projects_and_their_refusals() -> None:
    m = model()
    assert m.get_project(LEASES)["status"] == "active"
    old = m.get_project("proj_old")
    assert old["status"] == "archived" and old["archived_at"] is not None
    refused(lambda: m.get_project("proj_nope"), 404, "No such project")
    refused(lambda: account(m, "proj_default"), 400, "The Default project cannot have service")
    refused(lambda: account(m, "proj_old"), 400, "archived")
    refused(lambda: account(m, "proj_nope"), 404, "No such project")


def test_default_projects_without_an_admin_section() -> None:
    m = AdminModel.from_json(None)
    assert sorted(m.projects) == ["proj_default", "proj_simulator"]
    assert m.projects["proj_default"].default


def test_service_accounts_with_and_without_a_first_key() -> None:
    m = model()
    only = account(m, create_service_account_only=True)
    assert only["role"] == "none" and only["api_key"] is None
    member = account(m, expires_in_seconds=60)
    assert member["role"] == "member"
    first = member["api_key"]
    assert first["value"].startswith("sk-svcacct-") and first["id"].startswith("key_")
    assert first["expires_at"] == int(NOW) + 60
    refused(
        lambda: account(m, create_service_account_only=True, expires_in_seconds=60),
        400,
        "cannot be used when 'create_service_account_only' is true",
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"nmae": "x"}, "Unrecognized request argument supplied: nmae"),
        ({}, "Missing required parameter: 'name'."),
        ({"name": 5}, "Invalid type for 'name': expected string, but got integer instead."),
        ({"name": " "}, "must not be empty"),
        ({"name": "x", "create_service_account_only": "yes"}, "expected boolean"),
        ({"name": "x", "expires_in_seconds": 1.5}, "expected integer, but got number"),
        ({"name": "x", "expires_in_seconds": True}, "but got boolean"),
        ({"name": "x", "expires_in_seconds": 0}, "between 1 and 31536000"),
    ],
)
def test_service_account_bodies_are_validated(body: dict[str, Any], needle: str) -> None:
    refused(lambda: model().create_service_account(LEASES, body, NOW), 400, needle)


# ---------------------------------------------------------------------------- keys


def test_keys_expire_as_asked_and_a_policy_caps_them() -> None:
    m = model()
    key = mint(m)
    assert key["object"] == "organization.project.service_account.api_key"
    assert key["expires_at"] == int(NOW) + 600
    assert mint(m, "proj_capped", expires_in_seconds=3600)["expires_at"] == int(NOW) + 3600
    refused(lambda: mint(m, "proj_capped", expires_in_seconds=3601), 400, "must not exceed 3600")
    refused(lambda: mint(m, "proj_capped", expires_in_seconds=None), 400, "must be provided")
    sa = account(m, create_service_account_only=True)
    refused(lambda: m.create_key("proj_capped", sa["id"], {}, NOW), 404, "service account")
    refused(lambda: m.create_key(LEASES, sa["id"], {"scopes": [1]}, NOW), 400, "scopes")
    refused(lambda: m.create_key(LEASES, sa["id"], {"value": "x"}, NOW), 400, "Unrecognized")


def test_list_pages_retrieve_and_delete() -> None:
    m = model()
    ids = [mint(m)["id"] for _ in range(5)]
    page = m.list_keys(LEASES, [("limit", "2")])
    assert [k["id"] for k in page["data"]] == ids[:2] and page["has_more"]
    assert page["first_id"] == ids[0] and page["last_id"] == ids[1]
    rest = m.list_keys(LEASES, [("limit", "2"), ("after", ids[1])])
    assert [k["id"] for k in rest["data"]] == ids[2:4] and rest["has_more"]
    key = m.get_key(LEASES, ids[0])
    assert key["owner"]["type"] == "service_account"
    assert key["owner"]["service_account"]["role"] == "none"
    assert key["redacted_value"].startswith("sk-svcac...")
    assert "value" not in key
    assert m.delete_key(LEASES, ids[2], NOW) == {
        "object": "organization.project.api_key.deleted",
        "id": ids[2],
        "deleted": True,
    }
    refused(lambda: m.get_key(LEASES, ids[2]), 404, "No such API key")
    refused(lambda: m.delete_key(LEASES, ids[2], NOW), 404, "No such API key")
    # a cursor naming a key deleted meanwhile still continues the list
    after = m.list_keys(LEASES, [("after", ids[1])])
    assert [k["id"] for k in after["data"]] == ids[3:] and not after["has_more"]
    refused(lambda: m.list_keys(LEASES, [("limit", "101")]), 400, "between 1 and 100")
    refused(lambda: m.list_keys(LEASES, [("after", "key_nope")]), 400, "after")
    refused(lambda: m.list_keys(LEASES, [("owner_project_access", "all")]), 400, "'any'")
    refused(lambda: m.get_key("proj_capped", ids[0]), 404, "No such API key")


def test_the_specs_reading_of_delete_can_be_chosen() -> None:
    m = model(projects=[{"id": LEASES, "refuse_sa_key_delete": True}])
    key = mint(m)
    refused(lambda: m.delete_key(LEASES, key["id"], NOW), 400, "belongs to a service account")


def test_no_answer_after_creation_carries_a_value() -> None:
    m = model()
    value = mint(m)["value"]
    seen = [m.list_keys(LEASES, []), m.inspect(NOW), m.config_json()]
    seen += [m.get_key(LEASES, k) for k in m.keys]
    assert value not in repr(seen) and value not in repr(m)
    assert all(not hasattr(k, "value") for k in m.keys.values())


# ---------------------------------------------------------------------------- model calls


def live_key(m: AdminModel) -> tuple[str, SimKey]:
    created = mint(m)
    return created["value"], m.keys[created["id"]]


def test_only_a_live_key_may_call_a_model() -> None:
    m = model()
    value, key = live_key(m)
    assert m.model_key(bearer(value), NOW) is key
    for header, needle in [
        (None, "didn't provide an API key"),
        ("Basic abc", "didn't provide an API key"),
        (bearer("sk-wrong"), "Incorrect API key"),
        (bearer(value), "expired"),
    ]:
        at = NOW + 600 if needle == "expired" else NOW
        got = m.model_key(header, at)
        assert isinstance(got, ApiError) and got.status == 401 and needle in got.message
    m.delete_key(LEASES, key.id, NOW)
    got = m.model_key(bearer(value), NOW)
    assert isinstance(got, ApiError) and "Incorrect API key" in got.message


def test_a_new_key_can_wait_before_it_authenticates() -> None:
    m = model(key_auth_delay=3)
    value, key = live_key(m)
    assert isinstance(m.model_key(bearer(value), NOW + 2), ApiError)
    assert m.model_key(bearer(value), NOW + 3) is key


def test_a_chat_completion_records_its_deterministic_usage() -> None:
    m = model(usage_delay=7)
    _, key = live_key(m)
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "x" * 10},
            {"role": "user", "content": [{"type": "text", "text": "y" * 7}]},
        ],
        "max_completion_tokens": 40,
        "n": 2,
    }
    call = m.chat_completion(key, body, NOW)
    usage = call.response["usage"]
    assert usage["prompt_tokens"] == 5  # ceil(17 / 4)
    assert usage["completion_tokens"] == 80 and usage["total_tokens"] == 85
    assert len(call.response["choices"]) == 2
    req = call.request
    assert (req.api_key_id, req.project_id, req.model, req.time) == (
        key.id,
        LEASES,
        "gpt-4o-mini",
        NOW,
    )
    assert req.usage_at(NOW + 6.9) is None
    assert req.usage_at(NOW + 7) == Usage(5, 80, 1, input_cached_tokens=0)
    assert key.calls == 1 and key.last_used_at == int(NOW)


def test_a_response_records_its_deterministic_usage() -> None:
    m = model()
    _, key = live_key(m)
    call = m.response(key, {"model": "gpt-4.1", "instructions": "abcd", "input": "efgh"}, NOW)
    usage = call.response["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (2, DEFAULT_OUTPUT_TOKENS)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "z" * 9}]}]
    call = m.response(key, {"model": "gpt-4.1", "input": items, "max_output_tokens": 64}, NOW)
    assert (call.response["usage"]["input_tokens"], call.response["usage"]["output_tokens"]) == (
        3,
        64,
    )


@pytest.mark.parametrize(
    ("endpoint", "body", "needle"),
    [
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "'model'"),
        ("chat", {"model": "m", "messages": []}, "minimum length 1"),
        ("chat", {"model": "m", "messages": "hi"}, "Invalid type for 'messages'"),
        ("chat", {"model": "m", "messages": [{"role": "robot"}]}, "messages[0].role"),
        ("chat", {"model": "m", "messages": [{"role": "user"}], "max_token": 5}, "max_token"),
        ("chat", {"model": "m", "messages": [{"role": "user"}], "stream": True}, "not stream"),
        ("chat", {"model": "m", "messages": [{"role": "user"}], "n": 0}, "'n'"),
        ("chat", {"model": "m", "messages": [{"role": "user"}], "temperature": 3}, "temperature"),
        ("responses", {"model": "m"}, "Missing required parameter: 'input'."),
        ("responses", {"model": "m", "input": 5}, "expected string or array"),
        ("responses", {"model": "m", "input": "x", "max_output_tokens": 8}, ">= 16"),
        ("responses", {"model": "", "input": "x"}, "'model'"),
        ("responses", {"model": "m", "input": "x", "metadata": {"a": 1}}, "metadata"),
    ],
)
def test_model_bodies_are_validated(endpoint: str, body: dict[str, Any], needle: str) -> None:
    m = model()
    _, key = live_key(m)
    call = m.chat_completion if endpoint == "chat" else m.response
    refused(lambda: call(key, body, NOW), 400, needle)
    assert key.calls == 0


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("admin", "needle"),
    [
        ({"project": []}, "unknown admin fields"),
        ({"projects": [{"id": "default"}]}, "'proj_...'"),
        ({"projects": [{"id": "proj_a", "archive": True}]}, "unknown project fields"),
        ({"projects": [{"id": "proj_a", "default": "yes"}]}, "'default' must be true or false"),
        ({"projects": [{"id": "proj_a", "max_key_lifetime": 0}]}, "max_key_lifetime"),
        ({"usage_delay": -1}, "usage_delay"),
        ({"api_keys": [{"id": "key_a", "value": "sk-x", "project_id": "proj_z"}]}, "unknown"),
        ({"api_keys": [{"id": "key_a", "value": "", "project_id": "proj_simulator"}]}, "'value'"),
    ],
)
def test_a_bad_admin_section_is_refused(admin: dict[str, Any], needle: str) -> None:
    with pytest.raises(ScenarioError, match=needle):
        AdminModel.from_json(admin)


def test_static_project_keys_call_models_and_list_redacted() -> None:
    m = AdminModel.from_json(
        {
            "api_keys": [
                {
                    "id": "key_chatdev",
                    "value": "sk-proj-chatdev-0001",
                    "project_id": "proj_simulator",
                }
            ]
        }
    )
    key = m.model_key(bearer("sk-proj-chatdev-0001"), NOW)
    assert isinstance(key, SimKey) and key.id == "key_chatdev"
    listed = m.list_keys("proj_simulator", [])["data"]
    assert [k["owner"]["type"] for k in listed] == ["user"]
    assert "sk-proj-chatdev-0001" not in repr(listed)
    with pytest.raises(ScenarioError, match="given twice"):
        m.add_static_key(
            {"id": "key_x", "value": "sk-proj-chatdev-0001", "project_id": "proj_simulator"}
        )


def test_faults_wait_for_their_target() -> None:
    scenario = Scenario.from_json(
        {"faults": [{"kind": "500", "target": "admin"}, {"kind": "429"}], "admin": {}}
    )
    assert scenario.next_fault("model") is None
    assert scenario.next_fault() == Fault("429")
    assert scenario.next_fault("admin") == Fault("500", target="admin")
    assert scenario.to_json()["admin"] == {}
    with pytest.raises(ScenarioError, match="unknown fault target"):
        Fault.from_json({"kind": "500", "target": "billing"})
    assert Fault.from_json(Fault("503", target="admin").to_json()) == Fault("503", target="admin")

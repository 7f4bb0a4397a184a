"""A run's own scope (`usage_scope.json` beside metrics.json, or `usage_scope` inside it):
it replaces the framework's, its key's usage is its own exactly, a bad declaration is that
run's error, and once its runs are settled a leased key is deleted (reconcile's side)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs

import aiohttp

from tests.integration.conftest import Stage
from tests.support.runs import KEYS, PROJECT, virtual_request, write_run
from tokensettle.admin_api import client_for
from tokensettle.leasekeeper import LeaseKeeper, leased_runs
from tokensettle.leases import LeaseStore, ensure_service_account, mint_lease
from tokensettle.simulator.admin import AdminModel
from tokensettle.usage_scope import SCOPE_FILE, Declaration, write_declaration

LEASED = "key_leasedRUN00001"


def _block(path: Path) -> dict[str, object]:
    block = json.loads(path.read_bytes())["usage_api_reconciliation"]
    assert isinstance(block, dict)
    return block


def _leased_request(t: float, tin: int, tout: int, calls: int) -> dict[str, object]:
    return {**virtual_request(t, "chatdev", tin, tout, calls), "api_key_id": LEASED}


async def test_a_declared_key_is_the_runs_exactly_beside_same_minute_neighbours(
    stage: Stage,
) -> None:
    end = stage.end
    own = write_run(stage.root, "chatdev", "leased", [(end - 120, end)])
    write_declaration(own.parent, Declaration(api_key_ids=(LEASED,)))
    other = write_run(stage.root, "chatdev", "shared-key", [(end - 110, end - 5)])
    await stage.control.add(
        [
            _leased_request(end - 60, 7000, 700, 4),  # the leased run's own calls
            virtual_request(end - 60, "chatdev", 900, 90, 1),  # the neighbour's, same minute
        ]
    )
    reconciler = stage.reconciler()
    assert await stage.settle(reconciler) == ["verified", "verified"]
    block = _block(own)
    assert (block["total_tokens_in"], block["total_tokens_out"]) == (7000, 700)
    attribution = block["attribution"]
    assert isinstance(attribution, dict) and attribution["apportioned_fraction"] == 0
    provenance = block["provenance"]
    assert isinstance(provenance, dict)
    assert provenance["scope"]["declared"]["api_key_ids"] == [LEASED]
    assert provenance["scope"]["declared_in"] == str(own.parent / SCOPE_FILE)
    assert provenance["query"]["api_key_ids"] == [LEASED]
    neighbour = _block(other)
    assert (neighbour["total_tokens_in"], neighbour["total_tokens_out"]) == (900, 90)


async def test_leased_runs_due_together_are_fetched_by_their_keys_alone(stage: Stage) -> None:
    # A lease declares its key and its project; a batch of them names both keys (and the
    # project) in one request instead of fetching every key of the organisation.
    end = stage.end
    second = "key_leasedRUN00002"
    paths = []
    for name, key in (("lease-a", LEASED), ("lease-b", second)):
        paths.append(write_run(stage.root, "chatdev", name, [(end - 120, end)]))
        write_declaration(paths[-1].parent, Declaration(api_key_ids=(key,), project_ids=(PROJECT,)))
    await stage.control.add(
        [
            _leased_request(end - 60, 7000, 700, 4),
            {**virtual_request(end - 60, "chatdev", 300, 30, 1), "api_key_id": second},
            virtual_request(end - 60, "chatdev", 900, 90, 1),  # the framework key's, unasked
        ]
    )
    assert await stage.settle(stage.reconciler()) == ["verified", "verified"]
    assert [_block(p)["total_tokens_in"] for p in paths] == [7000, 300]
    async with stage.session.get(f"{stage.sim.root_url}/_sim/log") as resp:
        log = await resp.json()
    assert len(log) == 2  # a poll and its confirmation, each one request for both runs
    for entry in log:
        query = parse_qs(entry["query"])
        assert sorted(query["api_key_ids"]) == [LEASED, second], query
        assert query["project_ids"] == [PROJECT], query


async def test_a_declaration_inside_metrics_json_works_the_same(stage: Stage) -> None:
    end = stage.end
    path = write_run(
        stage.root,
        "baes",
        "inline",
        [(end - 100, end)],
        extra={"usage_scope": {"api_key_ids": [LEASED]}},
    )
    await stage.control.add(
        [
            {**virtual_request(end - 50, "baes", 1234, 123, 2), "api_key_id": LEASED},
            virtual_request(end - 50, "baes", 50, 5, 1),  # the framework key: not this run's
        ]
    )
    assert await stage.settle(stage.reconciler()) == ["verified"]
    assert _block(path)["total_tokens_in"] == 1234


async def test_a_bad_declaration_is_that_runs_error_and_the_others_settle(stage: Stage) -> None:
    end = stage.end
    bad = write_run(stage.root, "chatdev", "typo", [(end - 100, end)])
    (bad.parent / SCOPE_FILE).write_text('{"api_key_id": ["key_x"]}')
    clash = write_run(
        stage.root,
        "chatdev",
        "clash",
        [(end - 300, end - 200)],
        extra={"usage_scope": {"api_key_ids": ["key_one"]}},
    )
    write_declaration(clash.parent, Declaration(api_key_ids=("key_two",)))
    good = write_run(stage.root, "ghspec", "fine", [(end - 100, end)])
    raw_bad, raw_clash = bad.read_bytes(), clash.read_bytes()
    await stage.control.add([virtual_request(end - 50, "ghspec", 800, 80, 1)])
    reconciler = stage.reconciler()
    report = await reconciler.run_once()
    by_dir = {o.path.parent.name: o for o in report.outcomes}
    assert (
        by_dir["typo"].state == "error" and "did you mean 'api_key_ids'" in by_dir["typo"].message
    )
    assert by_dir["clash"].state == "error" and "different scopes" in by_dir["clash"].message
    assert by_dir["fine"].state == "pending"
    assert bad.read_bytes() == raw_bad and clash.read_bytes() == raw_clash
    stage.clock.advance(minutes=2)
    await reconciler.run_once()
    assert _block(good)["verification_status"] == "verified"


async def test_reconcile_deletes_a_leased_key_once_its_run_is_settled(
    stage: Stage, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    project = "proj_leases"
    admin: AdminModel = stage.sim.admin
    admin.configure({"projects": [{"id": project, "name": "Leases"}], "usage_delay": 0})
    reconciler = stage.reconciler(state_dir=tmp_path / "state", lease_project=project)
    settings = reconciler.settings
    client = client_for(settings, session, settings.secret_key() or "")
    store = LeaseStore(settings.state_dir)
    now = datetime.now(UTC)
    account = await ensure_service_account(store, client, project, now)
    end = stage.end
    run_dir = stage.root / "chatdev" / "leased-run"
    lease, key = await mint_lease(
        store, client, account, ttl=timedelta(hours=2), now=now, run_dir=run_dir
    )
    decl = Declaration.for_lease(key.id, project, lease.created_at, lease.expires_at)
    write_declaration(run_dir, decl)
    write_run(stage.root, "chatdev", "leased-run", [(end - 100, end)])
    request = virtual_request(end - 50, "chatdev", 640, 64, 2)
    await stage.control.add([{**request, "api_key_id": key.id, "project_id": project}])
    keeper = LeaseKeeper(lambda: settings, client)

    first = await reconciler.run_once()
    assert await keeper.revoke(leased_runs(first.records), now) == []  # still pending
    stage.clock.advance(minutes=2)
    second = await reconciler.run_once()
    assert [o.state for o in second.outcomes] == ["verified"]
    (outcome,) = await keeper.revoke(leased_runs(second.records), stage.clock())
    assert outcome.revoked and outcome.key_id == key.id
    states = {k["id"]: k["state"] for k in admin.inspect(stage.clock().timestamp())["keys"]}
    assert states[key.id] == "deleted"
    assert store.load().get(key.id) is not None  # recorded, without its value
    assert key.value not in (Path(settings.state_dir) / "leases.json").read_text()
    assert KEYS["chatdev"] not in json.dumps(_block(run_dir / "metrics.json")["provenance"])


async def test_a_scope_declared_after_a_poll_restarts_stability_rather_than_warn(
    stage: Stage,
) -> None:
    """A run polled under its framework's key, then given its own key by a declaration
    written later: the lower totals under its own key are not 'totals went down'."""
    end = stage.end
    path = write_run(stage.root, "chatdev", "late-decl", [(end - 120, end)])
    await stage.control.add(
        [
            virtual_request(end - 60, "chatdev", 7000, 700, 4),  # the framework's key
            _leased_request(end - 50, 500, 50, 1),  # the run's own key
        ]
    )
    reconciler = stage.reconciler()
    first = await reconciler.run_once()
    assert [o.state for o in first.outcomes] == ["pending"]
    assert _block(path)["attempts"][-1]["total_tokens_in"] == 7000  # type: ignore[index]
    write_declaration(path.parent, Declaration(api_key_ids=(LEASED,)))
    stage.clock.advance(minutes=2)
    assert await stage.settle(reconciler) == ["verified"], _block(path)["attempts"]
    block = _block(path)
    assert (block["total_tokens_in"], block["total_tokens_out"]) == (500, 50)
    statuses = [a["status"] for a in block["attempts"]]  # type: ignore[union-attr]
    assert "warning" not in statuses, statuses

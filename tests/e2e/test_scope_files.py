"""A run's `usage_scope.json` written after its `metrics.json`, against the real daemon.

The scope file arrives once the daemon has already polled the run under its framework's
scope (so neither the first read nor the trailing look can have seen it): only the
watcher's "scope" event (bridge.on_scope, registry.rescope) can make the daemon settle the
run by its declaration. Two runs of one framework share the same minutes; one declares its
own key: it is verified with exactly that key's usage, the other with the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import Run, World
from tests.support.daemon import load, write_by_rename, write_in_new_dirs, write_in_place
from tests.support.runs import KEYS
from tokensettle.usage_scope import SCOPE_FILE, Declaration, render_declaration

pytestmark = pytest.mark.e2e

WAIT = 30
OWN = "key_declaredOWN00001"
DECLARATION = render_declaration(Declaration(api_key_ids=(OWN,)))
#: A typo of `api_key_ids`: the declaration must be refused, not read as "no keys".
MALFORMED = b'{"api_key_id": ["key_declaredOWN00001"]}\n'


def _pair(world: World) -> tuple[Run, Run]:
    """Two chatdev runs in the same slot (every minute shared): the first's usage is under
    its own key, the second's under the framework's key."""
    declaring = world.run("chatdev", "scope-own", 0, (7000, 700, 4), api_key_id=OWN)
    neighbour = world.run("chatdev", "scope-shared", 0, (900, 90, 2))
    return declaring, neighbour


def _assert_settled_by_declaration(world: World, declaring: Run, neighbour: Run) -> None:
    world.assert_verified(declaring)
    world.assert_verified(neighbour)
    own = load(world.path(declaring))["usage_api_reconciliation"]
    assert own["attribution"]["apportioned_fraction"] == 0
    assert own["provenance"]["scope"]["declared"]["api_key_ids"] == [OWN]
    assert own["provenance"]["scope"]["declared_in"] == str(
        world.path(declaring).parent / SCOPE_FILE
    )
    assert own["provenance"]["query"]["api_key_ids"] == [OWN]
    other = load(world.path(neighbour))["usage_api_reconciliation"]
    assert other["attribution"]["apportioned_fraction"] == 0
    assert other["provenance"]["scope"].get("declared") is None
    assert other["provenance"]["scope"]["api_key_ids"] == [KEYS["chatdev"]]


@pytest.mark.parametrize("writer", [write_by_rename, write_in_place], ids=["rename", "in_place"])
async def test_a_scope_file_written_after_the_first_poll_settles_the_run_by_it(
    world: World, writer: Callable[[Path, bytes], None]
) -> None:
    declaring, neighbour = _pair(world)
    await world.register(declaring, neighbour)
    daemon = await world.start()
    write_in_new_dirs(world.path(neighbour), neighbour.data)
    write_in_new_dirs(world.path(declaring), declaring.data)
    # Polled under the framework's scope first: both runs share the framework key's minutes.
    first = await daemon.wait_event("run.polled", WAIT, run_id=declaring.run_id)
    assert first["apportioned"] > 0, first
    writer(world.path(declaring).parent / SCOPE_FILE, DECLARATION)

    for run in (declaring, neighbour):
        await daemon.wait_event("run.settled", WAIT, run_id=run.run_id, status="verified")
    _assert_settled_by_declaration(world, declaring, neighbour)
    assert daemon.count("run.settled", status="ambiguous") == 0
    assert await daemon.terminate() == 0


async def test_a_malformed_scope_file_is_that_runs_error_until_it_is_rewritten(
    world: World,
) -> None:
    declaring, neighbour = _pair(world)
    await world.register(declaring, neighbour)
    daemon = await world.start()
    path = world.path(declaring)
    write_in_new_dirs(world.path(neighbour), neighbour.data)
    write_in_new_dirs(path, declaring.data)
    await daemon.wait_event("run.polled", WAIT, run_id=declaring.run_id)
    scope = path.parent / SCOPE_FILE
    write_in_place(scope, MALFORMED)

    bad = await daemon.wait_event("run.unreadable", WAIT, path=str(path))
    assert str(scope) in bad["reason"] and "did you mean 'api_key_ids'" in bad["reason"], bad
    since = len(daemon.events)
    frozen = path.read_bytes()
    # The other run proceeds meanwhile (polls, a stability interval, a write): the bad one
    # is neither polled nor written during all of it, and /runs says why it is stuck.
    await daemon.wait_event("run.settled", WAIT, since=since, run_id=neighbour.run_id)
    assert path.read_bytes() == frozen
    assert scope.read_bytes() == MALFORMED
    assert not [e for e in daemon.events[since:] if e.get("run_id") == declaring.run_id]
    status, runs = await daemon.get(world.session, "/runs")
    assert status == 200
    (shown,) = [r for r in runs["runs"] if r["path"] == str(path)]
    assert shown["status"] == "error" and "did you mean 'api_key_ids'" in shown["message"], shown

    write_in_place(scope, DECLARATION)
    await daemon.wait_event("run.settled", WAIT, since=since, run_id=declaring.run_id)
    _assert_settled_by_declaration(world, declaring, neighbour)
    assert json.loads(scope.read_bytes()) == json.loads(DECLARATION)  # ours, untouched
    assert await daemon.terminate() == 0

"""Which usage belongs to a run: its declared scope, else its framework's, else the
organisation's (pure: no files, no network)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tests.support.runs import KEYS
from tokensettle.config import FrameworkScope, load_settings
from tokensettle.reconcile import Reconciler, RunRef
from tokensettle.runfile import parse_run
from tokensettle.usage import Scope
from tokensettle.usage_scope import Declaration
from tokensettle.windows import Activity

SETTINGS = load_settings(
    {
        "runs_dirs": [Path("runs")],
        "frameworks": {"chatdev": FrameworkScope(api_key_ids=[KEYS["chatdev"]])},
    },
    environ={},
)


def ref(framework: str, scope: Scope | None = None) -> RunRef:
    return RunRef(Path(f"runs/{framework}/r/metrics.json"), framework, "r", Activity(0, 60), scope)


def test_a_declared_scope_replaces_the_frameworks() -> None:
    reconciler = Reconciler(SETTINGS, None)
    declared = Declaration(api_key_ids=("key_mine",), project_ids=("proj_x",)).scope()
    assert reconciler.scope_of(ref("chatdev", declared)) == declared
    assert reconciler.scope_of(ref("chatdev")) == Scope(frozenset({KEYS["chatdev"]}))
    assert reconciler.scope_of(ref("unconfigured")).is_organisation


def test_a_runs_own_record_and_its_ref_resolve_alike() -> None:
    raw = (
        b'{"run_id": "r", "start_timestamp": 1760000000, "end_timestamp": 1760000060,'
        b' "usage_scope": {"api_key_ids": ["key_mine"]}}'
    )
    record = parse_run(raw, Path("runs/chatdev/r/metrics.json"), "chatdev", 60)
    reconciler = Reconciler(SETTINGS, None)
    assert reconciler.scope_of(record) == Scope(frozenset({"key_mine"}))
    assert reconciler.scope_of(RunRef.of(record)) == reconciler.scope_of(record)
    plain = replace(record, declared=None)
    assert reconciler.scope_of(plain) == Scope(frozenset({KEYS["chatdev"]}))

"""The demo's log view: acts overlap in time (an act starts while the one before settles),
so each line is shown under its own act: lines of an act whose heading is not shown yet
are held, then shown after it, in order; nothing is lost or shown twice."""

from __future__ import annotations

import pytest

from tokensettle.demo import Act, DemoRun, Log, Stage


class Named(Act):
    title = "named"

    def __init__(self, *names: str) -> None:
        self.run_ids = frozenset(names)

    async def play(self, stage: Stage) -> list[DemoRun]:
        return []


def event(name: str, **fields: object) -> dict[str, object]:
    return {"event": name, "status": "pending", "attempts": 0, **fields}


async def test_lines_of_a_later_act_wait_for_its_heading(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = Log(started=0.0)
    log.acts = [Named("demo-1", "demo-broken"), Named("shared-1"), Named("leased-1")]
    log.show(0, "act 1")
    await log.add(event("run.scheduled", framework="chatdev", run_id="demo-1"))
    await log.add(event("run.scheduled", framework="chatdev", run_id="shared-1"))
    await log.add({"event": "lease.created", "key_id": "key_a", "run_dir": "/r/chatdev/leased-1"})
    await log.add(event("run.unreadable", path="/r/baes/demo-broken/metrics.json", reason="x"))
    await log.add({"event": "daemon.reloaded"})  # not shown: not a line of the story
    first = capsys.readouterr().out.splitlines()
    assert len(first) == 3
    assert first[0] == "act 1"
    assert "demo-1" in first[1]
    assert "demo-broken" in first[2]

    log.show(1, "act 2")
    settled = event("run.settled", framework="chatdev", run_id="shared-1")
    await log.add({**settled, "tokens_in": 1, "tokens_out": 1})
    log.show(2, "act 3")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5
    assert out[0] == "act 2"
    assert "run.scheduled" in out[1]
    assert "shared-1" in out[1]
    assert "run.settled" in out[2]
    assert out[3] == "act 3"
    assert "lease.created" in out[4]
    assert "key_a" in out[4]
    assert len(log.events) == 6  # every event kept for the acts to wait on

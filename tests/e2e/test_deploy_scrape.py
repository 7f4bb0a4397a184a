"""The alert rules and the dashboard against a real scrape: a `tokensettle run` process that
has settled a run and run its bill check serves /metrics; every label a query matches on
is one that series carries there, and every value it asks for (a fault kind, a status, a
bill verdict) is one the daemon exports. A typo there would make an alert silent forever,
which promtool cannot see."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import World
from tests.support.daemon import write_in_new_dirs
from tests.support.promql import (
    TARGET_LABELS,
    alert_rules,
    alert_test_series,
    dashboard_exprs,
    scraped_labels,
    selectors,
)

pytestmark = pytest.mark.e2e

#: A regex alternation of plain words, e.g. "failed|auth_error".
_WORDS = re.compile(r"^\w+(\|\w+)*$")


async def test_every_label_and_value_the_queries_match_is_in_a_real_scrape(
    world: World,
) -> None:
    run = world.run("chatdev", "scraped-1", slot=0, tokens=(1200, 300, 2))
    await world.register(run)
    daemon = await world.start(TOKENSETTLE_BILL_CHECK_INTERVAL="24h")
    write_in_new_dirs(world.path(run), run.data)
    await daemon.wait_event("run.settled", 30, run_id="scraped-1")
    await daemon.wait_event("bill.checked", 30)
    status, text = await daemon.get(world.session, "/metrics")
    assert status == 200
    labels = scraped_labels(text)
    # What the checks below rely on: these families are in the scrape with their labels.
    assert {"kind"} <= set(labels["tokensettle_faults"])
    assert {"status"} <= set(labels["tokensettle_runs"])
    assert {"verdict"} <= set(labels["tokensettle_bill_days"])
    assert {"framework", "direction"} <= set(labels["tokensettle_settled_tokens_total"])

    queries = [(f"alerts.yml: {r['alert']}", str(r["expr"])) for r in alert_rules()]
    queries += dashboard_exprs()
    checked = 0
    for where, expr in queries:
        for selector in selectors(expr):
            carried = labels.get(selector.metric)
            if carried is None:
                continue  # no sample yet (a labelled counter never incremented here)
            for m in selector.matchers:
                if m.label in TARGET_LABELS:
                    continue
                assert m.label in carried, (where, selector.metric, m.label, sorted(carried))
                if m.op in ("=", "=~") and _WORDS.match(m.value):
                    wanted = set(m.value.split("|"))
                    assert wanted <= carried[m.label], (where, m.label, wanted, carried[m.label])
                    checked += 1
    assert checked >= 8  # the fault kinds, the expired status, the bill verdicts

    for where, series in alert_test_series():
        for selector in selectors(series):
            carried = labels.get(selector.metric)
            if carried is not None:
                extra = {m.label for m in selector.matchers} - set(carried) - TARGET_LABELS
                assert not extra, (where, selector.metric, extra)

"""What the deploy artefacts ask Prometheus for: metric names and label matchers read out of
PromQL by a small tokenizer, from the alert rules, their promtool tests and the Grafana
dashboard, and the series names a `/metrics` exposition offers.

The tokenizer knows PromQL's lexical shape, not its grammar: strings, ranges, numbers and
durations, identifiers, braces. An identifier outside braces is a metric name unless it is
a keyword, an operator word, a function or aggregation (followed by `(`, or by `by`/
`without`), or a label in the list after `by`, `without`, `on`, `ignoring`, `group_left`
or `group_right`. Grafana's `$variables` are replaced first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "tests" / "integration" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "tokensettle.json"

#: Series Prometheus makes itself for every target, not the daemon.
PROMETHEUS_OWN = frozenset({"up"})
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
#: Grafana's own interval variables, with a stand-in duration for promtool.
GRAFANA_DURATIONS = {"__rate_interval": "5m", "__range": "1d", "__interval": "1m"}

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan", "Inf", "NaN"}
)
_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>\d[\w.]*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^=<>{}(),@])
    """,
    re.VERBOSE,
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass
class Selector:
    metric: str
    matchers: list[Matcher] = field(default_factory=list)


class PromQLSyntaxError(ValueError):
    pass


def variables(expr: str) -> set[str]:
    """The Grafana variables an expression uses (`$job`, `${instance}`)."""
    return {a or b for a, b in _VARIABLE.findall(expr)}


def substitute(expr: str) -> str:
    """Grafana variables replaced: interval variables by a duration, others by `.*` (they
    are used as regex label values)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return GRAFANA_DURATIONS.get(name, ".*")

    return _VARIABLE.sub(one, expr)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLSyntaxError(f"cannot read {expr[pos : pos + 20]!r} in {expr!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def _unquote(text: str) -> str:
    return text[1:-1]


def selectors(expr: str) -> list[Selector]:
    """Every series selector in `expr`: its metric name and label matchers."""
    tokens = _tokens(substitute(expr))
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "ident" and text in _LABEL_LISTS and nxt == "(":
            i = tokens.index(("op", ")"), i) + 1  # the label list: names, not metrics
            continue
        if kind != "ident" or text in _KEYWORDS:
            i += 1
            continue
        if nxt == "(" or (text in _AGGREGATIONS and nxt in ("by", "without")):
            i += 1  # a function or an aggregation
            continue
        selector = Selector(text)
        i += 1
        if nxt == "{":
            i += 1
            while tokens[i][1] != "}":
                label, op, value = tokens[i], tokens[i + 1], tokens[i + 2]
                if label[0] != "ident" or value[0] != "string":
                    raise PromQLSyntaxError(f"bad matcher near {label[1]!r} in {expr!r}")
                selector.matchers.append(Matcher(label[1], op[1], _unquote(value[1])))
                i += 3
                if tokens[i][1] == ",":
                    i += 1
            i += 1
        found.append(selector)
    return found


def metric_names(expr: str) -> set[str]:
    return {s.metric for s in selectors(expr)}


# ---------------------------------------------------------------------- the artefacts


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for panel in panels:
        for target in panel.get("targets", []):
            if "expr" in target:
                yield f"panel {panel['id']} ({panel['title']}) {target['refId']}", target["expr"]
        yield from _dashboard_exprs(panel.get("panels", []))


_LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?(\w+)\)$")


def dashboard_template_selectors(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The series selectors of the query variables (`label_values(SELECTOR, label)`)."""
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(query)
        if m is None:
            raise PromQLSyntaxError(f"variable {var['name']}: not label_values(...): {query!r}")
        if m.group(1):
            yield f"variable {var['name']}", m.group(1)


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel query of the dashboard."""
    return list(_dashboard_exprs(dashboard()["panels"]))


def alert_test_series() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    return [
        (f"alerts_test.yml: {test['name']}", series["series"])
        for test in doc["tests"]
        for series in test["input_series"]
    ]


def every_query() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the alerts, their tests and the dashboard."""
    queries = [(f"alerts.yml: {r['alert']}", str(r["expr"])) for r in alert_rules()]
    queries += alert_test_series()
    queries += dashboard_exprs()
    queries += list(dashboard_template_selectors(dashboard()))
    return queries


# ---------------------------------------------------------------------- expositions


def series_names(exposition: str) -> set[str]:
    """The series names an exposition offers, with counters' `_total` and histograms'
    `_bucket`, `_sum` and `_count` (summaries' `_sum`, `_count`), whether or not a
    labelled family has samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        base = family.name
        if family.type == "counter":
            names.add(f"{base}_total")
        elif family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        elif family.type == "summary":
            names |= {base, f"{base}_sum", f"{base}_count"}
        elif family.type == "info":
            names.add(f"{base}_info")
        else:
            names.add(base)
        names |= {s.name for s in family.samples}
    return names


def scraped_labels(exposition: str) -> dict[str, dict[str, set[str]]]:
    """For every series name with samples: each label and the values it takes."""
    out: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = out.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return out


def rules_file_of(queries: list[tuple[str, str]], path: Path) -> Path:
    """The queries as recording rules, so `promtool check rules` parses each one."""
    rules = [
        {"record": f"dashboard:query_{n}:check", "expr": substitute(expr)}
        for n, (_, expr) in enumerate(queries)
    ]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path

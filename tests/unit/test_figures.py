"""Standalone SVG charts: valid XML in the SVG namespace, points, means, intervals, titles."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tokensettle.aggregates import METRICS
from tokensettle.report import figure_files, render_html
from tokensettle.summary import RunSummary

NS = "{http://www.w3.org/2000/svg}"
END = datetime(2025, 10, 19, 10, 41, 18, tzinfo=UTC)


def run(framework: str, run_id: str, tin: int, status: str = "verified") -> RunSummary:
    return RunSummary(
        framework,
        run_id,
        status,
        tokens_in=tin,
        tokens_out=tin // 4,
        cached_tokens=tin // 5,
        api_calls=tin // 1_000,
        cost_usd=Decimal(tin) / 1_000_000,
        run_end=END,
        verified_at=END + timedelta(minutes=tin / 1_000),
    )


RUNS = [
    run("baes", "b1", 20_000),
    run("baes", "b2", 26_000),
    run("chatdev", "c1", 250_000),
    run("chatdev", "c2", 240_000, "ambiguous"),
    run("<odd & name>", "x1", 1_000),
    RunSummary("ghspec", "pending-1", "pending"),
]


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.encode("utf-8"))  # noqa: S314 (our own output)


def test_one_standalone_svg_per_metric_and_the_time_to_verify() -> None:
    files = figure_files(RUNS)
    assert sorted(files) == sorted([f"{m.key}.svg" for m in METRICS] + ["time_to_verify.svg"])
    for name, svg in files.items():
        assert svg.startswith('<?xml version="1.0" encoding="UTF-8"?>\n'), name
        root = _parse(svg)
        assert root.tag == f"{NS}svg"
        assert root.get("viewBox", "").startswith("0 0 ")
        assert int(root.get("width", "0")) >= 480
        assert root.find(f"{NS}title") is not None


def test_points_means_and_intervals_over_the_counted_runs() -> None:
    root = _parse(figure_files(RUNS)["total_tokens.svg"])
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert "Total tokens per run (input + output)" in texts  # the axis title, with its unit
    assert "<odd & name>" in texts  # escaped in the file, the text itself once parsed
    assert texts.count("n=2") == 1  # baes; chatdev and the odd name have one, ghspec none
    assert "n=0" in texts
    points = [c for c in root.iter(f"{NS}circle") if c.find(f"{NS}title") is not None]
    titles = sorted(c.find(f"{NS}title").text or "" for c in points)  # type: ignore[union-attr]
    # verified runs only by default: c2 (ambiguous) and the pending run are not drawn
    assert titles == ["b1: 25,000", "b2: 32,500", "c1: 312,500", "x1: 1,250"]
    means = [
        line.find(f"{NS}title").text or ""  # type: ignore[union-attr]
        for line in root.iter(f"{NS}line")
        if line.find(f"{NS}title") is not None
    ]
    assert any(m.startswith("baes: mean 28,750, 95% CI") for m in means)
    assert any(m == "chatdev: mean 312,500, no interval for n = 1" for m in means)
    # no box plots: no quartile boxes at these sizes (or any)
    assert not [r for r in root.iter(f"{NS}rect") if r.get("class") == "box"]
    assert len(list(root.iter(f"{NS}rect"))) == 1  # the background only


def test_estimated_runs_are_drawn_hollow_when_counted() -> None:
    root = _parse(figure_files(RUNS, include_ambiguous=True)["tokens_in.svg"])
    hollow = [
        c.find(f"{NS}title").text  # type: ignore[union-attr]
        for c in root.iter(f"{NS}circle")
        if c.get("fill") == "#fff" and c.find(f"{NS}title") is not None
    ]
    assert hollow == ["c2: 240,000 (estimated)"]


def test_a_chart_without_data_says_so() -> None:
    svg = figure_files([RunSummary("ghspec", "p", "pending")])["cost_usd.svg"]
    texts = [t.text for t in _parse(svg).iter(f"{NS}text")]
    assert "no data" in texts


def test_characters_xml_forbids_are_replaced_not_written() -> None:
    svg = figure_files([run("fw\x01\x1b", "r\x00", 10)])["tokens_in.svg"]
    root = _parse(svg)  # would raise on a control character
    assert any((t.text or "").startswith("fw\ufffd\ufffd") for t in root.iter(f"{NS}text"))


def test_inline_charts_in_html_carry_no_namespace_url() -> None:
    page = render_html(RUNS)
    assert "http://www.w3.org" not in page
    assert page.count('<svg id="chart-') == len(METRICS) + 1

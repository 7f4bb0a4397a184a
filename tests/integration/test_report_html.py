"""The HTML report opens offline in a real browser: headless Chromium, where installed.

Chromium runs with every host name mapped to "not found" (no real traffic whatever the page or
the browser itself tries) and writes a network log; requests the *page* starts carry the page's
origin as initiator ("null" for a file:// page), while Chromium's own background requests
(update checks, dictionaries, accounts) carry none ("not an origin"). The report must start
none; a probe page with an image and an SVG <image> shows that the check sees such requests.

The layout check loads a copy of the page with a probe script appended (the report itself has
no script): it measures every table cell in the browser and writes what it found into the DOM,
which `--dump-dom` returns, at a desktop and at a phone width.
"""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tests.support.browser import (
    assert_screenshot_has_content,
    chromium,
    dump_dom,
)
from tokensettle.report import RunSummary, render_html

END = datetime(2025, 10, 19, 10, 41, 18, tzinfo=UTC)
CHARTS = (
    "chart-tokens_in",
    "chart-tokens_out",
    "chart-total_tokens",
    "chart-cached_tokens",
    "chart-cached_share",
    "chart-api_calls",
    "chart-cost_usd",
    "chart-time_to_verify",
)
FRAMEWORKS = ("baes", "chatdev", "ghspec", "<b>odd & name</b>")


def _runs() -> list[RunSummary]:
    def one(fw: str, rid: str, tin: int, tout: int, minutes: float, cost: str) -> RunSummary:
        return RunSummary(
            framework=fw,
            run_id=rid,
            status="verified",
            tokens_in=tin,
            tokens_out=tout,
            cached_tokens=tin // 3,
            api_calls=tin // 2_000,
            cost_usd=Decimal(cost),
            run_end=END,
            verified_at=END + timedelta(minutes=minutes),
            local_vs_provider="match",
            models=("gpt-4o-mini-2024-07-18",),
        )

    return [
        one("baes", "6f0b2490-1548-4b4f-a943-a688ec972355", 20_150, 5_335, 223, "0.0054939"),
        one("baes", "23f46f6b-929e-429b-ba74-4b0d20abc1ed", 25_156, 6_481, 48, "0.0066"),
        one("chatdev", "4df331a3-1d72-4154-8a6a-c61f80ef2228", 258_207, 73_872, 293, "0.07"),
        one("chatdev", "7c997ab4-d1a7-4eee-b07f-a7c3cc0fc8c7", 238_085, 82_557, 1_341, "0.068"),
        one("ghspec", "a1b3972f-f772-4a7c-956e-1828a8db7a7d", 46_512, 18_387, 218, "0.018"),
        one("<b>odd & name</b>", "x\"'<y>", 1_000, 10, 5, "0.0002"),
        RunSummary("ghspec", "pending-1", "pending"),
    ]


@pytest.fixture
def report_file(tmp_path: Path) -> Path:
    page = render_html(_runs(), generated_at=END, title="tokensettle report <test>")
    # The page can make no request: no URL of any kind, no element that would fetch one.
    assert not re.search(r"(?i)\b(?:https?|ftp|wss?):", page)
    assert not re.search(r"(?i)<(?:script|img|link|iframe|object|embed|image|use)\b", page)
    assert not re.search(r"(?i)\b(?:src|href|srcset)\s*=\s*[\"']", page)
    assert "url(" not in page
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def test_report_renders_in_headless_chromium_without_requests(
    report_file: Path, tmp_path: Path
) -> None:
    binary = chromium()
    dom, requests = dump_dom(binary, report_file, tmp_path)
    assert requests == []
    # the browser parsed the inline SVG into elements (not text), with their shapes
    for chart in CHARTS:
        assert re.search(rf'<svg id="{chart}"[^>]*class="chart"', dom), chart
    assert dom.count("<rect") == len(CHARTS)  # each chart's background: no box plots
    # every verified run is a point in every chart, beside the legend's two
    assert dom.count("<circle") == len(CHARTS) * (2 + 6)
    # data stayed text: the escaped framework name is not an element
    assert "<b>odd" not in dom
    assert "&lt;b&gt;odd &amp; name&lt;/b&gt;" in dom
    assert "<title>tokensettle report &lt;test&gt;</title>" in dom
    # every framework's name is in the page's text (tables, charts), escaped where it must be
    text = re.sub(r"<[^>]+>", " ", dom)
    for framework in FRAMEWORKS:
        escaped = framework.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert text.count(escaped) >= 3, framework  # per-framework table, statistics, runs


# Appended to a copy of the page: where each table cell ended up, as the browser laid it out.
_LAYOUT_PROBE = """<script>
const width = document.documentElement.clientWidth;
const cut = [];
for (const table of document.querySelectorAll("table")) {
  const box = table.parentElement.getBoundingClientRect();
  for (const cell of table.querySelectorAll("td")) {
    const r = cell.getBoundingClientRect();
    if (r.width < 1 || r.height < 1 || r.left < box.left - 1 || r.right > box.right + 1
        || r.right > width + 1) {
      cut.push((cell.dataset.label || "?") + "=" + cell.textContent.slice(0, 40));
    }
  }
}
document.body.setAttribute("data-layout", JSON.stringify({
  width: width, page: document.documentElement.scrollWidth,
  cells: document.querySelectorAll("td").length, cut: cut.slice(0, 10)}));
</script>"""


@pytest.mark.parametrize("width", [1440, 500])  # 500: the narrowest headless window
def test_no_table_column_is_cut_off(report_file: Path, tmp_path: Path, width: int) -> None:
    binary = chromium()
    probe = tmp_path / "probe.html"
    probe.write_text(
        report_file.read_text(encoding="utf-8").replace("</body>", _LAYOUT_PROBE + "</body>"),
        encoding="utf-8",
    )
    dom, _ = dump_dom(binary, probe, tmp_path, width)
    found = re.search(r'data-layout="([^"]*)"', dom)
    assert found is not None, dom[-2000:]
    layout = json.loads(html.unescape(found.group(1)))
    assert layout["width"] <= width
    assert layout["cells"] > 50
    assert layout["cut"] == []  # every cell of every table lies inside the page
    assert layout["page"] <= layout["width"]  # and nothing scrolls sideways


def test_the_request_check_sees_a_page_that_fetches(tmp_path: Path) -> None:
    binary = chromium()
    probe = tmp_path / "probe.html"
    probe.write_text(
        '<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/probe.png">'
        '<svg><image href="http://probe.invalid/x.png"/></svg></body></html>',
        encoding="utf-8",
    )
    _, requests = dump_dom(binary, probe, tmp_path)
    assert "http://127.0.0.1:9/probe.png" in requests
    assert "http://probe.invalid/x.png" in requests


def test_report_screenshot_has_content(report_file: Path, tmp_path: Path) -> None:
    assert_screenshot_has_content(chromium(), report_file.as_uri(), tmp_path)

"""The daemon's live view: `/` and `/report.json` behind `TOKENSETTLE_HTTP_TOKEN`,
`/healthz` and `/metrics` open; the page renders in a real browser and reflects no run id
unescaped."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import World
from tests.support.browser import assert_screenshot_has_content, chromium, dump_dom
from tests.support.daemon import free_port, write_in_new_dirs

pytestmark = pytest.mark.e2e

WAIT = 45
TOKEN = "live-view-token-7f3a9c"
HOSTILE = '"><svg onload=alert(1)>'  # no slash: it is a directory name too


async def _get(
    session: aiohttp.ClientSession, url: str, token: str | None = None
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(30)) as resp:
        return resp.status, await resp.text()


async def test_the_live_report_needs_the_token_and_shows_every_framework(
    world: World, tmp_path: Path
) -> None:
    runs = [
        world.run("chatdev", "live-1", 0, (4000, 400, 3)),
        world.run("baes", "live-2", 1, (5000, 500, 4)),
        world.run("ghspec", HOSTILE, 2, (6000, 600, 5)),
    ]
    await world.register(*runs)
    daemon = await world.start(TOKENSETTLE_HTTP_TOKEN=TOKEN)
    for run in runs:
        write_in_new_dirs(world.path(run), run.data)
    for run in runs:
        await daemon.wait_event("run.settled", WAIT, run_id=run.run_id, status="verified")

    base = daemon.http
    for path in ("/", "/report.json", "/runs"):
        status, body = await _get(world.session, base + path)
        assert status == 401, (path, status)
        assert TOKEN not in body
        status, _ = await _get(world.session, base + path, "wrong-token")
        assert status == 401
    for path in ("/healthz", "/metrics"):
        status, _ = await _get(world.session, base + path)
        assert status == 200, path

    status, page = await _get(world.session, base + "/", TOKEN)
    assert status == 200
    assert HOSTILE not in page
    assert html.escape(HOSTILE) in page
    text = re.sub(r"<[^>]+>", " ", page)
    for framework in ("chatdev", "baes", "ghspec"):
        assert framework in text
    status, body = await _get(world.session, base + "/report.json", TOKEN)
    assert status == 200
    report = json.loads(body)
    assert {f["framework"] for f in report["frameworks"]} == {"chatdev", "baes", "ghspec"}
    verified = {r["run_id"]: r for r in report["runs"]}
    assert verified["live-2"]["tokens_in"] == 5000 and verified["live-2"]["status"] == "verified"

    binary = chromium()  # skips here when Chromium is absent; the checks above ran
    saved = tmp_path / "live.html"
    saved.write_text(page, encoding="utf-8")
    dom, requests = dump_dom(binary, saved, tmp_path)
    assert requests == []
    assert "<svg onload" not in dom
    assert_screenshot_has_content(binary, saved.as_uri(), tmp_path)
    assert await daemon.terminate() == 0
    assert TOKEN not in "\n".join(daemon.stdout_lines)


async def test_a_non_loopback_address_without_a_token_is_warned_about(world: World) -> None:
    daemon = await world.start(TOKENSETTLE_HTTP_ADDR=f"0.0.0.0:{free_port()}")
    (warning,) = daemon.find("http.unprotected")
    assert "TOKENSETTLE_HTTP_TOKEN" in warning["detail"]
    assert await daemon.terminate() == 0

"""Headless Chromium for tests that render our pages, where it is installed (else skip).

Every host name is mapped to "not found" (no real traffic whatever the page or the browser
tries), and a network log tells the page's own requests from Chromium's background ones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium to run this check)")
    return path


def chromium_args(binary: str, profile: Path, width: int = 1200) -> list[str]:
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--window-size={width},2000",
    ]


def run_browser(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=90, check=False)


def _load_netlog(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        log: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError:  # a log cut at exit lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    return log


def page_requests(netlog: Path) -> list[str]:
    """URLs of network requests the page itself started (not Chromium's own)."""
    log = _load_netlog(netlog)
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    urls: list[str] = []
    for event in log["events"]:
        params = event.get("params") or {}
        if names.get(event["type"]) != "URL_REQUEST_START_JOB" or "url" not in params:
            continue
        if params.get("initiator") == "not an origin":
            continue  # the browser's background traffic, not the page's
        if not params["url"].startswith(("file:", "data:", "chrome:")):
            urls.append(params["url"])
    return urls


def dump_dom(binary: str, page: Path, work: Path, width: int = 1200) -> tuple[str, list[str]]:
    netlog = work / "netlog.json"
    result = run_browser(
        [
            *chromium_args(binary, work / "profile", width),
            f"--log-net-log={netlog}",
            "--dump-dom",
            page.as_uri(),
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, page_requests(netlog)


def assert_screenshot_has_content(binary: str, url: str, work: Path) -> None:
    """A 1200x2000 screenshot of `url` that is a PNG and not a blank page."""
    shot = work / "page.png"
    result = run_browser([*chromium_args(binary, work / "profile"), f"--screenshot={shot}", url])
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 2000)
    assert len(data) > 20_000  # a blank page compresses to a few kB

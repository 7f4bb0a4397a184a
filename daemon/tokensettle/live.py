"""The daemon's live view: `GET /` is the HTML report of the runs under its roots, and
`GET /report.json` the same as JSON. No new state: the report is built on request from the
run files (the record), in a worker thread, and kept for `ttl` seconds so a dashboard
refreshing every few seconds costs one build; concurrent requests share one build.

Reading every file is the honest source (the index keeps only what scheduling needs); over
100,000 runs a build takes seconds, which the cache absorbs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tokensettle.aggregates import build
from tokensettle.config import Settings
from tokensettle.discovery import scan_all
from tokensettle.report import report_json
from tokensettle.report_files import read_summaries
from tokensettle.report_html import render_report_html


@dataclass(frozen=True)
class Built:
    at: float
    html: str
    json: dict[str, Any]


class LiveReport:
    def __init__(
        self,
        settings: Callable[[], Settings],
        roots: list[Path],
        *,
        ttl: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self.roots = roots
        self.ttl = ttl
        self._monotonic = monotonic
        self._built: Built | None = None
        self._building: asyncio.Task[Built] | None = None

    def _build(self) -> Built:
        """Blocking: read every run file and render both forms."""
        settings = self._settings()
        now = datetime.now(UTC)
        summaries = read_summaries(
            scan_all(self.roots),
            grace=int(settings.window_grace.total_seconds()),
            now=now,
            max_age=settings.max_age,
        )
        report = build(summaries, generated_at=now)
        html = render_report_html(report, title="tokensettle: live report")
        return Built(self._monotonic(), html, report_json(report))

    async def get(self) -> Built:
        built = self._built
        if built is not None and self._monotonic() - built.at < self.ttl:
            return built
        if self._building is None or self._building.done():
            self._building = asyncio.create_task(asyncio.to_thread(self._build))
        self._built = await asyncio.shield(self._building)
        return self._built

"""The built-in fake OpenAI Usage API (`tokensettle simulate`, tests, demo, benchmarks).

`scenario` is the pure model (virtual requests, revisions, the page answer); `server` is
the aiohttp.web layer with faults and control endpoints; `cli` the command's options.
Names are imported on first use, so building the command line does not load aiohttp.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "SIMULATOR_ADMIN_KEY": "scenario",
    "ApiError": "scenario",
    "Fault": "scenario",
    "Revision": "scenario",
    "Scenario": "scenario",
    "ScenarioError": "scenario",
    "UsageQuery": "scenario",
    "VirtualRequest": "scenario",
    "USAGE_PATH": "server",
    "LogEntry": "server",
    "RunningSimulator": "server",
    "create_app": "server",
    "load_scenario_file": "server",
    "serve_forever": "server",
}

__all__ = sorted(_WHERE)  # noqa: PLE0605


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

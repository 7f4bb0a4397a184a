"""The built-in fake OpenAI Usage API (`tokensettle simulate`, tests, demo, benchmarks).

`scenario` is the pure model (virtual requests, revisions, the page answer); `server` is
the aiohttp.web layer with faults and control endpoints.
"""

from tokensettle.simulator.scenario import (
    SIMULATOR_ADMIN_KEY,
    ApiError,
    Fault,
    Revision,
    Scenario,
    ScenarioError,
    UsageQuery,
    VirtualRequest,
)
from tokensettle.simulator.server import (
    USAGE_PATH,
    LogEntry,
    RunningSimulator,
    create_app,
    load_scenario_file,
    run_simulator_cli,
    serve_forever,
)

__all__ = [
    "SIMULATOR_ADMIN_KEY",
    "USAGE_PATH",
    "ApiError",
    "Fault",
    "LogEntry",
    "Revision",
    "RunningSimulator",
    "Scenario",
    "ScenarioError",
    "UsageQuery",
    "VirtualRequest",
    "create_app",
    "load_scenario_file",
    "run_simulator_cli",
    "serve_forever",
]

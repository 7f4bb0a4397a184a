"""Building run trees for tests: our own run files, and field fixtures made pending again."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tokensettle.config import FrameworkScope, Settings, load_settings

MODEL = "gpt-4o-mini-2024-07-18"
PROJECT = "proj_test"
KEYS = {
    "baes": "key_baesTEST00001",
    "chatdev": "key_chatdevTEST001",
    "ghspec": "key_ghspecTEST0001",
}
AGG_TOKEN_KEYS = ("TOK_IN", "TOK_OUT", "API_CALLS", "CACHED_TOKENS")
STEP_TOKEN_KEYS = ("tokens_in", "tokens_out", "api_calls", "cached_tokens")


@dataclass
class Truth:
    tokens_in: int = 0
    tokens_out: int = 0
    api_calls: int = 0
    cached: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)


def settings_for(root: Path, base_url: str, key: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "runs_dirs": [root],
        "api_base_url": base_url,
        "admin_key": key,
        "frameworks": {fw: FrameworkScope(api_key_ids=[k]) for fw, k in KEYS.items()},
        **extra,
    }
    return load_settings(values, environ={})


def virtual_request(
    t: float, framework: str, tin: int, tout: int, calls: int, cached: int = 0, **extra: Any
) -> dict[str, Any]:
    return {
        "time": t,
        "api_key_id": KEYS[framework],
        "project_id": PROJECT,
        "model": MODEL,
        "usage": {
            "input_tokens": tin,
            "output_tokens": tout,
            "num_model_requests": calls,
            "input_cached_tokens": cached,
        },
        **extra,
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_run(
    root: Path,
    framework: str,
    run_id: str,
    steps: list[tuple[float, float]],
    *,
    step_tokens: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A fresh run file as benchmarks write it: tokens at 0, json.dumps(indent=2)."""
    doc: dict[str, Any] = {
        "run_id": run_id,
        "model": "gpt-4o-mini",
        "start_timestamp": _iso(steps[0][0]),
        "end_timestamp": _iso(steps[-1][1]),
        "steps": [
            {
                "step_number": i + 1,
                "duration_seconds": e - s,
                "success": True,
                **({k: 0 for k in STEP_TOKEN_KEYS} if step_tokens else {}),
                "start_timestamp": s,
                "end_timestamp": e,
            }
            for i, (s, e) in enumerate(steps)
        ],
        "aggregate_metrics": {
            "AUTR": 1.0,
            "TOK_IN": 0,
            "TOK_OUT": 0,
            "API_CALLS": 0,
            "CACHED_TOKENS": 0,
            "AEI": 0.0,
        },
        "verification_status": "pending",
        **(extra or {}),
    }
    path = root / framework / run_id / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path


def pending_from_fixture(
    doc: dict[str, Any], shift: float, framework: str
) -> tuple[dict[str, Any], Truth]:
    """A settled field file turned back into a fresh one (tokens 0, no block, times shifted),
    with the provider's truth: each step's recorded usage, completed just before it ended."""
    out = copy.deepcopy(doc)
    truth = Truth()
    for step in out["steps"]:
        for key in ("start_timestamp", "end_timestamp"):
            step[key] = (
                step[key] + shift if isinstance(step[key], float) else int(step[key] + shift)
            )
        tin, tout = int(step.get("tokens_in") or 0), int(step.get("tokens_out") or 0)
        cached = int(step.get("cached_tokens") or 0)
        calls = int(step.get("api_calls") or (1 if tin or tout else 0))
        if tin or tout:
            end = step["end_timestamp"]
            t = max(step["start_timestamp"], end - 0.5)
            truth.requests.append(virtual_request(t, framework, tin, tout, calls, cached))
            truth.tokens_in += tin
            truth.tokens_out += tout
            truth.api_calls += calls
            truth.cached += cached
        for key in STEP_TOKEN_KEYS:
            if key in step:
                step[key] = 0
    for key in ("start_timestamp", "end_timestamp"):
        parsed = datetime.fromisoformat(out[key].replace("Z", "+00:00"))
        out[key] = _iso(parsed.timestamp() + shift)
    for key in AGG_TOKEN_KEYS:
        if key in out["aggregate_metrics"]:
            out["aggregate_metrics"][key] = 0
    out.pop("usage_api_reconciliation", None)
    if "verification_status" in out:
        out["verification_status"] = "pending"
    return out, truth


class SimControl:
    """The simulator's control endpoints, over HTTP as tests and the demo use them."""

    def __init__(self, session: Any, root_url: str) -> None:
        self.session = session
        self.url = f"{root_url}/_sim"

    async def _post(self, what: str, body: dict[str, Any]) -> None:
        async with self.session.post(f"{self.url}/{what}", json=body) as resp:
            assert resp.status == 200, await resp.text()

    async def add(self, requests: list[dict[str, Any]]) -> None:
        await self._post("requests", {"requests": requests})

    async def faults(self, *faults: dict[str, Any]) -> None:
        await self._post("faults", {"faults": list(faults)})

    async def reset(self) -> None:
        await self._post("reset", {})

    async def keys(self, admin: list[str], unscoped: list[str]) -> None:
        await self._post("keys", {"admin_keys": admin, "unscoped_keys": unscoped})

    async def usage_requests(self) -> int:
        async with self.session.get(f"{self.url}/stats") as resp:
            return int((await resp.json())["usage_requests"])

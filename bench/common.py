"""Helpers the benchmark scripts share: loopback HTTP, a free port, timestamps."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: the venv's bin directory, where `tokensettle` lives
BIN = Path(sys.executable).parent


def fresh_aggregates() -> dict[str, float]:
    """`aggregate_metrics` as a benchmark writes it when a run ends: tokens at 0."""
    return {"AUTR": 1.0, "TOK_IN": 0, "TOK_OUT": 0, "API_CALLS": 0, "CACHED_TOKENS": 0, "AEI": 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any], timeout: float = 60) -> Any:
    req = urllib.request.Request(  # noqa: S310 - loopback only
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        return json.loads(resp.read() or b"null")


def get(url: str, timeout: float = 30) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
        return json.loads(resp.read())


def iso_z(ts: float) -> str:
    """Unix seconds as the ISO form benchmarks write into run files."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"

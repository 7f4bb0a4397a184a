"""Helpers the benchmark scripts share: loopback HTTP, a free port, timestamps, and the
simulator and daemon processes the torture benchmarks start."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

#: the venv's bin directory, where `tokensettle` lives
BIN = Path(sys.executable).parent


def fresh_aggregates() -> dict[str, float]:
    """`aggregate_metrics` as a benchmark writes it when a run ends: tokens at 0."""
    return {"AUTR": 1.0, "TOK_IN": 0, "TOK_OUT": 0, "API_CALLS": 0, "CACHED_TOKENS": 0, "AEI": 0.0}


def pending_run(run_id: str, steps: list[tuple[float, float]]) -> bytes:
    """A run file as a benchmark writes it when the run ends: one entry per (start, end)
    step, every token field at 0, `json.dumps(indent=2)`."""
    doc = {
        "run_id": run_id,
        "model": "gpt-4o-mini",
        "start_timestamp": iso_z(steps[0][0]),
        "end_timestamp": iso_z(steps[-1][1]),
        "steps": [
            {
                "step_number": k + 1,
                "duration_seconds": e - s,
                "success": True,
                "tokens_in": 0,
                "tokens_out": 0,
                "api_calls": 0,
                "cached_tokens": 0,
                "start_timestamp": s,
                "end_timestamp": e,
            }
            for k, (s, e) in enumerate(steps)
        ],
        "aggregate_metrics": fresh_aggregates(),
        "verification_status": "pending",
    }
    return json.dumps(doc, indent=2).encode()


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


# ---------------------------------------------------------------------- processes

#: the admin key `tokensettle simulate` accepts unless a scenario names others
ADMIN_KEY = "sk-admin-simulator-0000"


def clean_env() -> dict[str, str]:
    """This process's environment without any TOKENSETTLE_* or OPENAI_* variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))}


def load_average() -> str:
    """`uptime`'s load averages (1, 5, 15 min): the machine is shared while we measure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def status_kb(pid: int, key: str) -> int:
    """A `/proc/<pid>/status` field in kB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class Simulator:
    """`tokensettle simulate` as its own process on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root_url}/v1"
        self.proc = subprocess.Popen(
            [str(BIN / "tokensettle"), "simulate", "--port", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=clean_env(),
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise
                time.sleep(0.05)

    def register(self, requests: list[dict[str, Any]]) -> None:
        """Ground truth: virtual requests (see `tokensettle simulate --help`), in chunks
        under the simulator's 1 MB body limit."""
        for i in range(0, len(requests), 2000):
            post(f"{self.root_url}/_sim/requests", {"requests": requests[i : i + 2000]})

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = get(f"{self.root_url}/_sim/stats")
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def daemon_env(
    roots: Path,
    base_url: str,
    state: Path,
    keys: dict[str, str],
    settings: dict[str, str],
) -> dict[str, str]:
    """The environment of a `tokensettle run` against the simulator: one root, JSON logs,
    a free status port, a key id per framework, and `settings` (names without the
    TOKENSETTLE_ prefix, e.g. {"tick": "1s"})."""
    return {
        **clean_env(),
        "TOKENSETTLE_RUNS_DIRS": str(roots),
        "TOKENSETTLE_API_BASE_URL": base_url,
        "TOKENSETTLE_ADMIN_KEY": ADMIN_KEY,
        "TOKENSETTLE_STATE_DIR": str(state),
        "TOKENSETTLE_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "TOKENSETTLE_LOG_FORMAT": "json",
        **{f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in keys.items()},
        **{f"TOKENSETTLE_{k.upper()}": v for k, v in settings.items()},
    }


class DaemonProcess:
    """One `tokensettle run` process. Its stdout and stderr are read in threads as the
    lines come: JSON objects are kept in order (with the monotonic time they were read),
    every other line apart (in JSON log mode there should be none, on either stream)."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.http = f"http://{env['TOKENSETTLE_HTTP_ADDR']}"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "tokensettle"), "run"],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.events: list[dict[str, Any]] = []
        self.read_at: list[float] = []
        self.not_json: list[str] = []
        self.stderr_text: list[str] = []
        self.cond = threading.Condition()
        self._open_streams = 2
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, False), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, True), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream: IO[bytes] | None, is_stderr: bool) -> None:
        assert stream is not None
        for raw in stream:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                event = json.loads(text)
            except ValueError:
                event = None
            with self.cond:
                if is_stderr:
                    self.stderr_text.append(text)
                if isinstance(event, dict):
                    self.events.append(event)
                    self.read_at.append(time.monotonic())
                else:
                    self.not_json.append(("stderr: " if is_stderr else "stdout: ") + text)
                self.cond.notify_all()
        with self.cond:
            self._open_streams -= 1
            self.cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def find(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.events[since:] if e.get("event") == name]

    def wait_event(
        self,
        names: str | tuple[str, ...],
        within: float,
        *,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> int | None:
        """The index of the first event named `names` (one or several) at or after index
        `since` (and matching `where`); None at the deadline or once the process ended."""
        wanted = (names,) if isinstance(names, str) else names
        deadline = time.monotonic() + within
        with self.cond:
            checked = since
            while True:
                for i in range(checked, len(self.events)):
                    event = self.events[i]
                    if event.get("event") in wanted and (where is None or where(event)):
                        return i
                checked = max(checked, len(self.events))
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._open_streams == 0:
                    return None
                self.cond.wait(remaining)

    def wait_count(self, name: str, n: int, within: float, *, since: int = 0) -> int | None:
        """The index of the n-th event named `name` at or after `since`; None at the
        deadline or once the process ended."""
        deadline = time.monotonic() + within
        found = 0
        at = since
        while found < n:
            i = self.wait_event(name, deadline - time.monotonic(), since=at)
            if i is None:
                return None
            found += 1
            at = i + 1
        return at - 1

    def _finish(self, within: float) -> int:
        code = self.proc.wait(timeout=within)
        for thread in self._threads:
            thread.join(timeout=within)
        return code

    def kill(self) -> int:
        """SIGKILL (kill -9); the exit status once reaped, and every line read."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self._finish(30)

    def terminate(self, within: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self._finish(within)
        except subprocess.TimeoutExpired:
            return self.kill()

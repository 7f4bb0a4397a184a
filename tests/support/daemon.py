"""Running the real `tokensettle run` process in a test: its environment, its JSON log
lines read asynchronously as they come, its HTTP endpoints, and ways to write run files.

Synchronisation is always on an event: a log line (`Daemon.wait_event`), an HTTP answer,
or a file condition polled with a deadline (`wait_for`), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.runs import KEYS

EXE = shutil.which("tokensettle", path=str(Path(sys.executable).parent)) or "tokensettle"

#: Compressed timings: a run that ended minutes ago is due at once and verifies ~2-3 s later.
FAST: dict[str, str] = {
    "TOKENSETTLE_MIN_AGE": "1s",
    "TOKENSETTLE_STABILITY_INTERVAL": "2s",
    "TOKENSETTLE_TICK": "1s",
    "TOKENSETTLE_SETTLE_DELAY": "1s",
    "TOKENSETTLE_MAX_BACKOFF": "2s",
    "TOKENSETTLE_RETRY_DELAY": "1s",
    "TOKENSETTLE_REQUEST_TIMEOUT": "2s",
    "TOKENSETTLE_REQUEST_ATTEMPTS": "3",
    "TOKENSETTLE_RATE_LIMIT_PER_MIN": "600",
    # The daily bill check reads usage too; tests that count requests do not want it.
    "TOKENSETTLE_BILL_CHECK_INTERVAL": "0s",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_environ() -> dict[str, str]:
    """The parent's environment without any TOKENSETTLE_* / OPENAI_* variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))}


def daemon_env(
    roots: list[Path] | Path,
    base_url: str,
    state: Path,
    admin_key: str,
    *,
    http_port: int | None = None,
    timings: Mapping[str, str] = FAST,
    **extra: str,
) -> dict[str, str]:
    roots = [roots] if isinstance(roots, Path) else roots
    return {
        **clean_environ(),
        "TOKENSETTLE_RUNS_DIRS": ",".join(str(r) for r in roots),
        "TOKENSETTLE_API_BASE_URL": base_url,
        "TOKENSETTLE_ADMIN_KEY": admin_key,
        "TOKENSETTLE_STATE_DIR": str(state),
        "TOKENSETTLE_HTTP_ADDR": f"127.0.0.1:{http_port or free_port()}",
        "TOKENSETTLE_LOG_FORMAT": "json",
        **timings,
        **{f"OPENAI_API_KEY_{fw.upper()}_ID": key for fw, key in KEYS.items()},
        **extra,
    }


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    within: float,
    *,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll `predicate` (sync or async) every `interval` until it returns a truthy value,
    which is returned; AssertionError after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def matches(event: Mapping[str, Any], name: str | None, fields: Mapping[str, Any]) -> bool:
    if name is not None and event.get("event") != name:
        return False
    return all(event.get(k) == v for k, v in fields.items())


class Daemon:
    """One `tokensettle run` process. Every stdout line is kept (parsed as JSON) as it is
    read; `wait_event` waits for a matching line with a deadline."""

    def __init__(self, env: Mapping[str, str], *, cwd: Path) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.http = f"http://{self.env['TOKENSETTLE_HTTP_ADDR']}"
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []
        self.stdout_lines: list[str] = []
        self.not_json: list[str] = []
        self.stderr = b""
        self._changed = asyncio.Condition()
        self._readers: list[asyncio.Task[None]] = []
        self._eof = False

    # ------------------------------------------------------------------ process

    async def start(self, *args: str) -> Daemon:
        self.proc = await asyncio.create_subprocess_exec(
            EXE,
            "run",
            *args,
            env=self.env,
            cwd=self.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]
        return self

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.stdout_lines.append(text)
            try:
                event = json.loads(text)
            except json.JSONDecodeError:
                self.not_json.append(text)
                event = None
            async with self._changed:
                if isinstance(event, dict):
                    self.events.append(event)
                self._changed.notify_all()
        async with self._changed:
            self._eof = True
            self._changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_exit(self, within: float = 15) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), within)
        await asyncio.wait_for(asyncio.gather(*self._readers), within)
        return code

    async def terminate(self, within: float = 15) -> int:
        """SIGTERM and wait for the exit code."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(within)

    async def kill(self) -> int:
        """SIGKILL (kill -9) and wait."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
        return await self.wait_exit()

    async def close(self) -> None:
        """Teardown: stop gracefully, kill if that does not work."""
        if self.proc is None:
            return
        if self.running:
            try:
                await self.terminate(within=10)
            except TimeoutError:
                await self.kill()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._readers), 5)

    # ------------------------------------------------------------------ log lines

    def find(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if matches(e, name, fields)]

    def count(self, name: str | None = None, **fields: Any) -> int:
        return len(self.find(name, **fields))

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.stdout_lines[-n:]) + "\nstderr: " + self.stderr.decode()[-2000:]

    async def wait_event(
        self,
        name: str,
        within: float = 20,
        *,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The first line (from index `since`) of event `name` with these field values."""
        found = await self.wait_events(name, 1, within, since=since, where=where, **fields)
        return found[0]

    async def wait_events(
        self,
        name: str,
        n: int,
        within: float = 20,
        *,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> list[dict[str, Any]]:
        """At least `n` lines of event `name` matching; AssertionError at the deadline or
        when the process ends first."""
        deadline = asyncio.get_running_loop().time() + within
        async with self._changed:
            while True:
                hits = [
                    e
                    for e in self.events[since:]
                    if matches(e, name, fields) and (where is None or where(e))
                ]
                if len(hits) >= n:
                    return hits
                if self._eof:
                    raise AssertionError(
                        f"daemon ended before {n} x {name} {fields}:\n{self.tail()}"
                    )
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out waiting for {n} x {name} {fields} (got {len(hits)}):\n"
                        f"{self.tail()}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def ready(self, within: float = 30) -> dict[str, Any]:
        return await self.wait_event("daemon.ready", within)

    # ------------------------------------------------------------------ HTTP

    async def get(self, session: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        async with session.get(self.http + path, timeout=aiohttp.ClientTimeout(5)) as resp:
            body = await resp.text()
            try:
                return resp.status, json.loads(body)
            except json.JSONDecodeError:
                return resp.status, body


# ---------------------------------------------------------------------- reading files


def load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_bytes())
    assert isinstance(doc, dict)
    return doc


# ---------------------------------------------------------------------- writing files


def write_in_place(path: Path, data: bytes) -> None:
    """open / write / close into an existing directory, as most benchmarks do."""
    with open(path, "wb") as f:
        f.write(data)


def write_by_rename(path: Path, data: bytes) -> None:
    """A temp file in the same directory, then os.replace onto metrics.json."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_in_new_dirs(path: Path, data: bytes) -> None:
    """Directories created a moment before the file is written into them."""
    os.makedirs(path.parent)
    with open(path, "wb") as f:
        f.write(data)

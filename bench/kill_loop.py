"""Torture benchmark: hundreds of kill -9 cycles of the daemon, its index damaged between.

Starts `tokensettle simulate` and then, cycle after cycle, a real `tokensettle run` over
one runs root (three frameworks, compressed timings), which it kills with SIGKILL:

- runs arrive in waves (a quarter before the first start, the rest at random cycles,
  written while the daemon is down or just after it is ready, by temp file + rename);
  each run's usage is registered in the simulator when its file is written;
- usage keeps arriving late: between cycles, while the daemon is dead, a run that is not
  verified yet may get one more request registered (up to a random budget), so its polls
  disagree and it stays pending, polled and rewritten, for several cycles (the truth never
  changes while a daemon runs, so a verification is never premature);
- each kill is timed one of five ways: the moment one of our temp files is created (raw
  inotify on every run directory, then 0-1.5 ms), right after the k-th `run.polled` line
  of a round (the next run's write is under way), at a random offset after
  `daemon.ready`, just after `http.listening` (the watcher's start and the start scan),
  or within a tick of `daemon.ready` (the first round). A kill "landed inside a write"
  when a temp file of the killed process (`.tokensettle-*.<pid>.*.tmp`) is on disk after
  it, and "inside a round's writes" when fewer runs were logged as polled than the last
  round's `usage_api.fetched` lines held;
- between cycles the state index is damaged in rotation: left alone, truncated, replaced
  by garbage (with or without a SQLite header), made a directory, deleted, given a stale
  or garbage -wal file, filled with rows for nonexistent files (and stale rows for
  pending ones), given a table of the wrong shape, or made a dangling symlink.

A thread reads every run file continuously (and every file after each kill): each read
must be valid JSON, no token field (aggregate, step, block totals) and no attempt count
may ever go down, and a verified run must stay verified. At the end the daemon is started
once more and must verify every run with exactly the simulator's truth; then are counted:
failed starts (exited on their own, or never ready), stray temp files, `Traceback` and
non-JSON lines on stdout or stderr. The field trial saw 305 of 1,001 starts fail on a
damaged index. Prints a JSON summary; exit 1 if an invariant failed.

    .venv/bin/python bench/kill_loop.py [--cycles 60] [--runs 150] [--seed 0] [--keep]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import struct
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    DaemonProcess,
    Simulator,
    daemon_env,
    load_average,
    machine,
    pending_run,
)
from tokensettle.index import FileKey, Finished, Index
from tokensettle.logs import configure

KEYS = {
    "chatdev": "key_chatdevKILL0001",
    "baes": "key_baesKILL000002",
    "ghspec": "key_ghspecKILL003",
}
PROJECT = "proj_kill"
MODEL = "gpt-4o-mini-2024-07-18"
TIMINGS = {
    "min_age": "1s",
    "stability_interval": "2s",
    "tick": "0.5s",
    "settle_delay": "0.3s",
    "max_backoff": "2s",
    "retry_delay": "0.5s",
    "request_timeout": "3s",
    "request_attempts": "3",
    "rate_limit_per_min": "6000",
    "max_age": "7d",  # --runs beyond ~800 reach back more than a day
    "log_level": "debug",  # repeated polls of a pending run log `run.polled` at debug
}
SLOT = 300  # seconds between the starts of two runs of one framework (no shared minute)
COUNTERS = ("input_tokens", "output_tokens", "num_model_requests", "input_cached_tokens")
AGG_KEYS = ("TOK_IN", "TOK_OUT", "API_CALLS", "CACHED_TOKENS")
STEP_KEYS = ("tokens_in", "tokens_out", "api_calls", "cached_tokens")
BLOCK_KEYS = ("total_tokens_in", "total_tokens_out", "total_api_calls", "total_cached_tokens")
DAMAGE = (
    "none",
    "truncate",
    "garbage",
    "directory",
    "delete",
    "stale_wal",
    "phantom_rows",
    "sqlite_garbage",
    "wrong_schema",
    "dangling_symlink",
)
KILL_MODES = {
    "in_temp": 0.35,
    "after_polled": 0.25,
    "random": 0.2,
    "start": 0.1,
    "first_round": 0.1,
}
READY_WITHIN = 30.0
EVENT_WITHIN = 3.0


# ---------------------------------------------------------------------- the runs


@dataclass
class Run:
    framework: str
    run_id: str
    path: Path
    steps: list[tuple[float, float]]
    #: per step: input, output, calls, cached registered so far (the simulator's truth)
    truth: list[list[int]]
    budget: int  # late requests still to come
    wave: int
    written: bool = False

    def totals(self) -> list[int]:
        return [sum(step[k] for step in self.truth) for k in range(4)]


def plan_runs(n: int, cycles: int, now: float, rng: random.Random) -> list[Run]:
    """N runs round-robin over the frameworks, a 3-minute run per 5-minute slot, the
    last ending 15 minutes ago; waves: a quarter at cycle 0, the rest at random cycles
    (about one in five) within the first 70 % of the loop."""
    slots = (n + 2) // 3
    base = (int(now) // 60) * 60 - 15 * 60 - slots * SLOT
    wave_cycles = sorted(rng.sample(range(1, max(2, int(cycles * 0.7))), k=max(1, cycles // 5)))
    runs = []
    fws = list(KEYS)
    for i in range(n):
        fw = fws[i % 3]
        minute = base + (i // 3) * SLOT
        steps = [(minute + 60.0 * k + 5, minute + 60.0 * k + 55) for k in range(3)]
        run_id = f"run-{i:04d}"
        wave = 0 if i < max(1, n // 4) else rng.choice(wave_cycles)
        runs.append(
            Run(fw, run_id, Path(fw) / run_id / "metrics.json", steps, [], rng.randint(0, 5), wave)
        )
    return runs


def request(run: Run, step: int, rng: random.Random) -> dict[str, Any]:
    """One more provider-side request inside a step; its counters join the run's truth."""
    s, e = run.steps[step]
    tin = rng.randint(200, 5000)
    usage = [tin, tin // 5 + rng.randint(0, 99), rng.randint(1, 3), rng.randint(0, tin // 4)]
    while len(run.truth) <= step:
        run.truth.append([0, 0, 0, 0])
    for k in range(4):
        run.truth[step][k] += usage[k]
    return {
        "time": rng.uniform(s + 1, e - 1),
        "api_key_id": KEYS[run.framework],
        "project_id": PROJECT,
        "model": MODEL,
        "usage": dict(zip(COUNTERS, usage, strict=True)),
    }


# ---------------------------------------------------------------------- invariants


def token_fields(doc: dict[str, Any]) -> dict[str, int]:
    """Every token count a run file carries, and its number of attempts."""
    out: dict[str, int] = {}
    agg = doc.get("aggregate_metrics") or {}
    for key in AGG_KEYS:
        if isinstance(agg.get(key), int):
            out[f"aggregate_metrics.{key}"] = agg[key]
    for i, step in enumerate(doc.get("steps") or []):
        for key in STEP_KEYS:
            if isinstance(step.get(key), int):
                out[f"steps[{i}].{key}"] = step[key]
    block = doc.get("usage_api_reconciliation") or {}
    for key in BLOCK_KEYS:
        if isinstance(block.get(key), int):
            out[f"block.{key}"] = block[key]
    attempts = [a for a in block.get("attempts") or [] if isinstance(a, dict)]
    out["block.attempts"] = len(attempts)
    for key in BLOCK_KEYS:
        polled = [a[key] for a in attempts if isinstance(a.get(key), int)]
        if polled:
            out[f"attempts[-1].{key}"] = polled[-1]
    return out


def attempts_going_down(doc: dict[str, Any]) -> list[str]:
    """The provider's counts only grow in this loop, so each successful poll recorded in a
    file must have totals at least those of the one before it."""
    block = doc.get("usage_api_reconciliation") or {}
    attempts = [a for a in block.get("attempts") or [] if isinstance(a, dict)]
    out = []
    for key in BLOCK_KEYS:
        polled = [a[key] for a in attempts if isinstance(a.get(key), int)]
        out += [f"attempt {key}: {a} -> {b}" for a, b in itertools.pairwise(polled) if b < a]
    return out


def status_of(doc: dict[str, Any]) -> str | None:
    block = doc.get("usage_api_reconciliation") or {}
    value = block.get("verification_status")
    return str(value) if value is not None else None


class Invariants:
    """What every read of a run file must satisfy, over the whole loop (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.highest: dict[tuple[str, str], int] = {}
        self.verified: set[str] = set()
        self.reads = 0
        self.invalid: list[str] = []
        self.decreases: list[str] = []
        self.regressions: list[str] = []
        self.missing: list[str] = []

    def read(self, path: Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            with self.lock:
                self.missing.append(str(path))
            return None
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            with self.lock:
                self.reads += 1
                self.invalid.append(f"{path}: {exc} ({len(raw)} bytes)")
            return None
        key = str(path)
        with self.lock:
            self.reads += 1
            for name, value in token_fields(doc).items():
                seen = self.highest.get((key, name))
                if seen is not None and value < seen:
                    self.decreases.append(f"{key} {name}: {seen} -> {value}")
                if seen is None or value > seen:
                    self.highest[(key, name)] = value
            for found in attempts_going_down(doc):  # the same file is read again and again
                if f"{key} {found}" not in self.decreases:
                    self.decreases.append(f"{key} {found}")
            status = status_of(doc)
            if key in self.verified and status != "verified":
                self.regressions.append(f"{key}: verified -> {status}")
            if status == "verified":
                self.verified.add(key)
        return doc


class Sampler(threading.Thread):
    """Reads every written run file again and again while the loop runs."""

    def __init__(self, root: Path, runs: list[Run], invariants: Invariants) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.runs = runs
        self.invariants = invariants
        self.stop = threading.Event()
        self.passes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for run in [r for r in self.runs if r.written]:
                self.invariants.read(self.root / run.path)
            self.passes += 1
            self.stop.wait(0.02)


def check_final(root: Path, runs: list[Run]) -> list[str]:
    """Every run verified with exactly its truth, in the aggregate, block and each step."""
    wrong = []
    for run in runs:
        doc = json.loads((root / run.path).read_bytes())
        status = status_of(doc)
        agg = doc.get("aggregate_metrics") or {}
        block = doc.get("usage_api_reconciliation") or {}
        want = run.totals()
        got_agg = [agg.get(k) for k in AGG_KEYS]
        got_block = [block.get(k) for k in BLOCK_KEYS]
        got_steps = [[s.get(k) for k in STEP_KEYS] for s in doc.get("steps") or []]
        if status != "verified" or doc.get("verification_status") != "verified":
            wrong.append(f"{run.path}: {status}: {block.get('verification_message')}")
        elif got_agg != want or got_block != want or got_steps != run.truth:
            wrong.append(f"{run.path}: got {got_agg} / {got_block} / {got_steps}, want {want}")
    return wrong


def all_verified(root: Path, runs: list[Run]) -> bool:
    for run in runs:
        try:
            if status_of(json.loads((root / run.path).read_bytes())) != "verified":
                return False
        except ValueError:
            return False
    return True


def temp_files(root: Path, pid: int | None = None) -> list[Path]:
    """Our own temp files (`atomic.TEMP_PREFIX` ... `TEMP_SUFFIX`), of one process or all."""
    pattern = f".tokensettle-*.{pid}.*.tmp" if pid is not None else ".tokensettle-*.tmp"
    return sorted(root.glob(f"*/*/{pattern}"))


class TempWatch(threading.Thread):
    """Kills an armed daemon the moment one of its temp files appears (raw inotify on
    every run directory: IN_CREATE), optionally after a random sub-millisecond delay, so
    the kill lands between the temp file's creation and its rename."""

    IN_CREATE = 0x100
    HEADER = struct.Struct("iIII")

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.lock = threading.Lock()
        self.armed: tuple[int, float] | None = None  # (pid, delay)
        self.fired = threading.Event()
        self.stop = threading.Event()

    def watch(self, directory: Path) -> None:
        if self.libc.inotify_add_watch(self.fd, str(directory).encode(), self.IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch", str(directory))

    def arm(self, pid: int, delay: float) -> None:
        with self.lock:
            self.fired.clear()
            self.armed = (pid, delay)

    def disarm(self) -> bool:
        """Disarm; True if it fired (the daemon is already killed)."""
        with self.lock:
            self.armed = None
            return self.fired.is_set()

    def run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            offset = 0
            hit = False
            while offset < len(data):
                _, mask, _, size = self.HEADER.unpack_from(data, offset)
                name = data[offset + 16 : offset + 16 + size].rstrip(b"\0")
                offset += 16 + size
                hit = hit or (
                    bool(mask & self.IN_CREATE)
                    and name.startswith(b".tokensettle-")
                    and name.endswith(b".tmp")
                )
            if hit:
                self._fire()

    def _fire(self) -> None:
        with self.lock:
            if self.armed is None:
                return
            pid, delay = self.armed
            if delay:
                time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            self.armed = None
            self.fired.set()


# ---------------------------------------------------------------------- damage


def _clear(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def damage(kind: str, state: Path, runs_root: Path, runs: list[Run], rng: random.Random) -> str:
    """Damage the index one way while no daemon runs; returns what was done."""
    index = state / "index.sqlite3"
    wal, shm = Path(f"{index}-wal"), Path(f"{index}-shm")
    saved_wal = state.parent / "saved-index.sqlite3-wal"
    if kind == "none":
        return "left as the kill left it"
    if kind in ("truncate", "garbage", "sqlite_garbage"):
        # With its -wal still there SQLite may read every page from the WAL, so the
        # damage goes unnoticed; half the time the WAL goes too.
        wal_note = "; -wal kept"
        if rng.random() < 0.5:
            _clear(wal)
            _clear(shm)
            wal_note = "; -wal and -shm removed"
        if kind == "truncate":
            if index.is_file() and not index.is_symlink() and index.stat().st_size > 0:
                size = rng.randrange(index.stat().st_size)
                os.truncate(index, size)
                return "truncated" + wal_note
            _clear(index)
            index.write_bytes(b"")
            return "made an empty file" + wal_note
        _clear(index)
        body = rng.randbytes(4096 * rng.randint(1, 8))
        if kind == "sqlite_garbage":  # looks like SQLite to a reader of the first bytes
            body = b"SQLite format 3\x00" + body[16:]
        index.write_bytes(body)
        return "garbage" + wal_note
    if kind == "directory":
        for path in (index, wal, shm):
            _clear(path)
        index.mkdir()
        if rng.random() < 0.5:
            (index / "stray").write_text("x")
            return "a directory with a file inside"
        return "an empty directory"
    if kind == "delete":
        for path in (index, wal, shm):
            _clear(path)
        return "deleted with its -wal and -shm"
    if kind == "stale_wal":
        _clear(shm)
        _clear(wal)
        if saved_wal.exists() and rng.random() < 0.7:
            shutil.copyfile(saved_wal, wal)
            return "a -wal file from an earlier cycle"
        wal.write_bytes(rng.randbytes(8192))
        return "a garbage -wal file"
    if kind == "phantom_rows":
        db = Index(index)  # opens (or sets aside and recreates) it as the daemon does
        written = [r for r in runs if r.written]
        rows = []
        for i in range(50):
            other = rng.choice(written)
            ghost = runs_root / other.framework / f"ghost-{rng.randrange(10**9)}" / "metrics.json"
            rows.append(
                Finished(
                    FileKey(str(ghost), 1000 + i, 4096, time.time_ns()),
                    other.framework,
                    f"ghost-{i}",
                    other.steps[0][0] - 30,
                    other.steps[-1][1] + 30,
                    "verified",
                    rng.randint(1, 10**6),
                    rng.randint(1, 10**5),
                )
            )
        for run in rng.sample(written, k=min(10, len(written))):  # stale versions
            rows.append(
                Finished(
                    FileKey(str(runs_root / run.path), 1, 1, 1),
                    run.framework,
                    run.run_id,
                    run.steps[0][0],
                    run.steps[-1][1],
                    "verified",
                    1,
                    1,
                )
            )
        db.put(rows)
        db.close()
        return "rows for nonexistent files and stale versions"
    if kind == "wrong_schema":
        for path in (index, wal, shm):
            _clear(path)
        con = sqlite3.connect(index)
        con.executescript(
            "CREATE TABLE finished (path TEXT PRIMARY KEY, note TEXT);"
            "INSERT INTO finished VALUES ('/nowhere', 'x'); PRAGMA user_version=2;"
        )
        con.close()
        return "a SQLite file with a `finished` table of the wrong shape"
    if kind == "dangling_symlink":
        for path in (index, wal, shm):
            _clear(path)
        index.symlink_to(state.parent / "no-such-dir" / "index.sqlite3")
        return "a symlink to a path in a missing directory"
    raise ValueError(kind)


# ---------------------------------------------------------------------- one cycle


@dataclass
class Stats:
    starts: int = 0
    failed_starts: list[dict[str, Any]] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    kills_without_their_event: Counter[str] = field(default_factory=Counter)
    kills_in_a_write: int = 0
    temp_files_at_kills: int = 0
    kills_in_round_writes: int = 0
    damage: Counter[str] = field(default_factory=Counter)
    index_after: defaultdict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    index_errors: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    events: Counter[str] = field(default_factory=Counter)
    tracebacks: list[str] = field(default_factory=list)
    not_json: list[str] = field(default_factory=list)
    late_requests: int = 0
    uptime: list[float] = field(default_factory=list)
    #: running estimate of one run's settle and write, from the gaps between its lines
    write_seconds: float = 0.005


def absorb(daemon: DaemonProcess, stats: Stats, damaged: str) -> None:
    """Count what a finished start logged (the index's lines by the damage it found)."""
    for event in daemon.events:
        name = str(event.get("event"))
        if name.startswith("index."):
            stats.index_after[damaged][name] += 1
            if name == "index.unavailable" and len(stats.index_errors[damaged]) < 3:
                stats.index_errors[damaged].append(str(event.get("error")))
        if name.startswith(("index.", "run.write", "daemon.config", "watcher.")) or name in (
            "run.settled",
            "usage_api.fetch_failed",
            "daemon.ready",
        ):
            stats.events[name] += 1
    stderr = "\n".join(daemon.stderr_text)
    if "Traceback" in stderr or any("Traceback" in str(e) for e in daemon.events):
        stats.tracebacks.append(stderr[-1500:])
    stats.not_json.extend(line[:300] for line in daemon.not_json)


def wait_in_write(daemon: DaemonProcess, stats: Stats, rng: random.Random) -> bool:
    """Wait for a round (`usage_api.fetched`), then for its k-th `run.polled` line with k
    below the round's run count (each line is logged once that run's write is done), then
    a random part of the time one write takes: the next run's write is under way."""
    i = daemon.wait_event("usage_api.fetched", EVENT_WITHIN)
    if i is None:
        return False
    runs = int(daemon.events[i].get("runs") or 1)
    if runs < 2:
        time.sleep(rng.uniform(0, stats.write_seconds))
        return True
    k = rng.randint(1, runs - 1)
    since = i
    for _ in range(k):
        j = daemon.wait_event(("run.polled", "run.attempt_failed"), EVENT_WITHIN, since=since)
        if j is None:
            return False
        if since > i:  # the gap between two lines of one round: one run's settle and write
            gap = daemon.read_at[j] - daemon.read_at[since - 1]
            stats.write_seconds = 0.8 * stats.write_seconds + 0.2 * min(gap, 0.1)
        since = j + 1
    time.sleep(rng.uniform(0, stats.write_seconds))
    return True


ROUND_FETCH = ("usage_api.request", "usage_api.fetched", "usage_api.fetch_failed")
POLLED = ("run.polled", "run.attempt_failed")


def in_round_writes(events: list[dict[str, Any]]) -> bool:
    """True if the log ends inside a round's writes: fewer runs logged as polled after the
    round's fetches than those fetches held."""
    names = [str(e.get("event")) for e in events]
    last = max((i for i, n in enumerate(names) if n == "usage_api.fetched"), default=None)
    if last is None:
        return False
    first = last
    while first > 0 and names[first - 1] in ROUND_FETCH:
        first -= 1
    held = sum(
        int(e.get("runs") or 0) for e in events[first:] if e.get("event") == "usage_api.fetched"
    )
    polled = sum(1 for n in names[last:] if n in POLLED)
    return polled < held


@dataclass
class Harness:
    """The loop's world: the work tree, the simulator, the runs and what was counted."""

    work: Path
    env: dict[str, str]
    runs: list[Run]
    sim: Simulator
    invariants: Invariants
    rng: random.Random
    temps: TempWatch
    stats: Stats = field(default_factory=Stats)
    damaged: str = "none"  # what the next start finds

    @property
    def root(self) -> Path:
        return self.work / "runs"

    @property
    def state(self) -> Path:
        return self.work / "state"

    def cycle(self, n: int) -> None:
        """One start, one kill -9, then checks, late usage and damage to the index."""
        rng, stats = self.rng, self.stats
        wave = [r for r in self.runs if r.wave == n and not r.written]
        after_ready = bool(wave) and rng.random() < 0.5
        if not after_ready:
            self.write_wave(wave)
        mode = rng.choices(list(KILL_MODES), weights=list(KILL_MODES.values()))[0]
        daemon = DaemonProcess(self.env, self.work)
        stats.starts += 1
        # "up": the start got as far as the mode needs (listening, or ready)
        up = daemon.wait_event(
            "http.listening" if mode == "start" else "daemon.ready", READY_WITHIN
        )
        found = up is not None
        fired = False  # killed by the temp-file watch
        if up is not None and mode == "start":
            time.sleep(rng.uniform(0, 0.03))
        elif up is not None:
            if after_ready:
                self.write_wave(wave)
            if mode == "in_temp":
                self.temps.arm(daemon.pid, rng.choice([0.0, rng.uniform(0, 0.0015)]))
                self.temps.fired.wait(EVENT_WITHIN)
                found = fired = self.temps.disarm()
            elif mode == "after_polled":
                found = wait_in_write(daemon, stats, rng)
            elif mode == "random":
                time.sleep(rng.uniform(0, 1.5))
            else:
                time.sleep(rng.uniform(0, 0.5))
        exited = None if fired else daemon.proc.poll()
        code = daemon.kill()
        stats.uptime.append(time.monotonic() - daemon.started)
        stats.kills[mode] += 1
        if exited is not None or up is None:
            stats.failed_starts.append(
                {
                    "cycle": n,
                    "mode": mode,
                    "exit_code": code if exited is not None else None,
                    "why": "exited on its own" if exited is not None else "never became ready",
                    "last_lines": [json.dumps(e) for e in daemon.events[-3:]],
                    "stderr": "\n".join(daemon.stderr_text)[-600:],
                }
            )
        elif not found:
            stats.kills_without_their_event[mode] += 1
        self.write_wave([r for r in wave if not r.written])
        leftovers = temp_files(self.root, daemon.pid)
        if leftovers:
            stats.kills_in_a_write += 1
            stats.temp_files_at_kills += len(leftovers)
        if in_round_writes(daemon.events):
            stats.kills_in_round_writes += 1
        absorb(daemon, stats, self.damaged)

        for run in self.runs:  # every file, right after the kill
            if run.written:
                self.invariants.read(self.root / run.path)
        wal = self.state / "index.sqlite3-wal"
        if wal.is_file() and wal.stat().st_size > 0 and rng.random() < 0.3:
            shutil.copyfile(wal, self.work / "saved-index.sqlite3-wal")
        stats.late_requests += self.late_usage()
        kind = DAMAGE[n % len(DAMAGE)]
        done = damage(kind, self.state, self.root, self.runs, rng)
        stats.damage[f"{kind}: {done}"] += 1
        self.damaged = kind

    def write_wave(self, wave: list[Run]) -> None:
        """Register the runs' usage, then write their files (temp file + rename)."""
        if not wave:
            return
        requests = []
        for run in wave:
            for step in range(len(run.steps)):
                requests.append(request(run, step, self.rng))
        self.sim.register(requests)
        for run in wave:
            path = self.root / run.path
            path.parent.mkdir(parents=True, exist_ok=True)
            self.temps.watch(path.parent)
            tmp = path.with_name("metrics.json.writing")
            tmp.write_bytes(pending_run(run.run_id, run.steps))
            os.replace(tmp, path)
            run.written = True

    def late_usage(self) -> int:
        """While no daemon runs: one more request for some runs not yet verified."""
        requests = []
        for run in self.runs:
            if not run.written or run.budget <= 0 or self.rng.random() > 0.35:
                continue
            doc = self.invariants.read(self.root / run.path)
            if doc is None or status_of(doc) == "verified":
                continue
            requests.append(request(run, self.rng.randrange(len(run.steps)), self.rng))
            run.budget -= 1
        if requests:
            self.sim.register(requests)
        return len(requests)


# ---------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=60)
    parser.add_argument("--runs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--final-within", type=float, default=120.0, help="seconds")
    args = parser.parse_args()
    configure(level="critical", fmt="json", stream=open(os.devnull, "w"))  # noqa: SIM115
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tokensettle-kill-"))
    root, state = work / "runs", work / "state"
    root.mkdir()
    state.mkdir()
    load_before = load_average()
    started = time.monotonic()
    runs = plan_runs(args.runs, args.cycles, time.time(), rng)
    invariants = Invariants()
    sampler = Sampler(root, runs, invariants)
    stats = Stats()
    sim = Simulator()
    temps = TempWatch()
    try:
        env = daemon_env(root, sim.base_url, state, KEYS, TIMINGS)
        harness = Harness(work, env, runs, sim, invariants, rng, temps, stats)
        temps.start()
        sampler.start()
        for n in range(args.cycles):
            harness.cycle(n)
        harness.write_wave([r for r in runs if not r.written])
        loop_seconds = time.monotonic() - started

        final = DaemonProcess(env, work)
        stats.starts += 1
        ready = final.wait_event("daemon.ready", READY_WITHIN)
        deadline = time.monotonic() + args.final_within
        while ready is not None and not all_verified(root, runs):
            if time.monotonic() > deadline or final.proc.poll() is not None:
                break
            time.sleep(0.25)
        settle_seconds = time.monotonic() - started - loop_seconds
        sampler.stop.set()
        sampler.join()
        for run in runs:
            invariants.read(root / run.path)
        wrong = check_final(root, runs)
        stray = temp_files(root)
        final_exit = final.terminate()
        if ready is None or final_exit != 0:
            stats.failed_starts.append(
                {
                    "cycle": "final",
                    "exit_code": final_exit,
                    "why": "never became ready" if ready is None else "exit code at SIGTERM",
                    "stderr": "\n".join(final.stderr_text)[-600:],
                }
            )
        absorb(final, stats, harness.damaged)
        stats.uptime.append(time.monotonic() - final.started)
        sim_stats = sim.stats()
    finally:
        sampler.stop.set()
        temps.stop.set()
        sim.close()
        state_entries = sorted(p.name for p in state.iterdir()) if state.exists() else []
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    cycles = args.cycles
    summary = {
        "command": f"python bench/kill_loop.py --cycles {cycles} --runs {args.runs} "
        f"--seed {args.seed}",
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cycles": cycles,
        "runs": args.runs,
        "late_requests_registered": stats.late_requests,
        "wall_seconds": {
            "loop": round(loop_seconds, 1),
            "final_settle": round(settle_seconds, 1),
            "mean_uptime_per_start": round(sum(stats.uptime) / len(stats.uptime), 2),
        },
        "starts": stats.starts,
        "failed_starts": len(stats.failed_starts),
        "failed_start_examples": stats.failed_starts[:3],
        "kills": dict(stats.kills),
        "kills_whose_event_did_not_come": dict(stats.kills_without_their_event),
        "kills_inside_a_file_write": stats.kills_in_a_write,
        "temp_files_left_by_kills": stats.temp_files_at_kills,
        "kills_inside_a_rounds_writes": stats.kills_in_round_writes,
        "damage": dict(sorted(stats.damage.items())),
        "index_lines_by_damage_found": {k: dict(v) for k, v in sorted(stats.index_after.items())},
        "index_unavailable_errors": dict(stats.index_errors),
        "daemon_events": dict(sorted(stats.events.items())),
        "state_dir_at_end": state_entries[:20],
        "state_dir_entries_at_end": len(state_entries),
        "usage_api_requests": sim_stats.get("usage_requests"),
        "file_reads": invariants.reads,
        "sampler_passes": sampler.passes,
        "invalid_json_reads": len(invariants.invalid),
        "invalid_json_examples": invariants.invalid[:3],
        "token_field_decreases": len(invariants.decreases),
        "decrease_examples": invariants.decreases[:5],
        "verified_regressions": len(invariants.regressions),
        "regression_examples": invariants.regressions[:5],
        "files_missing_at_a_read": len(invariants.missing),
        "final": {
            "ready": ready is not None,
            "exit_code_at_sigterm": final_exit,
            "verified_exact": args.runs - len(wrong),
            "not_verified_exact": len(wrong),
            "examples": wrong[:5],
            "stray_temp_files": len(stray),
        },
        "tracebacks": len(stats.tracebacks),
        "traceback_examples": stats.tracebacks[:2],
        "non_json_lines": len(stats.not_json),
        "non_json_examples": stats.not_json[:5],
    }
    print(json.dumps(summary, indent=2))
    ok = not (
        stats.failed_starts
        or invariants.invalid
        or invariants.decreases
        or invariants.regressions
        or wrong
        or stats.tracebacks
        or stats.not_json
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""A thin bridge from watchdog's thread to the asyncio loop.

The handler does nothing but hand paths to the loop with `call_soon_threadsafe`: an
exception in a watchdog handler silently kills the observer thread. Created, moved (its
destination), modified and closed events all mean "this path may have changed"; no watcher
reports every creation exactly once, so periodic rescans back it up, and an inotify queue
overflow (which watchdog only logs) triggers a rescan too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from tokensettle.discovery import RUN_FILE
from tokensettle.usage_scope import SCOPE_FILE

log = structlog.get_logger("tokensettle.watcher")

WatchMode = Literal["auto", "inotify", "poll"]
#: Filesystems where inotify does not see other hosts' writes.
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "afs", "ceph", "glusterfs",
     "lustre", "gpfs", "vboxsf", "fuse.sshfs", "fuse.s3fs", "fuse.rclone"}
)  # fmt: skip

_INTERESTING = (FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileDeletedEvent)
#: What we subscribe to. watchdog builds the inotify mask from this, so opens and
#: no-write closes are not even queued by the kernel: our own scans open every directory,
#: and with them subscribed a big tree overflows the queue, which triggers a rescan, which
#: opens every directory again (measured: 130% CPU idle over 100,000 run directories).
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


def fs_type(path: Path, mounts_file: Path = Path("/proc/self/mounts")) -> str | None:
    """The filesystem type of the mount holding `path` (longest mount-point prefix)."""
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) > best[0]):
            best = (len(mount), parts[2])
    return best[1] if best else None


def choose_mode(mode: WatchMode, fstype: str | None) -> Literal["inotify", "poll"]:
    if mode != "auto":
        return mode
    if fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse.")):
        return "poll"
    return "inotify"


class _Handler(FileSystemEventHandler):
    def __init__(self, deliver: Callable[[str, Path], None]) -> None:
        self._deliver = deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._route(event)
        except Exception:  # a raise here would kill the observer thread
            log.exception("watcher.handler_failed")

    def _route(self, event: FileSystemEvent) -> None:
        # A move is a disappearance at its source and an appearance at its destination;
        # both matter, or a renamed run would leave a ghost at its old path.
        if isinstance(event, DirMovedEvent):
            self._deliver("gone", Path(os.fsdecode(event.src_path)))
            self._deliver("dir", Path(os.fsdecode(event.dest_path)))
        elif isinstance(event, DirDeletedEvent):
            self._deliver("gone", Path(os.fsdecode(event.src_path)))
        elif isinstance(event, DirCreatedEvent):
            self._deliver("dir", Path(os.fsdecode(event.src_path)))
        elif isinstance(event, FileMovedEvent):
            for kind, raw in (("file", event.src_path), ("complete", event.dest_path)):
                path = Path(os.fsdecode(raw))
                if path.name == RUN_FILE:
                    self._deliver(kind, path)
                elif path.name == SCOPE_FILE:
                    self._deliver("scope", path)
        elif isinstance(event, FileClosedEvent):
            # Closed after writing: an in-place writer is done, read it now rather than
            # after SETTLE_DELAY (its creation event found it empty).
            path = Path(os.fsdecode(event.src_path))
            if path.name == RUN_FILE:
                self._deliver("complete", path)
            elif path.name == SCOPE_FILE:
                self._deliver("scope", path)
        elif isinstance(event, _INTERESTING):
            path = Path(os.fsdecode(event.src_path))
            if path.name == RUN_FILE:
                self._deliver("file", path)
            elif path.name == SCOPE_FILE:
                # A run's declared scope (written before or after its metrics.json; a
                # lease links it into place, which gives a creation event only).
                self._deliver("scope", path)


class _OverflowHook(logging.Handler):
    """watchdog logs an inotify queue overflow but tells handlers nothing; listen to it."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._on_overflow()


@dataclass
class WatchedRoot:
    root: Path
    mode: Literal["inotify", "poll"]
    fstype: str | None


class Watcher:
    """Watches roots; calls `on_file(path)` (a run file may have changed or gone),
    `on_complete(path)` (a run file was just closed after writing, or renamed into
    place), `on_scope(path)` (a run's `usage_scope.json` appeared or changed),
    `on_dir(path)` (a directory appeared), `on_gone(path)` (a directory left) and
    `on_overflow()` on the loop."""

    def __init__(
        self,
        roots: Iterable[Path],
        *,
        mode: WatchMode,
        loop: asyncio.AbstractEventLoop,
        on_file: Callable[[Path], None],
        on_dir: Callable[[Path], None],
        on_overflow: Callable[[], None],
        on_gone: Callable[[Path], None],
        on_complete: Callable[[Path], None] | None = None,
        on_scope: Callable[[Path], None] | None = None,
        poll_interval: float = 10.0,
    ) -> None:
        self._loop = loop
        self._handlers = {
            "file": on_file,
            "complete": on_complete or on_file,
            "scope": on_scope or (lambda p: on_file(p.with_name(RUN_FILE))),
            "dir": on_dir,
            "gone": on_gone,
        }
        self._on_overflow = on_overflow
        self.roots = [WatchedRoot(r, choose_mode(mode, fs_type(r)), fs_type(r)) for r in roots]
        self._observers: list[BaseObserver] = []
        self._poll_interval = poll_interval
        self._hook = _OverflowHook(self._overflow_from_thread)

    def _call(self, fn: Callable[..., None], *args: Path) -> None:
        # RuntimeError: the loop is closing; the next start rescans anyway.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, kind: str, path: Path) -> None:
        self._call(self._handlers[kind], path)

    def _overflow_from_thread(self) -> None:
        self._call(self._on_overflow)

    def start(self) -> None:
        handler = _Handler(self._deliver)
        inotify: BaseObserver | None = None
        polling: BaseObserver | None = None
        for watched in self.roots:
            if watched.mode == "poll":
                polling = polling or PollingObserver(timeout=self._poll_interval)
                polling.schedule(
                    handler, str(watched.root), recursive=True, event_filter=EVENT_FILTER
                )
            else:
                inotify = inotify or Observer()
                inotify.schedule(
                    handler, str(watched.root), recursive=True, event_filter=EVENT_FILTER
                )
            log.info(
                "watcher.watching", root=str(watched.root), mode=watched.mode, fstype=watched.fstype
            )
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).addHandler(self._hook)
        self._observers = [o for o in (inotify, polling) if o is not None]
        for observer in self._observers:
            observer.daemon = True
            observer.start()

    def alive(self) -> bool:
        return all(o.is_alive() for o in self._observers)

    def stop(self) -> None:
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).removeHandler(self._hook)
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(timeout=5)
        self._observers = []

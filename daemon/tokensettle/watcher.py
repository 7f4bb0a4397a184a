"""A thin bridge from watchdog's thread to the asyncio loop.

The handler does nothing but hand paths to the loop with `call_soon_threadsafe`: an
exception in a watchdog handler silently kills the observer thread. Created, moved (its
destination), modified and closed events all mean "this path may have changed"; no watcher
reports every creation exactly once, so periodic rescans back it up, and an inotify queue
overflow triggers a rescan too.

On Linux (inotify roots) only the directories that can still change are watched: the
roots, every directory on the way to a run, and the run directories whose run is not
settled (`Tree`, on watchdog's `InotifyFD`, one reader thread for all watches). A
settled run's directory holds no watch; the periodic rescan notices it changing (a stat
each). Polled roots, and other platforms, keep watchdog's recursive watch of the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

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
from watchdog.utils import BaseThread, UnsupportedLibcError

try:  # Linux only: watchdog's inotify wrapper binds libc's inotify functions on import
    from watchdog.observers import inotify_c
except (ImportError, OSError, UnsupportedLibcError):  # not Linux, or libc lacks inotify
    inotify_c = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from watchdog.observers.inotify_c import CallbackId, InotifyEvent, InotifyFD, WatchDescriptor

    _Key = tuple[WatchDescriptor, CallbackId]

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


_RUN = os.fsencode(RUN_FILE)
_SCOPE = os.fsencode(SCOPE_FILE)


class Tree:
    """Inotify watches on chosen directories, on watchdog's `InotifyFD` (one reader thread).

    `watch(d)` (from any thread, before `d` is listed) and `unwatch(d)` say which
    directories are watched; a directory created or moved in under a watched one is
    watched by the reader thread before it is reported, so its caller's listing and the
    events between them miss nothing. A directory moved away loses its watches (and its
    subdirectories' watches): the inotify watch would follow the inode to its new name
    and report the old one. The `InotifyFD` protocol: `on_event`, `on_watch_deleted`
    (IN_IGNORED: the directory went), `on_queue_overflow`, all on the reader thread,
    which an exception would kill.
    """

    def __init__(
        self,
        deliver: Callable[[str, Path], None],
        on_overflow: Callable[[], None],
        fd: InotifyFD | None = None,
    ) -> None:
        c = inotify_c.InotifyConstants
        self._mask = inotify_c.Mask(
            c.IN_CREATE | c.IN_MOVE | c.IN_MODIFY | c.IN_ATTRIB | c.IN_CLOSE_WRITE | c.IN_DELETE
            | c.IN_DONT_FOLLOW | c.IN_ONLYDIR
        )  # fmt: skip
        self._isdir, self._create = c.IN_ISDIR, c.IN_CREATE
        self._moved_to, self._moved_from, self._delete = c.IN_MOVED_TO, c.IN_MOVED_FROM, c.IN_DELETE
        self._close_write = c.IN_CLOSE_WRITE
        # Its own instance, as watchdog's InotifyObserver does: one reader thread for all
        # of this tree's watches, stopped with it (a shared one outlives every user).
        self._fd = fd or inotify_c.InotifyFD()
        if not self._fd.is_alive():
            self._fd.start()
        #: one callback id per watch: the same directory met under a new name (moved,
        #: not yet reported) gets its own, so watchdog never sees an id twice on a watch
        self._ids = itertools.count(1)
        self._deliver = deliver
        self._on_overflow = on_overflow
        self._lock = threading.Lock()
        self._key_of: dict[bytes, _Key] = {}
        self._path_of: dict[WatchDescriptor, bytes] = {}
        #: watched directory -> its watched subdirectories (removal of a subtree is exact)
        self._kids: dict[bytes, set[bytes]] = {}
        self._active = True
        self.failed = 0

    # ------------------------------------------------------------------ which directories

    def watch(self, directory: str | bytes) -> bool:
        """Watch this directory (idempotent). False if it cannot be (gone, not a
        directory, or the watch limit reached: logged, and the rescan covers it)."""
        path = os.fsencode(directory).rstrip(b"/") or b"/"
        with self._lock:
            if not self._active:
                return False
            if path in self._key_of:
                return True
            key_id = inotify_c.CallbackId(next(self._ids))
            try:
                wd = self._fd.add_callback(path, self._mask, self, key_id)
            except OSError as exc:
                self.failed += 1
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("watcher.watch_failed", path=os.fsdecode(path), error=str(exc))
                return False
            stale = self._path_of.get(wd)
            if stale is not None:  # the same directory under a new name
                self._remove(stale)
            self._key_of[path] = (wd, key_id)
            self._path_of[wd] = path
            self._kids.setdefault(os.path.dirname(path), set()).add(path)
            return True

    def unwatch(self, directory: str | bytes) -> None:
        """Stop watching this directory and every watched directory under it."""
        path = os.fsencode(directory).rstrip(b"/") or b"/"
        with self._lock:
            self._remove(path)

    def count(self) -> int:
        with self._lock:
            return len(self._key_of)

    def watching(self, directory: str | bytes) -> bool:
        with self._lock:
            return os.fsencode(directory).rstrip(b"/") in self._key_of

    @property
    def reader(self) -> BaseThread:
        return self._fd

    def alive(self) -> bool:
        return self._fd.is_alive()

    def close(self) -> None:
        with self._lock:
            self._active = False
            keys = list(self._key_of.values())
            self._key_of.clear()
            self._path_of.clear()
            self._kids.clear()
        self._fd.remove_callbacks(keys)
        self._fd.stop()  # closes the inotify instance and wakes its reader
        self._fd.join(timeout=5)

    def _forget(self, path: bytes) -> list[_Key]:
        """Drop the book-keeping of `path` and its subtree (lock held); their keys."""
        keys: list[_Key] = []
        todo = [path]
        while todo:
            p = todo.pop()
            key = self._key_of.pop(p, None)
            if key is not None:
                keys.append(key)
                if self._path_of.get(key[0]) == p:
                    del self._path_of[key[0]]
            todo.extend(self._kids.pop(p, ()))
        siblings = self._kids.get(os.path.dirname(path))
        if siblings is not None:
            siblings.discard(path)
            if not siblings:
                del self._kids[os.path.dirname(path)]
        return keys

    def _remove(self, path: bytes) -> None:
        keys = self._forget(path)
        if keys:
            self._fd.remove_callbacks(keys)

    # ------------------------------------------------------------------ the reader thread

    def on_event(self, event: InotifyEvent) -> None:
        try:
            self._route(event)
        except Exception:  # a raise here would kill watchdog's reader thread
            log.exception("watcher.handler_failed")

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        with self._lock:  # watchdog has dropped the watch and its callbacks already
            path = self._path_of.get(wd)
            if path is not None and self._key_of[path][0] == wd:
                self._forget(path)

    def on_queue_overflow(self) -> None:
        log.warning("watcher.overflow", action="rescanning the roots")
        self._on_overflow()

    def _route(self, event: InotifyEvent) -> None:
        with self._lock:
            parent = self._path_of.get(event.wd)
        if parent is None or not event.name:
            return  # a watch just removed, or an event on the directory itself
        raw = os.path.join(parent, event.name)
        mask = event.mask
        if mask & self._isdir:
            if mask & (self._moved_from | self._delete):
                self.unwatch(raw)
                self._deliver("gone", Path(os.fsdecode(raw)))
            elif mask & (self._create | self._moved_to):
                # Watched before it is reported: the caller lists it next.
                self.watch(raw)
                self._deliver("dir", Path(os.fsdecode(raw)))
            return
        if event.name == _RUN:
            done = mask & (self._close_write | self._moved_to)
            self._deliver("complete" if done else "file", Path(os.fsdecode(raw)))
        elif event.name == _SCOPE:
            self._deliver("scope", Path(os.fsdecode(raw)))


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
        self.tree: Tree | None = None
        self._tree_roots: list[str] = []
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
        """Start watching. An inotify root is watched by itself only: the caller's scan
        watches each directory it lists (`watch`) and drops settled runs (`unwatch`)."""
        handler = _Handler(self._deliver)
        inotify: BaseObserver | None = None
        polling: BaseObserver | None = None
        for watched in self.roots:
            if watched.mode == "poll":
                polling = polling or PollingObserver(timeout=self._poll_interval)
                polling.schedule(
                    handler, str(watched.root), recursive=True, event_filter=EVENT_FILTER
                )
            elif inotify_c is not None:
                self.tree = self.tree or Tree(self._deliver, self._overflow_from_thread)
                self._tree_roots.append(str(watched.root).rstrip("/"))
                self.tree.watch(str(watched.root))
            else:
                inotify = inotify or Observer()
                inotify.schedule(
                    handler, str(watched.root), recursive=True, event_filter=EVENT_FILTER
                )
            log.info(
                "watcher.watching", root=str(watched.root), mode=watched.mode, fstype=watched.fstype
            )
        if inotify is not None or polling is not None:
            for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
                logging.getLogger(name).addHandler(self._hook)
        self._observers = [o for o in (inotify, polling) if o is not None]
        for observer in self._observers:
            observer.daemon = True
            observer.start()

    def _in_tree(self, directory: str) -> bool:
        return any(
            directory == root or directory.startswith(root + "/") for root in self._tree_roots
        )

    def watch(self, directory: str) -> None:
        """Watch this directory before listing it (thread-safe; a no-op where the root
        is watched recursively)."""
        if self.tree is not None and self._in_tree(directory):
            self.tree.watch(directory)

    def unwatch(self, directory: str) -> None:
        """A settled run's directory: its changes are the periodic rescan's to notice."""
        if self.tree is not None:
            self.tree.unwatch(directory)

    def watches(self) -> int | None:
        """Directories watched one by one (None: roots watched recursively only)."""
        return self.tree.count() if self.tree is not None else None

    def threads(self) -> list[BaseThread]:
        """watchdog's threads behind this watcher (an exception would end one)."""
        return [*self._observers, *([self.tree.reader] if self.tree is not None else [])]

    def alive(self) -> bool:
        tree_alive = self.tree is None or self.tree.alive()
        return tree_alive and all(o.is_alive() for o in self._observers)

    def stop(self) -> None:
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).removeHandler(self._hook)
        if self.tree is not None:
            self.tree.close()
            self.tree = None
        self._tree_roots = []
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(timeout=5)
        self._observers = []

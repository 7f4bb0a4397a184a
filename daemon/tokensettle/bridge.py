"""The watch bridge: watcher events in, "look at these paths" out, on the event loop.

The watcher's thread only hands paths over (`watcher.py`); here they are debounced per
path and gathered until the daemon's next step takes them. Nothing here reads a file.

* A plain event (created, modified, deleted, the source of a move) is handled at once
  the first time (leading edge) and folded into one more look once the path has been
  quiet for `SETTLE_DELAY` (trailing edge).
* A *complete* event (closed after writing, or renamed into place) is looked at at once,
  whatever the debounce says: the writer is done.
* The time of the last event tells the poll grid whether the tree is still busy (a copy
  or a restore under way), so a round can wait until it is quiet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokensettle.discovery import RUN_FILE
from tokensettle.scheduler import Debouncer
from tokensettle.watcher import Watcher, WatchMode


@dataclass
class Changes:
    """What happened since the last step."""

    files: set[Path] = field(default_factory=set)
    trailing: set[Path] = field(default_factory=set)
    #: run files whose declared scope (`usage_scope.json`) appeared or changed
    scopes: set[Path] = field(default_factory=set)
    dirs: set[Path] = field(default_factory=set)
    gone: set[Path] = field(default_factory=set)
    rescan: str | None = None

    def __bool__(self) -> bool:
        return bool(
            self.files or self.trailing or self.scopes or self.dirs or self.gone or self.rescan
        )


class WatchBridge:
    def __init__(
        self,
        roots: list[Path],
        *,
        settle_delay: float,
        mode: WatchMode = "auto",
        poll_interval: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roots = roots
        self.mode: WatchMode = mode
        self.poll_interval = poll_interval
        self.monotonic = monotonic
        self.debounce: Debouncer[Path] = Debouncer(settle_delay)
        self.wake = asyncio.Event()
        self.watcher: Watcher | None = None
        self.last_event = -float("inf")
        self._changes = Changes()

    # ------------------------------------------------------------------ events (loop)

    def _event(self) -> None:
        self.last_event = self.monotonic()
        self.wake.set()

    def on_file(self, path: Path) -> None:
        if self.debounce.touch(path, self.monotonic()):
            self._changes.files.add(path)
        self._event()

    def on_complete(self, path: Path) -> None:
        self.debounce.touch(path, self.monotonic())
        self._changes.files.add(path)
        self._event()

    def on_scope(self, path: Path) -> None:
        self._changes.scopes.add(path.with_name(RUN_FILE))
        self._event()

    def on_dir(self, path: Path) -> None:
        self._changes.dirs.add(path)
        self._event()

    def on_gone(self, directory: Path) -> None:
        self._changes.gone.add(directory)
        self._event()

    def on_overflow(self) -> None:
        self.request_rescan("overflow")

    def request_rescan(self, reason: str) -> None:
        if self._changes.rescan is None:
            self._changes.rescan = reason
        self.wake.set()

    def defer(self, path: Path) -> None:
        """Look at `path` again once it has been quiet (e.g. it was caught mid-write)."""
        self.debounce.defer(path, self.monotonic())

    # ------------------------------------------------------------------ the daemon's side

    def take(self) -> Changes:
        """Everything gathered so far, and the trailing looks that are due; clears both."""
        changes, self._changes = self._changes, Changes()
        changes.trailing.update(self.debounce.due(self.monotonic()))
        changes.trailing -= changes.files
        return changes

    def quiet_for(self) -> float:
        """Seconds since the last watcher event."""
        return self.monotonic() - self.last_event

    def next_deadline(self) -> float | None:
        """Monotonic time of the next trailing look, if any."""
        return self.debounce.next_deadline()

    # ------------------------------------------------------------------ the watcher

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching the roots (the start scan watches what is under them)."""
        self.watcher = Watcher(
            self.roots,
            mode=self.mode,
            loop=loop,
            on_file=self.on_file,
            on_complete=self.on_complete,
            on_scope=self.on_scope,
            on_dir=self.on_dir,
            on_overflow=self.on_overflow,
            on_gone=self.on_gone,
            poll_interval=self.poll_interval,
        )
        self.watcher.start()

    def watch(self, directory: str) -> None:
        """Watch a directory about to be listed (from any thread; see `Watcher.watch`)."""
        if self.watcher is not None:
            self.watcher.watch(directory)

    def unwatch(self, directory: str) -> None:
        """A settled run's directory needs no watch (see `Watcher.unwatch`)."""
        if self.watcher is not None:
            self.watcher.unwatch(directory)

    def watches(self) -> int | None:
        return self.watcher.watches() if self.watcher is not None else None

    def alive(self) -> bool:
        return self.watcher is not None and self.watcher.alive()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()

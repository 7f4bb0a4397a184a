"""What is wrong right now, for `/healthz`, `/metrics` and sd_notify. Pure: no clock reads.

A fault is raised by the room that meets it (a fetch, a write, the index, a revoke) under
a kind and a key (a run's path, an interval, "index"), and cleared when the same thing
succeeds. Kinds that a restart or a human must fix make the daemon `failing` (HTTP 503);
the others make it `degraded` (HTTP 200, so a liveness probe does not restart us for a
full disk) and say why, for as long as they last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Faults that make /healthz fail (503): we are not doing our job and cannot recover alone.
FAILING = frozenset({"auth", "watcher"})

WHAT = {
    "auth": "the admin key was refused",
    "watcher": "the file watcher stopped",
    "fetch": "Usage API requests are failing",
    "write": "run files cannot be written",
    "index": "running without the state index",
    "revoke": "leased keys cannot be revoked",
    "bill": "the bill check cannot read the costs",
    "http": "the status server is refusing connections",
}


@dataclass(frozen=True, slots=True)
class Fault:
    message: str
    since: datetime
    failures: int = 1


@dataclass
class Faults:
    _by_kind: dict[str, dict[str, Fault]] = field(default_factory=dict)

    def raise_(self, kind: str, key: str, message: str, now: datetime) -> Fault:
        """Record (or renew) a fault; returns it, with its consecutive failure count."""
        faults = self._by_kind.setdefault(kind, {})
        old = faults.get(key)
        fault = Fault(message, old.since if old else now, old.failures + 1 if old else 1)
        faults[key] = fault
        return fault

    def clear(self, kind: str, key: str | None = None) -> bool:
        """Clear one fault (or every fault of a kind); True if there was one."""
        faults = self._by_kind.get(kind)
        if not faults:
            return False
        if key is None:
            self._by_kind.pop(kind, None)
            return True
        found = faults.pop(key, None) is not None
        if not faults:
            self._by_kind.pop(kind, None)
        return found

    def get(self, kind: str, key: str) -> Fault | None:
        return self._by_kind.get(kind, {}).get(key)

    def count(self, kind: str) -> int:
        return len(self._by_kind.get(kind, {}))

    def kinds(self) -> dict[str, int]:
        return {kind: len(faults) for kind, faults in sorted(self._by_kind.items()) if faults}

    def problems(self) -> list[dict[str, Any]]:
        """One entry per kind: what, how many, since when, and the latest message."""
        out: list[dict[str, Any]] = []
        for kind, faults in sorted(self._by_kind.items()):
            if not faults:
                continue
            latest = max(faults.values(), key=lambda f: (f.since, f.failures))
            out.append(
                {
                    "kind": kind,
                    "what": WHAT.get(kind, kind),
                    "count": len(faults),
                    "since": min(f.since for f in faults.values()).isoformat(),
                    "message": latest.message,
                    "severity": "failing" if kind in FAILING else "degraded",
                }
            )
        return out


def status(faults: Faults, *, ready: bool) -> str:
    """`ok`, `degraded` or `failing`."""
    if not ready or any(kind in FAILING for kind in faults.kinds()):
        return "failing"
    return "degraded" if faults.kinds() else "ok"

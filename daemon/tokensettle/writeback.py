"""Writing an attempt back into its run file (and the runs manifest), safely.

Blocking I/O: callers run it in a worker thread. A failed write is a result, not an
exception: the caller decides when to try again (the daemon backs off like a failed
request), and nothing already in the file changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import structlog

from tokensettle.atomic import ConflictError, Snapshot, fsync_dir, rewrite
from tokensettle.manifest import ManifestUpdate, find_manifest, update_manifest
from tokensettle.runfile import (
    Patch,
    RunFileError,
    RunRecord,
    apply_patch,
    detect_style,
    load_document,
    parse_run,
    run_of_document,
)
from tokensettle.stability import Status, Verdict
from tokensettle.usage import Usage

log = structlog.get_logger("tokensettle.writeback")


@dataclass(frozen=True, slots=True)
class Written:
    """What a write did. `after` is the file as we left it (None: untouched)."""

    written: bool
    error: str | None = None
    after: Snapshot | None = None
    record: RunRecord | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


class RunWriter:
    """Patches run files through atomic compare-and-swap rewrites."""

    def __init__(
        self,
        grace: int,
        *,
        secrets: Sequence[str] = (),
        sync_dir: Callable[[Path], None] = fsync_dir,
    ) -> None:
        self.grace = grace
        self.secrets = [s for s in secrets if s]
        #: makes a swap durable (a seam: tests count the calls)
        self.sync_dir = sync_dir

    def write(
        self,
        record: RunRecord,
        patch: Patch,
        *,
        first: Snapshot | None = None,
        append_attempt: bool = True,
    ) -> Written:
        """Apply `patch` to the file's current content. Blocking."""

        def transform(raw: bytes) -> bytes | None:
            # The file may have been changed by its writer since we read it: re-read it,
            # and give up (the next pass sees the new content) if its window moved.
            try:
                doc = load_document(raw)
                current = run_of_document(doc, record.path, record.framework, self.grace)
            except RunFileError:
                return None
            if current.window != record.window:
                return None
            patched = apply_patch(doc, patch, current.steps, append_attempt, redact=self.secrets)
            return detect_style(raw, doc).dumps(patched)

        try:
            result = rewrite(
                record.path,
                transform,
                first=first,
                sync_dir=self.sync_dir if must_last(patch) else None,
            )
        except (ConflictError, OSError) as exc:
            error = getattr(exc, "strerror", None) or str(exc)
            if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in error:
                error = f"{exc.filename}: {error}"
            return Written(False, error)
        if not result.written:
            return Written(False)
        after: RunRecord | None
        try:
            parsed = parse_run(result.raw, record.path, record.framework, self.grace)
        except RunFileError:
            after = None
        else:
            # A declaration beside the file is not in these bytes; our write left it alone.
            after = replace(parsed, declared=record.declared)
        snapshot = _snapshot_of(record.path, result.raw)
        return Written(True, None, snapshot, after)

    def manifest(
        self, record: RunRecord, verdict: Verdict, usage: Usage | None, now: datetime
    ) -> None:
        """Record a settled run in the runs manifest beside the framework directories."""
        manifest = find_manifest(record.path)
        if manifest is None:
            return
        update = ManifestUpdate(
            run_id=record.run_id,
            framework=record.framework,
            status=verdict.status.value,
            tokens_in=usage.input_tokens if usage is not None else None,
            tokens_out=usage.output_tokens if usage is not None else None,
            now=now,
        )
        try:
            update_manifest(manifest, update)
        except (OSError, ValueError) as exc:
            log.warning("manifest.update_failed", path=str(manifest), error=str(exc))


def must_last(patch: Patch) -> bool:
    """Whether a write must survive a crash (temp fsync, swap, directory fsync). Only an
    attempt that leaves the run `pending` and changes no token field may skip the
    directory fsync: if a crash loses it, the file is as the previous attempt left it and
    the run is polled once more; it can never hold a wrong number (docs/decisions.md)."""
    return patch.verdict.writes_tokens or patch.verdict.status is not Status.PENDING


def _snapshot_of(path: Path, raw: bytes) -> Snapshot | None:
    """The snapshot of bytes we just wrote, keyed by the file's new inode and times."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return Snapshot(raw, st.st_ino, st.st_size, st.st_mtime_ns)

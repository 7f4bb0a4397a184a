"""The runs manifest (`runs/manifest.json`, older `runs/runs_manifest.json`), where present.

Several tokensettle processes may settle runs of one manifest at once, so updates hold a
lock file beside it and go through the same atomic compare-and-swap rewrite as run files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from tokensettle.atomic import read_snapshot, rewrite
from tokensettle.runfile import detect_style, iso

MANIFEST_NAMES = ("manifest.json", "runs_manifest.json")


@dataclass(frozen=True, slots=True)
class ManifestUpdate:
    run_id: str
    framework: str
    status: str
    tokens_in: int | None
    tokens_out: int | None
    now: datetime


def find_manifest(run_file: Path) -> Path | None:
    runs_root = run_file.parent.parent.parent
    for name in MANIFEST_NAMES:
        candidate = runs_root / name
        if candidate.is_file() and not candidate.is_symlink():
            return candidate
    return None


def patch_manifest(raw: bytes, update: ManifestUpdate) -> bytes | None:
    """Pure: the manifest with this run's entry updated, or None if it has no such entry."""
    doc: Any = json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        return None
    hit = False
    for entry in doc["runs"]:
        if not isinstance(entry, dict) or entry.get("run_id") != update.run_id:
            continue
        if entry.get("framework") not in (None, update.framework):
            continue
        entry["verification_status"] = update.status
        if update.tokens_in is not None and update.tokens_out is not None:
            entry["total_tokens_in"] = update.tokens_in
            entry["total_tokens_out"] = update.tokens_out
        hit = True
    if not hit:
        return None
    if "last_updated" in doc:
        doc["last_updated"] = iso(update.now).replace("+00:00", "Z")
    return detect_style(raw).dumps(doc)


def update_manifest(manifest: Path, update: ManifestUpdate, *, timeout: float = 30.0) -> bool:
    lock = FileLock(str(manifest.with_name(f".{manifest.name}.lock")), timeout=timeout)
    with lock:
        result = rewrite(
            manifest, lambda raw: patch_manifest(raw, update), first=read_snapshot(manifest)
        )
    return result.written

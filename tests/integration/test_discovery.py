"""Discovery on a real tree: whatever is not a regular run file is reported with one line,
never opened, never silently dropped."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokensettle.discovery import Found, found_at, run_entries, scan_all


@pytest.fixture
def bound_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "runs" / "baes" / "socket" / "metrics.json"
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        yield path


def _tree(root: Path, elsewhere: Path) -> dict[str, Path]:
    good = root / "baes" / "good" / "metrics.json"
    good.parent.mkdir(parents=True)
    good.write_text("{}")
    (root / "baes" / "dir-named" / "metrics.json").mkdir(parents=True)
    fifo = root / "baes" / "fifo" / "metrics.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    # A run directory and a framework directory that live elsewhere, linked in.
    (elsewhere / "run-x").mkdir(parents=True)
    (elsewhere / "run-x" / "metrics.json").write_text("{}")
    (elsewhere / "chatdev" / "run-y").mkdir(parents=True)
    (elsewhere / "chatdev" / "run-y" / "metrics.json").write_text("{}")
    (root / "baes" / "linked-run").symlink_to(elsewhere / "run-x")
    (root / "chatdev").symlink_to(elsewhere / "chatdev")
    return {
        "good": good,
        "dir-named": root / "baes" / "dir-named" / "metrics.json",
        "fifo": fifo,
        "linked-run": root / "baes" / "linked-run" / "metrics.json",
        "linked-framework": root / "chatdev",
    }


def test_every_unusable_entry_is_reported_with_one_line(tmp_path: Path, bound_socket: Path) -> None:
    root = tmp_path / "runs"
    paths = _tree(root, tmp_path / "elsewhere")
    paths["socket"] = bound_socket
    device = root / "baes" / "device" / "metrics.json"
    device.parent.mkdir()
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        paths["device"] = device
    except PermissionError:
        device.parent.rmdir()  # no CAP_MKNOD here; the other kinds still run

    found = {f.path: f for f in scan_all([root])}

    assert set(found) == set(paths.values())
    assert found[paths["good"]].skip_reason is None
    expected = {
        "dir-named": "is a directory, not a regular file",
        "fifo": "is a FIFO, not a regular file",
        "socket": "is a socket, not a regular file",
        "device": "is a character device, not a regular file",
        "linked-run": "symlinked run directory; not followed",
        "linked-framework": "symlinked directory; the runs under it are not followed",
    }
    for name, path in paths.items():
        if name == "good":
            continue
        reason = found[path].skip_reason
        assert reason is not None and expected[name] in reason, (name, reason)
        assert "\n" not in reason
    assert found[paths["linked-run"]].framework == "baes"
    assert found[paths["linked-framework"]].framework == "chatdev"
    # Nothing behind the links was entered.
    assert not any("run-y" in str(p) or "run-x" in str(p) for p in found)


def test_the_daemon_listing_still_yields_only_run_files(tmp_path: Path) -> None:
    # run_entries is the daemon's hot path over 100,000 directories: what it yields is
    # unchanged (regular and symlinked metrics.json); the rest goes to `skipped`.
    root = tmp_path / "runs"
    paths = _tree(root, tmp_path / "elsewhere")
    skipped: list[Found] = []
    yielded = [Path(e.path) for e in run_entries(root, skipped=skipped)]
    assert yielded == [paths["good"]]
    assert {f.path for f in skipped} == set(paths.values()) - {paths["good"]}


def test_found_at_gives_a_watched_path_its_reason(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    paths = _tree(root, tmp_path / "elsewhere")
    assert found_at(paths["good"], root).skip_reason is None
    fifo_reason = found_at(paths["fifo"], root).skip_reason
    assert fifo_reason is not None and "is a FIFO" in fifo_reason
    link = root / "baes" / "good-link" / "metrics.json"
    link.parent.mkdir()
    link.symlink_to(paths["good"])
    assert found_at(link, root).skip_reason == "is a symlink; not followed or written"

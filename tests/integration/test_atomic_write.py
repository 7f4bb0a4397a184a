"""The atomic rewrite on real files: a concurrent writer, FIFOs."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from tokensettle.atomic import ConflictError, UnsafeFileError, check_inside, read_snapshot, rewrite


def _add_field(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["settled"] = True
    return json.dumps(doc, indent=2).encode()


def test_concurrent_writer_change_is_kept_and_ours_applied_on_top(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"run_id": "r", "steps": []}, indent=2))
    snap = read_snapshot(path)
    writes = []

    def other_writer() -> None:
        # The experiment rewrites its file between our read and our replace, once.
        if not writes:
            writes.append(1)
            path.write_text(json.dumps({"run_id": "r", "steps": [], "late_field": 42}, indent=2))

    result = rewrite(path, _add_field, first=snap, before_replace=other_writer)
    assert result.written and result.retries == 1
    assert json.loads(path.read_text()) == {
        "run_id": "r",
        "steps": [],
        "late_field": 42,
        "settled": True,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_writer_that_never_stops_leaves_its_own_content(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    counter = iter(range(100))

    def busy_writer() -> None:
        path.write_text(json.dumps({"n": next(counter)}))

    with pytest.raises(ConflictError):
        rewrite(path, _add_field, max_retries=2, before_replace=busy_writer)
    assert "settled" not in json.loads(path.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_transform_declining_leaves_file_identical(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_bytes(b'{"a": 1}')
    st = os.stat(path)
    assert not rewrite(path, lambda raw: None).written
    assert path.read_bytes() == b'{"a": 1}' and os.stat(path).st_ino == st.st_ino


def test_symlinks_and_escapes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    (root / "fw" / "r").mkdir(parents=True)
    target = tmp_path / "target.json"
    target.write_text("{}")
    link = root / "fw" / "r" / "metrics.json"
    link.symlink_to(target)
    with pytest.raises(UnsafeFileError):
        check_inside(link, root)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):  # O_NOFOLLOW
        read_snapshot(link)
    with pytest.raises(UnsafeFileError):
        check_inside(target, root)


def _read_in_thread(path: Path) -> tuple[threading.Thread, list[BaseException | bytes]]:
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_snapshot(path).raw)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, outcome


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "metrics.json"
    os.mkfifo(fifo)
    thread, outcome = _read_in_thread(fifo)
    thread.join(timeout=10)
    blocked = thread.is_alive()
    if blocked:  # release the reader stuck in open(): a writer end appears
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(timeout=10)
    assert not blocked, "read_snapshot blocked on a FIFO"
    (error,) = outcome
    assert isinstance(error, UnsafeFileError)
    assert "is a FIFO, not a regular file" in str(error)


def test_a_directory_or_socket_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    import socket

    directory = tmp_path / "d" / "metrics.json"
    directory.mkdir(parents=True)
    with pytest.raises(UnsafeFileError, match="is a directory, not a regular file"):
        read_snapshot(directory)
    sock_path = tmp_path / "metrics.json"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(UnsafeFileError, match="is a socket, not a regular file"):
            read_snapshot(sock_path)

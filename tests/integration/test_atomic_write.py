"""The atomic rewrite on real files: a concurrent writer, read-only files, FIFOs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tokensettle import atomic
from tokensettle.atomic import ConflictError, UnsafeFileError, check_inside, read_snapshot, rewrite

BENCH = Path(__file__).resolve().parents[2] / "bench" / "concurrent_writer.py"
#: both swaps: renameat2(RENAME_EXCHANGE), and the compare-and-replace fallback
SWAPS = [pytest.param(True, id="exchange"), pytest.param(False, id="replace")]


@pytest.fixture
def exchange_works(tmp_path: Path) -> None:
    # (4bde81e has no exchange at all: there these tests show the update it lost.)
    supported = getattr(atomic, "exchange_supported", None)
    if supported is not None and not supported(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here: the fallback is in use")


def _add_field(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["settled"] = True
    return json.dumps(doc, indent=2).encode()


@pytest.mark.parametrize("use_exchange", SWAPS)
def test_concurrent_writer_change_is_kept_and_ours_applied_on_top(
    tmp_path: Path, use_exchange: bool
) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"run_id": "r", "steps": []}, indent=2))
    snap = read_snapshot(path)
    writes = []

    def other_writer() -> None:
        # The experiment rewrites its file between our read and our replace, once.
        if not writes:
            writes.append(1)
            path.write_text(json.dumps({"run_id": "r", "steps": [], "late_field": 42}, indent=2))

    result = rewrite(
        path, _add_field, first=snap, before_replace=other_writer, use_exchange=use_exchange
    )
    assert result.written and result.retries == 1
    assert json.loads(path.read_text()) == {
        "run_id": "r",
        "steps": [],
        "late_field": 42,
        "settled": True,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("use_exchange", SWAPS)
def test_writer_that_never_stops_leaves_its_own_content(tmp_path: Path, use_exchange: bool) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    counter = iter(range(100))

    def busy_writer() -> None:
        path.write_text(json.dumps({"n": next(counter)}))

    with pytest.raises(ConflictError):
        rewrite(
            path, _add_field, max_retries=2, before_replace=busy_writer, use_exchange=use_exchange
        )
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


# ---------------------------------------------------------------- a rename just before our swap


def _writer_version(path: Path, n: int) -> None:
    """The experiment's own temp-and-rename write of version `n`, from its own state."""
    tmp = path.with_name(f".writer-{n}.tmp")
    tmp.write_text(json.dumps({"run_id": "r", "writer": n}, indent=2))
    tmp.chmod(0o640)
    os.rename(tmp, path)  # not os.replace: that name is patched below


def _lands_first(real: Callable[..., Any], landings: Iterator[Callable[[], None]]) -> Any:
    """`real`, but each call first lets the next queued writer rename land (if any)."""

    def swap(*args: Any, **kwargs: Any) -> Any:
        landing = next(landings, None)
        if landing is not None:
            landing()
        return real(*args, **kwargs)

    return swap


def _land_just_before_the_swap(
    monkeypatch: pytest.MonkeyPatch, *landings: Callable[[], None]
) -> None:
    """Make the other writer's renames land in the last gap there is: after our check,
    immediately before the system call that swaps our file in (os.replace on 4bde81e and in
    the fallback, renameat2 via `atomic.exchange` on Linux)."""
    queue = iter(landings)
    monkeypatch.setattr(os, "replace", _lands_first(os.replace, queue))
    real_exchange = getattr(atomic, "exchange", None)
    if real_exchange is not None:
        monkeypatch.setattr(atomic, "exchange", _lands_first(real_exchange, queue))


@pytest.mark.usefixtures("exchange_works")
@pytest.mark.parametrize(
    "renames",
    [pytest.param(1, id="just-before-our-swap"), pytest.param(2, id="and-while-we-put-it-back")],
)
def test_a_rename_landing_just_before_our_swap_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renames: int
) -> None:
    # The harness lost 4 of 32,547 writer updates this way: bytes compared, then replaced.
    # Version 1 lands before our swap; version 2 (if any) while we swap version 1 back.
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"run_id": "r", "writer": 0}, indent=2))
    path.chmod(0o640)
    landings = [lambda n=n: _writer_version(path, n) for n in range(1, renames + 1)]
    _land_just_before_the_swap(monkeypatch, *landings)

    result = rewrite(path, _add_field)

    assert json.loads(path.read_text()) == {"run_id": "r", "writer": renames, "settled": True}
    assert result.written and result.retries == 1
    assert (path.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.mark.usefixtures("exchange_works")
def test_a_writer_faster_than_every_retry_keeps_its_newest_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A writer renaming a new version into every gap between our system calls: we give
    # up (ConflictError), and what stands is the writer's newest version, not ours.
    path = tmp_path / "metrics.json"
    _writer_version(path, 0)
    landed: list[int] = []

    def land() -> None:
        landed.append(len(landed) + 1)
        _writer_version(path, landed[-1])

    monkeypatch.setattr(atomic, "exchange", _lands_first(atomic.exchange, iter(lambda: land, None)))

    with pytest.raises(ConflictError):
        rewrite(path, _add_field, max_retries=2)

    assert json.loads(path.read_text()) == {"run_id": "r", "writer": landed[-1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.mark.usefixtures("exchange_works")
def test_a_real_writer_renaming_every_few_ms_loses_nothing(tmp_path: Path) -> None:
    # The benchmark's writer thread for 1.5 s (bench/README.md has the 60 s figures).
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--duration",
            "1.5",
            "--method",
            "exchange",
            "--dir",
            tmp_path,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    summary = json.loads(done.stdout)
    (trial,) = summary["trials"]
    assert trial["writer_updates"] >= 10 and trial["our_patches_written"] >= 10, trial
    assert summary["lost_writer_updates"] == {"exchange": 0}, trial
    assert trial["lost_seen_by_writer"] == 0 and trial["temp_files_left"] == []


# ---------------------------------------------------------------- files that are not ours to write


@pytest.mark.parametrize("mode", [0o444, 0o400, 0o440])
def test_a_read_only_file_is_refused_and_left_identical(tmp_path: Path, mode: int) -> None:
    # As root (or with a writable directory) a rename would replace it without a word.
    path = tmp_path / "metrics.json"
    path.write_bytes(b'{"a": 1}')
    path.chmod(mode)
    before = os.stat(path)

    with pytest.raises(UnsafeFileError, match="read-only") as caught:
        rewrite(path, _add_field)

    message = str(caught.value)
    assert "read-only" in message and "chmod u+w" in message and str(path) in message
    assert "\n" not in message
    after = os.stat(path)
    assert path.read_bytes() == b'{"a": 1}'
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_mode,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


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

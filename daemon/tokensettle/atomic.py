"""Safe reads and atomic compare-and-swap rewrites of files we do not own.

Read: only a regular file is opened, never blocking (O_NONBLOCK: a FIFO named
metrics.json must not freeze us), never through a symlink at the last component.

Write: same-directory temp file (O_EXCL, a dot-name the watcher ignores), write, fsync,
copy mode and owner, check that the original still holds the bytes we read (else hand
the new bytes to the caller's transform again), `os.replace`, fsync the directory. The
experiment that wrote the file does not take our locks, so this is optimistic
concurrency: it converges rather than excludes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Larger files are refused: a metrics.json is kilobytes; a huge one is a mistake or an attack.
MAX_FILE_BYTES = 16 * 1024 * 1024
TEMP_PREFIX = ".tokensettle-"
TEMP_SUFFIX = ".tmp"


class UnsafeFileError(OSError):
    """The path is a symlink, not a regular file, too large, or outside its root."""


class ConflictError(OSError):
    """Another writer kept changing the file; the rewrite was abandoned, file untouched."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    raw: bytes
    inode: int
    size: int
    mtime_ns: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO', ...: what a non-regular file is, for one-line reasons."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def check_inside(path: Path, root: Path) -> None:
    """Refuse symlinks anywhere below `root`, and paths that resolve outside it."""
    if path.is_symlink():
        raise UnsafeFileError(
            errno.ELOOP, "is a symlink; symlinked runs are never written", str(path)
        )
    resolved_root = root.resolve()
    try:
        path.resolve().relative_to(resolved_root)
    except ValueError:
        raise UnsafeFileError(errno.EXDEV, f"resolves outside the root {root}", str(path)) from None


def _not_regular(path: Path | str, mode: int) -> UnsafeFileError:
    return UnsafeFileError(
        errno.EINVAL, f"is {file_kind(mode)}, not a regular file; never opened", str(path)
    )


def read_snapshot(path: Path | str, max_bytes: int = MAX_FILE_BYTES) -> Snapshot:
    """Read a regular file without following a symlink at its last component and without
    ever blocking: anything but a regular file is refused before it is opened (a device's
    open can have effects), and O_NONBLOCK covers one swapped in between."""
    st = os.lstat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise _not_regular(path, st.st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if st.st_size > max_bytes:
            raise UnsafeFileError(
                errno.EFBIG,
                f"is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit for a run file",
                str(path),
            )
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(1 << 20, remaining))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        raw = b"".join(chunks)
        if len(raw) > max_bytes:
            raise UnsafeFileError(errno.EFBIG, "grew past the size limit while read", str(path))
        return Snapshot(raw, st.st_ino, st.st_size, st.st_mtime_ns)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes, like: os.stat_result) -> Path:
    tmp = path.with_name(
        f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.fchmod(fd, stat.S_IMODE(like.st_mode))
        if (like.st_uid, like.st_gid) != (os.getuid(), os.getgid()):
            # Keeping the owner needs privilege; without it, keep at least the group (allowed
            # when we are a member of it, as the service user is of the experiments' group).
            try:
                os.fchown(fd, like.st_uid, like.st_gid)
            except PermissionError:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, -1, like.st_gid)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


Transform = Callable[[bytes], bytes | None]
"""Given the file's current bytes, the bytes to write, or None to leave it alone."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    written: bool
    raw: bytes
    retries: int


def rewrite(
    path: Path,
    transform: Transform,
    *,
    first: Snapshot | None = None,
    max_retries: int = 3,
    before_replace: Callable[[], None] | None = None,
) -> WriteResult:
    """Atomically replace `path` with `transform(current bytes)`.

    If the file changes between our read and our replace, the new content is read and
    transformed again (up to `max_retries` times), so a concurrent writer's change is
    kept and ours is applied on top. `before_replace` is a test seam.
    """
    snap = first or read_snapshot(path)
    for attempt in range(max_retries + 1):
        new = transform(snap.raw)
        if new is None or new == snap.raw:
            return WriteResult(False, snap.raw, attempt)
        st = os.stat(path, follow_symlinks=False)
        tmp = _write_temp(path, new, st)
        try:
            if before_replace is not None:
                before_replace()
            current = read_snapshot(path)
            if current.raw != snap.raw:
                tmp.unlink(missing_ok=True)
                snap = current
                continue
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return WriteResult(True, new, attempt)
    raise ConflictError(
        errno.EAGAIN, f"changed by another writer {max_retries + 1} times in a row", str(path)
    )

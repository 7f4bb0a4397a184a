"""Safe reads and atomic rewrites of files we do not own.

Read: only a regular file is opened, never blocking (O_NONBLOCK: a FIFO named
metrics.json must not freeze us), never through a symlink at the last component.

Write: same-directory temp file (O_EXCL, a dot-name the watcher ignores), write, fsync,
copy mode and owner; check that the original still holds the bytes we read (else hand
the new bytes to the caller's transform again); then swap. On Linux the swap is
`renameat2(RENAME_EXCHANGE)`, which hands back the file it displaced: if that is not
exactly what we patched, another writer renamed its version in just before our swap, and
we put its version straight back (see `_install`). Elsewhere (or on a filesystem without
the flag) the swap is `os.replace`, which leaves a window of a few microseconds between
the check and the rename. Then fsync the directory. The experiment that wrote the file
does not take our locks, so this is optimistic concurrency: it converges rather than
excludes.

A write killed half-way leaves a temp file of our pattern behind; `stale_temps` and
`remove_stale_temps` find and remove those (never one whose write may still be running).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: Larger files are refused: a metrics.json is kilobytes; a huge one is a mistake or an attack.
MAX_FILE_BYTES = 16 * 1024 * 1024
TEMP_PREFIX = ".tokensettle-"
TEMP_SUFFIX = ".tmp"
#: `.tokensettle-<target name>.<pid>.<8 hex digits>.tmp`, exactly what `_write_temp` makes.
_TEMP_NAME = re.compile(r"\.tokensettle-(?P<target>.+)\.(?P<pid>[1-9][0-9]{0,9})\.[0-9a-f]{8}\.tmp")
#: A temp file younger than this (by ctime, which a rename also sets) is never removed: a
#: write lasts milliseconds, and a pid from another pid namespace (a container sharing the
#: volume) cannot be checked, so age is what protects such a write.
STALE_AFTER_SECONDS = 60.0
#: Older than this, a temp is removed whatever its pid says (the pid was reused).
ABANDONED_AFTER_SECONDS = 3600.0
#: Linux's PID_MAX_LIMIT; a bigger "pid" belongs to no process.
_PID_MAX = 1 << 22


class UnsafeFileError(OSError):
    """The path is a symlink, not a regular file, too large, read-only, or outside its root."""


class ReadOnlyError(UnsafeFileError):
    """The file has no write permission bit: its owner made it read-only; we never replace it."""


class ConflictError(OSError):
    """Another writer kept changing the file; the rewrite was abandoned, its content theirs."""


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
    """True for exactly the names of our temp files (not for any other dot-file)."""
    return name.startswith(TEMP_PREFIX) and _TEMP_NAME.fullmatch(name) is not None


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


def read_only_reason(mode: int) -> str | None:
    """Why a file with this mode is not ours to replace, or None when it may be written."""
    if mode & 0o222:
        return None
    return f"is read-only (mode {stat.S_IMODE(mode):04o}); chmod u+w to let tokensettle settle it"


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


def fsync_dir(directory: Path) -> None:
    """fsync a directory: what makes a rename in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ temp files we hold

#: Names of the temp files this process's writes hold right now (from before the temp is
#: created until it is gone), so a sweep never removes one of our own writes in flight.
_held: set[str] = set()
_held_lock = threading.Lock()


def _write_temp(path: Path, data: bytes, like: os.stat_result) -> Path:
    name = f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    tmp = path.with_name(name)
    with _held_lock:
        _held.add(name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except BaseException:
        _release(tmp)
        raise
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
        _discard(tmp)
        raise
    os.close(fd)
    return tmp


def _release(tmp: Path) -> None:
    with _held_lock:
        _held.discard(tmp.name)


def _discard(tmp: Path) -> None:
    """Remove a temp name of ours (whatever it holds now) and stop holding it. A name that
    cannot be removed is left to the stale-temp sweep rather than mask the real error."""
    try:
        with contextlib.suppress(OSError):
            tmp.unlink()
    finally:
        _release(tmp)


# ------------------------------------------------------------------ files of our own


def publish(path: Path, data: bytes, *, mode: int = 0o644, replace: bool = True) -> None:
    """Atomically make `path` hold `data`: temp file (a name the watcher ignores), fsync,
    then rename over `path` (`replace`) or link it into place only if `path` does not
    exist yet (else FileExistsError, nothing changed), then fsync the directory."""
    # _write_temp copies mode and owner from a stat of the file it replaces; a new file
    # takes `mode` and our own owner.
    like = os.stat_result((stat.S_IFREG | mode, 0, 0, 1, os.getuid(), os.getgid(), 0, 0, 0, 0))
    tmp = _write_temp(path, data, like)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            _link_exclusive(tmp, path)
    finally:
        _discard(tmp)
    fsync_dir(path.parent)


def _link_exclusive(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path, follow_symlinks=False)  # EEXIST when present: exclusive
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A filesystem without hard links (some FUSE and SMB mounts): check, then rename.
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists already", str(path)) from None
        os.replace(tmp, path)


# ------------------------------------------------------------------ the swap

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: errnos by which renameat2 says "not here": no such syscall, or a filesystem without
#: RENAME_EXCHANGE (EINVAL: flag not supported). Those fall back to os.replace.
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, some musl builds)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


class ExchangeUnsupported(OSError):
    """renameat2(RENAME_EXCHANGE) is not available for these paths."""


def exchange(a: Path, b: Path) -> None:
    """Atomically swap the names `a` and `b` (both must exist). Raises ExchangeUnsupported
    where the platform or filesystem cannot."""
    global _renameat2  # noqa: PLW0603 - a missing syscall is missing for the process
    fn = _renameat2
    if fn is None:
        raise ExchangeUnsupported(errno.ENOSYS, "renameat2(RENAME_EXCHANGE) is unavailable")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        _renameat2 = None
    if err in _UNSUPPORTED:
        raise ExchangeUnsupported(err, os.strerror(err), str(b))
    raise OSError(err, os.strerror(err), str(b))


def exchange_supported(directory: Path) -> bool:
    """Whether `rewrite` can swap with RENAME_EXCHANGE in `directory` (a probe with two
    temp files of ours, removed again)."""
    one = _write_temp(directory / "probe", b"", os.stat(directory))
    two = _write_temp(directory / "probe", b"", os.stat(directory))
    try:
        exchange(one, two)
    except ExchangeUnsupported:
        return False
    finally:
        _discard(one)
        _discard(two)
    return True


def _content(path: Path) -> bytes | None:
    try:
        return read_snapshot(path).raw
    except OSError:
        return None  # a symlink, directory or vanished file came out: not what we put in


#: Rounds of putting a concurrent writer's version back before giving up (each round is
#: two syscalls; only a writer renaming in every microsecond gap could exhaust them).
_PUT_BACK_ROUNDS = 16


def _install(tmp: Path, path: Path, base: bytes, new: bytes) -> bool:
    """Swap `tmp` (holding `new`, our patch of `base`) into place. True when installed;
    False when another writer's version had just been renamed in: it is back in place,
    and the caller reads it and patches again.

    Why nothing of the other writer is lost: the exchange is atomic and gives us the exact
    file it displaced. If that file's bytes are `base`, our patch of it is what now stands,
    and only `base` (already in it) leaves. Otherwise the other writer renamed version D in
    after our check; we swap D straight back (not after re-patching: an experiment that
    reads its own file must not see our stale patch for longer than two syscalls). That
    swap displaces either `new` (nobody wrote in between: D stands, untouched) or a still
    newer version X, which we swap back in the same way, until what comes out is what we
    had put in. A version only ever leaves the path through our hands when it is `base`
    or something we put there.
    """
    try:
        exchange(tmp, path)
    except ExchangeUnsupported:
        os.replace(tmp, path)
        return True
    came_out = _content(tmp)
    if came_out == base:
        return True
    put_in: bytes | None = came_out
    expected: bytes | None = new
    for _ in range(_PUT_BACK_ROUNDS):
        exchange(tmp, path)
        came_out = _content(tmp)
        if came_out == expected:
            return False
        put_in, expected = came_out, put_in
    # Hopeless: leave the newest version we saw in place with a plain rename.
    os.replace(tmp, path)
    return False


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
    use_exchange: bool = True,
    sync_dir: Callable[[Path], None] | None = fsync_dir,
) -> WriteResult:
    """Atomically replace `path` with `transform(current bytes)`.

    If the file changes between our read and our swap, the new content is read and
    transformed again (up to `max_retries` times), so a concurrent writer's change is
    kept and ours is applied on top. A read-only file (no write bit) is refused.
    `before_replace` is a test seam (after the temp is written, before the check);
    `use_exchange=False` forces the compare-and-replace used where renameat2 is missing.
    `sync_dir` makes the swap durable (the directory fsync); None leaves it to the
    filesystem: after a crash the file is then whole, either as it was or as we wrote it
    (the temp file is always fsynced before the swap), but it may be as it was.
    """
    snap = first or read_snapshot(path)
    for attempt in range(max_retries + 1):
        new = transform(snap.raw)
        if new is None or new == snap.raw:
            return WriteResult(False, snap.raw, attempt)
        st = os.stat(path, follow_symlinks=False)
        reason = read_only_reason(st.st_mode)
        if reason is not None:
            raise ReadOnlyError(errno.EACCES, reason, str(path))
        tmp = _write_temp(path, new, st)
        installed = False
        try:
            if before_replace is not None:
                before_replace()
            current = read_snapshot(path)
            if current.raw == snap.raw:
                if use_exchange:
                    installed = _install(tmp, path, snap.raw, new)
                else:
                    os.replace(tmp, path)
                    installed = True
        finally:
            _discard(tmp)  # what the exchange displaced, or our temp if it was not used
        if installed:
            if sync_dir is not None:
                sync_dir(path.parent)
            return WriteResult(True, new, attempt)
        snap = current if current.raw != snap.raw else read_snapshot(path)
    raise ConflictError(
        errno.EAGAIN, f"changed by another writer {max_retries + 1} times in a row", str(path)
    )


# ------------------------------------------------------------------ leftovers of killed writes


def _pid_running(pid: int) -> bool:
    if not 0 < pid <= _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def is_stale_temp(path: str | os.PathLike[str], *, now: float | None = None) -> bool:
    """Whether `path` is a temp file of ours that no write can still be using.

    Exactly our name pattern, a regular file (lstat), not held by a write of this process,
    at least `STALE_AFTER_SECONDS` old by ctime, and either its writer's pid is not running
    (or is ours: an earlier process with our pid, pid 1 in a restarted container), or it is
    older than `ABANDONED_AFTER_SECONDS` (the pid was reused by an unrelated process)."""
    name = os.path.basename(path)
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return False
    with _held_lock:
        if name in _held:
            return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    age = (time.time() if now is None else now) - st.st_ctime
    if age < STALE_AFTER_SECONDS:
        return False
    if age >= ABANDONED_AFTER_SECONDS:
        return True
    pid = int(match["pid"])
    return pid == os.getpid() or not _pid_running(pid)


@dataclass
class TempSweep:
    removed: list[Path] = field(default_factory=list)
    #: (path, one-line reason) for stale temps that could not be removed
    failed: list[tuple[Path, str]] = field(default_factory=list)


def remove_stale_temps(
    candidates: Iterable[str | os.PathLike[str]], *, now: float | None = None
) -> TempSweep:
    """Remove those of `candidates` (paths, e.g. the temps discovery saw while listing run
    directories) that `is_stale_temp` says no write is using. Cheap for paths that are
    not ours: a name match decides before any system call."""
    sweep = TempSweep()
    for candidate in candidates:
        if not is_stale_temp(candidate, now=now):
            continue
        path = Path(candidate)
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            sweep.failed.append((path, exc.strerror or str(exc)))
            continue
        sweep.removed.append(path)
    return sweep


def temps_under(directories: Iterable[Path], *, recursive: bool = True) -> list[str]:
    """Paths of our temp files in `directories` (and below them if `recursive`; symlinked
    and dot-directories are not entered)."""
    found: list[str] = []
    stack = [str(d) for d in directories]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if is_temp_name(entry.name):
                        found.append(entry.path)
                    elif (
                        recursive
                        and not entry.name.startswith(".")
                        and entry.is_dir(follow_symlinks=False)
                    ):
                        stack.append(entry.path)
        except OSError:
            continue
    return found


def sweep_stale_temps(
    directories: Iterable[Path], *, recursive: bool = True, now: float | None = None
) -> TempSweep:
    """Remove stale temps of ours under a tree (or in a list of run directories with
    `recursive=False`). The daemon gets the candidates from discovery's own listing
    instead (`discovery.run_entries(..., temps=...)`), so a rescan needs no second walk."""
    return remove_stale_temps(temps_under(directories, recursive=recursive), now=now)

from __future__ import annotations

from pathlib import Path

import pytest

from tokensettle.watcher import choose_mode, fs_type

MOUNTS = """\
overlay / overlay rw 0 0
/dev/sda1 /srv ext4 rw 0 0
server:/export /srv/experiments nfs4 rw 0 0
//nas/share /mnt/smb\\040share cifs rw 0 0
sshfs#me@h: /mnt/ssh fuse.sshfs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/srv/experiments/runs", "nfs4"),
        ("/srv/other", "ext4"),
        ("/srv", "ext4"),
        ("/srvx", "overlay"),  # a prefix of a mount point name is not inside it
        ("/mnt/smb share/runs", "cifs"),
        ("/mnt/ssh/x", "fuse.sshfs"),
    ],
)
def test_fs_type_is_the_longest_mount_prefix(tmp_path: Path, path: str, expected: str) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert fs_type(Path(path), mounts) == expected


@pytest.mark.parametrize(
    ("mode", "fstype", "chosen"),
    [
        ("auto", "ext4", "inotify"),
        ("auto", "overlay", "inotify"),
        ("auto", "nfs4", "poll"),
        ("auto", "cifs", "poll"),
        ("auto", "fuse.anything", "poll"),
        ("auto", None, "inotify"),
        ("inotify", "nfs4", "inotify"),  # an explicit choice wins
        ("poll", "ext4", "poll"),
    ],
)
def test_auto_polls_on_network_filesystems(mode: str, fstype: str | None, chosen: str) -> None:
    assert choose_mode(mode, fstype) == chosen  # type: ignore[arg-type]


def test_unreadable_mounts_file_means_unknown(tmp_path: Path) -> None:
    assert fs_type(tmp_path, tmp_path / "missing") is None

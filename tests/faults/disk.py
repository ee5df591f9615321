"""A real small file system for the full-disk faults: a tmpfs mounted where one output goes.

Sized to hold what is there plus a margin, the next write past it fails with ``ENOSPC``
exactly as on a full disk. Where mounting is refused (not root, no ``CAP_SYS_ADMIN``) the
fault falls back to a file-size limit on the stage process (``RLIMIT_FSIZE``: ``EFBIG``),
and says so in the test's output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


class SmallDisk:
    """A tmpfs at ``path`` (made empty), or the file-size-limit stand-in where mounts fail."""

    def __init__(self, path: Path, size: int):
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        mount = ["mount", "-t", "tmpfs", "-o", f"size={self._kib(size)}k", "tmpfs", str(path)]
        done = subprocess.run(mount, capture_output=True, text=True)
        self.mounted = done.returncode == 0
        self.limit: int | None = None  # the stand-in's file-size limit, once filled
        if not self.mounted:
            print(
                f"\ntmpfs mount refused ({done.stderr.strip() or done.returncode}): the disk "
                "is full by a file-size limit on the stage process instead (EFBIG, not ENOSPC)"
            )

    @staticmethod
    def _kib(size: int) -> int:
        return max(4, -(-size // 4096) * 4)  # whole pages

    def used(self) -> int:
        return shutil.disk_usage(self.path).used

    def leave_free(self, free: int, largest_file: int, files: int | None = None) -> None:
        """Only ``free`` bytes (and ``files`` new files) left on the tmpfs; for the stand-in,
        files capped below ``largest_file`` bytes."""
        if not self.mounted:
            self.limit = largest_file // 2
            return
        self.resize(self.used() + free)
        if files is not None:
            stats = os.statvfs(self.path)
            inodes = stats.f_files - stats.f_ffree + files
            subprocess.run(
                ["mount", "-o", f"remount,nr_inodes={inodes}", str(self.path)], check=True
            )

    def resize(self, size: int) -> None:
        """Give the file system ``size`` bytes and room for many files (tmpfs: remount; it
        may shrink down to what is used)."""
        if self.mounted:
            options = f"remount,size={self._kib(size)}k,nr_inodes=100000"
            subprocess.run(["mount", "-o", options, str(self.path)], check=True)
        else:
            self.limit = None

    def storage_error(
        self, doing: str, folder: Path, kept: str, inodes: bool = False
    ) -> re.Pattern[str]:
        """The stage's one line for this fault (``folder``: the one it names as full;
        ``inodes``: out of files, not bytes), the free space and the limit left open."""
        if not self.mounted:
            text = (
                f"file too large while {doing}; raise the file-size limit (ulimit -f, now "
                f"<n> per file), then rerun; {kept}"
            )
        elif inodes:
            text = (
                f"no inodes (room for new files) left on the device while {doing}; delete "
                f"files on the file system of {folder} or give it more inodes (<n> free now), "
                f"then rerun; {kept}"
            )
        else:
            text = (
                f"no space left on the device while {doing}; free space on the file system "
                f"of {folder} (<n> free now), then rerun; {kept}"
            )
        return re.compile(re.escape(text).replace(re.escape("<n>"), r"[0-9.]+ (bytes|KB|MB|GB)"))

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "--lazy", str(self.path)], check=False)
            self.mounted = False

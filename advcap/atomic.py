"""Atomic, durable file writes: the one helper every module that writes results uses.

A file is written under a temporary name beside its destination, flushed and fsynced, renamed over
the destination (atomic on POSIX file systems), and then the directory is fsynced so that the rename
itself survives a crash. A reader therefore sees either the old complete file or the new complete
file, never a prefix of one; a full disk or a kill leaves at most a `.<name>.tmp-*` file behind,
which `remove_stale_temporaries` clears.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

TEMP_MARK = ".tmp-"  # temporary files are `.<name>.tmp-<random>` beside their destination


def _file_mode() -> int:
    """The mode a plain `open(path, "w")` would give under this process's umask (mkstemp gives 0600, which
    would hide results from the rest of a group sharing a cluster file system)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file written by someone else (another rank, a library) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it is fsynced and renamed to `path`.

    On an exception the temporary file is removed and `path` is untouched. The caller writes the
    temporary path however it likes (a library's save function, for instance).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    os.fchmod(fd, _file_mode())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace `path` with `data`, atomically and durably."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Replace `path` with `text` (UTF-8), atomically and durably."""
    return write_bytes(path, text.encode("utf-8"))


def replace_dir(final: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Replace the folder `final` whole: `write(folder)` fills a new one beside it, which is fsynced and
    swapped in; an old `final` is removed only after. A kill leaves the old folder or the new one (and
    maybe a `.<name>.tmp-new` / `.<name>.old-prev` beside it, which the next call clears), or, between the
    two renames, only `.<name>.old-prev`, which the next call (or `recover_dir`) puts back."""
    import shutil

    final = Path(final)
    tmp, old = final.with_name(f".{final.name}{TEMP_MARK}new"), final.with_name(f".{final.name}.old-prev")
    recover_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    for folder in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
        fsync_dir(folder)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_dir(final: str | os.PathLike[str]) -> bool:
    """After a kill between the two renames of `replace_dir` (the old folder moved aside, the new one not yet
    in): put the old folder back. Returns whether it did."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old-prev")
    if final.exists() or not old.is_dir():
        return False
    old.rename(final)
    fsync_dir(final.parent)
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files that a killed writer left in `folder` (not recursive); returns them."""
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_MARK}*"):
        if tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed

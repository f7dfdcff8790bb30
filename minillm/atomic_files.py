"""Files of a run folder written so that nothing is ever half-written, and one line when they cannot be.

    atomic_write_bytes(path, write)  write(f) into ``path.tmp``, fsync, rename, fsync the folder; the
                                     temp file is removed on any failure
    write_run_file(path, data)       that, for a whole file (config.json, metrics.jsonl, summary.json,
                                     curves.png); CheckpointError, one line, when it cannot be written
    describe_write_error(path, e)    the line for an OSError: the folder, what is wrong (for a full disk
                                     the bytes needed and free), what to do
    blocking_file(path)              the file (if any) that stops ``path`` being made as a folder

No torch here: the checkpoint writer (minillm/checkpoint.py), the metrics log and the report share it.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from minillm.errors import CheckpointError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Write ``path`` through ``path.tmp``: write(f), fsync, rename, fsync the folder. On any failure
    the temp file is removed and the exception (OSError for a full disk, a read-only folder) goes on."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w+b") as f:  # w+: a checkpoint is read back for its checksum (_seal)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Delete a file or folder if it exists; a failure to (a read-only folder) is ignored."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def human_size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def free_bytes(folder: Path) -> int | None:
    """Free space where ``folder`` is (or its nearest existing parent); None if it cannot be read."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def describe_write_error(path: Path, e: OSError, needed: int | None = None) -> str:
    """One line (without the ending) for a failure to write ``path``: the folder, what is wrong and
    what to do; for a full disk, ``needed`` (bytes) and the space free there."""
    folder, name = Path(path).parent, Path(path).name
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        kind = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        free = free_bytes(folder)
        need = f"{human_size(needed)} needed" if needed is not None else "more space needed"
        have = f", {human_size(free)} free" if free is not None else ""
        return f"{folder}: {kind} to write {name} ({need}{have}); free space there"
    if e.errno == errno.EROFS:
        return f"{folder}: read-only file system, cannot write {name}; make it writable or choose another out_dir"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{folder}: permission denied writing {name}; make the folder writable or choose another out_dir"
    return f"{folder}: cannot write {name} ({e.strerror or e}); check that folder's disk"


def blocking_file(path: Path) -> Path | None:
    """The nearest of ``path`` and the folders above it that exists (a dangling link counts), when it is
    not a folder: what stops ``path`` from being made as a folder. None when nothing does."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def write_run_file(path: str | Path, data: bytes | str) -> None:
    """Write one file of a run folder (config.json, tokenizer.model, ...) atomically: temp file, fsync,
    rename. Raises CheckpointError, one line naming the folder (for a full disk, with the bytes it
    needed), when it cannot be written; no temp file is left and an earlier version of the file stays."""
    path, data = Path(path), data.encode() if isinstance(data, str) else bytes(data)
    try:
        atomic_write_bytes(path, lambda f: f.write(data))
    except OSError as e:
        raise CheckpointError(describe_write_error(path, e, len(data)) + ", then run again") from e

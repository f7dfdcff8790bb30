"""One run per folder, and runs only in run folders: an exclusive lock on ``<run>/run.lock``, held for
the whole life of the run, taken only in an empty folder or one that already holds a minillm run.

A run writes files of common names (config.json, metrics.jsonl, summary.json, tokenizer.model); an
out_dir that exists, is not empty and holds no minillm run (no ckpt/, no run.lock, no config.json
written by minillm) is refused in one line before anything in it is created or replaced.

Two runs writing one folder corrupt each other (one's start-up deletes the other's checkpoint temp
file, metrics interleave, config.json is the other's). The main process takes ``fcntl.flock`` on
run.lock before anything in the folder is touched and keeps the file open until the run ends. The
kernel releases the lock when the process dies, however it dies, so a killed run never blocks the
next one and no stale lock needs cleaning. run.lock holds "<pid> <host>" of the holder, only to name
it in the refusal. A forked child (the corpus encoder's pool) closes its copy of the descriptor at
once, so a child left behind by a killed run cannot keep holding the lock. Under torchrun, rank 0 decides and broadcasts the decision, so every rank of a
refused job exits with the same one line instead of waiting for rank 0. (flock over NFS is emulated
with byte-range locks on Linux: it holds across nodes where the server supports them.)
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from minillm.distributed import process_group as dist
from minillm.errors import RunError

LOCK_NAME = "run.lock"
_CONFIG_KEYS = {"out_dir", "model", "data", "tokenizer", "optim", "train"}  # a minillm config.json has these
_held: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    """After fork: the child drops its copies, so only this process's life bounds the lock's."""
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The exclusive lock of one run folder; ``acquire`` raises RunError when another process holds it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.created: list[Path] = []  # the folders acquire() created, the run folder first

    def acquire(self) -> "RunLock":
        self.created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
            raise RunError(f"out_dir={self.run_dir} is in use by another run ({who}); wait for it to end, "
                           "or choose another out_dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:  # a full disk: leave no empty lock file (and no folder this call made) behind
            self._fd = fd
            self.discard_if_alone()
            self._fd = None
            os.close(fd)
            raise
        self._fd = fd
        _held.add(fd)
        return self

    def discard_if_alone(self) -> None:
        """Remove the lock file, and the folders acquire() created, when the run folder holds nothing else
        (a run stopped on bad input before its first file); called while the lock is still held."""
        try:
            if [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                self.path.unlink()
                for folder in self.created:
                    folder.rmdir()
        except OSError:  # something appeared meanwhile, or no permission: leave the folder as it is
            pass

    def release(self) -> None:
        if self._fd is not None:
            _held.discard(self._fd)
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def is_run_folder(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a minillm run: ckpt/, run.lock, or a config.json minillm wrote."""
    d = Path(run_dir)
    if (d / "ckpt").is_dir() or (d / LOCK_NAME).is_file():
        return True
    try:
        config = json.loads((d / "config.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and _CONFIG_KEYS <= config.keys()


def check_run_folder(run_dir: str | Path) -> None:
    """Refuse (RunError) an out_dir that is a file, or a non-empty folder that holds no minillm run."""
    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise RunError(f"out_dir={d} is a file, not a folder; choose a folder for the run")
    if d.is_dir() and any(d.iterdir()) and not is_run_folder(d):
        raise RunError(f"out_dir={d} is not empty and holds no minillm run (no ckpt/, run.lock or minillm "
                       "config.json); choose a new or empty out_dir (nothing in it was changed)")


@contextlib.contextmanager
def hold_run_folder(run_dir: str | Path, info: dist.DistInfo) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body (a collective): rank 0 checks the folder and takes the lock,
    every rank learns whether it did, and every rank of a refused run raises the same RunError."""
    lock, refusal = None, ""
    if info.is_main:
        try:
            check_run_folder(run_dir)
            lock = RunLock(run_dir).acquire()
        except RunError as e:
            refusal = str(e)
        except OSError as e:
            refusal = (f"out_dir={run_dir}: cannot create its lock file {LOCK_NAME} ({e.strerror}); "
                       "choose a writable out_dir")
    refusal = dist.broadcast_object(refusal, info)
    if refusal:
        raise RunError(refusal)
    try:
        yield
    except BaseException:
        if lock is not None:
            lock.discard_if_alone()  # a run that failed before writing anything leaves no empty folder
        raise
    finally:
        if lock is not None:
            lock.release()

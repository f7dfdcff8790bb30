"""Checkpoints in a run folder: atomic save, a ``latest`` pointer, keep-last-k, careful load.

    <run>/ckpt/step_000600.pt   torch.save of a plain dict (see trainer.checkpoint_state)
    <run>/ckpt/latest           the file name of the newest complete checkpoint

A save writes ``.tmp``, fsyncs, renames, and only then moves ``latest``: a crash at any moment leaves
the previous checkpoint intact and ``latest`` pointing at a complete file.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CKPT_FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and says what to do."""


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ckpt"


def _fsync_dir(path: Path) -> None:
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


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint files in the run folder, oldest first."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep_last: int = 2) -> Path:
    """Write ``state`` as step_<step>.pt, point ``latest`` at it, delete all but the newest keep_last."""
    d = ckpt_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:06d}.pt"
    _atomic_write_bytes(path, lambda f: torch.save({"format_version": CKPT_FORMAT_VERSION, **state}, f))
    _atomic_write_bytes(d / "latest", lambda f: f.write(path.name.encode()))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    d = ckpt_dir(run_dir)
    pointer = d / "latest"
    if pointer.is_file():
        target = d / pointer.read_text().strip()
        if target.is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its latest checkpoint)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"{p}: no checkpoint in this folder (expected {ckpt_dir(p)}/step_*.pt)")
        return found
    raise CheckpointError(f"{p}: no such checkpoint file or run folder")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint; a truncated or foreign file is a CheckpointError naming it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); it is truncated or corrupt") from e
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a minillm checkpoint")
    if state["format_version"] != CKPT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state['format_version']}, this minillm reads "
                              f"{CKPT_FORMAT_VERSION}")
    return state

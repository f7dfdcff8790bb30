"""Checkpoints in a run folder: atomic save, a ``latest`` pointer, keep-last-k, careful load.

    <run>/ckpt/step_000600.pt   torch.save of a plain dict: the Trainer's components' state dicts by name
                                (model, optimizer, batches, guard, rng, train_state; see
                                Trainer.state_dict) plus config, tokenizer and world_size
    <run>/ckpt/step_000600/     a sharded (FSDP) checkpoint: model/ and optim/ written by every rank
                                through torch.distributed.checkpoint, meta.pt (the rest) by rank 0
    <run>/ckpt/step_000600/SHA256SUMS  the sha256 of every file of a sharded checkpoint (``sha256sum -c``)
    <run>/ckpt/latest           the name of the newest complete checkpoint

A save writes ``.tmp``, fsyncs, renames, and only then moves ``latest``: a crash at any moment leaves
the previous checkpoint intact and ``latest`` pointing at a complete one. Every checkpoint carries a
checksum, written before it is renamed into place and checked on every load, because torch.load does
not verify the zip's CRCs: a flipped bit in a tensor would otherwise load silently. A .pt file holds
its own, as the zip archive's comment (``minillm-sha256:<hex>``, the sha256 of every byte before the
hex), so the file stays one file that torch.load and zip tools read as before. A checkpoint without
one (written by an earlier minillm) loads unverified, with a warning. A ``latest`` that cannot be
read, or names no complete checkpoint, is ignored with a warning (the newest complete one is used). A sharded checkpoint is
written into ``step_N.tmp/`` and renamed after every rank has finished (DCP writes its .metadata
last), so a folder named ``step_N`` is always complete.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from minillm.errors import CheckpointError

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"  # a sharded checkpoint's checksums, inside its folder
CKPT_FORMAT_VERSION = 2  # 2: components by name; 1 (step, tokens_seen, sampler at the top) is upgraded on load
_NAME = re.compile(r"^step_(\d+)(\.pt)?$")


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
    with open(tmp, "w+b") as f:  # w+: a checkpoint is read back for its checksum (_seal)
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


_MARK = b"minillm-sha256:"  # a sealed .pt file ends with the zip comment _MARK + 64 hex digits
_EOCD = b"PK\x05\x06"      # the zip's end-of-central-directory record: its last 22 bytes, then the comment


def _seal(f) -> None:
    """Make the zip that torch.save just wrote to ``f`` end with the comment _MARK + sha256 (hex) of
    every byte before the hex (comment length included)."""
    f.seek(-22, os.SEEK_END)
    eocd = f.read(22)
    if eocd[:4] != _EOCD or eocd[20:] != b"\0\0":
        raise RuntimeError("torch.save did not end its zip with a comment-less end record")
    f.seek(-2, os.SEEK_END)
    f.write((len(_MARK) + 64).to_bytes(2, "little") + _MARK)
    f.flush()
    f.seek(0)
    digest = _sha256_of(f, os.fstat(f.fileno()).st_size)
    f.seek(0, os.SEEK_END)
    f.write(digest.encode())


def _sha256_of(f, n: int) -> str:
    """The sha256 of the next ``n`` bytes of ``f``."""
    h = hashlib.sha256()
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            break
        h.update(chunk)
        n -= len(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:  # not hashlib.file_digest: Python 3.11+, and minillm supports 3.10
        return _sha256_of(f, os.fstat(f.fileno()).st_size)


def _read_sums(path: Path) -> dict[str, str]:
    """{relative name: sha256} from a ``sha256sum``-format file; a line that does not parse is skipped."""
    out = {}
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name:
            out[name] = digest
    return out


_unverified_warned: set[str] = set()


def verify_checksum(path: Path) -> None:
    """Check a checkpoint (sealed .pt file, or sharded folder with SHA256SUMS) against the checksum
    written with it; a mismatch, or a listed file that is missing, is a CheckpointError naming the file.
    No checksum at all (an earlier minillm wrote it): warn once, go on."""
    path = Path(path)
    if path.is_dir():
        return _verify_folder(path)
    if not path.is_file():
        return  # the load names it
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - 64 - len(_MARK)))
        tail = f.read()
        if len(tail) < 64 + len(_MARK) or not tail.startswith(_MARK):
            return _warn_unverified(path)
        f.seek(0)
        actual, expected = _sha256_of(f, size - 64), tail[len(_MARK):].decode("ascii", "replace")
    if actual != expected:
        _mismatch(path, actual, expected)


def _verify_folder(path: Path) -> None:
    if not (path / SUMS).is_file():
        return _warn_unverified(path)
    expected = {"meta.pt": ""} | _read_sums(path / SUMS)  # a list without meta.pt verifies nothing that matters
    for name, digest in expected.items():
        actual = _sha256(path / name) if (path / name).is_file() else "missing"
        if actual != digest:
            _mismatch(path / name, actual, digest)


def _warn_unverified(path: Path) -> None:
    if str(path) not in _unverified_warned:
        _unverified_warned.add(str(path))
        log.warning("warning: %s has no checksum (written by an earlier minillm); loading it unverified", path)


def _mismatch(path: Path, actual: str, expected: str) -> None:
    raise CheckpointError(f"{path}: checksum mismatch (sha256 {actual[:16]}, recorded {expected[:16] or 'none'}); "
                          "the checkpoint is corrupt: use an earlier one of the run (ckpt/step_*)")


def step_of(path: Path) -> int:
    """The step in a checkpoint's name (step_000123.pt or step_000123/); -1 for other names."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else -1


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
    for stale in d.glob("*.tmp"):  # left by a save that was killed
        if stale.is_file():
            stale.unlink(missing_ok=True)
    path = d / f"step_{step:06d}.pt"
    _atomic_write_bytes(path, lambda f: _save_sealed({"format_version": CKPT_FORMAT_VERSION, **state}, f))
    _atomic_write_bytes(d / "latest", lambda f: f.write(path.name.encode()))
    _prune(run_dir, keep_last)
    return path


def _save_sealed(obj: dict, f) -> None:
    torch.save(obj, f)
    _seal(f)


def _prune(run_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def save_sharded_checkpoint(run_dir: str | Path, step: int, model, optimizer, meta: dict, keep_last: int,
                            is_main: bool, barrier) -> Path:
    """Every rank writes its shards of model and optimizer; rank 0 adds meta.pt, renames, moves latest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    d = ckpt_dir(run_dir)
    final, tmp = d / f"step_{step:06d}", d / f"step_{step:06d}.tmp"
    if is_main:
        d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
    barrier()
    dcp.save(get_model_state_dict(model), checkpoint_id=tmp / "model")
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=tmp / "optim")
    barrier()  # every shard is on disk
    if is_main:
        _atomic_write_bytes(tmp / "meta.pt", lambda f: _save_sealed({"format_version": CKPT_FORMAT_VERSION,
                                                                       "sharded": True, **meta}, f))
        _write_sums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(d)
        _atomic_write_bytes(d / "latest", lambda f: f.write(final.name.encode()))
        _prune(run_dir, keep_last)
    barrier()
    return final


def _write_sums(folder: Path) -> None:
    """SHA256SUMS of every file in a sharded checkpoint's folder (meta.pt and every shard)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS)
    lines = "".join(f"{_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    _atomic_write_bytes(folder / SUMS, lambda f: f.write(lines.encode()))


def load_sharded_into(path: Path, model, optimizer=None) -> None:
    """Load a sharded checkpoint's model (and optimizer) into a sharded model, any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    msd = get_model_state_dict(model)
    dcp.load(msd, checkpoint_id=path / "model")
    set_model_state_dict(model, msd)
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        dcp.load(osd, checkpoint_id=path / "optim")
        set_optimizer_state_dict(model, optimizer, osd)


def _full_model_state(path: Path) -> dict:
    """A sharded checkpoint's model as one plain state dict, in a single process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path / "model", Path(tmp) / "model.pt")
        return torch.load(Path(tmp) / "model.pt", map_location="cpu", weights_only=True)


def set_aside_newer(run_dir: str | Path, step: int) -> list[Path]:
    """Move checkpoints of steps after ``step`` (an abandoned future: a corrupt one that was skipped,
    or the rest of a run restarted from an earlier checkpoint) into ckpt/abandoned/, so that keep-last
    and ``latest`` only ever see the history being continued. Returns the new paths."""
    moved = []
    for p in list_checkpoints(run_dir):
        if int(_NAME.match(p.name).group(1)) > step:
            dest = ckpt_dir(run_dir) / "abandoned" / p.name
            dest.parent.mkdir(exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.replace(p, dest)
            log.warning("warning: moved %s (after the resume point, step %d) to %s", p.name, step, dest.parent)
            moved.append(dest)
    return moved


_pointer_warned: set[str] = set()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None. A pointer that cannot
    be read (not UTF-8, not a checkpoint's name, naming a missing one) is ignored with a warning."""
    d = ckpt_dir(run_dir)
    pointer = d / "latest"
    found = list_checkpoints(run_dir)
    if pointer.is_file():
        try:
            name = pointer.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        target = d / name
        if _NAME.match(name) and (target.is_file() or (target / "meta.pt").is_file()):
            return target
        if str(pointer) not in _pointer_warned:
            _pointer_warned.add(str(pointer))
            newest = found[-1].name if found else "none"
            log.warning("warning: %s does not name a complete checkpoint; ignoring it and using the newest "
                        "one (%s)", pointer, newest)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or sharded checkpoint folder, or a run folder (its latest checkpoint)."""
    p = Path(path).expanduser()
    if p.is_file() or (p / "meta.pt").is_file():
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"{p}: no checkpoint in this folder (expected {ckpt_dir(p)}/step_*.pt)")
        return found
    raise CheckpointError(f"{p}: no such checkpoint file or run folder")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", full_model: bool = True) -> dict:
    """Load and check a checkpoint; a truncated or foreign file is a CheckpointError naming it.

    For a sharded checkpoint the result is its meta.pt plus, if ``full_model``, the whole model state
    gathered into one dict (for sampling or a single-process resume).
    """
    path = Path(path)
    verify_checksum(path)
    if path.is_dir():
        state = _load_file(path / "meta.pt", map_location)
        if full_model:
            try:
                state["model"] = _full_model_state(path)
            except Exception as e:
                raise CheckpointError(f"{path}: the sharded model cannot be read ({type(e).__name__}: {e})") from e
            if state["config"]["model"].get("tie_embeddings") and "lm_head.weight" not in state["model"]:
                state["model"]["lm_head.weight"] = state["model"]["tok_emb.weight"]  # DCP stores it once
        return state
    return _load_file(path, map_location)


def _load_file(path: Path, map_location) -> dict:
    """torch.load of one checkpoint file (already verified), upgraded to the current format."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); it is truncated or corrupt") from e
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a minillm checkpoint")
    if state["format_version"] == 1:
        state = upgrade_v1(state)
    if state["format_version"] != CKPT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state['format_version']}, this minillm reads "
                              f"{CKPT_FORMAT_VERSION}")
    return state


def upgrade_v1(state: dict) -> dict:
    """A format-1 checkpoint (step, tokens_seen, best_val_loss and sampler at the top level) in format 2."""
    state = dict(state, format_version=2)
    counters = {k: state.pop(k) for k in ("step", "tokens_seen", "best_val_loss") if k in state}
    if counters:
        state["train_state"] = counters
    if "sampler" in state:
        state["batches"] = state.pop("sampler")
    optimizer = state.get("optimizer")
    if isinstance(optimizer, dict) and "muon" in optimizer:
        state["optimizer"] = dict(optimizer, muon=_upgrade_v1_muon(optimizer["muon"]))
    return state


def _upgrade_v1_muon(opt: dict) -> dict:
    """Format 1's hand-written Muon state as torch.optim.Muon's. Its momentum buffer was a sum,
    M <- mu M + G, where torch keeps an average, M <- mu M + (1 - mu) G: the same direction after
    Newton-Schulz's normalisation once scaled by (1 - mu). Its groups lack the keys torch adds, which
    held the values it used: the coefficients of Jordan et al. (2024), eps 1e-7, the sqrt(max(1, rows /
    cols)) lr scale (torch's adjust_lr_fn=None)."""
    groups = [dict(g, ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, adjust_lr_fn=None)
              for g in opt["param_groups"]]
    momentum = {i: g["momentum"] for g in groups for i in g["params"]}
    states = {i: dict(st, momentum_buffer=st["momentum_buffer"] * (1 - momentum[i])) if "momentum_buffer" in st
              else st for i, st in opt["state"].items()}
    return {"state": states, "param_groups": groups}

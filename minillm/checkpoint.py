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

A checkpoint newer than the one ``latest`` names (its save was cut off between the rename and the
pointer's update: a kill, a full disk) is used when its checksum verifies; one that does not verify is
passed over. ckpt/abandoned/ (checkpoints after a resume point, see set_aside_newer) keeps the newest
keep_last. A save that cannot write (disk full, read-only folder, quota) removes its temp file or
folder, leaves the previous checkpoint and ``latest`` as they were, and raises one CheckpointError
line naming the folder, what went wrong (for a full disk, the space the save needed) and what to do;
relaunching the same command then continues from the newest complete checkpoint.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from minillm.atomic_files import atomic_write_bytes as _atomic_write_bytes  # tests patch this name here
from minillm.atomic_files import describe_write_error, write_run_file  # noqa: F401  (re-exported)
from minillm.atomic_files import free_bytes as _free_bytes
from minillm.atomic_files import fsync_dir as _fsync_dir
from minillm.atomic_files import remove as _remove
from minillm.errors import CheckpointError

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"  # a sharded checkpoint's checksums, inside its folder
CKPT_FORMAT_VERSION = 2  # 2: components by name; 1 (step, tokens_seen, sampler at the top) is upgraded on load
_NAME = re.compile(r"^step_(\d+)(\.pt)?$")


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ckpt"


class _Recorder:
    """``f``'s write and flush, keeping the first OSError: torch.save turns a failed write into a
    RuntimeError ("unexpected pos ...") that has lost the errno (disk full? read-only?)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


class _Counter:
    """A sink that counts what torch.save writes: the size a checkpoint needs, without the disk."""

    def __init__(self):
        self.n = 0

    def write(self, b) -> int:
        self.n += len(memoryview(b).cast("B"))
        return len(memoryview(b).cast("B"))

    def flush(self) -> None:
        pass


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


def verify_checksum(path: Path, require: bool = False) -> None:
    """Check a checkpoint (sealed .pt file, or sharded folder with SHA256SUMS) against the checksum
    written with it; a mismatch, a listed file that is missing or a file that is not listed is a
    CheckpointError naming the file. No checksum at all (an earlier minillm wrote it): warn once and go
    on, or, with ``require``, a CheckpointError."""
    path = Path(path)
    if path.is_dir():
        return _verify_folder(path, require)
    if not path.is_file():
        return  # the load names it
    with open(path, "rb") as f:
        size, head = os.fstat(f.fileno()).st_size, f.read(4)
        if head != b"PK\x03\x04":  # what torch.save writes first (a zip's first local header)
            raise CheckpointError(f"{path}: not a checkpoint (torch.save writes a zip, which starts with "
                                  f"b'PK\\x03\\x04'; this file starts with {head!r}); give a run folder or a "
                                  "ckpt/step_N.pt file")
        f.seek(max(0, size - 64 - len(_MARK) - 22))
        tail = f.read()
        if not _is_sealed(tail):
            return _no_checksum(path, require)
        f.seek(0)
        actual, expected = _sha256_of(f, size - 64), tail[-64:].decode("ascii", "replace")
    if actual != expected:
        _mismatch(path, actual, expected)


def _is_sealed(tail: bytes) -> bool:
    """Whether a file's last 101 bytes are a sealed zip's end: the marker, or (the marker itself hit by
    a flipped bit) an end record whose comment is exactly marker + hex long."""
    n = len(_MARK) + 64
    if len(tail) < n + 22:
        return False
    return tail[22:22 + len(_MARK)] == _MARK or (tail[:4] == _EOCD and tail[20:22] == n.to_bytes(2, "little"))


def _verify_folder(path: Path, require: bool = False) -> None:
    if not (path / SUMS).is_file():
        return _no_checksum(path, require)
    listed = _read_sums(path / SUMS)
    expected = {"meta.pt": ""} | listed  # a list without meta.pt verifies nothing that matters
    for name, digest in expected.items():
        actual = _sha256(path / name) if (path / name).is_file() else "missing"
        if actual != digest:
            _mismatch(path / name, actual, digest)
    for p in path.rglob("*"):  # a line of the list hit by a flipped bit must not pass its file unchecked
        if p.is_file() and p.name != SUMS and p.relative_to(path).as_posix() not in listed:
            _mismatch(p, _sha256(p), "")


def _no_checksum(path: Path, require: bool) -> None:
    if require:
        raise CheckpointError(f"{path}: has no checksum, so it cannot be verified")
    _warn_unverified(path)


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
    """Write ``state`` as step_<step>.pt, point ``latest`` at it, delete all but the newest keep_last.

    Raises CheckpointError, one line (the folder, what is wrong, for a full disk the space the save
    needed, what to do), when it cannot write: no temp file is left, the previous checkpoint and
    ``latest`` stay as they were (a failure after the rename leaves the new, complete checkpoint too)."""
    d = ckpt_dir(run_dir)
    path = d / f"step_{step:06d}.pt"
    obj = {"format_version": CKPT_FORMAT_VERSION, **state}
    writing, needed = path, lambda: _sealed_size(obj)
    try:
        _clear_temps(d)
        _atomic_write_bytes(path, lambda f: _save_sealed(obj, f))
        writing, needed = d / "latest", lambda: len(path.name)
        _atomic_write_bytes(d / "latest", lambda f: f.write(path.name.encode()))
    except OSError as e:
        raise _save_error(writing, e, needed) from e
    _prune(run_dir, keep_last)
    return path


def _clear_temps(d: Path) -> None:
    """Create the ckpt folder; delete the temp files and folders a killed save left in it."""
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob("*.tmp"):
        _remove(stale)


def _save_sealed(obj: dict, f) -> None:
    rec = _Recorder(f)
    try:
        torch.save(obj, rec)
    except RuntimeError:
        if rec.error is not None:  # the disk's error, not torch's restatement of it
            raise rec.error from None
        raise
    _seal(f)


def _sealed_size(obj: dict) -> int:
    """The bytes a sealed checkpoint of ``obj`` takes (torch.save into a counter, plus the seal)."""
    counter = _Counter()
    torch.save(obj, counter)
    return counter.n + len(_MARK) + 64


def _nbytes(obj) -> int:
    """The bytes of every tensor in a (nested) state dict; a DTensor counts whole."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _save_error(path: Path, e: OSError, needed) -> CheckpointError:
    """The one line for a save of ``path`` that failed with ``e``: what, what to do, where the run
    continues. ``needed()`` (bytes) is asked for a full disk only."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        newest = _latest(path.parent.parent, warn=False)
        size = needed() if full else None
    except OSError:
        newest, size = None, None
    then = f"it continues from {newest.name} (intact)" if newest is not None else \
        "it starts from the beginning (no checkpoint was saved yet)"
    return CheckpointError(f"{describe_write_error(path, e, size)}, then relaunch the same command: {then}")


def _prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints, and all but the newest keep_last set aside."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        _remove(old)
    _prune_abandoned(run_dir, keep_last)


def _prune_abandoned(run_dir: str | Path, keep: int) -> None:
    d = ckpt_dir(run_dir) / "abandoned"
    if d.is_dir():
        found = sorted((step_of(p), p) for p in d.iterdir() if _NAME.match(p.name))
        for _, old in found[:-keep]:
            _remove(old)


def save_sharded_checkpoint(run_dir: str | Path, step: int, model, optimizer, meta: dict, keep_last: int,
                            is_main: bool, barrier) -> Path:
    """Every rank writes its shards of model and optimizer into step_N.tmp/; rank 0 adds meta.pt and
    SHA256SUMS, renames the folder to step_N, moves ``latest`` and prunes (a collective).

    Raises CheckpointError on every rank, the same line (see save_checkpoint), when any part cannot be
    written; the temp folder is removed, the previous checkpoint and ``latest`` stay."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    d = ckpt_dir(run_dir)
    final, tmp = d / f"step_{step:06d}", d / f"step_{step:06d}.tmp"
    _agreed(_attempt(lambda: _clear_temps(d), final, lambda: 0) if is_main else None)
    barrier()
    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)
    error = _attempt(lambda: (dcp.save(msd, checkpoint_id=tmp / "model"), dcp.save(osd, checkpoint_id=tmp / "optim")),
                     final, lambda: _nbytes(msd) + _nbytes(osd))
    barrier()  # every shard is on disk, or every rank knows the save failed
    if is_main and error:
        _remove(tmp)
    _agreed(error)
    obj = {"format_version": CKPT_FORMAT_VERSION, "sharded": True, **meta}
    if is_main:
        error = _attempt(lambda: _publish_sharded(tmp, final, obj), final, lambda: _sealed_size(obj)) or \
            _attempt(lambda: _atomic_write_bytes(d / "latest", lambda f: f.write(final.name.encode())), d / "latest",
                     lambda: len(final.name))
        if not error:
            _prune(run_dir, keep_last)
    _agreed(error if is_main else None)
    barrier()
    return final


def _publish_sharded(tmp: Path, final: Path, meta: dict) -> None:
    """Rank 0's part of a sharded save before ``latest``: meta.pt, SHA256SUMS, the rename."""
    try:
        _atomic_write_bytes(tmp / "meta.pt", lambda f: _save_sealed(meta, f))
        _write_sums(tmp)
        _remove(final)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(final.parent)


def _attempt(fn, path: Path, needed) -> str | None:
    """Run fn(); None if it worked, else the one line (_save_error) for the OSError behind its failure.
    A failure with no OSError behind it is a bug: it goes on."""
    try:
        fn()
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        os_error = next((x for x in _causes(e) if isinstance(x, OSError)), None)
        if os_error is None and any(_SHORT_WRITE in str(x) for x in _causes(e)):
            # DCP's torch.save of a small item into its stream: a failed write lost its errno on the way
            full = (_free_bytes(path.parent) or 0) < needed()
            os_error = OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC if full else errno.EIO))
        if os_error is None:
            raise
        return str(_save_error(path, os_error, needed))
    return None


_SHORT_WRITE = "unexpected pos"  # torch's zip writer, when a write of its stream came short


def _causes(e: BaseException):
    """``e``, its causes and contexts, and (DCP's CheckpointException) every rank's exception."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        failures = getattr(x, "failures", None)
        todo += [x.__cause__, x.__context__] + [f[0] for f in (failures.values() if isinstance(failures, dict) else ())]


def _agreed(error: str | None) -> None:
    """Raise CheckpointError on every rank when any rank has ``error`` (a collective under a process
    group; the lowest such rank's line is everyone's)."""
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        errors: list = [None] * tdist.get_world_size()
        tdist.all_gather_object(errors, error)
        error = next((x for x in errors if x), None)
    if error:
        raise CheckpointError(error)


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


def set_aside_newer(run_dir: str | Path, step: int, keep_last: int = 2) -> list[Path]:
    """Move checkpoints of steps after ``step`` (an abandoned future: a corrupt one that was skipped,
    or the rest of a run restarted from an earlier checkpoint) into ckpt/abandoned/, so that keep-last
    and ``latest`` only ever see the history being continued; abandoned/ keeps its newest keep_last.
    Returns the new paths."""
    moved = []
    for p in list_checkpoints(run_dir):
        if step_of(p) > step:
            dest = ckpt_dir(run_dir) / "abandoned" / p.name
            dest.parent.mkdir(exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.replace(p, dest)
            log.warning("warning: moved %s (after the resume point, step %d) to %s", p.name, step, dest.parent)
            moved.append(dest)
    _prune_abandoned(run_dir, keep_last)
    return [p for p in moved if p.exists()]


_pointer_warned: set[str] = set()
_newer_warned: set[str] = set()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to continue from: the one ``latest`` names or, newer than it, the newest complete
    one whose checksum verifies (its save was cut off before ``latest`` moved: a kill, a full disk);
    without a usable pointer, the newest complete one; None when there is none. A pointer that cannot
    be read (not UTF-8, not a checkpoint's name, naming a missing one) is ignored with a warning."""
    return _latest(run_dir, warn=True)


def _latest(run_dir: str | Path, warn: bool) -> Path | None:
    d, found = ckpt_dir(run_dir), list_checkpoints(run_dir)
    target = _pointer_target(d, found, warn)
    if target is None:
        return found[-1] if found else None
    for newer in reversed(found):
        if step_of(newer) <= step_of(target):
            break
        if _verifies(newer):
            if warn and str(newer) not in _newer_warned:
                _newer_warned.add(str(newer))
                log.warning("warning: %s is newer than %s, which %s names, and its checksum verifies (the "
                            "pointer's update was cut off); using it", newer.name, target.name, d / "latest")
            return newer
    return target


def _verifies(path: Path) -> bool:
    try:
        verify_checksum(path, require=True)
    except (CheckpointError, OSError):
        return False
    return True


def _pointer_target(d: Path, found: list[Path], warn: bool) -> Path | None:
    """The complete checkpoint ``d/latest`` names; None (with a warning) if it names none."""
    pointer = d / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    target = d / name
    if _NAME.match(name) and (target.is_file() or (target / "meta.pt").is_file()):
        return target
    if warn and str(pointer) not in _pointer_warned:
        _pointer_warned.add(str(pointer))
        newest = found[-1].name if found else "none"
        log.warning("warning: %s does not name a complete checkpoint; ignoring it and using the newest "
                    "one (%s)", pointer, newest)
    return None


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

"""Which checkpoint a run continues from, and whether it fits the run as configured now.

    train.resume=auto    the run folder's newest readable checkpoint (a corrupt newest one falls back
                         to the one before, with a warning); none: a fresh run
    train.resume=never   a fresh run; a folder that already holds checkpoints is refused
    train.resume=PATH    that checkpoint file or run folder, unless this run has already gone past it
                         (the same command relaunched, e.g. by torchrun --max-restarts) and its newer
                         checkpoint is readable; a corrupt PATH is one line

"Readable" includes the checksum written with every checkpoint (minillm/checkpoint.py).

Rank 0 chooses; the other ranks load the checkpoint it chose, never one of their own choosing.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig, TrainJobConfig
from minillm.distributed import process_group as dist
from minillm.errors import CheckpointError, RunError

log = logging.getLogger(__name__)


def load_resume_state(cfg: TrainJobConfig, run_dir: Path, info: dist.DistInfo,
                      full_model: bool = True) -> tuple[dict | None, Path | None]:
    """(checkpoint state, its path) to continue from, or (None, None) for a fresh run (a collective)."""
    if info.enabled and not info.is_main:
        chosen = dist.broadcast_object(None, info)
        return (ckpt.load_checkpoint(chosen, full_model=full_model), Path(chosen)) if chosen else (None, None)
    state, path = _choose_checkpoint(cfg, run_dir, full_model)
    if info.enabled:
        dist.broadcast_object(str(path) if path else "", info)
    return state, path


def _resume_candidates(cfg: TrainJobConfig, run_dir: Path) -> list[Path]:
    mode = cfg.train.resume
    if mode == "never":
        if ckpt.list_checkpoints(run_dir):
            raise RunError(f"out_dir={run_dir} already holds a run; choose a new out_dir (e.g. "
                           f"out_dir={suggest_out_dir(run_dir)}), or train.resume=auto to continue it "
                           "(nothing was overwritten)")
        return []
    latest = ckpt.latest_checkpoint(run_dir)
    if mode == "auto":
        older = [p for p in reversed(ckpt.list_checkpoints(run_dir)) if p != latest]
        return ([latest] if latest else []) + older
    start = ckpt.resolve_checkpoint(mode)
    if latest is not None and latest.resolve() != start.resolve() and ckpt.step_of(latest) > ckpt.step_of(start):
        return [latest, start]  # the run has moved on: its newer checkpoint, or PATH if that one is corrupt
    return [start]


def _choose_checkpoint(cfg: TrainJobConfig, run_dir: Path, full_model: bool) -> tuple[dict | None, Path | None]:
    candidates = _resume_candidates(cfg, run_dir)
    for i, path in enumerate(candidates):
        try:
            state = ckpt.load_checkpoint(path, full_model=full_model)
        except CheckpointError as e:
            if cfg.train.resume == "auto":
                nxt = candidates[i + 1].name if i + 1 < len(candidates) else "none left"
                log.warning("warning: %s; falling back to the previous checkpoint (%s)", e, nxt)
            elif i == len(candidates) - 1:
                raise  # train.resume=PATH itself is unusable
            else:  # the run's newer checkpoint is corrupt: PATH comes next
                log.warning("warning: %s; continuing from train.resume=%s instead", e, cfg.train.resume)
            continue
        if cfg.train.resume not in ("auto", "never") and i == 0 and len(candidates) > 1:
            log.warning("warning: %s holds a newer checkpoint (%s) than train.resume=%s; continuing from it",
                        run_dir, path.name, cfg.train.resume)
        elif i > 0 and cfg.train.resume == "auto":
            log.warning("warning: resuming from %s, the newest complete checkpoint", path)
        return state, path
    if candidates:
        raise RunError(f"out_dir={run_dir}: no checkpoint there can be read; move the folder aside or "
                       "use train.resume=never with a new out_dir")
    return None, None


def check_compatible(saved: dict, current: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint whose model differs from the configured one, naming the field (RunError)."""
    defaults = asdict(ModelConfig())  # a key added after the checkpoint was written has its default there
    for key, value in asdict(current).items():
        if key not in ("name", "dropout") and saved.get(key, defaults.get(key)) != value:  # dropout may change
            raise RunError(f"{where}: checkpoint has model.{key}={saved.get(key)!r} but the config says "
                           f"{value!r}; use the same model settings or a new out_dir")


def suggest_out_dir(out_dir: str | Path) -> str:
    """A free sibling of out_dir to suggest when it holds another run: out/a-tiny -> out/a-tiny-2 (or -3,
    ... whichever is free; out/a-tiny-2 -> out/a-tiny-3)."""
    path = Path(out_dir)
    stem, n = re.fullmatch(r"(.+?)(?:-(\d+))?", path.name).groups()
    k = int(n) + 1 if n else 2
    while path.with_name(f"{stem}-{k}").exists():
        k += 1
    return str(path.with_name(f"{stem}-{k}"))


def check_resumable(state: dict, where: Path, cfg: TrainJobConfig, tokenizer_proto: bytes,
                    info: dist.DistInfo, fsdp: bool) -> None:
    """Refuse (RunError) a checkpoint of another model, tokenizer or sharding; warn on a new world size."""
    check_compatible(state["config"]["model"], cfg.model, where)
    if bytes(state["tokenizer"].numpy().tobytes()) != tokenizer_proto:
        raise RunError(f"{where}: was trained with a different tokenizer than the tokenizer.* and data.* "
                       f"settings give now (another corpus?); to start a new run, pass "
                       f"out_dir={suggest_out_dir(cfg.out_dir)}, or use that run's settings to continue it")
    if state.get("world_size", 1) != info.world_size:
        log.warning("warning: %s was written by %d processes, now %d; the batch order changes from here",
                    where, state.get("world_size", 1), info.world_size)
    if bool(state.get("sharded")) != fsdp:
        kind, needs = ("sharded", "fsdp") if state.get("sharded") else ("full", "ddp")
        raise RunError(f"{where}: a {kind} checkpoint resumes only with train.parallel={needs} "
                       "(any checkpoint loads in sample.py)")


def check_same_optimizer(state: dict, where: Path, cfg: TrainJobConfig) -> None:
    """Refuse (RunError) to continue a run's optimizer state with another optimizer."""
    saved = state["config"].get("optim", {}).get("name", cfg.optim.name)
    if saved != cfg.optim.name:
        raise RunError(f"{where}: was trained with optim.name={saved}, the config says {cfg.optim.name}; "
                       f"resume with optim={saved}, or start from its weights with train.init_from and a new out_dir")

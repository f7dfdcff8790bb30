"""Rebuild a trained model and its tokenizer from a run folder (or one checkpoint file) alone."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint
from minillm.errors import CheckpointError
from minillm.config import ModelConfig
from minillm.model import GPT
from minillm.tokenizer import Tokenizer


@dataclass
class LoadedRun:
    model: GPT
    tokenizer: Tokenizer
    checkpoint: Path
    step: int
    config: dict


def newest_run(out_root: str | Path) -> Path:
    """The run folder under out_root whose latest checkpoint was written most recently."""
    root = Path(out_root)
    runs = [(ckpt.stat().st_mtime, d) for d in (root.iterdir() if root.is_dir() else [])
            if d.is_dir() and (ckpt := latest_checkpoint(d)) is not None]
    if not runs:
        raise CheckpointError(f"{root}: no run folder with a checkpoint; train one first "
                              "(python train.py) or pass ckpt=RUN_FOLDER")
    return max(runs)[1]


def load_run(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedRun:
    """Model (eval mode, on ``device``) and tokenizer from a run folder or checkpoint file."""
    ckpt_path = resolve_checkpoint(path)
    state = load_checkpoint(ckpt_path)
    missing = [k for k in ("model", "config", "tokenizer") if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt_path}: the checkpoint has no {' or '.join(missing)}, so it cannot be "
                              "sampled; use a run folder written by train.py")
    try:
        tok = Tokenizer(bytes(state["tokenizer"].numpy().tobytes()))
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_path}: the tokenizer stored in it is unreadable ({e})") from e
    cfg = ModelConfig(**state["config"]["model"])
    if cfg.vocab_size < tok.vocab_size:
        raise CheckpointError(f"{ckpt_path}: model vocabulary {cfg.vocab_size} < tokenizer's {tok.vocab_size}")
    model = GPT(cfg)
    model.load_state_dict(state["model"])
    model.to(device=device, dtype=dtype).eval()
    return LoadedRun(model, tok, ckpt_path, int(state["train_state"]["step"]), state["config"])

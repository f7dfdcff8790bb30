"""The training loop, as plain functions the entry point (train.py) calls with a validated config.

    train(cfg) = set up -> prepare data -> build model/optimizer -> maybe resume -> loop -> report

One step = grad_accum_steps micro-batches per process, then one optimizer update, unless a guard
skips it (NaN/inf, loss spike). Evaluation reports validation loss (nats per token) and bits per byte
of the raw text the predicted tokens cover. A checkpoint holds everything needed to continue
bit-for-bit: model, optimizer, step, tokens seen, sampler position, every RNG, guard history.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minillm import checkpoint as ckpt
from minillm import distributed as dist
from minillm import muon, ops
from minillm.config import ModelConfig, OptimConfig, TrainJobConfig
from minillm.data import prepare
from minillm.guards import NonFiniteError, StepGuard
from minillm.loop import TrainLoop
from minillm.model import GPT
from minillm.rng import rng_state, seed_everything, set_rng_state
from minillm.sampler import BatchSampler, eval_batches
from minillm.tokenizer import Tokenizer
from minillm.tokens import read_tokens

log = logging.getLogger(__name__)
__all__ = ["train", "RunError", "NonFiniteError", "lr_at", "build_optimizer", "evaluate"]


class RunError(RuntimeError):
    """The run cannot start as configured (existing run folder, incompatible checkpoint, ...)."""


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device):
    """AdamW; weight decay on matrices (linear and embedding weights) only, not on norms or biases.

    optim.name=muon: the blocks' 2-D weights go to Muon (minillm/muon.py), the rest to AdamW; both
    are stepped as one optimizer whose Muon groups carry lr_mult = muon_lr / lr.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" if cfg.fused is None else cfg.fused
    muon_params = muon.hidden_matrices(model) if cfg.name == "muon" else []
    taken = {id(p) for p in muon_params}
    rest = [p for p in params if id(p) not in taken]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              eps=cfg.eps, fused=fused)
    if not muon_params:
        return adamw
    ratio = cfg.muon_lr / cfg.lr if cfg.lr > 0 else 0.0
    opt = muon.Muon([{"params": muon_params, "lr_mult": ratio}], lr=cfg.muon_lr,
                    momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps)
    return muon.CombinedOptimizer({"adamw": adamw, "muon": opt})


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup over warmup_steps, then cosine/linear/constant decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1.0 - frac
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, token_bytes: torch.Tensor, batch_size: int,
             block_size: int, max_tokens: int | None, info: dist.DistInfo, amp) -> tuple[float, float]:
    """(mean loss in nats per token, bits per byte) over the validation tokens, summed over ranks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # nats, tokens, bytes
    for x, y in eval_batches(tokens, batch_size, block_size, max_tokens, info.rank, info.world_size):
        x, y = x.to(info.device), y.to(info.device)
        with amp:
            _, nll = model(x, y, reduction="none")
        valid = y >= 0
        sums[0] += nll[valid].double().sum()
        sums[1] += valid.sum()
        sums[2] += token_bytes[y[valid]].sum()
    dist.all_reduce_sum(sums, info)
    model.train()
    nats, count, nbytes = sums.tolist()
    return nats / max(count, 1), nats / math.log(2) / max(nbytes, 1)


def check_compatible(saved: dict, current: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint whose model differs from the configured one, naming the field."""
    defaults = asdict(ModelConfig())  # a key added after the checkpoint was written has its default there
    for key, value in asdict(current).items():
        if key != "name" and saved.get(key, defaults.get(key)) != value:
            raise RunError(f"{where}: checkpoint has model.{key}={saved.get(key)!r} but the config says "
                           f"{value!r}; use the same model settings or a new out_dir")


def _resume_candidates(cfg: TrainJobConfig, run_dir: Path) -> list[Path]:
    mode = cfg.train.resume
    if mode == "never":
        if ckpt.list_checkpoints(run_dir):
            raise RunError(f"out_dir={run_dir} already holds a run; choose a new out_dir, or train.resume=auto "
                           "to continue it (nothing was overwritten)")
        return []
    if mode == "auto":
        latest = ckpt.latest_checkpoint(run_dir)
        older = [p for p in reversed(ckpt.list_checkpoints(run_dir)) if p != latest]
        return ([latest] if latest else []) + older
    return [ckpt.resolve_checkpoint(mode)]


def load_resume_state(cfg: TrainJobConfig, run_dir: Path) -> tuple[dict | None, Path | None]:
    """The checkpoint to continue from: with resume=auto a corrupt newest one falls back to the next."""
    candidates = _resume_candidates(cfg, run_dir)
    for i, path in enumerate(candidates):
        try:
            state = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as e:
            if cfg.train.resume != "auto":
                raise
            nxt = candidates[i + 1].name if i + 1 < len(candidates) else "none left"
            log.warning("warning: %s; falling back to the previous checkpoint (%s)", e, nxt)
            continue
        if i > 0:
            log.warning("warning: resuming from %s, the newest complete checkpoint", path)
        return state, path
    if candidates:
        raise RunError(f"out_dir={run_dir}: no checkpoint there can be read; move the folder aside or "
                       "use train.resume=never with a new out_dir")
    return None, None


def checkpoint_state(model, optimizer, sampler, guard, step, tokens_seen, cfg, tok, best_val, world_size) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "tokens_seen": tokens_seen, "sampler": sampler.state_dict(), "guard": guard.state_dict(),
            "rng": rng_state(), "config": json.loads(json.dumps(asdict(cfg))), "world_size": world_size,
            "tokenizer": torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8), "best_val_loss": best_val}


def autocast_for(device: torch.device, dtype: str):
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def derive_grad_accum(global_batch_tokens: int, batch_size: int, block_size: int, world_size: int) -> int:
    """grad_accum_steps that makes batch_size * block_size * world_size * accum == global_batch_tokens."""
    per_micro = batch_size * block_size * world_size
    if global_batch_tokens % per_micro:
        raise RunError(f"train.global_batch_tokens={global_batch_tokens} is not a multiple of train.batch_size"
                       f" x model.block_size x world size = {batch_size} x {block_size} x {world_size} = "
                       f"{per_micro}; pick a multiple of {per_micro}")
    return global_batch_tokens // per_micro


def train(cfg: TrainJobConfig) -> dict:
    """Run training as configured; returns the run summary (also written to <out_dir>/summary.json)."""
    info = dist.setup(cfg.device, cfg.train.dist_timeout_s)
    try:
        if cfg.train.global_batch_tokens is not None:
            cfg.train.grad_accum_steps = derive_grad_accum(cfg.train.global_batch_tokens, cfg.train.batch_size,
                                                           cfg.model.block_size, info.world_size)
        if info.enabled:
            log.info("distributed: %d processes (%s), global batch %d sequences", info.world_size,
                     dist.backend_name(), cfg.train.batch_size * cfg.train.grad_accum_steps * info.world_size)
        return _train(cfg, info)
    finally:
        dist.teardown()


def _load_data(cfg: TrainJobConfig, info: dist.DistInfo):
    # Rank 0 prepares (tokenizer + token files); the others then find it in the cache.
    if info.is_main:
        prepared = prepare(cfg.data, cfg.tokenizer)
    dist.barrier(info)
    if not info.is_main:
        prepared = prepare(cfg.data, cfg.tokenizer)
    tok = Tokenizer.load(prepared.tokenizer)
    return prepared, tok, read_tokens(prepared.train, tok.vocab_size), read_tokens(prepared.val, tok.vocab_size)


def _train(cfg: TrainJobConfig, info: dist.DistInfo) -> dict:
    t_start = time.time()
    run_dir = Path(cfg.out_dir)
    seed_everything(cfg.seed)
    ops.configure(cfg.kernels, info.device)
    prepared, tok, train_tokens, val_tokens = _load_data(cfg, info)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise RunError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                       f"{tok.vocab_size}; raise it or leave it unset")

    state, resume_from = load_resume_state(cfg, run_dir)
    if state is not None:
        check_compatible(state["config"]["model"], cfg.model, resume_from)
        if state.get("world_size", 1) != info.world_size:
            log.warning("warning: %s was written by %d processes, now %d; the batch order changes from here",
                        resume_from, state.get("world_size", 1), info.world_size)
        if state["step"] >= cfg.train.max_steps:
            log.info("%s already finished at step %d (train.max_steps=%d); nothing to do", run_dir,
                     state["step"], cfg.train.max_steps)
            summary = run_dir / "summary.json"
            return json.loads(summary.read_text()) if summary.exists() else {"step": state["step"]}

    model = GPT(cfg.model).to(info.device)
    log.info("model: %s, %.2fM parameters (%.2fM non-embedding)", cfg.model.name,
             model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6)
    optimizer = build_optimizer(model, cfg.optim, info.device)
    sampler = BatchSampler(train_tokens, cfg.train.batch_size, cfg.model.block_size, cfg.seed,
                           info.rank, info.world_size)
    tc = cfg.train
    guard = StepGuard(tc.nan_policy, tc.max_skipped_steps, tc.spike_zscore, tc.spike_window)
    start = {"step": 0, "tokens_seen": 0, "best_val": float("inf")}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])  # its position counts windows across all ranks
        guard.load_state_dict(state["guard"])
        set_rng_state(state["rng"])
        start = {"step": state["step"], "tokens_seen": state["tokens_seen"], "best_val": state["best_val_loss"]}
        log.info("resuming from %s at step %d", resume_from, state["step"])

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tok.save(run_dir / "tokenizer.model")
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    amp = autocast_for(info.device, cfg.train.dtype)

    def save(step: int, tokens_seen: int, best_val: float) -> None:
        if info.is_main:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise NonFiniteError(f"step {step}: parameters are not finite; refusing to checkpoint them")
            ckpt.save_checkpoint(run_dir, step, checkpoint_state(
                model, optimizer, sampler, guard, step, tokens_seen, cfg, tok, best_val, info.world_size),
                tc.keep_last)
        dist.barrier(info)

    wrapped = torch.compile(model) if tc.compile else model
    if info.enabled:
        wrapped = DDP(wrapped, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    token_bytes = torch.from_numpy(tok.token_bytes()).to(info.device)
    loop = TrainLoop(cfg, info, model, wrapped, optimizer, sampler, guard, amp, run_dir,
                     lr_fn=lambda s: lr_at(s, cfg.optim, tc.max_steps),
                     eval_fn=lambda: evaluate(wrapped, val_tokens, token_bytes, tc.batch_size,
                                              cfg.model.block_size, tc.eval_tokens, info, amp),
                     save_fn=save)
    try:
        summary = loop.run(**start, t_start=t_start, resumed=state is not None)
        summary |= {"vocab_size": tok.vocab_size, "backend": ops.backend(), "val_bytes_per_token":
                    prepared.meta.get("val_bytes", 0) / max(1, prepared.meta.get("val_tokens", 1))}
        loop.finish(summary)
    finally:
        loop.close()
    return summary

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

from minillm import checkpoint as ckpt
from minillm import distributed as dist
from minillm import muon, ops
from minillm.config import ModelConfig, OptimConfig, TrainJobConfig
from minillm.data import prepare
from minillm.guards import NonFiniteError, StepGuard
from minillm.loop import TrainLoop
from minillm.model import GPT
from minillm.parallel import local, shard_fsdp, wrap_ddp
from minillm.rng import rng_state, seed_everything, set_rng_state
from minillm.sampler import BatchSampler, eval_batches
from minillm.tokenizer import Tokenizer
from minillm.tokens import read_tokens

log = logging.getLogger(__name__)
__all__ = ["train", "RunError", "NonFiniteError", "lr_at", "build_optimizer", "evaluate"]


class RunError(RuntimeError):
    """The run cannot start as configured (existing run folder, incompatible checkpoint, ...)."""


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device, fused_ok: bool = True):
    """AdamW; weight decay on matrices (linear and embedding weights) only, not on norms or biases.

    optim.name=muon: the blocks' 2-D weights go to Muon (minillm/muon.py), the rest to AdamW; both
    are stepped as one optimizer whose Muon groups carry lr_mult = muon_lr / lr.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = (device.type == "cuda" if cfg.fused is None else cfg.fused) and fused_ok
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
    if count == 0:
        return float("nan"), float("nan")
    return nats / count, nats / math.log(2) / max(nbytes, 1)


def check_compatible(saved: dict, current: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint whose model differs from the configured one, naming the field."""
    defaults = asdict(ModelConfig())  # a key added after the checkpoint was written has its default there
    for key, value in asdict(current).items():
        if key not in ("name", "dropout") and saved.get(key, defaults.get(key)) != value:  # dropout may change
            raise RunError(f"{where}: checkpoint has model.{key}={saved.get(key)!r} but the config says "
                           f"{value!r}; use the same model settings or a new out_dir")


def _resume_candidates(cfg: TrainJobConfig, run_dir: Path) -> list[Path]:
    mode = cfg.train.resume
    if mode == "never":
        if ckpt.list_checkpoints(run_dir):
            raise RunError(f"out_dir={run_dir} already holds a run; choose a new out_dir, or train.resume=auto "
                           "to continue it (nothing was overwritten)")
        return []
    latest = ckpt.latest_checkpoint(run_dir)
    if mode == "auto":
        older = [p for p in reversed(ckpt.list_checkpoints(run_dir)) if p != latest]
        return ([latest] if latest else []) + older
    start = ckpt.resolve_checkpoint(mode)
    if latest is not None and latest.resolve() != start.resolve() and ckpt.step_of(latest) > ckpt.step_of(start):
        # This run already went past PATH (the same command relaunched, e.g. by torchrun
        # --max-restarts): continue the run rather than throw its progress away.
        log.warning("warning: %s holds a newer checkpoint (%s) than train.resume=%s; continuing from it",
                    run_dir, latest.name, mode)
        return [latest]
    return [start]


def load_resume_state(cfg: TrainJobConfig, run_dir: Path, info: dist.DistInfo,
                      full_model: bool = True) -> tuple[dict | None, Path | None]:
    """The checkpoint to continue from: with resume=auto a corrupt newest one falls back to the next.

    Rank 0 chooses; the other ranks load the checkpoint it chose (never one of their own choosing).
    """
    if info.enabled and not info.is_main:
        chosen = dist.broadcast_object(None, info)
        return (ckpt.load_checkpoint(chosen, full_model=full_model), Path(chosen)) if chosen else (None, None)
    state, path = _choose_checkpoint(cfg, run_dir, full_model)
    if info.enabled:
        dist.broadcast_object(str(path) if path else "", info)
    return state, path


def _choose_checkpoint(cfg: TrainJobConfig, run_dir: Path, full_model: bool) -> tuple[dict | None, Path | None]:
    candidates = _resume_candidates(cfg, run_dir)
    for i, path in enumerate(candidates):
        try:
            state = ckpt.load_checkpoint(path, full_model=full_model)
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


def run_state(sampler, guard, step, tokens_seen, cfg, tok, best_val, info: dist.DistInfo) -> dict:
    """Everything in a checkpoint but the model and optimizer tensors (collective: every rank calls it)."""
    return {"step": step, "tokens_seen": tokens_seen, "sampler": sampler.state_dict(), "guard": guard.state_dict(),
            "rng": dist.all_gather_object(rng_state(), info),  # one entry per rank
            "config": json.loads(json.dumps(asdict(cfg))), "world_size": info.world_size,
            "tokenizer": torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8), "best_val_loss": best_val}


def autocast_for(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


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


def _load_data(cfg: TrainJobConfig, info: dist.DistInfo, tokenizer: Tokenizer | None):
    # Local rank 0 of each node prepares (so a node-local cache works on every node; concurrent
    # preparers on a shared cache are safe: each builds in a temporary folder, the first rename wins).
    if info.local_rank == 0:
        prepared = prepare(cfg.data, cfg.tokenizer, tokenizer=tokenizer)
    dist.barrier(info)
    if info.local_rank != 0:
        prepared = prepare(cfg.data, cfg.tokenizer, tokenizer=tokenizer)
    tok = Tokenizer.load(prepared.tokenizer)
    return prepared, tok, read_tokens(prepared.train, tok.vocab_size), read_tokens(prepared.val, tok.vocab_size)


def _train(cfg: TrainJobConfig, info: dist.DistInfo) -> dict:
    t_start = time.time()
    run_dir = Path(cfg.out_dir)
    seed_everything(cfg.seed)
    ops.configure(cfg.kernels, info.device)
    # Fine-tuning: the source run's weights and tokenizer (which also encodes the new corpus).
    source = ckpt.load_checkpoint(ckpt.resolve_checkpoint(cfg.train.init_from)) if cfg.train.init_from else None
    source_tok = Tokenizer(bytes(source["tokenizer"].numpy().tobytes())) if source is not None else None
    prepared, tok, train_tokens, val_tokens = _load_data(cfg, info, source_tok)
    if len(val_tokens) < 2:
        raise RunError(f"the validation split has {len(val_tokens)} tokens; it needs at least 2 "
                       "(a larger corpus or data.val_fraction)")
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise RunError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                       f"{tok.vocab_size}; raise it or leave it unset")

    tc = cfg.train
    fsdp = info.enabled and tc.parallel == "fsdp"
    state, resume_from = load_resume_state(cfg, run_dir, info, full_model=not fsdp)
    if state is not None:
        check_compatible(state["config"]["model"], cfg.model, resume_from)
        if bytes(state["tokenizer"].numpy().tobytes()) != tok.proto:
            raise RunError(f"{resume_from}: was trained with a different tokenizer than the tokenizer.* and "
                           "data.* settings give now; use the run's settings or a new out_dir")
        if state.get("world_size", 1) != info.world_size:
            log.warning("warning: %s was written by %d processes, now %d; the batch order changes from here",
                        resume_from, state.get("world_size", 1), info.world_size)
        if bool(state.get("sharded")) != fsdp:
            raise RunError(f"{resume_from}: a {'sharded' if state.get('sharded') else 'full'} checkpoint resumes "
                           f"only with train.parallel={'fsdp' if state.get('sharded') else 'ddp'} (any checkpoint "
                           "loads in sample.py)")
        if state["step"] >= tc.max_steps:
            log.info("%s already finished at step %d (train.max_steps=%d); nothing to do", run_dir,
                     state["step"], tc.max_steps)
            summary = run_dir / "summary.json"
            return json.loads(summary.read_text()) if summary.exists() else {"step": state["step"]}

    bf16 = tc.uses_bf16(info.device.type)
    model = GPT(cfg.model).to(info.device)   # the same initial weights on every rank (same seed)
    if source is not None and state is None:
        check_compatible(source["config"]["model"], cfg.model, Path(tc.init_from))
        model.load_state_dict(source["model"])
        log.info("fine-tuning from %s (step %d of that run): fresh optimizer and schedule",
                 tc.init_from, source["step"])
    torch.manual_seed(cfg.seed + info.rank)  # from here, each rank's own stream (dropout)
    log.info("model: %s, %.2fM parameters (%.2fM non-embedding)", cfg.model.name,
             model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6)
    if fsdp:
        shard_fsdp(model, info, bf16)
    if fsdp and cfg.optim.name == "muon":
        raise RunError("optim.name=muon with train.parallel=fsdp: Muon needs whole matrices, FSDP shards "
                       "them; use optim=adamw with FSDP, or train.parallel=ddp")
    optimizer = build_optimizer(model, cfg.optim, info.device, fused_ok=not fsdp)
    try:
        sampler = BatchSampler(train_tokens, tc.batch_size, cfg.model.block_size, cfg.seed, info.rank, info.world_size)
    except ValueError as e:
        raise RunError(str(e)) from e
    guard = StepGuard(tc.nan_policy, tc.max_skipped_steps, tc.spike_zscore, tc.spike_window)
    start = {"step": 0, "tokens_seen": 0, "best_val": float("inf")}
    if state is not None:
        if fsdp:
            ckpt.load_sharded_into(resume_from, model, optimizer)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])  # its position counts windows across all ranks
        guard.load_state_dict(state["guard"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        if info.is_main:
            ckpt.set_aside_newer(run_dir, state["step"])
        start = {"step": state["step"], "tokens_seen": state["tokens_seen"], "best_val": state["best_val_loss"]}
        log.info("resuming from %s at step %d", resume_from, state["step"])

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tok.save(run_dir / "tokenizer.model")
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    # FSDP's mixed-precision policy computes in bf16 itself; otherwise autocast does.
    amp = autocast_for(info.device, bf16 and not fsdp)

    def save(step: int, tokens_seen: int, best_val: float) -> None:
        finite = torch.tensor([float(all(torch.isfinite(local(p)).all() for p in model.parameters()))])
        if fsdp:  # each rank sees only its shards; all must agree before anyone raises
            finite = dist.all_reduce_sum(finite.to(info.device), info).cpu() / info.world_size
        if finite.item() < 1:
            raise NonFiniteError(f"step {step}: parameters are not finite; refusing to checkpoint them")
        meta = run_state(sampler, guard, step, tokens_seen, cfg, tok, best_val, info)
        if fsdp:
            ckpt.save_sharded_checkpoint(run_dir, step, model, optimizer, meta, tc.keep_last, info.is_main,
                                         lambda: dist.barrier(info))
            return
        if info.is_main:
            meta |= {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            ckpt.save_checkpoint(run_dir, step, meta, tc.keep_last)
        dist.barrier(info)

    compiled = torch.compile(model) if tc.compile else model
    wrapped = wrap_ddp(compiled, info) if info.enabled and not fsdp else compiled
    token_bytes = torch.from_numpy(tok.token_bytes()).to(info.device)
    loop = TrainLoop(cfg, info, model, wrapped, optimizer, sampler, guard, amp, run_dir,
                     lr_fn=lambda s: lr_at(s, cfg.optim, tc.max_steps),
                     # DDP needs nothing for evaluation (no gradients), so it runs on the bare model
                     eval_fn=lambda: evaluate(compiled, val_tokens, token_bytes, tc.batch_size,
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

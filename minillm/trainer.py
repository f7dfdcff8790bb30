"""The training loop, as plain functions the entry point (train.py) calls with a validated config.

    train(cfg) = set up -> prepare data -> build model/optimizer -> maybe resume -> loop -> report

One step = grad_accum_steps micro-batches per process, one optimizer update. Evaluation reports
validation loss (nats per token) and bits per byte of the raw text the predicted tokens cover.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minillm import checkpoint as ckpt
from minillm import distributed as dist
from minillm import ops
from minillm.config import ModelConfig, OptimConfig, TrainJobConfig
from minillm.data import prepare
from minillm.metrics import MetricsLogger, plot_run
from minillm.model import GPT
from minillm.sampler import BatchSampler, eval_batches
from minillm.tokenizer import Tokenizer
from minillm.tokens import read_tokens

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot start as configured (existing run folder, incompatible checkpoint, ...)."""


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linear and embedding weights) only, not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type == "cuda")


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


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_gauss": [int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_compatible(saved: dict, current: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint whose model differs from the configured one, naming the field."""
    for key, value in asdict(current).items():
        if key != "name" and saved.get(key) != value:
            raise RunError(f"{where}: checkpoint has model.{key}={saved.get(key)!r} but the config says "
                           f"{value!r}; use the same model settings or a new out_dir")


def find_resume(cfg: TrainJobConfig, run_dir: Path) -> Path | None:
    """Which checkpoint to resume from, per train.resume (auto | never | PATH)."""
    mode = cfg.train.resume
    if mode == "never":
        if ckpt.list_checkpoints(run_dir):
            raise RunError(f"out_dir={run_dir} already holds a run; choose a new out_dir, or train.resume=auto "
                           "to continue it (nothing was overwritten)")
        return None
    if mode == "auto":
        return ckpt.latest_checkpoint(run_dir)
    return ckpt.resolve_checkpoint(mode)


def checkpoint_state(model, optimizer, sampler, step, tokens_seen, cfg, tok, best_val) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "tokens_seen": tokens_seen, "sampler": sampler.state_dict(), "rng": rng_state(),
            "config": json.loads(json.dumps(asdict(cfg))), "tokenizer": torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8),
            "best_val_loss": best_val}


def _autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: TrainJobConfig) -> dict:
    """Run training as configured; returns the run summary (also written to <out_dir>/summary.json)."""
    info = dist.setup(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        dist.teardown()


def _train(cfg: TrainJobConfig, info: dist.DistInfo) -> dict:
    t_start = time.time()
    run_dir = Path(cfg.out_dir)
    seed_everything(cfg.seed)
    ops.configure(cfg.kernels, info.device)

    # Data: rank 0 prepares (tokenizer + token files), the others then find it cached.
    if info.is_main:
        prepared = prepare(cfg.data, cfg.tokenizer)
    dist.barrier(info)
    if not info.is_main:
        prepared = prepare(cfg.data, cfg.tokenizer)
    tok = Tokenizer.load(prepared.tokenizer)
    train_tokens = read_tokens(prepared.train, tok.vocab_size)
    val_tokens = read_tokens(prepared.val, tok.vocab_size)

    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise RunError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                       f"{tok.vocab_size}; raise it or leave it unset")

    resume_from = find_resume(cfg, run_dir)
    state = ckpt.load_checkpoint(resume_from) if resume_from is not None else None
    if state is not None:
        check_compatible(state["config"]["model"], cfg.model, resume_from)
        if state["step"] >= cfg.train.max_steps:
            log.info("%s already finished at step %d (train.max_steps=%d); nothing to do", run_dir,
                     state["step"], cfg.train.max_steps)
            summary_path = run_dir / "summary.json"
            return json.loads(summary_path.read_text()) if summary_path.exists() else {"step": state["step"]}

    model = GPT(cfg.model).to(info.device)
    if info.is_main:
        log.info("model: %s, %.2fM parameters (%.2fM non-embedding)", cfg.model.name,
                 model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6)
    optimizer = build_optimizer(model, cfg.optim, info.device)
    sampler = BatchSampler(train_tokens, cfg.train.batch_size, cfg.model.block_size, cfg.seed,
                           info.rank, info.world_size)
    step, tokens_seen, best_val = 0, 0, float("inf")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step, tokens_seen, best_val = state["step"], state["tokens_seen"], state.get("best_val_loss", best_val)
        if info.is_main:
            log.info("resuming from %s at step %d", resume_from, step)

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tok.save(run_dir / "tokenizer.model")
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    loop = _Loop(cfg, info, model, optimizer, sampler, tok, val_tokens, run_dir)
    return loop.run(step, tokens_seen, best_val, t_start, resumed=state is not None, prepared_meta=prepared.meta)


class _Loop:
    """The step loop and its bookkeeping (logging, evaluation, checkpoints)."""

    def __init__(self, cfg, info, model, optimizer, sampler, tok, val_tokens, run_dir):
        self.cfg, self.info, self.raw_model, self.optimizer = cfg, info, model, optimizer
        self.sampler, self.tok, self.val_tokens, self.run_dir = sampler, tok, val_tokens, run_dir
        self.model = torch.compile(model) if cfg.train.compile else model
        if info.enabled:
            self.model = DDP(self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.amp = _autocast(info.device, cfg.train.dtype)
        self.token_bytes = torch.from_numpy(tok.token_bytes()).to(info.device)
        self.tokens_per_step = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum_steps * info.world_size

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer update over grad_accum_steps micro-batches; returns (mean loss, grad norm)."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum_steps
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.info.device)
        for micro in range(accum):
            x, y = (t.to(self.info.device, non_blocking=True) for t in self.sampler.next_batch())
            sync = contextlib.nullcontext() if (not self.info.enabled or micro == accum - 1) else self.model.no_sync()
            with sync:
                with self.amp:
                    _, loss = self.model(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_mean = dist.all_reduce_sum(loss_sum / accum, self.info) / self.info.world_size
        return loss_mean.item(), grad_norm.item()

    def evaluate(self) -> tuple[float, float]:
        c = self.cfg
        return evaluate(self.model, self.val_tokens, self.token_bytes, c.train.batch_size, c.model.block_size,
                        c.train.eval_tokens, self.info, self.amp)

    def save(self, step, tokens_seen, best_val) -> None:
        if self.info.is_main:
            state = checkpoint_state(self.raw_model, self.optimizer, self.sampler, step, tokens_seen,
                                     self.cfg, self.tok, best_val)
            path = ckpt.save_checkpoint(self.run_dir, step, state, self.cfg.train.keep_last)
            log.debug("saved %s", path)
        dist.barrier(self.info)

    def run(self, step, tokens_seen, best_val, t_start, resumed, prepared_meta) -> dict:
        cfg, info, tc = self.cfg, self.info, self.cfg.train
        metrics = MetricsLogger(self.run_dir, cfg.logger.wandb, asdict(cfg), step if resumed else None) if info.is_main else None
        bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True,
                   disable=not (info.is_main and cfg.logger.progress))
        last_val = (float("nan"), float("nan"))
        t_log, tokens_at_log = time.time(), tokens_seen
        try:
            while step < tc.max_steps:
                loss, gnorm = self.train_step(step)
                step += 1
                tokens_seen += self.tokens_per_step
                bar.update(1)
                record = None
                if step % tc.log_interval == 0 or step == tc.max_steps:
                    now = time.time()
                    tps = (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
                    record = {"step": step, "train_loss": loss, "lr": lr_at(step - 1, cfg.optim, tc.max_steps),
                              "grad_norm": gnorm, "tokens": tokens_seen, "tokens_per_sec": tps,
                              "elapsed_s": round(now - t_start, 3)}
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tps:,.0f}")
                is_eval = step == tc.max_steps or (tc.eval_interval > 0 and step % tc.eval_interval == 0)
                if is_eval:
                    last_val = self.evaluate()
                    best_val = min(best_val, last_val[0])
                    record = record or {"step": step, "train_loss": loss, "tokens": tokens_seen,
                                        "elapsed_s": round(time.time() - t_start, 3)}
                    record.update(val_loss=last_val[0], val_bpb=last_val[1])
                    if info.is_main:
                        bar.write(f"step {step}: train loss {loss:.4f}, val loss {last_val[0]:.4f}, "
                                  f"val bpb {last_val[1]:.4f}")
                if metrics is not None and record is not None:
                    metrics.log(record)
                ckpt_every = tc.ckpt_interval
                if step == tc.max_steps or (ckpt_every and step % ckpt_every == 0) or (ckpt_every is None and is_eval):
                    self.save(step, tokens_seen, best_val)
                if record is not None:  # restart the throughput window: it counts training time only
                    t_log, tokens_at_log = time.time(), tokens_seen
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return self.report(step, tokens_seen, best_val, last_val, t_start, prepared_meta)

    def report(self, step, tokens_seen, best_val, last_val, t_start, prepared_meta) -> dict:
        summary = {"step": step, "tokens": tokens_seen, "final_val_loss": last_val[0], "final_val_bpb": last_val[1],
                   "best_val_loss": best_val, "wall_s": round(time.time() - t_start, 2),
                   "params": self.raw_model.num_params(), "vocab_size": self.tok.vocab_size,
                   "val_bytes_per_token": prepared_meta.get("val_bytes", 0) / max(1, prepared_meta.get("val_tokens", 1)),
                   "backend": ops.backend(), "device": str(self.info.device), "world_size": self.info.world_size}
        if self.info.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_run(self.run_dir)
            log.info("done: step %d, val loss %.4f, val bpb %.4f, %.1fs; run folder %s", step, last_val[0],
                     last_val[1], summary["wall_s"], self.run_dir)
        return summary

"""The Trainer: one object that owns a run, from a validated config to the run's summary.

    train(cfg) = join the process group -> lock the run folder (minillm/run_lock.py) -> Trainer(cfg, info)
                 -> trainer.fit() -> unlock -> leave the group

``Trainer(cfg, info)`` builds the data (tokenizer + token files), then the components of the run:

    model        GPT (minillm/model.py), DDP- or FSDP-wrapped from outside for several processes
    optimizer    AdamW, or Muon + AdamW (minillm/optimizer.py)
    batches      the training batch source (minillm/data/batches.py): seed, epoch, position
    guard        the StepGuard (minillm/guards.py): skipped-step counts, loss / grad-norm windows
    rng          every rank's generators (minillm/rng.py)
    train_state  step, tokens seen, best validation loss (minillm/train_state.py)

Each has ``state_dict()`` / ``load_state_dict()``; a checkpoint is exactly those dicts by name
(``Trainer.state_dict``), plus the config, tokenizer and world size that identify the run, so a
resumed run continues bit for bit. ``train.resume`` chooses the checkpoint (minillm/resume.py).

One step (``train_step``): grad_accum_steps micro-batches per process, each loss divided by
grad_accum_steps before backward -> the total gradient norm, clipped to optim.grad_clip -> the guard
-> optimizer.step(), or no update when the guard rejects the step (NaN/inf, loss spike; the step is
counted and recorded). ``fit()`` repeats it to max_steps (train.max_steps, or with train.time_budget_s
planned as the run goes: minillm/time_budget.py, a checkpointed component too), logging, evaluating, checkpointing
and stopping cleanly on SIGTERM/SIGINT; at the end it writes summary.json and curves.png (also when
the signal arrives during the last step: that run is finished, and a relaunch could only report it).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minillm import checkpoint as ckpt
from minillm import evaluation, ops
from minillm.config import TrainJobConfig, plain
from minillm.data.batches import BatchSource
from minillm.data.prepare import PreparedData, prepare
from minillm.data.token_file import read_header, read_tokens
from minillm.device import autocast_for, peak_memory_mb
from minillm.distributed import failure
from minillm.distributed import process_group as dist
from minillm.distributed.wrapping import full_value, grad_sync, local, shard_fsdp, wrap_ddp
from minillm.errors import RunError, UserError
from minillm.flops import mfu, peak_flops
from minillm.guards import NonFiniteError, StepGuard
from minillm.metrics import MetricsLogger, finite_fields
from minillm.model import GPT
from minillm.optimizer import build_optimizer, decay_start, lr_at
from minillm.report import plot_run, summarize, write_report
from minillm.config_history import keep_config_history
from minillm.init_from import check_coverage, init_weights, load_source
from minillm.resume import (check_not_past, check_resumable, check_same_optimizer, check_tokenizer_settings,
                            load_resume_state)
from minillm.rng import RngStreams, seed_everything
from minillm.run_lock import hold_run_folder
from minillm.signals import GracefulStop, TrainingInterrupted
from minillm.tokenizer import Tokenizer
from minillm.time_budget import TimeBudget, process_start_time
from minillm.train_state import TrainState

log = logging.getLogger(__name__)
__all__ = ["train", "Trainer", "derive_grad_accum"]


def train(cfg: TrainJobConfig) -> dict:
    """Run training as configured; returns the run summary (also written to <out_dir>/summary.json).

    Raises a UserError subclass for bad input, NonFiniteError when the guard stops the run, and
    TrainingInterrupted after the checkpoint when a stop signal arrived.
    """
    info = dist.setup(cfg.device, cfg.train.dist_timeout_s)
    try:
        with hold_run_folder(cfg.out_dir, info):  # one run per folder, before anything in it is touched
            return Trainer(cfg, info).fit()
    except UserError as e:
        failure.report(info, str(e))  # for the peers waiting on this rank (minillm/distributed/failure.py)
        raise
    except Exception:
        peer = failure.peer_failure(info)
        if peer is None:
            raise
        raise RunError(f"rank {info.rank} stopped: rank {peer[0]} failed: {peer[1]}") from None
    finally:
        dist.teardown()


def set_global_batch(cfg: TrainJobConfig, info: dist.DistInfo) -> None:
    """grad_accum_steps from train.global_batch_tokens when set; log the global batch of several processes."""
    if cfg.train.global_batch_tokens is not None:
        cfg.train.grad_accum_steps = derive_grad_accum(cfg.train.global_batch_tokens, cfg.train.batch_size,
                                                       cfg.model.block_size, info.world_size)
    if info.enabled:
        log.info("distributed: %d processes (%s, %s), global batch %d sequences", info.world_size,
                 dist.backend_name(), cfg.train.parallel.upper(),
                 cfg.train.batch_size * cfg.train.grad_accum_steps * info.world_size)


def derive_grad_accum(global_batch_tokens: int, batch_size: int, block_size: int, world_size: int) -> int:
    """grad_accum_steps that makes batch_size * block_size * world_size * accum == global_batch_tokens."""
    per_micro = batch_size * block_size * world_size
    if global_batch_tokens % per_micro:
        raise RunError(f"train.global_batch_tokens={global_batch_tokens} is not a multiple of train.batch_size"
                       f" x model.block_size x world size = {batch_size} x {block_size} x {world_size} = "
                       f"{per_micro}; pick a multiple of {per_micro}")
    return global_batch_tokens // per_micro


@dataclass
class RunData:
    """The prepared corpus of a run: its tokenizer and both token streams (memmaps)."""
    prepared: PreparedData
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    id: dict  # what identifies the prepared data in a checkpoint: each split's token count and checksum


def val_too_short(val_tokens: int, block_size: int) -> bool:
    """Whether a validation split holds less than one full window (block_size inputs + 1 target)."""
    return val_tokens < block_size + 1


def load_data(cfg: TrainJobConfig, info: dist.DistInfo, tokenizer: Tokenizer | None = None) -> RunData:
    """Prepare (or reuse) the corpus. Local rank 0 of each node prepares first, so a node-local cache
    works on every node; concurrent preparers on a shared cache are safe (the first rename wins)."""
    if info.local_rank == 0:  # progress bars (checking, tokenizer sample, encoding) on a terminal only
        prepared = prepare(cfg.data, cfg.tokenizer, progress=cfg.logger.progress, tokenizer=tokenizer)
    dist.barrier(info)
    if info.local_rank != 0:
        prepared = prepare(cfg.data, cfg.tokenizer, progress=False, tokenizer=tokenizer)
    tok = Tokenizer.load(prepared.tokenizer)
    data_id = {split: {k: read_header(path)[k] for k in ("count", "crc")}
               for split, path in (("train", prepared.train), ("val", prepared.val))}
    # prepare() has just written the entry, or checked its token files (checksums, ids) before reuse
    data = RunData(prepared, tok, read_tokens(prepared.train, tok.vocab_size, verify=False),
                   read_tokens(prepared.val, tok.vocab_size, verify=False), data_id)
    if len(data.val) < 2:
        raise RunError(f"the validation split has {len(data.val)} tokens; it needs at least 2 "
                       "(a larger corpus or data.val_fraction)")
    if val_too_short(len(data.val), cfg.model.block_size) and info.is_main:
        log.warning("warning: the validation split holds %d tokens, not one full window of model.block_size=%d "
                    "+ 1: its loss and bpb rest on too few tokens to compare runs; raise data.val_fraction or "
                    "give data.val_path", len(data.val), cfg.model.block_size)
    return data


class StepTimer:
    """Wall-clock phases of one step (fwd_ms, bwd_ms, opt_ms); synchronises CUDA only when active."""

    def __init__(self, device: torch.device, active: bool):
        self.device, self.active, self.ms = device, active, {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0}
        self._t = 0.0

    def mark(self, phase: str | None = None) -> None:
        """Add the time since the previous mark to ``phase`` (None: only start timing from now)."""
        if not self.active:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if phase is not None:
            self.ms[phase] += (now - self._t) * 1e3
        self._t = now


@dataclass
class StepResult:
    loss: float          # mean training loss of the step over micro-batches and ranks (nats/token)
    grad_norm: float     # total gradient norm before clipping
    verdict: str         # "ok" (updated) | "nonfinite" | "spike" (skipped by the guard)
    lr: float            # the scheduled learning rate of this step
    timer: StepTimer


class Trainer:
    """Owns a run: built from a validated config (and the process group's DistInfo), run by ``fit()``.

    A run that has already reached train.max_steps builds no component: ``fit()`` returns its summary.
    """

    def __init__(self, cfg: TrainJobConfig, info: dist.DistInfo):
        self.cfg, self.tc, self.info, self.run_dir = cfg, cfg.train, info, Path(cfg.out_dir)
        self.t_start = time.time()
        self._process_start = min(process_start_time(), self.t_start)  # the time budget's clock starts here
        seed_everything(cfg.seed)
        ops.configure(cfg.kernels, info.device)
        # Fine-tuning: the source's weights and tokenizer (which also encodes the new corpus); its model
        # shape becomes the run's, so the global batch is set after it (block_size).
        source = load_source(cfg)
        set_global_batch(cfg, info)
        self.fsdp = info.enabled and self.tc.parallel == "fsdp"
        # the checkpoint first: a tokenizer the config already shows to differ is refused before preparation
        state, self.resumed_from = load_resume_state(cfg, self.run_dir, info, full_model=not self.fsdp)
        if state is not None and source is None:
            check_tokenizer_settings(state, self.resumed_from, cfg)
        self.data = load_data(cfg, info, source["tokenizer"] if source is not None else None)
        if source is not None and info.is_main:
            check_coverage(source, self.data.train)
        self._set_vocab_size()
        if state is not None:
            check_resumable(state, self.resumed_from, cfg, self.data.tokenizer.proto, self.data.id, info, self.fsdp)
            if source is not None:
                log.info("%s holds this run already: it continues from its checkpoint; train.init_from applies "
                         "only when a run starts", self.run_dir)
        self.state = TrainState()
        self.prior_elapsed = float(state.get("elapsed_s", 0.0)) if state is not None else 0.0
        self.budget = TimeBudget(self.tc.time_budget_s, self.tc.max_steps) if self.tc.time_budget_s else None
        if self.budget is not None and state is not None and "budget" in state:
            self.budget.load_state_dict(state["budget"])
        self.max_steps = self.budget.current() if self.budget is not None else self.tc.max_steps
        if state is not None:
            check_not_past(state["train_state"]["step"], self.max_steps, self.resumed_from, cfg)
        self.finished = state is not None and state["train_state"]["step"] >= self.max_steps
        if self.budget is None and cfg.optim.warmup_steps > self.max_steps and info.is_main:
            log.warning("warning: optim.warmup_steps=%d > train.max_steps=%d: the learning rate never reaches "
                        "optim.lr (it is still warming up at the last step); lower optim.warmup_steps",
                        cfg.optim.warmup_steps, self.max_steps)
        if self.finished:  # nothing to train: fit() reports it; no component is built
            self.state.load_state_dict(state["train_state"])
            return
        self._build(state, source)

    # ------------------------------------------------------------------ building
    def _build(self, state: dict | None, source: dict | None) -> None:
        """The components, restored from ``state`` when the run continues, and what the loop needs."""
        cfg, info = self.cfg, self.info
        if state is not None:
            check_same_optimizer(state, self.resumed_from, cfg)
        self.bf16 = self.tc.uses_bf16(info.device.type)
        self.model = self._build_model(source if state is None else None)
        torch.manual_seed(cfg.seed + info.rank)  # after the weights exist: each rank's own stream (dropout)
        self.optimizer = build_optimizer(self.model, cfg.optim, info.device, fused_ok=not self.fsdp)
        self.batches = BatchSource(self.data.train, self.tc.batch_size, cfg.model.block_size, cfg.seed,
                                   info.rank, info.world_size)
        self.guard = StepGuard(self.tc.nan_policy, self.tc.max_skipped_steps, self.tc.spike_zscore,
                               self.tc.spike_window)
        self.rng = RngStreams(info)
        if state is not None:
            self.load_state_dict(state, self.resumed_from if self.fsdp else None)
            log.info("resuming from %s at step %d", self.resumed_from, self.state.step)
        self.amp = autocast_for(info.device, self.bf16 and not self.fsdp)  # FSDP's policy casts itself
        self.compiled = torch.compile(self.model) if self.tc.compile else self.model
        self.wrapped = wrap_ddp(self.compiled, info) if info.enabled and not self.fsdp else self.compiled
        self.tokens_per_step = self.tc.batch_size * cfg.model.block_size * self.tc.grad_accum_steps * info.world_size
        self.flops_per_token = self.model.flops_per_token()
        self.peak_flops = peak_flops(info.device, self.bf16)
        self.last_val = (float("nan"), float("nan"))
        self.metrics: MetricsLogger | None = None
        self._window = (self.t_start, self.state.tokens_seen)  # throughput window: (time, tokens) at its start

    def _set_vocab_size(self) -> None:
        mc, tok = self.cfg.model, self.data.tokenizer
        if mc.vocab_size is None:
            mc.vocab_size = tok.vocab_size
        elif mc.vocab_size < tok.vocab_size:
            raise RunError(f"model.vocab_size={mc.vocab_size} is smaller than the tokenizer's "
                           f"{tok.vocab_size}; raise it or leave it unset")

    def _build_model(self, source: dict | None) -> GPT:
        """The model on this rank's device: the same initial weights on every rank (same seed), the
        source run's weights when fine-tuning, sharded when FSDP."""
        cfg, info = self.cfg, self.info
        model = GPT(cfg.model).to(info.device)
        if source is not None:
            init_weights(model, source, cfg)
        log.info("model: %s, %.2fM parameters (%.2fM non-embedding)", cfg.model.name,
                 model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6)
        if self.fsdp:
            if cfg.optim.name == "muon":
                raise RunError("optim.name=muon with train.parallel=fsdp: Muon needs whole matrices, FSDP "
                               "shards them; use optim=adamw with FSDP, or train.parallel=ddp")
            shard_fsdp(model, info, self.bf16)
        return model

    # ------------------------------------------------------------------ state
    def elapsed(self, now: float | None = None) -> float:
        """Seconds of this run's wall time: earlier launches up to the checkpoint it continues (saved with
        every checkpoint) plus this launch's, so elapsed_s and wall_s do not restart at a resume."""
        return self.prior_elapsed + (time.time() if now is None else now) - self.t_start

    def components(self) -> dict:
        """The checkpointed components by name (see the module docstring)."""
        parts = {"model": self.model, "optimizer": self.optimizer, "batches": self.batches, "guard": self.guard,
                 "rng": self.rng, "train_state": self.state}
        return parts | ({"budget": self.budget} if self.budget is not None else {})

    def state_dict(self) -> dict:
        """Every component's state dict by name, plus config, tokenizer and world size (a collective).
        Under FSDP model and optimizer are left out: every rank writes its shards (checkpoint.py)."""
        sharded = ("model", "optimizer") if self.fsdp else ()
        out = {name: c.state_dict() for name, c in self.components().items() if name not in sharded}
        return out | {"config": plain(self.cfg), "world_size": self.info.world_size,
                      "data": self.data.id, "elapsed_s": round(self.elapsed(), 3),
                      "tokenizer": torch.frombuffer(bytearray(self.data.tokenizer.proto), dtype=torch.uint8)}

    def load_state_dict(self, state: dict, sharded_dir: Path | None = None) -> None:
        """Restore every component from a checkpoint's state; under FSDP, model and optimizer come from
        the sharded checkpoint folder ``sharded_dir`` (every rank reads its shards)."""
        if self.fsdp:
            ckpt.load_sharded_into(sharded_dir, self.model, self.optimizer)
        for name, component in self.components().items():
            if not (self.fsdp and name in ("model", "optimizer")):
                component.load_state_dict(state[name])

    def save_checkpoint(self) -> None:
        """Checkpoint the run at the current step (a collective); refuses non-finite weights."""
        finite = torch.tensor([float(all(torch.isfinite(local(p)).all() for p in self.model.parameters()))])
        if self.fsdp:  # each rank sees only its shards; all must agree before anyone raises
            finite = dist.all_reduce_sum(finite.to(self.info.device), self.info).cpu() / self.info.world_size
        if finite.item() < 1:
            raise NonFiniteError(f"step {self.state.step}: parameters are not finite; refusing to checkpoint them")
        state, info = self.state_dict(), self.info
        if self.fsdp:
            ckpt.save_sharded_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer, state,
                                         self.tc.keep_last, info.is_main, lambda: dist.barrier(info))
            return
        if info.is_main:
            ckpt.save_checkpoint(self.run_dir, self.state.step, state, self.tc.keep_last)
        dist.barrier(info)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        """One optimizer step (see the module docstring); advances the train state."""
        tc = self.tc
        timer = StepTimer(self.info.device, tc.profile_interval > 0 and (self.state.step + 1) % tc.profile_interval == 0)
        lr = lr_at(self.state.step, self.cfg.optim, self.max_steps)
        for group in self.optimizer.param_groups:  # lr_mult: Muon's groups (minillm/optimizer.py)
            group["lr"] = lr * group.get("lr_mult", 1.0)
        loss, grad_norm = self._forward_backward(timer)
        verdict = self.guard.check(self.state.step + 1, loss, grad_norm)
        timer.mark()
        if verdict == "ok":
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.mark("opt_ms")
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return StepResult(loss, grad_norm, verdict, lr, timer)

    def _forward_backward(self, timer: StepTimer) -> tuple[float, float]:
        """grad_accum micro-batches; returns (mean loss over ranks, total grad norm before clipping)."""
        accum, info = self.tc.grad_accum_steps, self.info
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(accum):
            x, y = (t.to(info.device, non_blocking=True) for t in self.batches.next_batch())
            with grad_sync(self.wrapped, last_micro_step=micro == accum - 1):
                timer.mark()
                with self.amp:
                    _, loss = self.wrapped(x, y)
                timer.mark("fwd_ms")
                (loss / accum).backward()
                timer.mark("bwd_ms")
            loss_sum += loss.detach()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        loss_mean = dist.all_reduce_sum(loss_sum / accum, info) / info.world_size
        return loss_mean.item(), grad_norm.item()

    def evaluate(self) -> tuple[float, float]:
        """(validation loss in nats per token, bits per byte); updates the best loss (a collective).
        Runs on the unwrapped model: no gradients, so DDP has nothing to do."""
        tok_bytes = torch.from_numpy(self.data.tokenizer.token_bytes()).to(self.info.device)
        self.last_val = evaluation.evaluate(self.compiled, self.data.val, tok_bytes, self.tc.batch_size,
                                 self.cfg.model.block_size, self.tc.eval_tokens, self.info, self.amp)
        self.state.best_val_loss = min(self.state.best_val_loss, self.last_val[0])
        return self.last_val

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to train.max_steps; returns the summary (also written to summary.json).
        Raises TrainingInterrupted after checkpointing when SIGTERM/SIGINT arrived."""
        if self.finished:
            return self._already_finished()
        self._start_run_files()
        bar = tqdm(total=self.max_steps if self.budget is None or self.budget.max_steps else None, initial=self.state.step, desc="train", dynamic_ncols=True,
                   disable=None if self.info.is_main and self.cfg.logger.progress else True)  # None: tty only
        self._window = (time.time(), self.state.tokens_seen)  # throughput counts training time only
        try:
            with GracefulStop() as stop:
                if self.budget is not None:
                    self.budget.start(self.state.step)
                while self.state.step < self.max_steps:
                    result = self.train_step()
                    bar.update(1)
                    self._follow_budget(bar)
                    record = self._log_and_evaluate(result, bar)
                    self._checkpoint_or_stop(record, stop)
            bar.close()
            summary = self.summary()
            self._finish(summary)
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return summary

    def _follow_budget(self, bar: tqdm) -> None:
        """Time-budgeted runs: re-plan max_steps when due (minillm/time_budget.py); every rank agrees."""
        if self.budget is None:
            return
        clock = self.prior_elapsed + time.time() - self._process_start
        agree = (lambda n: int(dist.all_reduce_max(torch.tensor([n], device=self.info.device), self.info).item())
                 if self.info.enabled else n)
        if self.budget.after_step(self.state.step, clock, self._eval_seconds,
                                  lambda n: decay_start(self.cfg.optim, n), agree):
            self.max_steps = self.budget.max_steps
            bar.total = self.max_steps
            bar.refresh()
            if self.budget.locked:
                log.info("time budget %.0f s: %d steps (planned at step %d, %.1f s)", self.budget.budget_s,
                         self.max_steps, self.state.step, clock)

    def _eval_seconds(self) -> float:
        """Estimated seconds of one evaluation (the time budget's final one; evaluation.py)."""
        return evaluation.estimate_seconds(self.compiled, self.data.val, self.tc.batch_size,
                                           self.cfg.model.block_size, self.tc.eval_tokens, self.info, self.amp)

    def _log_and_evaluate(self, r: StepResult, bar: tqdm) -> dict | None:
        """Warn on a skipped step; evaluate when due; write the step's metrics record, if it has one."""
        tc, step = self.tc, self.state.step
        if r.verdict != "ok":
            log.warning("warning: step %d skipped (%s): loss %.4g, grad norm %.4g", step, r.verdict, r.loss, r.grad_norm)
        record = None
        if step % tc.log_interval == 0 or step == self.max_steps or r.verdict != "ok" or r.timer.active:
            t0, tokens0 = self._window
            record = self._record(r, (self.state.tokens_seen - tokens0) / max(time.time() - t0, 1e-9))
            bar.set_postfix(loss=f"{r.loss:.3f}", lr=f"{r.lr:.2e}", tok_s=f"{record['tokens_per_sec']:,.0f}")
        if step == self.max_steps or (tc.eval_interval > 0 and step % tc.eval_interval == 0):
            val_loss, val_bpb = self.evaluate()
            record = record or self._record(r, float("nan"))
            # stamped after the evaluation: when this validation number was known
            record.update(val_loss=val_loss, val_bpb=val_bpb, elapsed_s=round(self.elapsed(), 3),
                          time=round(time.time(), 3))
            if self.info.is_main:
                bar.write(f"step {step}: train loss {r.loss:.4f}, val loss {val_loss:.4f}, val bpb {val_bpb:.4f}")
        if self.metrics is not None and record is not None:
            self.metrics.log(record)
        return record

    def _record(self, r: StepResult, tokens_per_sec: float) -> dict:
        """The metrics.jsonl record of the step just taken."""
        now = time.time()
        rec = {"step": self.state.step, "train_loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
               "tokens": self.state.tokens_seen, "tokens_per_sec": tokens_per_sec,
               "elapsed_s": round(self.elapsed(now), 3), "time": round(now, 3),  # Unix time
               "flops_per_sec": self.flops_per_token * tokens_per_sec}
        if self.peak_flops:  # tokens_per_sec is global: the peak of every device
            rec["mfu"] = mfu(self.flops_per_token, tokens_per_sec, self.peak_flops * self.info.world_size)
        if r.timer.active:
            rec.update({k: round(v, 3) for k, v in r.timer.ms.items()})
        if r.verdict != "ok":
            rec["skipped"] = r.verdict
        return rec

    def _checkpoint_or_stop(self, record: dict | None, stop: GracefulStop) -> None:
        """Checkpoint when due (interval, evaluation, last step, a stop signal on any rank); then stop
        by raising TrainingInterrupted if a signal arrived."""
        stopping, step, every = self._stop_signal(stop), self.state.step, self.tc.ckpt_interval
        if (stopping or step == self.max_steps or (every and step % every == 0)
                or (every is None and record is not None and "val_loss" in record)):
            self.save_checkpoint()
        if stopping and step == self.max_steps:  # the run is finished: its report is written, no resume
            log.info("%s arrived during the last step; finishing the run", signal.Signals(stopping).name)
        elif stopping:
            raise TrainingInterrupted(stopping, step)
        if record is not None:
            self._window = (time.time(), self.state.tokens_seen)

    def _stop_signal(self, stop: GracefulStop) -> int:
        """The signal any rank received (0: none); every rank stops at the same step with it."""
        if not self.info.enabled:
            return stop.signum or 0
        flag = torch.tensor([stop.signum or 0], dtype=torch.int64, device=self.info.device)
        return int(dist.all_reduce_max(flag, self.info).item())

    # ------------------------------------------------------------------ the run folder
    def _start_run_files(self) -> None:
        """Set aside checkpoints past the resume point; write tokenizer.model and config.json; open the
        metrics log (which drops records past the resume point)."""
        if not self.info.is_main:
            return
        if self.resumed_from is not None:
            ckpt.set_aside_newer(self.run_dir, self.state.step, self.tc.keep_last)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data.tokenizer.save(self.run_dir / "tokenizer.model")
        keep_config_history(self.run_dir, asdict(self.cfg), self.state.step)
        self.metrics = MetricsLogger(self.run_dir, self.cfg.logger.wandb, asdict(self.cfg),
                                     self.state.step if self.resumed_from is not None else None)

    def _already_finished(self) -> dict:
        """The summary of a run that reached max_steps. One stopped before its report was written (killed
        after its last checkpoint) gets it now: summary.json from metrics.jsonl, and curves.png."""
        log.info("%s already finished at step %d (max_steps %d); nothing to do", self.run_dir,
                 self.state.step, self.max_steps)
        path = self.run_dir / "summary.json"
        if path.exists():
            if self.info.is_main and not (self.run_dir / "curves.png").exists():
                plot_run(self.run_dir)
            return json.loads(path.read_text())
        summary = {**summarize(self.run_dir), "step": self.state.step, "tokens": self.state.tokens_seen,
                   "best_val_loss": self.state.best_val_loss, "summary_from": "metrics.jsonl"}
        if self.info.is_main:
            write_report(self.run_dir, summary)
            log.info("wrote the missing report (summary.json, curves.png) from metrics.jsonl")
        return summary

    def summary(self) -> dict:
        """The run's summary: final and best validation, tokens, time, size, skipped steps, memory."""
        meta = self.data.prepared.meta
        return {"step": self.state.step, "tokens": self.state.tokens_seen, "final_val_loss": self.last_val[0],
                "final_val_bpb": self.last_val[1], "best_val_loss": self.state.best_val_loss,
                "wall_s": round(self.elapsed(), 2), "params": self.model.num_params(),
                "flops_per_token": self.flops_per_token, "skipped_nonfinite": self.guard.skipped_nonfinite,
                "skipped_spikes": self.guard.skipped_spikes, "peak_memory_mb": peak_memory_mb(self.info.device),
                "device": str(self.info.device), "world_size": self.info.world_size,
                "vocab_size": self.data.tokenizer.vocab_size, "backend": ops.backend(),
                "val_bytes_per_token": bytes_per_token(*self.last_val, meta)}

    def _finish(self, summary: dict) -> None:
        """Write summary.json and curves.png, upload the checkpoint to wandb if asked."""
        if not self.info.is_main:
            return
        write_report(self.run_dir, summary)
        wandb_run = self.metrics.wandb if self.metrics is not None else None
        if wandb_run is not None:
            wandb_run.summary.update(finite_fields(summary))
            if self.cfg.logger.wandb.log_checkpoint:
                self.metrics.log_checkpoint_artifact()
        log.info("done: step %d, val loss %.4f, val bpb %.4f, %.1fs; run folder %s", summary["step"],
                 summary["final_val_loss"], summary["final_val_bpb"], summary["wall_s"], self.run_dir)



def bytes_per_token(val_loss: float, val_bpb: float, meta: dict) -> float:
    """Text bytes per token of what the final evaluation scored: loss / ln 2 / bpb (loss is nats per token,
    bpb bits per byte, of the same targets), so with train.eval_tokens it is the scored part's, matching
    final_val_bpb. The whole split's (prepared data's meta.json) when there is no such number."""
    if math.isfinite(val_loss) and math.isfinite(val_bpb) and val_bpb > 0:
        return val_loss / math.log(2) / val_bpb
    return meta.get("val_bytes", 0) / max(1, meta.get("val_tokens", 1))

"""The step loop: train steps, guards, logging, evaluation, checkpoints, signals, the final report.

trainer.py builds the pieces; TrainLoop runs them. Per step:
    forward/backward over grad_accum micro-batches -> grad norm (clipped) -> StepGuard
    -> optimizer.step() or skip -> metrics -> maybe evaluate -> maybe checkpoint -> stop on a signal
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from minillm import distributed as dist
from minillm.flops import mfu, peak_flops
from minillm.metrics import MetricsLogger
from minillm.parallel import full_value, grad_sync
from minillm.report import write_report
from minillm.signals import GracefulStop, TrainingInterrupted

log = logging.getLogger(__name__)


class _Timer:
    """Wall-clock phases of one step; synchronises CUDA only when this step is measured."""

    def __init__(self, device: torch.device, active: bool):
        self.device, self.active, self.ms = device, active, {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0}
        self._t = 0.0

    def mark(self, phase: str | None = None) -> None:
        if not self.active:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if phase is not None:
            self.ms[phase] += (now - self._t) * 1e3
        self._t = now


class TrainLoop:
    def __init__(self, cfg, info, raw_model, model, optimizer, sampler, guard, amp, run_dir,
                 lr_fn, eval_fn, save_fn):
        self.cfg, self.tc, self.info = cfg, cfg.train, info
        self.raw_model, self.model, self.optimizer = raw_model, model, optimizer
        self.sampler, self.guard, self.amp, self.run_dir = sampler, guard, amp, run_dir
        self.lr_fn, self.eval_fn, self.save_fn = lr_fn, eval_fn, save_fn
        self.tokens_per_step = self.tc.batch_size * cfg.model.block_size * self.tc.grad_accum_steps * info.world_size
        self.flops_per_token = raw_model.flops_per_token()
        self.peak = peak_flops(info.device, self.tc.uses_bf16(info.device.type))
        self.metrics = None

    def forward_backward(self, timer: _Timer) -> tuple[float, float]:
        """grad_accum micro-batches; returns (mean loss over ranks, total grad norm before clipping)."""
        accum, info = self.tc.grad_accum_steps, self.info
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(accum):
            x, y = (t.to(info.device, non_blocking=True) for t in self.sampler.next_batch())
            with grad_sync(self.model, last_micro_step=micro == accum - 1):
                timer.mark()
                with self.amp:
                    _, loss = self.model(x, y)
                timer.mark("fwd_ms")
                (loss / accum).backward()
                timer.mark("bwd_ms")
            loss_sum += loss.detach()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip))
        loss_mean = dist.all_reduce_sum(loss_sum / accum, info) / info.world_size
        return loss_mean.item(), grad_norm.item()

    def train_step(self, step: int, timer: _Timer) -> tuple[float, float, str]:
        lr = self.lr_fn(step)
        for group in self.optimizer.param_groups:  # lr_mult: Muon's groups (minillm/muon.py)
            group["lr"] = lr * group.get("lr_mult", 1.0)
        loss, gnorm = self.forward_backward(timer)
        verdict = self.guard.check(step + 1, loss, gnorm)
        timer.mark()
        if verdict == "ok":
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.mark("opt_ms")
        return loss, gnorm, verdict

    def _stop_signal(self, stop: GracefulStop) -> int:
        """The signal any rank received (0: none); every rank stops at the same step with it."""
        if not self.info.enabled:
            return stop.signum or 0
        flag = torch.tensor([stop.signum or 0], dtype=torch.int64, device=self.info.device)
        return int(dist.all_reduce_max(flag, self.info).item())

    def _record(self, step, loss, gnorm, verdict, tokens_seen, tps, t_start, timer) -> dict:
        rec = {"step": step, "train_loss": loss, "lr": self.lr_fn(step - 1), "grad_norm": gnorm,
               "tokens": tokens_seen, "tokens_per_sec": tps, "elapsed_s": round(time.time() - t_start, 3),
               "time": round(time.time(), 3),  # Unix time: lines up with clocks outside the process
               "flops_per_sec": self.flops_per_token * tps}
        if self.peak:
            rec["mfu"] = mfu(self.flops_per_token, tps, self.peak * self.info.world_size)  # tps is global
        if timer.active:
            rec.update({k: round(v, 3) for k, v in timer.ms.items()})
        if verdict != "ok":
            rec["skipped"] = verdict
        return rec

    def run(self, step: int, tokens_seen: int, best_val: float, t_start: float, resumed: bool) -> dict:
        tc, info = self.tc, self.info
        self.metrics = MetricsLogger(self.run_dir, self.cfg.logger.wandb, asdict(self.cfg),
                                     step if resumed else None) if info.is_main else None
        bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True,
                   disable=not (info.is_main and self.cfg.logger.progress))
        last_val = (float("nan"), float("nan"))
        t_win, tokens_win = time.time(), tokens_seen
        try:
            with GracefulStop() as stop:
                while step < tc.max_steps:
                    timer = _Timer(info.device, tc.profile_interval > 0 and (step + 1) % tc.profile_interval == 0)
                    loss, gnorm, verdict = self.train_step(step, timer)
                    step, tokens_seen = step + 1, tokens_seen + self.tokens_per_step
                    bar.update(1)
                    if verdict != "ok":
                        log.warning("warning: step %d skipped (%s): loss %.4g, grad norm %.4g", step, verdict, loss, gnorm)
                    record = None
                    if step % tc.log_interval == 0 or step == tc.max_steps or verdict != "ok" or timer.active:
                        tps = (tokens_seen - tokens_win) / max(time.time() - t_win, 1e-9)
                        record = self._record(step, loss, gnorm, verdict, tokens_seen, tps, t_start, timer)
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tps:,.0f}")
                    if step == tc.max_steps or (tc.eval_interval > 0 and step % tc.eval_interval == 0):
                        last_val = self.eval_fn()
                        best_val = min(best_val, last_val[0])
                        record = record or self._record(step, loss, gnorm, verdict, tokens_seen,
                                                        float("nan"), t_start, timer)
                        # stamped after the evaluation: when this validation number was known
                        record.update(val_loss=last_val[0], val_bpb=last_val[1],
                                      elapsed_s=round(time.time() - t_start, 3), time=round(time.time(), 3))
                        if info.is_main:
                            bar.write(f"step {step}: train loss {loss:.4f}, val loss {last_val[0]:.4f}, "
                                      f"val bpb {last_val[1]:.4f}")
                    if self.metrics is not None and record is not None:
                        self.metrics.log({k: v for k, v in record.items() if v == v})  # drop NaN fields
                    stopping = self._stop_signal(stop)
                    every = tc.ckpt_interval
                    if (stopping or step == tc.max_steps or (every and step % every == 0)
                            or (every is None and record is not None and "val_loss" in record)):
                        self.save_fn(step, tokens_seen, best_val)
                    if stopping:
                        raise TrainingInterrupted(stopping, step)
                    if record is not None:  # the throughput window counts training time only
                        t_win, tokens_win = time.time(), tokens_seen
        finally:
            bar.close()
        return {"step": step, "tokens": tokens_seen, "final_val_loss": last_val[0], "final_val_bpb": last_val[1],
                "best_val_loss": best_val, "wall_s": round(time.time() - t_start, 2),
                "params": self.raw_model.num_params(), "flops_per_token": self.flops_per_token,
                "skipped_nonfinite": self.guard.skipped_nonfinite, "skipped_spikes": self.guard.skipped_spikes,
                "peak_memory_mb": peak_memory_mb(info.device), "device": str(info.device),
                "world_size": info.world_size}

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def finish(self, summary: dict) -> None:
        """Write summary.json and curves.png, upload the checkpoint if asked, close the loggers."""
        if self.info.is_main:
            write_report(self.run_dir, summary)
            wb = self.cfg.logger.wandb
            if self.metrics is not None and self.metrics.wandb is not None:
                self.metrics.wandb.summary.update({k: v for k, v in summary.items() if v == v})
                if wb.log_checkpoint:
                    self.metrics.log_checkpoint_artifact()
            log.info("done: step %d, val loss %.4f, val bpb %.4f, %.1fs; run folder %s", summary["step"],
                     summary["final_val_loss"], summary["final_val_bpb"], summary["wall_s"], self.run_dir)
        self.close()


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

"""The Trainer's step and loop: accumulation, the scheduled lr reaching the optimizer, clipping,
rejected steps leaving the weights alone, and a checkpoint that is exactly the components' state."""
import json

import pytest
import torch

from minillm.config import DataConfig, LoggerConfig, ModelConfig, OptimConfig, TokenizerConfig, TrainConfig, TrainJobConfig
from minillm.distributed.process_group import DistInfo
from minillm.optimizer import lr_at
from minillm.trainer import Trainer


def make_trainer(run, corpus, optim=None, **train_kw) -> Trainer:
    cfg = TrainJobConfig(
        out_dir=str(run), device="cpu", seed=7,
        model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32),
        data=DataConfig(path=str(corpus)), tokenizer=TokenizerConfig(vocab_size=400),
        optim=optim or OptimConfig(lr=3e-3, warmup_steps=3, schedule="cosine"),
        train=TrainConfig(**{"max_steps": 6, "batch_size": 4, "log_interval": 1, "eval_interval": 0,
                             "profile_interval": 0, **train_kw}),
        logger=LoggerConfig(progress=False))
    return Trainer(cfg, DistInfo())


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def test_accumulation_equals_the_larger_batch_and_the_scheduled_lr_is_applied(tmp_path, corpus_file, data_dir):
    """batch 8 x accumulation 1 == batch 4 x accumulation 2: same losses, gradient norms and weights
    (the same windows; each micro-batch's loss divided by the accumulation count); the optimizer
    uses lr_at(step) for the update of step."""
    big = make_trainer(tmp_path / "big", corpus_file, batch_size=8, grad_accum_steps=1)
    small = make_trainer(tmp_path / "small", corpus_file, batch_size=4, grad_accum_steps=2)
    for step in range(5):
        a, b = big.train_step(), small.train_step()
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
        want_lr = lr_at(step, big.cfg.optim, big.tc.max_steps)
        assert a.lr == want_lr and all(g["lr"] == want_lr for g in big.optimizer.param_groups)
    assert big.state.step == small.state.step == 5
    assert big.state.tokens_seen == small.state.tokens_seen == 5 * 8 * 32
    pb, ps = params(big), params(small)
    for name in pb:
        torch.testing.assert_close(pb[name], ps[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_small_clip_bounds_the_applied_gradient_norm(tmp_path, corpus_file, data_dir):
    """optim.grad_clip: the gradient the optimizer sees has total norm <= the clip; the record keeps
    the norm before clipping."""
    trainer = make_trainer(tmp_path / "run", corpus_file, optim=OptimConfig(lr=3e-3, warmup_steps=0, grad_clip=0.01))
    seen, step = [], trainer.optimizer.step

    def spy():
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        step()

    trainer.optimizer.step = spy
    results = [trainer.train_step() for _ in range(3)]
    assert len(seen) == 3 and all(n <= 0.01 * (1 + 1e-5) for n in seen)
    assert all(r.grad_norm > 0.05 for r in results)  # the clip bit: the raw norm was larger


def test_a_rejected_step_leaves_the_weights_alone_and_is_recorded(tmp_path, corpus_file, data_dir):
    """A loss spike the guard rejects: no update at that step (weights and optimizer state as before),
    'skipped' in its metrics record, counted in the summary; the steps around it update normally."""
    run = tmp_path / "run"
    trainer = make_trainer(run, corpus_file, spike_zscore=3.0, spike_window=4, max_steps=7)
    real, before = trainer._forward_backward, {}

    def spiking(timer):
        loss, gnorm = real(timer)
        if trainer.state.step == 5:   # the update of step 6
            before.update(params=params(trainer), adam_steps=_adam_steps(trainer))
            return loss * 1e6, gnorm
        return loss, gnorm

    trainer._forward_backward = spiking
    real_step, after_6 = trainer.train_step, {}

    def step_and_snapshot():
        result = real_step()
        if trainer.state.step == 6:
            after_6.update(params(trainer))
        return result

    trainer.train_step = step_and_snapshot
    summary = trainer.fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in records] == [None] * 5 + ["spike", None]
    assert summary["skipped_spikes"] == 1 and summary["step"] == 7
    for name, t in before["params"].items():
        assert torch.equal(after_6[name], t), name
    assert _adam_steps(trainer) == before["adam_steps"] + 1  # step 7 updated again; step 6 did not


def _adam_steps(trainer) -> int:
    return int(max(s["step"] for s in trainer.optimizer.state.values()))


def test_a_checkpoint_is_the_components_state_dicts_by_name(tmp_path, corpus_file, data_dir):
    """The checkpoint holds each component's state_dict() under its name, and loading it into a fresh
    Trainer restores every component."""
    from minillm import checkpoint as ckpt

    run = tmp_path / "run"
    trainer = make_trainer(run, corpus_file, max_steps=3)
    trainer.fit()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert set(trainer.components()) == {"model", "optimizer", "batches", "guard", "rng", "train_state"}
    assert set(state) == set(trainer.components()) | {"config", "tokenizer", "world_size", "data", "elapsed_s",
                                                      "format_version"}
    assert state["train_state"] == trainer.state.state_dict() == {"step": 3, "tokens_seen": 3 * 4 * 32,
                                                                 "best_val_loss": trainer.state.best_val_loss}
    assert state["batches"] == trainer.batches.state_dict() and state["guard"] == trainer.guard.state_dict()
    fresh = make_trainer(run, corpus_file, max_steps=5, allow_changes=True)   # resume=auto picks it up
    assert fresh.state.step == 3 and fresh.batches.state_dict() == trainer.batches.state_dict()
    # wall time continues across launches: elapsed_s and wall_s count the earlier launch's time too
    assert 0 < state["elapsed_s"] == fresh.prior_elapsed and fresh.elapsed() > state["elapsed_s"]
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], t), name


def test_a_finished_run_builds_nothing_and_reports_itself(tmp_path, corpus_file, data_dir, caplog):
    """Re-running a finished run says so and returns its summary, even with settings that could not
    resume it (another optimizer, allowed): nothing is built, nothing in the folder changes."""
    run = tmp_path / "run"
    first = make_trainer(run, corpus_file, max_steps=3).fit()
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    caplog.set_level("INFO", logger="minillm")
    again = make_trainer(run, corpus_file, optim=OptimConfig(name="muon"), max_steps=3, allow_changes=True)
    assert again.finished and not hasattr(again, "model")
    assert again.fit() == first
    assert "already finished at step 3" in caplog.text and "resuming from" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_resuming_with_another_optimizer_is_one_line(tmp_path, corpus_file, data_dir):
    from minillm.errors import RunError

    run = tmp_path / "run"
    make_trainer(run, corpus_file, max_steps=2).fit()
    with pytest.raises(RunError, match=r"other settings: optim.name 'adamw' -> 'muon', optim.warmup_steps 3 -> 30;"):
        make_trainer(run, corpus_file, optim=OptimConfig(name="muon"), max_steps=2)
    # allowing changes cannot continue an AdamW state with Muon
    with pytest.raises(RunError, match=r"optim.name=adamw, the config says muon; resume with optim=adamw"):
        make_trainer(run, corpus_file, optim=OptimConfig(name="muon"), max_steps=4, allow_changes=True)


def to_format_1(state: dict) -> dict:
    """A format-2 checkpoint as the pre-Trainer code wrote it: counters and sampler at the top level, and
    (optim.name=muon) its hand-written Muon's state: momentum as a sum, M = sum mu^k G, not torch's average,
    and no ns_coefficients / eps / adjust_lr_fn in the groups."""
    v1 = {k: v for k, v in state.items() if k not in ("train_state", "batches")}
    v1 |= state["train_state"] | {"sampler": state["batches"], "format_version": 1}
    muon = state["optimizer"]["muon"]
    mu = {i: g["momentum"] for g in muon["param_groups"] for i in g["params"]}
    old_groups = [{k: v for k, v in g.items() if k not in ("ns_coefficients", "eps", "adjust_lr_fn")}
                  for g in muon["param_groups"]]
    old_state = {i: {"momentum_buffer": st["momentum_buffer"] / (1 - mu[i])} for i, st in muon["state"].items()}
    v1["optimizer"] = dict(state["optimizer"], muon={"state": old_state, "param_groups": old_groups})
    return v1


def test_a_format_1_muon_run_resumes_where_it_stopped(tmp_path, corpus_file, data_dir):
    """A run written by the hand-written Muon (checkpoint format 1) continues under torch.optim.Muon as if
    uninterrupted: the momentum sum becomes torch's average (x (1 - mu)) and the groups gain torch's keys."""
    from minillm import checkpoint as ckpt

    muon = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, warmup_steps=0, schedule="constant")
    straight = make_trainer(tmp_path / "straight", corpus_file, optim=muon, max_steps=6)
    straight.fit()
    run = tmp_path / "run"
    make_trainer(run, corpus_file, optim=muon, max_steps=3).fit()
    path = ckpt.latest_checkpoint(run)
    torch.save(to_format_1(torch.load(path, weights_only=True)), path)
    resumed = make_trainer(run, corpus_file, optim=muon, max_steps=6, allow_changes=True)
    assert resumed.state.step == 3
    resumed.fit()
    for name, t in params(straight).items():
        torch.testing.assert_close(params(resumed)[name], t, rtol=1e-4, atol=1e-5, msg=name)

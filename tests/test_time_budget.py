"""Time-budgeted runs: the wsd schedule, the planner (a simulated clock) and a real budgeted run."""
import json
import math

import pytest

from conftest import TINY_ARGS, run_entry
from minillm import time_budget
from minillm.config import (DataConfig, LoggerConfig, ModelConfig, OptimConfig, TokenizerConfig, TrainConfig,
                            TrainJobConfig)
from minillm.errors import ConfigError, RunError
from minillm.optimizer import decay_start, lr_at
from minillm.time_budget import FIRST_PLAN, INTERVAL, MEASURES, SKIP, TimeBudget


def wsd(**kw):
    return OptimConfig(**{"schedule": "wsd", "lr": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 3,
                          "decay_fraction": 0.25, **kw})


def test_wsd_is_flat_then_decays_linearly_to_the_floor_at_the_last_step():
    cfg = wsd()
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[3:15] == [1.0] * 12                    # stable until the last 25% (5 steps)
    assert lrs[15:] == pytest.approx([0.82, 0.64, 0.46, 0.28, 0.1])  # linear, the last step at the floor
    assert lr_at(19, cfg, 20) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["wsd", "cosine", "linear"])
def test_decay_start_is_the_first_step_whose_lr_depends_on_max_steps(schedule):
    cfg = wsd(schedule=schedule)
    for m in (8, 20, 57):
        d = decay_start(cfg, m)
        longer = [lr_at(s, cfg, m + k) for k in (1, 7, 100) for s in [d - 1] if s >= 0]
        assert all(v == lr_at(d - 1, cfg, m) for v in longer)  # before d: max_steps does not matter
        assert lr_at(d, cfg, m) != lr_at(d, cfg, m + 50)        # at d: it does


def test_decay_fraction_is_validated():
    with pytest.raises(ConfigError, match=r"optim.decay_fraction=0.0: must be in \(0, 1\]"):
        OptimConfig(decay_fraction=0.0)


def simulate(budget_s, per_step, start_s=2.0, eval_s=0.5, cap=None, cfg=None, slow_after=None, slow=3.0):
    """Drive a TimeBudget as the trainer does, with a simulated clock; returns (budget, lrs, end time)."""
    cfg = cfg or wsd(warmup_steps=5, decay_fraction=0.3)
    b = TimeBudget(budget_s, cap)
    b.start(0)
    clock, step, lrs, max_steps = start_s, 0, [], b.current()
    while step < max_steps:
        lrs.append(lr_at(step, cfg, max_steps))
        clock += per_step * (slow if slow_after is not None and step >= slow_after else 1)
        step += 1
        if b.after_step(step, clock, lambda: eval_s, lambda n: decay_start(cfg, n)):
            max_steps = b.max_steps
    return b, lrs, clock + eval_s


def test_the_plan_fills_the_budget_and_ends_annealed():
    b, lrs, end = simulate(budget_s=30.0, per_step=0.1)
    # (30 - 2 - 0.5 eval - 0.1 one step - 0.6 reserve) / 0.1 = 268 steps
    assert b.locked and b.max_steps == len(lrs) == pytest.approx(268, abs=2)
    assert 29.0 < end <= 30.0
    assert lrs[-1] == pytest.approx(wsd().lr * 0.1)     # annealed: the last update at the floor
    assert max(lrs) == 1.0


def test_every_lr_taken_before_the_lock_is_the_same_under_the_final_plan():
    """Re-planning before the decay never rewrites the past: a slowdown early on (1.5x from step 40)
    gives a plan under which every lr the run took is the schedule's."""
    cfg = wsd(warmup_steps=5, decay_fraction=0.3)
    b, lrs, end = simulate(budget_s=30.0, per_step=0.1, slow_after=40, slow=1.5, cfg=cfg)
    assert lrs == [lr_at(s, cfg, b.max_steps) for s in range(b.max_steps)] and end <= 30.0


def test_a_slowdown_during_the_decay_shortens_it_and_still_ends_on_time_annealed():
    cfg = wsd(warmup_steps=5, decay_fraction=0.3)
    steady, _, _ = simulate(budget_s=30.0, per_step=0.1, cfg=cfg)
    b, lrs, end = simulate(budget_s=30.0, per_step=0.1, slow_after=220, slow=1.6, cfg=cfg)  # after the lock (~190)
    assert b.max_steps < steady.max_steps and end <= 30.0
    assert lrs[-1] == pytest.approx(0.1) and all(a >= c for a, c in zip(lrs[5:], lrs[6:]))  # never up again
    d = decay_start(cfg, b.max_steps)
    assert lrs[:d] == [lr_at(s, cfg, b.max_steps) for s in range(d)]


def test_a_slower_machine_gets_fewer_steps_and_the_cap_wins():
    fast, _, _ = simulate(budget_s=30.0, per_step=0.1)
    slow, _, _ = simulate(budget_s=30.0, per_step=0.2)
    assert slow.max_steps == pytest.approx(fast.max_steps / 2, abs=2)
    capped, lrs, _ = simulate(budget_s=30.0, per_step=0.1, cap=100)
    assert capped.max_steps == len(lrs) == 100


def test_no_room_for_a_step_is_one_line_naming_the_key():
    with pytest.raises(RunError, match=r"^train.time_budget_s=3: 3.6 s have passed at step 6 .* raise the budget"):
        simulate(budget_s=3.0, per_step=0.1, start_s=3.0)


def run_with_eval_costs(costs, budget_s=30.0, per_step=0.1, start_s=2.0) -> TimeBudget:
    """Drive a TimeBudget whose successive evaluation-cost measurements are ``costs`` (the last repeats)."""
    costs, cfg = list(costs), wsd(warmup_steps=5, decay_fraction=0.3)
    b, clock, step = TimeBudget(budget_s), start_s, 0
    b.start(0)
    while step < b.current():
        clock, step = clock + per_step, step + 1
        b.after_step(step, clock, lambda: costs.pop(0) if len(costs) > 1 else costs[0],
                     lambda n: decay_start(cfg, n))
    return b


def test_a_stall_while_measuring_the_evaluation_neither_refuses_nor_shortens_the_run():
    """A loaded machine stalled one measurement of the final evaluation (56 s for a 1 s evaluation) and the
    run was refused. The least of several measurements is used, and a refusal measures once more."""
    steady, _, _ = simulate(budget_s=30.0, per_step=0.1)       # a 0.5 s evaluation throughout
    assert run_with_eval_costs([10.0, 0.5]).max_steps == steady.max_steps   # the first plan was short: regained
    assert run_with_eval_costs([40.0, 0.5]).max_steps == steady.max_steps   # no room at first: measured again
    with pytest.raises(RunError, match="the final evaluation needs ~40.0 s"):  # a real 40 s evaluation
        run_with_eval_costs([40.0])


def test_the_plan_survives_a_checkpoint():
    b, _, _ = simulate(budget_s=30.0, per_step=0.1)
    restored = TimeBudget(30.0)
    restored.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert restored.current() == b.max_steps and restored.locked
    restored.start(b.max_steps - 3)
    assert not restored.after_step(b.max_steps - 3 + SKIP + FIRST_PLAN, 1.0, lambda: 0.0, lambda n: 0)


def test_planning_cadence():
    """Measure from SKIP steps into the launch; first plan FIRST_PLAN steps in; then every INTERVAL;
    the final evaluation is measured at the first MEASURES plans."""
    b, evals, planned_at = TimeBudget(1e6), [], []
    b.start(100)
    for step in range(101, 140):
        b.after_step(step, float(step), lambda: evals.append(step) or 0.0, lambda n: 10 ** 9,
                     agree=lambda n: planned_at.append(step) or n)
    assert planned_at == list(range(100 + FIRST_PLAN, 140, INTERVAL)) and evals == planned_at[:MEASURES]
    assert b.max_steps == 139 + math.floor(1e6 - 139 - 1 - time_budget.RESERVE * 1e6)  # 1 s per step


def test_max_steps_null_needs_a_budget():
    with pytest.raises(ConfigError, match="train.max_steps=None: is null, so the run's length must come from"):
        TrainConfig(max_steps=None)
    assert TrainConfig(max_steps=None, time_budget_s=10.0).max_steps is None


def test_a_budgeted_run_plans_its_steps_ends_annealed_and_is_finished(tmp_path, corpus_file, data_dir, monkeypatch):
    from minillm.trainer import train
    import minillm.trainer as trainer_module
    import time

    run = tmp_path / "run"
    monkeypatch.setattr(trainer_module, "process_start_time", time.time)  # in-process: the run's own clock
    cfg = TrainJobConfig(
        out_dir=str(run), device="cpu",
        model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32), data=DataConfig(path=str(corpus_file)),
        tokenizer=TokenizerConfig(vocab_size=400), optim=OptimConfig(schedule="wsd", warmup_steps=3),
        train=TrainConfig(max_steps=None, time_budget_s=10.0, batch_size=4, log_interval=1, eval_interval=0),
        logger=LoggerConfig(progress=False))
    import dataclasses
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "prepare"), train=TrainConfig(max_steps=1)))  # the data, untimed
    summary = train(cfg)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = summary["step"]
    assert steps > SKIP + FIRST_PLAN and records[-1]["step"] == steps and "val_bpb" in records[-1]
    assert records[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)  # annealed
    assert records[-1]["elapsed_s"] < 2 * 10.0  # not a speed test: the plan did not run away
    from minillm import checkpoint as ckpt
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert state["budget"] == {"budget_s": 10.0, "max_steps": steps, "locked": True}
    again = train(cfg)  # the same command again: the run is finished, nothing is trained
    assert again["step"] == steps and len((run / "metrics.jsonl").read_text().splitlines()) == len(records)


def test_process_start_time_is_before_now():
    import time
    assert time.time() - 3600 < time_budget.process_start_time() <= time.time()

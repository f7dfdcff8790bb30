"""Time-budgeted runs: train.max_steps planned so that the run, its final evaluation included, ends
when ``train.time_budget_s`` seconds have passed since the process started.

    budget = TimeBudget(budget_s, cap=train.max_steps or None)      a checkpointed component
    budget.after_step(step, elapsed_s, eval_seconds, decay_from)  -> whether max_steps changed

The clock is the run's: seconds since this process started (interpreter, imports, Hydra, data
preparation and model build all count), plus the time of earlier launches when a run is resumed.

Planning, after every INTERVAL steps:
- seconds per step = the mean over the last WINDOW steps, not counting the first ``SKIP`` of this
  launch (their one-time costs, allocation and lazy initialisation, are not steps' cost); periodic
  evaluations and checkpoints in between are included, so their cost is spread over the steps;
- the final evaluation costs ``eval_s``: the least of MEASURES measurements by the trainer (one
  evaluation batch's forward times the number of batches) at this launch's first plans, so that one
  stall of a loaded machine during a measurement (measured: 56 s estimated for a 1 s evaluation) can
  neither refuse the run nor shorten its plan for good; before refusing, it is measured once more;
- max_steps = step + floor((budget - elapsed - eval_s - reserve) / seconds per step), reserve = one
  step + RESERVE of the budget for jitter; at most the cap (train.max_steps when set).
The plan may move either way while no learning rate taken so far depended on it: until the schedule's
decay begins (optimizer.decay_start: for schedule=wsd the last decay_fraction of the steps, the
reason budgeted runs use it). From then on it is locked against growing, so the run ends annealed at
its last step; it may still shrink when the steps slow down (a machine whose load changed: measured,
steps at 9,500 tokens/s fell to 6,000 mid-run and ended 1 s late without this), which steepens the
rest of the decay (a small downward step in lr) and still ends at its floor on the last step.
The state (plan, locked) is saved with every checkpoint: a resumed run finishes the same plan.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from minillm.errors import RunError

SKIP = 2          # steps of each launch whose time is not used to plan (one-time costs)
FIRST_PLAN = 6    # steps of each launch before its first plan
INTERVAL = 10     # steps between re-plans
WINDOW = 50       # the seconds per step are measured over (at most) the last WINDOW steps
RESERVE = 0.02    # of the budget, kept for jitter
MEASURES = 3      # the final evaluation's cost is measured at this many of each launch's first plans


def process_start_time() -> float:
    """Unix time this process started: /proc/self/stat's start time (Linux), else when minillm was
    imported (slightly later: the interpreter's own start is not seen)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        start = btime + ticks / os.sysconf("SC_CLK_TCK")
        return start if abs(start - time.time()) < 86_400 else _IMPORTED
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


class TimeBudget:
    """Plans max_steps for ``budget_s`` seconds of run time (see the module docstring).

    ``after_step`` is called after every step by every rank; ``agree`` makes the ranks' plans one
    (the trainer passes an all-reduce max; single process: the identity)."""

    def __init__(self, budget_s: float, cap: int | None = None):
        self.budget_s, self.cap = float(budget_s), cap
        self.max_steps: int | None = None  # the plan; None until the first one
        self.locked = False
        self._launch_step = 0                      # the step this launch started at
        self._t0: tuple[int, float] | None = None  # (step, elapsed) where this launch's measurement starts
        self._eval_s: float | None = None          # the least measured cost of the final evaluation
        self._measured = 0                         # measurements of it this launch
        self._samples: list[tuple[int, float]] = []  # (step, elapsed) at each plan of this launch

    def state_dict(self) -> dict:
        return {"budget_s": self.budget_s, "max_steps": self.max_steps, "locked": self.locked}

    def load_state_dict(self, state: dict) -> None:
        self.max_steps, self.locked = state["max_steps"], bool(state["locked"])

    def start(self, step: int) -> None:
        """This launch trains from ``step`` (0, or the step of the checkpoint it resumed)."""
        self._launch_step, self._t0 = step, None

    def current(self) -> int:
        """max_steps as planned so far; before the first plan, a bound the first steps cannot reach."""
        if self.max_steps is not None:
            return self.max_steps
        return self.cap if self.cap is not None else 10 ** 9

    def after_step(self, step: int, elapsed_s: float, eval_seconds, decay_from, agree=lambda n: n) -> bool:
        """Re-plan if due after 1-based ``step`` at ``elapsed_s`` seconds of run time; returns whether
        max_steps changed. ``eval_seconds()`` measures the final evaluation's cost (at the first MEASURES
        plans; every rank calls it equally often); ``decay_from(max_steps)`` is the first 0-based step
        whose lr depends on max_steps. Raises RunError when the budget leaves no room for another step."""
        n = step - self._launch_step
        if n < SKIP or (self._t0 is not None and (n < FIRST_PLAN or (n - FIRST_PLAN) % INTERVAL)):
            return False
        if self._t0 is None:
            self._t0 = (step, elapsed_s)
            self._samples = [self._t0]
            return False
        if self._measured < MEASURES:
            self._measure(eval_seconds)
        self._samples = [p for p in self._samples if p[0] >= step - WINDOW] or self._samples[-1:]
        first = self._samples[0]
        self._samples.append((step, elapsed_s))
        per_step = (elapsed_s - first[1]) / (step - first[0])
        planned = self._plan(step, elapsed_s, per_step, agree)
        if planned <= step and self.max_steps is None:  # the same on every rank (agreed): so is this branch
            self._measure(eval_seconds)  # a stall while measuring must not refuse the run
            planned = self._plan(step, elapsed_s, per_step, agree)
            if planned <= step:
                raise RunError(f"train.time_budget_s={self.budget_s:g}: {elapsed_s:.1f} s have passed at step "
                               f"{step} ({per_step:.2f} s per step) and the final evaluation needs "
                               f"~{self._eval_s:.1f} s; raise the budget, or make the run cheaper (a smaller "
                               "model or batch)")
        planned = max(planned, step)  # out of time: stop here
        if self.cap is not None:
            planned = min(planned, self.cap)
        if self.locked:  # the decay has begun: only a shorter plan (the machine slowed down) is taken
            planned = min(planned, self.max_steps)
        changed, self.max_steps = planned != self.max_steps, planned
        if step + INTERVAL > decay_from(planned) or planned <= step:  # the next plan would come too late
            self.locked = True
        return changed

    def _measure(self, eval_seconds) -> None:
        cost = eval_seconds()
        self._eval_s = cost if self._eval_s is None else min(self._eval_s, cost)
        self._measured += 1

    def _plan(self, step: int, elapsed_s: float, per_step: float, agree) -> int:
        """The last step that leaves one step, the final evaluation and the reserve inside the budget."""
        left = self.budget_s - elapsed_s - self._eval_s - per_step - RESERVE * self.budget_s
        return agree(step + math.floor(left / per_step))

"""Step guards: nothing non-finite reaches the weights, and (optionally) no update from a loss spike.

The trainer asks ``StepGuard.check(loss, grad_norm)`` after the backward pass and before
``optimizer.step()``. "ok" means apply the update; anything else means skip it (gradients dropped,
weights and optimizer state untouched). A non-finite step under policy "stop", or more skipped
non-finite steps than the limit, raises ``NonFiniteError``: the run ends without a checkpoint of the
bad state (the previous checkpoint stays the newest).
"""
from __future__ import annotations

import math
from collections import deque


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf and the policy says stop."""


class _Window:
    """Running mean/std over the last n values (for z-scores)."""

    def __init__(self, n: int):
        self.values: deque[float] = deque(maxlen=n)

    def zscore(self, x: float) -> float:
        if len(self.values) < self.values.maxlen:
            return 0.0  # not enough history yet: never flag during warm-up
        mean = sum(self.values) / len(self.values)
        var = sum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1)
        return (x - mean) / math.sqrt(var) if var > 0 else 0.0

    def push(self, x: float) -> None:
        self.values.append(x)


class StepGuard:
    def __init__(self, nan_policy: str = "skip", max_skipped: int = 10, spike_zscore: float = 0.0,
                 spike_window: int = 100):
        self.nan_policy, self.max_skipped = nan_policy, max_skipped
        self.spike_zscore = spike_zscore  # 0 disables the spike guard
        self.loss_window, self.gnorm_window = _Window(spike_window), _Window(spike_window)
        self.skipped_nonfinite = 0
        self.skipped_spikes = 0
        self.consecutive_spikes = 0

    def check(self, step: int, loss: float, grad_norm: float) -> str:
        """"ok", or the reason the update at ``step`` is skipped ("nonfinite" | "spike")."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.skipped_nonfinite += 1
            if self.nan_policy == "stop":
                raise NonFiniteError(f"step {step}: loss={loss} grad_norm={grad_norm} is not finite "
                                     "(train.nan_policy=stop); the last checkpoint is intact")
            if self.skipped_nonfinite > self.max_skipped:
                raise NonFiniteError(f"step {step}: {self.skipped_nonfinite} non-finite steps skipped, over "
                                     f"train.max_skipped_steps={self.max_skipped}; lower optim.lr or check "
                                     "the data; the last checkpoint is intact")
            return "nonfinite"
        # Outlier detection in the spirit of llm.c's z-score guard: compare against the recent window.
        # The window takes every finite value, skipped or not, so a lasting level shift becomes the new
        # normal instead of stalling the run; and no more than max_skipped spikes are skipped in a row.
        spike = self.spike_zscore > 0 and (self.loss_window.zscore(loss) > self.spike_zscore
                                           or self.gnorm_window.zscore(grad_norm) > self.spike_zscore)
        self.loss_window.push(loss)
        self.gnorm_window.push(grad_norm)
        if spike and self.consecutive_spikes < self.max_skipped:
            self.consecutive_spikes += 1
            self.skipped_spikes += 1
            return "spike"
        self.consecutive_spikes = 0
        return "ok"

    def state_dict(self) -> dict:
        return {"skipped_nonfinite": self.skipped_nonfinite, "skipped_spikes": self.skipped_spikes,
                "consecutive_spikes": self.consecutive_spikes,
                "loss_window": list(self.loss_window.values), "gnorm_window": list(self.gnorm_window.values)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_nonfinite, self.skipped_spikes = state["skipped_nonfinite"], state["skipped_spikes"]
        self.consecutive_spikes = state.get("consecutive_spikes", 0)
        self.loss_window.values.extend(state["loss_window"])
        self.gnorm_window.values.extend(state["gnorm_window"])

"""The counters of a run, as a checkpointed component: step, tokens seen, best validation loss."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    step: int = 0                        # optimizer steps taken (skipped ones included)
    tokens_seen: int = 0                 # training tokens consumed, over all ranks
    best_val_loss: float = float("inf")  # lowest validation loss (nats per token) so far

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.best_val_loss = float(state["best_val_loss"])

"""Every random number generator a run uses, captured and restored (for bitwise-exact resume)."""
from __future__ import annotations

import random

import numpy as np
import torch

from minillm.distributed.process_group import DistInfo, all_gather_object


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """python, numpy, torch CPU and (if present) every CUDA device's generator state."""
    _, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": list(py_state), "python_gauss": py_gauss,
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_gauss": [int(np_state[3]), float(np_state[4])], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


class RngStreams:
    """Every rank's generators as a checkpointed component.

    ``state_dict()`` is a collective (every rank calls it): it gathers one entry per rank, so a resume
    at the same world size restores each rank its own streams; at another world size each rank takes
    rank 0's (the trainer warns; the batches stay the same when the global batch does).
    """

    def __init__(self, info: DistInfo):
        self.info = info

    def state_dict(self) -> list[dict]:
        return all_gather_object(rng_state(), self.info)

    def load_state_dict(self, states: list[dict] | dict) -> None:
        states = states if isinstance(states, list) else [states]
        set_rng_state(states[self.info.rank] if len(states) == self.info.world_size else states[0])

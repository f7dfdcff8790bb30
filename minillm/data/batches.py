"""Batches from a token stream: the resumable, rank-aware training batch source and evaluation windows.

Training (BatchSource) draws windows of block_size + 1 tokens without replacement: each epoch shifts the window
grid by a seeded offset in [0, block_size) and visits the windows in a seeded permutation, so every
window is seen once per epoch, ranks never overlap, and the source's whole state is (seed, epoch, pos).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from minillm.errors import DataError


class BatchSource:
    """Training batches for one rank: ``next_batch()`` -> (x, y); ``state_dict()`` resumes it exactly.

    Raises DataError when the split holds fewer than batch_size * world_size windows.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.B, self.T = tokens, batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # Same count for every epoch offset: starts o + i*T with start + T + 1 <= N for all o < T.
        self.n_windows = max(0, (len(tokens) - block_size) // block_size)
        if self.n_windows < batch_size * world_size:
            raise DataError(f"training split has {len(tokens)} tokens: fewer than batch_size*world_size="
                             f"{batch_size * world_size} windows of block_size+1={block_size + 1}; "
                             "use a larger corpus or lower train.batch_size / model.block_size")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order, self._offset = -1, None, 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])

    def _epoch_order(self) -> tuple[torch.Tensor, int]:
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._offset = int(torch.randint(self.T, (1,), generator=g))
            self._order = torch.randperm(self.n_windows, generator=g)
            self._order_epoch = self.epoch
        return self._order, self._offset

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (B, T) for this rank; y is x shifted by one token."""
        step = self.B * self.world_size
        if self.pos + step > self.n_windows:
            self.epoch, self.pos = self.epoch + 1, 0
        order, offset = self._epoch_order()
        mine = order[self.pos + self.rank * self.B: self.pos + (self.rank + 1) * self.B].numpy()
        self.pos += step
        starts = offset + mine.astype(np.int64) * self.T
        windows = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.T + 1)].astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


def eval_batch_count(n_tokens: int, batch_size: int, block_size: int, max_tokens: int | None = None,
                     world_size: int = 1) -> int:
    """Batches every rank's ``eval_batches`` yields for a stream of ``n_tokens``: rank 0's windows (the
    most any rank has, windows being dealt round-robin) in batches of ``batch_size``."""
    n = n_tokens if max_tokens is None else min(n_tokens, max_tokens + 1)
    rank0_windows = -(-len(range(0, n - 1, block_size)) // world_size)
    return -(-rank0_windows // batch_size)


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, max_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows covering every target of ``tokens[:max_tokens]`` exactly once.

    The last window is padded (inputs 0, targets -1, which the loss ignores). Windows are dealt to
    ranks round-robin; together the ranks cover each target once. Every rank yields the same number
    of batches (a rank short of windows gets one of all-ignored targets), because a sharded model's
    forward is a collective that every rank must join.
    """
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    starts = list(range(0, n - 1, block_size))[rank::world_size]
    for b in range(eval_batch_count(len(tokens), batch_size, block_size, max_tokens, world_size)):
        i = b * batch_size
        x = torch.zeros(max(1, len(starts[i:i + batch_size])), block_size, dtype=torch.int64)
        y = torch.full_like(x, -1)
        for row, s in enumerate(starts[i:i + batch_size]):
            chunk = torch.from_numpy(np.asarray(tokens[s:min(s + block_size + 1, n)]).astype(np.int64))
            x[row, :len(chunk) - 1] = chunk[:-1]
            y[row, :len(chunk) - 1] = chunk[1:]
        yield x, y

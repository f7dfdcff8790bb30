"""The KV cache for generation: past keys and values of every layer, preallocated, GQA-shaped.

The model writes each new token's keys/values here (prefill: the whole prompt at once; decode: one
token per step) and attends to everything cached so far instead of recomputing it.
"""
from __future__ import annotations

import torch

from minillm.config import ModelConfig


class KVCache:
    """Preallocated keys/values for every layer, (n_layer, B, n_kv_head, max_len, head_dim) each.

    Rows may hold different numbers of tokens (prompts of different lengths, right-padded, or rows
    whose sliding window was refilled): row b's next token goes to slot lens[b], has position
    lens[b], and attends to slots [0, lens[b]]. Slots past a row's length hold junk and are masked.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.reset()

    def reset(self) -> None:
        self.lens = torch.zeros(self.k.shape[1], dtype=torch.long, device=self.k.device)  # tokens per row
        self.pos = 0           # max(lens): slots in use by the longest row
        self.ragged = False    # rows differ in length: attention needs a mask, writes go per row

    def set_lengths(self, lens: list[int]) -> None:
        """Declare how many written slots of each row are real (after a right-padded prefill)."""
        self.lens = torch.tensor(lens, dtype=torch.long, device=self.k.device)
        self.pos, self.ragged = max(lens), len(set(lens)) > 1

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows in ``index`` (1-D, in order): finished rows stop costing compute and memory."""
        self.k, self.v = self.k[:, index], self.v[:, index]
        self.set_lengths(self.lens[index].tolist())

    def row(self, b: int) -> "KVCache":
        """An empty cache for row b alone that shares this cache's storage (to refill one row)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, b:b + 1], self.v[:, b:b + 1], self.max_len
        view.reset()
        return view

    def positions(self, T: int) -> torch.Tensor:
        """(B, T): the slot, and the position, of each of T new tokens in every row."""
        return self.lens[:, None] + torch.arange(T, device=self.lens.device)

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, pos+T) bool, True where a new query may attend; None when no mask is needed
        (equal rows: a prefill from slot 0 is plain causal, one new token sees every cached key)."""
        if not self.ragged and (self.pos == 0 or T == 1):
            return None
        keys = torch.arange(self.pos + T, device=self.lens.device)
        return (keys[None, None, :] <= self.positions(T)[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) after each row's cached ones; return slots [0, pos+T)."""
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.pos} + {T} do not fit")
        if self.ragged:  # per-row slots (B, T); the indexed view is (B, T, H_kv, D)
            slots, rows = self.positions(T), torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, :, slots] = k.transpose(1, 2)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
        else:
            self.k[layer, :, :, self.pos:self.pos + T] = k
            self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        """Count T new tokens in every row (called by GPT.forward after all layers wrote them)."""
        self.lens = self.lens + T
        self.pos += T

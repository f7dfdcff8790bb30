"""Autoregressive sampling with a KV cache: prefill the prompt once, then one token per forward.

Past block_size the context slides: without a cache the model sees the last block_size tokens each
step; with a cache, when it is full, the newest block_size/2 tokens are prefilled again and decoding
goes on from there (a cheaper window that keeps every step O(block_size)).
"""
from __future__ import annotations

from typing import Callable

import torch

from minillm.model import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1). temperature 0 is greedy; top_k 0 and top_p 1 disable."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Nucleus (Holtzman et al., 2020): keep the smallest set of tokens whose mass reaches top_p.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, kv_cache: bool = True,
             eos_id: int | None = None, on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens; stops early once every row has produced eos_id.

    on_token, if given, is called with each new column (B,) as soon as it is sampled (streaming).
    """
    model.eval()
    T_max = model.cfg.block_size
    cache = None
    if kv_cache:
        p = next(model.parameters())
        cache = KVCache(model.cfg, idx.size(0), T_max, p.device, p.dtype)
    out = idx
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    pending = out[:, -T_max:]  # tokens the model has not seen yet
    for _ in range(max_new_tokens):
        if cache is not None and cache.pos + pending.size(1) > T_max:
            cache.reset()
            pending = out[:, -(T_max // 2):]
        elif cache is None:
            pending = out[:, -T_max:]
        logits, _ = model(pending, kv_cache=cache)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        out = torch.cat((out, nxt), dim=1)
        pending = nxt
        if on_token is not None:
            on_token(nxt[:, 0])
        if eos_id is not None:
            done |= nxt[:, 0] == eos_id
            if bool(done.all()):
                break
    return out

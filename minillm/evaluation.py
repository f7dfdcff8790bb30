"""Validation: loss per token and bits per byte of the raw text, summed over ranks."""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from minillm.data.batches import eval_batch_count, eval_batches
from minillm.distributed import process_group as dist


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, token_bytes: torch.Tensor, batch_size: int,
             block_size: int, max_tokens: int | None, info: dist.DistInfo, amp) -> tuple[float, float]:
    """(mean loss in nats per token, bits per byte) over every target of ``tokens[:max_tokens + 1]``.

    tokens: the validation token stream; token_bytes (vocab_size,) int64: raw-text bytes each token
    covers (0 for specials). Bits per byte = sum of target nats / ln 2 / sum of target bytes: the
    text's cost under the model, comparable across tokenizers (as in Gao et al., 2020, The Pile).
    Every rank calls this (a collective); each scores its share of the windows. NaN for no targets.

    A model vocabulary padded past the tokenizer's (model.vocab_size > len(token_bytes)) has ids no
    text can hold, which sampling never draws (generation.Engine cuts them off). So when the logits are
    wider than token_bytes, a target's nats are -log softmax(logits[:len(token_bytes)])[target]: the
    cost of the text under the model restricted to the tokenizer's ids (the padding ids' probability
    mass renormalized away), which is what the sampler draws from. Without padding this is the
    model's own per-token loss, unchanged.
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # nats, tokens, bytes
    for x, y in eval_batches(tokens, batch_size, block_size, max_tokens, info.rank, info.world_size):
        x, y = x.to(info.device), y.to(info.device)
        with amp:
            logits, nll = model(x, y, reduction="none")
        if logits.size(-1) > len(token_bytes):  # padded vocabulary: the tokenizer's ids only
            nll = restricted_nll(logits, y, len(token_bytes))
        valid = y >= 0
        sums[0] += nll[valid].double().sum()
        sums[1] += valid.sum()
        sums[2] += token_bytes[y[valid]].sum()
    dist.all_reduce_sum(sums, info)
    model.train()
    nats, count, nbytes = sums.tolist()
    if count == 0:
        return float("nan"), float("nan")
    return nats / count, nats / math.log(2) / max(nbytes, 1)


@torch.no_grad()
def estimate_seconds(model: torch.nn.Module, tokens: np.ndarray, batch_size: int, block_size: int,
                     max_tokens: int | None, info: dist.DistInfo, amp) -> float:
    """Seconds ``evaluate`` will take with these arguments, without running it: one of its batches'
    forward (the faster of two calls) times the number of batches each rank scores."""
    x, y = (t.to(info.device) for t in next(eval_batches(tokens, batch_size, block_size, max_tokens)))
    model.eval()
    times = []
    with amp:
        for _ in range(2):
            t0 = time.time()
            model(x, y, reduction="none")
            times.append(time.time() - t0)
    model.train()
    return min(times) * eval_batch_count(len(tokens), batch_size, block_size, max_tokens, info.world_size)


def restricted_nll(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, T) nats of each target under softmax over the first ``vocab`` logits; 0 where target is -1."""
    flat = logits[..., :vocab].float().reshape(-1, vocab)
    nll = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=-1, reduction="none")
    return nll.view(targets.shape)

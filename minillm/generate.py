"""Autoregressive sampling: a KV cache, sampling controls, batches of prompts, stop strings, streaming.

A batch holds rows of different lengths: prompts are right-padded for the prefill (a causal mask
already keeps each real token from seeing the padding after it), and the KV cache keeps a length per
row, so every row's positions start at 0 and its tokens do not depend on its batch mates.

Context past block_size slides; every model can do this (learned and rope positions alike restart at
0 at the window's first token; no model is refused):
* without a cache, each step feeds the row's newest block_size tokens: an exact sliding window;
* with a cache, when a row's cache is full its newest block_size//2 tokens are prefilled again, alone,
  and decoding goes on from there: every step stays O(block_size), at the price of a window that
  shrinks to block_size//2 after each refill. Outputs of the two modes agree until a refill.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from minillm.kv_cache import KVCache
from minillm.model import GPT

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SamplingParams:
    temperature: float = 1.0         # 0 = greedy
    top_k: int = 0                   # 0 disables
    top_p: float = 1.0               # nucleus; 1.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's rule (Keskar et al., 2019): logits of tokens already present (seen (B, V) bool) are
    divided by the penalty where positive and multiplied by it where negative."""
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Generators = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1). temperature 0 is greedy; top_k 0 and top_p 1 disable.

    generator: one for the whole batch, or one per row (then a row's draws do not depend on the others).
    """
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
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g) for b, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator)


def _last_logits(model: GPT, rows: list[list[int]], cache: KVCache | None) -> torch.Tensor:
    """Forward the right-padded rows (from cache slot 0); (B, V) logits at each row's last token."""
    device = next(model.parameters()).device
    lens = [len(r) for r in rows]
    idx = torch.zeros(len(rows), max(lens), dtype=torch.long, device=device)  # pad id 0: never attended
    for b, r in enumerate(rows):
        idx[b, :len(r)] = torch.tensor(r, device=device)
    if cache is not None:
        cache.reset()
    logits, _ = model(idx, kv_cache=cache)
    if cache is not None:
        cache.set_lengths(lens)
    return logits[torch.arange(len(rows), device=device), torch.tensor(lens, device=device) - 1]


def _decode_step(model: GPT, rows: list[list[int]], nxt: torch.Tensor, cache: KVCache,
                 cached: list[int]) -> torch.Tensor:
    """Feed the new tokens nxt (B, 1) through the cache; first refill, alone, any row whose cache is full."""
    T_max, keep = model.cfg.block_size, model.cfg.block_size // 2
    full = [b for b in range(len(rows)) if cached[b] == T_max]
    for b in full:
        if keep:  # the newest block_size//2 tokens before the new one, prefilled at positions 0..keep-1
            _last_logits(model, [rows[b][-keep - 1:-1]], cache.row(b))
        cached[b] = keep
    if full:
        cache.set_lengths(cached)
    logits, _ = model(nxt, kv_cache=cache)
    for b in range(len(rows)):
        cached[b] += 1
    return logits[:, -1]


@torch.no_grad()
def generate_tokens(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    params: SamplingParams = SamplingParams(), generator: Generators = None,
                    kv_cache: bool = True, alive: list[bool] | None = None) -> Iterator[list[int | None]]:
    """Yield, for each of up to max_new_tokens steps, the new token of every row (a list of B ids).

    Prompts (non-empty, any lengths) longer than block_size keep their last block_size tokens.
    Stop early by leaving the loop; nothing is computed ahead of what was yielded. ``alive``, if
    given, is read after every step: rows the caller has set to False leave the batch (their
    entries are None from then on) and the generator ends when none is left. A row's tokens do not
    change when others leave if every row has its own generator (or sampling is greedy).
    """
    model.eval()
    T_max, V = model.cfg.block_size, model.cfg.vocab_size
    rows = [list(p)[-T_max:] for p in prompts]
    if not rows or not all(rows):
        raise ValueError("generate: every prompt needs at least one token")
    p = next(model.parameters())
    cache = KVCache(model.cfg, len(rows), T_max, p.device, p.dtype) if kv_cache else None
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(rows), V, dtype=torch.bool, device=p.device)
        for b, r in enumerate(rows):
            seen[b, r] = True
    logits = _last_logits(model, rows, cache)
    cached = [len(r) for r in rows]
    active = list(range(len(rows)))  # the original row of each batch slot
    for step in range(max_new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, params.repetition_penalty)
        nxt = sample_next(logits, params.temperature, params.top_k, params.top_p, generator)
        if seen is not None:
            seen.scatter_(1, nxt, True)
        ids = nxt[:, 0].tolist()
        for r, t in zip(rows, ids):
            r.append(t)
        out: list[int | None] = [None] * len(prompts)
        for b, t in zip(active, ids):
            out[b] = t
        yield out
        if step + 1 == max_new_tokens:
            break
        if alive is not None and not all(alive[b] for b in active):
            keep = [slot for slot, b in enumerate(active) if alive[b]]
            if not keep:
                break
            index = torch.tensor(keep, device=nxt.device)
            active, rows, cached = [active[s] for s in keep], [rows[s] for s in keep], [cached[s] for s in keep]
            nxt = nxt[index]
            seen = seen[index] if seen is not None else None
            if isinstance(generator, (list, tuple)):
                generator = [generator[s] for s in keep]
            if cache is not None:
                cache.keep_rows(index)
        logits = (_decode_step(model, rows, nxt, cache, cached) if cache is not None
                  else _last_logits(model, [r[-T_max:] for r in rows], None))


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: Generators = None, kv_cache: bool = True,
             eos_id: int | None = None, on_token: Callable[[torch.Tensor], None] | None = None,
             repetition_penalty: float = 1.0) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens; stops early once every row has produced eos_id.

    on_token, if given, is called with each new column (B,) as soon as it is sampled (streaming).
    """
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    cols, done = [], torch.zeros(idx.size(0), dtype=torch.bool)
    for ids in generate_tokens(model, idx.tolist(), max_new_tokens, params, generator, kv_cache):
        cols.append(torch.tensor(ids, dtype=idx.dtype))
        if on_token is not None:
            on_token(cols[-1])
        if eos_id is not None:
            done |= cols[-1] == eos_id
            if bool(done.all()):
                break
    if not cols:
        return idx
    return torch.cat((idx, torch.stack(cols, dim=1).to(idx.device)), dim=1)


class TextStream:
    """One row's text as tokens arrive: exact UTF-8 decoding (tokenizer.stream()), stop strings.

    push() returns the text that is safe to show now: it holds back a tail that could be the start
    of a stop string, and ends the text just before a stop string once one appears. The pieces,
    joined, equal ``text`` at the end.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder, self.stop = tokenizer.stream(), [s for s in stop if s]
        self.text, self.shown, self.done = "", 0, False

    def push(self, token_id: int | None) -> str:
        """Add a token (None: the row ended, flush); return the newly showable text."""
        if self.done:
            return ""
        self.text += self.decoder.push(token_id) if token_id is not None else self.decoder.flush()
        self.done = token_id is None
        start = max(0, self.shown - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.done = self.text[:min(hits)], True
        end = len(self.text) if self.done else len(self.text) - self._held_back()
        piece, self.shown = self.text[self.shown:end], max(self.shown, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)


def generate_text(model: GPT, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                  params: SamplingParams = SamplingParams(), seed: int = 0, num_samples: int = 1,
                  stop: Sequence[str] = (), kv_cache: bool = True,
                  on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Continuations of every prompt, num_samples each (row = prompt * num_samples + sample), all in
    one batch. Sample j of any prompt draws from seed + j, whatever else is in the batch.

    A row ends at max_new_tokens, at the tokenizer's EOS, or just before a stop string.
    on_text(row, piece) is called with text as soon as it is final (streaming).
    """
    return generate_rows(model, tokenizer, sample_rows(prompts, seed, num_samples), max_new_tokens, params,
                         stop, kv_cache, on_text)


def sample_rows(prompts: Sequence[str], seed: int, num_samples: int) -> list[tuple[str, int]]:
    """The (prompt, seed) rows of num_samples samples per prompt: row i * num_samples + j is prompt i's
    sample j, drawn from seed + j."""
    return [(p, seed + j) for p in prompts for j in range(num_samples)]


def generate_rows(model: GPT, tokenizer, rows: Sequence[tuple[str, int]], max_new_tokens: int,
                  params: SamplingParams = SamplingParams(), stop: Sequence[str] = (), kv_cache: bool = True,
                  on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """The continuation of each (prompt, seed) row, sampled as one batch; a row's text depends on its
    prompt and seed only, so any split of the rows into batches gives the same texts."""
    ids = [tokenizer.encode(p) for p, _ in rows]
    device = next(model.parameters()).device
    gens = [torch.Generator(device=device).manual_seed(s) for _, s in rows]
    streams = [TextStream(tokenizer, stop) for _ in ids]

    def emit(b: int, token: int | None) -> None:
        piece = streams[b].push(None if token == tokenizer.eos_id else token)
        if piece and on_text is not None:
            on_text(b, piece)

    alive = [True] * len(rows)  # a row that has ended leaves the batch
    for step_ids in generate_tokens(model, ids, max_new_tokens, params, gens, kv_cache, alive):
        for b, t in enumerate(step_ids):
            if t is not None:
                emit(b, t)
                alive[b] = not streams[b].done
    for b in range(len(streams)):
        emit(b, None)
    return [s.text for s in streams]

"""Generation: one Engine continues a batch of rows, token by token, behind one iterator of events.

    engine = Engine(model, tokenizer)
    for event in engine.generate([Row("ROMEO:", seed=1), Row("JULIET:", seed=2)], 100, params, stop=["\\n\\n"]):
        print(event.row, event.text, end="")          # text streamed as soon as it is final
    texts = engine.generate_texts(rows, 100, params)  # or just the final texts
    ids = Engine(model).generate_ids([Row([1, 2, 3])], 20)  # token level: no tokenizer needed

The engine (after nanochat's Engine) owns, for the length of one ``generate`` call, the KV cache and
every row's state: its tokens, its random generator, its text stream (stop strings, exact UTF-8),
whether it has ended, and (one row of a (B, V) mask, beside the cache's rows) its repetition history.
A row that ends (its token limit, EOS, a stop string) leaves the batch there and then: its cache and
mask rows are dropped and the others decode on, unchanged. Callers only read events.

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
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from minillm.kv_cache import KVCache
from minillm.model import GPT

if TYPE_CHECKING:
    from minillm.tokenizer import Tokenizer

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SamplingParams:
    temperature: float = 1.0         # 0 = greedy
    top_k: int = 0                   # 0 disables
    top_p: float = 1.0               # nucleus; 1.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V), seen (B, V) bool -> (B, V). CTRL's rule (Keskar et al., 2019): logits of tokens
    already present are divided by the penalty where positive and multiplied by it where negative."""
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Generators = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1). temperature 0 is greedy; top_k 0 and top_p 1 disable.

    top_p is nucleus sampling (Holtzman et al., 2020): the smallest set of most likely tokens whose
    probability mass reaches top_p. generator: one for the whole batch, or one per row (then a row's
    draws do not depend on the others).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g) for b, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator)


class TextStream:
    """One row's text as tokens arrive: exact UTF-8 decoding (tokenizer.stream()), stop strings.

    push() returns the text that is safe to show now: it holds back a tail that could be the start
    of a stop string, and ends the text just before a stop string once one appears. The pieces,
    joined, equal ``text`` at the end.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
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


@dataclass(frozen=True)
class Row:
    """One sequence to continue. prompt: text (needs the engine's tokenizer) or token ids, at least one
    token; only its last block_size tokens are used. seed: the row's own random generator, so its
    draws do not depend on the other rows. max_new_tokens: its own limit (None: the call's)."""
    prompt: str | Sequence[int]
    seed: int = 0
    max_new_tokens: int | None = None


def sample_rows(prompts: Sequence[str], seed: int, num_samples: int) -> list[Row]:
    """num_samples rows per prompt: row i * num_samples + j is prompt i's sample j, drawn from seed + j."""
    return [Row(p, seed + j) for p in prompts for j in range(num_samples)]


@dataclass(frozen=True)
class Event:
    """What one step did to one row."""
    row: int     # the row's index in the rows given to Engine.generate
    token: int   # the id it sampled (EOS included)
    text: str    # text that became final ("" without a tokenizer, or while it may begin a stop string)
    done: bool   # the row has ended (its limit, EOS, a stop string): no more events for it


@dataclass
class _RowState:
    """Everything that is one row's own while it is generated (nanochat's RowState)."""
    index: int                    # its place in the caller's rows
    tokens: list[int]             # its context: the prompt's last block_size tokens, then every new token
    generator: torch.Generator    # its draws
    left: int                     # new tokens it may still take
    stream: TextStream | None     # its text; None without a tokenizer
    cached: int = 0               # its tokens in the KV cache, in slots 0..cached-1
    done: bool = False


class Engine:
    """Continues rows with one model (and, for text, its tokenizer): see the module docstring.

    Only ids below ``vocab_limit`` are ever sampled, so none past the tokenizer's is streamed or
    decoded: the logits are cut to the first vocab_limit ids (the same as setting the others to -inf)
    before the repetition penalty, temperature, top-k and top-p; a padded model therefore draws, seed
    for seed, the tokens of the same weights without the padding rows (tested). The limit is
    ``vocab_limit`` if given (at most the tokenizer's), else the tokenizer's vocab_size (a model
    vocabulary padded past it, e.g. to a multiple of 64, has ids no piece stands for), else the
    model's vocab_size.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, vocab_limit: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        most = min(model.cfg.vocab_size, tokenizer.vocab_size if tokenizer is not None else model.cfg.vocab_size)
        limit = most if vocab_limit is None else vocab_limit
        if not 0 < limit <= most:
            raise ValueError(f"Engine: vocab_limit={limit} is not in 1..{most} (the model's and tokenizer's ids)")
        self.vocab_limit = limit

    @torch.no_grad()
    def generate(self, rows: Sequence[Row], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 stop: Sequence[str] = (), kv_cache: bool = True) -> Iterator[Event]:
        """Yield, step by step, one Event per row still in the batch (in row order).

        A row ends after its max_new_tokens (Row's own, else this one), at the tokenizer's EOS, or just
        before any of the stop strings (the last two need a tokenizer); its last event has done=True.
        Nothing is computed ahead of what was yielded: stop early by leaving the loop. A row's tokens
        depend on its prompt and seed only, not on its batch mates nor on when they end. Raises
        ValueError for an empty prompt or batch, and for text prompts or stop strings without a tokenizer.
        """
        self.model.eval()
        states = [s for s in self._start(rows, max_new_tokens, stop) if s.left > 0]
        if not states:
            return
        cache = self._new_cache(len(states)) if kv_cache else None
        seen = self._seen(states) if params.repetition_penalty != 1.0 else None
        logits = self._forward([s.tokens for s in states], cache)  # the prefill
        while True:
            nxt = self._sample(logits, states, seen, params)
            for s, token in zip(states, nxt[:, 0].tolist()):
                yield self._push(s, token)
            keep = [i for i, s in enumerate(states) if not s.done]
            if not keep:
                return
            if len(keep) < len(states):  # ended rows leave: their cache rows and history go with them
                index = torch.tensor(keep, device=nxt.device)
                states, nxt = [states[i] for i in keep], nxt[index]
                seen = seen[index] if seen is not None else None
                if cache is not None:
                    cache.keep_rows(index)
            logits = self._decode(states, nxt, cache)

    def generate_texts(self, rows: Sequence[Row], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                       stop: Sequence[str] = (), kv_cache: bool = True) -> list[str]:
        """The continuation text of every row (as generate; needs a tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("generate_texts: this engine has no tokenizer; use generate_ids")
        texts = [""] * len(rows)
        for e in self.generate(rows, max_new_tokens, params, stop, kv_cache):
            texts[e.row] += e.text
        return texts

    def generate_ids(self, rows: Sequence[Row], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                     stop: Sequence[str] = (), kv_cache: bool = True) -> list[list[int]]:
        """The new token ids of every row (as generate; a row that ends on EOS includes it)."""
        ids: list[list[int]] = [[] for _ in rows]
        for e in self.generate(rows, max_new_tokens, params, stop, kv_cache):
            ids[e.row].append(e.token)
        return ids

    def _start(self, rows: Sequence[Row], max_new_tokens: int, stop: Sequence[str]) -> list[_RowState]:
        """Every row's initial state: its prompt as ids, cut to the last block_size; its generator."""
        tok = self.tokenizer
        if tok is None and (stop or any(isinstance(r.prompt, str) for r in rows)):
            raise ValueError("generate: text prompts and stop strings need an engine with a tokenizer")
        device = next(self.model.parameters()).device
        states = []
        for i, r in enumerate(rows):
            ids = (tok.encode(r.prompt) if isinstance(r.prompt, str) else list(r.prompt))[-self.model.cfg.block_size:]
            states.append(_RowState(i, ids, torch.Generator(device=device).manual_seed(r.seed),
                                    max_new_tokens if r.max_new_tokens is None else r.max_new_tokens,
                                    TextStream(tok, stop) if tok is not None else None, cached=len(ids)))
        if not states or not all(s.tokens for s in states):
            raise ValueError("generate: every prompt needs at least one token")
        return states

    def _new_cache(self, batch_size: int) -> KVCache:
        p = next(self.model.parameters())
        return KVCache(self.model.cfg, batch_size, self.model.cfg.block_size, p.device, p.dtype)

    def _seen(self, states: list[_RowState]) -> torch.Tensor:
        """(B, V) bool: the tokens each row holds, for the repetition penalty."""
        seen = torch.zeros(len(states), self.model.cfg.vocab_size, dtype=torch.bool,
                           device=next(self.model.parameters()).device)
        for b, s in enumerate(states):
            seen[b, s.tokens] = True
        return seen

    def _sample(self, logits: torch.Tensor, states: list[_RowState], seen: torch.Tensor | None,
                params: SamplingParams) -> torch.Tensor:
        """logits (B, V) -> next ids (B, 1), each row drawing from its own generator; records them in seen.
        Only the first vocab_limit logits take part: the ids past them are never drawn."""
        logits = logits[:, :self.vocab_limit]
        if seen is not None:
            logits = penalize_repeats(logits, seen[:, :self.vocab_limit], params.repetition_penalty)
        nxt = sample_next(logits, params.temperature, params.top_k, params.top_p, [s.generator for s in states])
        if seen is not None:
            seen.scatter_(1, nxt, True)
        return nxt

    def _push(self, s: _RowState, token: int) -> Event:
        """Give row s its new token; its event says what text became final and whether it ended."""
        s.tokens.append(token)
        s.left -= 1
        text = ""
        if s.stream is not None:
            text = s.stream.push(None if token == self.tokenizer.eos_id else token)
            if s.left == 0:
                text += s.stream.push(None)  # the limit: flush what was held back
        s.done = s.left == 0 or (s.stream is not None and s.stream.done)
        return Event(s.index, token, text, s.done)

    def _forward(self, contexts: list[list[int]], cache: KVCache | None) -> torch.Tensor:
        """Forward the right-padded contexts (from cache slot 0); (B, V) logits at each one's last token."""
        device = next(self.model.parameters()).device
        lens = [len(c) for c in contexts]
        idx = torch.zeros(len(contexts), max(lens), dtype=torch.long, device=device)  # pad id 0: never attended
        for b, c in enumerate(contexts):
            idx[b, :len(c)] = torch.tensor(c, device=device)
        if cache is not None:
            cache.reset()
        logits, _ = self.model(idx, kv_cache=cache)
        if cache is not None:
            cache.set_lengths(lens)
        return logits[torch.arange(len(contexts), device=device), torch.tensor(lens, device=device) - 1]

    def _decode(self, states: list[_RowState], nxt: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """(B, V) logits after the new tokens nxt (B, 1). With a cache, feed them through it, first
        refilling, alone, any row whose cache is full; without, forward each row's newest block_size."""
        T_max, keep = self.model.cfg.block_size, self.model.cfg.block_size // 2
        if cache is None:
            return self._forward([s.tokens[-T_max:] for s in states], None)
        full = [b for b, s in enumerate(states) if s.cached == T_max]
        for b in full:
            if keep:  # the newest block_size//2 tokens before the new one, prefilled at positions 0..keep-1
                self._forward([states[b].tokens[-keep - 1:-1]], cache.row(b))
            states[b].cached = keep
        if full:
            cache.set_lengths([s.cached for s in states])
        logits, _ = self.model(nxt, kv_cache=cache)
        for s in states:
            s.cached += 1
        return logits[:, -1]

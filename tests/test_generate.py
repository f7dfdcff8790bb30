"""The generation engine: KV cache exactness, batch independence, sliding window, sampling controls,
stop/EOS, rows leaving the batch, per-row limits, streaming decode (multi-byte characters, Chinese)."""
import itertools
import random

import pytest
import torch

from conftest import make_corpus
from minillm.config import ModelConfig, TokenizerConfig
from minillm.generation import (Engine, Row, SamplingParams, TextStream, penalize_repeats, sample_next,
                                sample_rows)
from minillm.kv_cache import KVCache
from minillm.model import GPT
from minillm.tokenizer import train_tokenizer

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [7, 7, 7, 30, 31]]


def model(vocab=61, sharpen=False, **kw) -> GPT:
    """A random GPT (seed 0). At init its tied head makes greedy decoding repeat one token, which
    would hide a wrong cache or position; sharpen unties the head and scales every matrix outside the
    embeddings by 80, so that greedy tokens vary and depend on the context (see ``varied``)."""
    torch.manual_seed(0)
    base = dict(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16)
    m = GPT(ModelConfig(**{**base, "tie_embeddings": not sharpen, **kw})).eval()
    with torch.no_grad():
        for name, w in m.named_parameters():
            if sharpen and w.dim() == 2 and "emb" not in name:
                w.mul_(80.0)
    return m


def tokens(m, prompts, n, params=GREEDY, seed=0, **kw) -> list[list[int]]:
    """The n new tokens of each prompt (each row drawing from ``seed``), token level: no tokenizer."""
    return Engine(m).generate_ids([Row(p, seed) for p in prompts], n, params, **kw)


def varied(rows: list[list[int]]) -> bool:
    """Every row holds more than 3 distinct tokens: equal greedy decodes then prove something."""
    return all(len(set(r)) > 3 for r in rows)


@pytest.fixture(scope="module")
def en_tok():
    return train_tokenizer([make_corpus(600)], TokenizerConfig(vocab_size=400))


@pytest.fixture(scope="module")
def zh_tok():
    rng = random.Random(0)
    chars = "红楼梦第一回甄士隐梦幻识通灵贾雨村风尘怀闺秀宝玉黛玉说道笑了我们你他的是不在这"
    text = "\n".join("".join(rng.choice(chars) for _ in range(rng.randint(5, 30))) for _ in range(400))
    return train_tokenizer([text], TokenizerConfig(vocab_size=400))


@pytest.mark.parametrize("pos,n_kv_head,qk_norm", list(itertools.product(["learned", "rope"], [4, 2, 1], [False, True])))
def test_cached_equals_uncached_at_temperature_0(pos, n_kv_head, qk_norm):
    # Within block_size (16): prompts of 1..7 tokens plus 9 new tokens, rows of different lengths.
    m = model(pos=pos, n_kv_head=n_kv_head, qk_norm=qk_norm, sharpen=True)
    cached = tokens(m, PROMPTS, 9, kv_cache=True)
    assert cached == tokens(m, PROMPTS, 9, kv_cache=False)
    assert varied(cached) and len(set(map(tuple, cached))) == len(PROMPTS)


def test_kv_cache_is_shaped_for_gqa():
    m = model(n_head=4, n_kv_head=1)
    cache = KVCache(m.cfg, 3, m.cfg.block_size, "cpu", torch.float32)
    assert cache.k.shape == (2, 3, 1, 16, 8) and cache.v.shape == cache.k.shape


@pytest.mark.parametrize("kv_cache", [True, False])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_a_prompts_tokens_do_not_depend_on_its_batch_mates(kv_cache, pos):
    # 40 new tokens on block_size 16: past the window too (cached rows refill at different steps).
    # Greedy tokens are compared for equality: padded and unpadded attention may differ in the last
    # ulp of a logit, which cannot change an argmax short of an exact tie.
    m = model(pos=pos, sharpen=True)
    batch = tokens(m, PROMPTS, 40, kv_cache=kv_cache)
    alone = [tokens(m, [p], 40, kv_cache=kv_cache)[0] for p in PROMPTS]
    assert batch == alone and varied(batch)


def reference_window(m, prompt, n, refill: bool) -> list[int]:
    """Greedy tokens from full forwards over the context the engine promises to use."""
    T, keep = m.cfg.block_size, m.cfg.block_size // 2
    seq, start = list(prompt), max(0, len(prompt) - T)
    for _ in range(n):
        if len(seq) - start > T:  # sliding: every step (no cache) or refill to keep + 1 tokens (cache)
            start = len(seq) - (keep + 1 if refill else T)
        logits, _ = m(torch.tensor([seq[start:]]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kv_cache", [True, False])
def test_sliding_window_past_block_size(kv_cache):
    m = model(pos="learned", sharpen=True)
    long_prompt = list(range(3, 23))  # 20 tokens > block_size: cut from the left
    for p in ([1, 2, 3], long_prompt):
        out = tokens(m, [p], 30, kv_cache=kv_cache)
        assert out[0] == reference_window(m, p, 30, refill=kv_cache) and varied(out)
    # Sampling past block_size keeps going, every row to its end, with ids in the vocabulary.
    sampled = tokens(model(pos="rope"), PROMPTS, 60, SamplingParams(temperature=1.0), kv_cache=kv_cache)
    assert [len(r) for r in sampled] == [60] * 4 and 0 <= min(map(min, sampled)) <= max(map(max, sampled)) < 61


def test_sample_next_controls():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)

    def support(**kw):
        draws = torch.cat([sample_next(logits, generator=g, **kw) for _ in range(300)])
        return set(draws.flatten().tolist())

    assert sample_next(logits, 0.0, 0, 1.0).item() == 0
    assert support(temperature=1.0, top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert support(temperature=1.0, top_k=2, top_p=1.0) == {0, 1}
    assert support(temperature=1.0, top_k=0, top_p=0.8) == {0, 1}      # 0.5 + 0.3 reaches 0.8
    assert support(temperature=1.0, top_k=0, top_p=0.81) == {0, 1, 2}
    assert support(temperature=1.0, top_k=1, top_p=1.0) == {0}
    assert support(temperature=0.05, top_k=0, top_p=1.0) == {0}         # near-greedy


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    # A random model's greedy output repeats; a strong penalty makes it pick unseen tokens.
    m = model()
    plain = tokens(m, [[1, 2]], 15)[0]
    penalized = tokens(m, [[1, 2]], 15, SamplingParams(temperature=0.0, repetition_penalty=1e3))[0]
    assert len(set(plain)) < 15 and len(set(penalized)) == 15 and not {1, 2} & set(penalized)


def test_seed_gives_the_same_text_and_each_sample_its_own(en_tok):
    engine = Engine(model(vocab=en_tok.vocab_size, block_size=32), en_tok)
    p = SamplingParams(temperature=1.0)

    def texts(prompts, seed, num_samples=3):
        return engine.generate_texts(sample_rows(prompts, seed, num_samples), 20, p)

    a = texts(["ROMEO:"], 7)
    assert a == texts(["ROMEO:"], 7)
    assert len(set(a)) == 3 and a != texts(["ROMEO:"], 8)
    # Sample j draws from seed + j whatever shares the batch.
    assert texts(["the king", "ROMEO:"], 7)[3:] == a
    assert texts(["ROMEO:"], 8, num_samples=1)[0] == a[1]


def test_text_stream_stops_before_a_stop_string_and_holds_back_its_prefix(en_tok):
    ids = en_tok.encode("the king and the queen")
    s = TextStream(en_tok, stop=["d the q"])
    pieces = [s.push(t) for t in ids] + [s.push(None)]
    assert s.text == "the king an" and "".join(pieces) == s.text and s.done
    # Until the stop string is complete, "d the" may begin it, so it is held back, never shown.
    shown = ""
    s = TextStream(en_tok, stop=["d the q"])
    for t in en_tok.encode("the king and the"):
        shown += s.push(t)
    assert shown == "the king an"
    assert s.push(None) == "d the" and s.text == "the king and the"


def test_stop_strings_and_eos_end_a_row(en_tok):
    m = model(vocab=en_tok.vocab_size, block_size=32, sharpen=True)
    engine, rows = Engine(m, en_tok), [Row("ROMEO:"), Row("the")]
    full = engine.generate_texts(rows, 30, GREEDY)
    assert varied([en_tok.encode(t) for t in full])
    stop = full[0][6:9]
    cut = engine.generate_texts(rows, 30, GREEDY, stop=[stop])
    assert cut[0] == full[0][:full[0].find(stop)]
    assert cut[1] == (full[1][:full[1].find(stop)] if stop in full[1] else full[1])
    # Text held back because it may begin a stop string is shown when the row reaches its limit.
    assert engine.generate_texts(rows, 30, GREEDY, stop=[full[0][-2:] + "\0"]) == full
    # EOS: pretend the first token that is new at step k >= 1 is the EOS; the row ends before it.
    hot = SamplingParams(temperature=1.0)
    ids = tokens(m, [en_tok.encode("ROMEO:")], 30, hot, seed=0)[0]
    k = next(i for i in range(1, 30) if ids[i] not in ids[:i])
    eos_tok = train_tokenizer([make_corpus(600)], TokenizerConfig(vocab_size=400))
    eos_tok.eos_id = ids[k]
    assert Engine(m, eos_tok).generate_texts([Row("ROMEO:", 0)], 30, hot)[0] == en_tok.decode(ids[:k])
    assert Engine(m, eos_tok).generate_ids([Row("ROMEO:", 0)], 30, hot)[0] == ids[:k + 1]  # EOS included


@pytest.mark.parametrize("kv_cache,penalty", [(True, 1.0), (True, 1.3), (False, 1.0)])
def test_finished_rows_leave_the_batch_and_the_others_do_not_change(en_tok, kv_cache, penalty):
    # Stop strings end rows at different steps; the rows left keep their own generators, cache slots
    # (one row crosses block_size 32 and refills its window) and repetition history.
    m = model(vocab=en_tok.vocab_size, block_size=32)
    with torch.no_grad():  # sharper than at init, so that a row's tokens depend on its cached context
        for w in m.parameters():
            w.mul_(3.0 if w.dim() == 2 else 1.0)
    engine = Engine(m, en_tok)
    rows = [Row("ROMEO:", 1), Row("the king", 2), Row("JULIET: o", 3), Row("NURSE:", 4), Row("good night", 5)]
    params, stop = SamplingParams(temperature=1.0, repetition_penalty=penalty), ["ea", "ng"]
    batch_sizes = []
    hook = m.register_forward_pre_hook(lambda mod, args, kw: batch_sizes.append(args[0].shape[0]), with_kwargs=True)
    events = list(engine.generate(rows, 40, params, stop, kv_cache))
    hook.remove()
    together = ["".join(e.text for e in events if e.row == b) for b in range(len(rows))]
    assert together == [engine.generate_texts([r], 40, params, stop, kv_cache)[0] for r in rows]
    unstopped = engine.generate_texts(rows, 40, params, (), kv_cache)
    ended = [t != u for t, u in zip(together, unstopped)]
    assert any(ended) and not all(ended), ended              # rows ended at different steps...
    assert batch_sizes[0] == 5 and min(batch_sizes) < 5      # ...and stopped costing compute
    assert batch_sizes == sorted(batch_sizes, reverse=True) or kv_cache  # (window refills run one row)
    for b in range(len(rows)):  # a row's last event, and only that one, says it is done
        assert [e.done for e in events if e.row == b] == [False] * (sum(e.row == b for e in events) - 1) + [True]


def test_a_row_stops_at_its_own_limit_and_leaves_the_batch():
    m = model(sharpen=True)
    limits = [3, 9, 1, 6]
    batch_sizes = []
    hook = m.register_forward_pre_hook(lambda mod, args, kw: batch_sizes.append(args[0].shape[0]), with_kwargs=True)
    limited = Engine(m).generate_ids([Row(p, max_new_tokens=n) for p, n in zip(PROMPTS, limits)], 50, GREEDY)
    hook.remove()
    assert limited == [r[:n] for r, n in zip(tokens(m, PROMPTS, 9), limits)]
    assert batch_sizes == [4, 3, 3, 2, 2, 2, 1, 1, 1]  # prefill, then one forward per step, ended rows gone
    assert tokens(m, PROMPTS, 0) == [[], [], [], []]
    # The repetition history of the rows left stays theirs (a strong penalty makes it decide every token).
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1e3)
    rows = [Row(p, max_new_tokens=n) for p, n in zip(PROMPTS, limits)]
    alone = [tokens(m, [p], n, penalized)[0] for p, n in zip(PROMPTS, limits)]
    assert Engine(m).generate_ids(rows, 50, penalized) == alone


@pytest.mark.parametrize("which", ["en", "zh"])
def test_streamed_text_equals_decoding_the_whole_sequence(which, en_tok, zh_tok):
    tok = en_tok if which == "en" else zh_tok
    m = model(vocab=tok.vocab_size, block_size=64)
    prompts = ["the king" if which == "en" else "宝玉说道", "ROMEO:" if which == "en" else "红楼梦"]
    pieces = {0: [], 1: []}
    for e in Engine(m, tok).generate(sample_rows(prompts, 3, 1), 60, SamplingParams(temperature=1.0)):
        pieces[e.row].append(e.text)
    texts = Engine(m, tok).generate_texts(sample_rows(prompts, 3, 1), 60, SamplingParams(temperature=1.0))
    for row in (0, 1):
        assert "".join(pieces[row]) == texts[row]
        assert sum(map(bool, pieces[row])) > 10  # it streamed, piece by piece
    if which == "zh":
        assert sum("\u4e00" <= ch <= "\u9fff" for ch in texts[0]) > 10
    # A random model emits byte-fallback tokens mid-character too; streaming matches decode exactly.
    tokens_row0 = tokens(m, [tok.encode(prompts[0])], 60, SamplingParams(temperature=1.0), seed=3)[0]
    if tok.eos_id in tokens_row0:  # a random model may emit EOS, which ends the row
        tokens_row0 = tokens_row0[:tokens_row0.index(tok.eos_id)]
    assert texts[0] == tok.decode(tokens_row0)


def test_a_character_split_over_byte_tokens_streams_whole(zh_tok):
    ids = zh_tok.encode("说龘道")  # 龘 is not in the vocabulary: three byte-fallback tokens
    assert len(ids) == 5
    s = TextStream(zh_tok)
    assert [s.push(t) for t in ids] == ["说", "", "", "龘", "道"]


def test_prompt_longer_than_block_size_keeps_its_tail():
    m = model(sharpen=True)
    long_prompt = list(range(1, 41))
    out = tokens(m, [long_prompt], 10)
    assert out == tokens(m, [long_prompt[-16:]], 10) and varied(out)
    with pytest.raises(ValueError, match="at least one token"):
        tokens(m, [[]], 5)
    with pytest.raises(ValueError, match="need an engine with a tokenizer"):
        Engine(m).generate_ids([Row("ROMEO:")], 5)

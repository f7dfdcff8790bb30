"""A model vocabulary padded past the tokenizer's (model.vocab_size=448 with a 400-piece tokenizer): the
ids no piece stands for are never sampled, streamed, decoded or counted in bits per byte. The padded
model is built from an unpadded one plus padding rows whose logits dominate, so the padded model with
its padding masked must give exactly the unpadded model's tokens, texts and losses."""
import contextlib
import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY_ARGS, make_corpus, run_entry
from minillm.config import TokenizerConfig
from minillm.distributed.process_group import DistInfo
from minillm.evaluation import evaluate
from minillm.generation import Engine, Row, SamplingParams, sample_rows
from minillm.model import GPT
from minillm.tokenizer import train_tokenizer
from test_generate import model as random_model

TOK_V, MODEL_V = 400, 448
PROMPTS = ["ROMEO:", "the king", "O", "JULIET: my lord"]


@pytest.fixture(scope="module")
def tok():
    t = train_tokenizer([make_corpus(600)], TokenizerConfig(vocab_size=TOK_V))
    assert t.vocab_size == TOK_V
    return t


def pad(base: GPT, vocab: int) -> GPT:
    """base with its vocabulary padded to ``vocab``: the padding rows of the head are 20x copies of the
    first rows, so that their logits dominate wherever those are positive."""
    cfg = type(base.cfg)(**{**base.cfg.__dict__, "vocab_size": vocab})
    padded = GPT(cfg).eval()
    state = base.state_dict()
    extra = vocab - base.cfg.vocab_size
    for name in ("tok_emb.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], 20 * state[name][:extra]])
    padded.load_state_dict(state)
    return padded


@pytest.fixture(scope="module")
def models():
    base = random_model(TOK_V, sharpen=True)
    return base, pad(base, MODEL_V)


def test_without_the_mask_the_padded_model_prefers_padding_ids(models, tok):
    """The precondition of the tests below: unmasked, the padding ids win."""
    _, padded = models
    ids = torch.tensor([tok.encode(p)[:3] for p in ("ROMEO:", "the king", "JULIET: my")])
    logits, _ = padded(ids)
    assert (logits[:, -1].argmax(-1) >= TOK_V).any()
    with pytest.raises(IndexError):  # what sample.py crashed with: the stream decoder has no such piece
        tok.stream().push(TOK_V)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5),
                                    SamplingParams(temperature=2.0, top_k=420, top_p=0.99, repetition_penalty=1.3)])
def test_engine_samples_only_the_tokenizers_ids(models, tok, params):
    base, padded = models
    rows = sample_rows(PROMPTS, 5, 2)
    want = Engine(base, tok).generate_ids(rows, 12, params)
    got = Engine(padded, tok).generate_ids(rows, 12, params)
    assert Engine(padded, tok).vocab_limit == TOK_V
    assert got == want and all(t < TOK_V for r in got for t in r)
    assert Engine(padded, tok).generate_texts(rows, 12, params) == Engine(base, tok).generate_texts(rows, 12, params)


def test_token_level_engine_takes_an_explicit_limit(models):
    base, padded = models
    rows = [Row([1, 2, 3], 0), Row([7, 8], 1)]
    hot = SamplingParams(temperature=3.0)
    assert any(t >= TOK_V for r in Engine(padded).generate_ids(rows, 30, hot) for t in r)  # no limit: all ids
    got = Engine(padded, vocab_limit=TOK_V).generate_ids(rows, 30, hot)
    assert got == Engine(base).generate_ids(rows, 30, hot)
    with pytest.raises(ValueError, match="vocab_limit=449"):
        Engine(padded, vocab_limit=MODEL_V + 1)


def test_evaluate_counts_only_the_tokenizers_ids(models, tok):
    """bpb of a padded model = the text's cost under softmax over the tokenizer's ids only, i.e. the
    unpadded model's; the padding ids' probability mass is not charged to the text."""
    base, padded = models
    stream = np.array(tok.encode(make_corpus(40, seed=3)), dtype=np.uint16)
    token_bytes = torch.from_numpy(tok.token_bytes())
    assert len(token_bytes) == TOK_V
    args = (stream, token_bytes, 3, 16, 200, DistInfo(), contextlib.nullcontext())
    want = evaluate(base, *args)
    got = evaluate(padded, *args)
    assert got == pytest.approx(want, rel=1e-6)
    # by hand: the first window's nats under log_softmax restricted to the first TOK_V logits
    x = torch.from_numpy(stream[:16].astype(np.int64))[None]
    y = torch.from_numpy(stream[1:17].astype(np.int64))
    with torch.no_grad():
        logp = torch.log_softmax(padded(x)[0][0, :, :TOK_V].double(), -1)
        full = torch.log_softmax(padded(x)[0][0].double(), -1)
    nats = -logp.gather(-1, y[:, None]).sum().item()
    one = evaluate(padded, stream[:17], token_bytes, 1, 16, None, DistInfo(), contextlib.nullcontext())
    assert one[0] == pytest.approx(nats / 16, rel=1e-5)
    assert one[1] == pytest.approx(nats / math.log(2) / token_bytes[y].sum().item(), rel=1e-5)
    assert -full.gather(-1, y[:, None]).sum().item() > nats + 1.0  # the unrestricted loss is another number


def test_sample_py_on_a_trained_padded_run(tmp_path, corpus_file, data_dir):
    """Train a tiny run with model.vocab_size=448 over a 400-piece tokenizer; sample.py at a high
    temperature (padding ids would be drawn within a few tokens) prints exactly the Engine's texts."""
    run = tmp_path / "run"
    r = run_entry("train.py", f"data.path={corpus_file}", f"out_dir={run}", *TINY_ARGS,
                  f"model.vocab_size={MODEL_V}", "train.max_steps=4", "train.eval_interval=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == MODEL_V
    bpb = [m["val_bpb"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in m]
    assert bpb and all(math.isfinite(b) for b in bpb)
    args = ("prompt=ROMEO:", "temperature=4.0", "top_k=0", "max_new_tokens=60", "num_samples=2", "seed=3", "device=cpu")
    r = run_entry("sample.py", f"ckpt={run}", *args)
    assert r.returncode == 0, r.stderr[-2000:]

    from minillm.run_folder import load_run
    loaded = load_run(run)
    assert loaded.model.cfg.vocab_size == MODEL_V and loaded.tokenizer.vocab_size == TOK_V
    engine = Engine(loaded.model, loaded.tokenizer)
    rows = sample_rows(["ROMEO:"], 3, 2)
    ids = engine.generate_ids(rows, 60, SamplingParams(temperature=4.0))
    assert all(t < TOK_V for row in ids for t in row)
    texts = ["ROMEO:" + t for t in engine.generate_texts(rows, 60, SamplingParams(temperature=4.0))]
    assert texts[0] in r.stdout and texts[1] in r.stdout

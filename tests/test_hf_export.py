"""Export to Hugging Face transformers (python -m minillm.export): logits, greedy tokens and tokenizer ids
match minillm's for every architecture it maps to; refusals and OUT_DIR rules are one line."""
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every load below is from a local folder
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from conftest import model_preset, ROOT, make_corpus  # noqa: E402
from minillm import checkpoint as ckpt  # noqa: E402
from minillm.config import ModelConfig, TokenizerConfig  # noqa: E402
from minillm.export import export, main  # noqa: E402
from minillm.generation import Engine, Row, SamplingParams  # noqa: E402
from minillm.hf_arch import ExportError, architecture, hf_config_fields, to_hf_state  # noqa: E402
from minillm.model import GPT  # noqa: E402
from minillm.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

MIXED = ("Hello, World!  Two  spaces,\ta tab\n\n and a blank line. 红楼梦 第一回 甄士隐梦幻识通灵 😀🎉👍🏽 "
         "café naïve ﬁ ｆｕｌｌ 12345 67\r\n   trailing spaces   ")
TEXT = make_corpus(600) + "甄士隐梦幻识通灵 贾雨村风尘怀闺秀 红楼梦 第一回\n" * 30 + "emoji 😀 and tabs\t\tand  spaces\n" * 10

# name -> ModelConfig options (shapes are added by small_model); norm_eps far from transformers' defaults
ARCHS = {
    "llama-mha-tied": dict(norm_eps=1e-3),
    "llama-gqa-untied-bias": dict(n_kv_head=2, tie_embeddings=False, bias=True, norm_eps=1e-4, rope_theta=500.0),
    "llama-mqa": dict(n_kv_head=1, norm_eps=1e-2),
    "qwen3-gqa": dict(n_kv_head=2, qk_norm=True, norm_eps=1e-3),
    "gpt2-tanh-bias": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, norm_eps=1e-3),
    "gpt2-exact-nobias-untied": dict(pos="learned", norm="layernorm", mlp="gelu", gelu_approximate="none",
                                     bias=False, tie_embeddings=False, norm_eps=1e-2, mlp_hidden=96),
}
EXPECTED = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread (and do not fight other processes for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return train_tokenizer([TEXT], TokenizerConfig(vocab_size=400))


def small_model(tok: Tokenizer, seed: int = 0, **options) -> GPT:
    """A random model whose every weight matters: attention peaked (large q/k), norm scales and biases
    away from 1 and 0, so a swapped split, a lost bias or a wrong eps moves the logits."""
    shape = dict(n_layer=2, n_head=4, n_embd=64, block_size=48, vocab_size=tok.vocab_size)
    cfg = ModelConfig(**{**shape, **options})
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)
    return model


def tiny_cfg(run, corpus, **train_kw):
    """The tiny run of tests/test_trainer.py (seconds on a CPU), for train()."""
    from minillm.config import (DataConfig, LoggerConfig, OptimConfig, TrainConfig, TrainJobConfig)
    return TrainJobConfig(
        out_dir=str(run), device="cpu",
        model=ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=32, dropout=0.1),
        data=DataConfig(path=str(corpus)), tokenizer=TokenizerConfig(vocab_size=400),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, schedule="constant"),
        train=TrainConfig(**{"max_steps": 6, "batch_size": 4, "log_interval": 1, "eval_interval": 0, **train_kw}),
        logger=LoggerConfig(progress=False))


def fake_run(folder: Path, model: GPT, tok: Tokenizer, step: int = 7) -> Path:
    """A run folder holding one checkpoint of ``model`` (what train.py writes, minus training state)."""
    state = {"model": model.state_dict(), "config": {"model": asdict(model.cfg)}, "train_state": {"step": step},
             "tokenizer": torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8)}
    ckpt.save_checkpoint(folder, step, state)
    return folder


def assert_parity(model: GPT, tok: Tokenizer, out: Path) -> float:
    """transformers' model and tokenizer from ``out`` against minillm's: logits on full block_size rows
    within 1e-4, 32 greedy tokens equal, tokenizer ids and decoded text equal. Returns the max diff."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids)[0] - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    prompt = tok.encode("ROMEO: the king")
    ours = Engine(model).generate_ids([Row(prompt)], 32, SamplingParams(temperature=0))[0]
    hf.generation_config = transformers.GenerationConfig(do_sample=False, pad_token_id=0)  # no eos: 32 tokens
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32)[0, len(prompt):].tolist()
    assert len(ours) == 32 and ours == theirs
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(MIXED) == tok.encode(MIXED)
    assert hf_tok.decode(tok.encode(MIXED)) == MIXED
    return diff


@pytest.mark.parametrize("name", list(ARCHS))
def test_random_models_of_each_architecture_match_transformers(name, tok, tmp_path):
    model = small_model(tok, **ARCHS[name])
    done = export(fake_run(tmp_path / "run", model, tok), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [EXPECTED[name.split("-")[0]]] == [EXPECTED[done["architecture"]]]
    assert config["tie_word_embeddings"] == model.cfg.tie_embeddings and config["minillm"]["step"] == 7
    assert done["max_logit_diff"] <= 1e-4
    assert_parity(model, tok, tmp_path / "hf")
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_a_padded_vocabulary_exports(tok, tmp_path):
    """model.vocab_size above the tokenizer's (padded to a multiple of 64) keeps its rows."""
    model = small_model(tok, vocab_size=448, n_kv_head=2)
    export(fake_run(tmp_path / "run", model, tok), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 448
    assert_parity(model, tok, tmp_path / "hf")
    # transformers never generates the padding rows (no tokenizer id decodes them), as minillm's Engine
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.manual_seed(0)
    out = hf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=64, do_sample=True, top_k=0)
    assert int(out.max()) < tok.vocab_size and gen["suppress_tokens"] == list(range(tok.vocab_size, 448))


@pytest.mark.parametrize("model_type,vocab", [("bpe", 400), ("unigram", 380), ("char", 300)])
def test_tokenizer_ids_and_text_match_sentencepiece(model_type, vocab, tmp_path):
    tok = train_tokenizer([TEXT], TokenizerConfig(vocab_size=vocab, model_type=model_type))
    export(fake_run(tmp_path / "run", small_model(tok), tok), tmp_path / "hf", check=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [MIXED, "", " ", "\n\n\n", "  leading", "trailing\t ", "ROMEO:\nthe king", "😀", "a\r\nb"]
    if model_type != "unigram":  # unigram in tokenizers can match a special piece's text (hf_tokenizer.py)
        texts += ["</s> <s> <pad> <unk>", "</s>", "<0xE2>", "<0xE2> <0x41>"]
    for text in texts:
        assert hf_tok.encode(text) == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 3)


def test_trained_run_exports_through_the_command_line(tmp_path, corpus_file, data_dir, capsys):
    from minillm.run_folder import load_run
    from minillm.trainer import train
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus_file, max_steps=6))
    out = tmp_path / "hf"
    assert main([str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "llama" in printed and "step 6" in printed
    loaded = load_run(run)
    assert_parity(loaded.model, loaded.tokenizer, out)
    assert main([str(run), str(out), "--no-check"]) == 0  # a previous export is replaced, and said so
    assert "replaced the previous export" in capsys.readouterr().out


def test_out_dir_that_is_not_an_export_is_never_overwritten(tok, tmp_path, capsys):
    run = fake_run(tmp_path / "run", small_model(tok), tok)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main([str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: OUT_DIR") and "not a minillm export" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("options,key", [
    (dict(norm="layernorm"), "model.norm"), (dict(mlp="gelu"), "model.mlp"), (dict(qk_norm=True, bias=True), "model.bias"),
    (dict(pos="learned", mlp="gelu"), "model.norm"), (dict(pos="learned", norm="layernorm"), "model.mlp"),
    (dict(pos="learned", norm="layernorm", mlp="gelu", qk_norm=True), "model.qk_norm"),
    (dict(pos="learned", norm="layernorm", mlp="gelu", n_kv_head=1), "model.n_kv_head")])
def test_a_combination_without_an_exact_equivalent_is_refused_naming_the_option(options, key, tok, tmp_path, capsys):
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size, **options)
    with pytest.raises(ExportError, match=rf"^{key}="):
        architecture(cfg)
    if key == "model.norm":  # and through the command: one line, exit 2, nothing written
        assert main([str(fake_run(tmp_path / "run", GPT(cfg), tok)), str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {key}=") and err.count("\n") == 1 and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("preset", sorted((ROOT / "configs" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_preset_maps_onto_transformers(preset):
    """Names and shapes of every tensor agree (strict load on the meta device: no memory, no time)."""
    cfg = model_preset(preset.stem, vocab_size=50257)
    arch = architecture(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(arch, **hf_config_fields(cfg, {"eos_token_id": 2})))
    mapped = to_hf_state(model.state_dict(), cfg, arch)
    expected = {k: v.shape for k, v in hf.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert {k: v.shape for k, v in mapped.items()} == expected


def test_without_the_hf_extra_the_command_says_what_to_install(tok, tmp_path, capsys, monkeypatch):
    run = fake_run(tmp_path / "run", small_model(tok), tok)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert main([str(run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[hf]"' in err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_export_check_refuses_a_folder_whose_logits_differ(dtype, tok, tmp_path, monkeypatch):
    """A mapping bug (planted: one norm scale lost) is caught before OUT_DIR appears, whatever the dtype;
    the folders made above OUT_DIR are removed again."""
    import minillm.export as ex
    real = ex.to_hf_state

    def broken(sd, cfg, arch):
        out = real(sd, cfg, arch)
        out["model.norm.weight"] = torch.ones_like(out["model.norm.weight"])
        return out
    monkeypatch.setattr(ex, "to_hf_state", broken)
    with pytest.raises(ExportError, match="logits differ from minillm's"):
        export(fake_run(tmp_path / "run", small_model(tok), tok), tmp_path / "new" / "hf" / "x", dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_export_is_checked_and_says_so(dtype, tok, tmp_path, capsys):
    """The file holds the weights rounded to dtype; transformers, loading it in float32, computes what
    minillm computes with those rounded weights (to the float32 tolerance), and the command says so."""
    from safetensors import safe_open
    model = small_model(tok, n_kv_head=2)
    out = tmp_path / "hf"
    assert main([str(fake_run(tmp_path / "run", model, tok)), str(out), "--dtype", dtype]) == 0
    printed = capsys.readouterr().out
    assert "transformers' logits match minillm's (max diff " in printed
    assert f"both with the weights rounded to {dtype}, which moves minillm's own logits by up to " in printed
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rounded = GPT(model.cfg).eval()
    rounded.load_state_dict({k: v.to(getattr(torch, dtype)).float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (rounded(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4


def test_a_weight_past_float16s_range_is_refused(tok, tmp_path, capsys):
    model = small_model(tok)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = 1e5  # float16's largest finite value is 65504
    run = fake_run(tmp_path / "run", model, tok)
    assert main([str(run), str(tmp_path / "hf"), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --dtype float16: weight ") and "--dtype bfloat16" in err
    assert not (tmp_path / "hf").exists()
    assert main([str(run), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0


def test_missing_folders_above_out_dir_are_created(tok, tmp_path, capsys):
    """As `python -m minillm.export out/run hf/run` on a fresh clone (no hf/ yet); a file on the way is
    refused in one line."""
    run = fake_run(tmp_path / "run", small_model(tok), tok)
    assert main([str(run), str(tmp_path / "hf" / "a" / "b")]) == 0
    assert "logits match" in capsys.readouterr().out
    assert (tmp_path / "hf" / "a" / "b" / "config.json").is_file()
    (tmp_path / "notes.txt").write_text("keep me")
    assert main([str(run), str(tmp_path / "notes.txt" / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: OUT_DIR {tmp_path / 'notes.txt' / 'hf'}: {tmp_path / 'notes.txt'} is a file")
    assert err.count("\n") == 1 and (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["llama-mha-tied", "gpt2-tanh-bias"])
def test_greedy_tokens_match_while_the_context_fits_in_block_size(name, tok, tmp_path):
    """Up to the token predicted from a full block_size context, transformers' generate gives sample.py's
    tokens (cache or not). Past it they differ by design: minillm slides its window (generation.py),
    transformers keeps every token (Llama: positions past max_position_embeddings; GPT-2: an error)."""
    model = small_model(tok, **ARCHS[name])
    export(fake_run(tmp_path / "run", model, tok), tmp_path / "hf", check=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf.generation_config = transformers.GenerationConfig(do_sample=False, pad_token_id=0)
    prompt = tok.encode("ROMEO: the king")
    n = model.cfg.block_size - len(prompt) + 1  # the last one is predicted from block_size tokens
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt):].tolist()
    for kv_cache in (True, False):
        ours = Engine(model).generate_ids([Row(prompt)], n, SamplingParams(temperature=0), kv_cache=kv_cache)[0]
        assert ours == theirs, kv_cache
    assert len(theirs) == n and len(set(theirs)) > 3

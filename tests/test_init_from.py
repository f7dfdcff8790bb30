"""train.init_from: the model shape comes from the source; a transformers folder is a source (export then
import is bit for bit); folders it cannot map are one line naming the field; poor tokenizer coverage warns."""
import json
import logging
import random
from dataclasses import asdict

import pytest
import torch

from conftest import make_corpus
from minillm import checkpoint as ckpt
from minillm.config import ModelConfig
from minillm.errors import RunError, UserError
from minillm.init_from import byte_fallback_share, check_coverage, load_source
from minillm.trainer import train

transformers = pytest.importorskip("transformers")
from minillm.export import export  # noqa: E402
from minillm.hf_import import load_hf_source  # noqa: E402
from test_hf_export import ARCHS, fake_run, one_thread, small_model, tiny_cfg, tok  # noqa: E402,F401  (fixtures)


@pytest.mark.parametrize("name", list(ARCHS))
def test_export_then_import_gives_bitwise_equal_weights_and_the_same_config(name, tok, tmp_path):
    model = small_model(tok, **ARCHS[name])
    export(fake_run(tmp_path / "run", model, tok), tmp_path / "hf", check=False)
    source = load_hf_source(tmp_path / "hf")
    original = model.state_dict()
    assert set(source["model"]) == set(original)
    assert all(torch.equal(source["model"][k], original[k]) for k in original)
    assert source["model_config"] == {k: v for k, v in asdict(model.cfg).items() if k != "dropout"}
    assert source["tokenizer"].proto == tok.proto and source["step"] == 7  # the exported checkpoint's step


def test_biases_trained_into_a_bias_free_gpt2_export_are_kept(tok, tmp_path):
    from safetensors.torch import load_file, save_file
    export(fake_run(tmp_path / "run", small_model(tok, **ARCHS["gpt2-exact-nobias-untied"]), tok), tmp_path / "hf",
           check=False)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["transformer.h.1.mlp.c_fc.bias"][3] = 0.5  # as a fine-tune in transformers would
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    source = load_hf_source(tmp_path / "hf")
    assert source["model_config"]["bias"] is True and source["model"]["blocks.1.mlp.fc.bias"][3] == 0.5


def chinese_corpus(path, n_lines=300, seed=0):
    rng = random.Random(seed)
    path.write_text("".join("".join(chr(rng.randint(0x4E00, 0x4FFF)) for _ in range(30)) + "\n"
                            for _ in range(n_lines)))
    return path


def test_fine_tuning_from_a_transformers_folder_takes_its_shape_and_weights(tmp_path, corpus_file, data_dir, caplog):
    """No model.* setting given (ModelConfig's defaults): the shape is the folder's; with lr=0 the first
    checkpoint holds exactly the folder's weights; a Chinese corpus on the English tokenizer warns."""
    pre = tmp_path / "pre"
    train(tiny_cfg(pre, corpus_file, max_steps=2))
    export(pre, tmp_path / "hf", check=False)
    cfg = tiny_cfg(tmp_path / "fine", chinese_corpus(tmp_path / "zh.txt"), max_steps=1, init_from=str(tmp_path / "hf"))
    cfg.model, cfg.optim.lr, cfg.optim.weight_decay = ModelConfig(dropout=0.2), 0.0, 0.0
    caplog.set_level("INFO", logger="minillm")
    train(cfg)
    saved = json.loads((tmp_path / "fine" / "config.json").read_text())["model"]
    source = ckpt.load_checkpoint(ckpt.latest_checkpoint(pre))
    assert {k: v for k, v in saved.items() if k != "dropout"} == {k: v for k, v in source["config"]["model"].items()
                                                                   if k != "dropout"}
    assert saved["dropout"] == 0.2 and saved["n_layer"] == 2 and saved["n_kv_head"] == 1
    assert "model settings taken from" in caplog.text and "n_layer=2" in caplog.text
    fine = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "fine"))["model"]
    assert all(torch.equal(fine[k], v) for k, v in source["model"].items())
    warning = [r.getMessage() for r in caplog.records if "byte fallbacks" in r.getMessage()]
    assert len(warning) == 1 and float(warning[0].split("encodes ")[1].split("%")[0]) > 90


def test_a_model_setting_that_contradicts_the_source_is_refused_naming_it(tok, tmp_path):
    pre = fake_run(tmp_path / "pre", small_model(tok, n_layer=2, n_head=2, n_kv_head=1, n_embd=32), tok, step=2)
    cfg = tiny_cfg(tmp_path / "bad", tmp_path / "unused.txt", max_steps=1, init_from=str(pre))
    cfg.model = ModelConfig(n_layer=3)
    with pytest.raises(RunError, match=r"the source has model.n_layer=2 but the config says 3; leave those model "
                                       r"settings unset") as e:
        load_source(cfg)
    assert "out_dir" not in str(e.value)
    cfg.model = ModelConfig(n_layer=3, n_embd=48, n_head=3)  # every conflict in one line, not the first
    with pytest.raises(RunError, match=r"model.n_layer=2 but the config says 3, model.n_head=2 but the config says 3, "
                                       r"model.n_embd=32 but the config says 48; leave those"):
        load_source(cfg)
    cfg.model = ModelConfig()
    cfg.tokenizer.path = "zh.model"                     # the source's tokenizer encodes the corpus: refused
    with pytest.raises(RunError, match=r"uses the source's tokenizer, so tokenizer.path=zh.model cannot apply"):
        load_source(cfg)
    cfg.tokenizer.path = None
    cfg.model = ModelConfig(n_layer=3)
    cfg.model = ModelConfig(n_layer=4, name="mine")  # n_layer at its default: taken; a name of one's own: kept
    assert load_source(cfg)["step"] == 2 and (cfg.model.n_layer, cfg.model.name, cfg.model.n_embd) == (2, "mine", 32)


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("arch,change,field", [
    ("llama-mqa", {"model_type": "mistral"}, "model_type='mistral'"),
    ("llama-mqa", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("llama-mqa", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_scaling"),
    ("qwen3-gqa", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, "sliding_window"),
    ("llama-mqa", {"hidden_act": "gelu"}, "hidden_act"),
    ("gpt2-tanh-bias", {"activation_function": "relu"}, "activation_function"),
    ("llama-mqa", "no tokenizer.model", "tokenizer.model"),
])
def test_a_folder_that_cannot_be_mapped_is_one_line_naming_the_field(arch, change, field, tok, tmp_path):
    export(fake_run(tmp_path / "run", small_model(tok, **ARCHS[arch]), tok), tmp_path / "hf", check=False)
    if change == "no tokenizer.model":
        (tmp_path / "hf" / "tokenizer.model").unlink()
    else:
        edit_config(tmp_path / "hf", **change)
    cfg = tiny_cfg(tmp_path / "fine", tmp_path / "unused.txt", init_from=str(tmp_path / "hf"))
    with pytest.raises(UserError) as e:
        load_source(cfg)
    assert field in str(e.value) and "\n" not in str(e.value) and str(tmp_path / "hf") in str(e.value)


def test_coverage_warning_gives_the_measured_share(tok, caplog):
    from minillm.tokenizer import train_tokenizer
    from minillm.config import TokenizerConfig
    english = train_tokenizer([make_corpus(600)], TokenizerConfig(vocab_size=400))
    zh = "".join(chr(0x4E00 + (i * 7919) % 2000) for i in range(3000))
    ids = english.encode_array(zh)
    share = byte_fallback_share(english, ids)
    assert share == pytest.approx(english.byte_fallback_mask()[ids].mean()) and share > 0.99
    assert byte_fallback_share(english, ids, max_tokens=64) == pytest.approx(1.0)  # sampled windows
    caplog.set_level(logging.WARNING, logger="minillm")
    check_coverage({"tokenizer": english, "where": "pre"}, ids)
    assert f"{100 * share:.1f}% of the new training tokens" in caplog.text
    caplog.clear()
    check_coverage({"tokenizer": english, "where": "pre"}, english.encode_array(make_corpus(50, seed=3)))
    assert caplog.text == ""


def test_a_llama_folder_written_by_transformers_imports_with_its_tokenizer(tmp_path):
    """Not a minillm export: bf16 weights, untied, a sentencepiece model with Llama's settings (dummy
    prefix, nfkc normalization, no pad). minillm computes transformers' logits, and re-exported, its
    tokenizer gives sentencepiece's ids."""
    import io
    import sentencepiece as spm
    from minillm.hf_tokenizer import save_hf_tokenizer
    from minillm.model import GPT
    from test_hf_export import MIXED, TEXT
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines()), model_writer=buf, vocab_size=400,
                                   byte_fallback=True, character_coverage=0.9995, minloglevel=2)
    config = transformers.LlamaConfig(vocab_size=416, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.model").write_bytes(buf.getvalue())
    source = load_hf_source(tmp_path / "llama")
    assert source["model_config"]["name"] == "hf-llama" and source["model_config"]["rope_theta"] == 1000.0
    assert source["step"] == 0 and source["model_config"]["bias"] is False
    model = GPT(ModelConfig(**source["model_config"])).eval()
    model.load_state_dict(source["model"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    ids = torch.randint(0, 416, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4
    save_hf_tokenizer(source["tokenizer"], tmp_path / "tok", 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in (MIXED, " leading space", "two\n\nlines", "ｆｕｌｌ width"):
        assert hf_tok.encode(text) == source["tokenizer"].encode(text), text


def test_tokenizer_settings_fine_tuning_cannot_use_are_a_warning_and_config_records_the_source(tok, tmp_path,
                                                                                                 caplog):
    pre = fake_run(tmp_path / "pre", small_model(tok, n_layer=2, n_head=2, n_kv_head=1, n_embd=32), tok, step=2)
    cfg = tiny_cfg(tmp_path / "fine", tmp_path / "unused.txt", max_steps=1, init_from=str(pre))
    cfg.model = ModelConfig()
    cfg.tokenizer.vocab_size, cfg.tokenizer.character_coverage = 3000, 0.9995   # e.g. tokenizer=cjk given
    caplog.set_level("INFO", logger="minillm")
    load_source(cfg)
    assert (f"fine-tuning uses the tokenizer of train.init_from={pre}; not used: tokenizer.vocab_size=3000, "
            "tokenizer.character_coverage=0.9995") in caplog.text
    assert cfg.tokenizer.vocab_size == tok.vocab_size and cfg.tokenizer.character_coverage == 1.0  # what config.json gets

"""The budget recipe (minillm/recipe.py): unbudgeted runs unchanged, choices from the corpus, user keys win."""
import dataclasses
import logging
import math
import random

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT
from minillm import cli, recipe
from minillm.config import TrainJobConfig

RECIPE_KEYS = [k for k in recipe._DEFAULTS]


def composed(*overrides: str):
    cli.register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=list(overrides))


def chinese_text(n_chars: int = 60_000, alphabet: int = 3000, seed: int = 0) -> str:
    """Zipf-distributed Han characters with punctuation and newlines: a CJK corpus's statistics."""
    rng = random.Random(seed)
    chars = [chr(0x4E00 + i) for i in range(alphabet)]
    weights = [1 / (i + 1) for i in range(alphabet)]
    body = rng.choices(chars, weights, k=n_chars)
    for i in range(0, n_chars, 20):
        body[i] = "，" if i % 40 else "\n"
    return "".join(body)


def test_without_a_budget_every_recipe_key_is_the_schema_default():
    cfg = cli.to_dataclass(composed(), TrainJobConfig)
    defaults = TrainJobConfig()
    for key in RECIPE_KEYS:
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == getattr(getattr(defaults, section), name), key
    assert cfg.model.name == "tiny" and cfg.train.time_budget_s is None


def test_a_budget_chooses_from_the_corpus_and_the_user_wins(tmp_path):
    zh, en = tmp_path / "zh.txt", tmp_path / "en.txt"
    zh.write_text(chinese_text())
    en.write_text("The quick brown fox jumps over the lazy dog.\n" * 2000)
    z = cli.to_dataclass(composed("data=text", f"data.path={zh}", "train.time_budget_s=60"), TrainJobConfig)
    assert (z.model.name, z.optim.name, z.optim.schedule) == ("auto", "muon", "wsd")
    assert z.tokenizer.vocab_size >= recipe.CJK_VOCAB and z.tokenizer.vocab_size % 64 == 0
    assert z.train.max_steps == recipe.epoch_cap(recipe.corpus_stats(z.data), z.data, 32 * 32)  # a small corpus
    assert z.train.eval_interval == 0
    assert recipe.MIN_COVERAGE <= z.tokenizer.character_coverage < 1.0  # 3000 characters do not all get a piece
    e = cli.to_dataclass(composed("data=text", f"data.path={en}", "train.time_budget_s=60", "model.n_layer=2",
                                  "optim=adamw", "train.max_steps=50"), TrainJobConfig)
    assert (e.tokenizer.vocab_size, e.tokenizer.character_coverage) == (recipe.VOCAB, 1.0)
    assert (e.model.n_layer, e.optim.name, e.train.max_steps) == (2, "adamw", 50)  # the user's keys
    assert e.optim.schedule == "cosine"  # optim=adamw is the whole group: the schema's schedule
    big = cli.to_dataclass(composed("data=text", f"data.path={en}", "train.time_budget_s=60", "model=gpt2-small"),
                           TrainJobConfig)
    assert (big.model.n_layer, big.model.n_embd) == (12, 768)  # a model preset wins over the recipe


def test_cfg_job_shows_which_keys_the_recipe_decides():
    raw = OmegaConf.to_container(composed("model.n_layer=3"), resolve=False)
    assert raw["model"]["n_embd"] == "${minillm.recipe:model.n_embd}" and raw["model"]["n_layer"] == 3


def test_the_start_line_names_what_the_recipe_chose_and_not_the_users_keys(tmp_path, caplog):
    en = tmp_path / "en.txt"
    en.write_text("The quick brown fox jumps over the lazy dog.\n" * 2000)
    cfg = composed("data=text", f"data.path={en}", "train.time_budget_s=45", "model.n_layer=2")
    with caplog.at_level(logging.INFO, logger="minillm.recipe"):
        cli.log_recipe(cfg, cli.to_dataclass(cfg, TrainJobConfig))
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("time budget 45 s (corpus 0.09 MB, 0% CJK, 30 distinct characters")
    assert "model.n_embd=" in line and "tokenizer.vocab_size=1024" in line and "model.n_layer" not in line


def test_text_stats_and_coverage():
    s = recipe.text_stats("aab 漢漢字\n", 13)
    assert s.counts == (2, 2, 1, 1, 1, 1) and s.alphabet == 6
    assert s.cjk_share == pytest.approx(3 / 6)  # 漢漢字 among a a b 漢 漢 字
    assert s.coverage_of(2) == pytest.approx(4 / 8) and s.coverage_of(6) == 1.0


def test_vocab_and_coverage_keep_at_most_char_share_of_the_pieces_as_characters():
    stats = recipe.text_stats(chinese_text(alphabet=1500), 1)
    vocab = recipe.vocab_for(stats)
    coverage = recipe.coverage_for(stats, vocab)
    k = int(recipe.CHAR_SHARE * (vocab - 261))
    assert recipe.chars_for(stats, recipe.MIN_COVERAGE) <= k  # the vocabulary holds sentencepiece's floor
    assert recipe.MIN_COVERAGE <= coverage <= stats.coverage_of(k) and recipe.chars_for(stats, coverage) <= k
    many = recipe.text_stats(chinese_text(alphabet=3000), 1)
    assert recipe.coverage_for(many, 8000) > recipe.coverage_for(many, 4000)  # more pieces, more characters
    wide = recipe.text_stats(chinese_text(alphabet=6000), 1)  # a wide alphabet raises the vocabulary
    assert recipe.vocab_for(wide) > recipe.CJK_VOCAB == vocab
    assert recipe.vocab_for(recipe.text_stats("abc" * 100, 300)) == recipe.VOCAB
    assert recipe.coverage_for(recipe.text_stats("abc" * 100, 300), recipe.VOCAB) == 1.0
    assert (recipe.vocab_for(None), recipe.coverage_for(None, 1024)) == (recipe.VOCAB, 1.0)
    assert recipe.coverage_for(stats, 400) == recipe.MIN_COVERAGE  # never below what sentencepiece accepts


def test_the_coverage_follows_a_vocabulary_the_user_sets(tmp_path):
    zh = tmp_path / "zh.txt"
    zh.write_text(chinese_text())
    small, large = (cli.to_dataclass(composed("data=text", f"data.path={zh}", "train.time_budget_s=60",
                                              f"tokenizer.vocab_size={v}"), TrainJobConfig).tokenizer
                    for v in (600, 8000))
    stats = recipe.corpus_stats(cli.to_dataclass(composed("data=text", f"data.path={zh}"), TrainJobConfig).data)
    assert small.character_coverage == recipe.coverage_for(stats, 600) < large.character_coverage


def test_more_compute_never_gets_a_smaller_model():
    sizes = [recipe.model_for(10.0 ** e, 1024) for e in range(10, 20)]
    params = [12 * r[0] * r[1] ** 2 for r in sizes]
    assert params == sorted(params) and sizes[0] == recipe.LADDER[0] and sizes[-1] == recipe.LADDER[-1]
    for n_layer, n_embd, n_head, block, batch in recipe.LADDER:
        assert n_embd % n_head == 0 and (n_embd // n_head) % 2 == 0  # valid shapes for RoPE


def test_an_unknown_key_is_refused():
    with pytest.raises(KeyError, match="model.colour is not a key the recipe chooses"):
        recipe.resolve("model.colour", _root_=dataclasses.asdict(TrainJobConfig()))


def test_a_small_corpus_caps_the_run_at_max_epochs(tmp_path):
    en = tmp_path / "en.txt"
    en.write_text("The quick brown fox jumps over the lazy dog.\n" * 2000)  # 90,000 bytes
    cfg = cli.to_dataclass(composed("data=text", f"data.path={en}", "train.time_budget_s=600"), TrainJobConfig)
    per_step = cfg.model.block_size * cfg.train.batch_size
    expected = math.ceil(recipe.MAX_EPOCHS * 90_000 * 0.9 / recipe.BYTES_PER_TOKEN[0] / per_step)
    assert cfg.train.max_steps == expected  # the time budget's plan is capped there (TimeBudget's cap)
    held_out = cli.to_dataclass(composed("data=text", f"data.path={en}", f"data.val_path={en}",
                                         "train.time_budget_s=600"), TrainJobConfig)
    assert held_out.train.max_steps == math.ceil(recipe.MAX_EPOCHS * 90_000 / recipe.BYTES_PER_TOKEN[0] / per_step)
    mine = cli.to_dataclass(composed("data=text", f"data.path={en}", "train.time_budget_s=600",
                                     "train.max_steps=null"), TrainJobConfig)
    assert mine.train.max_steps is None  # the user's null wins: the budget alone decides

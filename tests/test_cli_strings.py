"""Every character reaches the program (issue 16 item 1): a value the shell hands to a string key
(prompt, stop, every path, out_dir, ckpt, field names) arrives unchanged through train.py and sample.py,
whatever it holds: CJK, accents, emoji, ``= , ' " # ( ) [ ] { } : $ \\``, spaces and newlines.
Hydra's grammar stays where it means something (``null``, ``[..]`` lists, ``-m`` sweeps), and a value
it cannot parse there is one line that shows how to quote it."""
import json

import pytest
import yaml

from conftest import TINY_ARGS, make_corpus, run_entry
from minillm.cli import literal_strings, string_keys
from minillm.config import SampleJobConfig, TrainJobConfig
from minillm.tokenizer import train_tokenizer
from minillm.config import TokenizerConfig
from test_sample import write_run

STRINGS = [
    "宝玉笑道", "林黛玉道：「你好，世界！」", "Hello, world", "Who is (he)?", "a=b", "/data/epoch=9-step=99/c.txt",
    "it's", 'say "hi"', "#not a comment", "[bracketed]", "{braced}", "key: value", "$HOME",
    "${oc.env:HOME}", "cost \\${x}", "back\\slash", "ends with a backslash\\", "'single quoted'",
    '"double quoted"', "  leading and trailing  ", "😀 emoji 🚀", "café naïve Ærø", "tab\there",
    "line one\nline two", "true", "1e-3", "~tilde", "100%", "a,b,c", "\\", "x'\\", "=leading equals",
    "semi;colon & amp | pipe < >", "日本語とEnglish, 한국어 (mixed)", "@at *star ?q !bang `tick`",
]
SAMPLE_KEYS = ["prompt", "ckpt", "out_root"]   # prompt_file in place of prompt in every other chunk (they conflict)
TRAIN_KEYS = ["out_dir", "data.path", "data.val_path", "data.text_field", "logger.wandb.name",
              "logger.wandb.project", "train.init_from", "data.url"]


def composed(script: str, *args: str) -> dict:
    """The config the program receives, printed by Hydra (--cfg job --resolve) and read back."""
    r = run_entry(script, "--cfg", "job", "--resolve", *args)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def chunks(keys: list[str]):
    """STRINGS spread over the entry point's string keys: one subprocess per len(keys) strings."""
    for i in range(0, len(STRINGS), len(keys)):
        yield list(zip(keys, STRINGS[i:i + len(keys)]))


def test_the_table_is_large_enough():
    assert len(set(STRINGS)) == len(STRINGS) >= 25


def sample_chunks():
    for i, pairs in enumerate(chunks(SAMPLE_KEYS)):
        yield [("prompt_file" if i % 2 and k == "prompt" else k, v) for k, v in pairs]


@pytest.mark.parametrize("pairs", list(sample_chunks()), ids=lambda p: p[0][1][:12])
def test_sample_py_receives_every_string_unchanged(pairs):
    # stop is a list key: a string travels as a one-item list (one written "[...]" is Hydra's list syntax)
    stop = [s for _, s in pairs if not s.startswith("[")]
    cfg = composed("sample.py", *(f"{k}={s}" for k, s in pairs), f"stop={stop[0]}")
    for key, s in pairs:
        assert get(cfg, key) == s, key
    assert cfg["stop"] == [stop[0]]


@pytest.mark.parametrize("pairs", list(chunks(TRAIN_KEYS)), ids=lambda p: p[0][1][:12])
def test_train_py_receives_every_string_unchanged(pairs):
    cfg = composed("train.py", "data=text", *(f"{k}={s}" for k, s in pairs))
    for key, s in pairs:
        assert get(cfg, key) == s, key


def test_hydra_grammar_stays_where_it_means_something():
    cfg = composed("sample.py", "ckpt=null", "stop=[a,b c]", "prompt=NULL")
    assert cfg["ckpt"] is None and cfg["stop"] == ["a", "b c"] and cfg["prompt"] is None
    # the default out_dir names the corpus even when its path holds the grammar's characters
    cfg = composed("train.py", "data=text", "data.path=/tmp/a, b=(c) ${x}.txt")
    assert cfg["out_dir"] == "out/a_b_c_x-tiny"


@pytest.mark.parametrize("args, expected", [
    (("-m", "data=text", "data.path=a (1).txt,b.txt"),
     "error: data.path=a (1).txt,b.txt: under -m, Hydra reads commas as separating sweep values"),
    (("stop=[a,",), "error: stop=[a,: Hydra reads this value as a list and cannot parse it; quote each item"),
])
def test_grammar_that_does_not_parse_is_one_line_showing_how_to_quote(args, expected, tmp_path):
    script = "train.py" if "-m" in args else "sample.py"
    r = run_entry(script, *args, f"{'out_dir' if script == 'train.py' else 'out_root'}={tmp_path / 'o'}")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), r.stderr
    assert "\"" in lines[0] and "'" in lines[0]  # the example quotes for the shell and for Hydra
    assert not (tmp_path / "o").exists()


def test_literal_strings_leaves_other_arguments_alone():
    argv = ["model=llama-small", "optim.lr=3e-3", "--cfg", "job", "hydra.run.dir=x,y", "~data.url",
            "+prompt=a,b", "prompt=null"]
    out = literal_strings(argv, SampleJobConfig)
    assert out[:6] == argv[:6] and out[7] == "prompt=null"
    assert out[6] == "+prompt='a,b'"
    keys = string_keys(TrainJobConfig)
    assert {"out_dir", "data.path", "data.text_field", "train.resume", "train.init_from"} <= set(keys)
    assert "model.n_layer" not in keys and "optim.lr" not in keys and not keys["data.path"]
    assert string_keys(SampleJobConfig)["stop"] is True


def test_a_chinese_prompt_with_every_special_character_is_sampled_from(tmp_path):
    tok = train_tokenizer([make_corpus(600)], TokenizerConfig(vocab_size=400))
    run = write_run(tmp_path / "运行 a=b, (c)", tok)
    prompt = "宝玉笑道：「Who is (he)? a=b, [x] {y} $5 #1 'q' \"d\" \\ 😀」"
    r = run_entry("sample.py", f"ckpt={run}", f"prompt={prompt}", "max_new_tokens=3", "device=cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt)


def test_a_corpus_and_run_folder_named_with_special_characters_train(tmp_path, data_dir):
    corpus = tmp_path / "红楼 a=b, (c) #1 it's.txt"
    corpus.write_text(make_corpus(400))
    out = tmp_path / "运行 x=1, [y] {z}"
    r = run_entry("train.py", "data=text", f"data.path={corpus}", f"out_dir={out}", *TINY_ARGS,
                  "train.max_steps=2", "train.eval_interval=0", "device=cpu")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["path"] == str(corpus) and config["out_dir"] == str(out)

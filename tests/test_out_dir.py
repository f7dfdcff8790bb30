"""Issue 16 item 5: the default out_dir tells corpora apart, and a collision suggests a free out_dir."""
import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, TINY_ARGS, make_corpus, run_entry
from minillm import cli
from minillm.resume import suggest_out_dir

cli.register_schemas()


def default_out_dir(*overrides: str) -> str:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=list(overrides)).out_dir


@pytest.mark.parametrize("overrides, want", [
    ((), "out/shakespeare-tiny"),
    (("data.path=/x/tinyshakespeare.txt",), "out/shakespeare-tiny"),   # a named dataset keeps its name
    (("data.path=/x/hongloumeng.txt",), "out/hongloumeng-tiny"),       # ... given another corpus, that one's
    (("data.path=/x/tinyshakespeare.txt", "experiment=nanogpt_cpu"), "out/shakespeare-nanogpt_cpu"),
    (("data=text", "data.path=/x/hongloumeng.txt", "experiment=nanogpt_cpu"), "out/hongloumeng-nanogpt_cpu"),
    (("data=text", "data.path=/data/hongloumeng.txt"), "out/hongloumeng-tiny"),
    (("data=text", "data.path=/data/books.v2.txt", "model=gpt2-small"), "out/books.v2-gpt2-small"),
    (("data=text", "data.path='/data/books/**/*.txt'"), "out/books-tiny"),
    (("data=text", "data.path='/data/my corpus (v1).txt'"), "out/my_corpus_v1-tiny"),
    (("data=text", "data.path=a.txt", "out_dir=runs/mine"), "runs/mine"),
    (("data=text", "data.path=/data/docs.jsonl.gz"), "out/docs-tiny"),       # compressed: both suffixes go
    (("data=text", "data.path=/data/docs.txt.ZST"), "out/docs-tiny"),
    (("data=text", "data.path=/data/web.parquet"), "out/web-tiny"),
    (("data=text", "data.path=/data/books.v2.gz"), "out/books.v2-tiny"),     # ... a suffix of no format stays
    (("data=hf", "data.hf_dataset=/data/datasets/wiki_zh"), "out/wiki_zh-tiny"),       # a saved dataset
    (("data=hf", "data.hf_dataset=user/fine-web.edu"), "out/fine-web.edu-tiny"),       # a hub name
])
def test_default_out_dir_names_the_corpus(overrides, want):
    assert default_out_dir(*overrides) == want


def test_folder_corpus_is_named_after_the_folder(tmp_path):
    (tmp_path / "novels").mkdir()
    assert default_out_dir("data=text", f"data.path={tmp_path / 'novels'}") == "out/novels-tiny"


def test_suggest_out_dir_is_free(tmp_path):
    assert suggest_out_dir(tmp_path / "a-tiny") == str(tmp_path / "a-tiny-2")
    (tmp_path / "a-tiny-2").mkdir()
    assert suggest_out_dir(tmp_path / "a-tiny") == str(tmp_path / "a-tiny-3")
    assert suggest_out_dir(tmp_path / "a-tiny-2") == str(tmp_path / "a-tiny-3")


def test_two_text_corpora_get_two_runs_and_a_collision_names_a_free_out_dir(tmp_path, data_dir):
    (tmp_path / "a.txt").write_text(make_corpus(seed=0))
    (tmp_path / "b.txt").write_text(make_corpus(seed=1).upper())
    args = (*TINY_ARGS, "train.max_steps=2", "train.eval_interval=2")
    for name in ("a", "b"):
        r = run_entry("train.py", "data=text", f"data.path={name}.txt", *args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (tmp_path / "out" / f"{name}-tiny" / "ckpt" / "latest").exists()
    r = run_entry("train.py", "data=text", "data.path=b.txt", "out_dir=out/a-tiny", *args, cwd=tmp_path)
    assert r.returncode == 2 and "start a new run with out_dir=out/a-tiny-2" in r.stderr
    assert "(data.path 'a.txt' -> 'b.txt')" in r.stderr                 # the setting that changed is named
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")

"""sample.py as users meet it: prompts from the command line, a file or stdin; streaming output;
notices; one-line errors for bad input; the sampling benchmark's --quick path."""
import importlib.util
import io
import json
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import ROOT, make_corpus, run_entry
from minillm.checkpoint import CheckpointError, save_checkpoint
from minillm.config import ConfigError, SampleJobConfig, TokenizerConfig
from minillm.tokenizer import train_tokenizer
from minillm.train_state import TrainState
from test_generate import model as random_model

spec = importlib.util.spec_from_file_location("sample_entry", ROOT / "sample.py")
sample = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample)


def write_run(run_dir, tok=None, block_size=32, sharpen=False):
    """A run folder with one checkpoint in the format Trainer.state_dict writes (random weights;
    sharpen: weights whose greedy text varies, see test_generate.model)."""
    m = random_model(tok.vocab_size if tok else 400, sharpen, n_head=2, n_kv_head=1, block_size=block_size)
    state = {"model": m.state_dict(), "train_state": TrainState(step=3).state_dict(),
             "config": {"model": asdict(m.cfg)}}
    if tok is not None:
        state["tokenizer"] = torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8)
    save_checkpoint(run_dir, 3, state)
    return run_dir


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([make_corpus(600)], TokenizerConfig(vocab_size=400))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok):
    return write_run(tmp_path_factory.mktemp("sample") / "run", tok)


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory, tok):
    """For tests that compare greedy texts: a model whose greedy tokens vary (not one repeated)."""
    return write_run(tmp_path_factory.mktemp("sample") / "greedy_run", tok, sharpen=True)


def varied(tok, text: str, prompt: str) -> bool:
    """The continuation holds more than 3 distinct tokens."""
    return len(set(tok.encode(text[len(prompt):]))) > 3


def job(run, **kw) -> SampleJobConfig:
    return SampleJobConfig(**{"ckpt": str(run), "max_new_tokens": 12, "device": "cpu", **kw})


def test_streamed_stdout_is_the_prompt_and_its_continuation(run, capsys):
    texts = sample.run(job(run, prompt="ROMEO:", num_samples=2, temperature=1.0))
    out = capsys.readouterr().out
    assert len(texts) == 2 and all(t.startswith("ROMEO:") for t in texts)
    assert out == "--- sample 1\n" + texts[0] + "\n\n--- sample 2\n" + texts[1] + "\n"
    assert sample.run(job(run, prompt="ROMEO:", num_samples=2, temperature=1.0, stream=False)) == texts


def test_every_sample_has_the_same_header_streamed_or_not(run, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("ROMEO:\n\nJULIET:\n")
    for kw, labels in [(dict(prompt="ROMEO:", num_samples=2), ["--- sample 1", "--- sample 2"]),
                       (dict(prompt_file=str(f)), ["--- prompt 1, sample 1", "--- prompt 2, sample 1"]),
                       (dict(prompt="ROMEO:"), [])]:
        outs = []
        for stream in (True, False):
            texts = sample.run(job(run, temperature=1.0, stream=stream, **kw))
            outs.append(capsys.readouterr().out)
        assert outs[0] == outs[1]  # streaming changes when text appears, not what is printed
        assert [line for line in outs[0].splitlines() if line.startswith("---")] == labels
        assert outs[0] == "\n".join(h + t + "\n" for h, t in zip([l + "\n" for l in labels] or [""], texts))


def test_prompt_file_matches_single_prompts(greedy_run, tok, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("KING HENRY:\nthe\n\n\nJULIET: o\n")
    texts = sample.run(job(greedy_run, prompt_file=str(f), temperature=0.0))
    assert [t.split(":")[0] for t in texts] == ["KING HENRY", "JULIET"]
    assert "--- prompt 2, sample 1\nJULIET: o" in capsys.readouterr().out
    assert texts[1] == sample.run(job(greedy_run, prompt="JULIET: o", temperature=0.0))[0]
    assert texts[0] == sample.run(job(greedy_run, prompt="KING HENRY:\nthe", temperature=0.0, kv_cache=False))[0]
    assert varied(tok, texts[0], "KING HENRY:\nthe") and varied(tok, texts[1], "JULIET: o")


def test_batch_size_splits_rows_without_changing_any_text(run, tmp_path, capsys):
    # 3 prompts x 2 samples = 6 rows: one batch, or 3 batches of 2 / 2 / 2, or 2 batches splitting
    # prompt 2's samples; every row's text depends on its prompt and seed only.
    f = tmp_path / "prompts.txt"
    f.write_text("KING HENRY:\n\nthe king\n\nJULIET: o\n")
    kw = dict(prompt_file=str(f), num_samples=2, temperature=1.0, top_k=0)
    one = sample.run(job(run, **kw, batch_size=6))
    out_one, err_one = capsys.readouterr()
    assert "# batch" not in err_one and len(set(one)) == 6
    for size, batches in [(2, 3), (4, 2), (1, 6)]:
        assert sample.run(job(run, **kw, batch_size=size)) == one
        out, err = capsys.readouterr()
        assert out == out_one                      # same text, labels and order on stdout
        assert f"# batch {batches}/{batches}: rows {6 - (6 - 1) % size}-6 of 6" in err


@pytest.mark.parametrize("stream", [True, False])
def test_a_batch_notice_comes_before_its_first_header(run, monkeypatch, stream):
    """stdout and stderr on one terminal (here one buffer): each "# batch" line stands on its own line,
    just above the header of its batch's first row, never inside a sample."""
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    t = sample.run(job(run, prompt="ROMEO:", num_samples=3, batch_size=2, temperature=1.0, stream=stream))
    shown = screen.getvalue()
    assert shown[shown.index("# batch 1/2"):] == (
        f"# batch 1/2: rows 1-2 of 3\n--- sample 1\n{t[0]}\n\n--- sample 2\n{t[1]}\n\n"
        f"# batch 2/2: rows 3-3 of 3\n--- sample 3\n{t[2]}\n")


def test_batch_notices_and_samples_reach_a_shared_pipe_in_order(run):
    """As the terminal of the test above, through a real process: stdout is flushed before each notice."""
    import subprocess
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={run}", "prompt=ROMEO:", "max_new_tokens=6",
                        "num_samples=3", "batch_size=2", "device=cpu"],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout
    assert [i for i, l in enumerate(lines) if "# batch" in l and not l.startswith("# batch")] == []
    first, second = lines.index("# batch 1/2: rows 1-2 of 3"), lines.index("# batch 2/2: rows 3-3 of 3")
    assert lines[first + 1] == "--- sample 1" and lines[second + 1] == "--- sample 3"


def test_interactive_reads_stdin_until_eof(run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the king\n\nROMEO:\n"))
    texts = sample.run(job(run, interactive=True, temperature=0.0))
    assert [t[:6] for t in texts] == ["the ki", "ROMEO:"]
    assert "empty prompt skipped" in capsys.readouterr().err


def test_interactive_prompts_draw_fresh_seeds(run, monkeypatch, capsys):
    """Prompt n of a session (empty lines skipped) draws from seed + n * num_samples: the same line
    twice gives new text, and each equals a one-shot run with the seed noted on stderr."""
    kw = dict(temperature=1.0, top_k=0, num_samples=2, seed=100, stream=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("the king\n\nthe king\nROMEO:\n"))
    texts = sample.run(job(run, interactive=True, **kw))
    err = capsys.readouterr().err
    assert "# prompt 1: seed=100" in err and "# prompt 2: seed=102" in err and "# prompt 3: seed=104" in err
    assert len(texts) == 6 and len(set(texts)) == 6   # the repeated line got other text
    assert texts[0:2] == sample.run(job(run, prompt="the king", **kw))
    assert texts[2:4] == sample.run(job(run, prompt="the king", **{**kw, "seed": 102}))
    assert texts[4:6] == sample.run(job(run, prompt="ROMEO:", **{**kw, "seed": 104}))


def test_help_lists_only_what_sample_takes():
    r = run_entry("sample.py", "--help")
    assert r.returncode == 0, r.stderr
    keys = [line.split(":")[0] for line in r.stdout.splitlines() if line and not line[0].isspace() and ": " in line]
    assert sorted(k for k in keys if k in SampleJobConfig.__dataclass_fields__) == sorted(SampleJobConfig.__dataclass_fields__)
    for train_only in ("Configuration groups", "model:", "data:", "optim:", "tokenizer:", "experiment:"):
        assert train_only not in r.stdout


def test_long_prompt_is_cut_with_a_notice(run, capsys):
    sample.run(job(run, prompt="the king and the queen " * 20, max_new_tokens=2))
    assert "keeping the last 32 (block_size)" in capsys.readouterr().err


def test_a_prompt_character_outside_a_vocabulary_without_byte_fallback_is_named(tmp_path, capsys):
    """A char model without byte fallback (experiment=nanogpt_cpu) cannot encode every character: the
    prompt still runs, and stderr names the characters that reach the model as <unk>."""
    char = train_tokenizer([make_corpus(300)], TokenizerConfig(model_type="char", vocab_size=65536, byte_fallback=False))
    run_dir = write_run(tmp_path / "char", char)
    sample.run(job(run_dir, prompt="the king\u20ac and \U0001f600", max_new_tokens=2))
    err = capsys.readouterr().err
    assert "# prompt 1: 2 character(s) not in the model's vocabulary ('\u20ac', '\U0001f600') reach it as <unk>" in err
    sample.run(job(run_dir, prompt="the king", max_new_tokens=2))
    assert "<unk>" not in capsys.readouterr().err


def test_bfloat16_samples(run):
    texts = sample.run(job(run, prompt="ROMEO:", dtype="bfloat16", temperature=0.0, max_new_tokens=20))
    assert texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:")


@pytest.mark.parametrize("kw, message", [
    (dict(top_p=0.0), "top_p=0.0: must be in (0, 1]"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"), (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(prompt=""), "prompt='': is empty"), (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(stop=["END", ""]), "stop=['END', '']"),
    (dict(prompt="a", prompt_file="p.txt"), "prompt_file='p.txt': conflicts with prompt"),
    (dict(prompt="a", interactive=True), "interactive=True: conflicts with prompt"),
    (dict(batch_size=0), "batch_size=0: must be >= 1"),
])
def test_bad_settings_name_the_key_and_value(kw, message):
    with pytest.raises(ConfigError) as e:
        SampleJobConfig(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_inputs_are_one_clear_error(run, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    no_tok = write_run(tmp_path / "no_tok", tok=None)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    cases = [(job(tmp_path / "missing"), CheckpointError, "no such checkpoint file or run folder"),
             (job(foreign), CheckpointError, "no checkpoint in this folder"),
             (job(foreign / "notes.txt"), CheckpointError, "notes.txt: not a checkpoint"),
             (job(no_tok), CheckpointError, "has no tokenizer, so it cannot be sampled"),
             (job(run, prompt_file=str(tmp_path / "nope.txt")), ConfigError, "no such file"),
             (job(run, prompt_file="/dev/zero"), ConfigError, "'/dev/zero': not a regular file"),
             (job(run, prompt_file=str(tmp_path)), ConfigError, "not a regular file"),
             (job(run, prompt_file=str(blank)), ConfigError, "holds no prompt")]
    for cfg, err, message in cases:
        with pytest.raises(err, match=message):
            sample.run(cfg)


def test_cli_error_for_a_checkpoint_without_tokenizer_is_one_line(tmp_path):
    r = run_entry("sample.py", f"ckpt={write_run(tmp_path / 'no_tok', tok=None)}")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "tokenizer" in lines[0]


def test_cli_stop_strings(greedy_run, tok):
    r = run_entry("sample.py", f"ckpt={greedy_run}", "prompt=ROMEO:", "temperature=0", "max_new_tokens=12")
    assert r.returncode == 0, r.stderr
    assert varied(tok, r.stdout, "ROMEO:")
    # Two characters of the continuation (letters or spaces: plain on a command line) as a stop string.
    pairs = (r.stdout[i:i + 2] for i in range(8, len(r.stdout) - 1))
    stop = next(s for s in pairs if all(c.isalpha() or c == " " for c in s))
    r2 = run_entry("sample.py", f"ckpt={greedy_run}", "prompt=ROMEO:", "temperature=0", "max_new_tokens=12",
                   f"stop=[{json.dumps(stop)},'\\n\\n']")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout[:r.stdout.find(stop, len("ROMEO:"))] + "\n"


def test_bench_sample_quick(tmp_path):
    r = run_entry("benchmarks/bench_sample.py", "--quick", "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "bench_sample.json").read_text())["rows"]
    together, staggered = rows[:4], rows[4:]
    assert {(x["batch"], x["kv_cache"]) for x in together} == {(1, True), (1, False), (2, True), (2, False)}
    assert all(x["tokens_per_s"] > 0 and x["speedup_vs_no_cache"] > 0 for x in together)
    assert [x["rows_end"] for x in staggered] == ["staggered, kept", "staggered, leave"]
    assert all(x["batch"] == 2 and x["speedup_vs_kept"] > 0 for x in staggered)

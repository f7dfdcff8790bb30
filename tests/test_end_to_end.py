"""A user's path through the real entry points: train -> checkpoint -> resume -> sample."""
import json

import pytest

from conftest import TINY_ARGS, run_entry


def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def env(data_dir):
    return {"MINILLM_DATA_DIR": str(data_dir)}


def train(run, corpus, env, *extra):
    r = run_entry("train.py", f"data.path={corpus}", f"out_dir={run}", *TINY_ARGS, *extra, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_train_resume_sample(tmp_path, corpus_file, env):
    run = tmp_path / "run"
    train(run, corpus_file, env, "train.max_steps=6", "train.eval_interval=3")
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["latest", "step_000003.pt", "step_000006.pt"]
    for f in ("tokenizer.model", "config.json", "summary.json", "curves.png"):
        assert (run / f).is_file(), f
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert {"step", "train_loss", "lr", "tokens_per_sec", "elapsed_s"} <= m[0].keys()
    evals = [r for r in m if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(0 < r["val_bpb"] < 20 for r in evals)

    # Continue the same run to step 10: it resumes from step 6, it does not restart.
    r = train(run, corpus_file, env, "train.max_steps=10", "train.eval_interval=3", "train.allow_changes=true")
    assert "resuming from" in r.stderr and "step 6" in r.stderr
    assert [x["step"] for x in metrics(run)] == list(range(1, 11))

    # resume=never refuses a folder that holds a run, and leaves it as it was.
    before = sorted(p.name for p in (run / "ckpt").iterdir())
    r = run_entry("train.py", f"data.path={corpus_file}", f"out_dir={run}", *TINY_ARGS, "train.resume=never", env=env)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == before

    # sample.py rebuilds everything from the run folder alone.
    r = run_entry("sample.py", f"ckpt={run}", "max_new_tokens=30", "num_samples=2", "prompt=ROMEO:", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("--- sample 1\nROMEO:") and "--- sample 2" in r.stdout and len(r.stdout) > 40


def test_sampling_without_a_run_is_a_clear_error(tmp_path):
    r = run_entry("sample.py", f"out_root={tmp_path}")
    assert r.returncode == 2 and "no run folder with a checkpoint" in r.stderr

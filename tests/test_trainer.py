"""The resumable trainer: exact resume with negative controls, fallbacks, signals, NaN guard, reports."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY_ARGS, run_entry
from minillm import checkpoint as ckpt
from minillm.config import (DataConfig, LoggerConfig, ModelConfig, OptimConfig, TokenizerConfig, TrainConfig,
                            TrainJobConfig, WandbConfig)
from minillm.flops import mfu, peak_flops
from minillm.guards import NonFiniteError, StepGuard
from minillm.model import GPT
from minillm.errors import RunError
from minillm.trainer import train


def tiny_cfg(run, corpus, **train_kw) -> TrainJobConfig:
    return TrainJobConfig(
        out_dir=str(run), device="cpu",
        model=ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=32, dropout=0.1),
        data=DataConfig(path=str(corpus)), tokenizer=TokenizerConfig(vocab_size=400),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, schedule="constant"),  # as TINY_ARGS + yaml
        train=TrainConfig(**{"max_steps": 6, "batch_size": 4, "log_interval": 1, "eval_interval": 0, **train_kw}),
        logger=LoggerConfig(progress=False))


def losses(run):
    return [json.loads(l)["train_loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def final_params(run):
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["model"]


def test_resume_is_bitwise_exact_and_needs_sampler_and_rng_state(tmp_path, corpus_file, data_dir):
    straight = tmp_path / "straight"
    train(tiny_cfg(straight, corpus_file, max_steps=8))

    def resumed(name, tamper=None):
        run = tmp_path / name
        train(tiny_cfg(run, corpus_file, max_steps=4))       # constant lr: stopping at 4 of 4 == 4 of 8
        if tamper is not None:
            path = ckpt.latest_checkpoint(run)
            state = torch.load(path, weights_only=True)
            tamper(state)
            torch.save(state, path)
        # a fresh process, as a user restarting a job would
        r = run_entry("train.py", f"data.path={corpus_file}", f"out_dir={run}", *TINY_ARGS,
                      "model.dropout=0.1", "optim.schedule=constant", "train.eval_interval=0",
                      "train.max_steps=8", "train.allow_changes=true", "device=cpu",
                      env={"MINILLM_DATA_DIR": str(data_dir)})
        assert r.returncode == 0, r.stderr[-2000:]
        return run

    ok = resumed("ok")
    assert losses(ok) == losses(straight)                     # atol=0
    for name, t in final_params(straight).items():
        assert torch.equal(t, final_params(ok)[name]), name
    # Negative controls: the same comparison fails when sampler or RNG state is not restored.
    no_sampler = resumed("no_sampler", lambda s: s["batches"].update(pos=0, epoch=0))
    assert losses(no_sampler)[4:] != losses(straight)[4:]
    no_rng = resumed("no_rng", lambda s: s["rng"][0].update(torch=torch.random.default_generator.manual_seed(99).get_state()))
    assert losses(no_rng)[4:] != losses(straight)[4:]


def test_resume_refuses_other_shapes_and_formats(tmp_path, corpus_file, data_dir):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus_file, max_steps=2))
    cfg = tiny_cfg(run, corpus_file, max_steps=4)
    cfg.model.n_layer, cfg.model.norm = 3, "layernorm"
    with pytest.raises(RunError, match=r"model differs from the config: model.n_layer 2 -> 3, "
                                       r"model.norm 'rmsnorm' -> 'layernorm'; use the checkpoint's model settings"):
        train(cfg)
    path = ckpt.latest_checkpoint(run)
    state = torch.load(path, weights_only=True)
    state["format_version"] = 99
    torch.save(state, path)
    cfg = tiny_cfg(run, corpus_file, max_steps=4, resume=str(path))
    with pytest.raises(ckpt.CheckpointError, match="checkpoint format 99"):
        train(cfg)


def test_a_validation_split_shorter_than_a_window_is_warned_about(tmp_path, corpus_file, data_dir, caplog):
    """Also a warmup longer than the run (the lr never reaches its peak)."""
    from minillm.trainer import val_too_short
    assert val_too_short(32, 32) and not val_too_short(33, 32)   # one window: block_size inputs + 1 target
    caplog.set_level("INFO", logger="minillm")
    cfg = tiny_cfg(tmp_path / "run", corpus_file, max_steps=1)
    cfg.data.val_fraction = 0.0005
    train(cfg)
    assert "not one full window of model.block_size=32 + 1" in caplog.text
    assert "optim.warmup_steps=2 > train.max_steps=1: the learning rate never reaches optim.lr" in caplog.text
    caplog.clear()
    train(tiny_cfg(tmp_path / "run2", corpus_file, max_steps=2))
    assert "not one full window" not in caplog.text and "warmup_steps" not in caplog.text


def test_summary_bytes_per_token_is_that_of_the_scored_validation_tokens(tmp_path, corpus_file, data_dir):
    """With train.eval_tokens, bpb covers only the scored tokens: the summary's bytes per token must be
    theirs, so that final_val_loss / ln 2 / val_bytes_per_token == final_val_bpb."""
    import math
    s = train(tiny_cfg(tmp_path / "run", corpus_file, max_steps=2, eval_tokens=64))
    assert s["final_val_loss"] / math.log(2) / s["val_bytes_per_token"] == pytest.approx(s["final_val_bpb"])
    from minillm.trainer import bytes_per_token
    assert bytes_per_token(float("nan"), float("nan"), {"val_bytes": 30, "val_tokens": 10}) == 3.0


def test_curves_of_a_run_with_a_chinese_name_draw_without_glyph_warnings(tmp_path, monkeypatch):
    """No matplotlib warning per missing glyph for a CJK run folder name; an installed CJK font is used."""
    import warnings
    from matplotlib import font_manager
    from minillm import report
    run = tmp_path / "红楼梦-小"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "tokens": i * 100_000, "train_loss": 5.0 / i})
                                               + "\n" for i in range(1, 20)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert report.plot_run(run) == run / "curves.png"
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fake = type("Font", (), {"name": "WenQuanYi Zen Hei"})()
    monkeypatch.setattr(font_manager.fontManager, "ttflist", font_manager.fontManager.ttflist + [fake])
    assert report.font_families() == ["DejaVu Sans", "WenQuanYi Zen Hei"]


def test_reports_are_strict_json(tmp_path):
    """summary.json and metrics.jsonl never hold NaN / Infinity (not JSON; JSON.parse and jq refuse them)."""
    from minillm.metrics import strict_json
    from minillm.report import write_report
    from minillm.metrics import MetricsLogger, finite_fields
    def refuse(name):
        raise ValueError(name)
    assert json.loads(strict_json({"a": float("inf"), "b": [1.0, float("nan")], "c": {"d": -float("inf")}}),
                      parse_constant=refuse) == {"a": None, "b": [1.0, None], "c": {"d": None}}
    write_report(tmp_path, {"step": 3, "best_val_loss": float("inf")})
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)["best_val_loss"] is None
    assert finite_fields({"step": 1, "loss": float("inf"), "val": float("nan"), "lr": 0.1}) == {"step": 1, "lr": 0.1}
    # the logger itself drops them, from new records and from an older file's kept ones
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": Infinity}\n{"step": 2, "train_loss": 1.5}\n')
    logger = MetricsLogger(tmp_path, WandbConfig(), {}, resume_step=2)
    logger.log({"step": 3, "train_loss": float("inf"), "val_loss": float("nan"), "lr": 0.1})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l, parse_constant=refuse) for l in lines] == [{"step": 1}, {"step": 2, "train_loss": 1.5},
                                                                     {"step": 3, "lr": 0.1}]


def test_corrupt_latest_falls_back_to_previous(tmp_path, corpus_file, data_dir, caplog):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus_file, max_steps=4, ckpt_interval=2))
    latest = ckpt.latest_checkpoint(run)
    latest.write_bytes(latest.read_bytes()[:100])            # truncated
    caplog.set_level("INFO", logger="minillm")
    summary = train(tiny_cfg(run, corpus_file, max_steps=6, ckpt_interval=2, allow_changes=True))
    assert "falling back" in caplog.text and "resuming from" in caplog.text and "step_000002.pt" in caplog.text
    assert summary["step"] == 6


SAVE_AND_DIE = r"""
import sys, time, torch
from minillm import checkpoint as ckpt
run = sys.argv[1]
ckpt.save_checkpoint(run, 1, {"step": 1, "w": torch.ones(1000)})
real_save = torch.save
def slow_save(obj, f):
    f.write(b"partial bytes of a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
ckpt.save_checkpoint(run, 2, {"step": 2, "w": torch.zeros(1000)})
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", SAVE_AND_DIE, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "writing"            # the second save is half written
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001.pt"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 1
    assert [c.name for c in ckpt.list_checkpoints(tmp_path)] == ["step_000001.pt"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_checkpoints_and_exits(sig, code, tmp_path, corpus_file, data_dir):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"data.path={corpus_file}", f"out_dir={run}",
                          *TINY_ARGS, "train.max_steps=100000", "train.eval_interval=0", "device=cpu"],
                         cwd=ROOT, env={**os.environ, "MINILLM_DATA_DIR": str(data_dir)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-2000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert saved["train_state"]["step"] == last >= 3                          # the checkpoint is at the last finished step
    assert "checkpoint saved" in err


def test_ctrl_c_before_the_loop_is_one_line_and_130(tmp_path, corpus_file, data_dir):
    """SIGINT while the corpus is prepared (before the loop's own handler exists): no traceback, one line,
    exit 130, no checkpoint. The interrupt is raised inside preparation, as a Ctrl-C there would."""
    run = tmp_path / "run"
    code = ("import runpy, sys; import minillm.data.prepare as p\n"
            "def interrupted(*a, **k): raise KeyboardInterrupt\n"
            "p.prepare = interrupted\n"
            f"sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, f"data.path={corpus_file}", f"out_dir={run}", *TINY_ARGS],
                       cwd=ROOT, env={**os.environ, "MINILLM_DATA_DIR": str(data_dir)}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 130, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("stopped by SIGINT: the run continues from its last checkpoint")
    assert "Traceback" not in r.stderr
    assert not (run / "ckpt").exists()


def test_nan_is_skipped_and_never_reaches_the_weights(tmp_path, corpus_file, data_dir, monkeypatch):
    real_forward, calls = GPT.forward, {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                loss = loss * float("nan")
        return logits, loss

    steps = {"n": 0}
    real_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        steps["n"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(GPT, "forward", poisoned)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    run = tmp_path / "skip"
    summary = train(tiny_cfg(run, corpus_file, max_steps=5))
    assert steps["n"] == 4 and summary["skipped_nonfinite"] == 1   # step 3's update never happened
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[2].get("skipped") == "nonfinite"
    assert all(torch.isfinite(t).all() for t in final_params(run).values())

    calls["n"] = 0
    run = tmp_path / "stop"
    with pytest.raises(NonFiniteError, match=r"step 3: .* \(train.nan_policy=stop\)"):
        train(tiny_cfg(run, corpus_file, max_steps=5, nan_policy="stop", ckpt_interval=2))
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000002.pt"]   # nothing after the NaN


def test_guard_limits_and_spikes():
    g = StepGuard("skip", max_skipped=1, spike_zscore=4.0, spike_window=10)
    for i in range(10):
        assert g.check(i, 3.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2)) == "ok"
    assert g.check(11, 9.0, 1.0) == "spike"          # far outside the window's spread
    assert g.check(12, float("inf"), 1.0) == "nonfinite"
    with pytest.raises(NonFiniteError, match="max_skipped_steps=1"):
        g.check(13, 3.0, float("nan"))


def test_spike_guard_never_stalls_on_a_level_shift():
    g = StepGuard("skip", max_skipped=3, spike_zscore=4.0, spike_window=10)
    for i in range(10):
        g.check(i, 3.0 + 0.01 * (i % 3), 1.0)
    verdicts = [g.check(10 + i, 3.5 + 0.01 * (i % 3), 1.0) for i in range(50)]
    assert verdicts[0] == "spike"
    assert verdicts.count("spike") <= 3 and verdicts[-20:] == ["ok"] * 20   # the new level is accepted


def test_resume_refuses_another_tokenizer(tmp_path, corpus_file, data_dir):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus_file, max_steps=2))
    cfg = tiny_cfg(run, corpus_file, max_steps=4)
    cfg.tokenizer.split_digits = False
    with pytest.raises(RunError, match=r"different tokenizer than the settings give now \(tokenizer.split_digits "
                                       r"True -> False\)"):   # the key that changed is named
        train(cfg)


def test_resume_survives_a_torn_metrics_line(tmp_path, corpus_file, data_dir):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus_file, max_steps=2))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train_lo')                      # a crash mid-write
    train(tiny_cfg(run, corpus_file, max_steps=4, allow_changes=True))
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_mfu_uses_the_device_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0), bf16=True) == 989.4e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda", 0), bf16=False) == 51.2e12
    assert peak_flops(torch.device("cpu"), bf16=False) is None
    assert mfu(6e9, 1e4, 1e14) == pytest.approx(0.6)
    # flops_per_token against torch's own FLOP counter over forward + backward of a full sequence,
    # with attention as explicit matmuls (the counter has no formula for CPU SDPA kernels).
    from torch.utils.flop_counter import FlopCounterMode
    from minillm import ops

    def math_attention(q, k, v, causal=True, **kw):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v

    monkeypatch.setattr(ops, "attention", math_attention)
    for tie, kv in ((True, 2), (False, 1)):
        model = GPT(ModelConfig(vocab_size=100, n_layer=2, n_head=2, n_kv_head=kv, n_embd=32, block_size=16,
                                tie_embeddings=tie))
        idx = torch.randint(0, 100, (3, 16))
        with FlopCounterMode(display=False) as counter:
            model(idx, idx)[1].backward()
        assert counter.get_total_flops() == model.flops_per_token() * 3 * 16


def test_wandb_offline_and_report_command(tmp_path, corpus_file, data_dir, capsys):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, corpus_file, max_steps=3, eval_interval=3, profile_interval=2)
    cfg.logger.wandb = WandbConfig(mode="offline", project="minillm-test", tags=["test"])
    summary = train(cfg)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"fwd_ms", "bwd_ms", "opt_ms"} <= records[1].keys() and records[1]["fwd_ms"] > 0
    assert records[0]["flops_per_sec"] > 0
    saved = json.loads((run / "summary.json").read_text())
    assert saved["step"] == 3 and saved["peak_memory_mb"] > 0 and saved["final_val_bpb"] == summary["final_val_bpb"]
    (run / "curves.png").unlink()
    r = subprocess.run([sys.executable, "-m", "minillm.report", str(run)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and json.loads(r.stdout)["best_val_loss"] == saved["best_val_loss"]
    assert (run / "curves.png").stat().st_size > 10_000
    from minillm.report import main as report_main
    assert report_main([str(tmp_path / "nowhere")]) == 2 and report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [f"error: {tmp_path / 'nowhere'}: no such folder; give a run folder",
                        f"error: {tmp_path}: no metrics.jsonl; is this a run folder?"]


def test_init_from_fine_tunes_with_the_source_weights_and_tokenizer(tmp_path, corpus_file, data_dir, caplog):
    from conftest import make_corpus
    pre, fine, scratch = tmp_path / "pre", tmp_path / "fine", tmp_path / "scratch"
    train(tiny_cfg(pre, corpus_file, max_steps=30))
    domain = tmp_path / "domain.txt"
    domain.write_text(make_corpus(600, seed=7))
    caplog.set_level("INFO", logger="minillm")
    train(tiny_cfg(fine, domain, max_steps=3, init_from=str(pre)))
    assert "fine-tuning from" in caplog.text
    assert (fine / "tokenizer.model").read_bytes() == (pre / "tokenizer.model").read_bytes()
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(fine))["train_state"]["step"] == 3   # a fresh schedule
    train(tiny_cfg(scratch, domain, max_steps=3))
    assert losses(fine)[0] < losses(scratch)[0] - 1.0      # it starts from the pretrained weights
    cfg = tiny_cfg(tmp_path / "bad", domain, max_steps=3, init_from=str(pre))
    cfg.model.n_layer = 3
    with pytest.raises(RunError, match=r"has model.n_layer=2 but the config says 3"):
        train(cfg)


def test_resume_path_is_not_reapplied_once_the_run_has_moved_on(tmp_path, corpus_file, data_dir, caplog):
    base, run = tmp_path / "base", tmp_path / "run"
    train(tiny_cfg(base, corpus_file, max_steps=4, ckpt_interval=2))
    start = base / "ckpt" / "step_000002.pt"
    train(tiny_cfg(run, corpus_file, max_steps=6, ckpt_interval=2, resume=str(start), allow_changes=True))
    caplog.set_level("INFO", logger="minillm")
    summary = train(tiny_cfg(run, corpus_file, max_steps=8, ckpt_interval=2, resume=str(start),  # relaunched
                             allow_changes=True))
    assert "continuing from it" in caplog.text and "at step 6" in caplog.text
    assert summary["step"] == 8
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == list(range(3, 9))

"""The five parts of the GPU tier; each runs in its own process (``python -m benchmarks.gpu.parts NAME``).

    tests      pytest -m gpu (bf16/fp16 against FlashAttention's rule, determinism, ...): one row per case
    attention  minillm vs SDPA flash / cuDNN (and flash-attn): TFLOP/s fwd, bwd, fwd+bwd; at the goal's
               shapes also minillm's variants: MINILLM_ATTN_TMA=0 (minillm-notma, sm_90+) and
               MINILLM_ATTN_DKDV=split (minillm-split)
    norms      LayerNorm / RMSNorm: minillm vs torch eager, torch.compile (and Liger): GB/s fwd, bwd
               (the dry run runs minillm's norm kernels in the Triton interpreter; attention's are too slow there)
    train      gpt2-small and llama-small steps, kernels triton vs torch, compile off/on: tokens/s, MFU
    e2e        torchrun train.py model=gpt2-small on a small corpus, then sample.py in bf16 with the KV cache

A part writes ``{"part", "status", "rows", "notes", "config"}`` to ``--result`` after every group of
rows (atomically), so a part stopped at its time budget still leaves what it measured; suite.py reads
it. ``MINILLM_GPU_SUITE_INJECT=<part>`` makes that part raise at its start (tests/test_gpu_suite.py uses
it to check that a failing part is recorded and the others still run). With ``--dry-run`` every part
runs on CPU at tiny sizes (torch reference / SDPA math paths), so the plumbing is tested without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PARTS = ("tests", "attention", "norms", "train", "e2e")


class Result:
    """The part's result file, rewritten after each group of rows."""

    def __init__(self, path: Path, part: str, config: dict):
        self.path, self.data = path, {"part": part, "status": "running", "rows": [], "notes": [], "config": config}
        self.save()

    def add(self, rows: list[dict]) -> None:
        self.data["rows"] += rows
        self.save()

    def note(self, text: str) -> None:
        print(f"[{self.data['part']}] {text}", file=sys.stderr, flush=True)
        self.data["notes"].append(text)
        self.save()

    def save(self, **extra) -> None:
        self.data.update(extra)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _device(dry_run: bool) -> str:
    import torch
    if dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --dry-run for the CPU plumbing run)")
    return "cuda"


# ----------------------------------------------------------------------------------------------- tests
def part_tests(res: Result, args) -> None:
    """``pytest -m gpu`` over the kernel tests and this suite's GPU checks; one row per test case."""
    xml = Path(args.work) / "pytest_gpu.xml"
    files = ["tests/test_kernels_attention.py", "tests/test_kernels_norm.py", "tests/test_gpu_suite.py"]
    env = dict(os.environ)
    if args.dry_run:  # CPU: the gpu cases skip; one file keeps the collection (imports) cheap
        env["TRITON_INTERPRET"] = "1"
        files = files[-1:]
    else:
        env["MINILLM_TEST_GPU"] = "1"      # tests/conftest.py then leaves TRITON_INTERPRET unset
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={xml}", *files]
    log = Path(args.work) / "pytest_gpu.log"
    with open(log, "w") as out:  # -v lines reach the file as each case ends: kept if pytest is stopped
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            code = proc.wait(timeout=max(10.0, args.budget - 5))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    text = log.read_text(errors="replace")
    rows = junit_rows(xml) if code is not None and xml.exists() else verbose_rows(text)
    res.add(rows)
    last = (text.strip().splitlines() or ["(no output)"])[-1]
    res.note(f"pytest exit {code}: {last}" if code is not None else
             f"pytest stopped at the part's budget after {len(rows)} case(s); the rest did not run")
    failed = sum(r["outcome"] in ("failed", "error") for r in rows)
    if code is None or code not in (0, 5) or failed:
        raise RuntimeError(f"{failed} GPU-tier test(s) failed" + ("" if code is not None else ", budget spent")
                           + ("" if rows or code is None else f"; pytest said: {text[-800:]}"))


def junit_rows(xml: Path) -> list[dict]:
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (el.get("message") or el.text or "").strip()
                message = text.splitlines()[0][:200] if text else ""
                break
        rows.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}",
                     "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    return rows


def verbose_rows(text: str) -> list[dict]:
    """Cases from ``pytest -v`` lines ('tests/x.py::name[id] PASSED [ 10%]'), for a run stopped early."""
    import re
    rows = []
    for m in re.finditer(r"^tests/(\S+?)\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M):
        rows.append({"test": f"{m.group(1)}::{m.group(2)}", "outcome": m.group(3).lower(),
                     "seconds": 0.0, "message": ""})
    return rows


# ------------------------------------------------------------------------------------------- attention
def attention_grid(dry_run: bool, full: bool) -> list[dict]:
    """The shape groups measured, most important first (the goal's group: bf16, d=128, causal, MHA)."""
    if dry_run:
        return [dict(D=32, seqlens=[64], causal=True, gqa=1), dict(D=32, seqlens=[48], causal=False, gqa=2)]
    all_t = [512, 1024, 2048, 4096, 8192, 16384]
    if full:
        return [dict(D=D, seqlens=all_t, causal=c, gqa=g) for D in (128, 64) for c in (True, False) for g in (1, 4)]
    return [dict(D=128, seqlens=all_t, causal=True, gqa=1),
            dict(D=128, seqlens=[1024, 4096, 16384], causal=True, gqa=4),
            dict(D=128, seqlens=[1024, 4096, 16384], causal=False, gqa=1),
            dict(D=64, seqlens=[512, 2048, 8192], causal=True, gqa=1)]


def part_attention(res: Result, args) -> None:
    import torch
    from benchmarks import bench_attention as ba
    from benchmarks.common import environment
    device = _device(args.dry_run)
    if args.dry_run:
        dtype, tokens, hidden, reps = torch.float32, 128, 64, 2
    else:
        dtype, tokens, hidden, reps = torch.bfloat16, 16384, 2048, 20
    peak = ba.peak_tflops(environment()["device"]) if device == "cuda" else None
    impls = ba.implementations(device)
    res.save(impls=list(impls), peak_tflops=peak)
    deadline = time.monotonic() + args.budget - 5
    for i, g in enumerate(attention_grid(args.dry_run, args.full)):
        # minillm's variants (TMA off, the dK/dV split) are asked at the goal's shapes (the first group)
        # only: the rest of the budget goes to the other shapes (--full: every group)
        group_impls = impls if i == 0 or args.full else {k: f for k, f in impls.items()
                                                         if k not in ("minillm-notma", "minillm-split")}
        for T in g["seqlens"]:
            if time.monotonic() > deadline:
                res.note(f"budget spent: skipped D={g['D']} T={T} causal={g['causal']} gqa={g['gqa']}")
                continue
            rows = ba.measure([g["D"]], [T], tokens, hidden, g["gqa"], g["causal"], dtype, device, reps,
                              directions=("fwd", "bwd", "fwd+bwd"), on_mismatch="record", impls=group_impls,
                              peak=peak)
            res.add(rows)
            wrong = [r for r in rows if r["status"] == "wrong"]
            if wrong:
                res.note("wrong result: " + ", ".join(f"{r['impl']} D={r['D']} T={T} err={r['err']:.3g}"
                                                     for r in wrong))
    if any(r["status"] == "wrong" and r["impl"] == "minillm" for r in res.data["rows"]):
        raise RuntimeError("minillm attention differs from the reference (rows with status 'wrong')")


# ----------------------------------------------------------------------------------------------- norms
def part_norms(res: Result, args) -> None:
    import torch
    from benchmarks import bench_norm as bn
    from benchmarks.common import environment
    device = _device(args.dry_run)
    if args.dry_run:  # minillm's kernels too, in the interpreter (set before any kernel module loads)
        os.environ["TRITON_INTERPRET"] = "1"
        sizes, dtypes, M, reps = [96], [torch.float32], 32, 2
    else:
        import torch._dynamo
        for key in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, 64)  # a graph per shape, never eager after 8 shapes
        sizes = [1024, 2048, 4096, 8192, 16384] if not args.full else [1024, 2048, 4096, 5120, 8192, 12288, 16384]
        dtypes = [torch.bfloat16] + ([torch.float32, torch.float16] if args.full else [])
        M, reps = 16384, 20
    peak = bn.peak_gbps(environment()["device"]) if device == "cuda" else None
    copy = bn.copy_gbps(device, (1 << 20) if args.dry_run else (1 << 30), reps)
    res.save(copy_gbps=copy, peak_gbps=peak)
    deadline = time.monotonic() + args.budget - 5
    for kind in ("rms", "layer"):
        for dtype in dtypes:
            for N in sizes:
                if time.monotonic() > deadline:
                    res.note(f"budget spent: skipped {kind} {dtype} N={N}")
                    continue
                res.add(bn.measure([N], [dtype], M, device, reps, copy, peak, on_mismatch="record", kinds=(kind,),
                                   interpret=args.dry_run))
    if any(r["status"] == "wrong" and r["impl"] == "minillm" for r in res.data["rows"]):
        raise RuntimeError("minillm norm differs from the reference (rows with status 'wrong')")


# ----------------------------------------------------------------------------------------------- train
def train_rows(dry_run: bool, full: bool) -> list[tuple[str, str, str]]:
    """(preset, variant, kernels), most important first: the compile rows last, since they cost the most."""
    if dry_run:
        return [("nanogpt", "fused", "torch")]
    if full:
        return [(p, v, k) for p in ("gpt2", "llama") for v in ("fused", "compile") for k in ("triton", "torch")]
    # the MFU goal's rows and their baseline first, then llama-small
    return [("gpt2", "fused", "triton"), ("gpt2", "fused", "torch"), ("gpt2", "compile", "triton"),
            ("llama", "fused", "triton"), ("llama", "fused", "torch")]


def part_train(res: Result, args) -> None:
    from benchmarks import bench_train as bt
    device = _device(args.dry_run)
    steps, repeats, warmup = (2, 1, 1) if args.dry_run else (10, 3, 5)
    deadline = time.monotonic() + args.budget - 3
    for preset, variant, kernels in train_rows(args.dry_run, args.full):
        left = deadline - time.monotonic()
        if left < (5 if args.dry_run else 20):
            res.note(f"budget spent: skipped {preset}/{variant}/{kernels}")
            continue
        spec = bt.spec_for(preset, variant) | {"device": device, "steps": steps, "repeats": repeats, "warmup": warmup,
                                               "threads": 1 if args.dry_run else 0, "profile": False,
                                               "kernels": kernels}
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--worker", json.dumps(spec)]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            res.add([{"preset": preset, "variant": variant, "kernels": kernels, "status": "timeout",
                      "seconds": time.monotonic() - t0}])
            continue
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            res.add([{"preset": preset, "variant": variant, "kernels": kernels, "status": "error",
                      "error": tail[0][:300], "seconds": time.monotonic() - t0}])
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        res.add([{**row, "kernels_asked": kernels, "status": "ok", "seconds": time.monotonic() - t0}])
    bad = [r for r in res.data["rows"] if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} training configuration(s) failed: "
                           + ", ".join(f"{r['preset']}/{r['variant']}/{r['kernels']}" for r in bad))


# ------------------------------------------------------------------------------------------------- e2e
def synthetic_corpus(n_bytes: int, seed: int = 0) -> str:
    """Deterministic play-like text (the GPU machine has no network and no tinyshakespeare): speaker
    lines, and 3000 made-up words of 1-3 syllables drawn with Zipf-like frequencies (weight 1/rank), so a
    1024-piece BPE vocabulary has enough distinct text to fill and the model has structure to learn."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwy" for v in ("a", "e", "i", "o", "u", "ea", "ou")]
    lexicon = sorted({"".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 3))))
                      for _ in range(4000)})[:3000]
    rng.shuffle(lexicon)
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    names = ["ROMEO", "JULIET", "KING HENRY", "NURSE", "FRIAR", "MERCUTIO"]
    out, size = [], 0
    while size < n_bytes:
        line = f"{rng.choice(names)}:\n" if rng.random() < 0.15 else ""
        words_line = " ".join(rng.choices(lexicon, weights, k=rng.randint(4, 10)))
        line += words_line[0].upper() + words_line[1:] + rng.choice(",.!?;") + "\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def find_corpus(work: Path, dry_run: bool) -> tuple[Path, str]:
    """tinyshakespeare where it is on disk (MINILLM_DATA_DIR, ~/.cache/minillm, ../shared/data), else a
    synthetic corpus written into ``work`` (1 MB on GPU, 60 kB in the dry run)."""
    if not dry_run:
        for d in (os.environ.get("MINILLM_DATA_DIR"), Path.home() / ".cache" / "minillm", ROOT.parent / "shared" / "data"):
            if d and (Path(d) / "tinyshakespeare.txt").is_file():
                return Path(d) / "tinyshakespeare.txt", "tinyshakespeare"
    path = work / "corpus.txt"
    path.write_text(synthetic_corpus(60_000 if dry_run else 1_000_000))
    return path, "synthetic"


def part_e2e(res: Result, args) -> None:
    """torchrun --nproc_per_node=1 train.py model=gpt2-small (about a minute), then sample.py from the run."""
    work = Path(args.work)
    corpus, corpus_name = find_corpus(work, args.dry_run)
    run = work / "e2e_run"
    env = {**os.environ, "MINILLM_DATA_DIR": str(work / "data_cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if args.dry_run:
        steps = 12
        model = ["model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.n_embd=32", "model.block_size=32",
                 "tokenizer.vocab_size=400", "train.batch_size=4", "device=cpu", "optim.warmup_steps=2"]
        sample_device, sample_dtype = "cpu", "bfloat16"
    else:
        steps = 150
        model = ["model=gpt2-small", "tokenizer.vocab_size=1024", "train.batch_size=16", "device=cuda",
                 "optim.warmup_steps=30", "optim.lr=6e-4", "train.eval_tokens=65536"]
        sample_device, sample_dtype = "cuda", "bfloat16"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
           f"data.path={corpus}", f"out_dir={run}", f"train.max_steps={steps}", f"train.eval_interval={steps // 2}",
           "train.log_interval=1", "logger.progress=false", *model]
    res.save(train_command=" ".join(cmd[1:]), corpus=corpus_name)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(10, args.budget * 0.8))
    train_s = time.monotonic() - t0
    (work / "e2e_train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        said = [l for l in proc.stderr.splitlines() if l.startswith("error:")] or proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"train.py exit {proc.returncode}: {' '.join(said)[-800:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    ckpts = sorted((run / "ckpt").glob("*.pt")) if (run / "ckpt").is_dir() else []
    tps = sorted(r["tokens_per_sec"] for r in records if r.get("tokens_per_sec"))
    mfus = sorted(r["mfu"] for r in records if r.get("mfu"))
    row = {"stage": "train", "seconds": train_s, "steps": len(losses), "corpus": corpus_name,
           "loss_first_fifth": first, "loss_last_fifth": last, "loss_falls": last < first - 0.1,
           "val_bpb": evals[-1].get("val_bpb") if evals else None, "checkpoint": ckpts[-1].name if ckpts else None,
           "checkpoint_MB": ckpts[-1].stat().st_size / 1e6 if ckpts else 0.0,
           "tokens_per_s_median": tps[len(tps) // 2] if tps else None,
           "mfu_median": mfus[len(mfus) // 2] if mfus else None}
    res.add([row])
    if (run / "curves.png").is_file():
        import shutil
        shutil.copyfile(run / "curves.png", work / "e2e_curves.png")
    cmd = [sys.executable, "sample.py", f"ckpt={run}", f"device={sample_device}", f"dtype={sample_dtype}",
           "kv_cache=true", "max_new_tokens=64", "num_samples=2", "prompt=ROMEO:", "stream=false", "seed=1"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=max(10, args.budget - (time.monotonic() - t0) - train_s))
    sample = {"stage": "sample", "seconds": time.monotonic() - t0, "exit": proc.returncode,
              "device": sample_device, "dtype": sample_dtype, "kv_cache": True,
              "text": proc.stdout.strip()[:300], "error": proc.stderr.strip()[-300:] if proc.returncode else ""}
    res.add([sample])
    problems = [p for p, bad in (("loss did not fall", not row["loss_falls"]), ("no checkpoint", not ckpts),
                                 ("sample.py failed", proc.returncode != 0),
                                 ("sample printed nothing", proc.returncode == 0 and "ROMEO:" not in proc.stdout))
                if bad]
    if problems:
        raise RuntimeError("; ".join(problems))


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="run one part of the GPU tier (see benchmarks/gpu/suite.py)")
    p.add_argument("part", choices=PARTS)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (logs, run folders)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds this part may take")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--full", action="store_true")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    res = Result(args.result, args.part, {"dry_run": args.dry_run, "full": args.full, "budget_s": args.budget})
    try:
        if os.environ.get("MINILLM_GPU_SUITE_INJECT") == args.part:
            raise RuntimeError(f"injected failure in part {args.part} (MINILLM_GPU_SUITE_INJECT)")
        globals()[f"part_{args.part}"](res, args)
    except BaseException as e:  # recorded for the summary; the suite goes on with the next part
        res.save(status="error", error=f"{type(e).__name__}: {e}"[:2000])
        import traceback
        traceback.print_exc()
        return 1
    res.save(status="ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

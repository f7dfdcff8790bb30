"""Training throughput of a whole step: tokens/s, ms split into forward / backward / optimizer,
achieved FLOP/s (and MFU on CUDA), peak memory.

    python benchmarks/bench_train.py                           # nanoGPT's CPU shapes, every variant
    python benchmarks/bench_train.py --preset tiny --variants eager,compile
    python benchmarks/bench_train.py --preset nanogpt --profile  # where the time goes (torch.profiler)
    python benchmarks/bench_train.py --quick                   # seconds, CPU: the mechanics only

One row per (preset, variant). Each row runs in a fresh subprocess so its peak RSS (CPU) or peak
allocated memory (CUDA) is its own, not inflated by the rows before it. A step is exactly what
Trainer.train_step (minillm/trainer.py) does: forward + loss, backward, clip_grad_norm_, optimizer.step(), zero_grad(), and
``.item()`` on the loss and the gradient norm. Inputs are random tokens (throughput does not depend on
the text). tokens/s comes from steps timed back to back (median of --repeats windows); the fwd/bwd/opt
split from separately timed steps (median per phase; synchronised on CUDA), so the three need not add up
exactly to the step time.

Presets
    nanogpt   nanoGPT's README CPU recipe: 4 layers, 4 heads, width 128, context 64, batch 12, vocab 65,
              learned positions, LayerNorm with bias, exact GELU (nn.GELU()), tied embeddings, dropout 0, fp32, AdamW
              (weight decay 0.1 on matrices, betas 0.9/0.99 as its shakespeare_char config), clip 1.0.
              Reference on these 2-core machines: ~16,250 tokens/s, peak RSS 437 MiB (measured by the lead).
    tiny      minillm's default model (RoPE, RMSNorm, SwiGLU, vocab 1024, context 256, batch 16)
    recipe    configs/experiment/shakespeare_cpu.yaml's model and batch
    gpt2      GPT-2 small (124M), context 1024, batch 8 (CUDA only in practice)
    llama     configs/model/llama-small.yaml: RMSNorm, RoPE, SwiGLU, GQA 12:4, untied; context 1024, batch 8
Kernels (--kernels, comma list; one row per preset x variant x kernels)
    auto      Triton on CUDA, torch elsewhere (minillm/ops.py); torch: SDPA and torch norms; triton: the
              kernels in kernels/ (CUDA, or the interpreter under TRITON_INTERPRET=1)
Variants
    eager     torch eager, AdamW single-tensor loop (torch's CPU default; nanoGPT's setting on CPU)
    fused     eager, AdamW fused=True (one fused kernel for all parameters; works on CPU in torch 2.13)
    compile   torch.compile(model) (inductor; C++ codegen on CPU), AdamW fused
    compile_lean  compile, with the (unused on CPU) triton import blocked: -72 MiB peak RSS
    fused_lean    fused, triton import blocked (torch.optim imports torch._dynamo, which imports triton)
    muon      eager, Muon for hidden matrices + fused AdamW for the rest

Profile findings (nanogpt preset, eager, one thread, ``--profile``; details in the README section
"Benchmarks and the CPU recipe"): matmuls 62% of self CPU time, SDPA's CPU flash attention 12%, GELU 7%
(its backward 3x its forward), AdamW's single-tensor loop 6% (fused: 1%), LayerNorm 2%, the rest small
element-wise ops, autograd and Python. Creating any torch.optim optimizer imports torch._dynamo, which
imports triton and sympy (+143 MiB RSS on CPU; triton alone 72 MiB): the *_lean variants block triton.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "nanogpt": dict(model=dict(name="nanogpt-cpu", vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64,
                               norm="layernorm", pos="learned", mlp="gelu", gelu_approximate="none",
                               tie_embeddings=True, bias=True, dropout=0.0),
                    batch_size=12, optim=dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)),
    "tiny": dict(model=dict(name="tiny", vocab_size=1024), batch_size=16, optim=dict()),
    "recipe": dict(model=dict(name="shakespeare_cpu", vocab_size=1024), batch_size=16, optim=dict(),
                   from_experiment="shakespeare_cpu"),
    "gpt2": dict(model=dict(name="gpt2-small", vocab_size=50304, n_layer=12, n_head=12, n_embd=768, block_size=1024,
                            norm="layernorm", pos="learned", mlp="gelu", tie_embeddings=True, bias=True),
                 batch_size=8, optim=dict()),
    "llama": dict(model=dict(name="llama-small", vocab_size=50304, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
                             block_size=1024, norm="rmsnorm", pos="rope", rope_theta=10000.0, mlp="swiglu",
                             tie_embeddings=False, bias=False),
                  batch_size=8, optim=dict()),
}
VARIANTS = {
    "eager": dict(compile=False, optim=dict(fused=False)),
    "fused": dict(compile=False, optim=dict(fused=True)),
    "fused_lean": dict(compile=False, optim=dict(fused=True), block_triton=True),
    "compile": dict(compile=True, optim=dict(fused=True)),
    "compile_lean": dict(compile=True, optim=dict(fused=True), block_triton=True),
    "muon": dict(compile=False, optim=dict(fused=True, name="muon")),
}


def _experiment_overrides(name: str) -> dict:
    """model.*, train.batch_size and optim.* keys set by configs/experiment/<name>.yaml."""
    import yaml
    path = Path(__file__).resolve().parents[1] / "configs" / "experiment" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    model = {k: v for k, v in (data.get("model") or {}).items()}
    return {"model": model, "batch_size": (data.get("train") or {}).get("batch_size"),
            "optim": {k: v for k, v in (data.get("optim") or {}).items()}}


def spec_for(preset: str, variant: str) -> dict:
    p = json.loads(json.dumps(PRESETS[preset]))
    if "from_experiment" in p:
        exp = _experiment_overrides(p.pop("from_experiment"))
        p["model"].update(exp["model"])
        p["batch_size"] = exp["batch_size"] or p["batch_size"]
        p["optim"].update({k: v for k, v in exp["optim"].items() if k in ("lr", "beta1", "beta2", "weight_decay",
                                                                            "name", "muon_lr", "muon_momentum")})
    v = VARIANTS[variant]
    p["optim"] = {**p["optim"], **v["optim"]}
    return {"preset": preset, "variant": variant, "compile": v["compile"], "block_triton": v.get("block_triton", False),
            **p}


# ----------------------------------------------------------------------------------------------- worker
def run_worker(spec: dict) -> dict:
    """Build the model and optimizer of ``spec``, time training steps, return one result row."""
    if spec.get("block_triton") and spec["device"] == "cpu":
        # torch._dynamo imports triton when it can (72 MiB resident here) although inductor's CPU backend
        # generates C++ and never uses it; making the import fail keeps it out of the process.
        sys.modules["triton"] = None
    import torch
    from benchmarks.common import timeit  # noqa: F401  (same import cost as other benchmarks)
    from minillm import ops
    from minillm.config import ModelConfig, OptimConfig
    from minillm.flops import mfu, peak_flops
    from minillm.model import GPT
    from minillm.optimizer import build_optimizer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    ops.configure(spec.get("kernels", "auto"), device)
    cfg = ModelConfig(**spec["model"])
    model = GPT(cfg).to(device)
    optimizer = build_optimizer(model, OptimConfig(**spec["optim"]), device)
    fwd_model = torch.compile(model) if spec["compile"] else model
    B, T = spec["batch_size"], cfg.block_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen).to(device) for _ in range(8)]
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and spec.get("bf16", True)
           else torch.autocast("cpu", enabled=False))
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    params = list(model.parameters())
    phase = {"fwd_ms": [], "bwd_ms": [], "opt_ms": []}
    state = {"i": 0}

    def step(split: bool = False) -> None:
        xy = batches[state["i"] % len(batches)]
        state["i"] += 1
        t0 = time.perf_counter()
        with amp:
            _, loss = fwd_model(xy[:, :-1], xy[:, 1:])
        if split:
            sync(); t1 = time.perf_counter()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if split:
            sync(); t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item(), norm.item()  # the loop logs both every step
        if split:
            sync(); t3 = time.perf_counter()
            phase["fwd_ms"].append((t1 - t0) * 1e3)
            phase["bwd_ms"].append((t2 - t1) * 1e3)
            phase["opt_ms"].append((t3 - t2) * 1e3)

    t_warm = time.perf_counter()
    for _ in range(spec["warmup"]):
        step()
    sync()
    warmup_s = time.perf_counter() - t_warm
    windows = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        sync()
        windows.append(time.perf_counter() - t0)
    for _ in range(max(3, spec["steps"] // 2)):
        step(split=True)
    step_s = statistics.median(windows) / spec["steps"]
    tps = B * T / step_s
    fpt = model.flops_per_token()
    peak = peak_flops(device, spec.get("bf16", True))
    row = {"preset": spec["preset"], "variant": spec["variant"], "kernels": ops.backend(),
           "params_M": model.num_params() / 1e6,
           "B": B, "T": T, "tokens_per_s": tps, "tokens_per_s_min": B * T * spec["steps"] / max(windows),
           "tokens_per_s_max": B * T * spec["steps"] / min(windows), "step_ms": step_s * 1e3,
           **{k: statistics.median(v) for k, v in phase.items()},
           "flops_per_s": fpt * tps, "mfu": mfu(fpt, tps, peak), "warmup_s": warmup_s,
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # whole-process high-water mark: torch's libraries included, as for any training process
        row["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec.get("profile"):
        row["profile"] = profile_steps(step, spec.get("profile_steps", 20))
    return row


def profile_steps(step, n: int) -> list[dict]:
    """torch.profiler over n steps: the operators with the most self CPU time, and their share."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n, "calls_per_step": e.count / n,
             "share": e.self_cpu_time_total / total} for e in top]


# ----------------------------------------------------------------------------------------------- parent
def statistics_median_row(rows: list[dict]) -> dict:
    """One row from several rounds of the same config: numeric fields by median, the rest from the first."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in rows)
    return out


def run_in_subprocess(spec: dict) -> dict:
    """One row, measured in a fresh interpreter so peak memory is that row's alone."""
    env = dict(os.environ)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bench_train worker failed for {spec['preset']}/{spec['variant']}:\n{out.stderr[-3000:]}")
    if spec.get("profile"):
        print(out.stderr, file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> Path:
    from benchmarks.common import save_figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['preset']}/{r['variant']}" + (f"/{r['kernels']}" if len({x.get('kernels') for x in rows}) > 1
                                                  else "") for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2.0))
    left = [0.0] * len(rows)
    for key, color in (("fwd_ms", "tab:blue"), ("bwd_ms", "tab:orange"), ("opt_ms", "tab:green")):
        vals = [r[key] for r in rows]
        ax1.barh(labels, vals, left=left, color=color, label=key.replace("_ms", ""))
        left = [a + b for a, b in zip(left, vals)]
    ax1.set(xlabel="ms per step", title="time split per step")
    ax1.legend()
    ax2.barh(labels, [r["tokens_per_s"] for r in rows], color="tab:purple",
             xerr=[[max(0.0, r["tokens_per_s"] - r["tokens_per_s_min"]) for r in rows],
                   [max(0.0, r["tokens_per_s_max"] - r["tokens_per_s"]) for r in rows]])
    ax2.set(xlabel="tokens / s (median, min-max whiskers)", title="training throughput")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="x")
        ax.invert_yaxis()
    save_figure(fig, path)
    return path


def main(argv=None) -> int:
    from benchmarks.common import bench_parser
    p = bench_parser(__doc__, "bench_train", "a few steps of the nanogpt preset on CPU")
    p.add_argument("--preset", default="nanogpt", help=f"comma list of {', '.join(PRESETS)}")
    p.add_argument("--variants", default="eager,fused,compile", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=100, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compile happens here)")
    p.add_argument("--rounds", type=int, default=1, help="run every variant this many times, interleaved")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--kernels", default="auto", help="comma list of auto, torch, triton (minillm/ops.py)")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown to each row")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    import torch
    from benchmarks.common import RESULTS_DIR, environment, print_table, write_results

    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) else (
        "cpu" if args.device == "auto" else args.device)
    if args.quick:
        # one thread: on a busy machine two OpenMP threads can spin against each other for seconds
        device, presets, variants = "cpu", ["nanogpt"], ["eager", "fused"]
        args.steps, args.repeats, args.warmup, args.threads = 5, 2, 2, 1
    else:
        presets, variants = args.preset.split(","), args.variants.split(",")
    # Rounds interleave the variants (A B C A B C ...) so a change in machine load hits them alike;
    # each row reports the median over rounds, and the spread of every window in every round.
    kernel_choices = ["auto"] if args.quick else args.kernels.split(",")
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for preset in presets:
            for variant in variants:
                for kernels in kernel_choices:
                    spec = spec_for(preset, variant) | {"device": device, "steps": args.steps,
                                                        "repeats": args.repeats, "warmup": args.warmup,
                                                        "threads": args.threads, "profile": args.profile,
                                                        "kernels": kernels}
                    runs.setdefault((preset, variant, kernels), []).append(run_in_subprocess(spec))
    rows = []
    for (preset, variant, _kernels), rs in runs.items():
        row = dict(statistics_median_row(rs))
        row["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in rs]
        row["tokens_per_s_min"] = min(r["tokens_per_s_min"] for r in rs)
        row["tokens_per_s_max"] = max(r["tokens_per_s_max"] for r in rs)
        row["peak_mem_mib"] = max(r["peak_mem_mib"] for r in rs)
        base = next((r for r in rows if r["preset"] == preset), row)  # the preset's first variant
        row["vs_first"] = row["tokens_per_s"] / base["tokens_per_s"]
        rows.append(row)
    cols = ["preset", "variant", "kernels", "params_M", "B", "T", "tokens_per_s", "vs_first", "step_ms", "fwd_ms", "bwd_ms",
            "opt_ms", "flops_per_s"] + (["mfu"] if device == "cuda" else []) + ["peak_mem_mib", "warmup_s"]
    print_table(rows, cols)
    env = environment()
    try:
        env["loadavg"] = os.getloadavg()
    except OSError:
        pass
    out_dir = Path(args.out_dir or RESULTS_DIR)
    write_results("bench_train", rows, extra={"quick": args.quick, "load_at_start": env.get("loadavg"),
                                              "reference": {"nanogpt_cpu_tokens_per_s": 16250,
                                                            "nanogpt_cpu_peak_rss_mib": 437}},
                  out_dir=out_dir)
    plot(rows, out_dir / "bench_train.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Causal attention: minillm's Triton FlashAttention-2 vs SDPA (flash, cuDNN) and FlashAttention.

    python benchmarks/bench_attention.py               # GPU: T 512..16384, d 64 and 128, causal, bf16
    python benchmarks/bench_attention.py --fwd-bwd     # also forward+backward rows
    python benchmarks/bench_attention.py --quick       # CPU smoke run of the torch reference/SDPA path

Speed is TFLOP/s of the attention matmuls, counted as FlashAttention-2's own benchmark counts them
(Dao-AILab/flash-attention, benchmarks/benchmark_flash_attention.py, ``flops()``): forward
f = 4*B*H*T^2*D (QK^T and PV, 2 FLOPs per multiply-add), half of that when causal; backward 2.5 f
(dV, dP, dQ, dK plus the recomputed QK^T); forward+backward 3.5 f. Shapes follow the FlashAttention
papers: B*T = 16k tokens, hidden 2048, so H = 2048 / D.

Timing (benchmarks/common.py): "ms" is the kernel time, ``triton.testing.do_bench`` median with an L2
flush before each call on CUDA (cold L2, no host); "graph_ms" the same call captured once into a CUDA
graph and replayed back to back (no host; L2 holds what the previous replay left; "-" on CPU or where
the capture failed, the reason in the row's "graph_error"); "call_ms" is one synchronous call with the host's overhead (Python, autograd,
launches), and "host_ms" the difference of call_ms and ms. The backward is timed alone with
``torch.autograd.grad`` on a graph built once (never ``.backward()`` repeated, which would add a
read-add-write of dQ, dK, dV into ``.grad`` on every repeat). Before anything is timed, every
implementation's output and all three gradients are checked against an fp32 reference (relative L2
error, column "err"). "%peak" is against the dense bf16 tensor-core peak of known devices.
On compute capability 9.x and later, "minillm-notma" is minillm with MINILLM_ATTN_TMA=0 (the forward's
TMA loads off), forward and forward+backward only: whether TMA pays, measured in the same run. On every
CUDA device "minillm-split" is minillm with MINILLM_ATTN_DKDV=split (dV and dK in two kernels with
wider query tiles instead of the fused dK/dV kernel), backward and forward+backward only: whether the
split pays for its 1.25x matmul FLOPs.

Goal on an H100/H200 (unmeasured until run there): forward >= 330 TFLOP/s and forward+backward >= 250
TFLOP/s at d=128, causal, bf16, T >= 4096 (benchmarks/gpu/ reports each against its goal).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (TIMING, bench_parser, environment, grad_fn, on_capture_stream,  # noqa: E402
                               print_table, rel_err, save_figure, timings, write_results)

PEAK_TFLOPS = {"H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756, "H100": 989, "H200": 989,
               "A100": 312, "L40S": 362, "4090": 165}
# FLOPs of each timed direction as a multiple of the forward's (FlashAttention-2's benchmark script)
DIRECTION_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# Largest relative L2 error accepted before timing: fp32 (TF32 off) far under 1e-3; bf16/fp16 operands
# land between 1e-3 and 1e-2 (METHOD.md), dQ of long sequences a little above.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}
# Environment an implementation runs under (set around its check and every timed call, then restored):
# kernels/attention.py reads MINILLM_ATTN_TMA at each call, and its autotune key tells the two apart.
IMPL_ENV = {"minillm-notma": {"MINILLM_ATTN_TMA": "0"}, "minillm-split": {"MINILLM_ATTN_DKDV": "split"}}
# Directions an implementation is not timed in: TMA is in the forward only, so minillm-notma's backward
# alone would be minillm's backward again; the split is in the backward only.
SKIP_DIRECTIONS = {"minillm-notma": ("bwd",), "minillm-split": ("fwd",)}


def peak_tflops(device_name: str) -> float | None:
    for key, v in PEAK_TFLOPS.items():
        if key in device_name:
            return float(v)
    return None


def flops(B: int, H: int, T: int, D: int, causal: bool, direction: str) -> float:
    """FLOPs of one call (FlashAttention-2's benchmarks/benchmark_flash_attention.py ``flops``):
    f = 4*B*H*T*T*D, halved when causal; x2.5 for the backward, x3.5 for forward+backward."""
    f = 4.0 * B * H * T * T * D / (2 if causal else 1)
    return f * DIRECTION_FACTOR[direction]


def implementations(device: str) -> dict:
    """name -> fn(q, k, v, causal) on (B, H, T, D) tensors. On CPU only the torch paths."""
    from minillm.kernels.attention import attention_ref, flash_attention

    def sdpa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    if device != "cuda":
        return {"sdpa": sdpa, "reference": lambda q, k, v, c: attention_ref(q, k, v, causal=c)}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def backend(b):
        def fn(q, k, v, causal):
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return fn

    impls = {"minillm": lambda q, k, v, c: flash_attention(q, k, v, causal=c)}
    if torch.cuda.get_device_capability() >= (9, 0):  # where the forward uses TMA: the same kernel without it
        impls["minillm-notma"] = impls["minillm"]
    impls["minillm-split"] = impls["minillm"]  # the backward with dV and dK in two kernels
    impls |= {"sdpa-flash": backend(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": backend(SDPBackend.CUDNN_ATTENTION)}
    try:
        from flash_attn import flash_attn_func  # layout (B, T, H, D); takes GQA directly
        impls["flash-attn"] = lambda q, k, v, c: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c).transpose(1, 2)
    except Exception:  # not installed: leave it out of the table
        pass
    return impls


def make_inputs(B, H, H_kv, T, D, dtype, device, seed=0):
    """q, do: (B, H, T, D); k, v: (B, H_kv, T, D); q, k, v are leaves that require grad. N(0, 1), never
    zeros (METHOD.md: zeros hide unwritten outputs and can run faster than real data)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(B, H_kv, T, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(B, H_kv, T, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    do = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    return q, k, v, do


def reference(want, q, k, v, do):
    """(O, dQ, dK, dV) of ``want`` on fp32 copies of the inputs (autograd.grad: no .grad touched)."""
    xs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o = want(*xs)
    return (o.detach(), *torch.autograd.grad(o, xs, do.float()))


@contextlib.contextmanager
def env_set(values: dict):
    """Set environment variables for the block, then restore each (removed if it was unset)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def timed_calls(fn, q, k, v, do, causal, o) -> dict:
    """direction -> the closure that is timed. The backward reuses ``o``'s graph (built once)."""
    return {"fwd": lambda: fn(q, k, v, causal),
            "bwd": grad_fn(o, (q, k, v), do),
            "fwd+bwd": lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)}


def bench_one(name, fn, B, H, H_kv, T, D, causal, dtype, device, reps, want,
              directions=("fwd", "bwd"), on_mismatch="raise"):
    """Rows for one implementation at one shape: checked (O, dQ, dK, dV) first, then each direction timed
    (under ``IMPL_ENV[name]``, less ``SKIP_DIRECTIONS[name]``).

    ``on_mismatch="raise"`` stops the script on a wrong result; ``"record"`` returns one row with
    ``status="wrong"`` and no timings (benchmarks/gpu/ keeps going and reports it)."""
    directions = [d for d in directions if d not in SKIP_DIRECTIONS.get(name, ())]
    with env_set(IMPL_ENV.get(name, {})):
        return _bench_one(name, fn, B, H, H_kv, T, D, causal, dtype, device, reps, want, directions, on_mismatch)


def _bench_one(name, fn, B, H, H_kv, T, D, causal, dtype, device, reps, want, directions, on_mismatch):
    q, k, v, do = make_inputs(B, H, H_kv, T, D, dtype, device)
    base = {"impl": name, "dtype": str(dtype).replace("torch.", ""), "B": B, "H": H, "H_kv": H_kv, "T": T,
            "D": D, "causal": causal}
    try:
        o = fn(q, k, v, causal)
        got = (o.detach(), *torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    except Exception as e:  # e.g. a cuDNN backend that does not take this shape: report, not crash
        print(f"[bench_attention] {name} T={T} D={D} H_kv={H_kv}: unavailable ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:120] if str(e) else ''})", file=sys.stderr)
        return []
    errs = [rel_err(a, b) for a, b in zip(got, reference(want, q, k, v, do))]
    del got
    err = max(errs)
    if not err <= TOLERANCE[dtype]:
        msg = (f"{name} T={T} D={D} causal={causal}: differs from the reference (relative error "
               f"O {errs[0]:.3g}, dQ {errs[1]:.3g}, dK {errs[2]:.3g}, dV {errs[3]:.3g} > {TOLERANCE[dtype]})")
        if on_mismatch == "raise":
            raise SystemExit(msg)
        print(f"[bench_attention] {msg}", file=sys.stderr)
        return [{**base, "dir": "check", "status": "wrong", "err": err}]
    calls = timed_calls(fn, q, k, v, do, causal, o)
    graphed = calls
    if device == "cuda" and "bwd" in directions:  # the captured backward replays a graph built on
        with on_capture_stream(device):             # the capture stream (common.py)
            graphed = timed_calls(fn, q, k, v, do, causal, fn(q, k, v, causal))
    rows = []
    for direction in directions:
        t = timings(calls[direction], device, reps, graphed[direction])
        tflops = flops(B, H, T, D, causal, direction) / (t["ms"] * 1e-3) / 1e12
        rows.append({**base, "dir": direction, **t, "TFLOP/s": tflops, "err": err, "status": "ok"})
    assert q.grad is None and k.grad is None and v.grad is None  # timing never accumulated into .grad
    return rows


def plot(rows, path: Path) -> None:
    """TFLOP/s against T: one row of panels per (head dim, causal, GQA), one panel per direction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r.get("status", "ok") == "ok"]
    groups = sorted({(r["D"], r["causal"], r["H"] // r["H_kv"]) for r in rows})
    dirs = [d for d in DIRECTION_FACTOR if any(r["dir"] == d for r in rows)]
    fig, axes = plt.subplots(max(1, len(groups)), max(1, len(dirs)), figsize=(5 * max(1, len(dirs)),
                             3.2 * max(1, len(groups))), squeeze=False)
    for i, (D, causal, ratio) in enumerate(groups):
        for j, direction in enumerate(dirs):
            ax = axes[i][j]
            for impl in sorted({r["impl"] for r in rows}):
                pts = sorted((r["T"], r["TFLOP/s"]) for r in rows if r["impl"] == impl and r["dir"] == direction
                             and (r["D"], r["causal"], r["H"] // r["H_kv"]) == (D, causal, ratio))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{direction}, d={D}, {'causal' if causal else 'full'}, "
                         f"{'MHA' if ratio == 1 else f'GQA {ratio}:1'}", fontsize=9)
            ax.set_xlabel("T")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=7)
    save_figure(fig, path, dpi=90)


def measure(dims, seqlens, tokens, hidden, gqa, causal, dtype, device, reps, directions=("fwd", "bwd"),
            on_mismatch="raise", impls=None, peak=None) -> list[dict]:
    """Every implementation at every (D, T): B = tokens // T, H = hidden // D, H_kv = H // gqa.
    Adds "vs_sdpa" (SDPA's time over this one's, same direction, same run) and "%peak"."""
    from minillm.kernels.attention import attention_ref
    impls = impls or implementations(device)
    rows = []
    for D in dims:
        H = max(1, hidden // D)
        H_kv = max(1, H // gqa)
        for T in seqlens:
            B = max(1, tokens // T)

            def want(q, k, v, B=B, H=H, T=T):
                # fp32 math reference while its T x T scores (and their gradient) stay under 1 GB,
                # else SDPA's fp32 path (memory-efficient kernel), which never builds them; K/V are
                # repeated per query head there, since not every SDPA backend takes GQA in fp32
                if device == "cuda" and B * H * T * T * 4 > 2**30:
                    rep = q.shape[1] // k.shape[1]
                    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                          is_causal=causal)
                return attention_ref(q, k, v, causal=causal)

            group = []
            for name, fn in impls.items():
                group += bench_one(name, fn, B, H, H_kv, T, D, causal, dtype, device, reps, want,
                                   directions=directions, on_mismatch=on_mismatch)
            base_name = "sdpa-flash" if device == "cuda" else "sdpa"
            for r in group:
                if r["status"] != "ok":
                    continue
                base = next((g for g in group if g["impl"] == base_name and g["dir"] == r["dir"]), None)
                r["vs_sdpa"] = base["ms"] / r["ms"] if base else float("nan")
                if peak:
                    r["%peak"] = 100 * r["TFLOP/s"] / peak
            rows += group
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = bench_parser(__doc__, "bench_attention", "tiny CPU run of the torch reference/SDPA path")
    p.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--tokens", type=int, default=16384, help="B*T (B = tokens // T, at least 1)")
    p.add_argument("--hidden", type=int, default=2048, help="H*D (H = hidden // D)")
    p.add_argument("--gqa", type=int, default=1, help="query heads per kv head")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--fwd-bwd", action="store_true", help="also time forward+backward in one call")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    causal = not args.non_causal
    if args.quick:
        seqlens, dims, tokens, hidden, dtype, reps = [64, 128], [32, 64], 256, 128, torch.float32, 3
    else:
        if device != "cuda":
            print("no CUDA device: run with --quick for the CPU smoke path", file=sys.stderr)
            return 2
        seqlens = [int(t) for t in args.seqlens.split(",")]
        dims = [int(d) for d in args.head_dims.split(",")]
        tokens, hidden, dtype, reps = args.tokens, args.hidden, torch.bfloat16, 20

    env = environment()
    peak = peak_tflops(env["device"]) if device == "cuda" else None
    directions = ("fwd", "bwd", "fwd+bwd") if args.fwd_bwd else ("fwd", "bwd")
    rows = measure(dims, seqlens, tokens, hidden, args.gqa, causal, dtype, device, reps, directions, peak=peak)
    cols = ["impl", "dtype", "B", "H", "T", "D", "dir", "ms", "graph_ms", "call_ms", "TFLOP/s"]
    cols += ["%peak"] if peak else []
    print_table(rows, cols + ["vs_sdpa", "err"])
    path = write_results("bench_attention", rows, out_dir=args.out_dir,
                         extra={"quick": args.quick, "causal": causal, "peak_tflops": peak,
                                "flops": "FlashAttention-2 benchmark_flash_attention.py: fwd 4*B*H*T^2*D "
                                         "(/2 causal), bwd 2.5x, fwd+bwd 3.5x",
                                "timing": TIMING,
                                "goal": {"fwd_tflops": 330, "fwd_bwd_tflops": 250, "D": 128,
                                         "T_min": 4096, "device": "H100/H200", "dtype": "bf16"}})
    plot(rows, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Causal attention: minillm's Triton FlashAttention-2 vs SDPA (flash, cuDNN) and FlashAttention.

    python benchmarks/bench_attention.py               # GPU: T 512..16384, d 64 and 128, causal, bf16
    python benchmarks/bench_attention.py --quick       # CPU smoke run of the torch reference/SDPA path

Speed is TFLOP/s of the attention matmuls: forward 4*B*H*T^2*D (QK^T and PV, 2 FLOPs per MAC), half of
that when causal; backward 2.5x the forward (dV, dP, dQ, dK plus the recomputed QK^T). Shapes follow
the FlashAttention papers: B*T = 16k tokens, hidden 2048, so H = 2048 / D. The backward is timed alone
(``o.backward(do, retain_graph=True)`` on a graph built once). "%peak" is against the dense bf16
tensor-core peak of known devices (H100 SXM 989 TFLOP/s, A100 312). Every implementation's output is
checked against a reference before it is timed.

Goal on an H100 (unmeasured until run there): forward >= 330 TFLOP/s and backward >= 250 TFLOP/s at
d=128, causal, T >= 4096.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench_parser, environment, print_table, save_figure, timeit, write_results  # noqa: E402

PEAK_TFLOPS = {"H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756, "H100": 989, "H200": 989,
               "A100": 312, "L40S": 362, "4090": 165}


def peak_tflops(device_name: str) -> float | None:
    for key, v in PEAK_TFLOPS.items():
        if key in device_name:
            return float(v)
    return None


def flops(B: int, H: int, T: int, D: int, causal: bool, direction: str) -> float:
    f = 4.0 * B * H * T * T * D / (2 if causal else 1)
    return f * 2.5 if direction == "bwd" else f


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

    impls = {"minillm": lambda q, k, v, c: flash_attention(q, k, v, causal=c),
             "sdpa-flash": backend(SDPBackend.FLASH_ATTENTION),
             "sdpa-cudnn": backend(SDPBackend.CUDNN_ATTENTION)}
    try:
        from flash_attn import flash_attn_func  # layout (B, T, H, D)
        impls["flash-attn"] = lambda q, k, v, c: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c).transpose(1, 2)
    except Exception:  # not installed: leave it out of the table
        pass
    return impls


def bench_one(name, fn, B, H, H_kv, T, D, causal, dtype, device, reps, want):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(B, H_kv, T, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(B, H_kv, T, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    do = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    try:
        o = fn(q, k, v, causal)
    except Exception as e:  # e.g. a cuDNN backend that does not take this shape: report, not crash
        print(f"[bench_attention] {name} T={T} D={D}: unavailable ({type(e).__name__})", file=sys.stderr)
        return []
    ref = want(q.detach(), k.detach(), v.detach())
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    if not torch.allclose(o.float(), ref.float(), atol=tol, rtol=tol):
        raise SystemExit(f"{name} T={T} D={D}: output differs from the reference "
                         f"(max err {(o.float() - ref.float()).abs().max().item():.3g})")
    fwd_ms = timeit(lambda: fn(q, k, v, causal), reps=reps, device=device)
    bwd_ms = timeit(lambda: o.backward(do, retain_graph=True), reps=reps, device=device)
    rows = []
    for direction, ms in (("fwd", fwd_ms), ("bwd", bwd_ms)):
        rows.append({"impl": name, "dtype": str(dtype).replace("torch.", ""), "B": B, "H": H,
                     "H_kv": H_kv, "T": T, "D": D, "causal": causal, "dir": direction, "ms": ms,
                     "TFLOP/s": flops(B, H, T, D, causal, direction) / (ms * 1e-3) / 1e12})
    return rows


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(len(dims), 2, figsize=(10, 3.5 * len(dims)), squeeze=False)
    for i, D in enumerate(dims):
        for j, direction in enumerate(("fwd", "bwd")):
            ax = axes[i][j]
            for impl in sorted({r["impl"] for r in rows}):
                pts = sorted((r["T"], r["TFLOP/s"]) for r in rows
                             if r["impl"] == impl and r["D"] == D and r["dir"] == direction)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{direction}, d={D}")
            ax.set_xlabel("T")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def main(argv=None) -> int:
    p = bench_parser(__doc__, "bench_attention", "tiny CPU run of the torch reference/SDPA path")
    p.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--tokens", type=int, default=16384, help="B*T (B = tokens // T, at least 1)")
    p.add_argument("--hidden", type=int, default=2048, help="H*D (H = hidden // D)")
    p.add_argument("--gqa", type=int, default=1, help="query heads per kv head")
    p.add_argument("--non-causal", action="store_true")
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

    from minillm.kernels.attention import attention_ref
    env = environment()
    peak = peak_tflops(env["device"]) if device == "cuda" else None
    impls = implementations(device)
    rows = []
    for D in dims:
        H = max(1, hidden // D)
        H_kv = max(1, H // args.gqa)
        for T in seqlens:
            B = max(1, tokens // T)

            def want(q, k, v, B=B, H=H, T=T):
                # fp32 math reference while its T x T scores stay under 2 GB, else SDPA's default
                if device == "cuda" and B * H * T * T * 4 > 2**31:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                return attention_ref(q.float(), k.float(), v.float(), causal=causal)

            group = []
            for name, fn in impls.items():
                group += bench_one(name, fn, B, H, H_kv, T, D, causal, dtype, device, reps, want)
            base_name = "sdpa-flash" if device == "cuda" else "sdpa"
            for r in group:
                base = next((g for g in group if g["impl"] == base_name and g["dir"] == r["dir"]), None)
                r["vs_sdpa"] = base["ms"] / r["ms"] if base else float("nan")
                if peak:
                    r["%peak"] = 100 * r["TFLOP/s"] / peak
            rows += group
            if device == "cuda":
                torch.cuda.empty_cache()
    cols = ["impl", "dtype", "B", "H", "T", "D", "dir", "ms", "TFLOP/s"] + (["%peak"] if peak else [])
    print_table(rows, cols + ["vs_sdpa"])
    path = write_results("bench_attention", rows, out_dir=args.out_dir,
                         extra={"quick": args.quick, "causal": causal, "peak_tflops": peak,
                                "goal": {"fwd_tflops": 330, "bwd_tflops": 250, "D": 128,
                                         "T_min": 4096, "device": "H100"}})
    plot(rows, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

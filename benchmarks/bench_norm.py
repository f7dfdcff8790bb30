"""LayerNorm / RMSNorm: minillm's Triton kernels vs torch eager, torch.compile and Liger (if installed).

    python benchmarks/bench_norm.py                 # GPU: hidden 512..16384, bf16 and fp32
    python benchmarks/bench_norm.py --quick         # CPU smoke run of the torch reference path (seconds)

Speed is effective bandwidth: the bytes a perfect kernel must move, divided by the time. Bytes per call
for an [M, N] activation of s bytes per element (weights, bias and per-row statistics are O(N + M) and
counted too, but are < 0.1% at the sizes here):
    forward : read x, write y                        2*M*N*s  + weight/bias N*s each
    backward: read x, read dy, write dx              3*M*N*s  + weight (+bias) read N*s, dw (+db) written N*s
Timing (benchmarks/common.py): "ms" is the kernel time (``triton.testing.do_bench`` median with an L2
flush before each call, on CUDA: cold L2, no host), "graph_ms" the same call captured once into a CUDA
graph and replayed back to back (no host; an activation under the L2's size stays there; "-" on
CPU or where the capture failed, the reason in the row's "graph_error"), "call_ms" one synchronous call
with the host's overhead (Python, autograd, launches: 35-70 us on an H100, as large as the kernel at
small N), "host_ms" the difference of call_ms and ms. The backward is timed alone with
``torch.autograd.grad`` on a graph built once: never with
``y.backward(dy, retain_graph=True)`` repeated, which accumulates into x.grad, w.grad (and b.grad) on
every repeat, three extra [M, N]-sized passes that made the backward show about half its rate. Output
and every gradient are checked against an fp32 reference before anything is timed (column "err",
relative L2 error). "%peak" is against the device's spec HBM bandwidth when the device is known
(H100 SXM 3.35 TB/s, ...), and "%copy" against a device-to-device copy measured in the same run,
the practical ceiling for a memory-bound kernel. Goals (H100): forward >= 2.8 TB/s, backward >= 2.0 TB/s
at N >= 4096, and never slower than torch eager.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (TIMING, bench_parser, environment, grad_fn, kernel_ms,  # noqa: E402
                               on_capture_stream, print_table, rel_err, save_figure, timings, write_results)

# Spec HBM bandwidth in GB/s by device-name substring (vendor data sheets).
PEAK_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350, "H200": 4800,
             "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "4090": 1008}


def peak_gbps(device_name: str) -> float | None:
    for key, v in PEAK_GBPS.items():
        if key in device_name:
            return float(v)
    return None


def bytes_moved(M: int, N: int, s: int, backward: bool, has_bias: bool) -> int:
    params = N * s * (2 if has_bias else 1)
    if backward:
        return 3 * M * N * s + 2 * params  # x, dy in; dx out; params read, grads written
    return 2 * M * N * s + params          # x in; y out; params read


def torch_fn(kind):
    if kind == "layer":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
    return lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, 1e-6)


def implementations(kind: str, device: str, interpret: bool = False) -> dict:
    """name -> fn(x, w, b). On CPU (--quick) the torch paths, plus minillm's kernels when ``interpret``
    (the caller has set TRITON_INTERPRET=1 before any kernel module was imported: slow, tiny sizes only)."""
    from minillm.kernels import layernorm as ln
    impls = {"torch": torch_fn(kind)}
    if device != "cuda" and interpret:
        impls["minillm"] = ((lambda x, w, b: ln.layer_norm(x, w, b)) if kind == "layer"
                            else (lambda x, w, b: ln.rms_norm(x, w)))
    if device == "cuda":
        impls["minillm"] = ((lambda x, w, b: ln.layer_norm(x, w, b)) if kind == "layer"
                            else (lambda x, w, b: ln.rms_norm(x, w)))
        impls["compile"] = torch.compile(torch_fn(kind))
        try:
            from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm
            impls["liger"] = ((lambda x, w, b: liger_layer_norm(x, w, b, 1e-5)) if kind == "layer"
                              else (lambda x, w, b: liger_rms_norm(x, w, 1e-6)))
        except Exception:  # not installed (or an API change): leave it out of the table
            pass
    else:
        impls["reference"] = ((lambda x, w, b: ln.layer_norm_ref(x, w, b)) if kind == "layer"
                              else (lambda x, w, b: ln.rms_norm_ref(x, w)))
    return impls


def copy_gbps(device: str, nbytes: int, reps: int) -> float:
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    ms = kernel_ms(lambda: b.copy_(a), device, reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# Largest relative L2 error accepted before timing (fp32 far under 1e-3; bf16/fp16 outputs are rounded
# once, about 2^-9 relative, and dw sums M rounded products).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def make_inputs(kind, M, N, dtype, device, seed=0):
    """x (M, N), w (N), b (N, LayerNorm only) as leaves that require grad, and dy (M, N); N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, N, device=device, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(N, device=device, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(N, device=device, dtype=dtype, generator=g, requires_grad=True) if kind == "layer" else None
    dy = torch.randn(M, N, device=device, dtype=dtype, generator=g)
    return x, w, b, dy


def bench_one(kind, impl, fn, M, N, dtype, device, reps, ref_out, on_mismatch="raise"):
    """Rows (fwd, bwd) for one implementation: (y, dx, dw[, db]) checked against ``ref_out`` in fp32
    first, then timed. ``on_mismatch="record"`` returns a ``status="wrong"`` row instead of stopping."""
    s = torch.tensor([], dtype=dtype).element_size()
    x, w, b, dy = make_inputs(kind, M, N, dtype, device)
    leaves = [t for t in (x, w, b) if t is not None]
    base = {"norm": kind, "dtype": str(dtype).replace("torch.", ""), "M": M, "N": N, "impl": impl}
    # correctness before speed: output and every gradient against the fp32 reference
    y = fn(x, w, b)
    got = (y.detach(), *torch.autograd.grad(y, leaves, dy, retain_graph=True))
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    xr, wr, br = ref_leaves[0], ref_leaves[1], (ref_leaves[2] if b is not None else None)
    yr = ref_out(xr, wr, br)
    want = (yr.detach(), *torch.autograd.grad(yr, ref_leaves, dy.float()))
    err = max(rel_err(a, r) for a, r in zip(got, want))
    if not err <= TOLERANCE[dtype]:
        msg = f"{impl} {kind} N={N} {dtype}: differs from the reference (relative error {err:.3g})"
        if on_mismatch == "raise":
            raise SystemExit(msg)
        print(f"[bench_norm] {msg}", file=sys.stderr)
        return [{**base, "dir": "check", "status": "wrong", "err": err}]
    calls = {"fwd": lambda: fn(x, w, b), "bwd": grad_fn(y, leaves, dy)}
    graphed = calls
    if device == "cuda":  # the captured backward replays a graph built on the capture stream (common.py)
        with on_capture_stream(device):
            graphed = {**calls, "bwd": grad_fn(fn(x, w, b), leaves, dy)}
    rows = []
    for direction, call in calls.items():
        t = timings(call, device, reps, graphed[direction])
        nbytes = bytes_moved(M, N, s, direction == "bwd", b is not None)
        rows.append({**base, "dir": direction, **t, "GB/s": nbytes / (t["ms"] * 1e-3) / 1e9, "err": err,
                     "status": "ok"})
    assert all(t.grad is None for t in leaves)  # timing never accumulated into .grad
    return rows


def measure(sizes, dtypes, M, device, reps, copy, peak=None, on_mismatch="raise", kinds=("layer", "rms"),
            interpret=False):
    """Every implementation at every (norm, dtype, N); adds vs_torch (eager's time over this one's,
    same direction, same run), %copy and %peak."""
    from minillm.kernels.layernorm import layer_norm_ref, rms_norm_ref
    rows = []
    for kind in kinds:
        ref = ((lambda x, w, b: layer_norm_ref(x, w, b)) if kind == "layer"
               else (lambda x, w, b: rms_norm_ref(x, w)))
        impls = implementations(kind, device, interpret)
        for dtype in dtypes:
            for N in sizes:
                group = []
                for impl, fn in impls.items():
                    try:
                        group += bench_one(kind, impl, fn, M, N, dtype, device, reps, ref, on_mismatch)
                    except SystemExit:
                        raise
                    except Exception as e:  # e.g. torch.compile failing on this install: a row, not a crash
                        if on_mismatch == "raise" or impl == "torch":
                            raise
                        print(f"[bench_norm] {impl} {kind} N={N}: failed ({type(e).__name__}: {e})"[:300],
                              file=sys.stderr)
                        group.append({"norm": kind, "dtype": str(dtype).replace("torch.", ""), "M": M, "N": N,
                                      "impl": impl, "dir": "check", "status": "error", "err": float("nan")})
                for r in group:  # speed relative to torch eager in the same run
                    if r["status"] != "ok":
                        continue
                    base = next(g for g in group if g["impl"] == "torch" and g["dir"] == r["dir"])
                    r["vs_torch"] = base["ms"] / r["ms"]
                    r["%copy"] = 100 * r["GB/s"] / copy
                    if peak:
                        r["%peak"] = 100 * r["GB/s"] / peak
                rows += group
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """GB/s against hidden size N: one panel per (norm, dtype, direction), one line per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r.get("status", "ok") == "ok"]
    panels = sorted({(r["norm"], r["dtype"], r["dir"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (norm, dtype, direction) in zip(axes[0], panels):
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r["N"], r["GB/s"]) for r in rows
                         if (r["norm"], r["dtype"], r["dir"], r["impl"]) == (norm, dtype, direction, impl))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{norm} {dtype} {direction}", xlabel="N", ylabel="GB/s")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = bench_parser(__doc__, "bench_norm", "tiny CPU run of the reference path")
    p.add_argument("--tokens", type=int, default=16384, help="rows M (batch*sequence) on GPU")
    p.add_argument("--sizes", default="512,1024,2048,4096,5120,8192,16384")
    p.add_argument("--dtypes", default="bf16,fp32")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        sizes, dtypes, M, reps = [64, 256], [torch.float32], 64, 3
    else:
        if device != "cuda":
            print("no CUDA device: run with --quick for the CPU smoke path", file=sys.stderr)
            return 2
        names = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
        sizes = [int(n) for n in args.sizes.split(",")]
        dtypes = [names[d] for d in args.dtypes.split(",")]
        M, reps = args.tokens, 20

    env = environment()
    peak = peak_gbps(env["device"]) if device == "cuda" else None
    copy = copy_gbps(device, (1 << 20) if args.quick else (1 << 30), reps)
    rows = measure(sizes, dtypes, M, device, reps, copy, peak)
    cols = ["norm", "dtype", "M", "N", "impl", "dir", "ms", "graph_ms", "call_ms", "GB/s", "%copy"]
    cols += ["%peak"] if peak else []
    print_table(rows, cols + ["vs_torch", "err"])
    print(f"device copy bandwidth: {copy:.1f} GB/s" + (f", spec peak {peak:.0f} GB/s" if peak else ""))
    path = write_results("bench_norm", rows, extra={"copy_gbps": copy, "peak_gbps": peak, "quick": args.quick,
                                                    "timing": TIMING}, out_dir=args.out_dir)
    plot(rows, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

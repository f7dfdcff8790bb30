"""Shared plumbing for benchmark scripts: environment record, timing, table, JSON and PNG output.

Every benchmark prints a table, writes ``benchmarks/results/<name>.json`` (with the environment it ran
in) and, where it has curves, a PNG beside it. Speed is reported as ratios against a baseline measured
in the same run; absolute numbers are only meaningful with the environment next to them.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device, library versions and git commit: recorded in every result file."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional off Linux
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "device_type": "cuda" if cuda else "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def timeit(fn: Callable[[], object], warmup: int = 3, reps: int = 10, device: str = "cpu",
           before: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on GPU, perf_counter on CPU);
    ``before()`` runs ahead of each timed call, outside the timed region (e.g. an L2 flush)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        for _ in range(reps):
            if before is not None:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def grad_fn(out: torch.Tensor, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor) -> Callable[[], tuple]:
    """A closure that runs only the backward of a graph built once: ``torch.autograd.grad``.

    Never ``out.backward(grad_out, retain_graph=True)`` in a timing loop: that accumulates into each
    input's ``.grad`` on every repeat (an extra read-add-write of every gradient, e.g. three extra
    [M, N] passes for a norm, whose backward itself moves 3*M*N elements), so the timed region holds
    more than the kernel. ``autograd.grad`` returns fresh gradients and leaves ``.grad`` untouched
    (None), which tests/test_gpu_suite.py checks."""
    inputs = tuple(inputs)
    return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kernel_ms(fn: Callable[[], object], device: str = "cpu", reps: int = 10, warmup: int = 3,
              rep_ms: float = 50.0) -> float:
    """Median device time of one ``fn()`` in milliseconds, without the host's launch overhead.

    CUDA: ``triton.testing.do_bench`` (median), which clears the L2 cache before every timed call
    (it zeroes a 256 MB buffer between calls) and times each call with CUDA events; its warm-up and
    repetition budgets are milliseconds (``rep_ms``). Without triton: CUDA events around each call after
    zeroing a 256 MB buffer (the same flush). CPU: perf_counter around each call (host and kernel are
    one there), median of ``reps``."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=max(1.0, rep_ms / 4), rep=rep_ms, return_mode="median"))
        except ImportError:
            flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
            return timeit(fn, warmup=warmup, reps=reps, device="cuda", before=flush.zero_)
    return timeit(fn, warmup=warmup, reps=reps, device="cpu")


def call_ms(fn: Callable[[], object], device: str = "cpu", reps: int = 10, warmup: int = 3) -> float:
    """Median wall time of one synchronous call in milliseconds, host overhead included.

    Each call is timed alone with the host clock, from a synchronized device to a synchronized device:
    Python, the autograd bookkeeping and the launch latency are inside, which is what one call costs a
    caller that waits for it. At small sizes this is 35-70 us above ``kernel_ms`` on an H100 (issue 18),
    as large as the kernel itself, so both are reported."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (inf on NaN/inf or a shape mismatch): METHOD.md's measure.
    fp32 lands far under 1e-3, bf16 operands between 1e-3 and 1e-2."""
    if got.shape != want.shape:
        return float("inf")
    g, w = got.detach().double(), want.detach().double()
    if not torch.isfinite(g).all():
        return float("inf")
    return ((g - w).norm() / w.norm().clamp_min(1e-30)).item()


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """Print rows of dicts as an aligned text table."""
    if not rows:
        print("(no rows)")
        return
    columns = list(columns or rows[0].keys())

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def write_results(name: str, rows: Sequence[dict], extra: dict | None = None,
                  out_dir: Path | None = None) -> Path:
    """Write ``{"benchmark", "environment", "rows", ...extra}`` to ``<out_dir>/<name>.json``."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"benchmark": name, "environment": environment(), "rows": list(rows), **(extra or {})}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def bench_parser(doc: str, name: str, quick_help: str):
    """The flags every benchmark shares: --quick (its CPU path, seconds) and --out-dir."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out-dir", type=Path, default=None, help=f"where {name}.json/.png go")
    return p


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def bar_png(name: str, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str,
            out_dir: Path | None = None) -> Path:
    """A bar chart ``<out_dir>/<name>.png`` for benchmarks whose result is a handful of numbers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 4))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out_dir / f"{name}.png")

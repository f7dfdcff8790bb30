"""Shared plumbing for benchmark scripts: environment record, timing, table, JSON and PNG output.

Every benchmark prints a table, writes ``benchmarks/results/<name>.json`` (with the environment it ran
in) and, where it has curves, a PNG beside it. Speed is reported as ratios against a baseline measured
in the same run; absolute numbers are only meaningful with the environment next to them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

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


# The three timings of a row, as the result files describe them ("timing" in their JSON).
TIMING = ("ms: do_bench median with L2 flush (CUDA; cold L2, no host); graph_ms: CUDA-graph replay (no host; "
          "L2 holds what the previous replay left; null on CPU or when capture failed, reason in graph_error); "
          "call_ms: one synchronous call with host overhead; backward via torch.autograd.grad")

_CAPTURE_STREAM = None
_GRAPH_ERRORS_SEEN: set[str] = set()


def capture_stream() -> "torch.cuda.Stream":
    """The side stream every ``graph_ms`` warms up and captures on (one per process, made on first use)."""
    global _CAPTURE_STREAM
    if _CAPTURE_STREAM is None:
        _CAPTURE_STREAM = torch.cuda.Stream()
    return _CAPTURE_STREAM


@contextlib.contextmanager
def on_capture_stream(device: str) -> Iterator[None]:
    """Run the block on ``graph_ms``'s capture stream (CUDA; on CPU the block runs as is).

    Build here the forward whose backward ``graph_ms`` captures: autograd runs each backward op on the
    stream of its forward op, so a graph built on the default stream would send the captured backward's
    kernels to a stream that is not capturing (torch then refuses the capture, or the kernels run
    eagerly and the graph misses them)."""
    if device != "cuda":
        yield
        return
    stream = capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        torch.cuda.current_stream().wait_stream(stream)


def replay_ms(replay: Callable[[], object], clock: Callable[[Callable[[], object]], float],
              reps: int | None = None, target_ms: float = 20.0, max_reps: int = 1000) -> tuple[float, int]:
    """(milliseconds per ``replay()``, replays timed): ``reps`` replays back to back timed as one span
    by ``clock`` (which runs its argument and returns its device time in ms), divided by ``reps``.

    The first replay is untimed (it uploads the graph to the device). Without ``reps``, one more replay
    timed alone sizes the span to about ``target_ms`` (3 to ``max_reps`` replays)."""
    replay()
    if reps is None:
        one = clock(replay)
        reps = int(min(max_reps, max(3, math.ceil(target_ms / max(one, 1e-3)))))
    total = clock(lambda: [replay() for _ in range(reps)])
    return total / reps, reps


def _events_ms(run: Callable[[], object]) -> float:
    """Device milliseconds of ``run()``'s work on the current stream, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _one_line(error: BaseException) -> str:
    """"ExceptionType: first line of its message"."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class _GraphPhaseError(RuntimeError):
    """An error of one phase of ``_capture_and_time`` ("warm-up", "capture", "replay")."""

    def __init__(self, phase: str, error: BaseException):
        super().__init__(f"{phase} failed: {_one_line(error)}")
        self.phase = phase


def _capture_and_time(fn: Callable[[], object], reps: int | None, warmup: int, target_ms: float) -> float:
    """Warm ``fn`` up on the capture stream, capture one call into a CUDA graph, time its replays.
    Raises _GraphPhaseError naming the phase that failed."""
    global _CAPTURE_STREAM
    stream = capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph, phase = torch.cuda.CUDAGraph(), "warm-up"
    try:
        with torch.cuda.stream(stream):
            # warm-up on the side stream: Triton compiles and autotunes, cuBLAS/cuDNN pick plans and the
            # allocator caches blocks here, since none of that may happen inside a capture
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()  # as torch.cuda.graph does: nothing in flight when capture begins
            phase = "capture"
            graph.capture_begin()  # outputs (and autograd.grad's gradients) come from the graph's pool
            try:
                static_out = fn()  # kept alive until the replays end: the replays write into its memory
            except BaseException:
                with contextlib.suppress(Exception):  # end the (invalid) capture; report fn's error
                    graph.capture_end()
                raise
            graph.capture_end()
            phase = "replay"
            try:
                ms, _ = replay_ms(graph.replay, _events_ms, reps, target_ms)
            finally:
                del static_out, graph
    except Exception as e:
        if phase == "capture":
            # A capture that failed may leave the caching allocator routing this stream's allocations
            # to the dead graph's pool (torch ends the pool after cudaStreamEndCapture succeeds): the
            # next capture gets a fresh stream, which no stale routing matches.
            _CAPTURE_STREAM = None
        raise _GraphPhaseError(phase, e) from e
    finally:
        torch.cuda.current_stream().wait_stream(stream)
    return ms


def graph_ms(fn: Callable[[], object], device: str = "cpu", reps: int | None = None, warmup: int = 2,
             target_ms: float = 20.0, errors: list[str] | None = None) -> float | None:
    """Milliseconds per call of ``fn``'s kernels replayed from a CUDA graph: no host overhead.

    ``fn`` runs ``warmup`` times on a side stream (so compiling, autotuning and lazy library set-up
    happen before capture, as torch.cuda.graphs asks), one call is captured into a
    ``torch.cuda.CUDAGraph``, and the graph is replayed ``reps`` times back to back between two CUDA
    events (default: enough replays for about ``target_ms``); the result is the elapsed time / reps.
    A backward is captured as ``torch.autograd.grad(out, inputs, grad_out, retain_graph=True)`` on a
    graph built once under ``on_capture_stream`` (see there why that stream).

    The three timings of a benchmark row side by side: ``kernel_ms`` (do_bench) = cold L2 per call,
    no host; ``graph_ms`` = no host, L2 holding what the previous replay left (the inputs, when they
    fit: a training step's L2 holds what its previous kernels left instead); ``call_ms`` = everything
    (host, launches, cold or warm as it comes). Below a few microseconds per call the replays are
    launched slower than they run, so the number is the graph launch rate: an upper bound on the
    kernels' time.

    Returns None on CPU (no CUDA graphs; nothing is recorded, there is nothing to capture) and when
    warm-up, capture or replay raises (e.g. an op that synchronizes with the host or allocates outside
    the graph's pool): the reason, "<phase> failed: ExceptionType: first line", is appended to
    ``errors`` and printed to stderr once per distinct reason per process, so a failed capture is never
    a silent gap."""
    if device != "cuda":
        return None
    try:
        return _capture_and_time(fn, reps, warmup, target_ms)
    except Exception as e:  # torch refused the capture: no number rather than a made-up one
        reason = (str(e) if isinstance(e, _GraphPhaseError) else _one_line(e))[:300]
        if errors is not None:
            errors.append(reason)
        if reason not in _GRAPH_ERRORS_SEEN:
            _GRAPH_ERRORS_SEEN.add(reason)
            print(f"[graph_ms] no graph time: {reason}", file=sys.stderr)
        return None


def timings(fn: Callable[[], object], device: str, reps: int, graph_fn: Callable[[], object] | None = None) -> dict:
    """The timing columns of one benchmark row: ``ms`` (kernel_ms), ``graph_ms``, ``call_ms``, ``host_ms``
    (call_ms - ms, at least 0), and ``graph_error`` when the capture failed. ``graph_fn`` is what is
    captured when it differs from ``fn`` (a backward whose graph was built on the capture stream)."""
    ms, cms, errors = kernel_ms(fn, device, reps), call_ms(fn, device, reps), []
    row = {"ms": ms, "graph_ms": graph_ms(graph_fn or fn, device, errors=errors), "call_ms": cms,
           "host_ms": max(0.0, cms - ms)}
    if errors:
        row["graph_error"] = errors[0]
    return row


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
    """Print rows of dicts as an aligned text table; None and missing values print as '-'."""
    if not rows:
        print("(no rows)")
        return
    columns = list(columns or rows[0].keys())

    def fmt(v: object) -> str:  # None: not measured here (e.g. graph_ms on CPU)
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


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

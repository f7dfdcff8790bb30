"""summary.md and the PNGs of the GPU tier, from the parts' rows (benchmarks/gpu/suite.py calls these)."""
from __future__ import annotations

from pathlib import Path


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.{digits}g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` (dicts) over ``columns``; a missing key prints as '-'."""
    if not rows:
        return "(no rows)\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _vs_best(line: dict, impls: list[str]) -> None:
    """line["vs_best"]: the first implementation's rate over the best other one's (same shape, same run);
    minillm's own variants (minillm-notma, minillm-split) are not "others"."""
    others = [line[i] for i in impls[1:] if line.get(i) and not i.startswith("minillm")]
    if impls and line.get(impls[0]) and others:
        line["vs_best"] = line[impls[0]] / max(others)


# The first implementation's columns after the rates: kernel ms (do_bench), CUDA-graph replay ms, per-call ms.
TIMES = ("ms", "graph_ms", "call_ms", "err")


def _time_columns(impls: list[str]) -> list[str]:
    """TIMES as table headers: the kernel time says whose it is, "ms (minillm)"."""
    return [f"ms ({impls[0] if impls else '-'})", *TIMES[1:]]


def _impl_order(ok: list[dict]) -> list[str]:
    """minillm first, its variants next (minillm-notma, minillm-split), then the baselines by name."""
    return sorted({r["impl"] for r in ok}, key=lambda i: (i != "minillm", not i.startswith("minillm"), i))


def _times(line: dict, row: dict) -> None:
    """Copy the timing columns of ``row`` into ``line`` under their headers; graph_ms is None where it
    was not measured (CPU, a failed capture, results written before it existed)."""
    line.update(zip(_time_columns([row["impl"]]), (row.get(k) for k in TIMES)))


def attention_pivot(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """One line per (D, causal, heads, T, dir): TFLOP/s of each implementation side by side, and
    minillm's kernel ms, CUDA-graph replay ms, per-call ms (host overhead included) and error."""
    ok = [r for r in rows if r.get("status") == "ok"]
    impls = _impl_order(ok)
    order = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}
    keys = sorted({(r["D"], r["causal"], r["H"] // r["H_kv"], r["T"], r["dir"]) for r in ok},
                  key=lambda k: (-k[0], not k[1], k[2], k[3], order.get(k[4], 9)))
    out = []
    for D, causal, ratio, T, d in keys:
        line = {"D": D, "mask": "causal" if causal else "full", "heads": "MHA" if ratio == 1 else f"GQA {ratio}:1",
                "T": T, "dir": d}
        for r in ok:
            if (r["D"], r["causal"], r["H"] // r["H_kv"], r["T"], r["dir"]) == (D, causal, ratio, T, d):
                line[r["impl"]] = r["TFLOP/s"]
                if r["impl"] == impls[0]:
                    _times(line, r)
        _vs_best(line, impls)
        out.append(line)
    return out, ["D", "mask", "heads", "T", "dir", *impls, "vs_best", *_time_columns(impls)]


def norms_pivot(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """One line per (norm, dtype, N, dir): GB/s of each implementation, minillm's kernel ms, CUDA-graph
    replay ms, per-call ms and error."""
    ok = [r for r in rows if r.get("status") == "ok"]
    impls = _impl_order(ok)
    keys = sorted({(r["norm"], r["dtype"], r["N"], r["dir"]) for r in ok}, key=lambda k: (k[0], k[1], k[2], k[3] != "fwd"))
    out = []
    for norm, dtype, N, d in keys:
        line = {"norm": norm, "dtype": dtype, "N": N, "dir": d}
        for r in ok:
            if (r["norm"], r["dtype"], r["N"], r["dir"]) == (norm, dtype, N, d):
                line[r["impl"]] = r["GB/s"]
                if r["impl"] == impls[0]:
                    _times(line, r)
        _vs_best(line, impls)
        out.append(line)
    return out, ["norm", "dtype", "N", "dir", *impls, "vs_best", *_time_columns(impls)]


def graph_errors(rows: list[dict]) -> str:
    """One line per distinct graph-capture failure, with the rows it struck (graph_ms shows '-' there)."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r.get("graph_error"):
            where = " ".join(f"{k}={r[k]}" for k in ("impl", "norm", "dtype", "D", "T", "N", "dir") if k in r)
            by_reason.setdefault(r["graph_error"], []).append(where)
    return "".join(f"\ngraph capture failed ({len(w)} row(s), graph_ms '-'): {reason}; "
                   f"{', '.join(w[:6])}{' ...' if len(w) > 6 else ''}\n" for reason, w in by_reason.items())


TIMING_NOTE = ("ms: kernel time (do_bench median, L2 flushed before each call: cold L2, no host); graph_ms: the "
               "call captured in a CUDA graph and replayed back to back (no host; L2 holds what the previous replay "
               "left; '-' where not "
               "measured); call_ms: one synchronous call, host overhead included. ")


def summary_markdown(payload: dict) -> str:
    env, parts = payload["environment"], payload["parts"]
    mode = "dry run (CPU, tiny sizes: plumbing only, numbers mean nothing)" if payload["dry_run"] else (
        "full" if payload["full"] else "default (< 6 minutes)")
    s = [f"# minillm GPU tier: {env.get('device')}\n",
         f"{mode}; {payload['wall_s']:.0f} s wall; torch {env.get('torch')}, triton {env.get('triton')}, "
         f"Python {env.get('python')}, commit {str(env.get('git_commit'))[:10]}, {env.get('time')}\n",
         "## Parts\n",
         md_table([{"part": n, "status": p["status"], "seconds": p.get("seconds"), "budget_s": p.get("budget_s"),
                    "rows": len(p.get("rows", [])), "error / notes": p.get("error") or "; ".join(p.get("notes", []))[:300]}
                   for n, p in parts.items()], ["part", "status", "seconds", "budget_s", "rows", "error / notes"]),
         "\n## Goals (reported, never asserted)\n",
         md_table(payload["goals"], ["goal", "measured", "target", "result", "metric", "over", "rows"])]
    if "tests" in parts:
        rows = parts["tests"].get("rows", [])
        counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "error", "skipped")}
        s += ["\n## GPU-tier tests (`pytest -m gpu`)\n",
              ", ".join(f"{v} {k}" for k, v in counts.items()) + "\n\n",
              md_table([r for r in rows if r["outcome"] in ("failed", "error")] or rows[:0],
                       ["test", "outcome", "seconds", "message"]) if counts["failed"] + counts["error"] else ""]
        slow = sorted(rows, key=lambda r: -r["seconds"])[:5]
        if slow:
            s += ["\nslowest: " + ", ".join(f"{r['test']} {r['seconds']:.1f} s" for r in slow) + "\n"]
    if "attention" in parts:
        table, cols = attention_pivot(parts["attention"].get("rows", []))
        wrong = [r for r in parts["attention"].get("rows", []) if r.get("status") == "wrong"]
        s += ["\n## Attention (TFLOP/s; FlashAttention-2's count: fwd 4·B·H·T²·D, /2 causal, bwd ×2.5, fwd+bwd ×3.5)\n",
              TIMING_NOTE, "err: worst relative L2 error of O, dQ, dK, dV vs fp32 before timing. minillm-notma: "
              "minillm with MINILLM_ATTN_TMA=0 (sm_90+ only; forward and fwd+bwd). minillm-split: minillm with "
              "MINILLM_ATTN_DKDV=split (dV and dK in two kernels; bwd and fwd+bwd).\n\n",
              md_table(table, cols), graph_errors(parts["attention"].get("rows", []))]
        if wrong:
            s += ["\nwrong results (not timed): " + ", ".join(f"{r['impl']} D={r['D']} T={r['T']} err={r['err']:.3g}"
                                                          for r in wrong) + "\n"]
    if "norms" in parts:
        p = parts["norms"]
        table, cols = norms_pivot(p.get("rows", []))
        s += ["\n## Norms (GB/s: fwd reads x, writes y; bwd reads x, dy, writes dx; weights counted)\n",
              f"device copy: {_fmt(p.get('copy_gbps'))} GB/s; spec peak: {_fmt(p.get('peak_gbps'))} GB/s. ",
              TIMING_NOTE, "\n\n",
              md_table(table, cols), graph_errors(p.get("rows", []))]
    if "train" in parts:
        s += ["\n## Training steps (bf16 autocast on CUDA; MFU from minillm/flops.py's peak table)\n",
              md_table(parts["train"].get("rows", []), ["preset", "variant", "kernels", "status", "tokens_per_s",
                                                        "step_ms", "fwd_ms", "bwd_ms", "opt_ms", "mfu",
                                                        "peak_mem_mib", "warmup_s", "error"])]
    if "e2e" in parts:
        p = parts["e2e"]
        s += ["\n## End to end: torchrun train.py, then sample.py (bf16, KV cache)\n",
              f"`{p.get('train_command', '-')}` on the {p.get('corpus', '-')} corpus\n\n",
              md_table([r for r in p.get("rows", []) if r.get("stage") == "train"],
                       ["seconds", "steps", "loss_first_fifth", "loss_last_fifth", "loss_falls", "val_bpb",
                        "checkpoint", "checkpoint_MB", "tokens_per_s_median", "mfu_median"]),
              "\n" + md_table([r for r in p.get("rows", []) if r.get("stage") == "sample"],
                              ["seconds", "exit", "device", "dtype", "kv_cache", "text", "error"])]
    return "".join(s)


def write_pngs(parts: dict, out: Path) -> list[Path]:
    """attention.png, norms.png, train.png from whatever rows the parts left (a failed part: no PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    written = []
    jobs = [("attention", "benchmarks.bench_attention", lambda rs: [r for r in rs if r.get("status") == "ok"]),
            ("norms", "benchmarks.bench_norm", lambda rs: [r for r in rs if r.get("status") == "ok"]),
            ("train", "benchmarks.bench_train", lambda rs: [{**r, "preset": f"{r['preset']}/{r.get('kernels')}"}
                                                            for r in rs if r.get("status") == "ok"])]
    for name, module, select in jobs:
        rows = select(parts.get(name, {}).get("rows", []))
        if not rows:
            continue
        import importlib
        try:
            importlib.import_module(module).plot(rows, out / f"{name}.png")
            written.append(out / f"{name}.png")
        except Exception as e:  # a plot never costs the results
            print(f"[report] {name}.png not drawn: {type(e).__name__}: {e}")
    return written

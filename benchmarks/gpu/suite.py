"""The GPU tier in one command: tests, attention, norms, training, end to end; one folder of results.

    bash benchmarks/gpu/run.sh [OUT_DIR]            # on a CUDA machine (installs .whl/ first): < 6 minutes
    python benchmarks/gpu/suite.py --dry-run --out-dir /tmp/gpu-dry   # every part on CPU, tiny sizes
    python benchmarks/gpu/suite.py --full           # the whole grids (longer than 6 minutes)
    python benchmarks/gpu/suite.py --parts attention,norms

Each part (benchmarks/gpu/parts.py) runs in its own process under a time budget, so a Triton compile
error, a CUDA fault or an overrun in one part is recorded in the summary and the next part still runs.
Output (at most 8 files, what the device tool brings back): summary.md (parts, goals with pass/miss,
tables), results.json (every row, the environment, the goals), attention.png, norms.png, train.png,
e2e_curves.png, suite.log. The folder is OUT_DIR, else $OUT when set (the device tool's), else
benchmarks/measured/gpu/<device-name>/. Speed is reported against its goal, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu.parts import PARTS  # noqa: E402

# Seconds per part in the default (< 6 minute) run, in the order they run; --full multiplies them.
BUDGET_S = {"tests": 75, "attention": 70, "norms": 35, "train": 90, "e2e": 60}  # 330 s; +10 s grace each
# The dry run's budgets are safety nets only: generous, since a shared CPU can be many times slower.
DRY_BUDGET_S = {"tests": 150, "attention": 150, "norms": 150, "train": 150, "e2e": 200}

# The goals of issue 18, each read off the rows of one part. ``where``: the rows that count; ``pick``:
# how several such rows become one value ("min": the goal must hold at every size that counts).
GOALS = [
    {"name": "attention forward", "part": "attention", "metric": "TFLOP/s", "target": 330.0, "pick": "min",
     "where": {"impl": "minillm", "dtype": "bfloat16", "D": 128, "causal": True, "H_kv_ratio": 1, "dir": "fwd"},
     "min_size": ("T", 4096), "text": "bf16, d=128, causal, MHA, worst T >= 4096"},
    {"name": "attention forward+backward", "part": "attention", "metric": "TFLOP/s", "target": 250.0, "pick": "min",
     "where": {"impl": "minillm", "dtype": "bfloat16", "D": 128, "causal": True, "H_kv_ratio": 1, "dir": "fwd+bwd"},
     "min_size": ("T", 4096), "text": "bf16, d=128, causal, MHA, worst T >= 4096"},
    *({"name": f"{title} {'forward' if d == 'fwd' else 'backward'}", "part": "norms", "metric": "GB/s",
       "target": target, "pick": "min", "where": {"impl": "minillm", "dtype": "bfloat16", "norm": norm, "dir": d},
       "min_size": ("N", 4096), "text": "bf16, M=16384, worst N >= 4096"}
      for title, norm in (("RMSNorm", "rms"), ("LayerNorm", "layer")) for d, target in (("fwd", 2800.0), ("bwd", 2000.0))),
    {"name": "gpt2-small training MFU", "part": "train", "metric": "mfu", "target": 0.50, "pick": "max",
     "where": {"preset": "gpt2", "kernels": "triton"}, "text": "minillm's kernels, best of compile off/on"},
]
# The dry run reads the same goals off its tiny CPU rows, so the pass/miss logic runs end to end.
# (metric and target too for training: a CPU has no MFU, so the dry run reads tokens/s against 1e12).
DRY_WHERE = {"attention": {"dtype": "float32", "D": 32, "impl": "sdpa"}, "norms": {"dtype": "float32"},
             "train": {"preset": "nanogpt", "kernels": "torch", "metric": "tokens_per_s", "target": 1e12}}


def goal_value(goal: dict, rows: list[dict], dry_run: bool = False) -> tuple[float | None, int]:
    """(value, number of rows it came from) for one goal; (None, 0) when no row qualifies."""
    where, metric = dict(goal["where"]), goal["metric"]
    if dry_run:
        where.update(DRY_WHERE.get(goal["part"], {}))
        metric = where.pop("metric", metric)
        where.pop("target", None)
    size_key, size_min = goal.get("min_size", (None, 0))
    picked = []
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        ratio = (r["H"] // r["H_kv"]) if "H" in r and "H_kv" in r else None
        if any((ratio if k == "H_kv_ratio" else r.get(k)) != v for k, v in where.items()):
            continue
        if size_key and not dry_run and r.get(size_key, 0) < size_min:
            continue
        if r.get(metric) is not None:
            picked.append(float(r[metric]))
    if not picked:
        return None, 0
    return (min(picked) if goal["pick"] == "min" else max(picked)), len(picked)


def evaluate_goals(parts: dict[str, dict], dry_run: bool = False) -> list[dict]:
    """One row per goal: measured value, target, and ``pass`` (>= target), ``miss`` (below) or ``n/a``
    (nothing measured: the part failed, was skipped, or no row matched). Never raises on speed."""
    out = []
    for g in GOALS:
        rows = parts.get(g["part"], {}).get("rows", [])
        value, n = goal_value(g, rows, dry_run)
        if dry_run:  # say what the dry run actually read
            dry = DRY_WHERE.get(g["part"], {})
            g = {**g, "target": dry.get("target", g["target"]), "metric": dry.get("metric", g["metric"]),
                 "text": "dry run: the CPU rows " + ", ".join(f"{k}={v}" for k, v in dry.items()
                                                            if k not in ("metric", "target"))}
        result = "n/a" if value is None else ("pass" if value >= g["target"] else "miss")
        out.append({"goal": g["name"], "metric": g["metric"], "measured": value, "target": g["target"],
                    "result": result, "rows": n, "over": g["text"]})
    return out


# ------------------------------------------------------------------------------------------- running
def run_part(name: str, args, work: Path, budget: float, log) -> dict:
    """Run one part in a subprocess under ``budget`` seconds; its result file, or a record of the failure."""
    result = work / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu.parts", name, "--result", str(result), "--work", str(work),
           "--budget", f"{budget:.0f}"] + (["--dry-run"] if args.dry_run else []) + (["--full"] if args.full else [])
    t0 = time.monotonic()
    status = None
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget + 10)
        output = proc.stdout + proc.stderr
        if proc.returncode not in (0, 1):
            status = f"crashed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = "timeout"
    data = {"part": name, "status": "error", "rows": [], "notes": []}
    if result.exists():
        try:
            data = json.loads(result.read_text())
        except json.JSONDecodeError:
            pass
    if status:  # the process died or overran: keep its partial rows, record why
        data["status"] = status
        data.setdefault("error", output.strip().splitlines()[-1][:500] if output.strip() else status)
    elif data.get("status") == "running":
        data["status"] = "error"
        data.setdefault("error", "the part ended without recording its status")
    data["seconds"] = time.monotonic() - t0
    data["budget_s"] = budget
    log.write(f"== {name} (budget {budget:.0f} s): {data['status']} in {data['seconds']:.1f} s\n{output[-6000:]}\n")
    log.flush()
    return data


def device_name(dry_run: bool) -> str:
    import torch
    if torch.cuda.is_available() and not dry_run:
        return torch.cuda.get_device_name()
    import platform
    return platform.processor() or platform.machine() or "cpu"


def default_out_dir(dry_run: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", device_name(dry_run)).strip("-") or "unknown"
    return ROOT / "benchmarks" / "measured" / "gpu" / (slug + ("-dry-run" if dry_run else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", type=Path, default=None,
                   help="results folder (default: $OUT, else benchmarks/measured/gpu/<device>/)")
    p.add_argument("--out-dir", dest="out_dir_opt", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true", help="every part on CPU at tiny sizes (the plumbing)")
    p.add_argument("--full", action="store_true", help="the whole grids and every training row (> 6 minutes)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--jobs", type=int, default=None,
                   help="parts run at once (default 1 on a GPU, where timings must not overlap; all in a dry run)")
    p.add_argument("--budget-scale", type=float, default=None, help="multiply every part's budget (--full: 4)")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts {','.join(unknown)}: no such part (have {', '.join(PARTS)})")
    out = args.out_dir_opt or args.out_dir or default_out_dir(args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    scale = args.budget_scale or (4.0 if args.full else 1.0)
    budgets = {k: v * scale for k, v in (DRY_BUDGET_S if args.dry_run else BUDGET_S).items()}

    from benchmarks.common import environment
    from benchmarks.gpu import report
    t_start = time.monotonic()
    env = environment()
    work = Path(tempfile.mkdtemp(prefix="minillm-gpu-suite-"))
    results: dict[str, dict] = {}
    jobs = args.jobs or (len(parts) if args.dry_run else 1)
    with open(out / "suite.log", "w") as log:
        print(f"environment: {json.dumps(env)}", file=log, flush=True)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {name: pool.submit(run_part, name, args, work, budgets[name], log) for name in parts}
            for name in parts:  # in order; each part's log block is written whole when it ends
                results[name] = futures[name].result()
                print(f"[suite] {name}: {results[name]['status']} ({results[name]['seconds']:.1f} s)", flush=True)
    goals = evaluate_goals(results, args.dry_run)
    payload = {"suite": "minillm GPU tier", "dry_run": args.dry_run, "full": args.full, "environment": env,
               "wall_s": time.monotonic() - t_start, "budgets_s": budgets, "goals": goals, "parts": results}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    report.write_pngs(results, out)
    if (work / "e2e_curves.png").is_file():
        shutil.copyfile(work / "e2e_curves.png", out / "e2e_curves.png")
    payload["wall_s"] = time.monotonic() - t_start
    (out / "summary.md").write_text(report.summary_markdown(payload))
    print((out / "summary.md").read_text())
    print(f"wrote {out}/ (summary.md, results.json, PNGs, suite.log) in {payload['wall_s']:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

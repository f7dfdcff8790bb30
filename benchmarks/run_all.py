"""Run every benchmark: each ``benchmarks/bench_*.py`` with ``[--quick] --out-dir DIR``.

    python benchmarks/run_all.py --quick                  # every quick path (CPU, ~half a minute)
    python benchmarks/run_all.py --out-dir results/h100   # the full benchmarks (GPU ones need CUDA)
    python benchmarks/run_all.py --quick --only train,recipe

Benchmarks are discovered by file name, so a new bench_*.py that follows the convention (``--quick``,
``--out-dir``, writes ``<name>.json`` with an environment record and a PNG) is picked up without
touching this file. Each runs in its own process; a failure is reported and the others still run. As
each one finishes (in name order), its own report (the table(s) it prints) is shown under a
``== bench_x (exit 0, 12.3 s) ==`` line; then a summary (name, exit code, seconds, files written) is
printed and saved as ``run_all.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def discover(only: list[str] | None = None) -> list[Path]:
    """benchmarks/bench_*.py, sorted; ``only`` filters by name with or without the bench_ prefix."""
    found = sorted(HERE.glob("bench_*.py"))
    if only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in only}
        missing = wanted - {p.stem for p in found}
        if missing:
            raise SystemExit(f"error: --only {','.join(sorted(missing))}: no such benchmark "
                             f"(have: {', '.join(p.stem for p in found)})")
        found = [p for p in found if p.stem in wanted]
    return found


def run_one(script: Path, out_dir: Path, quick: bool, timeout: float) -> dict:
    cmd = [sys.executable, str(script), "--out-dir", str(out_dir)] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        code, tail, out = proc.returncode, (proc.stdout + proc.stderr)[-2000:], proc.stdout
    except subprocess.TimeoutExpired:
        code, tail, out = -1, f"timed out after {timeout:.0f} s", ""
    files = sorted(p.name for p in out_dir.glob(f"{script.stem}*") if p.suffix in (".json", ".png"))
    return {"benchmark": script.stem, "exit_code": code, "seconds": time.perf_counter() - t0,
            "files": " ".join(files), "log_tail": tail if code else "", "stdout": out}


def show_report(row: dict) -> None:
    """Print one finished benchmark's own stdout (its tables) under a heading line."""
    print(f"== {row['benchmark']} (exit {row['exit_code']}, {row['seconds']:.1f} s) ==")
    print(row["stdout"].rstrip() or "(no output)")
    print(flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="each benchmark's quick CPU path")
    p.add_argument("--out-dir", type=Path, default=None, help="where every result file goes")
    p.add_argument("--only", default=None, help="comma list of benchmark names (e.g. train,norm)")
    p.add_argument("--jobs", type=int, default=1,
                   help="benchmarks run at once (keep 1 for timings you mean to read; quick runs can share)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 600 quick, none full)")
    args = p.parse_args(argv)

    from benchmarks.common import RESULTS_DIR, environment, print_table, write_results

    out_dir = Path(args.out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    scripts = discover(args.only.split(",") if args.only else None)
    timeout = args.timeout or (600.0 if args.quick else None)
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(lambda s: run_one(s, out_dir, args.quick, timeout), scripts):
            show_report(row)
            rows.append({k: v for k, v in row.items() if k != "stdout"})
    print_table(rows, ["benchmark", "exit_code", "seconds", "files"])
    for r in rows:
        if r["exit_code"]:
            print(f"\n--- {r['benchmark']} failed (exit {r['exit_code']}):\n{r['log_tail']}", file=sys.stderr)
    write_results("run_all", rows, extra={"quick": args.quick}, out_dir=out_dir)
    print(f"environment: {json.dumps(environment())}")
    return 1 if any(r["exit_code"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/run_all.py --quick: every benchmark's quick path runs and leaves its results.

Not a timing test: it checks the files each benchmark promises (JSON with rows and the environment it
ran in, a PNG) and the bookkeeping of the two training benchmarks.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # every benchmark's quick path, ~80 s on 2 cores; the default run checks one (below)
def test_run_all_quick_writes_every_result(tmp_path):
    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert {"bench_train", "bench_recipe"} <= set(scripts)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--jobs", "2",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in scripts:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["rows"], name
        env = result["environment"]
        assert env["torch"] and env["git_commit"] and "device" in env and "triton" in env, name
        assert (tmp_path / f"{name}.png").stat().st_size > 0, name
    summary = json.loads((tmp_path / "run_all.json").read_text())
    assert sorted(r["benchmark"] for r in summary["rows"]) == scripts
    assert all(r["exit_code"] == 0 for r in summary["rows"])

    train = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    for row in train:
        assert row["tokens_per_s"] > 0 and row["peak_mem_mib"] > 0
        assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["opt_ms"] > 0
        assert row["flops_per_s"] > 0 and (row["B"], row["T"]) == (12, 64)  # nanoGPT's CPU shapes

    recipe = json.loads((tmp_path / "bench_recipe.json").read_text())
    (row,) = recipe["rows"]
    assert row["crossed_at_step"] is not None and row["final_val_bpb"] <= recipe["target_bpb"]
    # the crossing is measured from the launch, so it includes start-up and ends before the process does
    assert 0 < row["startup_s"] < row["time_to_target_s"] <= row["process_s"]
    assert "experiment=shakespeare_cpu" in recipe["command"]

    data = json.loads((tmp_path / "bench_data.json").read_text())["rows"]  # one corpus, every format
    assert [r["format"] for r in data] == ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf"]
    assert len({r["MB"] for r in data}) == 1 and len({r["docs"] for r in data[1:]}) == 1 and data[1]["docs"] > 10
    assert data[0]["vs_txt"] == 1.0 and all(r["prepare_MB/s"] > 0 and r["check_MB/s"] > 0 for r in data)
    assert all(r["peak_rss_mib"] >= r["base_rss_mib"] > 0 for r in data)


def test_run_all_rejects_unknown_benchmark():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--only", "nosuch"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "no such benchmark" in proc.stderr


def test_run_all_prints_each_benchmarks_table(tmp_path):
    """Not just exit codes and file names: each benchmark's own table, under its name, then the summary."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--only", "sample",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("== bench_sample (exit 0, "))
    header = lines[start + 1].split()
    assert header == ["batch", "kv_cache", "new_tokens", "rows_end", "ms", "tokens_per_s", "speedup_vs_no_cache",
                      "speedup_vs_kept"]
    assert set(lines[start + 2].replace(" ", "")) == {"-"}
    rows = json.loads((tmp_path / "bench_sample.json").read_text())["rows"]
    table = lines[start + 3:start + 3 + len(rows)]
    assert [line.split()[0] for line in table] == [str(r["batch"]) for r in rows]
    assert any(line.split() == ["benchmark", "exit_code", "seconds", "files"] for line in lines[start + 3 + len(rows):])

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


# ---- bench_recipe.py's budget comparison (issue 19): minillm at each budget against nanoGPT's recipe

from benchmarks import bench_recipe  # noqa: E402  (stdlib only at import: no torch)

CURVE = [{"t": 20.0, "step": 500, "val_bpb": 2.5}, {"t": 10.0, "step": 250, "val_bpb": 3.0},
         {"t": 30.0, "step": 750, "val_bpb": 2.2}]  # evaluations as the baseline's curve holds them


@pytest.mark.parametrize("t, step", [(0.0, None), (9.99, None), (10.0, 250), (15.0, 250), (29.9, 500),
                                     (30.0, 750), (1e6, 750)])
def test_recipe_bpb_at_is_the_last_evaluation_finished_by_t(t, step):
    """Before the first evaluation: none (not evaluated yet); between two: the earlier; at one: that one."""
    got = bench_recipe.bpb_at(CURVE, t)
    assert (got and got["step"]) == step
    if step is not None:
        assert got["val_bpb"] == {250: 3.0, 500: 2.5, 750: 2.2}[step]


def _mini(bpb, wall, error=None):
    return {"final_bpb": bpb, "wall_s": wall, "steps": 9, "params": 1, "vocab": 2, "error": error}


def test_recipe_compare_verdicts():
    corpus, base = {"name": "c", "bytes": 1}, {"curve": CURVE, "final_bpb": 2.2, "wall_s": 30.0}
    row = bench_recipe.compare(corpus, "budget", 25.0, base, _mini(2.0, 24.0))
    assert (row["base_bpb"], row["verdict"]) == (2.5, "win") and row["ratio"] == pytest.approx(2.0 / 2.5)
    assert bench_recipe.compare(corpus, "budget", 25.0, base, _mini(2.6, 24.0))["verdict"] == "lose"
    over = bench_recipe.compare(corpus, "budget", 25.0, base, _mini(2.0, 25.5))  # better, but late
    assert over["verdict"] == "lose" and "over budget" in over["note"]
    early = bench_recipe.compare(corpus, "budget", 5.0, base, _mini(2.0, 4.0))
    assert (early["base_bpb"], early["ratio"], early["verdict"]) == (None, None, "n/a")
    failed = bench_recipe.compare(corpus, "budget", 25.0, base, _mini(float("nan"), float("nan"), "exit 2: error: x"))
    assert failed["verdict"] == "lose" and "exit 2" in failed["note"]
    half = bench_recipe.compare(corpus, "half-time", 15.0, base, _mini(2.2, 14.0))  # equal to the final: enough
    assert (half["base_bpb"], half["ratio"], half["verdict"]) == (2.2, 1.0, "win")


def test_recipe_baseline_gets_byte_fallback_only_for_characters_sentencepiece_cannot_hold(tmp_path):
    """The baseline is a char vocabulary without byte fallback, which training refuses on a corpus with a
    character sentencepiece gives no piece (a carriage return, U+2585, a literal U+2581); split_corpus
    finds them, and only then does the baseline get byte fallback."""
    src = tmp_path / "c.txt"
    src.write_text("crlf\r\n" + "block \u2585 and \u2581\n" + "plain text, 梦\n" * 50)  # in the first 90%
    split = bench_recipe.split_corpus(src, tmp_path / "split")
    assert split["unpieced"] == ["\r", "\u2581", "\u2585"]
    assert bench_recipe.baseline_overrides(split)[-1] == "tokenizer.byte_fallback=true"
    src.write_text("plain text, 梦\n" * 50)
    clean = bench_recipe.split_corpus(src, tmp_path / "clean")
    assert clean["unpieced"] == [] and not any("byte_fallback" in o for o in bench_recipe.baseline_overrides(clean))


def test_recipe_rejects_bad_input(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 10)
    for args, names in [(["--corpus", str(tmp_path / "nosuch.txt"), "--budgets", "30"], "nosuch.txt"),
                        (["--corpus", str(tmp_path / "latin1.txt"), "--budgets", "30"], "not UTF-8"),
                        (["--corpora", "nosuch"], "nosuch"), (["--budgets", "30,x"], "30,x"),
                        (["--budgets", "30", "--target", "2.7"], "--target")]:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_recipe.py"), *args,
                               "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], args


def test_recipe_corpora_are_built_in_the_work_folder(tmp_path):
    """--corpora builds benchmarks/corpora.py's corpora in WORK/corpora (a machine without a corpus's
    sources skips it, named); --corpus files of one name are told apart."""
    import argparse
    (tmp_path / "a").mkdir()
    for d in ("a", "."):
        (tmp_path / d / "text.txt").write_text("one line\n" * 20)
    args = argparse.Namespace(corpus=[str(tmp_path / "a" / "text.txt"), str(tmp_path / "text.txt")],
                              corpora="en-vim-200k", quick=False)
    skipped = []
    found = bench_recipe.resolve_corpora(args, tmp_path / "work", skipped)
    assert [c["name"] for c in found[:2]] == ["text", "text-2"]
    if skipped:
        assert skipped == ["en-vim-200k"] and len(found) == 2
    else:
        (vim,) = found[2:]
        assert vim["name"] == "en-vim-200k" and vim["path"] == tmp_path / "work" / "corpora" / "en-vim-200k.txt"
        assert vim["path"].stat().st_size <= 200_000 and vim["kind"] == "English prose"


@pytest.mark.slow  # 8 train.py launches, ~45 s on an idle 2-core machine; the default run checks the parts above
def test_recipe_budgets_quick(tmp_path):
    """--quick: a generated corpus, the baseline (40 steps) and minillm at 8 s and 12 s and at half the
    baseline's time. The rows, ratios and the baseline's standing are recomputed from the recorded runs.
    On a loaded machine start-up alone can pass a small budget: that run fails, and its row must say so."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_recipe.py"), "--quick", "--budgets",
                           "8,12", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_recipe_budgets.json").read_text())
    assert (tmp_path / "bench_recipe_budgets.png").stat().st_size > 0
    (corpus,) = result["corpora"]
    assert corpus["sha256"] == __import__("hashlib").sha256(Path(corpus["path"]).read_bytes()).hexdigest()
    assert corpus["train_bytes"] + corpus["val_bytes"] == corpus["bytes"]  # under the 256 KB cap: all of it
    runs = {(r["role"], r.get("budget_s")): r for r in result["runs"]}
    base = runs[("baseline", None)]
    assert "experiment=nanogpt_cpu" in base["cmd"] and "tokenizer.vocab_size" not in base["cmd"]
    assert base["vocab"] == corpus["chars"] + 4                          # every character + 4 specials
    assert base["final_bpb"] == base["curve"][-1]["val_bpb"] and base["wall_s"] == base["curve"][-1]["t"]
    assert all(r["reused_cache"] and r["prepare_s"] > 0 for r in result["runs"] if not r["error"])  # untimed prep
    assert len(result["rows"]) == 3
    (half,) = [r for r in result["rows"] if r["kind"] == "half-time"]
    assert half["budget_s"] == round(base["wall_s"] / 2, 1) and half["base_bpb"] == base["final_bpb"]
    finished = 0
    for row in result["rows"]:
        mini = runs[(f"minillm {row['kind']}", row["budget_s"])]
        if mini["error"]:
            assert row["verdict"] == "lose" and mini["error"][:40] in row["note"], row
            continue
        finished += row["kind"] == "budget"
        base_bpb = base["final_bpb"] if row is half else bench_recipe.bpb_at(base["curve"], row["budget_s"])["val_bpb"]
        assert row["base_bpb"] == base_bpb and row["minillm_bpb"] == mini["final_bpb"] > 0
        assert row["ratio"] == pytest.approx(mini["final_bpb"] / base_bpb, rel=1e-12)
        within = row["minillm_wall_s"] == mini["wall_s"] <= mini["budget_s"]
        better = row["ratio"] < 1 or (row is half and row["ratio"] == 1)
        assert row["verdict"] == ("win" if within and better else "lose"), row
        planned = f"train.time_budget_s={mini['budget_s']:g}" if "time_budget_s" in result["minillm_planning"] else \
            f"train.max_steps={max(2, round(bench_recipe.QUICK_STEPS_PER_S * mini['budget_s']))}"
        assert planned in mini["cmd"] and mini["params"] > 0
        assert (row["steps"], row["params"], row["vocab"]) == (mini["steps"], mini["params"], mini["vocab"])
    assert finished >= 1, result["rows"]  # the 12 s run at least fits after start-up


# ---- benchmarks/common.py: the CUDA-graph replay timing (issue 18, item 2)

def test_replay_ms_is_the_span_over_its_replays():
    """One replay untimed (upload), one timed alone to size R to ~target_ms, then R back to back: the
    result is span / R. A stand-in clock charges 0.25 ms per replay it sees run."""
    from benchmarks.common import replay_ms
    count = [0]
    replay = lambda: count.__setitem__(0, count[0] + 1)  # noqa: E731

    def clock(run):
        before = count[0]
        run()
        return 0.25 * (count[0] - before)

    assert replay_ms(replay, clock, target_ms=20.0) == (0.25, 80)
    assert count[0] == 1 + 1 + 80
    assert replay_ms(replay, clock, reps=7) == (0.25, 7)
    assert replay_ms(replay, lambda run: (run(), 1e3)[1], target_ms=20.0)[1] == 3  # slow graphs: at least 3


def test_graph_ms_is_none_on_cpu_and_records_a_failed_capture(monkeypatch, capsys):
    """CPU: None and no error (nothing to capture). CUDA, capture raising: None, the reason in
    ``errors`` (type and first line) and on stderr once per distinct reason, never an exception."""
    from benchmarks import common
    errors = []
    assert common.graph_ms(lambda: None, "cpu", errors=errors) is None and errors == []

    def refuse(fn, reps, warmup, target_ms):
        fn()
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")

    monkeypatch.setattr(common, "_capture_and_time", refuse)
    monkeypatch.setattr(common, "_GRAPH_ERRORS_SEEN", set())
    for _ in range(2):
        assert common.graph_ms(lambda: None, "cuda", errors=errors) is None
    assert errors == ["RuntimeError: CUDA error: operation not permitted when stream is capturing"] * 2
    assert capsys.readouterr().err.count("[graph_ms] no graph time") == 1


def test_print_table_renders_none_and_missing_as_a_dash(capsys):
    from benchmarks.common import print_table
    print_table([{"impl": "a", "ms": 0.5, "graph_ms": None}], ["impl", "ms", "graph_ms", "call_ms"])
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["impl", "ms", "graph_ms", "call_ms"] and row.split() == ["a", "0.5", "-", "-"]

"""The recipe benchmarks: minillm against nanoGPT's CPU recipe at equal wall time, and time to a target.

Budget comparison (issue 19), chosen by --budgets or --corpora:

    python benchmarks/bench_recipe.py --corpora all --budgets 30,60,120
    python benchmarks/bench_recipe.py --corpus a.txt --corpus b.txt --budgets 30,60,120 -- optim.lr=4e-3
    python benchmarks/bench_recipe.py --quick --budgets 8,12  # mechanics on a generated corpus: a tiny
                                                              # model, its baseline stopped at 40 steps

Each corpus (a --corpus file, or the test corpora of benchmarks/corpora.py that --corpora builds in the
work folder) is split once: train.txt = the first 90% of its bytes, cut at a line boundary, and val.txt =
the bytes after, capped at 256,000 (cut at a line boundary), so evaluation costs the same for every
corpus size and both contestants are evaluated on the same text. Then, with MINILLM_DATA_DIR in the work
folder:

* the baseline, once: ``train.py experiment=nanogpt_cpu data=text data.path=TRAIN data.val_path=VAL``
  (nanoGPT's README CPU recipe at character level: one token per character of TRAIN + 4 specials, 2000
  iterations, an evaluation every 250). Its curve is val bpb against seconds since launch
  (metrics.jsonl stamps each evaluation record with Unix time when the evaluation has finished); its
  bpb "at wall time t" is the last evaluation finished at or before t, or none (not evaluated yet);
* minillm, per budget B: ``train.py data=text data.path=TRAIN data.val_path=VAL train.time_budget_s=B``
  plus the overrides after ``--``; its bpb is its final evaluation, its time that evaluation's record
  time since launch. Verdict at B: win when its final evaluation ended within B and its bpb is lower
  than the baseline's at B; lose when it is not lower, when it ended after B (the note says by how
  much) or when train.py failed (e.g. a budget shorter than start-up; the note gives its error line);
  n/a when the baseline had no evaluation by B. The ratio is minillm's bpb / the baseline's at B;
* the half-time run: minillm with B = half the baseline's wall time to its final evaluation (rounded to
  0.1 s); it wins when its bpb is <= the baseline's final bpb, within that budget (ratio: against that
  final bpb).

A failed minillm run is a lost row and the benchmark goes on; a failed baseline leaves its corpus out
of the table (named in the tally, exit status 1). The work folder (--work-dir; default
~/.cache/minillm/bench_recipe) keeps the built corpora, splits, token cache and run folders (each
run's metrics.jsonl is its record), so a second benchmark reuses the preparation.

The clock starts just before each process is launched (interpreter start, imports, config, data loading
and model build all count). Data preparation is not timed for either (as nanoGPT's prepare.py runs
before its train.py): before each timed run, the same command with train.max_steps=1
train.eval_interval=0 train.eval_tokens=1 builds the token cache; its seconds are reported apart, and
each timed run records whether it reused the cache (``reused_cache``). Machine load (1-minute average)
is recorded before and after each run, with each corpus's sha256 and sizes and every exact command.
Results: a table, ``bench_recipe_budgets.json`` and ``bench_recipe_budgets.png`` (one panel per corpus).

Time to target (the README's numbers), the default when neither --budgets nor --corpora is given:

    python benchmarks/bench_recipe.py                         # experiment=shakespeare_cpu, 2 repeats
    python benchmarks/bench_recipe.py --repeats 3 -- optim.lr=4e-3   # extra overrides after --
    python benchmarks/bench_recipe.py --cold                  # include tokenizer training (empty cache)
    python benchmarks/bench_recipe.py --quick                 # a tiny run on a generated corpus: mechanics

Each repeat launches ``python train.py experiment=<name> ...`` as a fresh process in a new run folder.
The clock starts just before the launch and stops at the end of the first evaluation whose val_bpb <=
target. Every evaluation of the recipe is over the full validation split (the last 10% of the text), so
the crossing is measured on the same data as the reference. The process's own exit (final checkpoint,
report) is reported too but is not part of time-to-target. By default the tokenized data is prepared
once before timing; ``--cold`` points every repeat at an empty cache so tokenizer training is counted.
Reference (nanoGPT README CPU recipe, measured on these 2-core machines): val loss 1.8857 nats/char =
2.720 bits per byte at 110.8 s. Goal: <= 2.720 in <= 55 s. Results: ``bench_recipe.json`` and ``.png``.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
REFERENCE = {"name": "nanoGPT README CPU recipe", "seconds": 110.8, "val_bpb": 2.720}
DEFAULT_BUDGETS = "30,60,120"
QUICK_BUDGETS = "8,12"
VAL_CAP = 256_000  # bytes of validation text, whatever the corpus size
PREPARE = ["train.max_steps=1", "train.eval_interval=0", "train.eval_tokens=1"]
# --quick: tiny runs (mechanics only). The baseline keeps its recipe but stops after 40 steps.
QUICK_BASELINE = ["train.max_steps=40", "train.eval_interval=10", "optim.warmup_steps=4"]
# minillm in --quick: a tiny model and vocabulary (the generated corpus is 110 KB) with the time budget;
# when train.py has no train.time_budget_s (QUICK_STEPS_PER_S), 10 steps per budget second instead
QUICK_MINILLM = ["tokenizer.vocab_size=400", "model.n_layer=1", "model.block_size=32", "train.batch_size=8",
                 "train.eval_interval=0", "optim.warmup_steps=2"]
QUICK_STEPS_PER_S = 10


def quick_corpus(path: Path, n_lines: int = 3000) -> Path:
    """Deterministic English-like text (no files needed): enough for a tokenizer and a short run."""
    import random
    rng = random.Random(0)
    words = ("the king queen lord good night day love death sweet fair heart sword crown blood my thy thou art "
             "hath doth shall will not and but with what where when o").split()
    lines = []
    for i in range(n_lines):
        if i % 6 == 0:
            lines.append(rng.choice(["ROMEO:", "JULIET:", "NURSE:"]))
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize() + ".")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def launch(overrides: list[str], run_dir: Path, env: dict, check: bool = True) -> dict:
    """Run ``train.py`` once in a fresh run folder. ``t0`` is Unix time just before the launch; returns
    the exact command, t0, seconds to the process's exit, its metrics records, summary and log text, the
    1-minute load average before and after, and ``error`` (the log's last line when it failed, else
    None). A failed run exits this benchmark with its log tail when ``check``."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "train.py"), f"out_dir={run_dir}", "train.resume=never",
           "logger.progress=false", *overrides]
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    t_exit = time.time()
    if proc.returncode != 0 and check:
        raise SystemExit(f"train.py failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    summary_path = run_dir / "summary.json"
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    return {"cmd": shlex.join(cmd), "t0": t0, "process_s": t_exit - t0, "records": read_records(run_dir),
            "summary": json.loads(summary_path.read_text()) if summary_path.exists() else {},
            "log": proc.stdout + proc.stderr, "load_before": load, "load_after": os.getloadavg()[0],
            "error": (f"exit {proc.returncode}: " + (lines[-1] if lines else "")) if proc.returncode else None}


# ---------------------------------------------------------------- time to target (README numbers)

def one_run(overrides: list[str], run_dir: Path, env: dict, target: float) -> dict:
    """Launch train.py once; return the timing row (time to target from the launch)."""
    run = launch(overrides, run_dir, env)
    t0, records, summary = run["t0"], run["records"], run["summary"]
    evals = [r for r in records if "val_bpb" in r]
    first_train = records[0]["time"] - records[0]["elapsed_s"]  # when train() started, Unix time
    crossing = next((r for r in evals if r["val_bpb"] <= target), None)
    curve = [{"t": r["time"] - t0, "step": r["step"], "train_loss": r.get("train_loss"), "val_bpb": r.get("val_bpb")}
             for r in records]
    tps = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
    return {"time_to_target_s": (crossing["time"] - t0) if crossing else float("nan"),
            "crossed_at_step": crossing["step"] if crossing else None,
            "final_val_bpb": evals[-1]["val_bpb"] if evals else float("nan"),
            "best_val_bpb": min((r["val_bpb"] for r in evals), default=float("nan")),
            "steps": summary["step"], "tokens": summary["tokens"], "evals": len(evals),
            "startup_s": first_train - t0, "process_s": run["process_s"],
            "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else float("nan"),
            "peak_rss_mib": summary.get("peak_memory_mb"), "load_before": run["load_before"],
            "load_after": run["load_after"], "bytes_per_token": summary.get("val_bytes_per_token"), "curve": curve}


def plot_target(rows: list[dict], target: float, path: Path, reference: dict | None) -> Path:
    """Train loss (approx. bits per byte) and val bpb against seconds since launch, per repeat."""
    from benchmarks.common import save_figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        bpt = r.get("bytes_per_token") or 1.0
        pts = [(c["t"], c["train_loss"] / math.log(2) / bpt) for c in r["curve"] if c["train_loss"] is not None]
        ax.plot(*zip(*pts), "-", alpha=0.6, label=f"run {i}: train loss (bits/byte, approx.)")
        ev = [(c["t"], c["val_bpb"]) for c in r["curve"] if c["val_bpb"] is not None]
        if ev:
            ax.plot(*zip(*ev), "o", markersize=7, label=f"run {i}: val bpb (full split)")
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target}")
    if reference:
        ax.plot([reference["seconds"]], [reference["val_bpb"]], "r*", markersize=14, label=reference["name"])
    ax.set(xlabel="seconds since process start", ylabel="bits per byte", title="time to quality",
           ylim=(max(0.0, target - 1.0), target + 2.5))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def target_main(args) -> int:
    """Time to target: ``--repeats`` fresh runs of ``experiment=<--experiment>`` on one corpus."""
    from benchmarks.common import RESULTS_DIR, print_table, write_results

    work = Path(tempfile.mkdtemp(prefix="bench_recipe-"))
    env = dict(os.environ)
    overrides = [f"experiment={args.experiment}"]
    target, reference = args.target, REFERENCE
    if args.quick:
        corpus = quick_corpus(work / "corpus.txt")
        overrides += [f"data.path={corpus}", "tokenizer.vocab_size=400", "model.n_layer=1", "model.block_size=32",
                      "train.batch_size=8", "train.max_steps=12", "train.eval_interval=6", "optim.warmup_steps=2"]
        target, reference, args.repeats = 6.0, None, 1  # a tiny model crosses this: tests the bookkeeping
        env["OMP_NUM_THREADS"] = "1"
    else:
        if len(args.corpus or []) > 1:
            return usage_error("--corpus: time to target takes one corpus (several need --budgets)")
        corpus = Path(args.corpus[0]) if args.corpus else SHARED_CORPUS
        if not corpus.is_file():
            return usage_error(f"--corpus {corpus}: no such file; give tinyshakespeare.txt's path")
        overrides.append(f"data.path={corpus}")
    overrides += args.overrides
    data_dir = Path(env.get("MINILLM_DATA_DIR") or Path.home() / ".cache" / "minillm")
    if args.quick:
        data_dir = work / "cache"
    env["MINILLM_DATA_DIR"] = str(data_dir)

    if not args.cold and not args.quick:  # prepare the tokenized data once, untimed (one short run of the same config)
        one_run(overrides + PREPARE, work / "prepare", env, float("-inf"))
    rows = []
    for i in range(args.repeats):
        if args.cold:
            env["MINILLM_DATA_DIR"] = str(work / f"cache{i}")
        row = one_run(overrides, work / f"run{i}", env, target)
        rows.append({"repeat": i, **row})
        print(f"run {i}: time to val_bpb <= {target}: {row['time_to_target_s']:.1f} s "
              f"(final {row['final_val_bpb']:.4f}, load {row['load_before']:.2f})", flush=True)
    cols = ["repeat", "time_to_target_s", "crossed_at_step", "final_val_bpb", "steps", "tokens", "evals",
            "startup_s", "process_s", "median_tokens_per_s", "peak_rss_mib", "load_before", "load_after"]
    print_table(rows, cols)
    out_dir = Path(args.out_dir or RESULTS_DIR)
    cmd = "python train.py " + " ".join(overrides)
    write_results("bench_recipe", rows, out_dir=out_dir,
                  extra={"quick": args.quick, "command": cmd, "target_bpb": target, "cold_cache": args.cold,
                         "reference": reference, "goal_seconds": 55.0})
    plot_target(rows, target, out_dir / "bench_recipe.png", reference)
    if args.keep:
        print(f"run folders kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ---------------------------------------------------------------- budget comparison (issue 19)

def split_corpus(src: Path, out_dir: Path) -> dict:
    """Write OUT_DIR/train.txt (the first 90% of SRC's bytes, cut after the last newline before that
    point) and OUT_DIR/val.txt (the bytes after it, at most VAL_CAP, cut after a newline); returns their
    paths, byte counts and the number of distinct characters in train.txt (info.json). Raises
    UnicodeDecodeError when the training text is not UTF-8."""
    data = src.read_bytes()
    cut = int(len(data) * 0.9)
    nl = data.rfind(b"\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    train, val = data[:cut], data[cut:]
    if len(val) > VAL_CAP:
        nl = val.rfind(b"\n", 0, VAL_CAP)
        val = val[: nl + 1 if nl > 0 else VAL_CAP]
    chars = set(train.decode("utf-8"))
    info = {"train": str(out_dir / "train.txt"), "val": str(out_dir / "val.txt"), "bytes": len(data),
            "train_bytes": len(train), "val_bytes": len(val), "chars": len(chars), "unpieced": unpieced(chars)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.txt").write_bytes(train)
    (out_dir / "val.txt").write_bytes(val)
    (out_dir / "info.json").write_text(json.dumps(info, indent=2))
    return info


def unpieced(chars: set[str]) -> list[str]:
    """The characters of ``chars`` sentencepiece gives no piece of their own (minillm.tokenizer's
    needs_alphabet: some control characters, U+2585, a literal U+2581): a char vocabulary without byte
    fallback cannot hold them, so the baseline gets byte fallback on a corpus that has any."""
    from minillm.config import TokenizerConfig
    from minillm.tokenizer import train_tokenizer, unpieced as no_piece
    tok = train_tokenizer(["".join(c + "\n" for c in sorted(chars))],  # one per line: a U+2585 line drops alone
                          TokenizerConfig(model_type="char", vocab_size=1 << 20))
    return no_piece(tok, chars)


def bpb_at(curve: list[dict], t: float) -> dict | None:
    """The baseline's standing at wall time ``t``: the last evaluation (``{"t", "step", "val_bpb"}``,
    ``t`` in seconds since launch) finished at or before ``t``; None if none had finished."""
    done = [c for c in curve if c["t"] <= t]
    return max(done, key=lambda c: c["t"]) if done else None


def eval_curve(records: list[dict], t0: float) -> list[dict]:
    """Evaluation records as ``{"t": seconds since launch, "step", "val_bpb"}``, in time order."""
    return sorted(({"t": r["time"] - t0, "step": r["step"], "val_bpb": r["val_bpb"]}
                   for r in records if r.get("val_bpb") is not None), key=lambda c: c["t"])


def timed_run(role: str, overrides: list[str], run_dir: Path, env: dict) -> dict:
    """One untimed preparation run (PREPARE), then the timed run. Returns the run's record: command,
    final evaluation (bpb, seconds since launch), steps, parameters, vocabulary, the evaluation curve,
    load before/after, preparation seconds, whether the timed run reused the prepared cache, and
    ``error`` (why train.py failed; the run then has no final evaluation: NaN bpb and time)."""
    prep = launch(overrides + PREPARE, run_dir.with_name(run_dir.name + "-prepare"), env, check=False)
    run = launch(overrides, run_dir, env, check=False) if prep["error"] is None else prep
    curve = eval_curve(run["records"], run["t0"]) if run["error"] is None else []
    final = curve[-1] if curve else {"t": float("nan"), "val_bpb": float("nan")}
    summary = run["summary"]
    return {"role": role, "cmd": run["cmd"], "prepare_cmd": prep["cmd"], "prepare_s": prep["process_s"],
            "reused_cache": "reusing tokenized data" in run["log"], "final_bpb": final["val_bpb"],
            "wall_s": final["t"], "process_s": run["process_s"], "steps": summary.get("step"),
            "params": summary.get("params"), "vocab": summary.get("vocab_size"),
            "load_before": run["load_before"], "load_after": run["load_after"], "curve": curve,
            "error": f"preparation failed, {prep['error']}" if prep["error"] else run["error"]}


def budget_verdict(mini: dict, budget: float, base_bpb: float | None, strict: bool) -> tuple[str, str]:
    """win / lose / n/a, and why. minillm must have a final evaluation, end it within ``budget``, and beat
    ``base_bpb`` (lower when ``strict``, else lower or equal); no baseline evaluation yet: n/a."""
    if mini["error"] or not math.isfinite(mini["final_bpb"]):
        error = mini["error"] if len(mini["error"] or "") <= 100 else mini["error"][:99] + "…"
        return "lose", f"train.py failed: {error}" if error else "minillm made no evaluation"
    if mini["wall_s"] > budget:
        return "lose", f"over budget by {mini['wall_s'] - budget:.1f} s"
    if base_bpb is None:
        return "n/a", "baseline not evaluated yet"
    better = mini["final_bpb"] < base_bpb if strict else mini["final_bpb"] <= base_bpb
    return ("win", "") if better else ("lose", "bpb not lower" if strict else "bpb above baseline final")


def compare(corpus: dict, kind: str, budget: float, base: dict, mini: dict) -> dict:
    """One table row. ``budget``: minillm against the baseline's bpb at wall time B; ``half-time``:
    against the baseline's final bpb."""
    if kind == "budget":
        point = bpb_at(base["curve"], budget)
        base_bpb, strict = (point["val_bpb"] if point else None), True
        note_base = f"baseline at {point['t']:.1f} s, step {point['step']}" if point else ""
    else:
        base_bpb, strict, note_base = base["final_bpb"], False, f"baseline final at {base['wall_s']:.1f} s"
    verdict, why = budget_verdict(mini, budget, base_bpb, strict)
    ratio = mini["final_bpb"] / base_bpb if base_bpb else None
    return {"corpus": corpus["name"], "kind": kind, "bytes": corpus["bytes"], "budget_s": round(budget, 2),
            "base_bpb": base_bpb, "minillm_bpb": mini["final_bpb"], "ratio": ratio,
            "minillm_wall_s": mini["wall_s"], "steps": mini["steps"], "params": mini["params"],
            "vocab": mini["vocab"], "verdict": verdict, "note": "; ".join(n for n in (why, note_base) if n)}


def has_time_budget(env: dict) -> bool:
    """Whether this train.py knows ``train.time_budget_s`` (its resolved config shows it)."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", "job"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    return "time_budget_s" in proc.stdout


def baseline_overrides(split: dict) -> list[str]:
    """nanoGPT's CPU recipe at character level on the split (the experiment's char vocabulary takes
    every character of it, + 4 specials), with byte fallback where sentencepiece cannot hold a character."""
    return (["experiment=nanogpt_cpu", "data=text", f"data.path={split['train']}", f"data.val_path={split['val']}"]
            + (["tokenizer.byte_fallback=true"] if split.get("unpieced") else []))


def minillm_overrides(split: dict, budget: float, time_key: bool, quick: bool, extra: list[str]) -> list[str]:
    """minillm's defaults with the time budget, then ``extra``. ``quick``: a tiny model (QUICK_MINILLM),
    and without the key (train.py before train.time_budget_s) QUICK_STEPS_PER_S steps per budget second."""
    ov = ["data=text", f"data.path={split['train']}", f"data.val_path={split['val']}"]
    ov += QUICK_MINILLM if quick else []
    ov += [f"train.time_budget_s={budget:g}"] if time_key else [f"train.max_steps={max(2, round(QUICK_STEPS_PER_S * budget))}"]
    return ov + extra


def resolve_corpora(args, work: Path, skipped: list[str]) -> list[dict] | int:
    """The corpora to measure: each --corpus file, the --corpora built in WORK/corpora (one whose sources
    this machine lacks is named in ``skipped``), or (--quick with neither) a generated one. Returns a
    list of {name, kind, path, tuned_on}, or 2 after an error line."""
    from benchmarks import corpora as test_corpora
    found = []
    for p in args.corpus or []:
        if not Path(p).is_file():
            return usage_error(f"--corpus {p}: no such file; give a UTF-8 text file (or --corpora NAMES|all)")
        found.append({"name": Path(p).stem, "kind": "given file", "path": Path(p).resolve(), "tuned_on": None})
    if args.corpora:
        names = list(test_corpora.CORPORA) if args.corpora == "all" else args.corpora.split(",")
        unknown = [n for n in names if n not in test_corpora.CORPORA]
        if unknown:
            return usage_error(f"--corpora {','.join(unknown)}: unknown; choose from all, "
                               f"{', '.join(test_corpora.CORPORA)}")
        for name in names:
            path = test_corpora.build(name, work / "corpora")
            if path is None:
                skipped.append(name)
            else:
                kind, _, _, tuned_on = test_corpora.CORPORA[name]
                found.append({"name": name, "kind": kind, "path": path, "tuned_on": tuned_on})
    if not found and args.quick:
        found.append({"name": "quick", "kind": "generated", "path": quick_corpus(work / "corpora" / "quick.txt"),
                      "tuned_on": False})
    seen: dict[str, int] = {}
    for c in found:  # two files of one name get -2, -3 ...
        seen[c["name"]] = seen.get(c["name"], 0) + 1
        c["name"] += f"-{seen[c['name']]}" if seen[c["name"]] > 1 else ""
    return found


def measure_corpus(corpus: dict, budgets: list[float], work: Path, env: dict, time_key: bool,
                   extra: list[str], quick: bool) -> tuple[list[dict], list[dict]]:
    """Run the baseline once on the corpus's split (describe_corpus), then minillm at each budget and at
    half the baseline's time; returns (table rows, run records), no rows when the baseline failed.
    ``quick``: the baseline stops after 40 steps (QUICK_BASELINE)."""
    runs_dir = work / "runs" / corpus["name"]
    base = timed_run("baseline", baseline_overrides(corpus) + (QUICK_BASELINE if quick else []),
                     runs_dir / "baseline", env)
    base["corpus"] = corpus["name"]
    if base["error"] or not base["curve"]:
        print(f"  baseline failed, corpus not compared: {base['error'] or 'no evaluation'}\n  {base['cmd']}",
              flush=True)
        return [], [base]
    print(f"  baseline: {base['final_bpb']:.4f} bpb at {base['wall_s']:.1f} s ({base['steps']} steps)", flush=True)
    rows, runs = [], [base]
    for kind, budget in [("budget", b) for b in budgets] + [("half-time", round(base["wall_s"] / 2, 1))]:
        mini = timed_run(f"minillm {kind}", minillm_overrides(corpus, budget, time_key, quick, extra),
                         runs_dir / f"minillm-{kind}-{budget:g}", env)
        mini |= {"budget_s": budget, "corpus": corpus["name"]}
        runs.append(mini)
        rows.append(compare(corpus, kind, budget, base, mini))
        print(f"  minillm, {kind} {budget:.1f} s: {mini['final_bpb']:.4f} bpb at {mini['wall_s']:.1f} s: "
              f"{rows[-1]['verdict']} ({rows[-1]['note']})", flush=True)
    return rows, runs


def plot_budgets(corpora: list[dict], runs: list[dict], path: Path) -> Path:
    """One panel per corpus: the baseline's val bpb against seconds since launch (a step curve: its
    standing at each moment), minillm's final evaluation per budget (squares) and the half-time run
    (star), with the budgets as dotted lines."""
    from benchmarks.common import save_figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(corpora))
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, corpus in zip(axes.flat, corpora):
        mine = [r for r in runs if r["corpus"] == corpus["name"]]
        for r in mine:
            pts = [(c["t"], c["val_bpb"]) for c in r["curve"]]
            if r["role"] == "baseline" and pts:
                ax.step(*zip(*pts), "-o", where="post", color="tab:gray", ms=4, label="nanoGPT recipe (char)")
            elif r["role"] != "baseline":
                half = r["role"].endswith("half-time")
                color = "tab:red" if half else "tab:blue"
                ax.axvline(r["budget_s"], color=color, ls=":", lw=0.8)  # drawn for failed runs too
                if pts:
                    ax.plot(*pts[-1], "*" if half else "s", ms=12 if half else 8, color=color,
                            label=f"minillm, half time ({r['budget_s']:.0f} s)" if half else None)
                    ax.annotate("" if half else f"{r['budget_s']:g} s", pts[-1], fontsize=7, xytext=(4, 4),
                                textcoords="offset points")
        ax.plot([], [], "s", color="tab:blue", label="minillm at each budget")
        ax.set(title=f"{corpus['name']} ({corpus['kind']}, {corpus['bytes'] / 1e6:.2f} MB)",
               xlabel="seconds since process start", ylabel="val bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(corpora):]:
        ax.axis("off")
    return save_figure(fig, path)


def parse_budgets(text: str) -> list[float] | None:
    """'30,60,120' -> [30.0, 60.0, 120.0]; None unless every item is a positive number."""
    try:
        values = [float(b) for b in text.split(",")]
    except ValueError:
        return None
    return values if values and all(v > 0 and math.isfinite(v) for v in values) else None


def default_work_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minillm" / "bench_recipe"


def budget_main(args) -> int:
    """The budget comparison over every corpus; prints the table, writes the JSON and the PNG. Exit
    status 1 when the baseline failed on a corpus (minillm's failures are rows it lost), 2 on bad input."""
    budgets = parse_budgets(args.budgets or (QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS))
    if budgets is None:
        return usage_error(f"--budgets {args.budgets}: give positive seconds separated by commas, e.g. 30,60,120")
    if args.target is not None or args.repeats is not None or args.cold or args.experiment is not None:
        return usage_error("--target, --repeats, --cold and --experiment belong to time to target; "
                           "leave out --budgets and --corpora for that")
    work = Path(args.work_dir or (tempfile.mkdtemp(prefix="bench_recipe-") if args.quick else default_work_dir()))
    env = dict(os.environ, MINILLM_DATA_DIR=str(work / "cache"), **({"OMP_NUM_THREADS": "1"} if args.quick else {}))
    try:
        skipped: list[str] = []
        corpora = resolve_corpora(args, work, skipped)
        if isinstance(corpora, int):
            return corpora
        if not corpora:
            return usage_error("no corpus to measure: give --corpus PATH or --corpora NAMES|all")
        for corpus in corpora:  # every split before any run: bad input stops the benchmark at once
            if (error := describe_corpus(corpus, work)) is not None:
                return usage_error(error)
        time_key = has_time_budget(env)
        if not time_key and not args.quick:
            return usage_error("this train.py has no train.time_budget_s (python train.py --cfg job | grep "
                               "time_budget): the budget comparison needs it")
        rows, runs, failed = [], [], []
        for corpus in corpora:
            r, rs = measure_corpus(corpus, budgets, work, env, time_key, args.overrides, args.quick)
            rows, runs, failed = rows + r, runs + rs, failed + ([] if r else [corpus["name"]])
        extra = {"mode": "budgets", "argv": sys.argv, "quick": args.quick, "corpora_skipped": skipped, "budgets_s": budgets, "work_dir": str(work),
                 "env": {k: env.get(k) for k in ("MINILLM_DATA_DIR", "OMP_NUM_THREADS")},
                 "minillm_planning": "train.time_budget_s" if time_key else
                 f"train.max_steps ({QUICK_STEPS_PER_S} per budget second)",
                 "minillm_extra_overrides": args.overrides, "val_cap_bytes": VAL_CAP, "corpora": corpora,
                 "baseline_failed": failed, "runs": runs}
        report_budgets(rows, runs, corpora, extra, Path(args.out_dir) if args.out_dir else None)
        return 1 if failed else 0
    finally:
        if args.quick and not args.work_dir:
            if args.keep:
                print(f"work folder kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)


def unpieced_note(split: dict) -> str:
    chars = split.get("unpieced") or []
    return f"; {len(chars)} without a sentencepiece piece {chars[:5]}: the baseline gets byte fallback" if chars else ""


def describe_corpus(corpus: dict, work: Path) -> str | None:
    """Split CORPUS into WORK/splits/<name>/ and record its sha256, sizes and characters in it (printed);
    returns an error line when its training text is not UTF-8."""
    from benchmarks.corpora import sha256
    try:
        split = split_corpus(Path(corpus["path"]), work / "splits" / corpus["name"])
    except UnicodeDecodeError as e:
        return f"{corpus['path']}: not UTF-8 text ({e.reason} at byte {e.start}); give UTF-8 text"
    corpus.update(split, sha256=sha256(Path(corpus["path"])), path=str(corpus["path"]))
    print(f"{corpus['name']}: {corpus['bytes']:,} bytes ({split['train_bytes']:,} train, {split['val_bytes']:,} val, "
          f"{split['chars']} characters{unpieced_note(split)}), sha256 {corpus['sha256'][:16]}", flush=True)
    return None


def report_budgets(rows: list[dict], runs: list[dict], corpora: list[dict], extra: dict, out_dir: Path | None) -> None:
    """Print the comparison table, the tally and the (untimed) preparation seconds; write the JSON and PNG."""
    from benchmarks.common import RESULTS_DIR, print_table, write_results
    print_table(rows, ["corpus", "kind", "bytes", "budget_s", "base_bpb", "minillm_bpb", "ratio", "minillm_wall_s",
                       "steps", "params", "vocab", "verdict", "note"])
    wins, losses = (sum(r["verdict"] == v for r in rows) for v in ("win", "lose"))
    failed = extra["baseline_failed"]
    print(f"{wins} of {len(rows)} rows won, {losses} lost"
          + (f"; the baseline failed on {', '.join(failed)} (not compared)" if failed else "")
          + (f"; no sources here for {', '.join(extra['corpora_skipped'])}" if extra["corpora_skipped"] else ""))
    prep = [{"corpus": r["corpus"], "run": r["role"] + (f" {r['budget_s']:.1f} s" if "budget_s" in r else ""),
             "prepare_s": r["prepare_s"], "reused_cache": r["reused_cache"]} for r in runs]
    print("\ndata preparation (untimed; reused_cache: the timed run found the tokens prepared):")
    print_table(prep)
    out_dir = Path(out_dir or RESULTS_DIR)
    write_results("bench_recipe_budgets", rows, extra={**extra, "preparation": prep}, out_dir=out_dir)
    plot_budgets(corpora, runs, out_dir / "bench_recipe_budgets.png")


def usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    from benchmarks.common import bench_parser
    p = bench_parser(__doc__, "bench_recipe", "tiny runs on a generated corpus (mechanics only)")
    p.add_argument("--budgets", default=None, help=f"seconds, comma-separated: the budget comparison, written to "
                   f"bench_recipe_budgets.json/.png (default {DEFAULT_BUDGETS}; {QUICK_BUDGETS} with --quick)")
    p.add_argument("--corpora", default=None, help="test corpora of benchmarks/corpora.py to build and "
                                                   "measure: comma-separated names, or all")
    p.add_argument("--corpus", action="append", default=None,
                   help="a UTF-8 text file (repeatable with --budgets; time to target: tinyshakespeare.txt)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help=f"corpora, splits, token cache, run folders (default {default_work_dir()}; "
                        "a temporary folder, removed after, with --quick)")
    p.add_argument("--experiment", default=None, help="time to target: the experiment (shakespeare_cpu)")
    p.add_argument("--target", type=float, default=None, help=f"time to target: val_bpb to reach "
                                                              f"({REFERENCE['val_bpb']})")
    p.add_argument("--repeats", type=int, default=None, help="time to target: fresh runs (2)")
    p.add_argument("--cold", action="store_true", help="time to target: empty data cache per repeat")
    p.add_argument("--keep", action="store_true", help="keep the run folders (printed) of time to target or --quick")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --); budget comparison: "
                                                "minillm's runs only")
    args = p.parse_args(argv)
    if args.budgets is not None or args.corpora is not None:
        return budget_main(args)
    args.experiment = args.experiment or "shakespeare_cpu"
    args.target = REFERENCE["val_bpb"] if args.target is None else args.target
    args.repeats = 2 if args.repeats is None else args.repeats
    return target_main(args)


if __name__ == "__main__":
    sys.exit(main())

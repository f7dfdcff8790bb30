"""benchmarks/gpu/ (the GPU tier in one command), exercised on CPU with --dry-run, and GPU-tier checks.

CPU (default run): the dry run writes every promised file; the summary's tables have their columns;
goals are judged pass / miss / n/a by the rule in suite.py; a part that fails is recorded and the
others still run; backward timing goes through torch.autograd.grad (inputs' ``.grad`` stays None);
FLOP counts follow FlashAttention-2's benchmark script. Not timing tests: no speed is asserted.

GPU (``-m gpu``, skipped without CUDA; run by benchmarks/gpu/run.sh): what the interpreter cannot show.
Backward determinism (the interpreter runs programs one at a time, so a race cannot show on CPU), MQA in
bf16/fp16 by FlashAttention's rule, and the norms in bf16/fp16 by the same rule on strided inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu" / "suite.py"
on_gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                            reason="needs CUDA and compiled kernels (MINILLM_TEST_GPU=1 pytest -n 0 -m gpu)")


# ------------------------------------------------------------------------------------- the dry run
@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Two dry runs side by side: every part (a), and norms + attention with norms made to fail (b).

    Once per test session: under pytest-xdist the tests of this module land on several workers, and
    each would run its own pair (half a minute of both cores). The first worker to take the lock runs
    them into the folder all workers of this session share; the others wait and read its results."""
    from filelock import FileLock  # torch's own dependency
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's folder, above every worker's own
    base, done = shared / "gpu_suite_dry_runs", shared / "gpu_suite_dry_runs.json"
    with FileLock(str(shared / "gpu_suite_dry_runs.lock")):
        if not done.exists():
            done.write_text(json.dumps(_run_dry_runs(base)))
    return {k: (code, text, base / k) for k, (code, text) in json.loads(done.read_text()).items()}


def _run_dry_runs(base: Path) -> dict[str, list]:
    """{"a" | "b": [exit code, output]} of the two dry runs, written under ``base``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "MINILLM_GPU_SUITE_INJECT")}
    procs = {
        "a": subprocess.Popen([sys.executable, str(SUITE), "--dry-run", "--out-dir", str(base / "a")], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        "b": subprocess.Popen([sys.executable, str(SUITE), "--dry-run", "--parts", "norms,attention",
                               "--out-dir", str(base / "b")], cwd=ROOT,
                              env={**env, "MINILLM_GPU_SUITE_INJECT": "norms"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    }
    out = {}
    for k, p in procs.items():
        text, _ = p.communicate(timeout=600)
        out[k] = [p.returncode, text]
    return out


def _results(run):
    return json.loads((run[2] / "results.json").read_text())


def _md_tables(text: str) -> dict[str, list[str]]:
    """section heading -> header cells of the first table under it."""
    tables, heading = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].split(" (")[0]
        elif line.startswith("| ") and heading and heading not in tables:
            tables[heading] = [c.strip() for c in line.strip("|").split("|")]
    return tables


def test_dry_run_writes_every_file_and_every_part_runs(dry_runs):
    code, text, out = dry_runs["a"]
    assert code == 0, text[-4000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["summary.md", "results.json", "suite.log", "attention.png", "norms.png", "train.png",
                            "e2e_curves.png"])
    assert len(names) <= 8 and all(p.stat().st_size > 0 for p in out.iterdir())  # the device tool's limit
    res = _results(dry_runs["a"])
    assert res["dry_run"] and res["environment"]["device_type"] == "cpu"
    assert {n: p["status"] for n, p in res["parts"].items()} == {n: "ok" for n in
                                                                  ("tests", "attention", "norms", "train", "e2e")}
    parts = res["parts"]
    # tests: pytest -m gpu ran over the GPU-tier cases and they skipped on CPU (none failed)
    assert parts["tests"]["rows"] and {r["outcome"] for r in parts["tests"]["rows"]} == {"skipped"}
    assert any("test_gpu_backward_is_deterministic" in r["test"] for r in parts["tests"]["rows"])
    # attention: fwd, bwd and fwd+bwd for each implementation, kernel and per-call times, checked first
    att = parts["attention"]["rows"]
    assert {(r["impl"], r["dir"]) for r in att} == {(i, d) for i in ("sdpa", "reference")
                                                    for d in ("fwd", "bwd", "fwd+bwd")}
    assert {(r["causal"], r["H"] // r["H_kv"]) for r in att} == {(True, 1), (False, 2)}  # causal MHA, full GQA
    assert all(r["ms"] > 0 and r["call_ms"] > 0 and r["err"] < 1e-3 and r["status"] == "ok" for r in att)
    # no CUDA graphs on CPU: graph_ms is there, as JSON null, and no capture was tried (no graph_error)
    assert all("graph_ms" in r and r["graph_ms"] is None and "graph_error" not in r
               for r in att + parts["norms"]["rows"])
    norms = parts["norms"]["rows"]
    # minillm's norm kernels ran too (Triton interpreter), checked against the reference before timing
    assert {(r["norm"], r["impl"], r["dir"]) for r in norms} == {
        (n, i, d) for n in ("layer", "rms") for i in ("minillm", "torch", "reference") for d in ("fwd", "bwd")}
    assert all(r["status"] == "ok" and r["err"] < 1e-4 for r in norms)
    (train,) = parts["train"]["rows"]
    assert train["status"] == "ok" and train["tokens_per_s"] > 0 and train["peak_mem_mib"] > 0
    e2e_train, e2e_sample = parts["e2e"]["rows"]
    assert e2e_train["loss_falls"] and e2e_train["checkpoint"].endswith(".pt")
    assert e2e_sample["exit"] == 0 and e2e_sample["kv_cache"] and e2e_sample["dtype"] == "bfloat16"
    assert e2e_sample["text"].startswith("--- sample 1\nROMEO:")


def test_summary_tables_have_their_columns(dry_runs):
    text = (dry_runs["a"][2] / "summary.md").read_text()
    tables = _md_tables(text)
    assert tables["Parts"] == ["part", "status", "seconds", "budget_s", "rows", "error / notes"]
    assert tables["Goals"] == ["goal", "measured", "target", "result", "metric", "over", "rows"]
    assert tables["Attention"][:5] == ["D", "mask", "heads", "T", "dir"]
    assert {"sdpa", "reference", "call_ms", "err"} <= set(tables["Attention"])
    assert tables["Norms"][:5] == ["norm", "dtype", "N", "dir", "minillm"]  # minillm first, then the baselines
    assert {"torch", "reference", "vs_best", "call_ms", "err"} <= set(tables["Norms"])
    for name in ("Attention", "Norms"):  # the three timings side by side; graph_ms '-' on CPU
        cols = tables[name]
        assert cols[-4:] == [cols[-4], "graph_ms", "call_ms", "err"] and cols[-4].startswith("ms (")
        section = text.split(f"## {name}")[1].split("\n## ")[0]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
                if line.startswith("| ") and not line.startswith("| D |") and not line.startswith("| norm |")]
        assert rows and all(r[-3] == "-" and r[-4] != "-" for r in rows)
    assert {"tokens_per_s", "mfu", "peak_mem_mib", "kernels"} <= set(tables["Training steps"])
    # every goal appears, judged on the dry run's own rows: CPU speeds miss every target
    goals = _results(dry_runs["a"])["goals"]
    assert [g["goal"] for g in goals] == ["attention forward", "attention forward+backward", "RMSNorm forward",
                                          "RMSNorm backward", "LayerNorm forward", "LayerNorm backward",
                                          "gpt2-small training MFU"]
    assert all(g["result"] == "miss" and g["measured"] < g["target"] for g in goals)
    assert all(f"| {g['goal']} |" in text and "| miss |" in text for g in goals)


def test_a_failing_part_is_recorded_and_the_others_still_run(dry_runs):
    code, text, out = dry_runs["b"]
    assert code == 1, text[-3000:]  # the suite says something failed ...
    res = _results(dry_runs["b"])
    assert res["parts"]["norms"]["status"] == "error"
    assert "injected failure in part norms" in res["parts"]["norms"]["error"]
    assert res["parts"]["attention"]["status"] == "ok" and res["parts"]["attention"]["rows"]  # ... attention ran
    assert (out / "attention.png").is_file() and not (out / "norms.png").exists()
    summary = (out / "summary.md").read_text()
    assert "| norms | error |" in summary and "| attention | ok |" in summary
    goals = {g["goal"]: g["result"] for g in res["goals"]}
    assert goals["RMSNorm forward"] == "n/a" and goals["attention forward"] == "miss"


def test_tests_part_keeps_the_cases_of_a_pytest_stopped_at_its_budget():
    """A pytest killed at the budget writes no junit XML: the cases come from its -v lines instead."""
    from benchmarks.gpu.parts import verbose_rows
    text = ("tests/test_gpu_suite.py::test_gpu_mqa_by_flash_rule[257-True-dtype0] PASSED [  5%]\n"
            "tests/test_kernels_attention.py::test_gpu_non_causal_and_strided_bf16 FAILED [ 10%]\n"
            "tests/test_kernels_norm.py::test_bf16_on_gpu[layer-768] SKIPPED (needs CUDA) [ 15%]\n"
            "tests/test_kernels_norm.py::test_bf16_on_gpu[rms-768] ")  # the case it was killed in
    assert [(r["test"], r["outcome"]) for r in verbose_rows(text)] == [
        ("test_gpu_suite::test_gpu_mqa_by_flash_rule[257-True-dtype0]", "passed"),
        ("test_kernels_attention::test_gpu_non_causal_and_strided_bf16", "failed"),
        ("test_kernels_norm::test_bf16_on_gpu[layer-768]", "skipped")]


# --------------------------------------------------------------------------- goals: pass/miss logic
def test_goal_judgement_pass_miss_and_not_measured():
    from benchmarks.gpu.suite import evaluate_goals

    def att(T, tflops, direction="fwd", **kw):
        return {"impl": "minillm", "dtype": "bfloat16", "D": 128, "causal": True, "H": 16, "H_kv": 16, "T": T,
                "dir": direction, "TFLOP/s": tflops, "status": "ok", **kw}

    rows = [att(512, 100.0),             # below the size that counts: ignored
            att(4096, 340.0), att(16384, 335.0),
            att(8192, 10.0, H_kv=4),     # GQA: another goal's shape, ignored
            att(8192, 10.0, status="wrong"),
            att(4096, 249.0, "fwd+bwd"), att(8192, 300.0, "fwd+bwd")]
    norms = [{"impl": "minillm", "dtype": "bfloat16", "norm": "rms", "dir": "fwd", "N": 8192, "GB/s": 2800.0,
              "status": "ok"}]
    train = [{"preset": "gpt2", "kernels": "triton", "mfu": 0.41, "status": "ok"},
             {"preset": "gpt2", "kernels": "triton", "mfu": 0.52, "status": "ok"},
             {"preset": "gpt2", "kernels": "torch", "mfu": 0.60, "status": "ok"}]
    goals = {g["goal"]: g for g in evaluate_goals({"attention": {"rows": rows}, "norms": {"rows": norms},
                                                   "train": {"rows": train}})}
    assert (goals["attention forward"]["measured"], goals["attention forward"]["result"]) == (335.0, "pass")
    assert goals["attention forward"]["rows"] == 2
    # the goal must hold at every long T: the worst one decides
    assert (goals["attention forward+backward"]["measured"], goals["attention forward+backward"]["result"]) == (
        249.0, "miss")
    assert goals["RMSNorm forward"]["result"] == "pass"  # exactly on target passes
    assert goals["RMSNorm backward"]["result"] == "n/a" and goals["RMSNorm backward"]["measured"] is None
    assert goals["LayerNorm forward"]["result"] == "n/a"
    # MFU: minillm's kernels only (the torch-kernel row is a baseline), best of the configurations
    assert (goals["gpt2-small training MFU"]["measured"], goals["gpt2-small training MFU"]["result"]) == (0.52, "pass")


# ------------------------------------------------------------- timing measures the kernel (item 2)
def test_flop_count_follows_flashattention2():
    """benchmark_flash_attention.py's flops(): 4*B*H*T^2*D forward, half when causal, x2.5 bwd, x3.5 fwd+bwd."""
    from benchmarks.bench_attention import flops
    B, H, T, D = 2, 16, 4096, 128
    full = flops(B, H, T, D, False, "fwd")
    assert full == 4 * B * H * T * T * D
    assert flops(B, H, T, D, True, "fwd") == full / 2
    assert flops(B, H, T, D, True, "bwd") == 2.5 * full / 2
    assert flops(B, H, T, D, True, "fwd+bwd") == 3.5 * full / 2


def test_dry_run_rates_use_the_flop_and_byte_counts(dry_runs):
    from benchmarks.bench_attention import flops
    from benchmarks.bench_norm import bytes_moved
    parts = _results(dry_runs["a"])["parts"]
    for r in parts["attention"]["rows"]:
        want = flops(r["B"], r["H"], r["T"], r["D"], r["causal"], r["dir"]) / (r["ms"] * 1e-3) / 1e12
        assert r["TFLOP/s"] == pytest.approx(want)
    for r in parts["norms"]["rows"]:
        want = bytes_moved(r["M"], r["N"], 4, r["dir"] == "bwd", r["norm"] == "layer") / (r["ms"] * 1e-3) / 1e9
        assert r["GB/s"] == pytest.approx(want)


def test_attention_backward_timing_never_touches_grad(monkeypatch):
    """Timed backward = torch.autograd.grad: after timing, q, k, v still have .grad None (a repeated
    .backward(retain_graph=True) would have accumulated into them on every repeat)."""
    from benchmarks import bench_attention as ba
    made = []
    real = ba.make_inputs
    monkeypatch.setattr(ba, "make_inputs", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    calls = {"grad": 0}
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.__setitem__("grad", calls["grad"] + 1)
                        or real_grad(*a, **k))
    sdpa = ba.implementations("cpu")["sdpa"]
    want = lambda q, k, v: ba.implementations("cpu")["reference"](q, k, v, True)  # noqa: E731
    rows = ba.bench_one("sdpa", sdpa, 1, 2, 1, 16, 8, True, torch.float32, "cpu", 2, want,
                        directions=("fwd", "bwd", "fwd+bwd"))
    assert [r["dir"] for r in rows] == ["fwd", "bwd", "fwd+bwd"]
    q, k, v, _ = made[0]
    assert q.grad is None and k.grad is None and v.grad is None
    assert calls["grad"] >= 2 * 3 * 2  # bwd and fwd+bwd each timed (warm-up + repeats) twice: kernel, per call


def test_norm_backward_timing_never_touches_grad(monkeypatch):
    from benchmarks import bench_norm as bn
    from minillm.kernels.layernorm import layer_norm_ref
    made = []
    real = bn.make_inputs
    monkeypatch.setattr(bn, "make_inputs", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    fn = bn.implementations("layer", "cpu")["torch"]
    rows = bn.bench_one("layer", "torch", fn, 8, 32, torch.float32, "cpu", 2, lambda x, w, b: layer_norm_ref(x, w, b))
    assert [r["dir"] for r in rows] == ["fwd", "bwd"] and all(r["err"] < 1e-4 for r in rows)
    x, w, b, _ = made[0]
    assert x.grad is None and w.grad is None and b.grad is None


def test_a_wrong_kernel_is_recorded_not_timed():
    """Correctness before speed: an implementation whose gradient is off is reported 'wrong', untimed."""
    from benchmarks import bench_attention as ba
    ref = ba.implementations("cpu")["reference"]

    class BadGrad(torch.autograd.Function):  # right forward, dQ scaled by 1.1
        @staticmethod
        def forward(ctx, q):
            return q.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.1

    bad = lambda q, k, v, c: ref(BadGrad.apply(q), k, v, c)  # noqa: E731
    want = lambda q, k, v: ref(q, k, v, True)  # noqa: E731
    (row,) = ba.bench_one("bad", bad, 1, 2, 2, 16, 8, True, torch.float32, "cpu", 2, want, on_mismatch="record")
    assert row["status"] == "wrong" and row["err"] > 0.05 and "ms" not in row
    with pytest.raises(SystemExit, match="differs from the reference"):
        ba.bench_one("bad", bad, 1, 2, 2, 16, 8, True, torch.float32, "cpu", 2, want)


def test_a_failed_graph_capture_is_recorded_and_the_benchmark_goes_on(monkeypatch):
    """CUDA-graph timing that torch refuses (here: a stand-in capture raising for the backward) leaves
    graph_ms None and the reason in graph_error on that row; the other directions still get theirs."""
    from benchmarks import bench_attention as ba
    from benchmarks import common
    calls = []

    def capture(fn, reps, warmup, target_ms):  # in place of warm-up, capture and replay on a GPU
        fn()
        calls.append(fn)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return 0.125

    real = common.graph_ms
    monkeypatch.setattr(common, "graph_ms", lambda fn, device, **kw: real(fn, "cuda", **kw))
    monkeypatch.setattr(common, "_capture_and_time", capture)
    ref = ba.implementations("cpu")["reference"]
    rows = ba.bench_one("sdpa", ba.implementations("cpu")["sdpa"], 1, 2, 1, 16, 8, True, torch.float32, "cpu", 2,
                        lambda q, k, v: ref(q, k, v, True), directions=("fwd", "bwd", "fwd+bwd"))
    assert [(r["dir"], r["graph_ms"]) for r in rows] == [("fwd", 0.125), ("bwd", None), ("fwd+bwd", 0.125)]
    assert rows[1]["graph_error"] == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert "graph_error" not in rows[0] and "graph_error" not in rows[2] and len(calls) == 3
    assert all(r["ms"] > 0 and r["call_ms"] > 0 and r["status"] == "ok" for r in rows)


def test_report_renders_rows_with_and_without_graph_ms():
    """graph_ms measured, graph_ms None with its reason, and an older row without the key: the pivot
    shows the number, '-', '-', and the summary names the failed capture once with the rows it struck."""
    from benchmarks.gpu import report

    def att(T, impl, **kw):
        return {"impl": impl, "dtype": "bfloat16", "D": 128, "causal": True, "H": 16, "H_kv": 16, "T": T, "dir": "fwd",
                "TFLOP/s": 300.0, "ms": 1.5, "call_ms": 1.75, "err": 0.004, "status": "ok", **kw}

    why = "RuntimeError: operation not permitted when stream is capturing"
    rows = [att(1024, "minillm", graph_ms=1.25), att(1024, "sdpa-flash", graph_ms=1.0),
            att(2048, "minillm", graph_ms=None, graph_error=why),
            att(2048, "sdpa-flash", graph_ms=None, graph_error=why),
            att(4096, "minillm"), att(4096, "minillm-notma", graph_ms=2.0),  # no graph_ms key: an older result
            att(4096, "sdpa-flash", **{"TFLOP/s": 150.0})]
    table, cols = report.attention_pivot(rows)
    assert cols[5:] == ["minillm", "minillm-notma", "sdpa-flash", "vs_best", "ms (minillm)", "graph_ms", "call_ms",
                        "err"]
    cells = [line.split(" | ")[cols.index("graph_ms")] for line in report.md_table(table, cols).splitlines()[2:]]
    assert cells == ["1.25", "-", "-"]
    assert [line.get("vs_best") for line in table] == [1.0, 1.0, 2.0]  # minillm-notma is no baseline
    errors = report.graph_errors(rows)
    assert errors.count("graph capture failed") == 1 and why in errors and "(2 row(s)" in errors
    assert "impl=minillm dtype=bfloat16 D=128 T=2048 dir=fwd" in errors and "impl=sdpa-flash" in errors
    payload = {"environment": {}, "dry_run": False, "full": False, "wall_s": 1.0, "goals": [],
               "parts": {"attention": {"status": "ok", "rows": rows}}}
    assert why in report.summary_markdown(payload)
    norms, ncols = report.norms_pivot([{"norm": "rms", "dtype": "bfloat16", "N": 4096, "dir": "fwd", "impl": "minillm",
                                        "GB/s": 2000.0, "ms": 0.1, "call_ms": 0.2, "err": 0.0, "status": "ok"}])
    assert ncols[-4:] == ["ms (minillm)", "graph_ms", "call_ms", "err"] and norms[0]["graph_ms"] is None


def _env_spy(var: str, seen: list):
    """An attention implementation (SDPA behind an identity on q) that appends ``os.environ[var]`` to
    ``seen`` in its forward and in its backward: the environment a benchmark variant ran under."""
    from benchmarks import bench_attention as ba

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            seen.append(os.environ.get(var))
            return q.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(os.environ.get(var))
            return g

    sdpa = ba.implementations("cpu")["sdpa"]
    return lambda q, k, v, c: sdpa(Spy.apply(q), k, v, c)


def test_notma_is_listed_on_sm90_only_and_runs_under_its_environment(monkeypatch):
    """minillm-notma: listed where the device is compute capability 9 or more; its check and every timed
    call (forward and backward) run with MINILLM_ATTN_TMA=0, restored afterwards; no backward-only row."""
    from benchmarks import bench_attention as ba
    for cap, listed in (((9, 0), True), ((10, 0), True), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cap=cap: cap)
        assert ("minillm-notma" in ba.implementations("cuda")) is listed, cap
        assert "minillm-split" in ba.implementations("cuda")  # the backward split: every CUDA device
    assert "minillm-split" not in ba.implementations("cpu")
    seen = []
    spy, ref = _env_spy("MINILLM_ATTN_TMA", seen), ba.implementations("cpu")["reference"]
    for before in ("1", None):
        if before is None:
            monkeypatch.delenv("MINILLM_ATTN_TMA", raising=False)
        else:
            monkeypatch.setenv("MINILLM_ATTN_TMA", before)
        seen.clear()
        rows = ba.bench_one("minillm-notma", spy, 1, 2, 1, 16, 8, True, torch.float32, "cpu", 2,
                            lambda q, k, v: ref(q, k, v, True), directions=("fwd", "bwd", "fwd+bwd"))
        assert [r["dir"] for r in rows] == ["fwd", "fwd+bwd"]
        assert len(seen) > 10 and set(seen) == {"0"}
        assert os.environ.get("MINILLM_ATTN_TMA") == before


def test_run_sh_and_fetch_wheels_are_wired():
    """run.sh installs carried wheels offline and runs the suite; fetch_wheels.sh fetches what the
    device README's package list lacks (the text is the contract a later GPU session relies on)."""
    run = (ROOT / "benchmarks" / "gpu" / "run.sh").read_text()
    assert "--no-index --no-deps" in run and "--target /tmp/site" in run and "PYTHONPATH" in run
    assert "benchmarks/gpu/suite.py" in run and '"$@"' in run
    fetch = (ROOT / "benchmarks" / "gpu" / "fetch_wheels.sh").read_text()
    for name in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "wandb", "zstandard"):
        assert name in fetch, name
    assert "--python-version 3.12" in fetch and "/.whl/" in fetch
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu" / "run.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -------------------------------------------------------------------------------------- GPU tier
def _rule(got, base, ref, atol):
    """FlashAttention's rule: max|got - ref| <= 2 * max|torch's own low-precision result - ref| + atol."""
    for name, a, b, r in zip(("out", "d0", "d1", "d2"), got, base, ref):
        err, base_err = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + atol, f"{name}: {err:.3g} > 2 * {base_err:.3g} + {atol}"


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("kind", ["attention", "layer", "rms"])
def test_gpu_backward_is_deterministic(kind):
    """The same backward twice gives bitwise the same gradients (no atomics, fixed reduction order)."""
    torch.manual_seed(0)
    if kind == "attention":
        from minillm.kernels.attention import flash_attention
        q = torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(2, 2, 1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        leaves, fn = (q, k, v), lambda: flash_attention(q, k, v, causal=True)
        dy = torch.randn_like(q)
    else:
        from minillm.kernels.layernorm import layer_norm, rms_norm
        x = torch.randn(4099, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        leaves, fn = ((x, w, b), lambda: layer_norm(x, w, b)) if kind == "layer" else ((x, w), lambda: rms_norm(x, w))
        dy = torch.randn_like(x)
    first = torch.autograd.grad(fn(), leaves, dy)
    for _ in range(3):
        again = torch.autograd.grad(fn(), leaves, dy)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,causal", [(257, True), (1023, False)])
def test_gpu_mqa_by_flash_rule(dtype, T, causal):
    """One KV head for eight query heads (MQA), odd T, in bf16/fp16, against FlashAttention's rule."""
    import torch.nn.functional as F
    from minillm.kernels.attention import attention_ref, flash_attention
    g = torch.Generator(device="cuda").manual_seed(T)
    q, do = (torch.randn(2, 8, T, 64, device="cuda", generator=g) for _ in range(2))
    k, v = (torch.randn(2, 1, T, 64, device="cuda", generator=g) for _ in range(2))

    def run(fn, dt):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o = fn(*xs)
        return [o.detach()] + list(torch.autograd.grad(o, xs, do.to(dt)))

    ref = [t.double() for t in run(lambda a, b, c: attention_ref(a, b, c, causal=causal), torch.float64)]
    base = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=True), dtype)
    _rule(run(lambda a, b, c: flash_attention(a, b, c, causal=causal), dtype), base, ref,
          1e-3 if dtype == torch.bfloat16 else 2e-4)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gpu_norms_by_flash_rule_on_strided_rows(kind, dtype):
    """Norms in bf16/fp16 on a row-strided view with odd N: output and every gradient within twice torch's
    own error in the same dtype (both against float64)."""
    import torch.nn.functional as F
    from minillm.kernels.layernorm import layer_norm, rms_norm
    M, N = 3001, 1000
    g = torch.Generator(device="cuda").manual_seed(N)
    wide = torch.randn(M, N + 24, device="cuda", generator=g)
    w, b = torch.randn(N, device="cuda", generator=g), torch.randn(N, device="cuda", generator=g)
    dy = torch.randn(M, N, device="cuda", generator=g)

    def run(fn, dt):
        x = wide.to(dt)[:, :N].requires_grad_()  # a view: row stride N + 24
        leaves = [x, w.to(dt).requires_grad_()] + ([b.to(dt).requires_grad_()] if kind == "layer" else [])
        y = fn(*leaves)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, dy.to(dt)))

    if kind == "layer":
        mine, torch_fn = (lambda x, w, b: layer_norm(x, w, b)), (lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5))
    else:
        mine, torch_fn = (lambda x, w: rms_norm(x, w)), (lambda x, w: F.rms_norm(x, (N,), w, 1e-6))
    ref = [t.double() for t in run(torch_fn, torch.float64)]
    _rule(run(mine, dtype), run(torch_fn, dtype), ref, 1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_split_runs_its_backward_under_its_environment(monkeypatch):
    """minillm-split: its check and every timed call run with MINILLM_ATTN_DKDV=split (restored after);
    no forward-only row, since the split changes only the backward."""
    from benchmarks import bench_attention as ba
    seen = []
    spy, ref = _env_spy("MINILLM_ATTN_DKDV", seen), ba.implementations("cpu")["reference"]
    monkeypatch.delenv("MINILLM_ATTN_DKDV", raising=False)
    rows = ba.bench_one("minillm-split", spy, 1, 2, 1, 16, 8, True, torch.float32, "cpu", 2,
                        lambda q, k, v: ref(q, k, v, True), directions=("fwd", "bwd", "fwd+bwd"))
    assert [r["dir"] for r in rows] == ["bwd", "fwd+bwd"]
    assert len(seen) > 5 and set(seen) == {"split"} and "MINILLM_ATTN_DKDV" not in os.environ

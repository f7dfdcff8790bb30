"""The build tier: `python -m minillm.kernels.build_report` compiles kernels for sm_80/sm_90 without a GPU.

The report runs in a subprocess: this pytest process imported the kernels under TRITON_INTERPRET=1,
where @triton.jit functions cannot be compiled.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minillm.kernels.build_report import ARCH_LIMITS, check_row, ctas_per_sm

ROOT = Path(__file__).resolve().parents[1]


def run_report(args, tmp_path, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path or ""), str(ROOT),
                                                      env.get("PYTHONPATH", "")]))
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "minillm.kernels.build_report", "-q", "--json", str(out),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    rows = json.loads(out.read_text())["rows"] if out.exists() else None
    return proc, rows


def test_check_row_flags_spills_and_shared_overflow():
    ok = {"stack": 0, "local": 0, "shared": 1024, "ctas/SM": 4}
    assert check_row(ok, 90) == "ok"
    assert "spills" in check_row({**ok, "stack": 8}, 90)
    assert "spills" in check_row({**ok, "local": 4}, 80)
    too_big = 200 * 1024  # fits sm_90's 227 KiB, not sm_80's 163 KiB
    assert check_row({**ok, "shared": too_big}, 90) == "ok"
    assert "shared" in check_row({**ok, "shared": too_big}, 80)


def test_check_row_fails_a_variant_whose_ptx_lacks_a_required_feature():
    """A TMA variant that silently compiles to ordinary loads must not pass as an ordinary kernel."""
    ok = {"stack": 0, "local": 0, "shared": 1024, "ctas/SM": 1, "wgmma": "yes", "tma": "no"}
    assert check_row(ok, 90) == "ok"
    assert check_row(ok, 90, ("tma",)) == "no tma in the PTX"
    assert check_row({**ok, "tma": "yes"}, 90, ("tma", "wgmma")) == "ok"
    assert check_row({**ok, "wgmma": "no", "stack": 8}, 90, ("wgmma",)).startswith("no wgmma in the PTX; spills")


def test_ctas_per_sm_limits():
    # 128 regs x 32 threads x 16 warps = 65536 = the whole register file
    assert ctas_per_sm(90, regs=128, shared=0, num_warps=16) == 1
    assert ctas_per_sm(90, regs=129, shared=0, num_warps=16) == 0
    # 4 warps of 32 regs: 16 CTAs by the 64-warp cap
    assert ctas_per_sm(80, regs=32, shared=0, num_warps=4) == 16
    # shared memory bound: 100 KiB per CTA -> 2 on sm_90 (228 KiB), 1 on sm_80 (164 KiB)
    assert ctas_per_sm(90, regs=32, shared=100 * 1024, num_warps=4) == 2
    assert ctas_per_sm(80, regs=32, shared=100 * 1024, num_warps=4) == 1
    assert set(ARCH_LIMITS) == {80, 90}


FAKE_MODULE = textwrap.dedent('''
    import triton, triton.language as tl
    from minillm.kernels._spec import KernelSpec

    @triton.jit
    def scale_rows(X, Y, N, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        x = tl.load(X + tl.program_id(0) * N + cols, mask=cols < N, other=0.0)
        tl.store(Y + tl.program_id(0) * N + cols, x * tl.sum(x, axis=0), mask=cols < N)

    @triton.jit
    def matmul_tile(A, B, C, BM: tl.constexpr):
        r = tl.arange(0, BM)
        a = tl.load(A + r[:, None] * BM + r[None, :])
        b = tl.load(B + r[:, None] * BM + r[None, :])
        tl.store(C + r[:, None] * BM + r[None, :], tl.dot(a, b))

    def build_specs():
        sig = {"X": "*fp32", "Y": "*fp32", "N": "i32", "BLOCK": "constexpr"}
        return [
            KernelSpec("scale_rows", scale_rows, sig, {"BLOCK": 1024}, num_warps=4, label="fits"),
            # 8192 fp32 values in one warp = 256 per thread: more than 255 registers, must spill
            KernelSpec("scale_rows", scale_rows, sig, {"BLOCK": 8192}, num_warps=1, label="spills"),
            # in one architecture's list only: compiled for that one
            KernelSpec("scale_rows", scale_rows, sig, {"BLOCK": 2048}, num_warps=4, label="sm90 list",
                       archs=(90,)),
            KernelSpec("matmul_tile", matmul_tile,
                       {"A": "*fp16", "B": "*fp16", "C": "*fp32", "BM": "constexpr"}, {"BM": 64},
                       label="dot"),
        ]
''')


def test_report_detects_spills_wgmma_and_skips_missing_modules(tmp_path):
    (tmp_path / "fake_kernels_mod.py").write_text(FAKE_MODULE)
    proc, rows = run_report(["--modules", "fake_kernels_mod,minillm.kernels.not_written_yet"], tmp_path,
                            extra_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr   # the spilling config fails the tier
    assert "skipping minillm.kernels.not_written_yet" in proc.stderr
    by = {(r["config"], r["arch"]): r for r in rows}
    assert set(by) == {(c, a) for c in ("fits", "spills", "dot") for a in ("sm_80", "sm_90")} | {
        ("sm90 list", "sm_90")}
    for arch in ("sm_80", "sm_90"):
        assert by[("fits", arch)]["status"] == "ok" and by[("fits", arch)]["regs"] > 0
        assert by[("spills", arch)]["status"].startswith("spills")
        assert by[("spills", arch)]["stack"] + by[("spills", arch)]["local"] > 0
    # Hopper's warpgroup MMA only on sm_90; the dot needs shared memory for its operands
    assert by[("dot", "sm_90")]["wgmma"] == "yes" and by[("dot", "sm_80")]["wgmma"] == "no"
    assert by[("dot", "sm_90")]["shared"] > 0
    assert "fits" in proc.stdout and "wgmma" in proc.stdout   # the printed table


def test_norm_kernels_build_clean_for_a_few_configs(tmp_path):
    """The widest fused backward row (bf16) and a narrow multi-row forward."""
    for only in ("layernorm_bwd bf16 N<=4096", "rmsnorm_fwd fp32 N<=1024"):
        proc, rows = run_report(["--arch", "80,90", "--only", only], tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
        for r in rows:
            assert r["status"] == "ok" and r["stack"] == 0 and r["local"] == 0 and r["regs"] > 0


@pytest.mark.slow
def test_full_build_report_sweep(tmp_path):
    """Every kernel module, every configuration, sm_80 and sm_90 (minutes on 2 cores)."""
    proc, rows = run_report([], tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert rows and all(r["status"] == "ok" for r in rows)

"""Build tier for kernels/attention.py: compile for sm_90 / sm_80 without a GPU (no spills, wgmma).

The variants are those kernels/attention_build.py lists. The compiles run in a subprocess without TRITON_INTERPRET (pytest's conftest sets it, and an
interpreted @triton.jit function cannot be compiled). The default test builds a few representative
configurations; the full sweep of build_specs() through ``python -m minillm.kernels.build_report`` is slow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minillm.kernels.attention_build as A
import minillm.kernels.attention_tiles as tiles

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
from minillm.kernels import build_report as br
import minillm.kernels.attention_build as A
wanted = json.loads(sys.argv[1])
specs = {f"{s.name} {s.label}": s for s in A.build_specs()}
rows = []
for key, arch in wanted:
    row = br.compile_spec(specs[key], arch)
    row["status"] = br.check_row(row, arch, specs[key].requires)
    rows.append(row)
# the PTX of the first spec: are tiles loaded as 16-byte vectors and pipelined through cp.async?
import triton
from triton.backends.compiler import GPUTarget
s = specs[wanted[0][0]]
c = triton.compile(triton.compiler.ASTSource(fn=s.fn, signature=s.signature, constexprs=s.constexprs),
                   target=GPUTarget("cuda", wanted[0][1], 32),
                   options={"num_warps": s.num_warps, "num_stages": s.num_stages})
ptx = c.asm["ptx"]
rows[0]["cp_async_16"] = "cp.async.cg.shared.global" in ptx
rows[0]["scalar_b16_loads"] = "ld.global.b16" in ptx
print(json.dumps(rows))
"""


def _build(wanted: list[tuple[str, int]]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(wanted)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_representative_configs_build_without_spills_and_fwd_uses_wgmma():
    wanted = [
        ("attn_fwd d128 bf16 M128 N64 causal w8 s3", 90),   # the sm_90 d128 forward workhorse
        ("attn_dkdv d128 bf16 M16 N128 causal w8 s2", 90),
        ("attn_dq d128 bf16 M128 N32 causal w8 s2", 90),
        ("attn_fwd d96 fp16 M64 N64 causal w4 s3", 80),     # padded head dim, mma.sync path
        ("attn_fwd d96 bf16 M128 N64 causal w8 s3 tma", 90),  # sm_90's default: K / V through TMA
        ("attn_dv d128 bf16 M32 N128 causal w8 s2", 90),       # the dK/dV split's halves (PART 1, 2)
        ("attn_dk d64 bf16 M32 N128 causal w8 s2", 90),
    ]
    rows = _build(wanted)
    specs = {f"{s.name} {s.label}": s for s in A.build_specs()}
    for (key, arch), row in zip(wanted, rows):
        assert row["status"] == "ok", (key, arch, row)
        assert row["stack"] == 0 and row["local"] == 0, (key, row)
        # the pruning rule's shared-memory estimate bounds what the compiler allocates (else prune
        # could keep a configuration that does not launch on a device with less shared memory)
        spec = specs[key]
        c = spec.constexprs
        cfg = (c["BLOCK_M"], c["BLOCK_N"], spec.num_warps, spec.num_stages, 128)
        estimate = tiles.smem_estimate(spec.name.removeprefix("attn_"), cfg, c["HEAD_DIM"], 2, arch)
        assert row["shared"] <= estimate, row
    fwd90 = rows[0]
    assert fwd90["wgmma"] == "yes", fwd90
    # the alignment hint works: K/V tiles stream through 16-byte cp.async, no scalar 2-byte loads
    assert fwd90["cp_async_16"] and not fwd90["scalar_b16_loads"], fwd90
    assert fwd90["shared"] <= 227 * 1024
    assert rows[3]["wgmma"] == "no"  # sm_80 has no wgmma: the check is not vacuous
    # TMA: bulk tensor copies in the PTX (the row's status requires them), none in the pointer path
    assert rows[4]["tma"] == "yes" and rows[4]["wgmma"] == "yes" and fwd90["tma"] == "no", rows[4]
    assert specs[wanted[4][0]].requires == ("tma",) and "K" in specs[wanted[4][0]].signature
    assert specs[wanted[4][0]].signature["K"] == "tensordesc<bf16[1, 1, 64, 128]>"


@pytest.mark.slow
def test_full_build_report_for_attention_passes(tmp_path):
    """Every configuration of build_specs() for sm_80 and sm_90: 0 spills, shared memory within the
    SM, and every sm_90 forward uses wgmma."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "attn.json"
    out = subprocess.run([sys.executable, "-m", "minillm.kernels.build_report", "--arch", "80,90", "--only",
                          "attn_", "--json", str(report), "-q"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=7200)
    data = json.loads(report.read_text())
    bad = [r for r in data["rows"] if r["status"] != "ok"]
    assert out.returncode == 0 and not bad, bad[:5] or out.stdout[-2000:]
    fwd90 = [r for r in data["rows"] if r["kernel"] == "attn_fwd" and r["arch"] == "sm_90"]
    assert fwd90 and all(r["wgmma"] == "yes" for r in fwd90)
    tma = [r for r in fwd90 if r["config"].endswith(" tma")]
    assert len(tma) * 2 == len(fwd90) and all(r["tma"] == "yes" for r in tma)

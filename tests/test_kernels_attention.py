"""kernels/attention.py against a float64 reference: output, dQ, dK, dV.

Tolerance rule (FlashAttention's): for each of O, dQ, dK, dV,

    max|kernel - ref64| <= 2 * max|torch - ref64| + ATOL

where ``ref64`` is ``attention_ref`` in float64, ``torch`` is F.scaled_dot_product_attention run in the
same dtype as the kernel (fp32 and fp16 here; bf16 and fp16 on the GPU tier) and ATOL is a small
absolute floor (2e-6 for fp32, 2e-4 for fp16, with N(0, 1) inputs, outputs and gradients of order 1).
The floor matters where torch is exact by construction (T = 1: O = V, dQ = dK = 0) and the kernel's
log2-domain softmax is off by an ulp. fp16 runs here because Triton 3.9's interpreter computes fp16
dots correctly (bf16 ones wrongly): it checks what only half precision exercises, the roundings of P
and dS before their dots and the fp32 LSE and delta (planting either in fp16 fails a case).

The interpreter is slow, so the default grid is chosen rather than crossed: every T at d=64, every
head dim at two T, the GQA ratios at one size; the full cross product is ``-m slow``. Under the
interpreter the kernels use the fixed 32x16 / 16x32 tiles (minillm.kernels.attention_tiles.FIXED), so
T = 17, 127, 130 hit partial tiles and T = 64, 256 hit exact multiples.

GPU tier (bf16/fp16 against the same rule, autotuned configurations): on a CUDA machine run
``MINILLM_TEST_GPU=1 pytest -n 0 -m gpu tests/test_kernels_attention.py`` (-n 0: one process, so
autotuning and timings do not share the GPU with other workers).
"""
from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from minillm.kernels import attention as attn
from minillm.kernels import attention_build
from minillm.kernels import attention_tiles as tiles
from minillm.kernels.attention import attention_ref, flash_attention

ATOL = {torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 2e-4}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or attn._interpreting(),
                                reason="needs CUDA and compiled kernels (MINILLM_TEST_GPU=1 pytest -n 0 -m gpu)")


def _sdpa(q, k, v, causal, softmax_scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                          enable_gqa=True)


def _run(fn, q, k, v, do, causal, dtype, softmax_scale=None):
    """(O, dQ, dK, dV) of ``fn`` on copies of q, k, v cast to ``dtype``, as float64."""
    xs = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
    o = fn(*xs, causal=causal, softmax_scale=softmax_scale)
    o.backward(do.to(dtype))
    return [o.detach().double()] + [x.grad.double() for x in xs]


def _inputs(B, H, H_kv, T, D, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H_kv, T, D, generator=g) for _ in range(2))
    return [x.to(device) for x in (q, k, v, do)]


def assert_flash_rule(q, k, v, do, causal, dtype=torch.float32, softmax_scale=None):
    """The tolerance rule of the module docstring, for O and all three gradients."""
    ref = _run(attention_ref, q, k, v, do, causal, torch.float64, softmax_scale)
    base = _run(_sdpa, q, k, v, do, causal, dtype, softmax_scale)
    got = _run(flash_attention, q, k, v, do, causal, dtype, softmax_scale)
    for name, r, b, g in zip(("O", "dQ", "dK", "dV"), ref, base, got):
        assert g.shape == r.shape, name
        err, torch_err = (g - r).abs().max().item(), (b - r).abs().max().item()
        bound = 2 * torch_err + ATOL[dtype]
        assert err <= bound, f"{name}: kernel err {err:.3g} > 2 * torch err {torch_err:.3g} + {ATOL[dtype]}"


def assert_flash_rule_on_views(bases, views, do, causal, dtype=torch.float32):
    """The same rule when q, k, v are ``views(*bases)`` (strided slices of leaf tensors; cloning a
    non-dense view would silently make it contiguous): O and the gradients of the bases."""
    def run(fn, dt):
        leaves = [b.detach().to(dt).clone().requires_grad_() for b in bases]  # dense: clone keeps strides
        q, k, v = views(*leaves)
        if fn is flash_attention:
            assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
        o = fn(q, k, v, causal=causal)
        o.backward(do.to(dt))
        return [o.detach().double()] + [x.grad.double() for x in leaves]

    ref, base, got = run(attention_ref, torch.float64), run(_sdpa, dtype), run(flash_attention, dtype)
    for i, (r, b, g) in enumerate(zip(ref, base, got)):
        err, torch_err = (g - r).abs().max().item(), (b - r).abs().max().item()
        assert err <= 2 * torch_err + ATOL[dtype], f"output {i}: {err:.3g} vs torch {torch_err:.3g}"


# ---------------------------------------------------------------------------------------------
# Interpreter tier
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 17, 64, 127, 130, 256])
def test_every_length_d64(T, causal):
    assert_flash_rule(*_inputs(1, 1, 1, T, 64, seed=T), causal)


@pytest.mark.parametrize("D,T,causal", [(32, 17, True), (32, 130, True), (96, 17, True),
                                        (96, 130, True), (96, 130, False), (128, 17, True),
                                        (128, 130, True)])
def test_head_dims(D, T, causal):
    assert_flash_rule(*_inputs(1, 1, 1, T, D, seed=D + T), causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,H_kv", [(4, 2), (4, 1)])
def test_gqa_and_mqa(H, H_kv, causal):
    # dK / dV must be the sum over each kv head's group of query heads
    assert_flash_rule(*_inputs(1, H, H_kv, 67, 32, seed=H_kv), causal)


# fp16 under the interpreter (Triton 3.9's interpreter computes fp16 dots correctly, bf16 ones wrongly):
# the half-precision path proper, i.e. P and dS rounded to fp16 before their dots, fp16 loads and stores,
# fp32 statistics and accumulators. Torch's own error is SDPA's in fp16. Default tier: each T, head dim,
# GQA/MQA and non-causal at least once, ~6 s; every combination is the slow tier.
FP16_CASES = [  # (H, H_kv, T, D, causal)
    (2, 1, 1, 64, True), (4, 2, 37, 64, True), (1, 1, 130, 64, False), (1, 1, 37, 96, True),
    (1, 1, 130, 128, True), (2, 1, 37, 128, False),
]


@pytest.mark.parametrize("H,H_kv,T,D,causal", FP16_CASES)
def test_fp16_by_flash_rule(H, H_kv, T, D, causal):
    assert_flash_rule(*_inputs(1, H, H_kv, T, D, seed=T + D), causal, dtype=torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("T,D,causal,ratio", list(itertools.product(
    [1, 37, 130], [64, 96, 128], [True, False], [1, 2, 4])))
def test_fp16_full_cross_product(T, D, causal, ratio):
    assert_flash_rule(*_inputs(1, 4, 4 // ratio, T, D, seed=T * D + ratio), causal, dtype=torch.float16)


def test_batch_and_custom_scale():
    assert_flash_rule(*_inputs(3, 2, 1, 33, 64, seed=5), True, softmax_scale=0.3)


def test_non_contiguous_views_as_the_model_makes_them():
    """q, k, v are .view(B, T, H, D).transpose(1, 2) slices of one linear output (strides are not
    those of any contiguous tensor); the upstream gradient is a transposed view too. Gradients must
    reach the shared base tensor as torch's own attention sends them."""
    B, T, H, H_kv, D = 2, 45, 4, 2, 32
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, T, (H + 2 * H_kv) * D, generator=g)
    do = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # non-contiguous dO

    def views(base):
        q, k, v = base.split([H * D, H_kv * D, H_kv * D], dim=-1)
        return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, H_kv, D).transpose(1, 2),
                v.view(B, T, H_kv, D).transpose(1, 2))

    assert_flash_rule_on_views([qkv], views, do, True)


def test_lse_is_the_log2_normaliser():
    q, k, v, _ = _inputs(1, 2, 1, 50, 32, seed=3)
    _, lse = attn.flash_attn_fwd_op(q, k, v, True, 0.2)
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.2
    s = s.masked_fill(torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / math.log(2), rtol=0, atol=1e-5)


def test_output_layout_makes_the_model_transpose_free():
    q, k, v, _ = _inputs(1, 2, 2, 9, 16, seed=1)
    o = flash_attention(q, k, v)
    assert o.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory: y.transpose(1, 2).view(B, T, C) works


def test_torch_compile_fullgraph_matches_eager():
    """One custom-op node in the graph, no break; forward and backward through AOT autograd (fake
    tensors from register_fake, backward from register_autograd). Inductor is the slow variant."""
    _compile_vs_eager(backend="aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    _compile_vs_eager(backend="inductor")


def _compile_vs_eager(backend):
    B, T, H, H_kv, D = 2, 37, 4, 2, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 64, generator=g)
    w0 = torch.randn(64, (H + 2 * H_kv) * D, generator=g) / 8

    def block(x, w):
        q, k, v = (x @ w).split([H * D, H_kv * D, H_kv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, H_kv, D).transpose(1, 2)
        v = v.view(B, T, H_kv, D).transpose(1, 2)
        y = flash_attention(q, k, v, causal=True)
        return y.transpose(1, 2).reshape(B, T, H * D)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    outs = []
    for fn in (block, compiled):
        w = w0.clone().requires_grad_()
        y = fn(x, w)
        (y * torch.linspace(-1, 1, H * D)).sum().backward()
        outs.append((y.detach(), w.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=1e-4)


def test_custom_op_registrations_pass_opcheck():
    q, k, v, do = _inputs(1, 2, 1, 20, 16, seed=2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(attn.flash_attn_fwd_op, (q, k, v, True, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("bad,msg", [
    (dict(k=(1, 3, 8, 16)), "multiple of n_kv_head"),
    (dict(k=(1, 2, 9, 16)), "k and v must be"),
    (dict(q=(1, 2, 8, 160), k=(1, 2, 8, 160), v=(1, 2, 8, 160)), "head dim"),
    (dict(q=(2, 8, 16)), "4-D"),
])
def test_bad_inputs_fail_with_one_clear_line(bad, msg):
    shapes = dict(q=(1, 2, 8, 16), k=(1, 2, 8, 16), v=(1, 2, 8, 16)) | bad
    if "v" not in bad and "k" in bad:
        shapes["v"] = shapes["k"]
    with pytest.raises(ValueError, match=msg):
        flash_attention(*(torch.randn(*shapes[n]) for n in "qkv"))


def _built_configs() -> set[tuple]:
    """(kernel, arch, head dim, dtype, BLOCK_M, BLOCK_N, warps, stages) of every spec the build report
    compiles (build_specs(): what `python -m minillm.kernels.build_report` checks for spills)."""
    out = set()
    for spec in attention_build.build_specs():
        c = spec.constexprs
        kind = spec.name.removeprefix("attn_")
        # the dK/dV kernel's specs build the half they are named for (PART), not the fused kernel
        assert c.get("PART") == tiles.PART.get(kind), (spec.name, spec.label)
        for arch in spec.archs or (80, 90):
            out.add((spec.name.removeprefix("attn_"), arch, c["HEAD_DIM"], spec.label.split()[1],
                     c["BLOCK_M"], c.get("BLOCK_N", 0), spec.num_warps, spec.num_stages))
    return out


def test_every_configuration_the_autotuner_can_run_was_built_by_the_report():
    """What the autotuner may run on a GPU (prune() at any T, with the device's own shared-memory limit:
    99 KB on sm_86/sm_89, which take the sm_80 list; 163 KB A100, 227 KB H100) is a configuration the
    build report compiled for that architecture, head dim and dtype. The run-time pruning (T caps, the
    smaller limit, the never-empty fallback) must not reach a configuration no build checked for spills."""
    built = _built_configs()
    limits = {80: (99 * 1024, tiles.SMEM_BYTES[80]), 90: (tiles.SMEM_BYTES[90],)}
    for kind, arch, d, dtype, T in itertools.product(("fwd", "dkdv", "dq", "pre", "dv", "dk"), (80, 90),
                                                     attention_build.HEAD_DIMS,
                                                     ("bf16", "fp16"), (1, 17, 40, 100, 1000, 8192)):
        for smem in limits[arch]:
            kept = tiles.prune(kind, arch, d, 2, T, smem_limit=smem)
            assert kept, (kind, arch, d, T, smem)
            for cfg in kept:
                assert (kind, arch, d, dtype, *cfg[:4]) in built, (kind, arch, d, dtype, T, smem, cfg)


def test_short_sequences_and_small_devices_prune_what_cannot_pay():
    """Tiles longer than the T bucket only compute padding; on sm_90 every half-precision tile feeds
    wgmma (its M side >= 64 rows: the query tile, or the key tile in dK/dV); a 99 KB device keeps only
    configurations within 99 KB. Stated from hardware facts, not from the code's own arithmetic: the
    forward's resident Q tile plus stages x (K + V) tiles, 2 bytes each."""
    assert {c[:2] for c in tiles.prune("fwd", 90, 64, 2, T=40)} == {(64, 64)}
    assert all(c[1] >= 64 for c in tiles.prune("dkdv", 90, 128, 2, T=4096))
    assert all(c[0] >= 64 for c in tiles.prune("dq", 90, 128, 2, T=4096))
    for bm, bn, _, stages, _ in tiles.prune("fwd", 80, 128, 2, T=4096, smem_limit=99 * 1024):
        assert 2 * (bm * 128 + stages * 2 * bn * 128) <= 99 * 1024
    big = (64, 64, 4, 3, 128)  # 2 * (64 * 128 + 3 * 2 * 64 * 128) B = 112 KB: an A100 has room, an sm_86 not
    assert big in tiles.prune("fwd", 80, 128, 2, T=4096)
    assert big not in tiles.prune("fwd", 80, 128, 2, T=4096, smem_limit=99 * 1024)


# ---------------------------------------------------------------------------------------------
# Full cross product (slow) and the GPU tier
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("T,D,causal,ratio", list(itertools.product(
    [1, 17, 64, 127, 130, 256], [32, 64, 96, 128], [True, False], [1, 2, 4])))
def test_full_cross_product(T, D, causal, ratio):
    assert_flash_rule(*_inputs(1, 4, 4 // ratio, T, D, seed=T * D + ratio), causal)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,T,D,ratio", [(2, 8, 1, 64, 1), (2, 8, 1000, 64, 4), (1, 4, 2047, 128, 2),
                                           (1, 4, 4096, 128, 1), (2, 8, 333, 96, 2)])
def test_gpu_half_precision_gradients(B, H, T, D, ratio, dtype):
    # runs the autotuned configurations (MINILLM_ATTN_FIXED unset) on real tensor cores
    assert_flash_rule(*_inputs(B, H, H // ratio, T, D, seed=T, device="cuda"), True, dtype=dtype)


@pytest.mark.gpu
@needs_cuda
def test_gpu_non_causal_and_strided_bf16():
    q, k, v, do = _inputs(2, 8, 2, 777, 128, seed=1, device="cuda")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) memory
    assert_flash_rule(q, k, v, do, False, dtype=torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("D", [8, 40, 96, 128])
def test_gpu_tma_and_pointer_forwards_agree_bitwise(monkeypatch, D):
    """On sm_90+ the default forward reads K / V through TMA; MINILLM_ATTN_TMA=0 gives the pointer
    path. Same tiles, same arithmetic: O and LSE bitwise equal, at a ragged T with GQA, including
    head dims whose TMA box is wider than the tensor (8 -> 16, 40 -> 64, 96 -> 128 columns)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    # the fixed tiles: one compile per head dim and path (the autotuned TMA path runs in every other
    # GPU test; this one checks the descriptors' zero fill and boxes, within the suite's time budget)
    monkeypatch.setenv("MINILLM_ATTN_FIXED", "1")
    q, k, v, _ = _inputs(2, 8, 2, 1000, D, seed=D, device="cuda")
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    out = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("MINILLM_ATTN_TMA", mode)
        out[mode] = attn._fwd(q, k, v, True, D ** -0.5)
    assert torch.equal(out["1"][0], out["0"][0]) and torch.equal(out["1"][1], out["0"][1])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("B,H,T,D,ratio", [(2, 8, 1000, 64, 4), (1, 4, 2047, 128, 2)])
def test_gpu_split_dkdv_by_flash_rule(monkeypatch, B, H, T, D, ratio):
    """MINILLM_ATTN_DKDV=split on real tensor cores, with its own autotuned tiles (so not bitwise the
    fused kernel's sums): O and every gradient by FlashAttention's rule in bf16."""
    monkeypatch.setenv("MINILLM_ATTN_DKDV", "split")
    assert_flash_rule(*_inputs(B, H, H // ratio, T, D, seed=T, device="cuda"), True, dtype=torch.bfloat16)


def test_bench_attention_quick_runs_on_cpu(tmp_path):
    """The benchmark script's CPU path end to end (not a timing test): rows, FLOP accounting, files."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_attention.py", "--quick", "--out-dir",
                           str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads((tmp_path / "bench_attention.json").read_text())
    rows = payload["rows"]
    assert {(r["impl"], r["dir"]) for r in rows} == {(i, d) for i in ("sdpa", "reference")
                                                      for d in ("fwd", "bwd")}
    for r in rows:  # causal forward FLOPs = 2*B*H*T^2*D, backward 2.5x that
        f = 2 * r["B"] * r["H"] * r["T"] ** 2 * r["D"] * (2.5 if r["dir"] == "bwd" else 1)
        assert r["TFLOP/s"] == pytest.approx(f / (r["ms"] * 1e-3) / 1e12)
    assert payload["environment"]["device_type"] == "cpu"
    assert (tmp_path / "bench_attention.png").stat().st_size > 0


@pytest.mark.parametrize("tma", ["0", "1"])
def test_batches_beyond_the_grid_limit_are_split(monkeypatch, tma):
    """B * H above CUDA's grid-y limit is launched in batch slices (views): same result, on the
    pointer path and through TMA descriptors (one per slice)."""
    monkeypatch.setenv("MINILLM_ATTN_TMA", tma)
    monkeypatch.setattr(attn, "MAX_GRID_Y", 5)  # H = 2 -> slices of 2 batch rows
    assert_flash_rule(*_inputs(3, 2, 1, 20, 16, seed=4), True)


def test_unaligned_and_strided_head_dim_inputs():
    """Views that break the 16-byte promise (odd offset, head-dim stride 2) take the ALIGN = 1 path."""
    B, H, T, D = 1, 2, 19, 16
    g = torch.Generator().manual_seed(9)
    big = torch.randn(B, H, T, 2 * D + 1, generator=g)
    v = torch.randn(B, H, T, D, generator=g)
    do = torch.randn(B, H, T, D, generator=g)

    def views(big, v):  # q: base pointer off by 4 bytes; k: head-dim stride 2
        return big[..., 1:D + 1], big[..., 0:2 * D:2], v

    assert attn._align(*views(big, v)) == 1 and attn._align(v) == 16
    assert_flash_rule_on_views([big, v], views, do, True)


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq", "pre", "dv", "dk"])
def test_gpu_autotuner_prunes_with_the_real_argument_names(kind):
    """The CUDA path's triton.autotune wrapper, exercised without a GPU: its early-prune hook must
    find Q / O, HEAD_DIM and T among the launch arguments and keep only configurations that the
    pruning rule allows (a typo here would only show up on the first GPU run)."""
    tuner = attn._tuned(kind, 90, tiles.SMEM_BYTES[90])
    names = attn.KERNELS[kind].arg_names
    args = {n: 0 for n in names if n not in ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "CAUSAL",
                                             "IEEE", "ALIGN")}
    tensor = torch.empty(0, dtype=torch.bfloat16)
    args.update({n: tensor for n in ("Q", "K", "V", "O", "DO") if n in args}, T=4097,
                T_BUCKET=tiles.t_bucket(4097))
    tuner.nargs = args
    kept = tuner.prune_configs({"HEAD_DIM": 128, "BLOCK_D": 128, "CAUSAL": True, "IEEE": False,
                                "ALIGN": 16})
    got = {(c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N", 0), c.num_warps, c.num_stages) for c in kept}
    assert got == {c[:4] for c in tiles.prune(kind, 90, 128, 2, 8192)}
    assert got


@pytest.mark.parametrize("split", [False, True])
def test_autotuner_tunes_once_per_power_of_two_bucket_of_T(monkeypatch, split):
    """The CUDA path's autotuner, run under the interpreter with a stand-in benchmark (sm_80's list,
    fp16): T = 40 and T = 50 share bucket 64, so the second length benchmarks nothing and adds no tuning
    entry; T = 20 (bucket 32) gets an entry of its own. Each run uses the tuned tiles (not the fixed test
    tiles) and the exact T for its masks: outputs and gradients pass FlashAttention's rule."""
    monkeypatch.setattr(attn, "_use_fixed", lambda: False)
    monkeypatch.setattr(attn, "_device_arch", lambda device: (80, tiles.SMEM_BYTES[80]))
    monkeypatch.setattr(attn, "_TUNED", {})
    kinds, benched = ("fwd", "dkdv", "dq"), collections.Counter()
    if split:  # the split's halves, with their own tuned tiles (wider query tiles than the fused kernel's)
        monkeypatch.setenv("MINILLM_ATTN_DKDV", "split")
        kinds = ("fwd", "dv", "dk", "dq")
    for kind in kinds:
        def bench(kernel_call, quantiles, kind=kind):
            kernel_call()  # the candidate runs, as it would be timed
            benched[kind] += 1
            return [1.0] * len(quantiles)
        attn._tuned(kind, 80, tiles.SMEM_BYTES[80]).do_bench = bench

    def entries():
        return [len(attn._TUNED[(k, 80, tiles.SMEM_BYTES[80])].cache) for k in kinds]

    assert_flash_rule(*_inputs(1, 2, 1, 40, 32, seed=40), True, dtype=torch.float16)
    first = dict(benched)
    one, two = [1] * len(kinds), [2] * len(kinds)
    choices = [k for k in kinds if len(tiles.prune(k, 80, 32, 2, 40)) > 1]   # dk has one tile here
    assert len(choices) >= 3 and all(first.get(k, 0) >= 2 for k in choices), first  # a real choice
    assert entries() == one
    assert_flash_rule(*_inputs(1, 2, 1, 50, 32, seed=50), True, dtype=torch.float16)
    assert entries() == one and dict(benched) == first   # same bucket: reused, no re-tuning
    assert_flash_rule(*_inputs(1, 2, 1, 20, 32, seed=20), True, dtype=torch.float16)
    assert entries() == two
    assert [tiles.t_bucket(t) for t in (1, 16, 17, 40, 64, 65, 4096, 4097)] == [16, 16, 32, 64, 64, 128,
                                                                            4096, 8192]


def test_spans_beyond_int32_are_refused_for_q_o_and_do():
    """Within-head offsets are int32: q, k, v, the output O (laid out (B, T, H, D): T stride H*D) and
    the incoming gradient dO each must span fewer than 2^31 elements. Meta tensors: no memory, and the
    check comes before any launch."""
    def meta(shape, stride=None):
        t = torch.empty(shape, device="meta")
        return t if stride is None else t.as_strided(shape, stride)
    B, H, T, D = 1, 32, 1 << 20, 128        # q contiguous spans (T-1)*D < 2^31; O spans (T-1)*H*D >= 2^31
    q = meta((B, H, T, D))
    with pytest.raises(ValueError, match=r"O \(the output, laid out \(B, T, H, D\)\) spans >= 2\^31"):
        attn._fwd(q, q[:, :1], q[:, :1], True, 0.1)
    small = meta((1, 2, 64, 16))
    far = meta((1, 2, 64, 16), (0, 0, 1 << 26, 1))  # dO with a T stride of 2^26: 63 * 2^26 >= 2^31
    with pytest.raises(ValueError, match=r"dO \(the incoming gradient\) spans >= 2\^31"):
        attn._bwd(far, small, small, small, small, meta((1, 2, 64)), True, 0.1)
    with pytest.raises(ValueError, match=r"flash_attention: q spans >= 2\^31"):
        flash_attention(far, small, small)


# ---------------------------------------------------------------------------------------------
# TMA (sm_90's default forward): K and V through tensor descriptors, under the interpreter
# ---------------------------------------------------------------------------------------------
def _model_views(B, H, H_kv, T, D, dtype, seed):
    """q, k, v as the model passes them: (B, T, H, D) storage viewed as (B, H, T, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)
    k, v = (torch.randn(B, T, H_kv, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, H, H_kv, T, D, causal", [(2, 4, 2, 37, 64, True), (1, 2, 1, 50, 96, False),
                                                      (1, 2, 2, 1, 32, True)])
def test_tma_forward_is_bitwise_the_pointer_path(monkeypatch, dtype, B, H, H_kv, T, D, causal):
    """MINILLM_ATTN_TMA=1 loads K / V tiles through (B, H_kv, T, D) descriptors whose zero fill
    replaces the row (T) and column (padded head dim 96) masks: same tiles, same arithmetic, so O and
    LSE equal the pointer path's bit for bit, at a ragged T, GQA / MQA, non-causal, strided views."""
    built = []
    real = attn._kv_descriptor
    monkeypatch.setattr(attn, "_kv_descriptor", lambda *a: built.append(a[1:]) or real(*a))
    q, k, v = _model_views(B, H, H_kv, T, D, dtype, seed=T + D)
    scale = 1 / math.sqrt(D)
    monkeypatch.setenv("MINILLM_ATTN_TMA", "0")
    o_ptr, lse_ptr = attn._fwd(q, k, v, causal, scale)
    assert not built
    monkeypatch.setenv("MINILLM_ATTN_TMA", "1")
    o_tma, lse_tma = attn._fwd(q, k, v, causal, scale)
    assert len(built) == 2 and torch.equal(o_tma, o_ptr) and torch.equal(lse_tma, lse_ptr)
    ref = attention_ref(q.double(), k.double(), v.double(), causal)
    assert (o_tma.double() - ref).abs().max().item() < (1e-5 if dtype == torch.float32 else 5e-3)


def test_tma_is_skipped_where_the_descriptor_rules_fail_and_a_bad_switch_is_one_line(monkeypatch):
    """TMA needs 16-byte aligned bases and strides (_align == 16): an odd view takes the pointer path
    even with MINILLM_ATTN_TMA=1, and still passes FlashAttention's rule. A value other than 0 / 1 is
    refused in one line naming the variable; by default the interpreter runs the pointer path."""
    built = []
    monkeypatch.setattr(attn, "_kv_descriptor", lambda *a: built.append(a) or None)
    monkeypatch.setenv("MINILLM_ATTN_TMA", "1")
    big = torch.randn(1, 2, 19, 33)
    q = big[..., 1:17]                     # base pointer off by 4 bytes
    o, _ = attn._fwd(q, q, q, True, 0.25)
    assert not built and torch.allclose(o, attention_ref(q, q, q, True, 0.25), atol=1e-5)
    q = torch.randn(2, 2, 19, 16)
    kv = torch.randn(1, 1, 19, 16).expand(2, 1, 19, 16)   # aligned, but a zero batch stride
    o, _ = attn._fwd(q, kv, kv, True, 0.25)
    assert not built and torch.allclose(o, attention_ref(q, kv, kv, True, 0.25), atol=1e-5)
    monkeypatch.delenv("MINILLM_ATTN_TMA")
    assert not attn._tma_wanted(torch.zeros(1, dtype=torch.float16))
    monkeypatch.setenv("MINILLM_ATTN_TMA", "yes")
    with pytest.raises(ValueError, match=r"^MINILLM_ATTN_TMA='yes': expected 0 \(off\), 1 \(on\)"):
        flash_attention(*_model_views(1, 1, 1, 8, 16, torch.float32, 0))


def test_sm90_autotuner_sets_each_configurations_descriptor_block(monkeypatch):
    """sm_90's forward list through the real triton.autotune wrapper under the interpreter, TMA on:
    the descriptor's block is part of the compiled signature and must be each candidate's key tile
    (_kv_block_hook, a Config pre_hook). Candidates with 32-, 64- and 128-row key tiles all run and
    the chosen one gives the pointer path's output."""
    monkeypatch.setattr(attn, "_use_fixed", lambda: False)
    monkeypatch.setattr(attn, "_device_arch", lambda device: (90, tiles.SMEM_BYTES[90]))
    monkeypatch.setattr(attn, "_TUNED", {})
    blocks = []

    def bench(kernel_call, quantiles):
        kernel_call()
        return [1.0] * len(quantiles)

    tuner = attn._tuned("fwd", 90, tiles.SMEM_BYTES[90])
    tuner.do_bench = bench
    for cfg in tuner.configs:  # record what the production hook did (it must be the one wired in)
        assert cfg.pre_hook is attn._kv_block_hook
        cfg.pre_hook = lambda nargs, hook=cfg.pre_hook: hook(nargs) or (nargs["TMA"] and blocks.append(
            (nargs["BLOCK_N"], tuple(nargs["K"].block_shape), tuple(nargs["V"].block_shape))))
    q, k, v = _model_views(1, 2, 1, 100, 32, torch.float16, seed=7)
    monkeypatch.setenv("MINILLM_ATTN_TMA", "1")
    o_tma, _ = attn._fwd(q, k, v, True, 0.2)
    assert {n for n, _, _ in blocks} == {32, 64, 128}
    assert all(k == v == (1, 1, n, 32) for n, k, v in blocks), blocks
    monkeypatch.setenv("MINILLM_ATTN_TMA", "0")
    o_ptr, _ = attn._fwd(q, k, v, True, 0.2)
    assert torch.equal(o_tma, o_ptr)


# ---------------------------------------------------------------------------------------------
# The dK/dV split (MINILLM_ATTN_DKDV=split): a dV kernel and a dK kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, B, H, H_kv, T, D, causal", [
    (torch.float32, 2, 4, 2, 37, 64, True), (torch.float16, 2, 4, 2, 37, 64, True),
    (torch.float16, 1, 2, 1, 50, 96, False), (torch.float32, 1, 2, 2, 1, 32, True)])
def test_split_dkdv_is_bitwise_the_fused_kernel(monkeypatch, dtype, B, H, H_kv, T, D, causal):
    """Each half runs the fused kernel's loop with the other half's dots removed (PART): with the same
    tiles (the interpreter's fixed ones) every dK and dV element is the same sum in the same order, so
    bit for bit the fused result; dQ is untouched. Both halves must run: dK and dV come from different
    launches (a half that did not run would leave torch.empty's garbage)."""
    q, k, v = _model_views(B, H, H_kv, T, D, dtype, seed=3 * T + D)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    o, lse = attn._fwd(q, k, v, causal, D ** -0.5)
    launched = []
    real = attn._launch
    monkeypatch.setattr(attn, "_launch", lambda kind, *a, **kw: launched.append(kind) or real(kind, *a, **kw))
    grads = {}
    for mode in ("fused", "split"):
        monkeypatch.setenv("MINILLM_ATTN_DKDV", mode)
        grads[mode] = attn._bwd(do, q, k, v, o, lse, causal, D ** -0.5)
    assert launched == ["pre", "dkdv", "dq", "pre", "dv", "dk", "dq"]
    for name, fused, split in zip(("dQ", "dK", "dV"), grads["fused"], grads["split"]):
        assert torch.equal(fused, split), name


def test_a_bad_dkdv_switch_is_one_line(monkeypatch):
    monkeypatch.setenv("MINILLM_ATTN_DKDV", "both")
    q = torch.randn(1, 1, 8, 16, requires_grad=True)
    with pytest.raises(ValueError, match=r"^MINILLM_ATTN_DKDV='both': expected fused .* or split"):
        flash_attention(q, q, q).sum().backward()


def test_each_half_of_the_split_writes_only_its_own_gradient(monkeypatch):
    """The dV launch must leave dK alone and the dK launch dV (else a half does the other's work, or
    a later half overwrites an earlier one): the other output is swapped for a NaN-filled stand-in,
    which must come back untouched, while the real outputs still equal the fused kernel's."""
    q, k, v = _model_views(1, 4, 2, 45, 32, torch.float32, seed=11)
    do = torch.randn_like(q)
    o, lse = attn._fwd(q, k, v, True, 0.2)
    fused = attn._bwd(do, q, k, v, o, lse, True, 0.2)
    untouched = []
    real = attn._launch

    def launch(kind, rows, cols, device, *args, **kw):
        if kind in ("dv", "dk"):
            other = 4 if kind == "dv" else 5          # positions of DK and DV in the launch arguments
            stand_in = torch.full_like(args[other], float("nan"))
            args = args[:other] + (stand_in,) + args[other + 1:]
            real(kind, rows, cols, device, *args, **kw)
            untouched.append(bool(stand_in.isnan().all()))
            return
        real(kind, rows, cols, device, *args, **kw)

    monkeypatch.setattr(attn, "_launch", launch)
    monkeypatch.setenv("MINILLM_ATTN_DKDV", "split")
    split = attn._bwd(do, q, k, v, o, lse, True, 0.2)
    assert untouched == [True, True]
    assert all(torch.equal(a, b) for a, b in zip(fused, split))

"""Fused LayerNorm / RMSNorm kernels against a float64 torch reference.

Runs the Triton kernels under the interpreter (conftest.py sets TRITON_INTERPRET=1), so fp32 only;
bf16 checks are the GPU tier at the bottom.

Tolerances (fp32 kernel vs float64 reference): fp32 has unit roundoff u = 6e-8. Every output is a
short chain of ops on values of size O(1) (inputs and weights are randn) plus row sums of N <= 9000
terms (statistics, c1, c2) and column sums of M <= 64 terms (dw, db). Triton reduces with a tree,
whose error grows like log2(N)*u ~ 1e-6; the observed max error is ~1.5e-6 at N=9000. We allow
1e-5 relative to the reference's scale, max(1, max|ref|): ~10x margin over roundoff, while the bugs
these tests exist for (a masked tail leaking into a sum, a missing term in dx, a partial row lost or
added twice in dw) give errors of 1e-3 .. 1.
"""

import pytest
import torch

from minillm.kernels.layernorm import (add_layer_norm, add_rms_norm, bwd_grid, layer_norm,
                                       layer_norm_ref, norm_config, reachable_configs, rms_norm,
                                       rms_norm_ref)

TOL = 1e-5

# (N, M): hidden sizes from the issue, plus 9000 for the chunked (wide-row) kernels. M is never a
# multiple of the row tile (ROWS is a power of two; see norm_config) nor of the backward's rows per
# program; small for big N because the interpreter is slow.
SHAPES = [(1, 37), (7, 37), (127, 37), (768, 13), (1000, 9), (4096, 5), (5120, 3), (9000, 3)]


def assert_close64(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert err <= TOL * scale, f"{what}: max abs error {err:.3g} > {TOL * scale:.3g}"


def reference(kind, x, w, b, r, dy, dh, eps=None):
    """float64 forward and gradients of (y*dy + h*dh).sum() via autograd on the torch reference.
    ``eps=None``: each function's default (the kernels' defaults are the same)."""
    kw = {} if eps is None else {"eps": eps}
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    xd, wd, bd, rd = leaves
    h = xd + rd if rd is not None else xd
    y = layer_norm_ref(h, wd, bd, **kw) if kind == "layer" else rms_norm_ref(h, wd, **kw)
    loss = (y * dy.double()).sum() + ((h * dh.double()).sum() if rd is not None else 0)
    loss.backward()
    return y.detach(), h.detach(), [t.grad if t is not None else None for t in leaves]


def run_kernel(kind, x, w, b, r, dy, dh, eps=None):
    kw = {} if eps is None else {"eps": eps}
    for t in (x, w, b, r):
        if t is not None:
            t.grad = None
    if r is None:
        y = layer_norm(x, w, b, **kw) if kind == "layer" else rms_norm(x, w, **kw)
        h = None
        (y * dy).sum().backward()
    else:
        y, h = add_layer_norm(x, r, w, b, **kw) if kind == "layer" else add_rms_norm(x, r, w, **kw)
        ((y * dy).sum() + (h * dh).sum()).backward()
    return y, h, [t.grad if t is not None else None for t in (x, w, b, r)]


def make(kind, N, M, affine, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a mean offset makes LayerNorm's centring matter (and would expose E[x^2]-E[x]^2 cancellation)
    x = (torch.randn(M, N, generator=g) + 3.0).requires_grad_()
    w = torch.randn(N, generator=g).requires_grad_() if affine in ("w", "wb") else None
    b = torch.randn(N, generator=g).requires_grad_() if affine == "wb" and kind == "layer" else None
    r = torch.randn(M, N, generator=g).requires_grad_() if residual else None
    dy = torch.randn(M, N, generator=g)
    dh = torch.randn(M, N, generator=g)
    return x, w, b, r, dy, dh


def check(kind, x, w, b, r, dy, dh, eps=None):
    y, h, grads = run_kernel(kind, x, w, b, r, dy, dh, eps)
    y_ref, h_ref, grads_ref = reference(kind, x, w, b, r, dy, dh, eps)
    assert y.dtype == x.dtype
    assert_close64(y, y_ref, "y")
    if r is not None:
        assert torch.equal(h, x.detach() + r.detach()), "h must be exactly x + residual"
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, grads_ref):
        if want is None:
            assert got is None, f"{name} should not exist"
        else:
            assert got is not None, f"{name} missing"
            assert_close64(got, want, name)


@pytest.mark.parametrize("N,M", SHAPES, ids=[f"N{n}-M{m}" for n, m in SHAPES])
@pytest.mark.parametrize("kind,affine", [("layer", "wb"), ("layer", "w"), ("layer", "none"),
                                         ("rms", "w"), ("rms", "none")])
def test_norm_matches_float64_reference(kind, affine, N, M):
    check(kind, *make(kind, N, M, affine, residual=False))


@pytest.mark.parametrize("N,M", [(7, 37), (768, 13), (9000, 3)])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_fused_residual_matches_unfused_reference(kind, N, M):
    check(kind, *make(kind, N, M, "wb", residual=True))


def small_variance_rows(N: int, seed: int = 0) -> torch.Tensor:
    """Five rows whose variance (LayerNorm) or mean square (RMSNorm) is at most ~eps, so eps sets rstd.

    0: all zeros (LayerNorm and RMSNorm: rstd = 1/sqrt(eps) exactly; without eps 0 * inf = NaN)
    1: all 0.25 (LayerNorm: the variance is exactly 0, y = bias)
    2: noise of scale 1e-3 (variance and mean square ~1e-6, a tenth of eps)
    3: 1e-3 + noise 1e-3 (a tiny constant plus noise: RMSNorm's mean square ~2e-6)
    4: 0.25 + noise 1e-3 (LayerNorm's centring must remove the constant; variance ~1e-6)
    The offsets stay small because fp32 statistics of (c + noise) lose about |c| * 2^-24 to rounding,
    which rstd ~ 300 magnifies: at c = 3 that alone is ~1e-4, above TOL; at 0.25 it is ~1e-6.
    """
    g = torch.Generator().manual_seed(seed)
    noise = lambda: 1e-3 * torch.randn(N, generator=g)
    return torch.stack([torch.zeros(N), torch.full((N,), 0.25), noise(), 1e-3 + noise(), 0.25 + noise()])


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "fused_residual"])
@pytest.mark.parametrize("N", [100, 9000])       # whole-row and chunked (Chan-merge) kernels
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_eps_dominates_small_variance_rows(kind, N, residual):
    """Rows whose variance is below eps, where rstd = 1/sqrt(var + eps) depends on eps more than on
    the data: the forward and every gradient must match the float64 reference with the same eps. A
    kernel that dropped eps (rstd = 1/sqrt(var)) gives NaN on the constant rows and a rstd ~3x too
    large on the noisy ones. The other tests' randn rows have var ~1, where eps = 1e-5 moves y by a
    relative 5e-6, under TOL: with eps dropped from the RMSNorm kernel or from the chunked (N > 8192)
    kernel they all still passed (checked by planting each drop), and only LayerNorm's 1- and
    7-wide rows caught it in the whole-row kernel."""
    eps = 1e-5
    g = torch.Generator().manual_seed(1)
    rows = small_variance_rows(N)
    if residual:   # h = x + r must equal the rows exactly: halves of an fp32 value add back exactly
        x, r = (rows / 2).requires_grad_(), (rows / 2).requires_grad_()
    else:
        x, r = rows.clone().requires_grad_(), None
    w = torch.randn(N, generator=g).requires_grad_()
    b = torch.randn(N, generator=g).requires_grad_() if kind == "layer" else None
    dy = torch.randn(rows.shape, generator=g)
    dh = torch.randn(rows.shape, generator=g)
    check(kind, x, w, b, r, dy, dh, eps=eps)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_non_contiguous_inputs(kind, layout):
    g = torch.Generator().manual_seed(1)
    N = 100
    if layout == "row_strided":
        # rows 130 elements apart, unit column stride: handed to the kernel as a row stride
        base = torch.randn(11, N + 30, generator=g).requires_grad_()
        view = lambda t: t[:, 5:5 + N]
    else:
        # a transposed 3-D activation has no single row stride: the wrapper copies it
        base = torch.randn(6, 3, N, generator=g).requires_grad_()
        view = lambda t: t.transpose(0, 1)
    x = view(base)
    assert not x.is_contiguous()
    w = torch.randn(N, generator=g).requires_grad_()
    b = torch.randn(N, generator=g).requires_grad_() if kind == "layer" else None
    dy = torch.randn(x.shape, generator=g)
    y = layer_norm(x, w, b) if kind == "layer" else rms_norm(x, w)
    (y * dy).sum().backward()
    y_ref, _, (dx_ref, dw_ref, db_ref, _) = reference(kind, x, w, b, None, dy, dy)
    assert_close64(y, y_ref, "y")
    assert_close64(view(base.grad), dx_ref, "dx")
    outside = torch.ones_like(base.grad)
    view(outside).zero_()
    assert (base.grad * outside).abs().max() == 0, "gradient written outside the view"
    assert_close64(w.grad, dw_ref, "dweight")
    if b is not None:
        assert_close64(b.grad, db_ref, "dbias")


def test_leading_shape_and_dtype_preserved():
    x = torch.randn(2, 3, 5, 16)
    w = torch.randn(16)
    y = layer_norm(x, w, None)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close64(y, layer_norm_ref(x.double(), w.double()), "y (4-D)")
    assert_close64(rms_norm(x), rms_norm_ref(x.double()), "rms y (4-D, no weight)")


def test_zero_rows():
    x = torch.randn(0, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 32)
    assert torch.equal(w.grad, torch.zeros(32))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="weight shape"):
        layer_norm(torch.randn(3, 8), torch.randn(7))
    with pytest.raises(TypeError, match="dtype"):
        rms_norm(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual shape"):
        add_rms_norm(torch.randn(3, 8), torch.randn(3, 9))


# ---- the config chooser and the backward grid ----

@pytest.mark.parametrize("backward", [False, True])
def test_every_chosen_config_is_in_the_build_report(backward):
    reachable = set(reachable_configs(backward))
    g = torch.Generator().manual_seed(0)
    sizes = list(range(1, 300)) + torch.randint(1, 70000, (300,), generator=g).tolist()
    for n in sizes:
        cfg = norm_config(n, backward)
        assert cfg in reachable, f"N={n}: {cfg} is not compiled by the build report"
        if not cfg.CHUNKED:
            assert cfg.BLOCK_N >= n and cfg.BLOCK_N & (cfg.BLOCK_N - 1) == 0


@pytest.mark.parametrize("M", [1, 2, 37, 255, 256, 257, 10_000, 1_000_003])
@pytest.mark.parametrize("N", [1, 768, 4096, 20000])
def test_backward_grid_covers_every_row_once(M, N):
    cfg = norm_config(N, backward=True)
    for sms in (1, 2, 132):
        G, rpp = bwd_grid(M, cfg, sms)
        assert rpp % cfg.ROWS == 0
        assert G * rpp >= M and (G - 1) * rpp < M      # every row owned, no empty program
        assert G <= sms * 16                            # bounded partial-sum rows


# ---- torch.compile and the custom-op registration ----

def test_opcheck_custom_ops():
    """torch.library.opcheck: schema, fake (meta) kernel vs real, autograd registration."""
    import minillm.kernels.layernorm as ln
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    r = torch.randn(5, 33, requires_grad=True)
    torch.library.opcheck(ln._norm_fwd_op, (x, w, b, r, 1e-5, False))
    torch.library.opcheck(ln._norm_fwd_op, (x, None, None, None, 1e-6, True))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_torch_compile_fullgraph_matches_eager(kind):
    torch._dynamo.reset()
    N = 48
    w = torch.randn(N, requires_grad=True)
    b = torch.randn(N, requires_grad=True) if kind == "layer" else None

    def block(x, res):
        # a pre-norm residual step: fused add+norm, a pointwise op, a plain norm
        if kind == "layer":
            y, h = add_layer_norm(x, res, w, b)
            return layer_norm(torch.tanh(y) + h, w, b)
        y, h = add_rms_norm(x, res, w)
        return rms_norm(torch.tanh(y) + h, w)

    # fullgraph=True fails on any graph break. aot_eager traces forward and backward through the
    # fake kernels and the registered autograd exactly as inductor does, without C++ compilation.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 7, N)
    res = torch.randn(3, 7, N)
    outs, grads = [], []
    for fn in (block, compiled):
        xs, rs = x.clone().requires_grad_(), res.clone().requires_grad_()
        for p in (w, b):
            if p is not None:
                p.grad = None
        out = fn(xs, rs)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (xs, rs, w) + ((b,) if b is not None else ())])
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-6)
    for g_eager, g_comp in zip(*grads):
        assert torch.allclose(g_eager, g_comp, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    """Same as above through Inductor (C++ codegen for the surrounding ops: ~20 s on 2 cores)."""
    torch._dynamo.reset()
    w = torch.randn(48, requires_grad=True)

    def block(x, res):
        y, h = add_rms_norm(x, res, w)
        return rms_norm(torch.tanh(y) + h, w)

    compiled = torch.compile(block, fullgraph=True)
    x, res = torch.randn(3, 7, 48), torch.randn(3, 7, 48)
    results = []
    for fn in (block, compiled):
        xs = x.clone().requires_grad_()
        w.grad = None
        out = fn(xs, res)
        out.pow(2).sum().backward()
        results.append((out.detach(), xs.grad, w.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# ---- GPU tier: bf16, compiled kernels (skips without CUDA) ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N", [768, 1000, 4096, 5120, 16384])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_bf16_on_gpu(kind, N):
    # bf16 keeps 8 mantissa bits (u = 2^-8 = 3.9e-3): y is rounded once on output, so |err| <= ~1 ulp
    # of |y| <= ~5; dx/dw carry one rounding of inputs/outputs plus fp32 sums -> 2e-2 relative scale.
    torch.manual_seed(0)
    M = 4099
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16, requires_grad=True) if kind == "layer" else None
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    y = layer_norm(x, w, b) if kind == "layer" else rms_norm(x, w)
    y.backward(dy)
    got = [y, x.grad, w.grad] + ([b.grad] if b is not None else [])
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    br = b.detach().float().requires_grad_() if b is not None else None
    yr = layer_norm_ref(xr, wr, br) if kind == "layer" else rms_norm_ref(xr, wr)
    yr.backward(dy.float())
    want = [yr, xr.grad, wr.grad] + ([br.grad] if br is not None else [])
    for name, a, r in zip(("y", "dx", "dw", "db"), got, want):
        scale = max(1.0, r.abs().max().item())
        err = (a.float() - r).abs().max().item()
        assert err <= 2e-2 * scale, f"{name}: {err} > {2e-2 * scale}"


# ---- the benchmark script's CPU path (not a timing test: it checks the script works end to end) ----

def test_bench_norm_quick_runs_on_cpu(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_norm.py", "--quick", "--out-dir", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads((tmp_path / "bench_norm.json").read_text())
    rows = payload["rows"]
    assert {(r["norm"], r["dir"]) for r in rows} == {(k, d) for k in ("layer", "rms") for d in ("fwd", "bwd")}
    assert all(r["GB/s"] > 0 and r["ms"] > 0 for r in rows)
    assert payload["environment"]["device_type"] == "cpu"

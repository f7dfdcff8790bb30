"""The dispatch door: backend choice, and the model on Triton kernels (interpreter) equals torch."""
from pathlib import Path

import pytest
import torch

from minillm import ops
from minillm.config import ModelConfig
from minillm.model import GPT


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    ops.configure("torch", "cpu")


def test_auto_picks_torch_on_cpu_and_forcing_triton_loads_kernels():
    assert ops.configure("auto", "cpu") == "torch"
    assert ops.configure("triton", "cpu") == "triton"   # under TRITON_INTERPRET=1 (conftest)
    assert ops.backend() == "triton"


def test_kernels_load_as_minillm_kernels_and_never_as_top_level_kernels():
    """The kernels are minillm.kernels (this checkout's kernels/ folder here, where tests run from the
    source tree). The name `kernels` belongs to Hugging Face's kernel hub: no module of ours may sit
    under it, or a process holding both would load one file twice (and register its custom ops
    twice) or hand the hub's users our folder."""
    import sys

    import minillm.kernels
    import minillm.kernels.layernorm

    root = Path(__file__).resolve().parent.parent
    assert ops.configure("triton", "cpu") == "triton"
    assert Path(minillm.kernels.__file__).resolve().parent == root / "kernels"
    assert {fn.__module__ for fn in ops._kernels.values()} == {"minillm.kernels.layernorm",
                                                               "minillm.kernels.attention"}
    assert minillm.kernels.layernorm.rms_norm is ops._kernels["rms_norm"]
    ours = root / "kernels"
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if file and Path(file).resolve().is_relative_to(ours):
            assert name == "minillm.kernels" or name.startswith("minillm.kernels."), \
                f"{name} loaded from {file}: our kernels imported under a second name"


@pytest.mark.parametrize("norm,pos,n_kv_head,bias", [("rmsnorm", "rope", 2, False), ("layernorm", "learned", 4, True)])
def test_model_on_triton_kernels_matches_torch(norm, pos, n_kv_head, bias):
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, block_size=32,
                      norm=norm, pos=pos, bias=bias, qk_norm=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx, tgt = torch.randint(0, 50, (2, 19)), torch.randint(0, 50, (2, 19))  # T=19: partial blocks

    def run(backend):
        ops.configure(backend, "cpu")
        model.zero_grad()
        logits, loss = model(idx, tgt)
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = run("torch")
    tri_logits, tri_grads = run("triton")
    # fp32 kernels vs fp32 torch: both a few ulps from exact; 1e-4 relative leaves room for the
    # different summation orders (online softmax, blocked reductions) and nothing more.
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, g in ref_grads.items():
        torch.testing.assert_close(tri_grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("norm,bias", [("layernorm", True), ("rmsnorm", False)])
def test_fused_residual_norms_equal_the_unfused_kernels_bitwise(norm, bias, monkeypatch):
    """The model on the Triton path calls the fused add+norm kernel for every norm that follows a
    residual add (2 per block: norm2, then the next block's norm1 or the final norm) and gets bitwise
    what add-then-norm kernels give (ops without its add_* kernels). Bitwise holds in fp32: the kernel's
    h = x + r is one fp32 rounding like torch's add, and its dx + dh (the gradient reaching the residual
    stream) is one fp32 add like autograd's sum of the two paths."""
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32,
                      norm=norm, bias=bias, pos="rope")
    torch.manual_seed(0)
    model = GPT(cfg)
    idx, tgt = torch.randint(0, 50, (2, 19)), torch.randint(0, 50, (2, 19))
    ops.configure("triton", "cpu")
    monkeypatch.delitem(ops._kernels, "attention")  # SDPA: the norms are under test, and it is faster
    fused = "add_layer_norm" if norm == "layernorm" else "add_rms_norm"
    calls = []
    kernel = ops._kernels[fused]
    monkeypatch.setitem(ops._kernels, fused, lambda *a: calls.append(1) or kernel(*a))

    def run():
        model.zero_grad()
        logits, loss = model(idx, tgt)
        loss.backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    with_fusion = run()
    assert len(calls) == 2 * cfg.n_layer
    monkeypatch.delitem(ops._kernels, fused)
    without = run()
    assert len(calls) == 2 * cfg.n_layer
    for name, a, b in zip(["logits"] + [n for n, _ in model.named_parameters()], with_fusion, without):
        assert torch.equal(a, b), name


class _Like:
    """What triton_serves_attention reads of a tensor: shape, dtype, device (a CUDA tensor cannot exist here)."""

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)


@pytest.mark.parametrize("dtype, device, tq, d, served", [
    (torch.bfloat16, "cuda", 64, 64, True), (torch.float16, "cuda", 64, 128, True),
    (torch.float32, "cuda", 64, 64, False),                 # no fp32 configuration is built for CUDA
    (torch.float32, "cpu", 64, 64, True),                   # the interpreter tier's reference dtype
    (torch.bfloat16, "cuda", 1, 64, False),                 # a KV-cache step: Tq != Tk
    (torch.bfloat16, "cuda", 64, 256, False),               # head dim over 128
])
def test_which_attention_calls_the_triton_kernel_takes(dtype, device, tq, d, served):
    q, k = _Like((2, 4, tq, d), dtype, device), _Like((2, 4, 64, d), dtype, device)
    assert ops.triton_serves_attention(q, k) is served


def _top_level_kernels(cwd: Path, extra_path: str = "") -> str:
    """What `import kernels` gives a process started at ``cwd`` (sys.path[0] = cwd, as python -m ...)."""
    import os
    import subprocess
    import sys

    code = ("import kernels, sys\n"
            "try:\n    import kernels.layernorm\n    sub = 'loaded'\nexcept ImportError:\n    sub = 'none'\n"
            "print(getattr(kernels, 'WHO', 'stand-in'), kernels.__file__, list(kernels.__path__), sub)")
    env = {**os.environ, "PYTHONPATH": extra_path}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_the_top_level_name_kernels_is_never_ours(tmp_path):
    """From a checkout's root, `import kernels` (transformers probes for Hugging Face's kernel hub) finds
    our folder first on sys.path: it must hand over to the hub's package when one is installed, and be an
    empty stand-in otherwise, through which none of our modules loads a second time."""
    root = Path(__file__).resolve().parent.parent
    assert _top_level_kernels(root) == "stand-in None [] none"
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("WHO = 'hub'\n")
    out = _top_level_kernels(root, str(tmp_path / "site"))
    assert out == f"hub {hub / '__init__.py'} ['{hub}'] none"

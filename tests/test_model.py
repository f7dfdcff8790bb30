"""The GPT: preset shapes and counts, causality, every option combination, KV cache, learning."""
import itertools
from pathlib import Path

import pytest
import torch

from conftest import model_preset

from minillm.config import ModelConfig
from minillm.model import GPT, apply_rope, rope_tables

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


def preset(name: str, **overrides) -> ModelConfig:
    return model_preset(name, **overrides)


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16)
    return ModelConfig(**{**base, **kw})


def test_gpt2_small_matches_gpt2_parameter_count():
    # GPT-2 124M: 124,439,808 parameters with its 50257-token vocabulary (wte tied to lm_head).
    with torch.device("meta"):
        model = GPT(preset("gpt2-small", vocab_size=50257))
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768


def test_presets_have_the_documented_shapes():
    with torch.device("meta"):
        llama = GPT(preset("llama-small", vocab_size=32000))
        tiny = GPT(preset("tiny", vocab_size=1024))
    attn = llama.blocks[0].attn
    assert attn.qkv.weight.shape == ((12 + 2 * 4) * 64, 768)   # GQA: 4 kv heads of 64
    assert llama.lm_head.weight is not llama.tok_emb.weight    # untied
    assert llama.blocks[0].mlp.fc.weight.shape == (2 * 2048, 768)  # SwiGLU hidden 8/3*768 -> 2048
    assert tiny.lm_head.weight is tiny.tok_emb.weight
    assert len(tiny.blocks) == 4 and tiny.cfg.n_embd == 128


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(small(n_layer=8, n_embd=256, n_head=4, n_kv_head=4))
    std_proj = model.blocks[0].attn.proj.weight.std().item()
    std_qkv = model.blocks[0].attn.qkv.weight.std().item()
    assert std_qkv == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / 4.0, rel=0.05)   # 0.02 / sqrt(2 * 8)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_future_tokens_never_change_past_logits(pos):
    torch.manual_seed(0)
    model = GPT(small(pos=pos)).eval()
    idx = torch.randint(0, 61, (2, 16))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 61
    logits2, _ = model(changed)
    assert torch.equal(logits[:, :10], logits2[:, :10])
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])


OPTIONS = list(itertools.product(["layernorm", "rmsnorm"], ["learned", "rope"], ["gelu", "swiglu"],
                                 [4, 2, 1], [True, False], [True, False], [True, False]))


@pytest.mark.parametrize("norm,pos,mlp,n_kv_head,tie,bias,qk_norm", OPTIONS)
def test_every_option_combination_runs_forward_and_backward(norm, pos, mlp, n_kv_head, tie, bias, qk_norm):
    torch.manual_seed(0)
    cfg = small(norm=norm, pos=pos, mlp=mlp, n_kv_head=n_kv_head, tie_embeddings=tie, bias=bias,
                qk_norm=qk_norm, dropout=0.1, n_layer=1)
    model = GPT(cfg)
    idx, targets = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 61)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(torch.log(torch.tensor(61.0)).item(), abs=0.5)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model = GPT(small(dropout=0.0))
    idx = torch.randint(0, 61, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.2


def test_per_token_loss_matches_mean_and_ignores_minus_one():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    idx = torch.randint(0, 61, (2, 16))
    y = idx.clone()
    y[1, 8:] = -1
    _, per_tok = model(idx, y, reduction="none")
    _, mean = model(idx, y)
    assert per_tok.shape == (2, 16) and torch.all(per_tok[1, 8:] == 0)
    assert torch.allclose(per_tok[y >= 0].mean(), mean)


def test_gelu_approximate_option():
    """mlp=gelu with gelu_approximate=none is the exact erf GELU (nanoGPT's); tanh stays the default."""
    import torch.nn.functional as F
    from minillm.model import MLP
    assert ModelConfig().gelu_approximate == "tanh"
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    for approx in ("none", "tanh"):
        mlp = MLP(ModelConfig(n_embd=16, n_head=2, mlp="gelu", gelu_approximate=approx))
        want = mlp.proj(F.gelu(mlp.fc(x), approximate=approx))
        torch.testing.assert_close(mlp(x), want)
    exact = MLP(ModelConfig(n_embd=16, n_head=2, mlp="gelu", gelu_approximate="none"))
    h = exact.fc(x)
    torch.testing.assert_close(exact(x), exact.proj(0.5 * h * (1 + torch.erf(h / 2 ** 0.5))))


def _rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x (B, T, H, D) rotated for positions 0..T-1."""
    cos, sin = rope_tables(x.size(-1), x.size(1), theta)
    return apply_rope(x, cos, sin)


def test_rope_keeps_the_norm_of_every_head_vector():
    """RoPE is a rotation: each (b, t, h) head vector keeps its length."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 3, 16)
    y = _rope(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y[:, 1:], x[:, 1:], atol=1e-3)  # and it does rotate past position 0


def test_rope_scores_depend_only_on_the_offset_between_positions():
    """rotate(q at p+s) . rotate(k at p) is the same for every p, and changes with s."""
    torch.manual_seed(0)
    D, n_pos = 16, 96
    q, k = torch.randn(D), torch.randn(D)
    rq = _rope(q.expand(1, n_pos, 1, D).contiguous())[0, :, 0]  # (n_pos, D): q placed at every position
    rk = _rope(k.expand(1, n_pos, 1, D).contiguous())[0, :, 0]
    by_offset = {}
    for s in (0, 1, 5, 17):
        scores = torch.stack([rq[p + s] @ rk[p] for p in (0, 3, 10, 40, 71)])
        torch.testing.assert_close(scores, scores[0].expand_as(scores), rtol=1e-5, atol=1e-4)
        by_offset[s] = scores[0].item()
    assert by_offset[0] == pytest.approx((q @ k).item(), abs=1e-4)  # offset 0: the plain dot product
    assert len({round(v, 3) for v in by_offset.values()}) == 4    # non-trivial: each offset scores differently


@pytest.mark.parametrize("D,theta", [(8, 500.0), (64, 10000.0)])
def test_rope_equals_the_complex_number_reference(D, theta):
    """Pair (x[i], x[i + D/2]) is multiplied by exp(1j * p * theta^(-2i/D)) (GPT-NeoX/Llama halves)."""
    torch.manual_seed(0)
    T, H = 50, 2
    x = torch.randn(1, T, H, D, dtype=torch.float64)
    i = torch.arange(D // 2, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2 * i / D)    # (T, D/2)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(angle), angle)[None, :, None]
    want = torch.cat((z.real, z.imag), dim=-1)
    cos, sin = rope_tables(D, T, theta)
    torch.testing.assert_close(cos.double(), angle.cos(), rtol=0, atol=1e-7)
    torch.testing.assert_close(sin.double(), angle.sin(), rtol=0, atol=1e-7)
    got = apply_rope(x, cos, sin)  # computes in float32, returns x's dtype
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)


def test_per_token_loss_equals_the_log_softmax_reference():
    """reduction="none" is -log_softmax(logits)[target] per position (0 where ignored); the mean is over kept ones."""
    torch.manual_seed(0)
    model = GPT(small()).eval()
    idx = torch.randint(0, 61, (2, 16))
    y = torch.randint(0, 61, (2, 16))
    y[0, :3], y[1, 10:] = -1, -1
    logits, per_tok = model(idx, y, reduction="none")
    _, mean = model(idx, y)
    keep = y >= 0
    logp = torch.log_softmax(logits.double(), dim=-1)
    want = torch.where(keep, -logp.gather(-1, y.clamp(min=0)[..., None])[..., 0], torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(per_tok.double(), want, rtol=1e-5, atol=1e-5)
    assert mean.item() == pytest.approx(want[keep].sum().item() / keep.sum().item(), rel=1e-5)


def _unfused_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The pre-norm forward written as add, then norm (what GPT.forward was before its adds moved into
    Norm.add): the torch path must give these logits and gradients bit for bit."""
    T = idx.shape[1]
    x = model.tok_emb(idx)
    rope = None
    if model.pos_emb is not None:
        x = x + model.pos_emb(torch.arange(T))
    else:
        rope = (model.rope_cos[:T], model.rope_sin[:T])
    for i, block in enumerate(model.blocks):
        x = x + block.attn(block.norm1(x), rope, None, i)
        x = x + block.mlp(block.norm2(x))
    return model.lm_head(model.norm_f(x))


@pytest.mark.parametrize("norm,pos,bias", [("layernorm", "learned", True), ("rmsnorm", "rope", False)])
def test_torch_path_equals_add_then_norm_bitwise(norm, pos, bias):
    """CPU training is unchanged by the fused residual norms: same logits and gradients, bitwise (the
    checkpoint/resume tests compare runs bitwise, and old runs must resume identically)."""
    torch.manual_seed(0)
    model = GPT(small(norm=norm, pos=pos, bias=bias, qk_norm=True))
    idx = torch.randint(0, 61, (2, 16))
    results = []
    for forward in (lambda: model(idx)[0], lambda: _unfused_forward(model, idx)):
        model.zero_grad()
        logits = forward()
        (logits * torch.linspace(-1, 1, 61)).sum().backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)

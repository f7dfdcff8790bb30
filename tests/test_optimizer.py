"""The optimizer (minillm/optimizer.py): Muon's update as torch.optim.Muon applies it, the split of the
model's parameters between Muon and AdamW, and the combined optimizer's state."""
import pytest
import torch

from minillm.config import ConfigError, ModelConfig, OptimConfig
from minillm.model import GPT
from minillm.optimizer import CombinedOptimizer, build_optimizer

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Jordan et al. (2024)


def newton_schulz_ref(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration in float64: X <- aX + (b XX^T + c (XX^T)^2) X on the wide
    orientation, after scaling X to Frobenius norm 1."""
    a, b, c = NS_COEFFS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(8, 4), (4, 8)])
def test_muon_first_step_is_the_scaled_orthogonalised_gradient(shape):
    """Step 1 moves W by lr * sqrt(max(1, rows/cols)) * NS5(gradient) (Nesterov: the first update's
    direction is the gradient's); torch computes NS5 in bf16, hence the tolerance."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    w0 = w.detach().clone()
    w.grad = torch.randn(shape)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(shape[1], shape[0], bias=False)])
    model.blocks[0].weight = w
    model.norm = torch.nn.Parameter(torch.ones(3))  # AdamW's share
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.1, muon_momentum=0.9),
                          torch.device("cpu"))
    opt.optimizers["muon"].param_groups[0]["lr"] = 0.1
    opt.step()
    delta = (w0 - w.detach()).double()
    want = 0.1 * max(1.0, shape[0] / shape[1]) ** 0.5 * newton_schulz_ref(w.grad)
    cos = (delta * want).sum() / (delta.norm() * want.norm())
    assert cos > 0.999 and delta.norm() / want.norm() == pytest.approx(1.0, rel=0.05)


def test_build_optimizer_splits_parameters_and_trains():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16))
    cfg = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, CombinedOptimizer) and isinstance(opt.optimizers["muon"], torch.optim.Muon)
    in_muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    in_adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert id(model.tok_emb.weight) in in_adamw and id(model.tok_emb.weight) not in in_muon
    assert id(model.blocks[0].attn.qkv.weight) in in_muon
    assert not in_muon & in_adamw and len(in_muon | in_adamw) == len(list(model.parameters()))
    assert all(g.get("lr_mult") == pytest.approx(0.02 / 3e-3) for g in opt.optimizers["muon"].param_groups)

    x = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(30):
        _, loss = model(x, x)  # learn the identity map: a quick, certain loss drop
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

    state = opt.state_dict()
    assert set(state) == {"adamw", "muon"}
    fresh = build_optimizer(model, cfg, torch.device("cpu"))
    fresh.load_state_dict(state)
    buf = fresh.optimizers["muon"].state[model.blocks[0].attn.qkv.weight]["momentum_buffer"]
    torch.testing.assert_close(buf, opt.optimizers["muon"].state[model.blocks[0].attn.qkv.weight]["momentum_buffer"])


def test_adamw_stays_the_default_and_fused_is_configurable():
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=32, block_size=16))
    opt = build_optimizer(model, OptimConfig(fused=True), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True


@pytest.mark.parametrize("kw, key", [({"name": "sgd"}, "optim.name"), ({"muon_momentum": 1.0}, "optim.muon_momentum"),
                                     ({"muon_ns_steps": 0}, "optim.muon_ns_steps")])
def test_optim_config_validation(kw, key):
    with pytest.raises(ConfigError, match=key):
        OptimConfig(**kw)

"""Muon (minillm/muon.py): the orthogonalisation, the update rule, and its wiring into the trainer."""
import pytest
import torch

from minillm import muon
from minillm.config import ConfigError, ModelConfig, OptimConfig
from minillm.model import GPT
from minillm.trainer import build_optimizer


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (5, 3)])
def test_newton_schulz_pushes_singular_values_towards_one(shape):
    torch.manual_seed(0)
    # a badly conditioned matrix: singular values spread over three orders of magnitude
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    r = min(shape)
    s = torch.logspace(0, -3, r)
    g = u[:, :r] @ torch.diag(s) @ v[:, :r].T
    o = muon.newton_schulz(g, steps=5)
    assert o.shape == g.shape
    sv = torch.linalg.svdvals(o)
    # the quintic maps the larger singular values into ~[0.7, 1.2]; tiny ones grow but need not reach it
    assert sv.max() < 1.25 and sv[: r // 2].min() > 0.5
    # and it keeps the singular vectors: O is close in direction to U V^T
    target = u[:, :r] @ v[:, :r].T
    cos = (o * target).sum() / (o.norm() * target.norm())
    assert cos > 0.9


def test_muon_first_step_is_the_orthogonalised_gradient():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    w0 = w.detach().clone()
    w.grad = torch.randn(8, 4)
    opt = muon.Muon([w], lr=0.1, momentum=0.9, nesterov=True)
    opt.step()
    # first step: buffer = g, nesterov update = g + 0.9 g, whose direction is g's; tall matrix scale sqrt(8/4)
    want = w0 - 0.1 * (8 / 4) ** 0.5 * muon.newton_schulz(1.9 * w.grad)
    torch.testing.assert_close(w.detach(), want)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], w.grad)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="matrices only"):
        muon.Muon([torch.nn.Parameter(torch.zeros(3))])


def test_build_optimizer_splits_parameters_and_trains():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16))
    cfg = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, muon.CombinedOptimizer)
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

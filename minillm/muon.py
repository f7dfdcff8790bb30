"""Muon: momentum SGD whose update for each hidden weight matrix is orthogonalised.

Keller Jordan et al. (2024), "Muon: An optimizer for hidden layers in neural networks"
(kellerjordan.github.io/posts/muon), as used in modded-nanogpt and nanochat. Per 2-D parameter W
(out x in) with gradient G:

    M <- mu * M + G                          momentum buffer
    U <- G + mu * M   (Nesterov)  or  M
    O <- NewtonSchulz5(U)                    ~ the nearest semi-orthogonal matrix, U V^T of U's SVD
    W <- W - lr * max(1, out/in)^0.5 * O

NewtonSchulz5 normalises U by its Frobenius norm (so every singular value is <= 1) and iterates the odd
quintic X <- a X + b (X X^T) X + c (X X^T)^2 X with (a, b, c) = (3.4445, -4.7750, 2.0315), which pushes
every singular value into roughly [0.7, 1.2] within five steps: it does not converge to exactly 1,
which the authors found does not hurt. It works on the wide orientation (rows <= cols) so X X^T is the
smaller Gram matrix.

Muon is for hidden matrices only. Embeddings, the output head, norms and biases keep AdamW; ``build``
splits the model's parameters that way and returns one optimizer object over both.
"""
from __future__ import annotations

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix (same shape out); see the module docstring."""
    assert g.dim() == 2, "newton_schulz takes a matrix"
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T                       # (r, r), r = min(rows, cols)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Group keys: lr, momentum, nesterov, ns_steps, weight_decay (decoupled)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                update = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                o = newton_schulz(update, group["ns_steps"])
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(o, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
        return loss


class CombinedOptimizer:
    """Several optimizers stepped as one: the training loop sees one ``param_groups`` list.

    Each group may carry ``lr_mult``: the loop sets ``group["lr"] = schedule(step) * lr_mult``, so
    one schedule drives AdamW (mult 1) and Muon (mult muon_lr / lr) together.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, expected {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights inside the transformer blocks (not embeddings, not the output head)."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("blocks.")]

"""A GPT-style decoder-only transformer, every architectural choice a config option.

    tokens (B, T) -> token embedding (+ learned positions) -> n_layer x Block -> final norm -> logits
    Block: x = x + attn(norm(x)); x = x + mlp(norm(x))       (pre-norm residual stream)

Options (ModelConfig): norm layernorm|rmsnorm, pos learned|rope, mlp gelu|swiglu, n_kv_head for
GQA/MQA, tie_embeddings, bias, qk_norm, dropout (on embeddings and residual branches). Attention and
norms go through minillm.ops so Triton kernels plug in without touching this file.

Generation reuses past keys/values through a KVCache: prefill the prompt in one forward, then one
token per step (see minillm/generate.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import ops
from minillm.config import ModelConfig


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension, with a learned scale (and bias for layernorm+bias)."""

    def __init__(self, dim: int, kind: str, eps: float, bias: bool = False):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if (bias and kind == "layernorm") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return ops.layer_norm(x, self.weight, self.bias, self.eps)
        return ops.rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, n_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n_pos, head_dim/2): position p rotates pair i by p * theta^(-2i/head_dim).

    RoFormer (Su et al., 2021); pairs are the two halves of the head (the GPT-NeoX/Llama layout).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by the tables cos, sin (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, n_kv_head, max_len, head_dim) each."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0          # tokens already cached
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) after the cached ones; return all keys/values so far."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # One matmul for q, k, v: (C) -> (H + 2*H_kv) * D
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled init, see GPT._init_weights
        self.q_norm = Norm(cfg.head_dim, "rmsnorm", cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = Norm(cfg.head_dim, "rmsnorm", cfg.norm_eps) if cfg.qk_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple | None, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if self.q_norm is not None:  # QK-norm (Dehghani et al., 2023): bounds attention logits
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        causal = True
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            # A prefill starts at position 0 (plain causal); a later call appends one token,
            # which sees every cached key, so it needs no mask.
            assert kv_cache.pos == 0 or T == 1, "KV cache: multi-token calls must start at position 0"
            causal = T > 1
        y = ops.attention(q, k, v, causal=causal)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.approximate = cfg.mlp, cfg.gelu_approximate
        if cfg.mlp == "gelu":
            hidden = cfg.mlp_hidden or 4 * cfg.n_embd
            self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        else:  # SwiGLU (Shazeer, 2020): 2/3 of the 4x width keeps parameters equal to the GELU MLP
            hidden = cfg.mlp_hidden or 64 * math.ceil(8 * cfg.n_embd / 3 / 64)
            self.fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)  # gate and up, fused
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate=self.approximate)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = Norm(cfg.n_embd, cfg.norm, cfg.norm_eps, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = Norm(cfg.n_embd, cfg.norm, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, kv_cache, layer)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is unset: it comes from the tokenizer")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = Norm(cfg.n_embd, cfg.norm, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections into the residual stream scaled by
        # 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops the token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            n -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, reduction: str = "mean"):
        """idx (B, T) -> (logits (B, T, V), loss). loss is None without targets; a scalar for
        reduction="mean", per-token nats (B, T) for "none". Targets of -1 are ignored."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T]) if self.cfg.pos == "rope" else None
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=reduction)
        return logits, (loss.view(B, T) if reduction == "none" else loss)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 * (non-embedding params + lm_head) + attention scores/values.

        Kaplan et al. (2020) / PaLM appendix B: 6N for the matmuls (fwd 2N, bwd 4N), plus
        12 * n_layer * n_embd * T for QK^T and AV at full context (causal halves the useful part;
        counted at full, as PaLM does).
        """
        c = self.cfg
        n = self.num_params(non_embedding=True) + (self.lm_head.weight.numel() if c.tie_embeddings else 0)
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

"""A GPT-style decoder-only transformer, every architectural choice a config option.

    tokens (B, T) -> token embedding (+ learned positions) -> n_layer x Block -> final norm -> logits
    Block: x = x + attn(norm(x)); x = x + mlp(norm(x))       (pre-norm residual stream)

Each residual add is done by the norm that reads its result next (``Norm.add``: one fused kernel on
the Triton path, plain ``x + branch`` then the norm on the torch path), so a Block hands its MLP output
to the next Block (or the final norm) unadded: ``x, branch = block(x, branch, ...)``.

Options (ModelConfig): norm layernorm|rmsnorm, pos learned|rope, mlp gelu|swiglu, n_kv_head for
GQA/MQA, tie_embeddings, bias, qk_norm, dropout (on embeddings and residual branches). Attention and
norms go through minillm.ops so Triton kernels plug in without touching this file.

Generation reuses past keys/values through a KVCache: prefill the prompt in one forward, then one
token per step (see minillm/generation.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import ops
from minillm.config import ModelConfig
from minillm.kv_cache import KVCache


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

    def add(self, x: torch.Tensor, branch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and this norm: (norm(h), h) for h = x + branch (h = x if branch is None)."""
        if self.kind == "layernorm":
            return ops.add_layer_norm(x, branch, self.weight, self.bias, self.eps)
        return ops.add_rms_norm(x, branch, self.weight, self.eps)


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
            cos, sin = rope
            if cos.dim() == 3:  # per-row positions, tables (B, T, D/2): rotate B*T tokens as one row
                cos, sin = cos.flatten(0, 1), sin.flatten(0, 1)
                q = apply_rope(q.reshape(1, B * T, H, D), cos, sin).view(B, T, H, D)
                k = apply_rope(k.reshape(1, B * T, Hkv, D), cos, sin).view(B, T, Hkv, D)
            else:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        mask = None
        if kv_cache is not None:
            mask = kv_cache.attn_mask(T)  # before update: it reads the lengths before these T tokens
            k, v = kv_cache.update(layer, k, v)
        # No cache (training) or a prefill from slot 0: causal. One new token: sees every cached key.
        y = ops.attention(q, k, v, causal=mask is None and T > 1, attn_mask=mask)  # (B, H, T, D)
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

    def forward(self, x: torch.Tensor, branch: torch.Tensor | None, rope, kv_cache: KVCache | None,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C): the residual stream without ``branch``, the previous block's MLP output (None
        in the first block). Returns this block's stream and MLP output, again unadded."""
        h, x = self.norm1.add(x, branch)                                  # x = x + branch; h = norm1(x)
        h, x = self.norm2.add(x, self.attn(h, rope, kv_cache, layer))     # x = x + attn(h); h = norm2(x)
        return x, self.mlp(h)


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
        if module is self.lm_head and self.cfg.tie_embeddings:
            return  # the same tensor as tok_emb.weight: initialised once, as the embedding
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
        reduction="mean", per-token nats (B, T) for "none". Targets of -1 are ignored.
        With a kv_cache, the T tokens of each row continue after that row's cached ones (positions and
        attention per row, see KVCache); without one, every row is positions 0..T-1, causal."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)
        if kv_cache is None:  # positions 0..T-1, shared by every row
            pos = torch.arange(T, device=idx.device)
            rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.cfg.pos == "rope" else None
        else:  # (B, T): each row continues from its own cached length
            pos = kv_cache.positions(T)
            rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.cfg.pos == "rope" else None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x, branch = self.drop(x), None
        for i, block in enumerate(self.blocks):
            x, branch = block(x, branch, rope, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = self.lm_head(self.norm_f.add(x, branch)[0])
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=reduction)
        return logits, (loss.view(B, T) if reduction == "none" else loss)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per matmul weight + 12 * n_layer * n_embd * block_size for attention.

        Kaplan et al. (2020) / PaLM appendix B: a weight costs 2 FLOPs per token forward and 4 backward
        (the lm_head counts even when tied: it is a matmul either way; embedding lookups and norms are
        not matmuls). QK^T and AV cost 2 * T * C each forward per token and layer, 3x for forward and
        backward: counted at full context, as PaLM does (causal masking halves the useful part).
        """
        c = self.cfg
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + 12 * c.n_layer * c.n_embd * c.block_size

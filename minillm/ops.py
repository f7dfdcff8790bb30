"""The one door from the model to kernels.

The model calls ``attention``, ``layer_norm``, ``rms_norm`` and their residual twins
``add_layer_norm`` / ``add_rms_norm`` from here and nothing else. Two backends stand behind them:

* ``torch``: F.scaled_dot_product_attention and F.layer_norm / F.rms_norm. Runs everywhere and is the
  reference the Triton kernels are tested against.
* ``triton``: the fused kernels in ``minillm.kernels`` (the repository's top-level kernels/ folder,
  installed under minillm's name; see pyproject.toml). CUDA; on CPU only under TRITON_INTERPRET=1,
  which is how the tests exercise it.

``configure("auto", device)`` picks Triton on CUDA when the kernels import and the torch path
otherwise; the choice is logged once. A call the Triton kernel cannot serve (attention with a KV
cache, where query and key lengths differ, with an explicit mask, a head dim over 128, or fp32 on CUDA)
falls through to the torch path.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_backend = "torch"
_kernels: dict = {}


def _load_triton_kernels() -> dict:
    """Import the Triton kernels; raises ImportError if triton or a kernel module is missing."""
    found = {}
    from minillm.kernels import layernorm
    for name in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        found[name] = getattr(layernorm, name)
    try:
        from minillm.kernels.attention import flash_attention
        found["attention"] = flash_attention
    except ImportError:
        pass
    return found


def configure(kernels: str, device: torch.device | str) -> str:
    """Choose the backend ("auto" | "torch" | "triton") for ``device``; returns the one chosen."""
    global _backend, _kernels
    device = torch.device(device)
    if kernels not in ("auto", "torch", "triton"):
        raise ValueError(f"kernels={kernels!r}: must be auto, torch or triton")
    if kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        from minillm.config import ConfigError
        raise ConfigError(f"kernels='triton': the Triton kernels need a CUDA device (this run is on "
                          f"{device.type}); use kernels=auto or torch (TRITON_INTERPRET=1 runs them slowly on CPU)")
    if kernels == "torch" or (kernels == "auto" and device.type != "cuda"):
        _backend, _kernels = "torch", {}
        reason = "requested" if kernels == "torch" else f"device is {device.type}"
    else:
        try:
            _kernels = _load_triton_kernels()
            _backend = "triton"
            reason = f"kernels: {', '.join(sorted(_kernels))}"
        except ImportError as e:
            if kernels == "triton":
                raise RuntimeError(f"kernels=triton: the Triton kernels do not import ({e}); "
                                   "install triton or use kernels=torch") from e
            _backend, _kernels = "torch", {}
            reason = f"triton unavailable: {e}"
    log.info("ops backend: %s (%s)", _backend, reason)
    return _backend


def backend() -> str:
    return _backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with H % H_kv == 0.

    ``causal`` aligns the mask to the top-left, so it needs Tq == Tk; with a KV cache the caller
    passes causal=False for a single new query, which may attend to every cached key.
    ``attn_mask`` (bool, broadcastable to (B, H, Tq, Tk), True = may attend) replaces ``causal``;
    it serves a KV cache whose rows hold different lengths and always takes the torch path.
    """
    enable_gqa = q.shape[1] != k.shape[1]
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa)
    fn = _kernels.get("attention")
    if fn is not None and triton_serves_attention(q, k):
        return fn(q, k, v, causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)


def triton_serves_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the Triton attention kernel takes this call: equal query and key lengths, head dim at most
    128, and on CUDA only fp16/bf16, the dtypes whose kernel configurations the build report compiles
    and checks (kernels/build_report.py); fp32 on CUDA goes to SDPA. Under TRITON_INTERPRET=1 (CPU) fp32
    is served: it is the interpreter tier's exact reference dtype."""
    if q.shape[2] != k.shape[2] or q.shape[-1] > 128:
        return False
    return q.device.type != "cuda" or q.dtype in (torch.float16, torch.bfloat16)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    fn = _kernels.get("layer_norm")
    if fn is not None and weight is not None:
        return fn(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    fn = _kernels.get("rms_norm")
    if fn is not None:
        return fn(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_layer_norm(x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(h), h) with h = x + branch: a pre-norm residual add meeting the next norm.

    x is the residual stream (B, T, C), branch a sublayer's output of the same shape (None: h = x). The
    Triton path is one fused kernel (kernels/layernorm.py: reads x and branch, writes h and y; its
    docstring counts the bytes saved); the torch path is the same two steps as unfused code, so it
    equals ``h = x + branch; layer_norm(h)`` bit for bit. The kernel keeps x's dtype for h, so it is
    used only when that is the promoted dtype (under autocast, an fp32 stream plus a bf16 branch).
    """
    fn = _kernels.get("add_layer_norm")
    if branch is not None and fn is not None and weight is not None and _kernel_keeps_dtype(x, branch):
        return fn(x, branch, weight, bias, eps)
    h = x if branch is None else x + branch
    return layer_norm(h, weight, bias, eps), h


def add_rms_norm(x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) with h = x + branch; the RMSNorm twin of ``add_layer_norm`` (see there)."""
    fn = _kernels.get("add_rms_norm")
    if branch is not None and fn is not None and _kernel_keeps_dtype(x, branch):
        return fn(x, branch, weight, eps)
    h = x if branch is None else x + branch
    return rms_norm(h, weight, eps), h


def _kernel_keeps_dtype(x: torch.Tensor, branch: torch.Tensor) -> bool:
    """Whether the fused kernel's h (in x's dtype, same shape) is what ``x + branch`` gives."""
    return x.shape == branch.shape and torch.result_type(x, branch) == x.dtype

"""The build tier's list for kernels/attention.py: every compiled variant the autotuner can pick.

``python -m minillm.kernels.build_report`` compiles each ``KernelSpec`` returned by ``build_specs``
for sm_80 and sm_90 on a CPU machine and fails any that spills, overflows shared memory, or lacks a
PTX feature it requires (wgmma on sm_90, TMA bulk copies for the descriptor forward). The entries
are the kernels of attention.py crossed with the tiles of attention_tiles.py that survive ``prune``.
"""
from __future__ import annotations

import torch

from ._spec import KernelSpec
from .attention import KERNELS
from .attention_tiles import KEY_TILE_KINDS, PART, block_d, prune

HEAD_DIMS = (32, 64, 96, 128)
_TL_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(fn, dtype: torch.dtype) -> tuple[dict[str, str], dict[str, object]]:
    """Signature of one of our kernels as the JIT would specialise it for contiguous-last-dim inputs:
    tensors of ``dtype`` (LSE / DELTA fp32), i32 sizes and strides, fp32 scales, unit head-dim strides
    as constexpr 1 (Triton specialises integer arguments equal to 1 the same way at run time)."""
    t = _TL_TYPES[dtype]
    sig, const = {}, {}
    for name in fn.arg_names:
        if name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name.isupper() and not name.startswith(("HEAD_", "BLOCK_", "CAUSAL", "IEEE")) \
                and name not in ("H", "T", "GROUP", "H_KV", "T_BUCKET"):
            sig[name] = f"*{t}"
        elif name.startswith("stride_") and name.endswith("d"):
            sig[name], const[name] = "constexpr", 1
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, const


def build_specs(head_dims=HEAD_DIMS, dtypes=(torch.bfloat16, torch.float16),
                noncausal_dtypes=(torch.bfloat16,), archs=(80, 90)) -> list[KernelSpec]:
    """One KernelSpec per (kernel, autotune configuration surviving the pruning rule, head dim, dtype,
    causal flag): every compiled variant the autotuner can pick on sm_80 / sm_90.

    Each spec names the architectures whose list keeps it (``KernelSpec.archs``), and the report
    compiles it for those only: the lists are per architecture, so a tile that builds cleanly on sm_90
    but spills on sm_80 is listed for sm_90 alone. Causal variants for every dtype; non-causal ones
    (same tiles, same loop body, one mask fewer) for ``noncausal_dtypes`` only, which keeps the report's
    compile count reasonable: fp16 and bf16 compile to the same register and shared-memory footprint.
    """
    specs = []
    for kind, fn in KERNELS.items():
        for dtype in dtypes:
            elem = torch.tensor([], dtype=dtype).element_size()
            for d in head_dims:
                listed: dict[tuple, list[int]] = {}  # configuration -> the archs that keep it
                for arch in archs:
                    for c in prune(kind, arch, d, elem):
                        listed.setdefault(c[:4], []).append(arch)
                flags = (True, False) if dtype in noncausal_dtypes else (True,)
                for is_causal in flags if kind != "pre" else (None,):
                    for cfg, cfg_archs in listed.items():
                        specs.append(_spec(kind, fn, dtype, d, cfg, is_causal, tuple(cfg_archs)))
                        if kind == "fwd" and 90 in cfg_archs and 90 in archs:
                            # what sm_90 runs by default: K / V through TMA (_tma_wanted); the
                            # pointer variant above is what MINILLM_ATTN_TMA=0 runs there
                            specs.append(_spec(kind, fn, dtype, d, cfg, is_causal, (90,), tma=True))
    return specs


def _spec(kind: str, fn, dtype: torch.dtype, d: int, cfg: tuple, is_causal: bool | None,
          archs: tuple[int, ...], tma: bool = False) -> KernelSpec:
    """The KernelSpec of one configuration (BLOCK_M, BLOCK_N, warps, stages) of one kernel; ``tma``
    (forward only): K and V as tensor descriptors, and the report requires TMA bulk copies in the PTX."""
    bm, bn, warps, stages = cfg
    sig, const = _signature(fn, dtype)
    # ALIGN: the usual case (aligned allocations, strides multiple of 16 B)
    const.update(HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=bm, ALIGN=16)
    label = f"d{d} {_TL_TYPES[dtype]} M{bm}"
    if kind != "pre":
        const.update(BLOCK_N=bn, CAUSAL=is_causal, IEEE=False)
        label += f" N{bn}" + (" causal" if is_causal else " full")
    if kind == "fwd":
        const["TMA"] = tma
    if kind in KEY_TILE_KINDS:
        const["PART"] = PART[kind]
    label += f" w{warps} s{stages}" + (" tma" if tma else "")
    for name in const:
        sig[name] = "constexpr"
    if tma:  # the descriptor type carries the block shape _kv_block_hook sets at run time
        sig["K"] = sig["V"] = f"tensordesc<{_TL_TYPES[dtype]}[1, 1, {bn}, {block_d(d)}]>"
    return KernelSpec(name=f"attn_{kind}", fn=fn, signature=sig, constexprs=const, num_warps=warps,
                      num_stages=stages, label=label, archs=archs, requires=("tma",) if tma else ())

"""What the build report compiles: one entry per (kernel, configuration) the dispatcher can choose.

Each kernel module exposes ``build_specs() -> list[KernelSpec]``; ``python -m minillm.kernels.build_report``
compiles every spec for sm_80 and sm_90 (or for the archs a spec names) without a GPU and reports
registers, spills and shared memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    name: str                      # human label, e.g. "layernorm_fwd"
    fn: Any                        # the @triton.jit function
    signature: dict[str, str]      # arg name -> triton type ("*fp32", "i32", "constexpr", ...)
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""                # the configuration, e.g. "N=4096 BLOCK=4096 bf16"
    # extra triton.compile options (e.g. {"maxnreg": 128, "num_ctas": 1}); num_warps/num_stages above win
    # unless repeated here
    options: dict[str, Any] = field(default_factory=dict)
    # the architectures whose configuration list holds this entry (e.g. (90,) for an sm_90-only tile);
    # the report compiles it for those of its --arch list only. Empty: every arch the report compiles.
    archs: tuple[int, ...] = ()
    # PTX features the build must show, else the report fails it: "wgmma" (Hopper warpgroup MMA),
    # "tma" (bulk tensor copies, cp.async.bulk.tensor). A variant written for a feature that silently
    # compiles without it would otherwise pass as an ordinary kernel.
    requires: tuple[str, ...] = ()

"""Which tiles the attention kernels (kernels/attention.py) run with, and why: the autotune lists per
architecture, the pruning rule, the sequence-length bucket of the autotune key, the shared-memory
model, and the one fixed configuration of the interpreter tier.

Plain data and arithmetic: nothing here launches or compiles a kernel. attention.py's dispatcher
(``_launch``) turns these lists into ``triton.autotune`` candidates; attention_build.py turns every
entry that survives ``prune`` into a build-tier spec, which is how each "max head dim" below was
measured (``python -m minillm.kernels.build_report``; benchmarks/measured/build_report/).

Tiling, pipelining and occupancy (the reasoning behind the lists below; speeds are unmeasured
until run on an H100 / A100, the build tier only proves the configurations compile without spills
and within shared memory; register counts below are from that tier, bf16, causal)
----------------------------------------------------------------------------------
* Forward, sm_90: BLOCK_M = 128 with 8 warps, i.e. two warpgroups of 64 query rows each (wgmma's M
  is 64 per warpgroup), BLOCK_N = 64, 2-3 K/V stages. d128: 187 registers, 129 KB shared memory
  (Q 32 KB + 3 x (K + V) 32 KB), 1 CTA = 8 warps per SM; while one warpgroup does its softmax the
  other's wgmma runs, which is where FA2-style kernels get their overlap without warp
  specialisation. BLOCK_N = 128 (fewer, longer wgmmas, 2 stages) builds cleanly on sm_90 at every
  head dim (build report, causal / non-causal: d64 193-198, d96 238-247, d128 229-253 registers, 0
  spill, 161 KB shared at d >= 96) but spills on sm_80 for d >= 64, so it is in the sm_90 list only:
  each architecture has its own list and the build report compiles each entry for the architectures
  that list it (``KernelSpec.archs``). 4-warp 128-row tiles spill at d >= 96 (acc + S of a 128-row
  tile over 128 threads) and are pruned by head dim.
* Forward, sm_80: mma.sync works on 16-row slices per warp, so 128 x 64 tiles with 8 warps (213
  registers at d128) or 64 x 64 / 64 x 32 with 4 warps, 2-3 stages in 164 KB.
* Backward dK/dV: the key tile is resident and is the M side of all three dots (K Q^T, P^T dO,
  dS^T Q), so wgmma wants BLOCK_N >= 64 and, with 8 warps, >= 128 (a 64-row tile over two
  warpgroups is replicated, not split). dK and dV stay in fp32 registers for the whole sweep
  (2 x 128 x 128 fp32 = 128 registers/thread at 8 warps), which leaves only a narrow streamed query
  tile: BLOCK_M = 16 at d >= 96 (245 registers), 32 at d64, 64 at d32. This kernel is the one most
  likely to miss the 250 TFLOP/s backward goal; the fix would be the FA3 split (dK/dV in two
  warpgroups with register reallocation), which Triton does not expose. Measured alternatives at d128
  (build report, bf16, causal, sm_90): wider query tiles spill (M32 N128 w8: 32 B of stack at 2
  stages, 120 B at 1; M64 N128 w8: 344 B; M64 N64 w4: 584 B), and 16 warps cap registers at 128 and
  spill 304-544 B.
* Backward dK/dV, split (``MINILLM_ATTN_DKDV=split``; the default stays ``fused`` until the GPU tier
  measures it): the same kernel launched twice with a constexpr PART, once for dV alone and once for
  dK alone, each recomputing S = K Q^T (5 dots of the fused kernel's 4, Q and dO streamed twice)
  and each with one fp32 accumulator, so with wider query tiles. Build report, both Tritons, sm_90:
  dV takes 32-row tiles at d >= 96 (227 registers; 64 rows build on 3.9 at 252 registers but spill
  72-80 B on 3.6) and 64 at d64; dK takes 32 rows at d64 and 64 at d32, but at d >= 96 stays at 16
  (32 rows: 234 registers on 3.9, a 32 B spill on 3.6). With the same tiles the split's dK and dV are
  bitwise the fused kernel's (interpreter tier). Whether the wider tiles pay for 1.25x the FLOPs is
  what the GPU suite's minillm-split column measures.
* Backward dQ: the mirror image: 128 resident query rows, 8 warps, key tiles of 32 streamed
  (175 registers at d128), 2-3 stages.
* Preprocess (delta): memory-bound, 128 rows x D per program.
* Pruning rule (``prune``): per configuration a measured maximum head dim (from the build tier), the
  shared-memory estimate against the device's limit, tiles no longer than T rounded up to a power of
  two, and on sm_90 only wgmma-capable shapes (M side >= 64, warps multiple of 4). Never empty.
  The autotuner (key: ``t_bucket(T)``, T rounded up to a power of two, head dim, causal, alignment,
  dtypes) then times what survives, once per bucket: the kernels still get the exact T.
* Under the interpreter (tests) and when ``MINILLM_ATTN_FIXED=1``, one fixed small configuration
  (32 x 16 tiles; 16 x 32 for dK/dV) is used so several full and partial tiles are exercised at
  small T.
"""
from __future__ import annotations

import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages, max head dim). BLOCK_M is always the query tile, BLOCK_N
# the key tile. "max head dim" is measured, not estimated: the largest head dim for which the build tier
# (python -m minillm.kernels.build_report, run with Triton 3.9 and 3.6: benchmarks/measured/build_report/)
# compiles this configuration with 0 spill bytes for the architecture whose list holds it
# (attention_build.build_specs gives each entry the archs that list it; an entry in both lists must
# build on both, and has one maximum per list). Register use in Triton's output is
# well above the naive count of accumulator tiles (e.g. dK/dV with a 64-row key tile and 4 warps spill
# at d128 although 2 x 64 x 128 fp32 is "only" 128 registers/thread), so an estimate would lie.
Cfg = tuple[int, int, int, int, int]
CONFIGS: dict[str, dict[int, list[Cfg]]] = {
    "fwd": {
        # 8 warps = 2 warpgroups x 64 rows of wgmma; K/V double or triple buffered
        90: [(128, 64, 8, 3, 128), (128, 64, 8, 2, 128), (128, 32, 8, 3, 128), (64, 64, 4, 3, 128),
             (128, 128, 8, 2, 128)],
        # mma.sync: 16 query rows per warp, smaller key tiles to keep S + acc in registers
        80: [(128, 64, 8, 2, 128), (128, 32, 8, 3, 128), (64, 64, 4, 3, 128), (64, 32, 4, 3, 128),
             (128, 32, 4, 3, 64), (128, 64, 4, 3, 32)],
    },
    "dkdv": {  # the key tile (BLOCK_N) is resident and is the M side of every dot
        90: [(16, 128, 8, 2, 128), (32, 128, 8, 2, 64), (32, 128, 8, 3, 64), (32, 64, 4, 3, 64),
             (64, 128, 8, 2, 32)],
        # (32, 64, 4, 3) stops at d32 on sm_80: at d64 it needs 255 registers and Triton 3.6 spills 32 B
        80: [(16, 128, 8, 2, 128), (32, 128, 8, 2, 64), (32, 64, 4, 3, 32), (16, 64, 4, 3, 64),
             (64, 64, 4, 2, 32)],
    },
    # The split (MINILLM_ATTN_DKDV=split): dV alone and dK alone, each recomputing P, with the wider
    # query tiles the fused kernel cannot hold (its dK + dV accumulators take 128 registers at d128).
    # Maxima spill-free with both Triton 3.6 and 3.9. dV: 32-row tiles at d >= 96 on sm_90 (64 rows
    # spill 72-80 B on 3.6). dK at d >= 96 stays at 16 rows: 32 rows spill 32 B on 3.6 (234 registers,
    # 0 spill, on 3.9), so on the GPU machine's Triton only the dV half is wider there.
    "dv": {
        90: [(32, 128, 8, 2, 128), (64, 128, 8, 2, 64), (64, 64, 4, 3, 32)],
        80: [(16, 128, 8, 2, 128), (32, 128, 8, 2, 64), (32, 64, 4, 3, 32), (64, 64, 4, 2, 32)],
    },
    "dk": {
        90: [(16, 128, 8, 2, 128), (32, 128, 8, 2, 64), (32, 64, 4, 3, 64), (64, 128, 8, 2, 32)],
        80: [(16, 128, 8, 2, 128), (32, 128, 8, 2, 64), (16, 64, 4, 3, 64)],
    },
    "dq": {  # the query tile is resident, key tiles streamed
        90: [(128, 32, 8, 2, 128), (128, 32, 8, 3, 128), (128, 64, 8, 2, 64), (64, 64, 4, 3, 128)],
        80: [(128, 32, 8, 2, 128), (64, 32, 4, 3, 128), (128, 16, 8, 3, 128), (64, 64, 4, 2, 128)],
    },
    "pre": {90: [(128, 0, 4, 1, 128)], 80: [(128, 0, 4, 1, 128)]},
}
# One small configuration for the interpreter tier (and MINILLM_ATTN_FIXED=1): BLOCK_M != BLOCK_N on
# purpose, so the tile-boundary arithmetic is exercised in its general form.
FIXED: dict[str, Cfg] = {
    "fwd": (32, 16, 4, 1, 128), "dkdv": (16, 32, 4, 1, 128), "dq": (32, 16, 4, 1, 128),
    "pre": (32, 0, 4, 1, 128), "dv": (16, 32, 4, 1, 128), "dk": (16, 32, 4, 1, 128),
}
# The kernels whose resident tile is the key tile (BLOCK_N): the fused dK/dV kernel and its two halves,
# one program of _attn_bwd_dkdv each, told apart by PART.
KEY_TILE_KINDS = ("dkdv", "dv", "dk")
PART = {"dkdv": 0, "dv": 1, "dk": 2}
SMEM_BYTES = {80: 166912, 90: 232448}  # per-block opt-in maximum (A100: 163 KB, H100: 227 KB)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def t_bucket(T: int) -> int:
    """The autotuner's key for sequence length T: T rounded up to a power of two, at least 16.

    The kernels receive the exact T (masks, loop bounds); only the choice of tiles is shared across a
    bucket, so a run whose T varies (packed documents, evaluation at other lengths) tunes once per
    power of two instead of once per T. The pruning rule depends on T only through this bucket (tiles
    no longer than it), so one tuning entry serves every T of the bucket with the same candidates.
    Within a bucket the tile counts per row differ by at most 2x; the best tile is expected to agree
    (an assumption the GPU tier can measure, not a proof). Always a multiple of 16, so Triton's
    integer specialisation of the T_BUCKET argument (divisible by 16, equal to 1) is the same for every
    bucket and adds no compiled variants."""
    return max(16, triton.next_power_of_2(T))


# Shared memory Triton allocates beyond the tiles counted by smem_estimate (the async pipeline's mbarriers,
# reduction and layout-conversion scratch), measured by the build report for every listed bf16
# configuration at d64 and d128: on sm_90 1.0-2.0 KB over the tile count (4 KB bounds it); on sm_80 the
# tile count is itself 3-32 KB above the measurement (Q stays in registers there), so nothing is added.
SMEM_OVERHEAD = {80: 0, 90: 4096}


def smem_estimate(kind: str, cfg: Cfg, head_dim: int, elem: int, arch: int = 90) -> int:
    """Shared memory (bytes) of one configuration, an upper bound of what the build report measures:
    resident tiles + streamed tiles x stages + Triton's own (SMEM_OVERHEAD[arch])."""
    bm, bn, _, stages, _ = cfg
    bd = block_d(head_dim)
    if kind == "fwd":    # Q resident, K and V streamed
        tiles = bm * bd + stages * 2 * bn * bd
    elif kind in KEY_TILE_KINDS:   # K, V resident, Q and dO streamed (dV alone: an upper bound)
        tiles = 2 * bn * bd + stages * 2 * bm * bd
    elif kind == "dq":     # Q, dO resident, K and V streamed
        tiles = 2 * bm * bd + stages * 2 * bn * bd
    else:
        tiles = 2 * bm * bd
    return elem * tiles + SMEM_OVERHEAD[arch]


def prune(kind: str, arch: int, head_dim: int, elem: int, T: int | None = None,
          configs: list[Cfg] | None = None, smem_limit: int | None = None) -> list[Cfg]:
    """The pruning rule. Drop a configuration when
      * head_dim exceeds its measured spill-free maximum (see CONFIGS),
      * its estimated shared memory exceeds the SM's (``smem_limit``: the device's opt-in maximum at
        run time, e.g. 99 KB on sm_86/sm_89, which use the sm_80 list; SMEM_BYTES[arch] otherwise),
      * T is known and a tile is longer than ``t_bucket(T)`` (T rounded up to a power of two: a short
        sequence would only compute padding; the next smaller tile does the same work with less waste),
      * on sm_90 with fp16/bf16 it could not use wgmma (M side < 64 rows or warps not a multiple of 4).
    Never returns an empty list (falls back to the configuration with the least shared memory)."""
    configs = list(CONFIGS[kind][arch] if configs is None else configs)
    keep = []
    for cfg in configs:
        bm, bn, warps, _, max_d = cfg
        if head_dim > max_d or smem_estimate(kind, cfg, head_dim, elem, arch) > (smem_limit or SMEM_BYTES[arch]):
            continue
        if T is not None and kind != "pre":
            t_cap = t_bucket(T)
            if bm > t_cap or bn > t_cap:
                continue
        if arch >= 90 and elem == 2 and kind != "pre":
            m_side = bn if kind in KEY_TILE_KINDS else bm
            if warps % 4 or m_side < 64:
                continue
        keep.append(cfg)
    if keep:
        return keep
    fits = [c for c in configs if head_dim <= c[4]] or configs
    return [min(fits, key=lambda c: smem_estimate(kind, c, head_dim, elem, arch))]

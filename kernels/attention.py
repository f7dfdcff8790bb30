"""Fused causal flash attention (FlashAttention-2) in Triton: forward, backward, GQA, any length.

Contract
--------
``flash_attention(q, k, v, causal=True, softmax_scale=None)`` with q (B, H, T, D) and k, v
(B, H_kv, T, D), ``H % H_kv == 0``, returns softmax(q k^T * scale [+ causal mask]) v of shape
(B, H, T, D): a drop-in for ``F.scaled_dot_product_attention(q, k, v, is_causal=causal,
enable_gqa=True)``. Any B, H, T >= 1; head dims up to 128 (32, 64, 96, 128 are the tuned ones);
fp16 / bf16 (fp32 works too, with IEEE-exact dots; it is what the interpreter tier tests); any
strides (no ``.contiguous()`` copy is made of q, k, v or of the incoming gradient). It is a
registered torch custom op (``minillm::flash_attn_fwd`` / ``minillm::flash_attn_bwd``) with a fake
(meta) implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` sees one opaque
node and no graph break. ``attention_ref`` is the plain-torch reference the tests compare against.

The algorithm (Dao 2023, "FlashAttention-2", Algorithms 1 and 2)
---------------------------------------------------------------
Forward. One program owns a query tile Q_i (BLOCK_M rows of one (batch, head)) and streams the key /
value tiles K_j, V_j (BLOCK_N rows) past it, keeping in registers only the running row maximum m,
the running denominator l and the un-normalised output acc (all fp32):

    S = Q_i K_j^T * scale * log2(e)          (log2 domain: exp2 maps to the MUFU ex2 instruction;
                                              log2(e) is folded into the scale once)
    m' = max(m, rowmax(S));  P = exp2(S - m');  alpha = exp2(m - m')
    l = alpha * l + rowsum(P);  acc = alpha * acc + P V_j;  m = m'

and finally O_i = acc / l and LSE_i = m + log2(l) (kept in the log2 domain, fp32, (B, H, T)), which
is all the backward needs to rebuild P. No T x T tensor exists anywhere, forward or backward.

Backward. delta_i = rowsum(dO_i * O_i) is computed first by a small kernel (it equals
rowsum(P * dP), the term of the softmax Jacobian). Then, with P = exp2(S - LSE):

    dV_j = sum_i P^T dO_i      dP = dO_i V_j^T      dS = P * (dP - delta_i)
    dK_j = scale * sum_i dS^T Q_i                   dQ_i = scale * sum_j dS K_j

Two kernels, both without atomics and therefore deterministic (the order of every floating point
sum is fixed by the loop structure, not by scheduling):
  * ``_attn_bwd_dkdv``: one program per key tile of one *kv* head; it loops over the GROUP query heads
    that share this kv head and, inside, over the query tiles that can see the key tile. dK and dV
    stay in fp32 registers for the whole sweep and are written once. This is how GQA/MQA reduces
    over the group without repeating K/V in memory and without atomics.
  * ``_attn_bwd_dq``: one program per query tile, streaming key tiles like the forward.
The dS / P tiles are recomputed in both (FA2 trades that 2x of exp work for no atomics and no
O(T^2) memory); ``backward ~ 2.5x forward`` in FLOPs as counted by the benchmarks.

Masking and any sequence length
-------------------------------
Every kernel splits its inner loop in two calls of one ``@triton.jit`` helper with a constexpr
``MASKED`` flag: in the forward and dQ kernels the key tiles that lie entirely below the diagonal and
entirely inside T load and compute with no mask arithmetic at all (the bulk of the work for long T),
and only the few tiles on the diagonal and the ragged last tile pay for ``where``; the dK/dV kernel
applies the causal mask only on its diagonal query tiles and keeps just a row bound (t < T) on its
streamed query loads. Tiles strictly above the diagonal are never visited (the loop
bounds stop at the diagonal), which halves causal work. T need not be a multiple of any block:
loads past T read zeros, scores past T are -inf, stores past T are masked. Query rows past T compute
harmless finite garbage that is never stored (they always see key 0, so no row is all -inf and no
NaN is produced in the forward). The causal query tiles are launched in reverse order (longest
first), which shortens the tail of the last wave.

Head dims that are not a power of two (96) use a D block of 128 with the extra columns masked on
load (zeros contribute nothing to Q K^T or to P V) and on store. Batch and head offsets are formed
in int64 so B * H * T * D may exceed 2^31 elements.

Memory traffic and TMA
----------------------
* Memory traffic. Every tile row is loaded as 128-bit vectors and streamed K/V tiles go through the
  cp.async pipeline that Triton's software pipeliner builds from the plain ``for`` loop (num_stages
  buffers: tile j+1 (and j+2) is in flight while tile j is multiplied). That needs the compiler to
  know rows are 16-byte aligned: ``_tile_ptrs`` states it (``ALIGN``, host-checked in ``_align``)
  instead of relying on Triton's run-time argument specialisation, so the build tier compiles the
  same code the GPU runs (without the hint the PTX showed scalar ld.global.b16 and no cp.async).
* Forward, sm_90, TMA (the default there for fp16/bf16 inputs that pass the 16-byte alignment check;
  ``MINILLM_ATTN_TMA=0`` turns it off): K and V arrive as host-built (B, H_kv, T, D) tensor
  descriptors whose block is one (batch, kv head)'s [BLOCK_N, BLOCK_D] tile (set per autotune
  configuration by a Config pre_hook, since the block is part of the compiled signature). Hopper's
  copy engine then moves each tile into shared memory with one bulk tensor copy per stage
  (cp.async.bulk.tensor.4d, completion on an mbarrier) instead of every thread computing 16-byte
  cp.async addresses, and fills rows >= T and columns >= HEAD_DIM with zeros, so the loads carry no
  mask. The arithmetic is unchanged (the interpreter tier checks the output bitwise against the
  pointer path). Build report, bf16, causal, d128: 124-204 registers against 168-229 for the pointer
  path at the same tiles with Triton 3.9, 128-243 against 152-249 with Triton 3.6 (the GPU machine's;
  no address registers), 0 spill, wgmma, about 1 KB more shared memory (the mbarriers, inside
  SMEM_OVERHEAD). Whether it is faster is for the GPU tier, which times both.
  Q stays a pointer load (once per program). The backward kernels stay on pointers until the GPU
  tier says whether TMA pays in the forward (their streamed tiles are narrower: 16-32 query rows).

Tiles (BLOCK_M x BLOCK_N, warps, pipeline stages per kernel and architecture), the pruning rule and
the autotune key's sequence-length bucket live in attention_tiles.py with the reasoning behind them;
the build tier's list of compiled variants in attention_build.py.

Limits: T_q == T_k (decoding with a KV cache should use SDPA); head dim <= 128; offsets within one
(batch, head) slice must fit int32 (checked); B * H beyond CUDA's grid-y limit is split on the host.
fp32 runs with IEEE dots (FMA, no tensor cores): correct, for the interpreter tier, not fast.

What this improves on compared with the Triton tutorial (written independently; no code copied):
any T (the tutorial requires T to be a multiple of the block), GQA/MQA without repeating K/V and
with a deterministic group reduction, arbitrary strides (no contiguity requirement; the model's
transposed views are read in place and O is written in the layout the model wants next), head dim
96, non-causal backward, fp32 for testing, a torch custom op usable under
torch.compile(fullgraph=True), and an architecture-aware autotune list whose every entry the build
report checks for spills and shared memory.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .attention_tiles import CONFIGS, FIXED, KEY_TILE_KINDS, PART, SMEM_BYTES, block_d, prune, t_bucket

try:  # Triton >= 3.4: host-built tensor descriptors, the kernels' door to TMA on sm_90+
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: the pointer path everywhere
    TensorDescriptor = None

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tile_ptrs(base, offs_r, stride_r, offs_c, stride_c, ALIGN: tl.constexpr):
    """Pointers of a [rows, cols] tile. ALIGN == 16: the host checked that the base pointer and the row
    stride are 16-byte multiples, so every row starts 16-byte aligned; with the unit head-dim stride
    that makes tile loads 128-bit vector loads (cp.async 16 B). Triton's JIT infers the same at run
    time from its argument specialisation; the explicit hint makes the build tier, which compiles
    without run-time arguments, see the code the GPU will run. (The hint must sit on the op that
    computes the pointers, inside this function: a hint on a function argument is dropped.)"""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if ALIGN == 16:
        ptrs = tl.multiple_of(ptrs, [1, 16])
    return ptrs


@triton.jit
def _load_tile(base, offs_r, stride_r, offs_c, stride_c, rows_ok, cols_ok,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, ALIGN: tl.constexpr):
    """Load a 2-D tile, masking rows (sequence) and/or columns (padded head dim) only when asked."""
    ptrs = _tile_ptrs(base, offs_r, stride_r, offs_c, stride_c, ALIGN)
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(base, offs_r, stride_r, offs_c, stride_c, x, mask, ALIGN: tl.constexpr):
    tl.store(_tile_ptrs(base, offs_r, stride_r, offs_c, stride_c, ALIGN), x, mask=mask)


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE (no TF32) when the inputs are fp32."""
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _load_kv_tile(src, kv_b, kv_h, start_n, offs_n, stride_t, stride_d, offs_d, n_ok, d_ok,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                  PAD_D: tl.constexpr, ALIGN: tl.constexpr, TMA: tl.constexpr):
    """One [BLOCK_N, BLOCK_D] key or value tile: keys offs_n = start_n + [0, BLOCK_N).

    TMA: ``src`` is a (B, H_kv, T, D) tensor descriptor with block [1, 1, BLOCK_N, BLOCK_D]; the copy
    engine moves the whole tile into shared memory and fills rows >= T and columns >= HEAD_DIM with
    zeros, so no mask is computed. Otherwise ``src`` points at this (batch, kv head)'s [T, D] slice."""
    if TMA:
        x = src.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        x = _load_tile(src, offs_n, stride_t, offs_d, stride_d, n_ok, d_ok, MASKED, PAD_D, ALIGN)
    return x


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, kv_b, kv_h, stride_kt, stride_kd, stride_vt, stride_vd,
               offs_m, offs_d, d_ok, n_lo, n_hi, T, qk_scale,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
               TMA: tl.constexpr):
    # acc: [BLOCK_M, BLOCK_D] fp32; l_i, m_i: [BLOCK_M] fp32; q: [BLOCK_M, BLOCK_D] input dtype.
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k = _load_kv_tile(k_src, kv_b, kv_h, start_n, offs_n, stride_kt, stride_kd, offs_d, n_ok, d_ok,
                          BLOCK_N, BLOCK_D, MASKED, PAD_D, ALIGN, TMA)           # [BLOCK_N, BLOCK_D]
        v = _load_kv_tile(v_src, kv_b, kv_h, start_n, offs_n, stride_vt, stride_vd, offs_d, n_ok, d_ok,
                          BLOCK_N, BLOCK_D, MASKED, PAD_D, ALIGN, TMA)           # [BLOCK_N, BLOCK_D]
        s = _mm(q, tl.trans(k), IEEE) * qk_scale                          # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        # Online softmax. m_new is finite: every row has seen key 0 in the first tile processed.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)                                       # exp2(-inf) = 0 at start
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qt, stride_qd,
              stride_kb, stride_kh, stride_kt, stride_kd,
              stride_vb, stride_vh, stride_vt, stride_vd,
              stride_ob, stride_oh, stride_ot, stride_od,
              H, T, GROUP, qk_scale, T_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
              ALIGN: tl.constexpr, TMA: tl.constexpr):
    # grid = (cdiv(T, BLOCK_M), B * H). LSE is contiguous (B, H, T) fp32. T_BUCKET is never read: it
    # is the autotuner's key for T (t_bucket), so every T of one bucket shares one tuning entry.
    # TMA: K and V are (B, H_kv, T, D) tensor descriptors (their stride arguments are then unused).
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    pid_m = tl.program_id(0)
    if CAUSAL:  # longest rows first: shortens the last wave's tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP  # the kv head serving this query head (GQA: GROUP query heads per kv head)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if TMA:
        k_src = K
        v_src = V
    else:
        k_src = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_src = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(q_base, offs_m, stride_qt, offs_d, stride_qd,
                   m_ok, d_ok, True, PAD_D, ALIGN)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if CAUSAL:
        # keys < start_m are visible to every row of the tile: no mask needed there.
        n_full = (start_m // BLOCK_N) * BLOCK_N
        n_end = tl.minimum(start_m + BLOCK_M, T)
    else:
        n_full = (T // BLOCK_N) * BLOCK_N
        n_end = T
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kt, stride_kd,
                               stride_vt, stride_vd, offs_m, offs_d, d_ok, 0, n_full, T, qk_scale,
                               BLOCK_N, BLOCK_D, PAD_D, False, CAUSAL, IEEE, ALIGN, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kt, stride_kd,
                               stride_vt, stride_vd, offs_m, offs_d, d_ok, n_full, n_end, T, qk_scale,
                               BLOCK_N, BLOCK_D, PAD_D, True, CAUSAL, IEEE, ALIGN, TMA)
    acc = acc / l_i[:, None]
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=m_ok)
    _store_tile(o_base, offs_m, stride_ot, offs_d, stride_od, acc.to(O.dtype.element_ty),
                m_ok[:, None] & d_ok[None, :], ALIGN)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_ob, stride_oh, stride_ot, stride_od,
                         stride_dob, stride_doh, stride_dot, stride_dod,
                         H, T, T_BUCKET,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         ALIGN: tl.constexpr):
    # delta[b, h, t] = sum_d dO * O in fp32; grid = (cdiv(T, BLOCK_M), B * H); DELTA contiguous.
    # T_BUCKET: the autotuner's key only (see _attn_fwd).
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    o = _load_tile(o_base, offs_m, stride_ot, offs_d, stride_od,
                   m_ok, d_ok, True, HEAD_DIM != BLOCK_D, ALIGN)
    do = _load_tile(do_base, offs_m, stride_dot, offs_d, stride_dod,
                    m_ok, d_ok, True, HEAD_DIM != BLOCK_D, ALIGN)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=m_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                stride_qt, stride_qd, stride_dot, stride_dod,
                offs_n, offs_d, d_ok, m_lo, m_hi, T, qk_scale,
                BLOCK_M: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr,
                IEEE: tl.constexpr, ALIGN: tl.constexpr, PART: tl.constexpr):
    # dk, dv: [BLOCK_N, BLOCK_D] fp32; k, v: [BLOCK_N, BLOCK_D]. Streams query tiles [m_lo, m_hi).
    # PART: 0 both, 1 dV only (v and delta unused), 2 dK only (dv untouched); see _attn_bwd_dkdv.
    # Query rows >= T load q = dO = 0 and lse = delta = 0, so they add exactly 0 to dK and dV.
    # Key rows >= T (k = v = 0) produce garbage (exp2 may overflow to inf) only in their own rows of
    # dk/dv: row j of P^T dO and dS^T Q depends on key j alone; those rows are never stored.
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        q = _load_tile(q_base, offs_m, stride_qt, offs_d, stride_qd,
                       m_ok, d_ok, True, PAD_D, ALIGN)                           # [BLOCK_M, BLOCK_D]
        do = _load_tile(do_base, offs_m, stride_dot, offs_d, stride_dod,
                        m_ok, d_ok, True, PAD_D, ALIGN)                          # [BLOCK_M, BLOCK_D]
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)           # [BLOCK_M] log2 units
        s_t = _mm(k, tl.trans(q), IEEE) * qk_scale                        # [BLOCK_N, BLOCK_M] = S^T
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:  # causal: query i sees key j iff i >= j
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        if PART != 2:
            dv += _mm(p_t.to(do.dtype), do, IEEE)
        if PART != 1:
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)   # [BLOCK_M]
            dp_t = _mm(v, tl.trans(do), IEEE)                             # [BLOCK_N, BLOCK_M] = dP^T
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _mm(ds_t.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   stride_qb, stride_qh, stride_qt, stride_qd,
                   stride_kb, stride_kh, stride_kt, stride_kd,
                   stride_vb, stride_vh, stride_vt, stride_vd,
                   stride_dob, stride_doh, stride_dot, stride_dod,
                   stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                   H, H_KV, T, GROUP, qk_scale, sm_scale, T_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                   ALIGN: tl.constexpr, PART: tl.constexpr):
    # grid = (cdiv(T, BLOCK_N), B * H_KV): one program per (key tile, kv head); it owns its rows of
    # dK and dV outright (no atomics), summing over the GROUP query heads in a fixed order.
    # T_BUCKET: the autotuner's key only (see _attn_fwd). PART 0: dK and dV (the fused kernel);
    # 1: dV only; 2: dK only (the split, two launches with their own tiles: see "Backward dK/dV").
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // H_KV
    hk = bhk % H_KV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T
    d_ok = offs_d < HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    k = _load_tile(k_base, offs_n, stride_kt, offs_d, stride_kd,
                   n_ok, d_ok, True, PAD_D, ALIGN)
    if PART != 1:
        v = _load_tile(v_base, offs_n, stride_vt, offs_d, stride_vd,
                       n_ok, d_ok, True, PAD_D, ALIGN)
    else:
        v = k  # never read: dV alone needs P = exp2(S - LSE) and dO only
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        m_lo = (start_n // BLOCK_M) * BLOCK_M            # first query tile that sees this key tile
        m_mid = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M  # past it, every query sees every key
    else:
        m_lo = 0
        m_mid = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + bh.to(tl.int64) * T
        delta_base = DELTA + bh.to(tl.int64) * T
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod, offs_n, offs_d, d_ok,
                             m_lo, m_mid, T, qk_scale, BLOCK_M, PAD_D, CAUSAL, IEEE, ALIGN, PART)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod, offs_n, offs_d, d_ok,
                             m_mid, T, T, qk_scale, BLOCK_M, PAD_D, False, IEEE, ALIGN, PART)
    out_ok = n_ok[:, None] & d_ok[None, :]
    if PART != 1:
        dk = dk * sm_scale
        _store_tile(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh,
                    offs_n, stride_dkt, offs_d, stride_dkd,
                    dk.to(DK.dtype.element_ty), out_ok, ALIGN)
    if PART != 2:
        _store_tile(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh,
                    offs_n, stride_dvt, offs_d, stride_dvd,
                    dv.to(DV.dtype.element_ty), out_ok, ALIGN)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
              offs_m, offs_d, d_ok, n_lo, n_hi, T, qk_scale,
              BLOCK_N: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr):
    # dq: [BLOCK_M, BLOCK_D] fp32. Streams key tiles [n_lo, n_hi).
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k = _load_tile(k_base, offs_n, stride_kt, offs_d, stride_kd,
                       n_ok, d_ok, MASKED, PAD_D, ALIGN)
        v = _load_tile(v_base, offs_n, stride_vt, offs_d, stride_vd,
                       n_ok, d_ok, MASKED, PAD_D, ALIGN)
        s = _mm(q, tl.trans(k), IEEE) * qk_scale                          # [BLOCK_M, BLOCK_N]
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = _mm(do, tl.trans(v), IEEE)                                   # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, IEEE)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qh, stride_qt, stride_qd,
                 stride_kb, stride_kh, stride_kt, stride_kd,
                 stride_vb, stride_vh, stride_vt, stride_vd,
                 stride_dob, stride_doh, stride_dot, stride_dod,
                 stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                 H, T, GROUP, qk_scale, sm_scale, T_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                 ALIGN: tl.constexpr):
    # grid = (cdiv(T, BLOCK_M), B * H): one program per query tile; owns its rows of dQ.
    # T_BUCKET: the autotuner's key only (see _attn_fwd).
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    q = _load_tile(q_base, offs_m, stride_qt, offs_d, stride_qd,
                   m_ok, d_ok, True, PAD_D, ALIGN)
    do = _load_tile(do_base, offs_m, stride_dot, offs_d, stride_dod,
                    m_ok, d_ok, True, PAD_D, ALIGN)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        n_full = (start_m // BLOCK_N) * BLOCK_N
        n_end = tl.minimum(start_m + BLOCK_M, T)
    else:
        n_full = (T // BLOCK_N) * BLOCK_N
        n_end = T
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, offs_d, d_ok, 0, n_full, T, qk_scale, BLOCK_N, PAD_D, False, CAUSAL, IEEE, ALIGN)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, offs_d, d_ok, n_full, n_end, T, qk_scale, BLOCK_N, PAD_D, True, CAUSAL, IEEE,
                   ALIGN)
    dq = dq * sm_scale
    _store_tile(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh,
                offs_m, stride_dqt, offs_d, stride_dqd,
                dq.to(DQ.dtype.element_ty), m_ok[:, None] & d_ok[None, :], ALIGN)


# --------------------------------------------------------------------------------------------------
# Dispatch: the TMA and dK/dV-split switches, the autotuned launch
# --------------------------------------------------------------------------------------------------
def _tma_wanted(q: torch.Tensor) -> bool:
    """Whether the forward loads K and V through TMA tensor descriptors (before the alignment check).

    Default: on CUDA devices of compute capability >= 9 (Hopper's copy engine) for fp16 / bf16, off
    elsewhere. ``MINILLM_ATTN_TMA=0`` turns it off (to compare, or to rule it out); ``=1`` also turns it
    on under the interpreter, where the tests compare it with the pointer path. Read at every call."""
    mode = os.environ.get("MINILLM_ATTN_TMA", "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"MINILLM_ATTN_TMA={mode!r}: expected 0 (off), 1 (on) or unset (on for sm_90+)")
    if mode == "0" or TensorDescriptor is None:
        return False
    if _interpreting():
        return mode == "1"
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device)[0] >= 9)


def _kv_descriptor(t: torch.Tensor, block_n: int, block_d: int):
    """A TMA descriptor of a (B, H_kv, T, D) K or V view whose strides passed ``_tma_layout`` (16-byte
    base and strides, unit head-dim stride, no zero stride). One block is one (batch, head)'s
    [block_n, block_d] tile; rows past T and columns past D read as zeros (a box may be wider than the
    tensor: cuTensorMapEncodeTiled bounds each box dimension by 256 only)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, block_d])


def _dkdv_split() -> bool:
    """Whether the backward computes dV and dK in two kernels (``MINILLM_ATTN_DKDV=split``) instead of
    the fused one (``fused``, the default until a GPU measures the split). Read at every call."""
    mode = os.environ.get("MINILLM_ATTN_DKDV", "fused") or "fused"
    if mode not in ("fused", "split"):
        raise ValueError(f"MINILLM_ATTN_DKDV={mode!r}: expected fused (one dK/dV kernel, the default) "
                         f"or split (a dV kernel and a dK kernel)")
    return mode == "split"


def _tma_layout(*tensors: torch.Tensor) -> bool:
    """Beyond ``_align`` == 16 (which implies TensorDescriptor's own checks): no zero stride. An
    ``expand``-ed K / V is legal for the pointer path, but a global stride of 0 is not one the TMA
    driver documents accepting, so such views take the pointer path."""
    return all(s != 0 for t in tensors for s in t.stride())


def _kv_block_hook(nargs: dict) -> None:
    """Autotune pre_hook of the forward: a descriptor's block must match the configuration's key tile
    (the block shape is part of the compiled kernel's signature). Nothing to do on the pointer path."""
    if nargs.get("TMA"):
        for name in ("K", "V"):
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]


def _use_fixed() -> bool:
    return _interpreting() or os.environ.get("MINILLM_ATTN_FIXED") == "1" or not torch.cuda.is_available()


# Each kind of launch and its kernel (dv and dk: the dK/dV kernel with PART = 1 or 2).
KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq, "pre": _attn_bwd_preprocess,
            "dv": _attn_bwd_dkdv, "dk": _attn_bwd_dkdv}
_TUNED: dict[tuple[str, int, int], object] = {}


def _tuned(kind: str, arch: int, smem_limit: int):
    """The triton.autotune wrapper of one kernel for one architecture (built once, cached)."""
    key = (kind, arch, smem_limit)
    if key not in _TUNED:
        def to_config(c):
            kw = {"BLOCK_M": c[0]} if kind == "pre" else {"BLOCK_M": c[0], "BLOCK_N": c[1]}
            return triton.Config(kw, num_warps=c[2], num_stages=c[3],
                                 pre_hook=_kv_block_hook if kind == "fwd" else None)

        def early_prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            elem = args["O" if kind == "pre" else "Q"].element_size()
            # T_BUCKET, not T: the candidates must be the same for every T sharing the tuning entry
            allowed = [c[:4] for c in prune(kind, arch, args["HEAD_DIM"], elem, args["T_BUCKET"],
                                            smem_limit=smem_limit)]
            out = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N", 0),
                                          c.num_warps, c.num_stages) in allowed]
            return out or configs[:1]

        _TUNED[key] = triton.autotune(
            configs=[to_config(c) for c in CONFIGS[kind][arch]],
            # TMA / PART in the key: Triton's on-disk autotune cache (TRITON_CACHE_AUTOTUNING) keys on the
            # function, this key and the candidates, so the fused dK/dV kernel and its dK half (the same
            # function, the same candidates at some head dims) would otherwise share an entry
            key=(["T_BUCKET", "HEAD_DIM", "CAUSAL", "ALIGN"] + (["TMA"] if kind == "fwd" else [])
                 + (["PART"] if kind in KEY_TILE_KINDS else [])
                 if kind != "pre" else ["T_BUCKET", "HEAD_DIM", "ALIGN"]),
            prune_configs_by={"early_config_prune": early_prune},
        )(KERNELS[kind])
    return _TUNED[key]


def _device_arch(device: torch.device) -> tuple[int, int]:
    """(configuration list to use: 90 or 80, the device's per-block shared memory limit in bytes)."""
    props = torch.cuda.get_device_properties(device)
    arch = 90 if props.major >= 9 else 80
    return arch, getattr(props, "shared_memory_per_block_optin", 0) or SMEM_BYTES[arch]


def _launch(kind: str, grid_rows: int, grid_cols: int, device: torch.device, *args, **meta) -> None:
    """Run one kernel: the fixed configuration under tests / on CPU, else the autotuned one."""
    if _use_fixed():
        bm, bn, warps, stages, _ = FIXED[kind]
        tiles = {"BLOCK_M": bm} if kind == "pre" else {"BLOCK_M": bm, "BLOCK_N": bn}
        tile_rows = bn if kind in KEY_TILE_KINDS else bm
        grid = (triton.cdiv(grid_rows, tile_rows), grid_cols)
        if kind == "fwd":
            _kv_block_hook({"K": args[1], "V": args[2], **meta, **tiles})
        KERNELS[kind][grid](*args, **meta, **tiles, num_warps=warps, num_stages=stages)
        return
    arch, smem_limit = _device_arch(device)

    def grid(m):
        return (triton.cdiv(grid_rows, m["BLOCK_N"] if kind in KEY_TILE_KINDS else m["BLOCK_M"]), grid_cols)

    _tuned(kind, arch, smem_limit)[grid](*args, **meta)


# --------------------------------------------------------------------------------------------------
# Host-side forward and backward
# --------------------------------------------------------------------------------------------------
def _align(*tensors: torch.Tensor) -> int:
    """ALIGN for the kernels: 16 when every base pointer is 16-byte aligned, the head dim is unit-stride
    and every other stride is a multiple of 16 bytes (then tile rows load as 128-bit vectors); 1 (no
    promise) otherwise, e.g. for odd views."""
    elem = tensors[0].element_size()
    for t in tensors:
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any((s * elem) % 16 for s in t.stride()[:-1]):
            return 1
    return 16


MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1, which carries batch x heads


def _batch_chunks(B: int, H: int):
    """Batch slices small enough that (slice * H) fits grid dimension 1; one slice in practice."""
    step = max(1, MAX_GRID_Y // max(H, 1))
    return [slice(b0, min(B, b0 + step)) for b0 in range(0, B, step)]


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
         softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    # O is laid out (B, T, H, D) and returned as a (B, H, T, D) view, so the model's
    # y.transpose(1, 2).contiguous().view(B, T, C) is a no-op copy.
    o = q.new_empty(B, T, H, D).transpose(1, 2)
    _check_span("O (the output, laid out (B, T, H, D))", o)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    if T == 0 or B * H == 0:
        return o, lse
    align = _align(q, k, v, o)
    tma = align == 16 and _tma_layout(k, v) and _tma_wanted(q)
    _dkdv_split()  # a bad MINILLM_ATTN_DKDV fails here, before a forward whose backward would refuse it
    for s in _batch_chunks(B, H):  # slices are views: same strides, shifted base pointers
        qs, ks, vs, os_ = q[s], k[s], v[s], o[s]
        # TMA: descriptors of the K / V views; their block is set per configuration (_kv_block_hook)
        k_arg, v_arg = ((_kv_descriptor(ks, 16, block_d(D)), _kv_descriptor(vs, 16, block_d(D)))
                        if tma else (ks, vs))
        _launch("fwd", T, qs.shape[0] * H, q.device, qs, k_arg, v_arg, os_, lse[s],
                *qs.stride(), *ks.stride(), *vs.stride(), *os_.stride(),
                H, T, H // k.shape[1], softmax_scale * LOG2E, t_bucket(T),
                HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=causal, IEEE=q.dtype == torch.float32,
                ALIGN=align, TMA=tma)
    return o, lse


def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
         lse: torch.Tensor, causal: bool, softmax_scale: float):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    _check_span("dO (the incoming gradient)", do)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if T == 0 or B * H == 0:
        return dq, dk, dv
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    ieee = q.dtype == torch.float32
    align = _align(q, k, v, o, do, dq, dk, dv)
    meta = dict(T_BUCKET=t_bucket(T), HEAD_DIM=D, BLOCK_D=block_d(D), ALIGN=align)
    kv_kinds = ("dv", "dk") if _dkdv_split() else ("dkdv",)
    for s in _batch_chunks(B, H):
        qs, ks, vs, os_, dos, dqs, dks, dvs = (t[s] for t in (q, k, v, o, do, dq, dk, dv))
        nb = qs.shape[0]
        _launch("pre", T, nb * H, q.device, os_, dos, delta[s], *os_.stride(), *dos.stride(), H, T,
                **meta)
        # dK/dV and dQ write disjoint outputs and only read the rest: they could run concurrently.
        for kind in kv_kinds:
            _launch(kind, T, nb * H_kv, q.device, qs, ks, vs, dos, dks, dvs, lse[s], delta[s],
                    *qs.stride(), *ks.stride(), *vs.stride(), *dos.stride(), *dks.stride(),
                    *dvs.stride(), H, H_kv, T, H // H_kv, softmax_scale * LOG2E, softmax_scale,
                    CAUSAL=causal, IEEE=ieee, PART=PART[kind], **meta)
        _launch("dq", T, nb * H, q.device, qs, ks, vs, dos, dqs, lse[s], delta[s],
                *qs.stride(), *ks.stride(), *vs.stride(), *dos.stride(), *dqs.stride(),
                H, T, H // H_kv, softmax_scale * LOG2E, softmax_scale,
                CAUSAL=causal, IEEE=ieee, **meta)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# torch custom ops (torch.compile sees one node each) and autograd
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("minillm::flash_attn_fwd", mutates_args=())
def flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(O (B, H, T, D), LSE (B, H, T) fp32 in log2 units)."""
    return _fwd(q, k, v, causal, softmax_scale)


@flash_attn_fwd_op.register_fake
def _(q, k, v, causal, softmax_scale):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("minillm::flash_attn_bwd", mutates_args=())
def flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      o: torch.Tensor, lse: torch.Tensor, causal: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV); dK and dV are already summed over each kv head's group of query heads."""
    return _bwd(do, q, k, v, o, lse, causal, softmax_scale)


@flash_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _backward(ctx, do, dlse):
    # dlse is ignored: LSE is an auxiliary output, not part of flash_attention's result.
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = flash_attn_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None


flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API and reference
# --------------------------------------------------------------------------------------------------
def _check_span(name: str, t: torch.Tensor) -> None:
    """Offsets inside one (batch, head) slice are int32 in the kernels (the batch and head parts are
    int64): the slice's last element, (T-1, D-1), must lie below 2^31 elements from its first. Checked
    for q, k, v, for O (laid out (B, T, H, D), so its T stride is H*D) and for the incoming dO."""
    T, D = t.shape[2], t.shape[3]
    if T and D and (T - 1) * abs(t.stride(2)) + (D - 1) * abs(t.stride(3)) >= 2**31:
        raise ValueError(f"flash_attention: {name} spans >= 2^31 elements within one head "
                         f"(T={T}, strides {t.stride()}); make it contiguous or split T")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be 4-D (B, H, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"flash_attention: k and v must be (B, H_kv, T, D) = ({B}, H_kv, {T}, {D}); "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)} (use SDPA for T_q != T_k)")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"flash_attention: n_head={H} must be a multiple of n_kv_head={k.shape[1]}")
    if D > 128 or D < 1:
        raise ValueError(f"flash_attention: head dim {D} unsupported; use 1..128 (32/64/96/128 tuned)")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: dtypes must match and be fp16/bf16/fp32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v on different devices: {q.device}, {k.device}, "
                         f"{v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_span(name, t)
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError("flash_attention: CPU tensors need TRITON_INTERPRET=1 set before triton is "
                         "imported (tests do this); otherwise use the torch path")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * softmax_scale [causal]) v for q (B, H, T, D), k/v (B, H_kv, T, D) -> (B, H, T, D).

    softmax_scale defaults to 1/sqrt(D). Differentiable in q, k, v; a torch custom op (compile-safe).
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    o, _ = flash_attn_fwd_op(q, k, v, bool(causal), scale)
    return o


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  softmax_scale: float | None = None) -> torch.Tensor:
    """Plain torch attention in the inputs' dtype (pass float64 for the reference): materialises T x T."""
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, D): GQA by repetition, fine for a reference
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    if causal:
        above = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(above, float("-inf"))
    return torch.softmax(s, dim=-1) @ v

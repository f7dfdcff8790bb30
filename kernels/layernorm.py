"""Fused LayerNorm and RMSNorm in Triton: forward, backward, optional fused residual add.

Public API (x of any leading shape, normalised over the last dimension, output in x's dtype)::

    layer_norm(x, weight, bias=None, eps=1e-5)             -> y
    rms_norm(x, weight=None, eps=1e-6)                     -> y
    add_layer_norm(x, residual, weight, bias=None, eps)    -> (y, h)   h = x + residual, y = LN(h)
    add_rms_norm(x, residual, weight=None, eps)            -> (y, h)   h = x + residual, y = RMS(h)

and the plain torch references ``layer_norm_ref`` / ``rms_norm_ref`` (what CPU runs in production and
what the tests compare against). The kernels run under ``TRITON_INTERPRET=1`` on CPU tensors too.

The maths (x one row of N values, all statistics in fp32)
----------------------------------------------------------
LayerNorm:  mean = sum(x)/N,  var = sum((x-mean)^2)/N,  rstd = 1/sqrt(var+eps),  xhat = (x-mean)*rstd,
            y = xhat*w + b.
RMSNorm:    rstd = 1/sqrt(sum(x^2)/N + eps),  xhat = x*rstd,  y = xhat*w.
Backward, with g = dy*w:
            dx = rstd * (g - xhat*c1 - c2)       c1 = sum(g*xhat)/N,  c2 = sum(g)/N   (LayerNorm)
            dx = rstd * (g - xhat*c1)                                                   (RMSNorm)
            dw = sum over rows of dy*xhat,       db = sum over rows of dy.
The variance is computed two-pass (mean first, then squared deviations) from values held in registers,
so there is no E[x^2]-E[x]^2 cancellation.

Bytes moved, and why that is the whole story
--------------------------------------------
A norm does ~10 flops per element and moves 2-4 bytes per element per tensor, far below the
~300 flop/byte an H100 needs to become compute bound, so speed is bytes / bandwidth. Per element
(s = bytes of the activation dtype, 2 for bf16):
  forward:  read x, write y                                    = 2s   (+2s with residual: read r, write h)
  backward: read x, read dy, write dx                          = 3s   (+s with residual: read dh)
weight, bias, mean/rstd (8 B per row) and the dw/db partials (see below) are O(N + M), noise when
M >> 1. H100 SXM HBM3 is 3.35 TB/s; good memory-bound kernels reach ~85-90% of it, hence the goals
(forward >= 2.8 TB/s, backward >= 2.0 TB/s at N >= 4096). We only need to (a) touch every byte once,
(b) keep enough bytes in flight per SM, (c) never spill.

Configuration (one function, ``norm_config``, used by the wrapper and by ``build_specs``)
----------------------------------------------------------------------------------------------
* A row of N <= 8192 (forward) / 4096 (backward) is held entirely in registers: BLOCK_N is the next
  power of two >= N and the tail is masked. One DRAM read per element, then reductions in registers.
* Narrow rows: one program handles ROWS rows as a [ROWS, BLOCK_N] tile so each program moves >= 4096
  (backward: 2048, as it holds more tiles live) elements (8 KiB of bf16 at N=768 instead of 1.5 KiB):
  the launch and the reduction latency are amortised over more bytes. This is what the per-row tutorial kernels lose at small N.
* num_warps grows with the tile so each thread holds ~8-16 fp32 values (4 in a one-row backward
  tile: at 2048 columns and 8 warps, Triton 3.6 spills on sm_90): enough independent loads in
  flight, few enough registers to keep >= 2 CTAs (or one 16-warp CTA) resident per SM.
  The build report (``python -m minillm.kernels.build_report --only norm``) shows registers and that nothing
  spills for every configuration chosen here.
* Wider rows use a chunked variant (CHUNKED, one row per program): the forward re-reads the
  row chunk by chunk (the row is <= 64 KiB per program, so re-reads hit L1/L2, not DRAM); the backward
  makes one pass for the row sums c1, c2 and a second pass that writes dx and adds dy*xhat into the
  program's own fp32 partial row (a read-modify-write that stays in L2).

Weight/bias gradients: a bounded number of programs, then one sum
-----------------------------------------------------------------
dw needs a sum over all M rows. Atomics would serialise on the same N addresses; one partial row per
input row would write M*N fp32 (as much traffic as dx). Instead the backward launches G programs
(about one per SM times the CTAs that fit, and never more than the row tiles), program p owns rows
[p*R, (p+1)*R), accumulates dy*xhat and dy for its rows in fp32 registers and writes ONE partial row:
dw_partial[G, N]. Then ``dw_partial.sum(0)`` is a single small reduction (G*N*4 bytes: 2 MiB for G=132,
N=4096, vs 48 MiB for x, dy, dx at M=4096 bf16). No program shares an output address with another, so
there is no race and no atomic. Liger's kernels use one program per SM but one row at a time; with
ROWS rows per tile and a wider grid at small N we avoid its ~0.1 ms floor at hidden 1024.

Residual fusion: measured on paper, it pays
-------------------------------------------
Unfused, ``h = x + r; y = norm(h)`` moves 3s (add) + 2s (norm) = 5s bytes per element forward and
3s (norm backward) + 3s (adding the residual-stream gradient dh to dnorm) = 6s backward. Fused: 4s
forward (read x, r; write h, y) and 4s backward (read h, dy, dh; write dx, which is also the gradient
of r). That is 20% fewer bytes forward and 33% fewer backward for every pre-norm block, so it is done:
``add_layer_norm`` / ``add_rms_norm``. h is rounded to the activation dtype before the statistics, so
the result equals the unfused computation exactly, and the backward reads h as stored.

torch.compile
-------------
The launches live inside ``torch.library.custom_op`` ops ``minillm::norm_fwd`` / ``minillm::norm_bwd``
with ``register_fake`` (shapes for tracing) and ``register_autograd``; a compiled model sees one opaque
op per norm and does not graph-break. (``triton_op`` would let Inductor look inside, but it fails on
CPU under the interpreter, where we test: "Cannot access data pointer of Tensor" on fake tensors.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Configuration: the single place that decides BLOCK_N, ROWS, CHUNKED and num_warps
# ----------------------------------------------------------------------------------------------

MAX_FUSED_FWD = 8192    # widest row the forward keeps whole in registers (16 warps x 16 fp32/thread)
MAX_FUSED_BWD = 4096    # the backward also holds dy and dw/db accumulators (8192 spilled on sm_90)
CHUNK_FWD = 8192        # chunk width of the chunked variants beyond those limits
CHUNK_BWD = 4096
TILE_ELEMS = 4096       # target elements per [ROWS, BLOCK_N] tile for narrow rows (forward)
TILE_ELEMS_BWD = 2048   # the backward carries ~5 live fp32 tiles; 4096 hit 128 regs and spilled
MAX_ROWS = 256          # bound ROWS for tiny N (N=1 would otherwise ask for 4096 rows per tile)
MAX_ROWS_BWD = 64       # per-row scalars (mean, rstd, c1, c2) of many rows also cost registers


@dataclass(frozen=True)
class NormConfig:
    BLOCK_N: int      # columns per tile (power of two)
    ROWS: int         # rows per tile
    CHUNKED: bool     # False: row held whole in registers; True: loop over the row in BLOCK_N chunks
    num_warps: int


def norm_config(N: int, backward: bool) -> NormConfig:
    """Tile shape and warps for a row of N elements (forward or backward). Pure function of N."""
    if N < 1:
        raise ValueError(f"normalised dimension must be >= 1, got {N}")
    limit, chunk = (MAX_FUSED_BWD, CHUNK_BWD) if backward else (MAX_FUSED_FWD, CHUNK_FWD)
    block = triton.next_power_of_2(N)
    if block > limit:  # chunked: one row per program, a fixed chunk width, 16 warps
        return NormConfig(chunk, 1, True, 16)
    tile, max_rows = (TILE_ELEMS_BWD, MAX_ROWS_BWD) if backward else (TILE_ELEMS, MAX_ROWS)
    rows = max(1, min(tile // block, max_rows))
    elems = rows * block
    # ~16 fp32 values per thread forward, ~8 backward (it also carries dy and two accumulators); a
    # one-row backward tile, 4: at 2048 columns and 8 warps, Triton 3.6's ptxas spills one register
    # per row on sm_90 (LayerNorm, 64 registers); 16 warps build at 53 with no spill (build report)
    per_thread = 16 if not backward else (8 if rows > 1 else 4)
    warps = max(1, min(16, elems // (32 * per_thread)))
    return NormConfig(block, rows, False, warps)


def bwd_grid(M: int, cfg: NormConfig, num_sms: int) -> tuple[int, int]:
    """(G, rows_per_program) for the backward: a bounded number of programs, each owning a
    contiguous run of rows (a multiple of ROWS) and writing one fp32 partial row of dw/db.
    CTAs per SM follows the warps: small tiles (few warps) fit several CTAs per SM."""
    ctas_per_sm = max(1, 16 // cfg.num_warps)  # ~16 warps resident per SM is enough to saturate HBM
    tiles = triton.cdiv(M, cfg.ROWS)
    g = max(1, min(num_sms * ctas_per_sm, tiles))
    rows_per_program = triton.cdiv(tiles, g) * cfg.ROWS
    return triton.cdiv(M, rows_per_program), rows_per_program


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # CPU / interpreter: a few "SMs" so the tests exercise programs that loop over several tiles.
    return int(os.environ.get("MINILLM_NORM_CPU_SMS", "2"))


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _norm_fwd_kernel(
    X, R, Y, H, W, B, Mean, Rstd,          # pointers; R/H (residual in / sum out), W, B may be dummies
    M, N,
    stride_x, stride_r, stride_y, stride_h,  # row strides in elements (last dim is contiguous)
    eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, CHUNKED: tl.constexpr,
):
    pid = tl.program_id(0)
    if not CHUNKED:
        # ---- whole rows in registers: tile [ROWS, BLOCK_N] ----
        rows = pid * ROWS + tl.arange(0, ROWS)                       # [ROWS]
        cols = tl.arange(0, BLOCK_N)                                 # [BLOCK_N]
        row_mask = rows < M
        mask = row_mask[:, None] & (cols < N)[None, :]               # [ROWS, BLOCK_N]
        rows64 = rows.to(tl.int64)                                   # M*stride may pass 2^31
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            h = (x + r.to(tl.float32)).to(H.dtype.element_ty)        # round like the unfused add
            tl.store(H + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)    # [ROWS]
            xhat = x * rstd[:, None]
        else:
            mean = tl.sum(x, axis=1) / N                             # masked lanes are 0
            xc = tl.where(mask, x - mean[:, None], 0.0)              # keep the tail out of var
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
            xhat = xc * rstd[:, None]
            tl.store(Mean + rows, mean, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        y = xhat
        if HAS_W:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # ---- one wide row per program, in chunks of BLOCK_N ----
        # The chunk loops run to the runtime N (not a constexpr chunk count) so ptxas does not
        # unroll them and keep several chunks live at once (that spilled in the build report).
        row = pid.to(tl.int64)
        cols0 = tl.arange(0, BLOCK_N)
        # pass 1: (residual add and) statistics. LayerNorm merges per-chunk (count, mean, M2) with
        # Chan et al.'s parallel-variance update, so each chunk is read once and the variance never
        # forms E[x^2]-E[x]^2. With a residual, pass 2 reads h back.
        n_a = 0.0
        mean = 0.0
        m2 = 0.0
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + cols0
            m = cols < N
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(R + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)
                h = (x + r).to(H.dtype.element_ty)
                tl.store(H + row * stride_h + cols, h, mask=m)
                x = h.to(tl.float32)
            if IS_RMS:
                m2 += tl.sum(x * x, axis=0)
            else:
                n_b = tl.minimum(N - c0, BLOCK_N).to(tl.float32)
                mean_b = tl.sum(x, axis=0) / n_b
                xc = tl.where(m, x - mean_b, 0.0)
                m2_b = tl.sum(xc * xc, axis=0)
                n = n_a + n_b
                delta = mean_b - mean
                mean = mean + delta * (n_b / n)
                m2 = m2 + m2_b + delta * delta * (n_a * n_b / n)
                n_a = n
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        if not IS_RMS:
            tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)
        if HAS_RES:
            # The h stores above must be visible to this program's re-reads below. Each element is
            # stored and re-loaded by the same thread (same layout), so program order suffices; the
            # barrier makes that independent of the layout the compiler picks.
            tl.debug_barrier()
            SRC = H
            stride_src = stride_h
        else:
            SRC = X
            stride_src = stride_x
        # pass 2: normalise and write y (the row re-read hits L1/L2: <= 64 KiB per program)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + cols0
            m = cols < N
            x = tl.load(SRC + row * stride_src + cols, mask=m, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Backward kernel: dx for every row, plus one fp32 partial row of dw/db per program
# ----------------------------------------------------------------------------------------------

@triton.jit
def _norm_bwd_kernel(
    X, W, DY, DH, DX, Mean, Rstd, DW_PART, DB_PART,
    M, N, rows_per_program,
    stride_x, stride_dy, stride_dh, stride_dx,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DRES: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, CHUNKED: tl.constexpr,
):
    # X is the normalised input (h when the residual was fused). DH is the gradient arriving at h
    # through the residual stream; it is added to dx (dx is then also the residual's gradient).
    pid = tl.program_id(0).to(tl.int64)  # row offsets below are int64: M*stride may pass 2^31
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if not CHUNKED:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        else:
            w = 1.0
        dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)   # summed over rows once, at the end
        db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for r0 in range(row_start, row_end, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)[:, None]
            if IS_RMS:
                xhat = x * rstd                                     # 0 on masked lanes
            else:
                mean = tl.load(Mean + rows, mask=row_mask, other=0.0)[:, None]
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w
            c1 = tl.sum(g * xhat, axis=1)[:, None] / N
            if IS_RMS:
                dx = (g - xhat * c1) * rstd
            else:
                c2 = tl.sum(g, axis=1)[:, None] / N
                dx = (g - xhat * c1 - c2) * rstd
            if HAS_DRES:
                dx += tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                dw_acc += dy * xhat
            if HAS_B:
                db_acc += dy
        # One partial row per program: no other program writes row `pid`, so no race, no atomic.
        if HAS_W:
            tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if HAS_B:
            tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    else:
        # Wide rows, one row at a time. DW_PART/DB_PART are zero-initialised by the wrapper and
        # row `pid` of them is read-modify-written only by this program (same thread stores and
        # re-loads each element), so again no race.
        cols0 = tl.arange(0, BLOCK_N)
        for row64 in range(row_start, row_end):
            rstd = tl.load(Rstd + row64)
            if IS_RMS:
                mean = 0.0
            else:
                mean = tl.load(Mean + row64)
            # pass 1: c1 = sum(g*xhat)/N and c2 = sum(g)/N
            a1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            a2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + cols0
                m = cols < N
                x = tl.load(X + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
                xhat = tl.where(m, (x - mean) * rstd, 0.0)
                g = dy
                if HAS_W:
                    g = dy * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
                a1 += g * xhat
                a2 += g
            c1 = tl.sum(a1, axis=0) / N
            c2 = tl.sum(a2, axis=0) / N
            # pass 2: dx, and dy*xhat / dy into this program's partial rows (L2-resident)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + cols0
                m = cols < N
                x = tl.load(X + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
                xhat = tl.where(m, (x - mean) * rstd, 0.0)
                g = dy
                if HAS_W:
                    g = dy * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
                if IS_RMS:
                    dx = (g - xhat * c1) * rstd
                else:
                    dx = (g - xhat * c1 - c2) * rstd
                if HAS_DRES:
                    dx += tl.load(DH + row64 * stride_dh + cols, mask=m, other=0.0).to(tl.float32)
                tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
                if HAS_W:
                    p = tl.load(DW_PART + pid * N + cols, mask=m, other=0.0)
                    tl.store(DW_PART + pid * N + cols, p + dy * xhat, mask=m)
                if HAS_B:
                    p = tl.load(DB_PART + pid * N + cols, mask=m, other=0.0)
                    tl.store(DB_PART + pid * N + cols, p + dy, mask=m)


# ----------------------------------------------------------------------------------------------
# Launch helpers (plain functions on 2-D [M, N] views)
# ----------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit column stride; a view whenever the layout allows one."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1 and t2.shape[-1] > 1:
        t2 = t2.contiguous()
    return t2


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _launch_fwd(x, weight, bias, residual, eps: float, is_rms: bool):
    x2 = _rows(x)
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    has_res = residual is not None
    if has_res:
        r2 = _rows(residual)
        h = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        r2 = h = y  # dummies, never touched (HAS_RES=False)
    mean = torch.empty(M if not is_rms else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    cfg = norm_config(N, backward=False)
    if M > 0:
        _norm_fwd_kernel[(triton.cdiv(M, cfg.ROWS),)](
            x2, r2, y, h, weight if weight is not None else y, bias if bias is not None else y,
            mean if not is_rms else rstd, rstd, M, N,
            _row_stride(x2), _row_stride(r2), N, N, eps,
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=has_res,
            BLOCK_N=cfg.BLOCK_N, ROWS=cfg.ROWS, CHUNKED=cfg.CHUNKED, num_warps=cfg.num_warps)
    return y, (h if has_res else y.new_empty(0)), mean, rstd


def _launch_bwd(dy, dh, x, weight, mean, rstd, is_rms: bool, has_bias: bool):
    dy2, x2 = _rows(dy), _rows(x)
    M, N = x2.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    has_dres = dh is not None
    dh2 = _rows(dh) if has_dres else dx
    cfg = norm_config(N, backward=True)
    G, rows_per_program = bwd_grid(M, cfg, _num_sms(x.device)) if M > 0 else (1, 0)
    alloc = torch.zeros if cfg.CHUNKED or M == 0 else torch.empty
    has_w = weight is not None
    dw_part = alloc((G, N), dtype=torch.float32, device=x.device) if has_w else rstd
    db_part = alloc((G, N), dtype=torch.float32, device=x.device) if has_bias else rstd
    if M > 0:
        _norm_bwd_kernel[(G,)](
            x2, weight if has_w else x2, dy2, dh2, dx, mean if not is_rms else rstd, rstd,
            dw_part, db_part, M, N, rows_per_program,
            _row_stride(x2), _row_stride(dy2), _row_stride(dh2), N,
            IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias, HAS_DRES=has_dres,
            BLOCK_N=cfg.BLOCK_N, ROWS=cfg.ROWS, CHUNKED=cfg.CHUNKED, num_warps=cfg.num_warps)
    # The one final sum over G partial rows (fp32), then the parameter's dtype.
    dw = dw_part.sum(0).to(weight.dtype) if has_w else x.new_empty(0)
    db = db_part.sum(0).to(weight.dtype if has_w else x.dtype) if has_bias else x.new_empty(0)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees one opaque op; no graph break) and autograd
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("minillm::norm_fwd", mutates_args=())
def _norm_fwd_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 residual: torch.Tensor | None, eps: float, is_rms: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y [M, N], h [M, N] or empty, mean [M] (empty for RMS), rstd [M])."""
    return _launch_fwd(x, weight, bias, residual, eps, is_rms)


@_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps, is_rms):
    N = x.shape[-1]
    M = x.numel() // N if N else 0
    y = x.new_empty((M, N))
    h = x.new_empty((M, N)) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if is_rms else M, dtype=torch.float32)
    return y, h, mean, x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("minillm::norm_bwd", mutates_args=())
def _norm_bwd_op(dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor,
                 weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                 is_rms: bool, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx [M, N], dweight [N] or empty, dbias [N] or empty)."""
    return _launch_bwd(dy, dh, x, weight, mean, rstd, is_rms, has_bias)


@_norm_bwd_op.register_fake
def _(dy, dh, x, weight, mean, rstd, is_rms, has_bias):
    N = x.shape[-1]
    M = x.numel() // N if N else 0
    dw = weight.new_empty(N) if weight is not None else x.new_empty(0)
    db = (weight if weight is not None else x).new_empty(N) if has_bias else x.new_empty(0)
    return x.new_empty((M, N)), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms = inputs
    y, h, mean, rstd = output
    # The backward needs the normalised input: x itself, or h when the residual add was fused.
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.is_rms, ctx.has_bias, ctx.has_res = is_rms, bias is not None, residual is not None
    ctx.x_shape = x.shape


def _backward(ctx, dy, dh, dmean, drstd):
    xin, weight, mean, rstd = ctx.saved_tensors
    # dh is the gradient reaching h through the residual stream (None if h was unused)
    dx, dw, db = _norm_bwd_op(dy, dh if ctx.has_res else None, xin, weight, mean, rstd,
                              ctx.is_rms, ctx.has_bias)
    dx = dx.view(ctx.x_shape)
    return (dx, dw if weight is not None else None, db if ctx.has_bias else None,
            dx if ctx.has_res else None, None, None)


_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check(x: torch.Tensor, weight, bias, residual, name: str) -> None:
    N = x.shape[-1] if x.dim() else 0
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension, got a scalar")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: x dtype {x.dtype} unsupported; use float32, float16 or bfloat16")
    for label, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (N,):
            raise ValueError(f"{name}: {label} shape {tuple(t.shape)} must be ({N},), the last dim of x")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{name}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x (any leading shape, any row stride). Output in x.dtype;
    statistics in fp32. Differentiable in x, weight and bias."""
    _check(x, weight, bias, None, "layer_norm")
    y, _, _, _ = _norm_fwd_op(x, weight, bias, None, float(eps), False)
    return y.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x: x / sqrt(mean(x^2) + eps) * weight. Output in x.dtype."""
    _check(x, weight, None, None, "rms_norm")
    y, _, _, _ = _norm_fwd_op(x, weight, None, None, float(eps), True)
    return y.view(x.shape)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (rounded to x.dtype), y = layer_norm(h); returns (y, h) from one pass.

    Where it is used: the residual stream of a pre-norm block, where a branch's output is added to
    the residual and the sum is normalised at once for the next branch. model.py's ``Norm.add`` (through
    minillm/ops.py) calls ``add_layer_norm(stream, branch_out, norm.weight, norm.bias)`` for norm2 and
    for the next block's norm1 or the final norm. The stream goes first because h takes x's dtype: an
    fp32 stream plus a bf16 branch (autocast) stays fp32, as ``stream + branch`` would. One kernel
    reads the two inputs and writes h and y; the unfused add + norm also reads h back. Tested against
    the unfused float64 reference (tests/test_kernels_norm.py) and, in the model, bitwise against the
    add-then-norm kernels in fp32 (tests/test_ops.py).
    """
    _check(x, weight, bias, residual, "add_layer_norm")
    y, h, _, _ = _norm_fwd_op(x, weight, bias, residual, float(eps), False)
    return y.view(x.shape), h.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (rounded to x.dtype), y = rms_norm(h); returns (y, h) from one pass.

    The RMSNorm twin of ``add_layer_norm`` (see there), used in the same places by model.py's
    ``Norm.add``: ``y, h = add_rms_norm(stream, branch_out, norm.weight)``.
    """
    _check(x, weight, None, residual, "add_rms_norm")
    y, h, _, _ = _norm_fwd_op(x, weight, None, residual, float(eps), True)
    return y.view(x.shape), h.view(x.shape)


# ----------------------------------------------------------------------------------------------
# Plain torch references (fp32 math, or fp64 when given fp64)
# ----------------------------------------------------------------------------------------------

def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    xf = x if x.dtype == torch.float64 else x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    xf = x if x.dtype == torch.float64 else x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Build report: every (kernel, configuration) norm_config can choose
# ----------------------------------------------------------------------------------------------

BUILD_DTYPES = ("fp32", "bf16", "fp16")


def reachable_configs(backward: bool) -> list[NormConfig]:
    """Every NormConfig norm_config can return: it depends on N only through next_power_of_2(N)
    up to the fused limit, and is one fixed config beyond it, so powers of two plus one wide N
    enumerate them all (tests check random N against this list)."""
    limit = MAX_FUSED_BWD if backward else MAX_FUSED_FWD
    sizes = [1 << k for k in range(limit.bit_length())] + [2 * limit]
    return list(dict.fromkeys(norm_config(n, backward) for n in sizes))


def build_specs() -> list:
    """One KernelSpec per (kernel, configuration, dtype) the wrapper can launch. Every feature flag
    is on (weight, bias for LayerNorm, residual), the variant with the most live registers; turning a
    flag off only removes loads and accumulators. Weight dtype = activation dtype here (an fp32
    weight with bf16 activations changes only the weight load)."""
    from ._spec import KernelSpec

    specs = []
    for dt in BUILD_DTYPES:
        for backward in (False, True):
            for is_rms in (False, True):
                for cfg in reachable_configs(backward):
                    kind = ("rmsnorm" if is_rms else "layernorm") + ("_bwd" if backward else "_fwd")
                    flags = dict(IS_RMS=is_rms, HAS_W=True, HAS_B=not is_rms)
                    if backward:
                        fn = _norm_bwd_kernel
                        sig = {"X": f"*{dt}", "W": f"*{dt}", "DY": f"*{dt}", "DH": f"*{dt}",
                               "DX": f"*{dt}", "Mean": "*fp32", "Rstd": "*fp32",
                               "DW_PART": "*fp32", "DB_PART": "*fp32", "M": "i32", "N": "i32",
                               "rows_per_program": "i32", "stride_x": "i32", "stride_dy": "i32",
                               "stride_dh": "i32", "stride_dx": "i32"}
                        flags["HAS_DRES"] = True
                    else:
                        fn = _norm_fwd_kernel
                        sig = {"X": f"*{dt}", "R": f"*{dt}", "Y": f"*{dt}", "H": f"*{dt}",
                               "W": f"*{dt}", "B": f"*{dt}", "Mean": "*fp32", "Rstd": "*fp32",
                               "M": "i32", "N": "i32", "stride_x": "i32", "stride_r": "i32",
                               "stride_y": "i32", "stride_h": "i32", "eps": "fp32"}
                        flags["HAS_RES"] = True
                    constexprs = dict(flags, BLOCK_N=cfg.BLOCK_N, ROWS=cfg.ROWS, CHUNKED=cfg.CHUNKED)
                    sig.update({k: "constexpr" for k in constexprs})
                    span = (f"N>{MAX_FUSED_BWD if backward else MAX_FUSED_FWD} chunked" if cfg.CHUNKED
                            else f"N<={cfg.BLOCK_N}")
                    label = f"{dt} {span} BLOCK_N={cfg.BLOCK_N} ROWS={cfg.ROWS}"
                    specs.append(KernelSpec(name=kind, fn=fn, signature=sig, constexprs=constexprs,
                                            num_warps=cfg.num_warps, num_stages=1, label=label))
    return specs

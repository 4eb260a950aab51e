"""Fused Triton kernels for `chunk_osdn`: both phases, forward and backward.

The chunked algebra of `chunk.py` (README.md has the derivation), with every intra-chunk
step done per chunk in one program that keeps its `C x C` matrices in registers, so no
`[B, H, NC, C, C]` temporary, mask or exp ever reaches memory except the inverse that the
backward pass reuses. The two chunk-to-chunk recurrences are the scans of `chunk_scan.py`.

Layout: tensors are chunked, `[B, H, NC, C, *]` contiguous, so row `t` of chunk
`i_c = (b * H + h) * NC + n` starts at `(i_c * C + t) * D`; `ToChunks` moves q and k into this
layout (L2-normalising them on the way). v and o, and their gradients, stay `[B, T, H, V]`: the
phase-2 kernels address their rows there (`_bthd_rows`), masking rows past T, so no copy of them
is made. Chunked q, k and the intermediates derived
from them are stored in a storage dtype (the inputs' 16-bit dtype, else float32). A product of two
stored operands runs in the storage dtype (exact: a product of two 16-bit numbers fits float32,
and it accumulates in float32); a product with a matrix computed in the kernel widens the stored
operand to float32 (`.to(tl.float32)`, tf32 or ieee). The state scans round the float32 state
to the storage dtype for their products, as fla does, and carry it in float32. Inverses, per-token vectors,
states passed in or out, and the gradients of the small per-token tensors are float32; the
gradient pieces that pass between backward kernels are summed in float32 and stored in the
storage dtype (`GRAD_STORAGE`).

Phase 1 (`Precondition`): `(k, beta, eta, lam, d0) -> (W = D * K, d_final)`
    forward:  `pre_intra_fwd` (L, (I + L)^{-1}, Y, dm, p, Gc) -> precond scan (e_n, delta) ->
              `pre_out_fwd` (E, W);
              with few scans the first two run side by side (`precond_fwd_overlap_kernel`),
              or, where a backward will follow, the scan runs in groups of chunks
              (`_precond_scan_grouped`: the groups' maps, their starts, the groups again)
    backward: `pre_y` (Y again) -> `pre_out_bwd` -> precond scan backward -> `pre_intra_bwd`;
              with few scans the first three run side by side (`precond_bwd_overlap_kernel`),
              or the scan runs in the forward's groups with its maps (`_precond_scan_bwd_grouped`)
Phase 2 (`DeltaRuleAsym`): `(q, k, w, v, beta, S0) -> (O, S_final)`
    forward:  `wy_fwd` (A, T = A^{-1}, Ub, Kb) -> state scan -> `out_fwd` (O)
    backward: `out_bwd` (dU, dS_n from O) -> state scan backward (dUb, dS_{n+1}) ->
              `state_grads` (dQ, dKb, dW: all that reads a state) -> `wy_bwd`
"""

from __future__ import annotations

import copy
import functools

import torch

from .chunk_scan import HAS_TRITON, _block_sizes
from .launch import block_width, cdiv, contiguous_or_none, enqueue

if HAS_TRITON:  # the kernels exist only with Triton; without it chunk.py never calls this module
    import triton
    import triton.language as tl

    from .chunk_scan import (
        _precond_scan_bwd_de_prefetching,
        _precond_scan_fwd_prefetching,
        _raise_flag,
        precond_group_maps_kernel,
        precond_group_starts_kernel,
        precond_scan_bwd_de_kernel,
        precond_scan_bwd_kernel,
        precond_scan_fwd_kernel,
        state_scan_bwd_kernel,
        state_scan_fwd_kernel,
    )

LAM_MIN = 1e-30  # lam is clamped here before its log (both chunk paths): log(0) would be -inf

if HAS_TRITON:

    @triton.jit
    def _unit_lower_inverse(b_a, o_c, C: tl.constexpr):
        """(I + A)^{-1} of a strictly lower triangular [C, C] `b_a`, by forward substitution.

        Row i of the inverse's strictly lower part is `-A_i - sum_{j<i} A_ij (T_j - e_j)`,
        built from the rows above it, which are already final. Used for chunks other than 32 and 64.
        """
        b_t = -b_a
        for i in range(1, C):
            m_i = o_c == i
            b_r = tl.sum(tl.where(m_i[:, None], b_t, 0.0), 0)  # [C] row i, so far -A_i
            b_r = b_r + tl.sum(b_r[:, None] * b_t, 0) * (o_c < i)
            b_t = tl.where(m_i[:, None], b_r[None, :], b_t)
        return b_t + (o_c[:, None] == o_c[None, :]).to(tl.float32)

    @triton.jit
    def _blk(buf, r: tl.constexpr, c: tl.constexpr, o16, C: tl.constexpr = 64):
        """Block (r, c) of the 16 x 16 grid of a row-major [C, C] buffer: its offsets."""
        return buf + (r * 16 + o16)[:, None] * C + (c * 16 + o16)[None, :]

    @triton.jit
    def _unit_lower_inverse_blocked(buf, C: tl.constexpr, DOUBLING: tl.constexpr = False):
        """Overwrite the strictly lower [C, C] `A` in `buf` (this program's own, row-major; C 32
        or 64) with `T = (I + A)^{-1}`, in 16 x 16 blocks.

        The C / 16 diagonal blocks are inverted together, on a [C / 16, 16, 16] tile: by forward
        substitution (15 steps, not C - 1 on [C, C]) or with DOUBLING by six batched products
        (`INVERSE`); the blocks below follow from
        `T_ij = -T_ii sum_{j <= k < i} A_ik T_kj` as 16 x 16 products. The caller stores `A`
        before and loads `T` after; the barriers order those accesses between warps.
        """
        NB: tl.constexpr = C // 16
        o16 = tl.arange(0, 16)
        ob = tl.arange(0, NB)
        o_d = (ob[:, None, None] * 16 + o16[None, :, None]) * C + ob[:, None, None] * 16 + o16[None, None, :]
        tl.debug_barrier()
        eye = (o16[:, None] == o16[None, :]).to(tl.float32)[None, :, :]
        if DOUBLING:
            # N nilpotent (N^16 = 0): (I + N)^{-1} = (I - N)(I + N^2)(I + N^4)(I + N^8), six
            # batched products on the [NB, 16, 16] tile instead of 15 dependent row steps
            b_n = tl.load(buf + o_d)
            b_t = eye - b_n
            for _ in tl.static_range(3):
                b_n = tl.dot(b_n, b_n, input_precision="ieee")
                b_t += tl.dot(b_t, b_n, input_precision="ieee")
        else:
            b_t = -tl.load(buf + o_d)  # [NB, 16, 16]: the diagonal blocks of -A
            for i in range(1, 16):
                m_i = (o16 == i)[None, :, None]
                b_r = tl.sum(tl.where(m_i, b_t, 0.0), 1)  # [NB, 16] row i of each block, so far -A_i
                b_r = b_r + tl.sum(b_r[:, :, None] * b_t, 1) * (o16 < i)[None, :]
                b_t = tl.where(m_i, b_r[:, None, :], b_t)
            b_t = b_t + eye
        # the blocks below the diagonal: T_21 at C = 32; at 64 the other five as well (names bound
        # under `C == 64` are used only under it: constexpr branches are inlined)
        a21 = tl.load(_blk(buf, 1, 0, o16, C))
        if C == 64:
            a31, a41 = tl.load(_blk(buf, 2, 0, o16)), tl.load(_blk(buf, 3, 0, o16))
            a32, a42, a43 = tl.load(_blk(buf, 2, 1, o16)), tl.load(_blk(buf, 3, 1, o16)), tl.load(_blk(buf, 3, 2, o16))
        tl.debug_barrier()  # every warp has read A before any overwrites it
        tl.store(buf + o_d, b_t)
        tl.debug_barrier()
        # every load before the first product, and every store after the last (as until 8ab7748,
        # which loaded T_33 and T_44 after T_21's product: one more barrier at C = 64, for the
        # products' shared memory; the overlapped forward launch at 1 x 16384, whose code differed
        # in nothing else, took 452 us at d295546 and 500-510 at ef9715a and 8aaade8, 447-451
        # with this order again: benchmarks/results/inv21_*.json)
        t11, t22 = tl.load(_blk(buf, 0, 0, o16, C)), tl.load(_blk(buf, 1, 1, o16, C))
        if C == 64:
            t33, t44 = tl.load(_blk(buf, 2, 2, o16)), tl.load(_blk(buf, 3, 3, o16))
        t21 = -tl.dot(tl.dot(t22, a21, input_precision="ieee"), t11, input_precision="ieee")
        if C == 64:
            t32 = -tl.dot(tl.dot(t33, a32, input_precision="ieee"), t22, input_precision="ieee")
            t43 = -tl.dot(tl.dot(t44, a43, input_precision="ieee"), t33, input_precision="ieee")
            b_x = tl.dot(a31, t11, input_precision="ieee") + tl.dot(a32, t21, input_precision="ieee")
            t31 = -tl.dot(t33, b_x, input_precision="ieee")
            b_x = tl.dot(a42, t22, input_precision="ieee") + tl.dot(a43, t32, input_precision="ieee")
            t42 = -tl.dot(t44, b_x, input_precision="ieee")
            b_x = tl.dot(a41, t11, input_precision="ieee") + tl.dot(a42, t21, input_precision="ieee")
            t41 = -tl.dot(t44, b_x + tl.dot(a43, t31, input_precision="ieee"), input_precision="ieee")
        tl.store(_blk(buf, 1, 0, o16, C), t21)
        if C == 64:
            tl.store(_blk(buf, 2, 1, o16), t32)
            tl.store(_blk(buf, 3, 2, o16), t43)
            tl.store(_blk(buf, 2, 0, o16), t31)
            tl.store(_blk(buf, 3, 1, o16), t42)
            tl.store(_blk(buf, 3, 0, o16), t41)
        tl.debug_barrier()

    @triton.jit
    def _invert(b_a, buf, o_c, C: tl.constexpr, DOUBLING: tl.constexpr = False):
        """T = (I + A)^{-1} of the strictly lower [C, C] `b_a`, also left in `buf` (the program's
        own [C, C] slot of the saved inverse)."""
        o_cc = o_c[:, None] * C + o_c[None, :]
        if C == 64 or C == 32:
            tl.store(buf + o_cc, b_a)
            _unit_lower_inverse_blocked(buf, C, DOUBLING)
            b_t = tl.load(buf + o_cc)
        else:
            b_t = _unit_lower_inverse(b_a, o_c, C)
            tl.store(buf + o_cc, b_t)
        return b_t

    @triton.jit
    def inverse_kernel(a, t, C: tl.constexpr, DOUBLING: tl.constexpr):
        """`_invert` alone on [C, C] blocks (`scripts/bench_inverse.py` times it): t = (I + A)^{-1},
        A the strictly lower part of a's block; t is also the scratch."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, C)
        b_a = tl.load(a + i_c * C * C + o_c[:, None] * C + o_c[None, :])
        _invert(tl.where(o_c[:, None] > o_c[None, :], b_a, 0.0), t + i_c * C * C, o_c, C, DOUBLING)

    # ---------------------------------------------------------------- layout

    @triton.jit
    def _bthd_rows(i_c, o_c, T, H, NC, C: tl.constexpr):
        """Rows `o_c` of chunk `i_c = (b * H + h) * NC + n` in a `[B, T, H, D]` tensor: their
        indices (times D gives the offset) and the mask of rows before T (the rest are the chunked
        layout's zero padding)."""
        i_bh = i_c // NC
        o_t = (i_c % NC) * C + o_c
        return ((i_bh // H) * T + o_t) * H + i_bh % H, o_t < T

    L2_EPS = tl.constexpr(1e-6)  # as utils.l2norm

    @triton.jit
    def to_chunks_kernel(x, y, T, H, NC, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, NORM: tl.constexpr):
        """`[B, T, H, D]` (any float dtype) -> `[B, H, NC, C, D]` in y's dtype, rows past T zero; with
        NORM every row L2-normalised on the way. One chunk per program."""
        i_c = tl.program_id(0).to(tl.int64)  # (b * H + h) * NC + n
        o_c, o_d = tl.arange(0, C), tl.arange(0, BD)
        r_x, m_r = _bthd_rows(i_c, o_c, T, H, NC, C)
        m_d = o_d[None, :] < D
        src = r_x[:, None] * D + o_d[None, :]
        b_x = tl.load(x + src, mask=m_r[:, None] & m_d, other=0.0).to(tl.float32)  # [C, BD]
        if NORM:
            b_x = b_x * tl.rsqrt(tl.sum(b_x * b_x, 1) + L2_EPS)[:, None]
        tl.store(y + (i_c * C + o_c)[:, None] * D + o_d[None, :], b_x, mask=m_d)

    @triton.jit
    def from_chunks_kernel(gy, x, gx, T, H, NC, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, NORM: tl.constexpr):
        """`[B, H, NC, C, D]` -> `[B, T, H, D]` in gx's dtype (rows past T dropped): the backward
        of `to_chunks_kernel`, through the L2 norm of the rows of `x` with NORM."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c, o_d = tl.arange(0, C), tl.arange(0, BD)
        r_x, m_r = _bthd_rows(i_c, o_c, T, H, NC, C)
        m = m_r[:, None] & (o_d[None, :] < D)
        dst = r_x[:, None] * D + o_d[None, :]
        b_g = tl.load(gy + (i_c * C + o_c)[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)  # [C, BD]
        if NORM:  # y = x r, r = (|x|^2 + eps)^(-1/2): dx = r (dy - y <y, dy>)
            b_x = tl.load(x + dst, mask=m, other=0.0).to(tl.float32)  # [C, BD]
            b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) + L2_EPS)
            b_y = b_x * b_r[:, None]
            b_g = b_r[:, None] * (b_g - b_y * tl.sum(b_y * b_g, 1)[:, None])
        tl.store(gx + dst, b_g, mask=m)

    @triton.jit
    def gates_to_chunks_kernel(beta, eta, lam, bc, ec, lc, T, H, NC, C: tl.constexpr):
        """beta, eta, lam `[B, T, H]` (any float dtype) -> `[B, H, NC, C]` float32, in one launch:
        rows past T are neutral (beta = eta = 0, lam = 1). One chunk per program."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, C)
        r_x, m_r = _bthd_rows(i_c, o_c, T, H, NC, C)
        dst = i_c * C + o_c
        tl.store(bc + dst, tl.load(beta + r_x, mask=m_r, other=0.0).to(tl.float32))
        tl.store(ec + dst, tl.load(eta + r_x, mask=m_r, other=0.0).to(tl.float32))
        tl.store(lc + dst, tl.load(lam + r_x, mask=m_r, other=1.0).to(tl.float32))

    @triton.jit
    def gates_from_chunks_kernel(gbc, gec, glc, gbeta, geta, glam, T, H, NC, C: tl.constexpr):
        """The backward of `gates_to_chunks_kernel`: `[B, H, NC, C]` float32 gradients -> `[B, T, H]`
        in each output's dtype (rows past T dropped)."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, C)
        r_x, m_r = _bthd_rows(i_c, o_c, T, H, NC, C)
        src = i_c * C + o_c
        tl.store(gbeta + r_x, tl.load(gbc + src), mask=m_r)
        tl.store(geta + r_x, tl.load(gec + src), mask=m_r)
        tl.store(glam + r_x, tl.load(glc + src), mask=m_r)

    # ---------------------------------------------------------------- phase 2 forward

    @triton.jit
    def _wy_a_block(k, w, b_a, i_k, o_t, K: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        """`wy_fwd_kernel` on the K block at `i_k`: K W^T's sum with this block's share added."""
        o_k = i_k + tl.arange(0, BK)
        m = o_k[None, :] < K
        b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0)  # [C, BK]
        b_w = tl.load(w + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0)  # [C, BK]
        return b_a + tl.dot(b_k, tl.trans(b_w), input_precision=PRECISION)

    @triton.jit
    def _wy_ub_block(v, ub, b_t, b_b, i_v, o_t, r_v, m_r, V: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
        """`wy_fwd_kernel` on the V block at `i_v`: those columns of Ub = T diag(b) V."""
        o_v = i_v + tl.arange(0, BV)
        m = o_v[None, :] < V
        b_v = tl.load(v + r_v[:, None] * V + o_v[None, :], mask=m_r[:, None] & m, other=0.0)  # [C, BV]
        b_ub = tl.dot(b_t, (b_v * b_b[:, None]).to(b_v.dtype), input_precision=PRECISION)
        tl.store(ub + o_t[:, None] * V + o_v[None, :], b_ub, mask=m)

    @triton.jit
    def wy_fwd_kernel(
        k, w, v, beta, scratch, tinv, ub, kb, T, H, NC,
        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        PRECISION: tl.constexpr, DOUBLING: tl.constexpr = False, UNROLL: tl.constexpr = True,
        STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """T = (I + tril(diag(b) K W^T, -1))^{-1}, Ub = T diag(b) V, Kb = T diag(b) K; one chunk per program.

        T is inverted in float32 (`scratch`, the program's [C, C] slot) and saved in the storage
        dtype (`tinv`), the dtype its products with V and K run in. v is `[B, T, H, V]`. With
        UNROLL off the loops over blocks stay loops, pipelined STAGES deep (`_chunk_launch`)."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        r_v, m_r = _bthd_rows(i_c, o_c, T, H, NC, C)
        b_b = tl.load(beta + o_t)
        b_a = tl.zeros([C, C], dtype=tl.float32)
        if UNROLL:
            for i_k in tl.static_range(0, K, BK):
                b_a = _wy_a_block(k, w, b_a, i_k, o_t, K, BK, PRECISION)
        else:
            for i_k in tl.range(0, K, BK, num_stages=STAGES):
                b_a = _wy_a_block(k, w, b_a, i_k, o_t, K, BK, PRECISION)
        b_a = tl.where(o_c[:, None] > o_c[None, :], b_a * b_b[:, None], 0.0)
        b_t = _invert(b_a, scratch + i_c * C * C, o_c, C, DOUBLING).to(tinv.dtype.element_ty)
        tl.store(tinv + i_c * C * C + o_c[:, None] * C + o_c[None, :], b_t)
        if UNROLL:
            for i_v in tl.static_range(0, V, BV):
                _wy_ub_block(v, ub, b_t, b_b, i_v, o_t, r_v, m_r, V, BV, PRECISION)
        else:
            for i_v in tl.range(0, V, BV, num_stages=STAGES):
                _wy_ub_block(v, ub, b_t, b_b, i_v, o_t, r_v, m_r, V, BV, PRECISION)
        _walk_k_blocks(_kb_block, k, kb, b_t, b_b, o_t, K, BK, PRECISION, UNROLL, STAGES)

    @triton.jit
    def _walk_k_blocks(
        BLOCK: tl.constexpr, k, out, b_mat, b_vec, o_t,
        K: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """`BLOCK(k, out, b_mat, b_vec, i_k, o_t, K, BK, PRECISION)` on every K block of one chunk
        (`_kb_block`, `_y_block`): unrolled, or with UNROLL off as a loop pipelined STAGES deep."""
        if UNROLL:
            for i_k in tl.static_range(0, K, BK):
                BLOCK(k, out, b_mat, b_vec, i_k, o_t, K, BK, PRECISION)
        else:
            for i_k in tl.range(0, K, BK, num_stages=STAGES):
                BLOCK(k, out, b_mat, b_vec, i_k, o_t, K, BK, PRECISION)

    @triton.jit
    def _kb_block(k, kb, b_t, b_b, i_k, o_t, K: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        """Kb = T diag(b) K of one chunk (T `[C, C]` in the storage dtype) on the K block at `i_k`,
        written to `kb`."""
        o_k = i_k + tl.arange(0, BK)
        m = o_k[None, :] < K
        b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0)  # [C, BK]
        b_kb = tl.dot(b_t, (b_k * b_b[:, None]).to(b_k.dtype), input_precision=PRECISION)
        tl.store(kb + o_t[:, None] * K + o_k[None, :], b_kb, mask=m)

    @triton.jit
    def kb_kernel(k, beta, tinv, kb, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        """Kb = T diag(b) K again from the saved T, as `wy_fwd_kernel` made it: the backward's
        reverse state scan reads it, and the forward does not keep it. One chunk per program."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        b_t = tl.load(tinv + i_c * C * C + o_c[:, None] * C + o_c[None, :])
        _walk_k_blocks(_kb_block, k, kb, b_t, tl.load(beta + o_t), o_t, K, BK, PRECISION, True, 1)

    @triton.jit
    def out_fwd_kernel(
        q, w, u, ss, o, scale, T, H, NC,
        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """O = scale (Q S_n + tril(Q W^T) U), written to `[B, T, H, V]`; one (V block, chunk) per program."""
        i_v, i_c = tl.program_id(0), tl.program_id(1).to(tl.int64)
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_o = tl.zeros([C, BV], dtype=tl.float32)
        b_m = tl.zeros([C, C], dtype=tl.float32)
        for i_k in tl.static_range(0, K, BK):
            o_k = i_k + tl.arange(0, BK)
            m_k = o_k < K
            b_q = tl.load(q + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
            b_w = tl.load(w + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
            m_kv = m_k[:, None] & m_v[None, :]
            b_s = tl.load(ss + i_c * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_o += tl.dot(b_q, b_s, input_precision=PRECISION)
            b_m += tl.dot(b_q, tl.trans(b_w), input_precision=PRECISION)
        b_m = tl.where(o_c[:, None] >= o_c[None, :], b_m, 0.0)
        b_u = tl.load(u + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_o = scale * (b_o + tl.dot(b_m.to(b_u.dtype), b_u, input_precision=PRECISION))
        r_o, m_r = _bthd_rows(i_c, o_c, T, H, NC, C)
        tl.store(o + r_o[:, None] * V + o_v[None, :], b_o, mask=m_r[:, None] & m_v[None, :])

    # ---------------------------------------------------------------- phase 2 backward

    @triton.jit
    def _out_bwd_block(
        q, w, do, gss, scale, b_m, i_k, i_c, o_t, r_o, m_r,
        K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """`out_bwd_kernel`'s work on the K block at `i_k`: its `gss` rows; returns M's sum with
        this block's share added."""
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
        b_w = tl.load(w + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
        b_m += tl.dot(b_q, tl.trans(b_w), input_precision=PRECISION)
        for i_v in tl.static_range(0, V, BV):
            o_v = i_v + tl.arange(0, BV)
            m_v = o_v < V
            b_do = tl.load(do + r_o[:, None] * V + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
            b_gs = scale * tl.dot(tl.trans(b_q), b_do, input_precision=PRECISION)
            tl.store(gss + i_c * K * V + o_k[:, None] * V + o_v[None, :], b_gs, mask=m_k[:, None] & m_v[None, :])
        return b_m

    @triton.jit
    def out_bwd_kernel(
        q, w, do, du, gss, scale, T, H, NC,
        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        PRECISION: tl.constexpr, UNROLL: tl.constexpr = True, STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """What the reverse state scan needs from O = scale (Q S_n + M U), M = tril(Q W^T): the
        output's dU = scale M^T dO, and its share of the gradient of the chunk-start state S_n,
        scale Q^T dO (`gss`). It reads no state: dQ and the output's share of dW, which do, come
        after the scan (`state_grads_kernel`). dO is `[B, T, H, V]`. With UNROLL off the loop over
        K blocks stays a loop in the compiled code, pipelined STAGES deep (`_chunk_launch`)."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        r_o, m_r = _bthd_rows(i_c, o_c, T, H, NC, C)
        b_m = tl.zeros([C, C], dtype=tl.float32)  # scale tril(Q W^T)
        if UNROLL:
            for i_k in tl.static_range(0, K, BK):
                b_m = _out_bwd_block(q, w, do, gss, scale, b_m, i_k, i_c, o_t, r_o, m_r, K, V, BK, BV, PRECISION)
        else:
            for i_k in tl.range(0, K, BK, num_stages=STAGES):
                b_m = _out_bwd_block(q, w, do, gss, scale, b_m, i_k, i_c, o_t, r_o, m_r, K, V, BK, BV, PRECISION)
        b_m = tl.where(o_c[:, None] >= o_c[None, :], b_m * scale, 0.0)
        for i_v in tl.static_range(0, V, BV):
            o_v = i_v + tl.arange(0, BV)
            m = o_v[None, :] < V
            b_do = tl.load(do + r_o[:, None] * V + o_v[None, :], mask=m_r[:, None] & m, other=0.0)
            b_du = tl.dot(tl.trans(b_m).to(b_do.dtype), b_do, input_precision=PRECISION)
            tl.store(du + o_t[:, None] * V + o_v[None, :], b_du, mask=m)

    @triton.jit
    def _state_grads_v_block(
        uo, ss, do, dub, dss, b_dm, b_dq, b_dkb, b_dws, i_v, i_c, o_t, o_k, m_k, r_o, m_r,
        K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """`state_grads_kernel` on the V block at `i_v`: the four sums with its share added."""
        o_v = i_v + tl.arange(0, BV)
        m_v = o_v < V
        o_vk = i_c * K * V + o_k[None, :] * V + o_v[:, None]  # [BV, BK]: S^T
        m_vk = m_v[:, None] & m_k[None, :]
        o_tv = o_t[:, None] * V + o_v[None, :]  # [C, BV]
        b_do = tl.load(do + r_o[:, None] * V + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
        b_u = tl.load(uo + o_tv, mask=m_v[None, :], other=0.0)  # [C, BV]
        b_st = tl.load(ss + o_vk, mask=m_vk, other=0.0)  # [BV, BK] S_n^T
        b_dm += tl.dot(b_do, tl.trans(b_u), input_precision=PRECISION)
        b_dq += tl.dot(b_do, b_st, input_precision=PRECISION)
        b_du = tl.load(dub + o_tv, mask=m_v[None, :], other=0.0)  # [C, BV]
        b_dkb -= tl.dot(b_du, b_st, input_precision=PRECISION)
        b_dst = tl.load(dss + o_vk, mask=m_vk, other=0.0)  # [BV, BK] dS_{n+1}^T
        b_dws += tl.dot(b_u, b_dst, input_precision=PRECISION)
        return b_dm, b_dq, b_dkb, b_dws

    @triton.jit
    def state_grads_kernel(
        q, w, uo, ss, do, dub, dss, dq, dkb, dw, scale, T, H, NC,
        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        PRECISION: tl.constexpr, UNROLL: tl.constexpr = True, STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """After the reverse state scan, every gradient that reads a per-chunk state, one (K block,
        chunk) per program: dQ = scale dO S_n^T + dM W with dM = scale tril(dO U^T) (from the
        output); dKb = -dUb S_n^T (from the scan); and dW = dM^T Q + U dS_{n+1}^T (output and
        scan), written to `dw` (`GRAD_STORAGE`) for `wy_bwd_kernel` to add to. dO is `[B, T, H, V]`.
        With UNROLL off the loop over V blocks stays a loop, pipelined STAGES deep."""
        i_k, i_c = tl.program_id(0), tl.program_id(1).to(tl.int64)
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        r_o, m_r = _bthd_rows(i_c, o_c, T, H, NC, C)
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_dm = tl.zeros([C, C], dtype=tl.float32)
        b_dq = tl.zeros([C, BK], dtype=tl.float32)
        b_dkb = tl.zeros([C, BK], dtype=tl.float32)
        b_dws = tl.zeros([C, BK], dtype=tl.float32)
        if UNROLL:
            for i_v in tl.static_range(0, V, BV):
                b_dm, b_dq, b_dkb, b_dws = _state_grads_v_block(
                    uo, ss, do, dub, dss, b_dm, b_dq, b_dkb, b_dws,
                    i_v, i_c, o_t, o_k, m_k, r_o, m_r, K, V, BV, PRECISION,
                )  # fmt: skip
        else:
            for i_v in tl.range(0, V, BV, num_stages=STAGES):
                b_dm, b_dq, b_dkb, b_dws = _state_grads_v_block(
                    uo, ss, do, dub, dss, b_dm, b_dq, b_dkb, b_dws,
                    i_v, i_c, o_t, o_k, m_k, r_o, m_r, K, V, BV, PRECISION,
                )  # fmt: skip
        b_dm = tl.where(o_c[:, None] >= o_c[None, :], b_dm * scale, 0.0)
        o_tk = o_t[:, None] * K + o_k[None, :]
        b_q = tl.load(q + o_tk, mask=m_k[None, :], other=0.0)
        b_w = tl.load(w + o_tk, mask=m_k[None, :], other=0.0)
        b_dq = scale * b_dq + tl.dot(b_dm.to(b_w.dtype), b_w, input_precision=PRECISION)
        tl.store(dq + o_tk, b_dq, mask=m_k[None, :])
        tl.store(dkb + o_tk, b_dkb, mask=m_k[None, :])
        b_dws += tl.dot(tl.trans(b_dm).to(b_q.dtype), b_q, input_precision=PRECISION)
        tl.store(dw + o_tk, b_dws, mask=m_k[None, :])

    @triton.jit
    def _wy_bwd_v_block(
        v, dub, dv, b_t, b_b, b_dt, b_db, i_v, o_t, r_v, m_r, V: tl.constexpr, BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """`wy_bwd_kernel` on the V block at `i_v`: dV's columns; dT's and db's sums with them."""
        o_v = i_v + tl.arange(0, BV)
        m = o_v[None, :] < V
        b_v = tl.load(v + r_v[:, None] * V + o_v[None, :], mask=m_r[:, None] & m, other=0.0)
        b_dub = tl.load(dub + o_t[:, None] * V + o_v[None, :], mask=m, other=0.0)
        b_dt += tl.dot(b_dub, tl.trans((b_v * b_b[:, None]).to(b_v.dtype)), input_precision=PRECISION)
        b_dvb = tl.dot(tl.trans(b_t), b_dub, input_precision=PRECISION)  # d(diag(b) V)
        tl.store(dv + r_v[:, None] * V + o_v[None, :], b_dvb * b_b[:, None], mask=m_r[:, None] & m)
        b_db += tl.sum(b_dvb * b_v.to(tl.float32), 1)
        return b_dt, b_db

    @triton.jit
    def _wy_bwd_kw_block(
        k, w, dk, b_b, b_dt, b_kw, i_k, o_t, K: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr
    ):
        """`wy_bwd_kernel` on the K block at `i_k`, first pass: dT's and K W^T's sums with it."""
        o_k = i_k + tl.arange(0, BK)
        m = o_k[None, :] < K
        b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0)
        b_w = tl.load(w + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0)
        b_dkb = tl.load(dk + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        b_dt += tl.dot(b_dkb, tl.trans(b_k.to(tl.float32) * b_b[:, None]), input_precision=PRECISION)
        b_kw += tl.dot(b_k, tl.trans(b_w), input_precision=PRECISION)
        return b_dt, b_kw

    @triton.jit
    def _wy_bwd_k_block(
        k, w, dk, dw, dk_out, dw_out, b_t, b_b, b_dab, b_db, i_k, o_t,
        K: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """`wy_bwd_kernel` on the K block at `i_k`, second pass: dK's and dW's columns; db's sum."""
        o_k = i_k + tl.arange(0, BK)
        m = o_k[None, :] < K
        b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0)
        b_w = tl.load(w + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0)
        b_dkb = tl.load(dk + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        tl.debug_barrier()  # every warp has read this block of dKb before dK may overwrite it
        b_dkbb = tl.dot(tl.trans(b_t), b_dkb, input_precision=PRECISION)  # d(diag(b) K)
        b_db += tl.sum(b_dkbb * b_k.to(tl.float32), 1)
        b_dk = b_dkbb * b_b[:, None] + tl.dot(b_dab.to(b_w.dtype), b_w, input_precision=PRECISION)
        tl.store(dk_out + o_t[:, None] * K + o_k[None, :], b_dk, mask=m)
        b_dw = tl.dot(tl.trans(b_dab).to(b_k.dtype), b_k, input_precision=PRECISION)
        b_dw += tl.load(dw + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(dw_out + o_t[:, None] * K + o_k[None, :], b_dw, mask=m)
        return b_db

    @triton.jit
    def wy_bwd_kernel(
        k, w, v, beta, tinv, dub, dk, dw, dk_out, dw_out, dv, dbeta, T, H, NC,
        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        PRECISION: tl.constexpr, UNROLL: tl.constexpr = True, STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """Through Ub = T diag(b) V, Kb = T diag(b) K, T = (I + A)^{-1}, A = tril(diag(b) K W^T, -1),
        `dk` holds dKb and `dw` the other shares of dW (in `GRAD_STORAGE`'s dtype); dK and all of
        dW go to `dk_out` and `dw_out` (k's dtype; they may be `dk` and `dw`). v and dv are
        `[B, T, H, V]`. With UNROLL off the loops over blocks stay loops, pipelined STAGES deep
        (`_chunk_launch`)."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        r_v, m_r = _bthd_rows(i_c, o_c, T, H, NC, C)
        b_b = tl.load(beta + o_t)
        b_t = tl.load(tinv + i_c * C * C + o_c[:, None] * C + o_c[None, :])  # the storage dtype
        b_dt = tl.zeros([C, C], dtype=tl.float32)
        b_db = tl.zeros([C], dtype=tl.float32)
        if UNROLL:
            for i_v in tl.static_range(0, V, BV):
                b_dt, b_db = _wy_bwd_v_block(v, dub, dv, b_t, b_b, b_dt, b_db, i_v, o_t, r_v, m_r, V, BV, PRECISION)
        else:
            for i_v in tl.range(0, V, BV, num_stages=STAGES):
                b_dt, b_db = _wy_bwd_v_block(v, dub, dv, b_t, b_b, b_dt, b_db, i_v, o_t, r_v, m_r, V, BV, PRECISION)
        b_kw = tl.zeros([C, C], dtype=tl.float32)
        if UNROLL:
            for i_k in tl.static_range(0, K, BK):
                b_dt, b_kw = _wy_bwd_kw_block(k, w, dk, b_b, b_dt, b_kw, i_k, o_t, K, BK, PRECISION)
        else:
            for i_k in tl.range(0, K, BK, num_stages=STAGES):
                b_dt, b_kw = _wy_bwd_kw_block(k, w, dk, b_b, b_dt, b_kw, i_k, o_t, K, BK, PRECISION)
        # dA = -T^T dT T^T on the strictly lower part
        b_t = b_t.to(tl.float32)
        b_da = tl.dot(tl.trans(b_t), b_dt, input_precision=PRECISION)
        b_da = -tl.dot(b_da, tl.trans(b_t), input_precision=PRECISION)
        b_da = tl.where(o_c[:, None] > o_c[None, :], b_da, 0.0)
        b_db += tl.sum(b_da * b_kw, 1)
        b_dab = b_da * b_b[:, None]
        if UNROLL:
            for i_k in tl.static_range(0, K, BK):
                b_db = _wy_bwd_k_block(k, w, dk, dw, dk_out, dw_out, b_t, b_b, b_dab, b_db, i_k, o_t, K, BK, PRECISION)
        else:
            for i_k in tl.range(0, K, BK, num_stages=STAGES):
                b_db = _wy_bwd_k_block(k, w, dk, dw, dk_out, dw_out, b_t, b_b, b_dab, b_db, i_k, o_t, K, BK, PRECISION)
        tl.store(dbeta + o_t, b_db)

    # ---------------------------------------------------------------- phase 1 forward

    LAM_MIN_C = tl.constexpr(LAM_MIN)

    @triton.jit
    def _log_gates(lam, o_t, o_c, C: tl.constexpr):
        """g = cumsum(log lam) (inclusive), gp = g - log lam (exclusive), and g at the chunk's end."""
        b_l = tl.log(tl.maximum(tl.load(lam + o_t), LAM_MIN_C))
        b_g = tl.cumsum(b_l, 0)
        b_gend = tl.sum(tl.where(o_c == C - 1, b_g, 0.0), 0)
        return b_g, b_g - b_l, b_gend

    @triton.jit
    def _pre_intra_sums(
        k, b_b, b_eta, o_t, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr
    ):
        """What phase 1's per-chunk step builds from one chunk's keys before its inverse: U U^T
        (u = k * k), U's row sums, the strengths a = eta b^2 and m = eta b (1 - b sum(u)). (The
        backward sums the first two in its first pass over k, `_pre_intra_bwd_sums_block`.)"""
        b_uu = tl.zeros([C, C], dtype=tl.float32)
        b_su = tl.zeros([C], dtype=tl.float32)
        for i_k in tl.static_range(0, K, BK):
            o_k = i_k + tl.arange(0, BK)
            m = o_k[None, :] < K
            b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)  # [C, BK]
            b_u = b_k * b_k
            b_uu += tl.dot(b_u, tl.trans(b_u), input_precision=PRECISION)
            b_su += tl.sum(b_u, 1)
        return b_uu, b_su, b_eta * b_b * b_b, b_eta * b_b * (1 - b_b * b_su)

    @triton.jit
    def _pre_intra_chunk(
        i_c, k, beta, eta, lam, y, r, dm, p, gc, tinv,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, DOUBLING: tl.constexpr,
    ):  # fmt: skip
        """`pre_intra_fwd_kernel`'s work on chunk `i_c`."""
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        b_b = tl.load(beta + o_t)
        b_eta = tl.load(eta + o_t)
        b_g, b_gp, b_gend = _log_gates(lam, o_t, o_c, C)
        b_uu, b_su, b_a, b_m = _pre_intra_sums(k, b_b, b_eta, o_t, K, C, BK, PRECISION)
        strict = o_c[:, None] > o_c[None, :]
        b_l = tl.where(strict, b_a[:, None] * tl.exp(tl.where(strict, b_gp[:, None] - b_gp[None, :], 0.0)) * b_uu, 0.0)
        b_ti = _invert(b_l, tinv + i_c * C * C, o_c, C, DOUBLING)
        tl.store(dm + o_t, tl.sum(b_ti * b_m[None, :], 1))
        b_r = b_a * tl.exp(b_gp)  # Y = (I + L)^{-1} diag(r) U
        if y is not None:
            _walk_k_blocks(_y_block, k, y, b_ti, b_r, o_t, K, BK, PRECISION, True, 1)
        if r is not None:
            tl.store(r + o_t, b_r)
        tl.store(p + o_t, tl.exp(b_gend - b_gp))
        tl.store(gc + i_c, tl.exp(b_gend))

    @triton.jit
    def pre_intra_fwd_kernel(
        k, beta, eta, lam, y, r, dm, p, gc, tinv,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, DOUBLING: tl.constexpr = False,
    ):  # fmt: skip
        """Per chunk: L[t, s] = a_t G_{t-1} / G_{s-1} <u_t, u_s> (s < t), [dm, Y] = (I + L)^{-1}
        [m, diag(r) U] with r = a G_{t-1}, p_s = G_C / G_{s-1}, Gc = G_C; u = k * k is formed where
        needed (here, in the scan and in the backward) and never stored. Y is written only where `y`
        is not None, r only where `r` is not None: the op's scan reads (I + L)^{-1} and r instead of
        Y (`precond_scan_fwd_kernel`), and Y is not made at all."""
        i_c = tl.program_id(0).to(tl.int64)
        _pre_intra_chunk(i_c, k, beta, eta, lam, y, r, dm, p, gc, tinv, K, C, BK, PRECISION, DOUBLING)

    @triton.jit
    def _worker_chunk(j, BH, NC, LAST_FIRST: tl.constexpr):
        """The chunk an overlapped launch's workers make `j`-th: in the order its scans read them,
        one chunk of every (batch, head) in turn, from the first chunks or, LAST_FIRST, the last."""
        n = j // BH
        if LAST_FIRST:
            n = NC - 1 - n
        return ((j % BH) * NC + n).to(tl.int64)

    @triton.jit(do_not_specialize=["NC", "BH", "NW"])
    def precond_fwd_overlap_kernel(
        k, beta, eta, lam, y, r, dm, p, gc, tinv, d0, es, df, dl, ready, NC, BH, NW,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, SBK: tl.constexpr, PRECISION: tl.constexpr,
        DOUBLING: tl.constexpr = False, RUN: tl.constexpr = 1,
    ):  # fmt: skip
        """`pre_intra_fwd_kernel` and the preconditioner's forward scan (`precond_scan_fwd_kernel`
        with PREFETCH; with `r` it reads the inverse and r, not Y) in one launch of NW + BH
        programs, so that the scans, BH programs alone, run while the chunks they read are still
        being made instead of after.

        `ready` holds a flag per chunk and, after them, a ticket counter, all zero. Each program
        takes a ticket as it starts: the first NW are workers, which make the chunks in chunk-index
        order (chunk 0 of every (batch, head), then chunk 1, ...; a worker takes every NW-th) and
        raise each one's flag once it is written; the last BH run the scans (SBK wide), which wait
        for each chunk's flag before reading it. Workers never wait, and every worker started
        before any scan did, so the scans cannot hold the GPU while a chunk they need is not being
        made; even run one program at a time (Triton's interpreter) the launch finishes. NC, BH
        and NW are not specialized (the scans' NC == 1 miscompile, chunk_scan._scan_jit). A scan
        reads the flags RUN chunks at a time (`SCAN_TUNING[...]["flag_run"]`)."""
        ticket = tl.atomic_add(ready + BH * NC, 1)
        if ticket < NW:
            for j in range(ticket, NC * BH, NW):
                i_c = _worker_chunk(j, BH, NC, False)
                _pre_intra_chunk(i_c, k, beta, eta, lam, y, r, dm, p, gc, tinv, K, C, BK, PRECISION, DOUBLING)
                _raise_flag(ready + i_c)
        else:
            i_bh = (ticket - NW).to(tl.int64)
            rows = y if r is None else tinv  # with r the scan reads the inverse, not Y
            _precond_scan_fwd_prefetching(rows, k, dm, p, gc, d0, es, df, dl, ready, i_bh, NC, K, C, SBK, True, RUN, r)

    @triton.jit
    def _y_block(k, y, b_ti, b_r, i_k, o_t, K: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        """Y = (I + L)^{-1} diag(a G_{t-1}) U of one chunk (`b_r` = a G_{t-1}) on the K block at
        `i_k`, written to `y`."""
        o_k = i_k + tl.arange(0, BK)
        m = o_k[None, :] < K
        b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)  # [C, BK]
        b_y = tl.dot(b_ti, b_k * b_k * b_r[:, None], input_precision=PRECISION)
        tl.store(y + o_t[:, None] * K + o_k[None, :], b_y, mask=m)

    @triton.jit
    def _pre_y_chunk(
        i_c, k, beta, eta, lam, tinv, y,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
        UNROLL: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """`pre_y_kernel`'s work on chunk `i_c`."""
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        b_b = tl.load(beta + o_t)
        _, b_gp, _ = _log_gates(lam, o_t, o_c, C)
        b_ti = tl.load(tinv + i_c * C * C + o_c[:, None] * C + o_c[None, :])
        b_r = tl.load(eta + o_t) * b_b * b_b * tl.exp(b_gp)
        _walk_k_blocks(_y_block, k, y, b_ti, b_r, o_t, K, BK, PRECISION, UNROLL, STAGES)

    @triton.jit
    def pre_y_kernel(
        k, beta, eta, lam, tinv, y,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
        UNROLL: tl.constexpr = True, STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """Y from the saved (I + L)^{-1}, as `pre_intra_fwd_kernel` makes it given `y`: the
        backward reads it, and the forward does not form it (its scan reads the inverse). One
        chunk per program; with UNROLL off the loop over K blocks stays a loop, pipelined STAGES
        deep."""
        i_c = tl.program_id(0).to(tl.int64)
        _pre_y_chunk(i_c, k, beta, eta, lam, tinv, y, K, C, BK, PRECISION, UNROLL, STAGES)

    @triton.jit
    def _decay_matrix(b_g, b_gp, o_c, TRANSPOSED: tl.constexpr):
        """`P[t, s] = G_t / G_{s-1}` (s <= t) from the log gates, or with TRANSPOSED `P^T`, formed
        as such: as a product's operand it then needs no transpose, which in pre_out_bwd took
        registers (179 -> 168 at 3 stages, offline) and time (186-188 -> 178 us at 4 x 4096,
        benchmarks/results/launch_sweep_pre_out_bwd_pt_*.json)."""
        if TRANSPOSED:
            incl = o_c[:, None] <= o_c[None, :]
            b_d = b_g[None, :] - b_gp[:, None]
        else:
            incl = o_c[:, None] >= o_c[None, :]
            b_d = b_g[:, None] - b_gp[None, :]
        return tl.where(incl, tl.exp(tl.where(incl, b_d, 0.0)), 0.0)

    @triton.jit
    def pre_out_fwd_kernel(
        k, lam, dl, es, w,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """E = G e_n^T + P (delta * U) with P[t, s] = G_t / G_{s-1} (s <= t), W = (1 + E) * K;
        delta = dm - Y e_n comes from the scan, which forms it (`dl`), so Y is not read here. One
        chunk per program."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        b_delta = tl.load(dl + o_t)
        b_g, b_gp, _ = _log_gates(lam, o_t, o_c, C)
        b_p, b_eg = _decay_matrix(b_g, b_gp, o_c, False), tl.exp(b_g)
        for i_k in tl.static_range(0, K, BK):
            o_k = i_k + tl.arange(0, BK)
            m_k = o_k < K
            b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32)
            b_e = tl.load(es + i_c * K + o_k, mask=m_k, other=0.0)[None, :]
            b_ee = b_eg[:, None] * b_e + tl.dot(b_p, b_k * b_k * b_delta[:, None], input_precision=PRECISION)
            tl.store(w + o_t[:, None] * K + o_k[None, :], (1 + b_ee) * b_k, mask=m_k[None, :])

    # ---------------------------------------------------------------- phase 1 backward

    @triton.jit
    def _pre_out_bwd_block(
        k, es, dw, dk, du, ges, b_p, b_pt, b_eg, b_delta, b_ddelta, b_dg, i_k, i_c, o_c, o_t,
        K: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """`pre_out_bwd_kernel` on the K block at `i_k`: dK's direct part, dU's columns and e_n's
        gradient through G (into `ges`); the sums of d(delta) and dg with them. `b_pt` is P^T."""
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32)
        b_e = tl.load(es + i_c * K + o_k, mask=m_k, other=0.0)[None, :]
        b_dw = tl.load(dw + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32)
        b_u = b_k * b_k
        b_ee = b_eg[:, None] * b_e + tl.dot(b_p, b_u * b_delta[:, None], input_precision=PRECISION)
        b_de = b_dw * b_k  # dE
        # g_t enters E_t = G_t e_n + sum_s G_t / G_{s-1} (delta_s u_s): its gradient is <dE_t, E_t>
        b_dg += tl.sum(b_de * b_ee, 1)
        b_deg = b_de * b_eg[:, None]
        tl.store(ges + i_c * K + o_k, tl.sum(b_deg, 0), mask=m_k)
        b_pde = tl.dot(b_pt, b_de, input_precision=PRECISION)  # d(delta * U)
        b_ddelta += tl.sum(b_pde * b_u, 1)
        b_dk = b_dw * (1 + b_ee)
        if du is None:  # dU's share folded into dK: d(k * k) = 2 k du
            b_dk += 2 * b_k * b_pde * b_delta[:, None]
        else:
            tl.store(du + o_t[:, None] * K + o_k[None, :], b_pde * b_delta[:, None], mask=m_k[None, :])
        tl.store(dk + o_t[:, None] * K + o_k[None, :], b_dk, mask=m_k[None, :])
        return b_ddelta, b_dg

    @triton.jit
    def _pre_out_bwd_chunk(
        i_c, k, lam, dl, es, dw, dk, ddm, du, dg, dgp, ges,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
        UNROLL: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """`pre_out_bwd_kernel`'s work on chunk `i_c`."""
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        b_delta = tl.load(dl + o_t)
        b_g, b_gp, _ = _log_gates(lam, o_t, o_c, C)
        b_p, b_pt = _decay_matrix(b_g, b_gp, o_c, False), _decay_matrix(b_g, b_gp, o_c, True)
        b_eg = tl.exp(b_g)
        b_ddelta = tl.zeros([C], dtype=tl.float32)
        b_dg = tl.zeros([C], dtype=tl.float32)
        if UNROLL:
            for i_k in tl.static_range(0, K, BK):
                b_ddelta, b_dg = _pre_out_bwd_block(
                    k, es, dw, dk, du, ges, b_p, b_pt, b_eg, b_delta, b_ddelta, b_dg, i_k, i_c, o_c, o_t,
                    K, BK, PRECISION,
                )  # fmt: skip
        else:  # `_chunk_launch`
            for i_k in tl.range(0, K, BK, num_stages=STAGES):
                b_ddelta, b_dg = _pre_out_bwd_block(
                    k, es, dw, dk, du, ges, b_p, b_pt, b_eg, b_delta, b_ddelta, b_dg, i_k, i_c, o_c, o_t,
                    K, BK, PRECISION,
                )  # fmt: skip
        tl.store(dg + o_t, b_dg)
        tl.store(dgp + o_t, -b_delta * b_ddelta)
        tl.store(ddm + o_t, b_ddelta)

    @triton.jit
    def pre_out_bwd_kernel(
        k, lam, dl, es, dw, dk, ddm, du, dg, dgp, ges,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
        UNROLL: tl.constexpr = True, STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """Through W = (1 + E) * K, E = G e_n^T + P (delta * U), delta = dm - Y e_n (`dl`, as
        `pre_out_fwd_kernel` saved it: Y is not read here).

        Writes dK (the direct part), d(dm), dU (the part through E; with `du` None, as the split
        backward runs it, dU's share is added to dK instead, as `2 k dU`), the gradients of the log
        gates `g` and `gp` through G and P, and the gradient of e_n through G (`ges`). dY is not
        written: it is `-d(dm) e_n^T` here and in the scan alike, so the next kernels rebuild it.
        e_n's gradient through delta, `-Y^T d(delta)`, is left to the scan, which reads Y anyway
        (`ddm` with YDDM): here it would need a second pass over Y once d(delta) is summed over
        all K blocks. dP is never formed: the log gates need only its products with P summed by
        rows, <dE_t, (P (delta * U))_t>, and by columns, delta_s d(delta)_s."""
        i_c = tl.program_id(0).to(tl.int64)
        _pre_out_bwd_chunk(i_c, k, lam, dl, es, dw, dk, ddm, du, dg, dgp, ges, K, C, BK, PRECISION, UNROLL, STAGES)

    @triton.jit(do_not_specialize=["NC", "BH", "NW"])
    def precond_bwd_overlap_kernel(
        k, beta, eta, lam, tinv, y, dl, es, dw, dk, ddm, du, dg, dgp, ges, p, gc, gef, des, de0, ready, NC, BH, NW,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, SBK: tl.constexpr, PRECISION: tl.constexpr,
        Y_BK: tl.constexpr, Y_UNROLL: tl.constexpr, Y_STAGES: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr,
        RUN: tl.constexpr = 1,
    ):  # fmt: skip
        """`pre_y_kernel`, `pre_out_bwd_kernel` and the reverse scan of e's gradient
        (`precond_scan_bwd_de_kernel` with PREFETCH) in one launch of NW + BH programs: the
        backward's counterpart of `precond_fwd_overlap_kernel`, with the same tickets and flags.
        Workers make each chunk's y and `ges` (and the rest of pre_out_bwd's outputs), the last
        chunks first since the scans run backwards (chunk NC - 1 of every (batch, head), then
        NC - 2, ...), and raise the chunk's flag; the scans wait for it. Y_BK, Y_UNROLL and Y_STAGES
        walk pre_y's K blocks, BK, UNROLL and STAGES pre_out_bwd's, as `_chunk_launch` says for each;
        RUN is how many chunks' flags a scan reads at a time."""
        ticket = tl.atomic_add(ready + BH * NC, 1)
        if ticket < NW:
            for j in range(ticket, NC * BH, NW):
                i_c = _worker_chunk(j, BH, NC, True)
                _pre_y_chunk(i_c, k, beta, eta, lam, tinv, y, K, C, Y_BK, PRECISION, Y_UNROLL, Y_STAGES)
                _pre_out_bwd_chunk(
                    i_c, k, lam, dl, es, dw, dk, ddm, du, dg, dgp, ges, K, C, BK, PRECISION, UNROLL, STAGES
                )
                _raise_flag(ready + i_c)
        else:
            i_bh = (ticket - NW).to(tl.int64)
            _precond_scan_bwd_de_prefetching(
                y, k, p, gc, ges, ddm, gef, des, de0, ready, i_bh, NC, K, C, SBK, True, RUN
            )

    @triton.jit
    def _pre_intra_bwd_sums_block(
        k, es, des, b_uu, b_su, b_ue, b_ude, b_ede, i_k, i_c, o_t,
        K: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """`pre_intra_bwd_kernel` on the K block at `i_k`, first pass: the sums of U U^T, of U's
        rows and of U e_n, and with `des` (not None) of U de and e_n * de, this block's share added."""
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32)
        b_u = b_k * b_k
        b_uu += tl.dot(b_u, tl.trans(b_u), input_precision=PRECISION)
        b_su += tl.sum(b_u, 1)
        b_e = tl.load(es + i_c * K + o_k, mask=m_k, other=0.0)
        b_ue += tl.sum(b_u * b_e[None, :], 1)
        if des is not None:
            b_de = tl.load(des + i_c * K + o_k, mask=m_k, other=0.0)
            b_ude += tl.sum(b_u * b_de[None, :], 1)
            b_ede += b_e * b_de
        return b_uu, b_su, b_ue, b_ude, b_ede

    @triton.jit
    def _pre_intra_bwd_k_block(
        k, es, des, du, dk, dk2, dk_out, b_r, b_dr0, b_pres, b_duu, b_dsu, i_k, i_c, o_t,
        K: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """`pre_intra_bwd_kernel` on the K block at `i_k`, second pass: dK's columns (plus `dk2`,
        phase 2's gradient of k, unless it is None). dR's Y columns are -(T^T ddm) e_n^T; with
        `des` (not None) dU also gets the scan's rows' share, `(p * delta) de^T`."""
        o_k = i_k + tl.arange(0, BK)
        m = o_k[None, :] < K
        b_k = tl.load(k + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        b_u = b_k * b_k
        b_dr = -b_dr0[:, None] * tl.load(es + i_c * K + o_k, mask=o_k < K, other=0.0)[None, :]
        b_du = b_dr * b_r[:, None]
        if du is not None:
            b_du += tl.load(du + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        if des is not None:
            b_du += b_pres[:, None] * tl.load(des + i_c * K + o_k, mask=o_k < K, other=0.0)[None, :]
        b_du += tl.dot(b_duu, b_u, input_precision=PRECISION) + b_dsu[:, None]
        b_dk = tl.load(dk + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32) + 2 * b_k * b_du
        if dk2 is not None:
            b_dk += tl.load(dk2 + o_t[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(dk_out + o_t[:, None] * K + o_k[None, :], b_dk, mask=m)

    @triton.jit
    def pre_intra_bwd_kernel(
        k, beta, eta, lam, tinv, es, ddm, du, dp, dgc, des, dl, dg, dgp, dk, dk2, dk_out, dbeta, deta, dlam,
        K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
        UNROLL: tl.constexpr = True, STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """Through `pre_intra_fwd_kernel`: [dm, Y] = (I + L)^{-1} R, p, Gc, back to k, beta, eta, lam.

        `ddm`, `du` hold the summed gradients of dm and U (that of Y is `-ddm e_n^T`, `es` holding
        the chunk-start `e_n`), and `dp`, `dgc` those of p and Gc, as the one-kernel scan of e's
        gradient (`precond_scan_bwd_kernel`) left them. With `des` (not None), the gradient of
        e_{n+1} per chunk from the split scan (`precond_scan_bwd_de_kernel`), `ddm` and `du` hold
        only the output step's shares (`du` may be None: pre_out_bwd then added its share of dU to
        `dk`), and the scan's rows' shares are added here (what
        `precond_scan_bwd_kernel` adds as it goes): with q = U de, ddm gets p * q, dU
        `(p * delta) de^T` (delta = dm - Y e_n as the forward saved it, `dl`), p's gradient is
        delta * q and Gc's `<e_n, de>`; `dp` and `dgc` are not read. `dg`, `dgp` hold the gradients
        of the log gates from the output step. `dk` holds the direct part of dK (written by the
        previous kernel, in `GRAD_STORAGE`'s dtype), `dk2` phase 2's gradient of k (or None); dK,
        their sum plus the rest, goes to `dk_out` (k's dtype; it may be `dk`)."""
        i_c = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, C)
        o_t = i_c * C + o_c
        b_b = tl.load(beta + o_t)
        b_eta = tl.load(eta + o_t)
        b_lam = tl.load(lam + o_t)
        b_g, b_gp, b_gend = _log_gates(lam, o_t, o_c, C)
        # T^T, T = (I + L)^{-1}, loaded transposed so that its two products with vectors reduce along
        # the axis that leaves each in the layout it is used in (dr0 by rows, delta by columns): as
        # T, its layout changes made the kernel spill 168 bytes a thread (bf16, K = 128, sm_90);
        # as T^T, 224 registers and none (compile_times.py)
        b_tt = tl.load(tinv + i_c * C * C + o_c[None, :] * C + o_c[:, None])
        b_egp = tl.exp(b_gp)
        b_a = b_eta * b_b * b_b
        b_r = b_a * b_egp
        b_uu = tl.zeros([C, C], dtype=tl.float32)
        b_su = tl.zeros([C], dtype=tl.float32)
        b_ue = tl.zeros([C], dtype=tl.float32)
        b_ude = tl.zeros([C], dtype=tl.float32)
        b_ede = tl.zeros([BK], dtype=tl.float32)
        if UNROLL:
            for i_k in tl.static_range(0, K, BK):
                b_uu, b_su, b_ue, b_ude, b_ede = _pre_intra_bwd_sums_block(
                    k, es, des, b_uu, b_su, b_ue, b_ude, b_ede, i_k, i_c, o_t, K, BK, PRECISION
                )
        else:  # `_chunk_launch`
            for i_k in tl.range(0, K, BK, num_stages=STAGES):
                b_uu, b_su, b_ue, b_ude, b_ede = _pre_intra_bwd_sums_block(
                    k, es, des, b_uu, b_su, b_ue, b_ude, b_ede, i_k, i_c, o_t, K, BK, PRECISION
                )
        b_pv = tl.exp(b_gend - b_gp)  # p_s = G_C / G_{s-1}
        if des is not None:  # the split scan's rows (see above)
            b_res = tl.load(dl + o_t)
            b_ddm = tl.load(ddm + o_t) + b_pv * b_ude
            b_dp = b_res * b_ude
            b_dgc = tl.sum(b_ede, 0)
            b_pres = b_pv * b_res
        else:
            b_ddm, b_dp, b_dgc = tl.load(ddm + o_t), tl.load(dp + o_t), tl.load(dgc + i_c)
            b_pres = b_pv  # not read
        b_m = b_eta * b_b * (1 - b_b * b_su)
        # X = [dm, Y] = T R with R = [m, diag(r) U]: dR = T^T dX and dL = -dR X^T. dY = -ddm e_n^T
        # is rank one, so dR is: [dr0, -dr0 e_n^T] with dr0 = T^T ddm, and
        # dL = -dr0 (T m)^T + dr0 (Y e_n)^T = -dr0 delta^T, delta = T (m - r * (U e_n)), a
        # product with a vector; dR's rows meet U's as <dR_t, u_t> = -dr0_t (U e_n)_t.
        b_dr0 = tl.sum(b_tt * b_ddm[None, :], 1)  # T^T ddm
        b_delta = tl.sum(b_tt * (b_m - b_r * b_ue)[:, None], 0)
        strict = o_c[:, None] > o_c[None, :]
        b_dl = tl.where(strict, -b_dr0[:, None] * b_delta[None, :], 0.0)
        b_dru = -b_dr0 * b_ue
        b_da = b_egp * b_dru
        b_dgp = tl.load(dgp + o_t) + b_r * b_dru
        b_f = tl.where(strict, tl.exp(tl.where(strict, b_gp[:, None] - b_gp[None, :], 0.0)), 0.0)  # G_{t-1}/G_{s-1}
        # L = diag(a) F * UU^T
        b_dlf = b_dl * b_f
        b_da += tl.sum(b_dlf * b_uu, 1)
        b_z = b_dlf * b_uu * b_a[:, None]  # dL * L: d(gp_t - gp_s)
        b_dgp += tl.sum(b_z, 1) - tl.sum(b_z, 0)
        b_duu = b_dlf * b_a[:, None]
        b_duu = b_duu + tl.trans(b_duu)
        # p_s = exp(gend - gp_s), Gc = exp(gend)
        b_dpv = b_dp * b_pv
        b_dgp -= b_dpv
        b_dgend = tl.sum(b_dpv, 0) + b_dgc * tl.exp(b_gend)
        # m = eta b (1 - b sum(u)), a = eta b^2
        b_dm = b_dr0
        b_dsu = -b_dm * b_eta * b_b * b_b
        tl.store(deta + o_t, b_dm * b_b * (1 - b_b * b_su) + b_da * b_b * b_b)
        tl.store(dbeta + o_t, b_dm * b_eta * (1 - 2 * b_b * b_su) + 2 * b_da * b_eta * b_b)
        if UNROLL:
            for i_k in tl.static_range(0, K, BK):
                _pre_intra_bwd_k_block(
                    k, es, des, du, dk, dk2, dk_out, b_r, b_dr0, b_pres, b_duu, b_dsu, i_k, i_c, o_t, K, BK, PRECISION
                )
        else:
            for i_k in tl.range(0, K, BK, num_stages=STAGES):
                _pre_intra_bwd_k_block(
                    k, es, des, du, dk, dk2, dk_out, b_r, b_dr0, b_pres, b_duu, b_dsu, i_k, i_c, o_t, K, BK, PRECISION
                )
        # g = cumsum(l), gp = g - l, gend = g_{C-1}: dl_t = sum_{t' >= t} (dg + dgp)_{t'} - dgp_t + dgend
        b_dgt = tl.load(dg + o_t) + b_dgp
        b_dl_log = tl.sum(tl.where(o_c[None, :] >= o_c[:, None], b_dgt[None, :], 0.0), 1) - b_dgp + b_dgend
        tl.store(dlam + o_t, tl.where(b_lam > LAM_MIN_C, b_dl_log / tl.maximum(b_lam, LAM_MIN_C), 0.0))


# Launch settings of the two chunk scans (sequential over chunks, parallel over batch, head and
# V blocks). `None` keeps `chunk_scan._block_sizes`'s choice; benchmarks/tune can override.
# What both state scans' entries of SCAN_TUNING start from.
_STATE_SCAN = dict(BV=None, BS=None, num_warps=4, num_stages=1, prefetch=True, fill_sms=True)
SCAN_TUNING = {
    # prefetch: load the next chunk while reducing this one (whole chunks, BS = C; heads up to 128
    # wide, as wider chunks do not fit in registers). The defaults are what `profile_kernels.py
    # --tune` measured fastest, forward+backward at 1 x 16384 and 4 x 4096 (H200, bf16, H=16,
    # K=V=128; benchmarks/results/kernels_tune_*): the preconditioner scans' prefetch took 7.95 ->
    # 6.88 ms at 1 x 16384 (both scans, the backward at 8 warps); at 4 x 4096, turning off either
    # scan's costs 0.15-0.21 ms (4.40 -> 4.55-4.61). From there the state scans' prefetch takes
    # forward 6.88 -> 6.51 and 4.40 -> 4.29 ms, backward 6.88 -> 6.20 and 4.40 -> 4.24 ms, each
    # measured alone. The preconditioner scans' warps, measured again per kernel at 4 x 4096,
    # 8 x 2048 and 2 x 8192 (precond_warps_619e60c.json): the defaults stay fastest everywhere.
    # split_below: with fewer than this many (batch, head) scans, the backward scan carries only
    # e's gradient (at split_num_warps) and a kernel parallel over chunks writes the rows' gradients
    # from it (then `precond_rows_bwd_kernel`; since it, `pre_intra_bwd_kernel`, which follows
    # anyway). Measured (kernels_tune_split_groups_*.json): 5.87 -> 5.59
    # ms at 1 x 16384 (16 scans, 4 warps), 4.08 -> 4.13 ms at 8 x 2048 (128 scans); at 2 x 8192
    # (32 scans) 4.63 -> 4.56 ms, at 4 x 4096 (64 scans) 4.13 -> 4.15 ms, level
    # (kernels_tune_split_{2x8192,4x4096}.json), so the line stayed at 128. Since the rows'
    # gradients come from pre_intra_bwd (7a8f347), the split scan wins at every size measured, in
    # the whole forward+backward (H200, bf16, H = 16, K = V = 128; split_exp_26a6d2b.json):
    # 2601 -> 2587 us at 8 x 2048 (128 scans), 2945 -> 2913 at 16 x 1024 (256), so the line is
    # now out of reach (1 << 30) and the one-kernel scan is what the knob can still choose. The
    # split backward also needs no dU buffer (pre_out_bwd adds its share to dK:
    # split_exp_07fbba5.json, launch_sweep_pre_out_bwd_*_07fbba5.json).
    # Grouping phase 1's scans (chunks in parallel groups, each group's K x K map, a short scan over
    # groups) measured no faster and was taken out (953acd4; README.md).
    # overlap_alone / overlap_shared: with at most one (batch, head) scan per `overlap_alone` SMs,
    # phase 1's forward scans run beside the chunks' making, in one launch with a worker on each
    # SM they leave; with at most one per `overlap_shared`, two workers on each (the scans then
    # share SMs with them); with more, the scans follow their chunks' kernel
    # (`precond_fwd_overlap_kernel`, `_overlap_workers`; prefetching scans only). Why two tiers:
    # scan and workers both take time in proportion to the chunk count, so which one bounds the
    # launch depends on the scans' number alone. Few scans bound it, and must not be slowed by a
    # worker beside them; more scans finish early, and the chunks are made fastest at two workers
    # an SM. Measured alone, pre_intra_fwd and the scan against the overlapped launch (H200,
    # bf16, H = 16, K = 128; benchmarks/results/kernels_overlap_9311f98.json):
    #   1 x 16384 (16 scans): 639 -> 542-558 us at one worker per free SM, 720-740 at two
    #   2 x 8192 (32 scans): 455 -> 494 at one, 380-389 at two
    #   4 x 4096 (64 scans): 360 -> 430 at best (two), so no overlap there
    # The backward's entry holds the same two for its split scan, run beside pre_y and pre_out_bwd
    # (`precond_bwd_overlap_kernel`). Those three kernels against the launch, in the op's
    # forward+backward (kernels_overlap_bwd_a669cb2.json for the prototype, kt2_9c0adce.json):
    #   1 x 16384: 71 + 261 + 458 -> 631 us (one worker per free SM; 691 at two, prototype)
    #   2 x 8192: 71 + 261 + 234 -> 506 us (two; 774 at one, prototype)
    #   4 x 4096: 540 -> 748 at best (two, prototype), so no overlap there either
    # flag_run: how many chunks' flags an overlapped scan reads in one round of acquire atomics
    # (`chunk_scan._wait_for_run`; 1: one atomic on each chunk's way, on the critical path of every
    # step). Measured in the op's forward+backward, the same bits at every setting (H200, bf16,
    # H = 16, K = 128; benchmarks/results/flag_run_{1x16384,2x8192}_cde9700.json), RUN 1/4/8/16:
    #   forward launch: 554/513/514/533 us at 1 x 16384, 377/366/377/394 at 2 x 8192
    #   backward launch: 608/612/617/631 us at 1 x 16384, 478/483/494/517 at 2 x 8192
    # Alone at 1 x 16384 the forward scans take 377 us without flags and 511 us in the launch with
    # every flag already raised and no workers (flagcost_1x16384_f134c02.json): runs of 4 win back
    # 41 of those 134 us; the rest of that gap is not explained.
    # read_inverse: from this many (batch, head) scans up, phase 1's forward scan reads each chunk's
    # inverse and r and forms Y e_n = (I + L)^{-1} (r * (U e_n)) itself, so pre_intra_fwd writes no
    # Y (None: never). pre_intra_fwd gets faster (142 -> 105 us at 8 x 2048), the scan's chain per
    # chunk longer: worth it where many scans share the GPU, each with few chunks. Measured in one
    # process, GPU time of the forward (H200, bf16, H = 16, K = V = 128;
    # benchmarks/results/sweep20_{ef9715a,95a7077}.json), Y -> inverse: 800 -> 782 us at 8 x 2048
    # (128 scans), 940 -> 914 at 16 x 1024 (256); 856 -> 863 at 4 x 4096 (64), 984 -> 1003 at
    # 2 x 8192 and 1177 -> 1204 at 1 x 16384 (overlapped). Writing W in the scan too (no
    # pre_out_fwd) was slower everywhere but 16 x 1024: 782 -> 804 us at 8 x 2048, 863 -> 971 at
    # 4 x 4096 (95a7077; taken out).
    # groups: where a backward will follow and phase 1's scans are few enough to run beside their
    # chunks' making (`_precond_groups`), phase 1 runs in chunks of 32, reading each chunk's
    # inverse (read_inverse), and its scans in groups of `length` chunks (`long_length` from
    # `long_from` chunks; at least `min_groups` groups): each group's K x K map (BJ columns a
    # program, num_warps, num_stages), the groups' starts (starts_num_warps), every group scanned
    # again; the backward reuses the maps (`_precond_scan_grouped`, `_precond_scan_bwd_grouped`).
    # GPU time against the overlapped launches in one process (H200, bf16, H = 16, K = V = 128;
    # benchmarks/results/grp31d_37992ad.json), forward+backward: 3195 -> 2896 us at 1 x 16384
    # (groups of 32), 6289 -> 5551 at 1 x 32768 (32), 2714 -> 2564 at 2 x 8192 (16), 1646 -> 1527
    # at 1 x 8192 (16), 1417 -> 1358 at 2 x 4096 (16), 862 -> 829 at 1 x 4096 (16); the forward
    # of such a step is up to 8% slower (the maps; 968 -> 1036 us at 2 x 8192), while a forward
    # without gradients keeps the overlapped launch. Groups of 16 at 1 x 16384 took 2912 us, of 32
    # at 1 x 8192 1578 and at 1 x 4096 877. Grouped scans in chunks of 64, Y stored, were slower
    # (grp31_3fb6230.json, grp31b_658210f.json, grp31c_39e6766.json); so were the maps at 8 warps
    # (3112 us at 1 x 16384) and at BJ 32 (2936). The maps multiply float16 roundings of their
    # operands where the keys are unit (dot16, num_stages 2; `chunk_scan.precond_group_maps_kernel`):
    # 2922 -> 2871 us at 1 x 16384 and 2572 -> 2529 at 2 x 8192, the forward of such a step 1124 ->
    # 1078 and 1042 -> 998, outputs and gradients the same to the bit (grp32c_e40adb4.json). Slower
    # or level: X^T (BJ rows in every product; grp32_5a4f658.json), the next chunk prefetched by
    # hand, the product accumulating into X (grp32b_1696ccf.json), and dot16 at 8 warps or BJ 32.
    "precond_fwd": dict(
        BS=None,
        num_warps=4,
        num_stages=1,
        prefetch=True,
        overlap_alone=8,
        overlap_shared=4,
        flag_run=4,
        read_inverse=128,
        groups=dict(
            length=16,
            long_length=32,
            long_from=512,
            min_groups=8,
            BJ=64,
            num_warps=4,
            num_stages=2,
            dot16=True,
            starts_num_warps=8,
            read_inverse=True,
        ),
    ),
    "precond_bwd": dict(
        BS=None,
        num_warps=8,
        num_stages=1,
        prefetch=True,
        split_below=1 << 30,
        split_num_warps=4,
        overlap_alone=8,
        overlap_shared=4,
        flag_run=1,
    ),
    # The state scans run one program per (batch, head, V block): at heads up to 128 wide, with
    # fewer programs than the GPU has SMs, BV halves (down to 16) until they fill them. Then the
    # forward scan, with at most `pipeline_waves` programs per SM, keeps no hand prefetch but lets
    # Triton pipeline its loop over chunks `pipeline["num_stages"]` deep, BS rows at a time with
    # BS * BV = `pipeline["slice"]` (BV up to `pipeline["max_BV"]`, the widths measured). Measured
    # in the whole forward+backward (H200, bf16, H=16, K=V=128;
    # benchmarks/results/kernels_scan_stages{,2}_3f6d0ac.json), the forward scan's two calls:
    #   1 x 16384 (64 programs at BV 32): 771 -> 358 us (BV 16, BS 64, 3 deep; the step 4499 -> 4081)
    #   4 x 4096 (256 programs): 281 -> 239 us (BV 32, BS 32, 3 deep)
    #   8 x 2048 (512 programs): prefetching stays fastest (330 us; 349 pipelined)
    # The backward scan only narrows: 481 -> 439 us at 1 x 16384 (BV 16); pipelining its loop was
    # slower at every size (212 -> 278 us at 4 x 4096, 481 -> 657 at 1 x 16384), and so were the
    # preconditioner scans' (one program per (batch, head), 102 -> 292 us and more).
    # First landed in f53a9cc, it was reverted when it faulted at T = 1 (one chunk;
    # kernels_scan_launch_faults_f53a9cc.json): the scans were then compiled with NC == 1 as a
    # constant, which Triton 3.6 miscompiles (kernels_scan_nc1.json; fixed by chunk_scan's
    # _scan_jit). It came back after scripts/check_scans.py passed on the GPU at every regime's
    # launch and tile, NC 1-3 (kernels_scan_launches_*.json). The tile BV 16, BS 64 without
    # prefetch at num_stages 1 is miscompiled at any NC (kernels_scan_nc1.json); no regime uses it.
    # fit (16-bit storage, heads up to 128 wide; it goes first, so the settings above are those of
    # float32 storage, and heads wider than 128 keep the table's): BV starts at 64, not the table's
    # 32, and halves (down to 16) only while the programs fill less than `fill` of the SMs; then
    # whole chunks (BS = C), with the settings of the first entry of `waves` whose programs per SM
    # are not exceeded (None: any number). Both scans alone (H200, bf16, H = 16, K = V = 128;
    # benchmarks/results/state_scan_launches_2498554.json), old launch -> new, in us:
    #                  forward      rebuild      backward
    #   8 x 2048:      195 -> 129   143 -> 86    264 -> 180   (BV 32 -> 64; 256 programs)
    #   4 x 4096:      158 -> 124    98 -> 85    219 -> 198   (BV 32 -> 64; 128)
    #   2 x 8192:      191 -> 149   122 -> 107   312 -> 265   (BV 16 -> 32; 128)
    #   1 x 16384:     213           154          433          (BV 16 as before; 128)
    # fla's forward scan (chunk_gated_delta_rule_fwd_h) took 123 / 117 / 197 / 386 us on the same
    # sizes. The backward's prefetching launch runs 8 warps where the state tile is [128, 64] or
    # larger (`big_tile`; at 4 x 4096 198 us, against 359 at 4 warps and 221 at the old BV 32).
    # Until 66b7eb4 `fit` stopped at two programs per SM, and more (from 133 (batch, head) pairs
    # at K = V = 128 on 132 SMs) took the table's BV 32, prefetching. At BV 64 pipelined 2 deep
    # they run in waves of two an SM, and the same bits come out. Measured in one process (H200,
    # bf16, H = 16, K = V = 128; benchmarks/results/sweep21_66b7eb4.json), GPU time:
    #                     forward+backward   state_scan_fwd (both calls)   state_scan_bwd
    #   16 x 1024 (256):  2495 -> 2207 us    423 -> 254                     320 -> 193
    #   16 x 2048 (256):  4878 -> 4258       861 -> 496                     639 -> 381
    #   32 x 1024 (512):  4886 -> 4220       905 -> 496                     639 -> 382
    # (the forward alone 912 -> 790, 1767 -> 1514, 1748 -> 1497). Prefetching at BV 64 (8 warps
    # backward) gave 2252 / 4338 / 4312 us, 3 deep 2275 / 4384 / 4357.
    "state_fwd": dict(
        _STATE_SCAN,
        pipeline_waves=2,
        pipeline=dict(num_stages=3, slice=1024, max_BV=32),
        fit=dict(BV=64, fill=0.75, waves=[[1, dict(num_stages=3)], [None, dict(num_stages=2)]]),
    ),
    "state_bwd": dict(
        _STATE_SCAN,
        fit=dict(
            BV=64,
            fill=0.75,
            waves=[[1, dict(num_stages=1, PREFETCH=True)], [None, dict(num_stages=2)]],
            big_tile=dict(elements=8192, num_warps=8),
        ),
    ),
}
# The reverse state scan forming the output's share of the states' gradient, scale Q^T dO, itself
# (as fla's dhu kernel does; out_bwd would then write no K x V per chunk) was slower in every
# setting tried (e39d748, taken out; benchmarks/results/kernels_qdo_fwdloops_e39d748.json): out_bwd
# and the scan together 333 -> 357 us at best at 4 x 4096 (BS 32, Triton pipelining the chunk loop
# 2 deep), 613 -> 650 at 1 x 16384 (BS 64, 3 deep), where the scan alone ran 2.2-2.6x longer with
# the next chunk's q and dO loaded ahead as well.
# Launch settings of the per-chunk kernels: num_warps, and the widest K or V block a kernel walks
# (16, 32 or 64; narrower blocks hold fewer registers). The fastest of each kernel measured by
# `scripts/profile_kernels.py --grid`, every setting in a process of its own (H200, bf16,
# K = V = 128, 4 x 4096 and 1 x 16384 alike; benchmarks/results/kernels_grid_{4x4096,1x16384}.json).
# Eight warps: 1.12-2.5x slower than 4 for nine of these kernels, level for pre_y and kb, faster
# only for from_chunks (0.87-0.90x), although compiled offline without the runtime's pointer
# alignment they spill fewer registers (benchmarks/results/compile_resources_bf16_k128_8warps.json;
# with it, at 4 warps, only pre_intra_bwd spills: compile_resources_bf16_k128_aligned_*.json).
# At 16-wide tiles they fault
# (`pre_intra_bwd_kernel` reads shared memory out of bounds, by compute-sanitizer:
# benchmarks/results/sanitizer_8x16.log), so that setting must not be used.
CHUNK_LAUNCH = {
    "pre_intra_fwd": dict(num_warps=4, tile=64),
    "pre_out_fwd": dict(num_warps=4, tile=32),
    # Two forward kernels keep their block loops as loops too (`stages`, below). In the whole
    # forward+backward at 4 x 4096 (benchmarks/results/kernels_qdo_fwdloops_e39d748.json): wy_fwd
    # 249 -> 219 us, pre_y 76 -> 70, the step 3174 -> 3136; the other forward kernels, kept as
    # loops, were level or slower alone (kernels_loops_fwd_adb30a7.json).
    # pre_y and wy_fwd at 2 warps since eb29181, with pre_intra_bwd: below.
    "pre_y": dict(num_warps=2, tile=32, stages=3),
    "wy_fwd": dict(num_warps=2, tile=64, stages=3),
    "kb": dict(num_warps=4, tile=64),
    # out_fwd walks K in blocks of 64 but takes V whole up to 128 (`tile_v`; 16-bit storage only:
    # float32's tables keep `tile` for both, and so does V 256, neither measured): alone at 4 x
    # 4096 x 16 heads of 128 in bf16 (benchmarks/results/of43_a0c78d4.json) 106.7 -> 98.9 us, one
    # program a chunk instead of two, each reading Q and W once; BK 128 at BV 64: 103.2, both 128
    # at 8 warps: 175.
    "out_fwd": dict(num_warps=4, tile=64, tile_v=128),
    # The backward kernels that walk blocks with UNROLL off can keep those walks as loops that
    # Triton software-pipelines (`stages`, its num_stages; None: unrolled). Alone at 4 x 4096 x 16
    # heads of 128 in bf16 on an H200 (benchmarks/results/kernels_loops_7cc8d1f.json), against
    # unrolled at the same tile: state_grads 337 -> 277 us, out_bwd 134 -> 117, wy_bwd 355 -> 317,
    # pre_out_bwd 303 (tile 64) -> 265, pre_intra_bwd 396 -> 363 (tile 32: 417 unrolled). With the
    # gradient pieces in 16 bits (GRAD_STORAGE), the depths one above and one below (wy_bwd: 2, 3)
    # were level or slower for wy_bwd, state_grads, pre_out_bwd and pre_intra_bwd
    # (benchmarks/results/kernels_stages_bwd_0605d62.json).
    "out_bwd": dict(num_warps=4, tile=64, stages=2),
    "state_grads": dict(num_warps=4, tile=64, stages=2),
    "wy_bwd": dict(num_warps=4, tile=64, stages=1),
    # pre_out_bwd, adding dU's share to dK since 07fbba5, held more registers (154 -> 179 at 3
    # stages, offline): 186 -> 207 us alone at 4 x 4096 and 8 x 2048; at 2 stages (168 registers,
    # three programs an SM again) 186-188 us (launch_sweep_pre_out_bwd_{4x4096,8x2048}_07fbba5.json).
    # With P^T formed rather than transposed (`_decay_matrix`), 168 registers at 3 stages too, and
    # 178 us there against 191-193 at 2 (launch_sweep_pre_out_bwd_pt_{4x4096,8x2048}.json).
    "pre_out_bwd": dict(num_warps=4, tile=32, stages=3),
    # pre_intra_bwd, pre_y and wy_fwd at 2 warps (were 4): per kernel, GPU time in one
    # forward+backward, one process, the settings interleaved over 3 rounds (H200, bf16, K = V =
    # 128; benchmarks/results/sweep18_c64_d295546.json), at 3 x 4096, 2 x 8192 and 1 x 16384:
    # pre_intra_bwd 198 -> 147, 262 -> 194, 262 -> 195 us (at 2 stages: 158, 211, 212); wy_fwd
    # 166 -> 161, 219 -> 210, 221 -> 208; pre_y 55 -> 47 (at 2 x 8192 and 1 x 16384 it runs inside
    # precond_bwd_overlap_kernel, at the scan's warps). All three: forward+backward 2212 -> 2151,
    # 2837 -> 2761, 3318 -> 3239 (-2.4 to -2.8%). pre_intra_fwd at 2 warps: its launch with the
    # scans beside it (precond_fwd_overlap_kernel, same warps) 376 -> 646 us at 2 x 8192.
    "pre_intra_bwd": dict(num_warps=2, tile=32, stages=3),
    # The relayouts read whole rows (no tile); num_warps None: 8 from 8192 elements a chunk, else 4
    # (from_chunks at K = 128: 104 us at 8 warps, 116-120 at 4; to_chunks the same at both).
    "to_chunks": dict(num_warps=None, tile=None),
    "from_chunks": dict(num_warps=None, tile=None),
}


# How `_unit_lower_inverse_64` inverts the four diagonal 16 x 16 blocks of the 64 x 64 inverses
# (`wy_fwd_kernel`, `pre_intra_fwd_kernel`): by forward substitution (15 dependent row steps), or,
# with `doubling`, as the product (I - N)(I + N^2)(I + N^4)(I + N^8) (six batched products), for
# 16-bit inputs only (`_doubling`). Measured on an H200 (benchmarks/results/inverse.json, 4096
# chunks): the inverse alone 236 -> 113 us; in the op at 4 x 4096 x 16 heads of 128, bf16,
# wy_fwd 380 -> 246 us, pre_intra_fwd 385 -> 253 us, forward+backward 3774 -> 3502 us. Its error
# against float64 stays near float32's rounding (4e-8) for random keys but reaches 1.4e-4 where one
# key repeats with b near 1 (entries near 1: the powers of N grow to thousands before they
# cancel); substitution stays at 1.5e-7. That is under the tf32 and 16-bit roundings (5e-4 and
# coarser) of every product that uses the inverse when the inputs are 16-bit, but not under
# float32's, so float32 inputs ("ieee") always substitute. Its 16 x 16 products run in float32
# ("ieee") either way: in tf32x3 (tensor cores, near float32) the inverse alone took 123-140 us
# instead of 113, and the step was level or slower (71d9dd2, taken out;
# benchmarks/results/inverse_precision_71d9dd2.json): it is not bound by its multiply-adds.
INVERSE = dict(doubling=True)


def _doubling(precision: str) -> bool:
    """Whether the inverses' diagonal blocks are inverted by the doubling product (`INVERSE`)."""
    return INVERSE["doubling"] and precision != "ieee"


# Float32 inputs multiply exactly ("ieee"): tl.dot then runs without tensor cores, its operands
# and products in registers, and the launches above, measured in bf16, spill. At 8 x 2048 x 16
# heads of 128 on an H200 the op took 51.7 ms forward and 146.7 ms forward+backward
# (benchmarks/results/sweep23_c9ca4bb.json; bf16: 0.78 and 2.2 ms), out_fwd alone 20.7 ms. So
# at head dims up to `max_head_dim` these settings replace the tables' (`_chunk_launch`; on a CUDA
# device `_scan_launch` for the state scans with float32 storage, BV halved while the programs
# fill less than `fill` of the SMs). Each per-chunk kernel's is the fastest of tile 16/32/64 x
# 2/4/8 warps, all kernels alike in each process (benchmarks/results/sweep24_c9ca4bb.json; tile 16
# at 8 warps left out, where pre_intra_bwd faults in bf16), GPU time in one forward+backward,
# table -> this, in us:
#   wy_bwd 35544 -> 2934, out_fwd 20726 -> 1985, wy_fwd 17514 -> 900, out_bwd 16972 -> 1146,
#   state_grads 7379 -> 3987, kb 3696 -> 274, pre_y 2489 -> 114, pre_out_fwd 1722 -> 149
# The state scans, with those (benchmarks/results/sweep25_c9ca4bb.json; the table gave BV 32,
# prefetching, 4 warps): the forward 17896 -> 2171 us pipelined 2 deep in 16-row slices (3391 in
# whole chunks, 12051-15239 in 32-row slices), the backward 20726 -> 6467 at 8 warps (8645 at BV 16
# and 4 warps, 18034-30936 pipelined). Together: forward 51.7 -> 5.7 ms, forward+backward 146.7 ->
# 22.1 ms, the same sums of outputs and gradients. With BV kept at 32 below 33 (batch, head) pairs
# (fill 0; benchmarks/results/sweep26_0af3afb.json), 1 x 16384's scans took 5641 and 9039 us, at
# BV 16 (fill 0.75) 2177 and 7463 (at 4 warps the backward's 11457). Against the tables' settings,
# forward and forward+backward in ms (sweep26, fill 0.75):
#   1 x 16384: 74.7 -> 28.0, 164.0 -> 59.7      2 x 8192: 69.2 -> 24.1, 155.1 -> 54.3
#   4 x 4096:  61.0 -> 6.5,  158.6 -> 22.6      8 x 2048: 50.9 -> 5.7,  144.5 -> 22.2
# Below `PHASE1["min_scans"]` phase 1 had kept chunks of 64, its scans beside their chunks' making,
# and its float32 kernels there took most of the rest: at 1 x 16384 the overlapped forward launch
# 18.6 ms, pre_intra_bwd 12.9, pre_out_fwd 4.7. So with `phase1_split` float32's phase 1 runs in
# chunks of 32 at any number of scans, never overlapped (`_phase1_chunk`; overlapped in chunks of
# 32 that launch took 12.9 ms), and pre_intra_fwd, pre_out_bwd and pre_intra_bwd, unswept until
# then, launch at 2 warps, tile 32: the fastest of 1/2/4 warps x tile 16/32/64 over the three rows
# below (benchmarks/results/sweep27_736557f.json, same method; at 1 x 16384 1232 -> 551, 324 ->
# 246 and 582 -> 515 us against `PHASE1["launch"]`'s). Forward and forward+backward in ms:
#   1 x 16384: 28.1 -> 5.9, 59.7 -> 25.3      2 x 8192: 23.9 -> 6.3, 54.0 -> 23.7
#   8 x 2048 (in chunks of 32 before too):   5.7 -> 5.6, 22.2 -> 21.8
# Phase 1's split backward scan then runs at 4 warps (`PHASE1["launch"]`'s 2 were measured in
# bf16): at 16, 32, 64 and 128 pairs 1551 / 790 / 403 / 210 us at 2 warps, 635 / 328 / 173 / 102
# at 4, 902 / 453 / 228 / 116 at 8, 6355 / 3226 / 1620 / 818 at 1 (benchmarks/results/
# sweep28_86d7466.json, same method). The forward scan's table warps (4) stay: 500 / 261 / 142 /
# 76 us, against 609-925 at 1 x 16384 with 2 or 8, 7817 with 1.
# Float32 inputs where torch runs float32 matmuls in TF32 (`utils.dot_precision`) multiply in tf32
# with float32 storage: phase 1 as here (`_float32_launch`), phase 2's per-chunk kernels and the
# state scans at `TF32_LAUNCH`'s (below; until 51eaeae at the tables'). At IEEE_LAUNCH's scans,
# the backward scan at BV 16 and 8 warps computed wrong gradients in tf32 (dS0 off by 0.66-0.91
# at K = V = 128) or faulted (K = 100, V = 48; benchmarks/results/scans_check_tf32_{h16,h4}_
# 811156d.json: Triton 3.6, H200), correct at 4 warps or BV 32. The tables' scans were as fast or
# faster (sweep30_811156d.json). GPU time,
# forward+backward in ms, exact products -> these (sweep30_{811156d,01b7a3a}.json; relative errors
# of the output and gradients against exact products 2.0e-3 to 2.9e-3; the op checks at float16's
# tolerance, kernels_check_float32_tf32_01b7a3a.json: 50/50, worst 4.6e-3):
#   1 x 16384: 24.2 -> 8.0    2 x 8192: 23.2 -> 7.1    4 x 4096: 21.3 -> 5.9    8 x 2048: 21.6 -> 5.9
# and with `TF32_LAUNCH` (sweep30_42f2af9.json): 7.2, 5.5, 4.6 and 4.5.
IEEE_LAUNCH = dict(
    max_head_dim=128,
    chunk=dict(
        out_fwd=dict(num_warps=4, tile=32),
        wy_fwd=dict(num_warps=2, tile=16),
        kb=dict(num_warps=8, tile=64),
        out_bwd=dict(num_warps=4, tile=16),
        state_grads=dict(num_warps=2, tile=16),
        wy_bwd=dict(num_warps=4, tile=16),
        pre_y=dict(num_warps=2, tile=32),
        pre_out_fwd=dict(num_warps=2, tile=32),
        pre_intra_fwd=dict(num_warps=2, tile=32),
        pre_out_bwd=dict(num_warps=2, tile=32),
        pre_intra_bwd=dict(num_warps=2, tile=32),
    ),
    state_fwd=dict(BV=32, fill=0.75, settings=dict(BS=16, num_warps=4, num_stages=2, PREFETCH=False)),
    state_bwd=dict(BV=32, fill=0.75, settings=dict(num_warps=8, num_stages=1, PREFETCH=True)),  # whole chunks
    phase1_split=True,
    precond_bwd=dict(split_num_warps=4),  # in chunks of 32
)
# Float32 storage with tf32 products (float32 inputs under torch's TF32) at head dims up to
# `IEEE_LAUNCH["max_head_dim"]`: until 51eaeae its per-chunk kernels and state scans took the
# tables' settings, never measured in tf32. Each variant in a process of its own, GPU time in one
# forward+backward, 3 rounds, medians (H200, H = 16, K = V = 128; outputs and gradients against
# the tables' within tf32's rounding, up to 6e-4).
# The state scans (benchmarks/results/sweep3{1,2}_51eaeae.json, 20 launches of each): BV from 64,
# halved (down to 16) while the programs fill less than `fill` of the SMs, 4 warps, Triton
# pipelining the loop over chunks, the forward in row slices of `slice` elements (BS = slice / BV),
# the backward in whole chunks. Forward scan (both calls) and backward scan, the tables' -> these,
# in us:
#   1 x 16384 (BV 16): 1773 -> the same launch, 1609 -> 1228
#   2 x 8192 (BV 32):  1792 -> 1168, 1322 -> 694
#   4 x 4096 (BV 64):  1171 -> 756,   983 -> 490
#   8 x 2048 (BV 64):  1295 -> 791,  1048 -> 513
# Prefetching was slower at every size but for the backward at 8 x 2048 (492 us, BV 64), and so
# were 2 or 8 warps. In tf32 the backward scan at BV 16 and 8 warps is miscompiled pipelined too
# (dK, dV off by 1.5-2.4; Triton 3.6), and the forward at BV 16, 8 warps, 3 deep ran in the one
# launch that faulted (illegal memory access; the backward beside it was BV 32, 3 deep). The
# backward 3 deep at BV 64 needs 245760 bytes of shared memory, more than an H200 has.
# The per-chunk kernels (benchmarks/results/sweep33_737c347.json; every kernel at one (tile,
# warps) in each process, 16/32/64 x 2/4/8 but 16 at 8): phase 2's at tile 32, the tables' ->
# these at 4 x 4096 in us (1 x 16384 within 4 us):
#   wy_fwd 338 -> 293 (2 warps), out_bwd 463 -> 280, state_grads 610 -> 491, wy_bwd 579 -> 529
# The other kernels keep the tables' (out_fwd, kb, and phase 1's at `PHASE1["launch"]`'s), the
# fastest or within 5 us.
TF32_LAUNCH = dict(
    chunk=dict(
        wy_fwd=dict(num_warps=2, tile=32),
        out_bwd=dict(num_warps=4, tile=32),
        state_grads=dict(num_warps=4, tile=32),
        wy_bwd=dict(num_warps=4, tile=32),
    ),
    state_fwd=dict(BV=64, fill=0.75, slice=1024, settings=dict(num_warps=4, num_stages=3, PREFETCH=False)),
    state_bwd=dict(BV=64, fill=0.75, settings=dict(num_warps=4, num_stages=2, PREFETCH=False)),
)


def _float32_table(precision: str | None, K: int, V: int | None = None, float32: bool = False) -> dict | None:
    """Float32 storage's own launch table at head dims up to `IEEE_LAUNCH["max_head_dim"]`, whose
    entries replace the tables' (`_chunk_launch`, `_scan_launch`): `IEEE_LAUNCH` for exact products
    ("ieee", which only float32 storage has), `TF32_LAUNCH` for tf32 products on `float32` storage;
    None elsewhere (16-bit storage, wider heads)."""
    if max(K, V or 0) > IEEE_LAUNCH["max_head_dim"]:
        return None
    if precision == "ieee":
        return IEEE_LAUNCH
    return TF32_LAUNCH if float32 and precision == "tf32" else None


def _float32_launch(x: torch.Tensor, K: int) -> bool:
    """Whether phase 1 runs as float32 inputs have it (`IEEE_LAUNCH`'s `phase1_split` and
    `precond_bwd`), exact products or tf32: float32 storage `x`, head dim K up to `max_head_dim`."""
    return x.dtype == torch.float32 and K <= IEEE_LAUNCH["max_head_dim"]


def launch_settings() -> dict:
    """A copy of the kernels' launch tables as they stand, for results to record what they ran
    (deep: the tables nest dicts, e.g. `PHASE1["launch"]`, `SCAN_TUNING[...]["fit"]`)."""
    tables = dict(
        scans=SCAN_TUNING,
        chunk=CHUNK_LAUNCH,
        inverse=INVERSE,
        grad_storage=GRAD_STORAGE,
        phase1=PHASE1,
        ieee=IEEE_LAUNCH,
        tf32=TF32_LAUNCH,
    )
    return copy.deepcopy(tables)


def _scan_launch(
    name: str,
    K: int,
    V: int,
    C: int,
    heads: int | None = None,
    device=None,
    float32: bool = False,
    precision: str = "ieee",
) -> dict:
    """Launch settings of scan `name` (`SCAN_TUNING`); for the state scans, given `heads` (B * H)
    and a CUDA `device`, fitted to how many programs its SMs take (without them, as the table's
    first settings say), to the storage dtype (16-bit, or `float32`, as `_chunk_launch` has it)
    and, with float32 storage, to the products' `precision` (`IEEE_LAUNCH` for "ieee",
    `TF32_LAUNCH` for "tf32")."""
    BK, BV, BS = _block_sizes(K, V, C)
    if name == "state_bwd":
        BS = max(BS // 2, 16)
    t = SCAN_TUNING[name]
    out = dict(BK=BK, BS=t["BS"] or BS, num_warps=t["num_warps"], num_stages=t["num_stages"])
    if name.startswith("state"):
        out["BV"] = t["BV"] or BV
    if t["prefetch"] and BK <= 128:
        out.update(BS=C, PREFETCH=True)
    sms = _sm_count(device)
    if not name.startswith("state") or heads is None or sms is None or BK > 128:
        return out
    programs = lambda BV: heads * cdiv(V, BV)  # noqa: E731  (one per (batch, head, V block))

    def narrowed(BV: int, fill: float) -> int:
        """BV halved (down to 16) while the programs fill less than `fill` of the SMs."""
        while BV > 16 and programs(BV) < fill * sms:
            BV //= 2
        return BV

    table = _float32_table(precision, K, V, float32=True) if float32 else None
    own = table and table.get(name)
    if own:
        wide = dict(out, **own["settings"], BV=narrowed(block_width(V, own["BV"]), own["fill"]))
        if "slice" in own and not wide["PREFETCH"]:
            wide["BS"] = min(own["slice"] // wide["BV"], C)  # row slices of `slice` elements
        elif wide["PREFETCH"] or "BS" not in own["settings"]:
            wide["BS"] = C  # whole chunks
        return wide
    fit = t.get("fit")
    if fit and not float32:
        wide = dict(out, BV=narrowed(block_width(V, fit["BV"]), fit["fill"]), BS=C, PREFETCH=False)
        for waves, settings in fit["waves"]:
            if waves is None or programs(wide["BV"]) <= waves * sms:
                wide.update(settings)
                big = fit.get("big_tile")
                if big and wide["PREFETCH"] and wide["BV"] * BK >= big["elements"]:
                    wide["num_warps"] = big["num_warps"]
                return wide
    if t["fill_sms"]:
        out["BV"] = narrowed(out["BV"], 1.0)
    pipe = t.get("pipeline")
    if pipe and programs(out["BV"]) <= t["pipeline_waves"] * sms and out["BV"] <= pipe["max_BV"]:
        out.update(BS=min(pipe["slice"] // out["BV"], C), num_stages=pipe["num_stages"], PREFETCH=False)
    return out


def _overlap_workers(heads: int, device, scan: str = "precond_fwd") -> int | None:
    """How many workers phase 1's overlapped launch for `scan` ("precond_fwd":
    `precond_fwd_overlap_kernel`; "precond_bwd": `precond_bwd_overlap_kernel`) runs beside
    `heads` scans on CUDA `device`: one on each SM the scans leave where they take at most one SM
    in `overlap_alone`, two where at most one in `overlap_shared` (`SCAN_TUNING[scan]`); else
    None, and the scans follow the kernels that make their chunks."""
    t, sms = SCAN_TUNING[scan], _sm_count(device)
    if sms is None:
        return None
    if t.get("overlap_alone") and heads * t["overlap_alone"] <= sms:
        return sms - heads
    if t.get("overlap_shared") and heads * t["overlap_shared"] <= sms:
        return 2 * (sms - heads)
    return None


def _overlap_launch(scan: str, launch: dict, heads: int, chunks: int, device):
    """Whether phase 1's `scan` runs overlapped with the kernels that make its chunks, given its
    `launch` (`_scan_launch`; only prefetching scans wait on flags), `heads` scans and `chunks`
    chunks in all: (workers, flags), the flags one per chunk and the ticket counter after them,
    all zero; or (None, None)."""
    workers = _overlap_workers(heads, device, scan) if launch.get("PREFETCH") else None
    if not workers:
        return None, None
    return workers, torch.zeros(chunks + 1, dtype=torch.int32, device=device)


@functools.cache
def _sm_count(device) -> int | None:
    """How many SMs CUDA `device` has (None for any other device, or none given); asked once per
    device (several launches of each forward ask)."""
    if device is None or torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk_launch(
    name: str, K: int, V: int | None = None, precision: str | None = None, small: bool = False, float32: bool = False
) -> dict:
    """BK (and BV where the kernel walks V) and num_warps of per-chunk kernel `name`; an entry's
    `tile_v` takes V in one block up to that width for 16-bit storage. For the kernels whose
    table entry has `stages`, given the precision, also how they walk their blocks
    (UNROLL, STAGES): float32 above head dim 128 always as plain loops (`_unrolled`), else as the
    table says. With `small` (phase 1 in chunks smaller than phase 2's, `PHASE1`), the entry's
    fields that `PHASE1["launch"]` gives are replaced; with float32 products ("ieee") at head dims
    up to `IEEE_LAUNCH["max_head_dim"]`, then those that `IEEE_LAUNCH["chunk"]` gives; with tf32
    products on `float32` storage there, those that `TF32_LAUNCH["chunk"]` gives."""
    float32 = float32 or precision == "ieee"  # exact products are float32 storage's alone
    t = CHUNK_LAUNCH[name]
    if small:
        t = dict(t, **PHASE1["launch"].get(name, {}))
    own = _float32_table(precision, K, V, float32)
    if own:
        t = dict(t, **own["chunk"].get(name, {}))
    out = dict(BK=block_width(K, t["tile"]), num_warps=t["num_warps"])
    if V is not None:
        whole = None if float32 else t.get("tile_v")
        out["BV"] = block_width(V) if whole and block_width(V) <= whole else block_width(V, t["tile"])
    if "stages" in t:
        if not _unrolled(precision, K, V):
            out.update(UNROLL=False, STAGES=1)
        else:
            out.update(UNROLL=t["stages"] is None, STAGES=t["stages"] or 1)
    return out


def _unrolled(precision: str, K: int, V: int | None = None) -> bool:
    """Whether a kernel's loops over K and V blocks may be unrolled when compiled (`UNROLL`):
    always, except for float32 products ("ieee") at head dims above 128, where they stay plain
    loops, not pipelined. Unrolled, float32's kernels at head dim 256 took up to 16 minutes each
    to compile for sm_90 (`out_bwd_kernel`: 949 s; benchmarks/results/compile_times_cpu.json),
    too long for any first call; pipelined, their buffers would overflow shared memory."""
    return precision != "ieee" or max(K, V or 0) <= 128


def _relayout_launch(name: str, D: int, C: int) -> dict:
    BD = block_width(D)
    return dict(D=D, C=C, BD=BD, num_warps=CHUNK_LAUNCH[name]["num_warps"] or (8 if BD * C >= 8192 else 4))


# The dtype of the `[B, H, NC, C, K]` gradient pieces that one backward kernel writes and a later
# one reads (phase 1: dK's direct part and dU, which the scan adds to; phase 2: dKb and dW's
# shares from the states): "storage", the chunked tensors' dtype (16 bits for 16-bit inputs, as
# fla keeps its dk and dw between kernels), or "float32". Each piece is summed in float32 inside
# a kernel and rounded where it is stored (dU twice: the scan adds its share to it). Measured in
# the whole forward+backward (H200, bf16, H=16, K=V=128;
# benchmarks/results/kernels_grad_storage_60434f8.json), float32 -> storage:
#   1 x 16384: 3801 -> 3665 us, peak 1324 -> 1196 MiB;  2 x 8192: 3321 -> 3178, 1327 -> 1199
#   4 x 4096: 3087 -> 2947, 1333 -> 1205;  8 x 2048: 3064 -> 2933, 1345 -> 1217
# (phase 2's pieces alone: 72-74 us of it). For float32 inputs both settings are the same.
GRAD_STORAGE = dict(phase1="storage", phase2="storage")


def _grad_buffer(x: torch.Tensor, phase: str) -> torch.Tensor:
    """A gradient piece of x's shape passed between `phase`'s backward kernels, in the dtype
    `GRAD_STORAGE[phase]` names (x is a chunked tensor in the storage dtype)."""
    dtypes, name = {"storage": x.dtype, "float32": torch.float32}, GRAD_STORAGE[phase]
    if name not in dtypes:
        raise ValueError(f"GRAD_STORAGE[{phase!r}] must be one of {sorted(dtypes)}, got {name!r}")
    return torch.empty_like(x, dtype=dtypes[name])


def _in_dtype_of(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Where the last kernel that adds to gradient piece `acc` writes the gradient of `x`: in x's
    dtype, the one autograd would cast it to (`acc` itself when it is in that dtype already)."""
    return acc if acc.dtype == x.dtype else torch.empty_like(x)


class ToChunks(torch.autograd.Function):
    """`[B, T, H, D]` -> `[B, H, NC, C, D]` in the storage dtype `dtype` (zero-padded), optionally
    L2-normalising rows (in float32, then rounded to `dtype`)."""

    @staticmethod
    def forward(ctx, x, C, normalize, dtype):
        x = x.contiguous()
        B, T, H, D = x.shape
        NC = max(cdiv(T, C), 1)
        y = x.new_empty(B, H, NC, C, D, dtype=dtype)
        enqueue(to_chunks_kernel, (B * H * NC,), x, y, T, H, NC, NORM=normalize, **_relayout_launch("to_chunks", D, C))
        if normalize:  # the backward through the norm needs x; a plain relayout needs only its shape
            ctx.save_for_backward(x)
        ctx.normalize, ctx.shape, ctx.dtype = normalize, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        B, T, H, D = ctx.shape
        NC, C = gy.shape[2:4]
        gx = gy.new_empty(ctx.shape, dtype=ctx.dtype)
        x = ctx.saved_tensors[0] if ctx.normalize else gx  # without NORM the kernel never reads x
        enqueue(
            from_chunks_kernel, (B * H * NC,),
            gy.contiguous(), x, gx, T, H, NC,
            NORM=ctx.normalize, **_relayout_launch("from_chunks", D, C),
        )  # fmt: skip
        return gx, None, None, None


class GatesToChunks(torch.autograd.Function):
    """`(beta, eta, lam)` `[B, T, H]` in any float dtype -> `[B, H, NC, C]` float32 each, padded
    with neutral gates: one kernel each way, where casting and relayout one by one took three
    kernels per gate and their three backward steps."""

    @staticmethod
    def forward(ctx, beta, eta, lam, C):
        beta, eta, lam = beta.contiguous(), eta.contiguous(), lam.contiguous()
        B, T, H = beta.shape
        NC = max(cdiv(T, C), 1)
        bc, ec, lc = (beta.new_empty(B, H, NC, C, dtype=torch.float32) for _ in range(3))
        enqueue(gates_to_chunks_kernel, (B * H * NC,), beta, eta, lam, bc, ec, lc, T, H, NC, C=C, num_warps=1)
        ctx.shape, ctx.dtypes = beta.shape, (beta.dtype, eta.dtype, lam.dtype)
        return bc, ec, lc

    @staticmethod
    def backward(ctx, gbc, gec, glc):
        B, T, H = ctx.shape
        ref = next(g for g in (gbc, gec, glc) if g is not None)
        NC, C = ref.shape[2:]
        grads = [torch.zeros_like(ref) if g is None else g.contiguous() for g in (gbc, gec, glc)]
        outs = [ref.new_empty(B, T, H, dtype=dtype) for dtype in ctx.dtypes]
        enqueue(gates_from_chunks_kernel, (B * H * NC,), *grads, *outs, T, H, NC, C=C, num_warps=1)
        return *outs, None


def _precond_groups(C: int, NC: int, K: int, heads: int, device, training: bool) -> int | None:
    """How many of phase 1's chunks each group holds where its scans run in groups
    (`_precond_scan_grouped`), given phase 2's NC chunks of C and `heads` (batch, head) scans on
    `device`; or None. Where a backward will follow (`training`, 16-bit storage) and the scans
    would run beside their chunks' making (`_overlap_workers`: few scans), phase 1 runs in
    `PHASE1["chunk"]`-sized chunks whose scans are grouped, in groups of the largest divisor of
    their count up to `SCAN_TUNING["precond_fwd"]["groups"]["length"]` (`long_length` from
    `long_from` chunks), where that divisor is at least half the length and makes at least
    `min_groups` groups. Elsewhere None: a forward alone keeps the overlapped launch, which is
    faster for the forward alone (the grouped scans' maps pay off in the backward, which reuses
    them). Heads up to 128 wide (a map's `K x K` tile in registers)."""
    t, c1 = SCAN_TUNING["precond_fwd"].get("groups"), PHASE1["chunk"]
    if not t or not training or C % c1 or K > 128 or _overlap_workers(heads, device, "precond_fwd") is None:
        return None
    n1 = NC * C // c1
    length = t["long_length"] if n1 >= t["long_from"] else t["length"]
    L = min(length, n1)
    while n1 % L:
        L -= 1
    return L if 2 * L >= length and n1 // L >= t["min_groups"] else None


def _precond_scan_grouped(y, k, dm, p, gc, d0, r, es, df, dl, L, scan, precision, unit_keys=False):
    """Phase 1's forward scan (`precond_scan_fwd_kernel`'s es, df and dl) in groups of L chunks, so
    that its sequential chain is about G + 2 L steps instead of G * L (NC = G * L):
    1. each group's affine map `e -> M_g e + c_g`, all groups at once (`precond_group_maps_kernel`:
       `K x K` products, as much work in all as phase 2's state scan over the same chunks);
    2. the value entering each group, a short chain of G matrix-vector products a (batch, head)
       (`precond_group_starts_kernel`);
    3. every group scanned again from its start, all groups at once (`precond_scan_fwd_kernel` on
       the chunked tensors read as `[B * H * G, L, ...]`), which writes es and dl.
    `y` holds Y or, with `r` (not None), each chunk's inverse; `k` the keys (u = k * k).
    With `unit_keys` (the op normalised them: u <= 1) and tf32 products, the maps multiply float16
    roundings of their operands where `groups["dot16"]` says so (DOT16)."""
    B, H, NC, C, K = k.shape
    G, BK = NC // L, scan["BK"]
    t = SCAN_TUNING["precond_fwd"]["groups"]
    BJ = min(t["BJ"], BK)
    mg, cg = es.new_empty(B * H * G, K, K), es.new_empty(B * H * G, K)
    enqueue(
        precond_group_maps_kernel, (B * H * G, cdiv(K, BJ) + 1),
        y, k, dm, p, gc, mg, cg, r, L,
        K=K, C=C, BK=BK, BJ=BJ, PRECISION=precision, SQUARE=True,
        DOT16=t["dot16"] and precision == "tf32" and unit_keys,
        num_warps=t["num_warps"], num_stages=t["num_stages"],
    )  # fmt: skip
    ds, dg = torch.empty_like(cg), torch.empty_like(cg)
    enqueue(precond_group_starts_kernel, (B * H,), mg, cg, d0, ds, G, K=K, BK=BK, num_warps=t["starts_num_warps"])
    enqueue(precond_scan_fwd_kernel, (B * H * G,), y, k, dm, p, gc, ds, es, dg, dl, r, L, K=K, C=C, SQUARE=True, **scan)
    df.copy_(dg.view(B, H, G, K)[:, :, -1])
    return mg


def _precond_scan_bwd_grouped(y, k, p, gc, ges, ddm, gdf, des, dd0, mg, launch):
    """Phase 1's backward scan (`precond_scan_bwd_de_kernel`'s des and dd0) in the forward's groups,
    whose maps `mg` it reuses (`_precond_scan_grouped`; `M_g^T` carries e's gradient back over a
    group): each group scanned from a zero end gradient, all at once, which gives each group's
    offset; the gradient at each group's end, a short chain of G matrix-vector products a (batch,
    head) (`precond_group_starts_kernel`, REVERSE); every group scanned again from its end, which
    writes des (and the first group's start, d_0's gradient, into dd0 unless it is None)."""
    B, H, NC, C, K = k.shape
    G = mg.shape[0] // (B * H)
    L, BK = NC // G, launch["BK"]
    cg = ges.new_empty(B * H * G, K)
    scan = lambda gef, de0: enqueue(  # noqa: E731
        precond_scan_bwd_de_kernel, (B * H * G,),
        y, k, p, gc, ges, ddm, gef, des, de0, L, K=K, C=C, SQUARE=True, **launch,
    )  # fmt: skip
    scan(None, cg)
    ends, t = torch.empty_like(cg), SCAN_TUNING["precond_fwd"]["groups"]
    enqueue(
        precond_group_starts_kernel, (B * H,),
        mg, cg, gdf, ends, G, K=K, BK=BK, REVERSE=True, num_warps=t["starts_num_warps"],
    )  # fmt: skip
    starts = None if dd0 is None else torch.empty_like(cg)
    scan(ends, starts)
    if dd0 is not None:
        dd0.copy_(starts.view(B, H, G, K)[:, :, 0])


class Precondition(torch.autograd.Function):
    """Phase 1: `(k, beta, eta, lam, d0) -> (W = D * K, d_final, k)`; chunked tensors, `k` and `W`
    in the storage dtype, the rest float32. `small`: phase 1's chunks are smaller than phase 2's
    (`PHASE1`), so its kernels launch with `PHASE1["launch"]`'s settings and its scans are never
    overlapped with them (only float32's run small where they could be: `_phase1_chunk`).

    k comes out again (a view) for phase 2 to read: phase 2's gradient of k then reaches this
    backward, whose last kernel adds it to phase 1's own in float32, instead of autograd adding
    the two in an extra pass over a [B, H, NC, C, K] tensor (about 44 us of 4.0 ms at 4 x 4096 x 16
    heads of 128 on an H200: profile_kernels.py's adds went 185 -> 141 us with it, the rest being
    its own accumulation into the inputs' .grad, which it no longer does)."""

    @staticmethod
    def forward(ctx, k, beta, eta, lam, d0, precision, small, L=None, unit_keys=False):
        B, H, NC, C, K = k.shape
        grid = (B * H * NC,)
        scan = _scan_launch("precond_fwd", K, K, C)
        # from `SCAN_TUNING["precond_fwd"]["read_inverse"]` scans up, a prefetching scan reads each
        # chunk's inverse and r (C * C + C floats) instead of Y (C * K), and pre_intra_fwd makes no Y
        least = SCAN_TUNING["precond_fwd"]["read_inverse"]
        read_inverse = scan.get("PREFETCH", False) and (
            (least is not None and B * H >= least)
            or (L is not None and SCAN_TUNING["precond_fwd"]["groups"]["read_inverse"])
        )
        y, r = (None, torch.empty_like(beta)) if read_inverse else (torch.empty_like(k), None)
        dm, p = torch.empty_like(beta), torch.empty_like(beta)
        gc = beta.new_empty(B, H, NC)
        tinv = beta.new_empty(B, H, NC, C, C)
        es, df, dl = beta.new_empty(B, H, NC, K), beta.new_empty(B, H, K), torch.empty_like(dm)
        intra_launch = _chunk_launch("pre_intra_fwd", K, precision=precision, small=small)
        intra = dict(K=K, C=C, PRECISION=precision, DOUBLING=_doubling(precision), **intra_launch)
        # in chunks smaller than phase 2's (`PHASE1`), the scans follow the chunks' making
        workers, ready = (
            (None, None) if small or L else _overlap_launch("precond_fwd", scan, B * H, B * H * NC, k.device)
        )
        if L:  # the scans run in groups of L chunks, after the chunks' making (_precond_scan_grouped)
            enqueue(pre_intra_fwd_kernel, grid, k, beta, eta, lam, y, r, dm, p, gc, tinv, **intra)
            mg = _precond_scan_grouped(
                y if r is None else tinv, k, dm, p, gc, d0, r, es, df, dl, L, scan, precision, unit_keys
            )
        elif workers:  # the scans run beside the chunks' making (precond_fwd_overlap_kernel)
            enqueue(
                precond_fwd_overlap_kernel, (workers + B * H,),
                k, beta, eta, lam, y, r, dm, p, gc, tinv, d0, es, df, dl, ready, NC, B * H, workers,
                SBK=scan["BK"], RUN=SCAN_TUNING["precond_fwd"]["flag_run"], **intra,
            )  # fmt: skip
        else:
            enqueue(pre_intra_fwd_kernel, grid, k, beta, eta, lam, y, r, dm, p, gc, tinv, **intra)
            enqueue(
                precond_scan_fwd_kernel, (B * H,),
                y if r is None else tinv, k, dm, p, gc, d0, es, df, dl, r, NC,
                K=K, C=C, SQUARE=True, **scan,
            )  # fmt: skip
        # Y (or r) and dm were the scan's alone: the scan wrote delta = dm - Y e_n, which the output
        # step and the backward read instead, and the backward rebuilds Y from the inverse (1X less
        # held between forward and backward); freed before W is allocated
        del y, r, dm
        w = torch.empty_like(k)
        enqueue(
            pre_out_fwd_kernel, grid,
            k, lam, dl, es, w,
            K=K, C=C, PRECISION=precision, **_chunk_launch("pre_out_fwd", K, precision=precision, small=small),
        )  # fmt: skip
        ctx.save_for_backward(k, beta, eta, lam, dl, p, gc, es, tinv, mg if L else None)
        ctx.precision, ctx.small, ctx.has_d0 = precision, small, d0 is not None
        ctx.set_materialize_grads(False)  # an unused d_final's gradient comes as None, not a zero fill
        return w, df, k

    @staticmethod
    def backward(ctx, dw, dd, dk2):
        k, beta, eta, lam, dl, p, gc, es, tinv, mg = ctx.saved_tensors
        B, H, NC, C, K = k.shape
        grid = (B * H * NC,)
        precision = ctx.precision
        y = torch.empty_like(k)
        dw = torch.zeros_like(k) if dw is None else dw.contiguous()
        dd = contiguous_or_none(dd)  # None: d_final was not used (the scans read zeros)
        # below split_below scans (every size, as tuned), the scan carries e's gradient alone,
        # written per chunk (des), and pre_intra_bwd, parallel over chunks, adds the rows'
        # gradients from it; else the scan adds them as it goes and writes those of p and Gc
        # (sdp, sdgc)
        split = B * H < SCAN_TUNING["precond_bwd"]["split_below"]
        # dK's direct part and dU, which the scan adds to, in the storage dtype (GRAD_STORAGE); with
        # the split scan, which does not, pre_out_bwd adds its share of dU to dK itself (2 k dU)
        dk, du = _grad_buffer(k, "phase1"), None if split else _grad_buffer(k, "phase1")
        ddm = torch.empty_like(dl)
        dg, dgp, ges = torch.empty_like(dl), torch.empty_like(dl), torch.empty_like(es)
        small = ctx.small
        y_launch = _chunk_launch("pre_y", K, precision=precision, small=small)
        out_launch = _chunk_launch("pre_out_bwd", K, precision=precision, small=small)
        # pre_out_bwd writes the output step's shares of d(dm) and dU (dY: see pre_out_bwd_kernel);
        # the scan's rows add theirs, or with the split scan pre_intra_bwd does
        out_args = (k, lam, dl, es, dw, dk, ddm, du, dg, dgp, ges)
        dd0 = beta.new_empty(B, H, K) if ctx.has_d0 else None  # no initial state, no gradient of it
        launch = _scan_launch("precond_bwd", K, K, C)
        des, sdp, sdgc = (
            (torch.empty_like(es), None, None) if split else (None, torch.empty_like(p), torch.empty_like(gc))
        )
        if split:
            table = (IEEE_LAUNCH if _float32_launch(k, K) else PHASE1["launch"]) if small else SCAN_TUNING
            launch["num_warps"] = table["precond_bwd"]["split_num_warps"]
        overlap = split and not small and mg is None  # as in the forward
        workers, ready = (
            _overlap_launch("precond_bwd", launch, B * H, B * H * NC, k.device) if overlap else (None, None)
        )
        if workers:  # e's scans run beside the making of Y and of what they read from pre_out_bwd
            # this launch is given a buffer for d_0's gradient even without d_0: with None (no store)
            # its scans took 574 against 538 us at 1 x 16384, and 428 against 397 at 2 x 8192, on
            # an H200 in bf16, the same bits (benchmarks/results/sweep45_1924164.json); d_final's
            # gradient is zeros in memory here, as it was measured (autograd's fill then)
            gdf = beta.new_zeros(B, H, K) if dd is None else dd
            gd0 = beta.new_empty(B, H, K) if dd0 is None else dd0
            enqueue(
                precond_bwd_overlap_kernel, (workers + B * H,),
                k, beta, eta, lam, tinv, y, *out_args[2:], p, gc, gdf, des, gd0, ready, NC, B * H, workers,
                K=K, C=C, BK=out_launch["BK"], SBK=launch["BK"], PRECISION=precision, Y_BK=y_launch["BK"],
                Y_UNROLL=y_launch["UNROLL"], Y_STAGES=y_launch["STAGES"], UNROLL=out_launch["UNROLL"],
                STAGES=out_launch["STAGES"], RUN=SCAN_TUNING["precond_bwd"]["flag_run"], num_warps=launch["num_warps"],
            )  # fmt: skip
        else:
            enqueue(pre_y_kernel, grid, k, beta, eta, lam, tinv, y, K=K, C=C, PRECISION=precision, **y_launch)
            enqueue(
                pre_out_bwd_kernel, grid,
                *out_args, K=K, C=C, PRECISION=precision, **out_launch,
            )  # fmt: skip
        if split:
            if mg is not None:  # in the forward's groups, with its maps
                _precond_scan_bwd_grouped(y, k, p, gc, ges, ddm, dd, des, dd0, mg, launch)
            elif not workers:
                enqueue(
                    precond_scan_bwd_de_kernel, (B * H,),
                    y, k, p, gc, ges, ddm, dd, des, dd0, NC,
                    K=K, C=C, SQUARE=True, **launch,
                )  # fmt: skip
        else:
            enqueue(
                precond_scan_bwd_kernel, (B * H,),
                y, k, dl, p, gc, es, ges, dd, None, du, ddm, sdp, sdgc, dd0, NC,
                K=K, C=C, ACC=True, DY=False, SQUARE=True, YDDM=True, DELTA=True, **launch,
            )  # fmt: skip
        del y
        dbeta, deta, dlam = torch.empty_like(beta), torch.empty_like(eta), torch.empty_like(lam)
        dk_out = _in_dtype_of(dk, k)
        enqueue(
            pre_intra_bwd_kernel, grid,
            k, beta, eta, lam, tinv, es, ddm, du, sdp, sdgc, des, dl, dg, dgp, dk,
            contiguous_or_none(dk2), dk_out, dbeta, deta, dlam,
            K=K, C=C, PRECISION=precision, **_chunk_launch("pre_intra_bwd", K, precision=precision, small=small),
        )  # fmt: skip
        return dk_out, dbeta, deta, dlam, dd0, None, None, None, None


def _state_scan(kb, w, ub, s0, uo, precision, launch=None):
    """Phase 2's state scan from `s0` (float32; None: zeros): the per-chunk states
    `[B, H, NC, K, V]` (storage dtype) and the final state (float32). With `kb` and `ub` it writes
    U to `uo`; with `kb=ub=None` it rebuilds the per-chunk states from the U already in `uo`
    (RECOMPUTE), and returns no final state. `launch` (tiles, warps, stages) defaults to
    `_scan_launch`'s; scripts/check_scans.py passes others."""
    B, H, NC, C, K = w.shape
    V = uo.shape[-1]
    launch = launch or _scan_launch("state_fwd", K, V, C, B * H, w.device, w.dtype == torch.float32, precision)
    ss = w.new_empty(B, H, NC, K, V)
    sf = None if ub is None else w.new_empty(B, H, K, V, dtype=torch.float32)
    enqueue(
        state_scan_fwd_kernel, (B * H, cdiv(V, launch["BV"])),
        w if kb is None else kb, w, uo if ub is None else ub, s0, uo, ss, sf, NC,
        K=K, V=V, C=C, PRECISION=precision, RECOMPUTE=ub is None, **launch,
    )  # fmt: skip
    return ss, sf


def _state_scan_bwd(kb, w, gu, gss, ds, precision, launch=None, initial=True):
    """The reverse state scan, from the gradients of U (`gu`), of each chunk's start state (`gss`,
    overwritten) and of the final state (`ds`, float32; None: zeros): dUb, the gradient of the state
    after each chunk (in `gss`'s place) and, with `initial`, of the initial state (float32; else None).
    `launch` as in `_state_scan`."""
    B, H, NC, C, K = kb.shape
    V = gu.shape[-1]
    launch = launch or _scan_launch("state_bwd", K, V, C, B * H, kb.device, kb.dtype == torch.float32, precision)
    dss = gss  # dss overwrites gss as it goes
    dub, ds0 = torch.empty_like(gu), kb.new_empty(B, H, K, V, dtype=torch.float32) if initial else None
    enqueue(
        state_scan_bwd_kernel, (B * H, cdiv(V, launch["BV"])),
        kb, w, gu, gss, ds, dub, dss, ds0, NC,
        K=K, V=V, C=C, PRECISION=precision, **launch,
    )  # fmt: skip
    return dub, dss, ds0


class DeltaRuleAsym(torch.autograd.Function):
    """Phase 2: `(q, k, w, v, beta, S0) -> (O, S_final)`; q, k, w chunked in the storage dtype, v
    `[B, T, H, V]` in it too, O `[B, T, H, V]` in `out_dtype`, beta and the states float32."""

    @staticmethod
    def forward(ctx, q, k, w, v, beta, s0, scale, precision, out_dtype):
        B, H, NC, C, K = k.shape
        T, V = v.shape[1], v.shape[-1]
        f32 = k.dtype == torch.float32  # storage: the kernels' launch (`_chunk_launch`)
        scratch, tinv = beta.new_empty(B, H, NC, C, C), k.new_empty(B, H, NC, C, C)
        ub, kb = k.new_empty(B, H, NC, C, V), torch.empty_like(k)
        enqueue(
            wy_fwd_kernel, (B * H * NC,),
            k, w, v, beta, scratch, tinv, ub, kb, T, H, NC,
            K=K, V=V, C=C, PRECISION=precision, DOUBLING=_doubling(precision),
            **_chunk_launch("wy_fwd", K, V, precision, float32=f32),
        )  # fmt: skip
        del scratch  # before the scan allocates the per-chunk states
        uo = torch.empty_like(ub)
        ss, sf = _state_scan(kb, w, ub, s0, uo, precision)
        del ub, kb  # Kb is rebuilt from T in the backward, for 1X less saved
        o = v.new_empty(B, T, H, V, dtype=out_dtype)
        launch = _chunk_launch("out_fwd", K, V, precision, float32=f32)
        enqueue(
            out_fwd_kernel, (cdiv(V, launch["BV"]), B * H * NC),
            q, w, uo, ss, o, scale, T, H, NC,
            K=K, V=V, C=C, PRECISION=precision, **launch,
        )  # fmt: skip
        # The per-chunk states (twice the size of U) and Kb are not kept for the backward, which
        # rebuilds them from W and U, and T: a model holds every layer's saved tensors at once.
        ctx.save_for_backward(q, k, w, v, beta, tinv, uo, s0)
        ctx.scale, ctx.precision = scale, precision
        ctx.set_materialize_grads(False)  # an unused S_final's gradient comes as None, not a zero fill
        return o, sf

    @staticmethod
    def backward(ctx, do, ds):
        q, k, w, v, beta, tinv, uo, s0 = ctx.saved_tensors
        B, H, NC, C, K = k.shape
        T, V = v.shape[1], v.shape[-1]
        scale, precision, f32 = ctx.scale, ctx.precision, k.dtype == torch.float32
        ss, _ = _state_scan(None, w, None, s0, uo, precision)  # the final state is not rebuilt
        do = torch.zeros_like(v) if do is None else do.contiguous()
        ds = contiguous_or_none(ds)  # None: S_final was not used (the scan reads zeros)
        gu, gss = torch.empty_like(uo), torch.empty_like(ss)
        enqueue(
            out_bwd_kernel, (B * H * NC,),
            q, w, do, gu, gss, scale, T, H, NC,
            K=K, V=V, C=C, PRECISION=precision, **_chunk_launch("out_bwd", K, V, precision, float32=f32),
        )  # fmt: skip
        kb = torch.empty_like(k)
        enqueue(
            kb_kernel, (B * H * NC,),
            k, beta, tinv, kb,
            K=K, C=C, PRECISION=precision, **_chunk_launch("kb", K, precision=precision, float32=f32),
        )  # fmt: skip
        dub, dss, ds0 = _state_scan_bwd(kb, w, gu, gss, ds, precision, initial=s0 is not None)
        del gu, gss, kb  # no later kernel reads these: freed before dK is allocated
        dq, dk, dw = (
            torch.empty_like(q),
            _grad_buffer(k, "phase2"),
            _grad_buffer(w, "phase2"),
        )
        launch = _chunk_launch("state_grads", K, V, precision, float32=f32)
        enqueue(
            state_grads_kernel, (cdiv(K, launch["BK"]), B * H * NC),
            q, w, uo, ss, do, dub, dss, dq, dk, dw, scale, T, H, NC,
            K=K, V=V, C=C, PRECISION=precision, **launch,
        )  # fmt: skip
        del do, ss, dss  # the states and their gradients (4X) go before the last kernel's outputs come
        dv, dbeta = torch.empty_like(v), torch.empty_like(beta)
        dk_out, dw_out = _in_dtype_of(dk, k), _in_dtype_of(dw, w)
        enqueue(
            wy_bwd_kernel, (B * H * NC,),
            k, w, v, beta, tinv, dub, dk, dw, dk_out, dw_out, dv, dbeta, T, H, NC,
            K=K, V=V, C=C, PRECISION=precision, **_chunk_launch("wy_bwd", K, V, precision, float32=f32),
        )  # fmt: skip
        return dq, dk_out, dw_out, dv, dbeta, ds0, None, None, None


# Phase 1's chunks: phase 2's split in two (a view of the same layout; `chunk`) where it runs at
# least `min_scans` (batch, head) scans, after the kernels that make their chunks (not overlapped:
# `_overlap_workers`). Its per-chunk kernels then do half the C x C work a token (U U^T, the
# inverse, Y) on [32, 32] tiles, and its two scans take twice the steps over the same data. (Its
# output step took 64 rows a program, two chunks of 32, before eb29181.) Against chunks of 64,
# GPU time in one process (H200, bf16, H = 16, K = V = 128;
# benchmarks/results/phase1_chunk32_9d53791.json):
#   8 x 2048 (128 scans): forward 915 -> 838 us, forward+backward 2535 -> 2467
#   4 x 4096 (64 scans):  forward 948 -> 892 us, forward+backward 2640 -> 2624
#   3 x 4096 (48 scans):  forward 783 -> 751 us, forward+backward 2210 -> 2225 (so 64 and up then)
# (pre_intra_fwd 252 -> 146 us, pre_y 71 -> 49, pre_intra_bwd 259 -> 222; the scans 57 + 66 ->
# 77 + 96 us at 8 x 2048, 99 + 122 -> 140 + 181 at 4 x 4096; the output step 68 + 178 -> 76 + 214.)
# Where the scans run beside the chunks' making, they bound that launch: 2 x 8192 took 992 -> 1239
# us forward, 1 x 16384 1136 -> 1629 (phase1_chunk32_d8ce7ef.json).
#
# `launch`: what replaces CHUNK_LAUNCH's settings for phase 1's kernels in chunks of 32 (and the
# warps of its split backward scan, SCAN_TUNING["precond_bwd"]["split_num_warps"]), whose tables
# were measured at 64. Per kernel, GPU time in one forward+backward, in one process, the settings
# interleaved over 3 rounds (H200, bf16, H = 16, K = V = 128; benchmarks/results/
# c32launch{,2,3}_8ee26e0.json, pwarps_8ee26e0.json), table -> this, at 8 x 2048 and 4 x 4096:
#   pre_intra_bwd (1 warp):          222 -> 132 us, 222 -> 132 (2 warps: 203; 1 warp at tile 16: 171)
#   pre_out_bwd (2 warps, tile 16):  215 -> 201, 214 -> 202 (64-row programs; 2 warps at 32: 209)
#   pre_y (2 warps, tile 128):       50 -> 41, 50 -> 41
#   pre_intra_fwd (1 warp, tile 64): 148 -> 142, 147 -> 142
#   the backward scan (2 warps):     96 -> 89, 181 -> 163 (the forward scan at 2 warps: 77 -> 105)
# The output step then ran 64 rows a program, two chunks of 32 (pre_out_bwd at 4 warps in 32-row
# programs had taken 323 us, d8ce7ef). In 32-row programs at 1 warp it takes about half
# (benchmarks/results/sweep18_c32_d295546.json, same method; 64-row programs at the settings
# above -> 32-row ones at these), at 8 x 2048 and 4 x 4096:
#   pre_out_fwd (1 warp, tile 64):   76 -> 60, 76 -> 60 (2 warps at 32: 64; 1 warp at 32: 62)
#   pre_out_bwd (1 warp, tile 16):  202 -> 108, 201 -> 108 (1 warp at 32: 117; 2 warps at 16: 147)
#   forward+backward -4.2% and -3.5% (at pre_out_fwd 2 warps, tile 32; the split backward scan
#   there at the table's warps, not 2: 89 -> 97 and 165 -> 182 us).
PHASE1 = dict(
    chunk=32,
    # From 34 scans (was 64): on an H200 (132 SMs) phase 1's scans run beside their chunks' making
    # up to 33 (`_overlap_workers`). Since eb29181, chunks of 32 pay below 64 too: GPU time in one
    # process, chunks of 64 -> 32 (benchmarks/results/sweep18_{c64b,ms}_eb29181.json; bf16, K = V =
    # 128), forward+backward 937 -> 911 us at 9 x 2048 x 4 heads (36 scans), 1872 -> 1784 at
    # 5 x 4096 x 8 (40), 1752 -> 1688 at 3 x 4096 x 12 (36), 582 -> 556 at 11 x 1024 x 4 (44),
    # 2136 -> 2017 at 3 x 4096 x 16 (48); forward level to -6%. At 34 and 35, chunks of 64 (not
    # overlapped there) -> 32 (benchmarks/results/sweep48_775c306.json): forward+backward 898 -> 866
    # us at 17 x 2048 x 2 heads (34), 913 -> 883 at 5 x 2048 x 7 (35), 1714 -> 1648 at 7 x 4096 x 5
    # (35), 1692 -> 1628 at 2 x 4096 x 17 (34); forward 327 -> 319, 331 -> 326, 628 -> 606, 616 -> 594.
    # At 256 and 512 scans these settings and `read_inverse` stay the fastest: forward+backward at
    # 16 x 2048, 32 x 1024 and 32 x 2048, 4241 / 4208 / 8222 us, against 4648 / 4681 / 9153 in
    # chunks of 64, 4506 / 4467 / 8747 with 2 warps where `launch` has one, 4292 / 4275 / 8338
    # reading Y (benchmarks/results/sweep22_c9ca4bb.json).
    min_scans=34,
    launch=dict(
        pre_intra_fwd=dict(num_warps=1, tile=64),
        pre_y=dict(num_warps=2, tile=128),
        pre_out_fwd=dict(num_warps=1, tile=64),
        pre_out_bwd=dict(num_warps=1, tile=16),
        pre_intra_bwd=dict(num_warps=1),
        precond_bwd=dict(split_num_warps=2),
    ),
)


def _phase1_chunk(C: int, heads: int, device, float32: bool = False) -> int:
    """Phase 1's chunk size under phase 2's chunks of C, for `heads` (batch, head) pairs (`PHASE1`);
    with `float32` (float32 storage at head dims up to `IEEE_LAUNCH["max_head_dim"]`, products
    exact or tf32: `_float32_launch`), PHASE1's chunk at any number of pairs where
    `IEEE_LAUNCH["phase1_split"]`."""
    c1 = PHASE1["chunk"]
    if C % c1:
        return C
    if float32 and IEEE_LAUNCH["phase1_split"]:
        return c1
    if heads < PHASE1["min_scans"]:
        return C
    if any(_overlap_workers(heads, device, scan) for scan in ("precond_fwd", "precond_bwd")):
        return C
    return c1


def chunk_osdn_fused(qc, kc, v, bc, ec, lc, scale, S0, d0, precision, out_dtype, unit_keys=False):
    """Both phases: q, k, beta, eta, lam chunked `[B, H, NC, C, *]` (q, k in the storage dtype,
    the rest float32), v `[B, T, H, V]` in the storage dtype, the initial states float32 or None
    (S_0 = 0, d_0 = 1, read as such by the scans, so never filled in memory): `(O, S_final,
    d_final)`, O `[B, T, H, V]` in `out_dtype`. `unit_keys`: the keys were L2-normalised on the way
    in (`_precond_scan_grouped`)."""
    qc, kc, v, bc, ec, lc = (x.contiguous() for x in (qc, kc, v, bc, ec, lc))
    B, H, NC, C, K = kc.shape
    float32 = _float32_launch(kc, K)
    training = torch.is_grad_enabled() and any(x.requires_grad for x in (kc, bc, ec, lc, d0) if x is not None)
    L = _precond_groups(C, NC, K, B * H, kc.device, training and not float32)
    c1 = PHASE1["chunk"] if L else _phase1_chunk(C, B * H, kc.device, float32)
    n1 = NC * C // c1
    gates = (x.view(B, H, n1, c1) for x in (bc, ec, lc))
    w, d, kc = Precondition.apply(
        kc.view(B, H, n1, c1, K), *gates, contiguous_or_none(d0), precision, c1 < C, L, unit_keys
    )  # kc: see Precondition
    w, kc = w.view(B, H, NC, C, K), kc.view(B, H, NC, C, K)
    o, S = DeltaRuleAsym.apply(qc, kc, w, v, bc, contiguous_or_none(S0), scale, precision, out_dtype)
    return o, S, d

"""Triton kernels of phase 2's per-chunk steps: the asymmetric WY delta rule of SPEC section 3.

Forward: `wy_fwd_kernel` (A = I + tril(diag(b) K W^T, -1), T = A^{-1}, Ub = T diag(b) V, Kb) ->
the state scan (`chunk_scan.state_scan_fwd_kernel`) -> `out_fwd_kernel` (O). Backward:
`out_bwd_kernel` (dU, dS_n from O) -> the state scan backward -> `state_grads_kernel` (dQ, dKb,
dW: all that reads a state) -> `wy_bwd_kernel`; `kb_kernel` makes Kb again where the forward did
not keep it. The host side, `chunk_fused.DeltaRuleAsym`, launches them; `chunk_fused.py`'s
docstring gives the layout and the dtypes of the products.
"""

from __future__ import annotations

from .chunk_scan import HAS_TRITON

if HAS_TRITON:  # the kernels exist only with Triton; without it chunk.py never calls this module
    import triton
    import triton.language as tl

    from .chunk_kernels import _bthd_rows, _invert, _walk_k_blocks

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

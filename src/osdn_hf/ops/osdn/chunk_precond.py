"""Triton kernels of phase 1's per-chunk steps: the preconditioner recurrence of SPEC section 2,
chunked.

Forward: `pre_intra_fwd_kernel` (L, (I + L)^{-1}, Y or the inverse's factors, dm, p, Gc) -> the
preconditioner scan (`chunk_scan.py`) -> `pre_out_fwd_kernel` (E, W = D * K). With few scans
`precond_fwd_overlap_kernel` runs the first two side by side. Backward: `pre_y_kernel` (Y again)
-> `pre_out_bwd_kernel` -> the scan backward -> `pre_intra_bwd_kernel`, the first three side by
side in `precond_bwd_overlap_kernel` with few scans. The host side, `chunk_fused.Precondition`,
launches them; `chunk_fused.py`'s docstring gives the layout and the dtypes of the products.
"""

from __future__ import annotations

from .chunk_scan import HAS_TRITON

LAM_MIN = 1e-30  # lam is clamped here before its log (both chunk paths): log(0) would be -inf

if HAS_TRITON:  # the kernels exist only with Triton; without it chunk.py never calls this module
    import triton
    import triton.language as tl

    from .chunk_kernels import _invert, _walk_k_blocks
    from .chunk_scan import (
        _precond_scan_bwd_de_prefetching,
        _precond_scan_fwd_prefetching,
        _raise_flag,
    )

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

"""The two sequential scans over chunks of `chunk_osdn`, as Triton kernels and torch loops.

Everything else in the chunked form is parallel over chunks (README.md); only these two
recurrences carry state from one chunk to the next:

* `precond_scan` (phase 1), per batch element and head, a `K`-vector:
  `e_{n+1} = Gc_n e_n + U_n^T (p_n * (dm_n - Y_n e_n))`
* `state_scan` (phase 2), per batch element and head, the `K x V` memory:
  `U_n = Ub_n - Kb_n S_n`, `S_{n+1} = S_n + W_n^T U_n`

Shapes (float32, contiguous): `Y, U, Kb, W` `[B, H, NC, C, K]`, `Ub` `[B, H, NC, C, V]`,
`dm, p` `[B, H, NC, C]`, `Gc` `[B, H, NC]`, `e` `[B, H, K]`, `S` `[B, H, K, V]`. Both scans
return the value at every chunk start (`[B, H, NC, K]`, `[B, H, NC, K, V]`) and the final one.
The preconditioner's scan starts from `d_0` and ends at `d = 1 + e` (e = d - 1 in between). An
initial state of None is the default one (`d_0 = 1`, `S_0 = 0`), never made in memory, and so
is a final state's gradient of None (zeros).
The Triton versions have hand-written backward kernels (reverse scans); the torch versions
are differentiated by autograd. Both compute the same function (tests/test_triton.py).
"""

from __future__ import annotations

import torch

from .launch import block_width, cdiv, contiguous_or_none, enqueue

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the pure-torch path needs no Triton
    HAS_TRITON = False


if HAS_TRITON:
    # The scans take the chunk count NC as a plain runtime integer. Triton would otherwise compile
    # NC == 1 (T <= 64) as a constant, unroll the one pass through the loop over chunks, and
    # Triton 3.6 got that straight-line code wrong on an H200 in 16-bit at some tile shapes: the
    # final state (and the initial state's gradient) came out wrong while every per-chunk value
    # was right, e.g. K = V = 128 (BV 32, BS 64; benchmarks/results/kernels_scan_nc1.json).
    _scan_jit = triton.jit(do_not_specialize=["NC"])

    @triton.jit
    def _state_or_default(x, o, m, DEFAULT: tl.constexpr = 0.0):
        """`x`'s float32 entries at offsets `o` (mask `m`, DEFAULT where masked), or DEFAULT
        everywhere where `x` is None: a default state that no caller made (S_0 = 0, d_0 = 1), or
        the gradient of a final state that nothing read (zeros)."""
        b_x = tl.full(o.shape, DEFAULT, dtype=tl.float32)
        if x is not None:
            b_x = tl.load(x + o, mask=m, other=DEFAULT)
        return b_x

    @triton.jit
    def _precond_yu(y, u, o_t, o_k, m_k, K: tl.constexpr):
        """Rows `o_t` of y and u, `[len(o_t), BK]`, as stored."""
        o_tk = o_t[:, None] * K + o_k[None, :]
        return tl.load(y + o_tk, mask=m_k[None, :], other=0.0), tl.load(u + o_tk, mask=m_k[None, :], other=0.0)

    @triton.jit
    def _precond_rows(y, u, dm, p, o_t, o_k, m_k, K: tl.constexpr):
        """Rows `o_t` of y and u (as stored), dm and p: what both scans read."""
        b_y, b_u = _precond_yu(y, u, o_t, o_k, m_k, K)
        return b_y, b_u, tl.load(dm + o_t), tl.load(p + o_t)

    @triton.jit
    def _precond_fwd_rows(b_y, b_u, b_p, b_dm, b_e, SQUARE: tl.constexpr, b_r):
        """sum_t u_t p_t delta_t over rows of a chunk (tiles as loaded), and the rows' delta_t =
        dm_t - <y_t, e_n>. With `b_r` (not None), `b_y` is the chunk's `(I + L)^{-1}` (`[C, C]`,
        float32) and Y's rows are never formed: Y e_n = (I + L)^{-1} (r * (U e_n))."""
        b_u = b_u.to(tl.float32)
        if SQUARE:
            b_u = b_u * b_u
        if b_r is None:
            b_ye = tl.sum(b_y.to(tl.float32) * b_e[None, :], 1)  # [BS]
        else:
            b_ye = tl.sum(b_y * (b_r * tl.sum(b_u * b_e[None, :], 1))[None, :], 1)  # [C]
        b_delta = b_dm - b_ye
        return tl.sum(b_u * (b_p * b_delta)[:, None], 0), b_delta

    @triton.jit
    def _precond_fwd_loads(y, u, dm, p, r, o_t, o_s, o_k, m_k, K: tl.constexpr, C: tl.constexpr):
        """What the prefetching forward scan reads for rows `o_t` (one whole chunk): y, u, dm, p
        and, with `r` (not None), the chunk's `(I + L)^{-1}` from `y` in place of Y's rows, and r
        (without r, a placeholder)."""
        if r is None:
            b_y, b_u, b_dm, b_p = _precond_rows(y, u, dm, p, o_t, o_k, m_k, K)
            b_r = b_p  # a placeholder, unread without r
        else:  # (one return after both: Triton 3.6 compiles what follows an early return too)
            b_y = tl.load(y + o_t[:, None] * C + o_s[None, :])
            b_u = tl.load(u + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
            b_dm, b_p, b_r = tl.load(dm + o_t), tl.load(p + o_t), tl.load(r + o_t)
        return b_y, b_u, b_dm, b_p, b_r

    @triton.jit
    def _wait_for(flag):
        """Spin until another program raises `flag` (`_raise_flag`): what it wrote before is then
        visible to this program's loads."""
        while tl.atomic_add(flag, 0, sem="acquire") == 0:
            pass

    @triton.jit
    def _wait_for_run(ready, first, step, n, RUN: tl.constexpr):
        """Spin until the flags of the `min(n, RUN)` chunks `first, first + step, ...` are all raised
        (none if `n <= 0`; RUN a power of two): one round of acquire atomics, issued together, for
        a run of chunks instead of one on each chunk's way (`_wait_for`). The barrier after it
        passes what the threads that read the flags learnt to every thread of the program before
        any of them reads a chunk."""
        o_r = tl.arange(0, RUN)
        m_r = o_r < n
        flags = ready + first + step * o_r
        while tl.min(tl.where(m_r, tl.atomic_add(flags, tl.zeros_like(o_r), mask=m_r, sem="acquire"), 1), 0) == 0:
            pass
        tl.debug_barrier()

    @triton.jit
    def _wait_for_next(ready, i_x, step, left, i_n, RUN: tl.constexpr):
        """A scan's wait at its `i_n`-th step, before it loads chunk `i_x` (the next one, `step`
        from this one; `left` chunks remain after this one): for chunk `i_x` alone with RUN 1,
        else, every RUN-th step, for the next RUN chunks at once (`_wait_for_run`)."""
        if RUN == 1:
            _wait_for(ready + i_x)
        elif i_n % RUN == 0:
            _wait_for_run(ready, i_x, step, left, RUN)

    @triton.jit
    def _raise_flag(flag):
        """Set `flag` (int32) to 1 once every thread of this program has stored what it guards
        (release): a program in `_wait_for(flag)` then sees those stores."""
        tl.debug_barrier()
        tl.atomic_xchg(flag, 1, sem="release")

    @triton.jit
    def _precond_scan_fwd_prefetching(
        y, u, dm, p, gc, d0, es, df, dl, ready, i_bh, NC, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
        SQUARE: tl.constexpr, RUN: tl.constexpr, r,
    ):  # fmt: skip
        """`precond_scan_fwd_kernel` with PREFETCH for (batch, head) `i_bh`: the next chunk's rows
        are loaded before this chunk is reduced, and delta is written to `dl` (unless None). With
        `r` (not None), `y` holds each chunk's `(I + L)^{-1}` and r its columns' factors
        (`_precond_fwd_rows`). With `ready` (not None), each chunk's rows are read only once its
        flag `ready[i_c]` is raised: another program is still writing them
        (`chunk_precond.precond_fwd_overlap_kernel`). The flags are read RUN chunks at a time
        (`_wait_for_run`): every RUN-th step waits for the next RUN chunks."""
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        o_s = tl.arange(0, C)
        b_e = _state_or_default(d0, i_bh * K + o_k, m_k, 1.0) - 1.0  # e_0 = d_0 - 1, [BK]
        if ready is not None:
            _wait_for(ready + i_bh * NC)
        o_first = i_bh * NC * C + o_s  # the first chunk
        b_y, b_u, b_dm, b_p, b_r = _precond_fwd_loads(y, u, dm, p, r, o_first, o_s, o_k, m_k, K, C)
        b_gc = tl.load(gc + i_bh * NC)
        for i_n in range(NC):
            i_c = i_bh * NC + i_n
            tl.store(es + i_c * K + o_k, b_e, mask=m_k)
            i_x = tl.minimum(i_c + 1, i_bh * NC + NC - 1)  # the next chunk (the last one again at the end)
            if ready is not None:
                _wait_for_next(ready, i_x, 1, NC - 1 - i_n, i_n, RUN)
            n_y, n_u, n_dm, n_p, n_r = _precond_fwd_loads(y, u, dm, p, r, i_x * C + o_s, o_s, o_k, m_k, K, C)
            n_gc = tl.load(gc + i_x)
            # without r, b_r is a placeholder tensor, which must not reach _precond_fwd_rows as an r
            b_sum, b_delta = _precond_fwd_rows(b_y, b_u, b_p, b_dm, b_e, SQUARE, None if r is None else b_r)
            if dl is not None:
                tl.store(dl + i_c * C + o_s, b_delta)
            b_e = b_e * b_gc + b_sum
            b_y, b_u, b_dm, b_p, b_r, b_gc = n_y, n_u, n_dm, n_p, n_r, n_gc
        tl.store(df + i_bh * K + o_k, 1.0 + b_e, mask=m_k)

    @_scan_jit
    def precond_scan_fwd_kernel(
        y,
        u,
        dm,
        p,
        gc,
        d0,
        es,
        df,
        dl,
        r,
        NC,
        K: tl.constexpr,
        C: tl.constexpr,
        BK: tl.constexpr,
        BS: tl.constexpr,
        SQUARE: tl.constexpr = False,
        PREFETCH: tl.constexpr = False,
    ):
        """e_{n+1} = Gc_n e_n + sum_t u_t p_t delta_t with delta_t = dm_t - <y_t, e_n>, one (batch,
        head) per program, from e_0 = d_0 - 1 (0 where `d0` is None) to d = 1 + e_NC (`df`); delta
        is written to `dl` unless it is None (phase 1's output step and backward read it, so they
        need no Y). With `r` (not None; PREFETCH only), `y` holds
        each chunk's `(I + L)^{-1}` (`[B, H, NC, C, C]`) and `r` the factors of Y = (I + L)^{-1}
        diag(r) U (`[B, H, NC, C]`), so Y is never stored (`chunk_fused.Precondition`).

        With SQUARE `u` holds k and u = k * k is formed on the way, so u is never stored. With
        PREFETCH (BS == C) the next chunk's rows are loaded before this chunk is reduced, so their
        latency overlaps the reduction instead of following it; the sums are the same."""
        i_bh = tl.program_id(0).to(tl.int64)
        if PREFETCH:
            tl.static_assert(BS == C)
            _precond_scan_fwd_prefetching(y, u, dm, p, gc, d0, es, df, dl, None, i_bh, NC, K, C, BK, SQUARE, 1, r)
        else:
            tl.static_assert(r is None)
            o_k = tl.arange(0, BK)
            m_k = o_k < K
            o_s = tl.arange(0, BS)
            b_e = _state_or_default(d0, i_bh * K + o_k, m_k, 1.0) - 1.0  # e_0 = d_0 - 1, [BK]
            for i_n in range(NC):
                i_c = i_bh * NC + i_n
                tl.store(es + i_c * K + o_k, b_e, mask=m_k)
                b_new = b_e * tl.load(gc + i_c)
                for i_s in tl.static_range(C // BS):
                    # the chunk is read in row slices of BS so a [BS, BK] tile fits in registers
                    o_t = i_c * C + i_s * BS + o_s
                    b_y, b_u, b_dm, b_p = _precond_rows(y, u, dm, p, o_t, o_k, m_k, K)
                    b_sum, b_delta = _precond_fwd_rows(b_y, b_u, b_p, b_dm, b_e, SQUARE, None)
                    if dl is not None:
                        tl.store(dl + o_t, b_delta)
                    b_new += b_sum
                b_e = b_new
            tl.store(df + i_bh * K + o_k, 1.0 + b_e, mask=m_k)

    @triton.jit
    def _map_dot(a, b, PRECISION: tl.constexpr, DOT16: tl.constexpr):
        """a @ b in float32 from float32 operands (PRECISION), or with DOT16 from their float16
        roundings (as many mantissa bits as tf32's)."""
        if DOT16:
            return tl.dot(a.to(tl.float16), b.to(tl.float16))
        return tl.dot(a, b, input_precision=PRECISION)

    @_scan_jit
    def precond_group_maps_kernel(
        y, u, dm, p, gc, mg, cg, r, L, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr,
        PRECISION: tl.constexpr, SQUARE: tl.constexpr = False, DOT16: tl.constexpr = False,
    ):  # fmt: skip
        """Each group of L chunks' affine map `e -> M_g e + c_g` (the product of its chunks'
        `e -> Gc_n e + U_n^T (p_n * (dm_n - Y_n e))`), one (group, column block) per program: the
        chunked tensors are read as `[groups, L, C, *]` (`[B * H * G, L, ...]`, groups of L
        consecutive chunks of one (batch, head)). Programs `j < cdiv(K, BJ)` carry columns
        `[j BJ, (j + 1) BJ)` of `M_g` from the identity, `X <- Gc_n X - U_n^T diag(p_n) Y_n X`, with
        two products a chunk (tf32 or ieee, PRECISION), and write them to `mg` `[groups, K, K]`; the
        last program scans the group from `e = 0` exactly as `precond_scan_fwd_kernel` does, which
        gives `c_g` (`cg` `[groups, K]`). SQUARE, and `r` (y then holds each chunk's inverse and
        `Y_n X = (I + L)^{-1} (r * (U_n X))`, a third product), as there.

        With DOT16 the products take float16 roundings of their float32 operands, accumulating in
        float32: float16 keeps tf32's 10 mantissa bits, so within its range (what a caller must
        know: u = k * k <= 1 for unit keys) each operand rounds as tf32 would (ties aside) from 2^-14
        up, and the tensor cores multiply float16 at twice tf32's rate. On an H200 the maps took
        214-219 us against 259-265 at 16 heads x 16384 tokens, with the outputs and gradients the
        same to the bit (benchmarks/results/grp32c_e40adb4.json)."""
        i_g, i_j = tl.program_id(0).to(tl.int64), tl.program_id(1)
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        o_s = tl.arange(0, C)
        if i_j == tl.num_programs(1) - 1:
            b_e = tl.zeros([BK], dtype=tl.float32)
            for i_n in range(L):
                i_c = i_g * L + i_n
                b_y, b_u, b_dm, b_p, b_r = _precond_fwd_loads(y, u, dm, p, r, i_c * C + o_s, o_s, o_k, m_k, K, C)
                b_sum, _ = _precond_fwd_rows(b_y, b_u, b_p, b_dm, b_e, SQUARE, None if r is None else b_r)
                b_e = b_e * tl.load(gc + i_c) + b_sum
            tl.store(cg + i_g * K + o_k, b_e, mask=m_k)
        else:
            o_j = i_j * BJ + tl.arange(0, BJ)
            b_x = (o_k[:, None] == o_j[None, :]).to(tl.float32)  # [BK, BJ]
            for i_n in range(L):
                i_c = i_g * L + i_n
                o_t = i_c * C + o_s
                b_u = tl.load(u + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32)
                if SQUARE:
                    b_u = b_u * b_u
                if r is None:
                    b_y = tl.load(y + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
                    b_t = _map_dot(b_y.to(tl.float32), b_x, PRECISION, DOT16)  # [C, BJ]
                else:
                    b_t = _map_dot(b_u, b_x, PRECISION, DOT16) * tl.load(r + o_t)[:, None]
                    b_ti = tl.load(y + o_t[:, None] * C + o_s[None, :])  # (I + L)^{-1}, [C, C]
                    b_t = _map_dot(b_ti, b_t, PRECISION, DOT16)
                b_t = b_t * tl.load(p + o_t)[:, None]
                b_x = b_x * tl.load(gc + i_c) - _map_dot(tl.trans(b_u), b_t, PRECISION, DOT16)
            m_kj = m_k[:, None] & (o_j < K)[None, :]
            tl.store(mg + i_g * K * K + o_k[:, None] * K + o_j[None, :], b_x, mask=m_kj)

    @_scan_jit
    def precond_group_starts_kernel(
        mg, cg, d0, ds, G, K: tl.constexpr, BK: tl.constexpr, REVERSE: tl.constexpr = False
    ):  # fmt: skip
        """The value entering each of a (batch, head)'s G groups, one (batch, head) per program:
        from `e = d_0 - 1` (0 where `d0` is None), `e <- M_g e + c_g` group after group
        (`precond_group_maps_kernel`'s maps, each loaded while the one before is applied), written
        as d = 1 + e to `ds` (`[B * H * G, K]`: the starts `precond_scan_fwd_kernel` takes per
        group). The last group's map is not applied.

        With REVERSE, the backward's: from e's final gradient `d0` (0 where None), from the last
        group to the first, the gradient at each group's end is written to `ds` as it is (what
        `precond_scan_bwd_de_kernel` takes per group) and carried to the group's start as
        `M_g^T e + c_g` (`c_g`: that scan's result from a zero end); the first group's map is not
        applied."""
        i_bh = tl.program_id(0).to(tl.int64)
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        o_kk = o_k[:, None] * K + o_k[None, :]
        m_kk = m_k[:, None] & m_k[None, :]
        if REVERSE:
            b_e = _state_or_default(d0, i_bh * K + o_k, m_k)
        else:
            b_e = _state_or_default(d0, i_bh * K + o_k, m_k, 1.0) - 1.0
        i_x = i_bh * G + (G - 1 if REVERSE else 0)  # this group
        b_m = tl.load(mg + i_x * K * K + o_kk, mask=m_kk, other=0.0)  # its map, [BK, BK]
        for j in range(G):
            tl.store(ds + i_x * K + o_k, b_e if REVERSE else 1.0 + b_e, mask=m_k)
            if j < G - 1:
                i_n = i_x - 1 if REVERSE else i_x + 1  # the next group
                n_m = tl.load(mg + i_n * K * K + o_kk, mask=m_kk, other=0.0)
                b_c = tl.load(cg + i_x * K + o_k, mask=m_k, other=0.0)
                if REVERSE:
                    b_e = tl.sum(b_m * b_e[:, None], 0) + b_c
                else:
                    b_e = tl.sum(b_m * b_e[None, :], 1) + b_c
                b_m, i_x = n_m, i_n

    @triton.jit
    def _precond_bwd_loads(
        y, u, dm, p, ddm, du, dy, o_t, o_k, m_k, K: tl.constexpr, ACC: tl.constexpr, DY: tl.constexpr
    ):
        """What `precond_scan_bwd_kernel` reads for rows `o_t`: y, u, dm, p, and what ddm, du and
        dy hold with ACC (placeholders without)."""
        b_y, b_u, b_dm, b_p = _precond_rows(y, u, dm, p, o_t, o_k, m_k, K)
        b_ddm, b_du, b_dy = b_p, b_y, b_y  # placeholders without ACC
        if ACC:
            o_tk = o_t[:, None] * K + o_k[None, :]
            b_ddm = tl.load(ddm + o_t)
            b_du = tl.load(du + o_tk, mask=m_k[None, :], other=0.0)
            if DY:
                b_dy = tl.load(dy + o_tk, mask=m_k[None, :], other=0.0)
        return b_y, b_u, b_dm, b_p, b_ddm, b_du, b_dy

    @triton.jit
    def _precond_bwd_chunk(es, ges, gc, i_c, o_k, m_k, K: tl.constexpr):
        """Chunk `i_c`'s e_n, the gradient of e_n from outside the scan, and Gc."""
        b_e = tl.load(es + i_c * K + o_k, mask=m_k, other=0.0)  # [BK]
        return b_e, tl.load(ges + i_c * K + o_k, mask=m_k, other=0.0), tl.load(gc + i_c)

    @triton.jit
    def _precond_pq(b_u, b_p, b_de, SQUARE: tl.constexpr):
        """u (formed from k with SQUARE), q_t = <u_t, de> and p_t q_t, for rows of a chunk."""
        b_u = b_u.to(tl.float32)
        if SQUARE:
            b_u = b_u * b_u
        b_q = tl.sum(b_u * b_de[None, :], 1)  # [BS]
        return b_u, b_q, b_p * b_q

    @triton.jit
    def _precond_bwd_rows(
        b_y, b_u, b_p, b_dm, b_e, b_de, b_ddm, b_du, b_dy, o_t, o_tk, m_k, ddm, dp, dy, du,
        ACC: tl.constexpr, DY: tl.constexpr, SQUARE: tl.constexpr, YDDM: tl.constexpr = False,
        DELTA: tl.constexpr = False,
    ):  # fmt: skip
        """Rows of a chunk in `precond_scan_bwd_kernel`: writes their d(dm), dp, dU (and dY),
        adding to `b_ddm`, `b_du`, `b_dy` (what the buffers held) with ACC; returns Y^T (p q), or
        with YDDM (and ACC) Y^T (p q + b_ddm). With DELTA `b_dm` is already `dm - Y e_n`."""
        b_y = b_y.to(tl.float32)
        b_u, b_q, b_pq = _precond_pq(b_u, b_p, b_de, SQUARE)
        if DELTA:
            b_res = b_dm
        else:
            b_res = b_dm - tl.sum(b_y * b_e[None, :], 1)  # [BS]
        b_ddm_out = b_pq + b_ddm if ACC else b_pq  # d(dm) as written (what YDDM returns Y^T of)
        tl.store(ddm + o_t, b_ddm_out)
        if ACC:
            tl.store(du + o_tk, (b_p * b_res)[:, None] * b_de[None, :] + b_du, mask=m_k[None, :])
        else:
            tl.store(du + o_tk, (b_p * b_res)[:, None] * b_de[None, :], mask=m_k[None, :])
        tl.store(dp + o_t, b_res * b_q)
        if DY:
            if ACC:
                tl.store(dy + o_tk, b_dy - b_pq[:, None] * b_e[None, :], mask=m_k[None, :])
            else:
                tl.store(dy + o_tk, -b_pq[:, None] * b_e[None, :], mask=m_k[None, :])
        if YDDM:
            tl.static_assert(ACC)
            return tl.sum(b_y * b_ddm_out[:, None], 0)
        return tl.sum(b_y * b_pq[:, None], 0)

    @_scan_jit
    def precond_scan_bwd_kernel(
        y,
        u,
        dm,
        p,
        gc,
        es,
        ges,
        gef,
        dy,
        du,
        ddm,
        dp,
        dgc,
        de0,
        NC,
        K: tl.constexpr,
        C: tl.constexpr,
        BK: tl.constexpr,
        BS: tl.constexpr,
        ACC: tl.constexpr = False,
        DY: tl.constexpr = True,
        SQUARE: tl.constexpr = False,
        PREFETCH: tl.constexpr = False,
        YDDM: tl.constexpr = False,
        DELTA: tl.constexpr = False,
    ):
        """Reverse of `precond_scan_fwd_kernel`; `de` is the gradient of e_{n+1}. With ACC the
        gradients of y, u and dm are added to what those buffers hold; without DY dy is not
        written (it is `-ddm e_n^T`, which a caller can rebuild). SQUARE and PREFETCH as in the
        forward (with PREFETCH the chunk before is loaded while this one is reduced); `du` is
        still the gradient of u. With YDDM (and ACC) e_n's gradient also loses `Y^T ddm`, ddm as
        the buffer held it, which `ges` then leaves out: the gradient of e_n through a
        `dm - Y e_n` of the caller's, whose gradient it added to ddm (`pre_out_bwd_kernel`). With
        DELTA `dm` holds `dm - Y e_n` itself (as the forward's last step saved it)."""
        i_bh = tl.program_id(0).to(tl.int64)
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        o_s = tl.arange(0, BS)
        b_de = _state_or_default(gef, i_bh * K + o_k, m_k)  # [BK]
        if PREFETCH:
            tl.static_assert(BS == C)
            i_c = i_bh * NC + NC - 1  # the last chunk
            b_y, b_u, b_dm, b_p, b_ddm, b_du, b_dy = _precond_bwd_loads(
                y, u, dm, p, ddm, du, dy, i_c * C + o_s, o_k, m_k, K, ACC, DY
            )
            b_e, b_ges, b_gc = _precond_bwd_chunk(es, ges, gc, i_c, o_k, m_k, K)
            for j in range(NC):
                i_c = i_bh * NC + NC - 1 - j
                o_t = i_c * C + o_s
                o_tk = o_t[:, None] * K + o_k[None, :]
                # the chunk before (the first one again at the end): loaded now, reduced next step;
                # read before this step writes, and this step does not write the chunk before
                i_x = tl.maximum(i_c - 1, i_bh * NC)
                n_y, n_u, n_dm, n_p, n_ddm, n_du, n_dy = _precond_bwd_loads(
                    y, u, dm, p, ddm, du, dy, i_x * C + o_s, o_k, m_k, K, ACC, DY
                )
                n_e, n_ges, n_gc = _precond_bwd_chunk(es, ges, gc, i_x, o_k, m_k, K)
                tl.store(dgc + i_c, tl.sum(b_e * b_de, 0))
                b_acc = b_gc * b_de + b_ges
                b_acc -= _precond_bwd_rows(
                    b_y, b_u, b_p, b_dm, b_e, b_de, b_ddm, b_du, b_dy, o_t, o_tk, m_k, ddm, dp, dy, du, ACC, DY, SQUARE,
                    YDDM, DELTA,
                )  # fmt: skip
                b_de = b_acc
                b_y, b_u, b_dm, b_p, b_e, b_ges, b_gc = n_y, n_u, n_dm, n_p, n_e, n_ges, n_gc
                b_ddm, b_du, b_dy = n_ddm, n_du, n_dy
        else:
            for j in range(NC):
                i_c = i_bh * NC + NC - 1 - j
                b_e, b_ges, b_gc = _precond_bwd_chunk(es, ges, gc, i_c, o_k, m_k, K)
                tl.store(dgc + i_c, tl.sum(b_e * b_de, 0))
                b_acc = b_gc * b_de + b_ges
                for i_s in tl.static_range(C // BS):
                    o_t = i_c * C + i_s * BS + o_s  # [BS]
                    b_y, b_u, b_dm, b_p, b_ddm, b_du, b_dy = _precond_bwd_loads(
                        y, u, dm, p, ddm, du, dy, o_t, o_k, m_k, K, ACC, DY
                    )
                    b_acc -= _precond_bwd_rows(
                        b_y, b_u, b_p, b_dm, b_e, b_de, b_ddm, b_du, b_dy, o_t, o_t[:, None] * K + o_k[None, :], m_k,
                        ddm, dp, dy, du, ACC, DY, SQUARE, YDDM, DELTA,
                    )  # fmt: skip
                b_de = b_acc
        if de0 is not None:
            tl.store(de0 + i_bh * K + o_k, b_de, mask=m_k)

    @triton.jit
    def _precond_de_rows(b_y, b_u, b_p, b_de, b_ddm, SQUARE: tl.constexpr):
        """Y^T (p q + ddm), q_t = <u_t, de>, over rows of a chunk: what e_n's gradient loses to
        them (`b_ddm` zeros where the caller's `ges` holds the part through ddm)."""
        _, _, b_pq = _precond_pq(b_u, b_p, b_de, SQUARE)
        return tl.sum(b_y.to(tl.float32) * (b_pq + b_ddm)[:, None], 0)

    @triton.jit
    def _precond_ddm(ddm, o_t, BS: tl.constexpr):
        """What `ddm` holds for rows `o_t` (zeros where `ddm` is None)."""
        if ddm is None:
            return tl.zeros([BS], dtype=tl.float32)
        else:
            return tl.load(ddm + o_t)

    @triton.jit
    def _precond_scan_bwd_de_prefetching(
        y, u, p, gc, ges, ddm, gef, des, de0, ready, i_bh, NC, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
        SQUARE: tl.constexpr, RUN: tl.constexpr = 1,
    ):  # fmt: skip
        """`precond_scan_bwd_de_kernel` with PREFETCH for (batch, head) `i_bh`: the chunk before is
        loaded while this one is reduced. With `ready` (not None), each chunk's rows are read only
        once its flag `ready[i_c]` is raised: other programs are still writing its y, `ges` and
        `ddm` (`chunk_precond.precond_bwd_overlap_kernel`), RUN chunks at a time (`_wait_for_run`)."""
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        o_s = tl.arange(0, C)
        b_de = _state_or_default(gef, i_bh * K + o_k, m_k)  # [BK]
        i_c = i_bh * NC + NC - 1  # the last chunk
        if ready is not None:
            _wait_for(ready + i_c)
        b_y, b_u = _precond_yu(y, u, i_c * C + o_s, o_k, m_k, K)
        b_p, b_ddm = tl.load(p + i_c * C + o_s), _precond_ddm(ddm, i_c * C + o_s, C)
        b_ges, b_gc = tl.load(ges + i_c * K + o_k, mask=m_k, other=0.0), tl.load(gc + i_c)
        for j in range(NC):
            i_c = i_bh * NC + NC - 1 - j
            tl.store(des + i_c * K + o_k, b_de, mask=m_k)
            i_x = tl.maximum(i_c - 1, i_bh * NC)  # the chunk before (the first one again at the end)
            if ready is not None:
                _wait_for_next(ready, i_x, -1, NC - 1 - j, j, RUN)
            n_y, n_u = _precond_yu(y, u, i_x * C + o_s, o_k, m_k, K)
            n_p, n_ddm = tl.load(p + i_x * C + o_s), _precond_ddm(ddm, i_x * C + o_s, C)
            n_ges, n_gc = tl.load(ges + i_x * K + o_k, mask=m_k, other=0.0), tl.load(gc + i_x)
            b_acc = b_gc * b_de + b_ges
            b_acc -= _precond_de_rows(b_y, b_u, b_p, b_de, b_ddm, SQUARE)
            b_de = b_acc
            b_y, b_u, b_p, b_ddm, b_ges, b_gc = n_y, n_u, n_p, n_ddm, n_ges, n_gc
        if de0 is not None:
            tl.store(de0 + i_bh * K + o_k, b_de, mask=m_k)

    @_scan_jit
    def precond_scan_bwd_de_kernel(
        y,
        u,
        p,
        gc,
        ges,
        ddm,
        gef,
        des,
        de0,
        NC,
        K: tl.constexpr,
        C: tl.constexpr,
        BK: tl.constexpr,
        BS: tl.constexpr,
        SQUARE: tl.constexpr = False,
        PREFETCH: tl.constexpr = False,
    ):
        """The sequential half of `precond_scan_bwd_kernel`: only the gradient of e, written per
        chunk (`des[n]`, the gradient of e_{n+1}) for `chunk_precond.pre_intra_bwd_kernel`, which
        does the rest in parallel over chunks. It reads y, u and p, not dm or e, and writes no rows, so each
        step of the scan is shorter. SQUARE and PREFETCH as in the other scans. With `ddm` (not
        None) e_n's gradient also loses `Y^T ddm` (YDDM of `precond_scan_bwd_kernel`)."""
        i_bh = tl.program_id(0).to(tl.int64)
        if PREFETCH:
            tl.static_assert(BS == C)
            _precond_scan_bwd_de_prefetching(y, u, p, gc, ges, ddm, gef, des, de0, None, i_bh, NC, K, C, BK, SQUARE)
        else:
            o_k = tl.arange(0, BK)
            m_k = o_k < K
            o_s = tl.arange(0, BS)
            b_de = _state_or_default(gef, i_bh * K + o_k, m_k)  # [BK]
            for j in range(NC):
                i_c = i_bh * NC + NC - 1 - j
                tl.store(des + i_c * K + o_k, b_de, mask=m_k)
                b_acc = tl.load(gc + i_c) * b_de + tl.load(ges + i_c * K + o_k, mask=m_k, other=0.0)
                for i_s in tl.static_range(C // BS):
                    o_t = i_c * C + i_s * BS + o_s  # [BS]
                    b_y, b_u = _precond_yu(y, u, o_t, o_k, m_k, K)
                    b_p = tl.load(p + o_t)
                    b_acc -= _precond_de_rows(b_y, b_u, b_p, b_de, _precond_ddm(ddm, o_t, BS), SQUARE)
                b_de = b_acc
            if de0 is not None:
                tl.store(de0 + i_bh * K + o_k, b_de, mask=m_k)

    @triton.jit
    def _state_fwd_rows(
        kb, w, ub, uo, o_t, o_k, m_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr, RECOMPUTE: tl.constexpr
    ):
        """Rows `o_t` of W, Kb and Ub, as stored; with RECOMPUTE, of W and of the U written before
        (in Ub's place; Kb's place holds W again, unread)."""
        o_tk = o_t[:, None] * K + o_k[None, :]  # [BS, BK]
        o_tv = o_t[:, None] * V + o_v[None, :]  # [BS, BV]
        b_w = tl.load(w + o_tk, mask=m_k[None, :], other=0.0)
        if RECOMPUTE:
            b_kb = b_w
            b_ub = tl.load(uo + o_tv, mask=m_v[None, :], other=0.0)
        else:
            b_kb = tl.load(kb + o_tk, mask=m_k[None, :], other=0.0)
            b_ub = tl.load(ub + o_tv, mask=m_v[None, :], other=0.0)
        return b_w, b_kb, b_ub

    @triton.jit
    def _state_fwd_step(
        b_w, b_kb, b_ub, b_s, uo, o_t, o_v, m_v, V: tl.constexpr, PRECISION: tl.constexpr, RECOMPUTE: tl.constexpr
    ):
        """These rows' U = Ub - Kb S (written to `uo`; as loaded with RECOMPUTE) and their share
        W^T U of S_{n+1} - S_n."""
        if RECOMPUTE:
            b_u = b_ub
        else:
            b_u = (b_ub.to(tl.float32) - tl.dot(b_kb, b_s.to(b_kb.dtype), input_precision=PRECISION)).to(b_w.dtype)
            tl.store(uo + o_t[:, None] * V + o_v[None, :], b_u, mask=m_v[None, :])
        return tl.dot(tl.trans(b_w), b_u, input_precision=PRECISION)

    @_scan_jit
    def state_scan_fwd_kernel(
        kb,
        w,
        ub,
        s0,
        uo,
        ss,
        sf,
        NC,
        K: tl.constexpr,
        V: tl.constexpr,
        C: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        BS: tl.constexpr,
        PRECISION: tl.constexpr,
        RECOMPUTE: tl.constexpr = False,
        PREFETCH: tl.constexpr = False,
    ):
        """U_n = Ub_n - Kb_n S_n, S_{n+1} = S_n + W_n^T U_n; one (batch, head, V block) per program.

        The products run in the dtype Kb and W are stored in: S and U are rounded to it for them
        (as fla does; no-ops for float32 storage), and S is carried in float32. With RECOMPUTE,
        `uo` holds the U this scan wrote before and only the per-chunk states are rebuilt from it
        (Kb and Ub are not read): the same `ss`, bit for bit, for half the work, and no final
        state (`sf` is not written; the backward that rebuilds has it already). With
        PREFETCH (BS == C) the next chunk's rows are loaded before this chunk's products, as in
        the preconditioner scans."""
        i_bh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        o_s = tl.arange(0, BS)
        m_kv = m_k[:, None] & m_v[None, :]
        o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
        b_s = _state_or_default(s0, i_bh * K * V + o_kv, m_kv)  # [BK, BV] stays in registers
        if PREFETCH:
            tl.static_assert(BS == C)
            b_w, b_kb, b_ub = _state_fwd_rows(kb, w, ub, uo, i_bh * NC * C + o_s, o_k, m_k, o_v, m_v, K, V, RECOMPUTE)
            for i_n in range(NC):
                i_c = i_bh * NC + i_n
                tl.store(ss + i_c * K * V + o_kv, b_s, mask=m_kv)
                i_x = tl.minimum(i_c + 1, i_bh * NC + NC - 1)  # the next chunk (the last one again at the end)
                n_w, n_kb, n_ub = _state_fwd_rows(kb, w, ub, uo, i_x * C + o_s, o_k, m_k, o_v, m_v, K, V, RECOMPUTE)
                b_s += _state_fwd_step(b_w, b_kb, b_ub, b_s, uo, i_c * C + o_s, o_v, m_v, V, PRECISION, RECOMPUTE)
                b_w, b_kb, b_ub = n_w, n_kb, n_ub
        else:
            for i_n in range(NC):
                i_c = i_bh * NC + i_n
                tl.store(ss + i_c * K * V + o_kv, b_s, mask=m_kv)
                b_ds = tl.zeros([BK, BV], dtype=tl.float32)
                for i_s in tl.static_range(C // BS):
                    o_t = i_c * C + i_s * BS + o_s  # [BS]
                    b_w, b_kb, b_ub = _state_fwd_rows(kb, w, ub, uo, o_t, o_k, m_k, o_v, m_v, K, V, RECOMPUTE)
                    b_ds += _state_fwd_step(b_w, b_kb, b_ub, b_s, uo, o_t, o_v, m_v, V, PRECISION, RECOMPUTE)
                b_s += b_ds
        if not RECOMPUTE:
            tl.store(sf + i_bh * K * V + o_kv, b_s, mask=m_kv)

    @triton.jit
    def _state_bwd_rows(kb, w, gu, o_t, o_k, m_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr):
        """Rows `o_t` of Kb, W and the gradient of U from outside the scan."""
        o_tk = o_t[:, None] * K + o_k[None, :]  # [BS, BK]
        b_kb = tl.load(kb + o_tk, mask=m_k[None, :], other=0.0)
        b_w = tl.load(w + o_tk, mask=m_k[None, :], other=0.0)
        return b_kb, b_w, tl.load(gu + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)

    @triton.jit
    def _state_bwd_step(b_kb, b_w, b_gu, b_ds, dub, o_t, o_v, m_v, V: tl.constexpr, PRECISION: tl.constexpr):
        """These rows' dUb = dU + W dS_{n+1} (written to `dub`) and their share Kb^T dUb of what
        dS_n loses."""
        b_du = (b_gu.to(tl.float32) + tl.dot(b_w, b_ds.to(b_w.dtype), input_precision=PRECISION)).to(b_kb.dtype)
        tl.store(dub + o_t[:, None] * V + o_v[None, :], b_du, mask=m_v[None, :])
        return tl.dot(tl.trans(b_kb), b_du, input_precision=PRECISION)

    @_scan_jit
    def state_scan_bwd_kernel(
        kb,
        w,
        gu,
        gss,
        gsf,
        dub,
        dss,
        ds0,
        NC,
        K: tl.constexpr,
        V: tl.constexpr,
        C: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        BS: tl.constexpr,
        PRECISION: tl.constexpr,
        PREFETCH: tl.constexpr = False,
    ):
        """Reverse of `state_scan_fwd_kernel`; `ds` is the gradient of S_{n+1}.

        Writes dUb and, per chunk, the gradient of the state after it (`dss`), from which
        dKb = -dUb S_n^T and dW = U dS_{n+1}^T follow chunk by chunk outside the scan. With
        PREFETCH (BS == C) the chunk before is loaded while this one is reduced.
        """
        i_bh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        o_s = tl.arange(0, BS)
        m_kv = m_k[:, None] & m_v[None, :]
        o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
        b_ds = _state_or_default(gsf, i_bh * K * V + o_kv, m_kv)  # [BK, BV]
        if PREFETCH:
            tl.static_assert(BS == C)
            i_c = i_bh * NC + NC - 1  # the last chunk
            b_kb, b_w, b_gu = _state_bwd_rows(kb, w, gu, i_c * C + o_s, o_k, m_k, o_v, m_v, K, V)
            b_gss = tl.load(gss + i_c * K * V + o_kv, mask=m_kv, other=0.0)
            for j in range(NC):
                i_c = i_bh * NC + NC - 1 - j
                # the chunk before (the first one again at the end, then unused): its gss is read a
                # step before this scan writes its dss there (dss may be gss)
                i_x = tl.maximum(i_c - 1, i_bh * NC)
                n_kb, n_w, n_gu = _state_bwd_rows(kb, w, gu, i_x * C + o_s, o_k, m_k, o_v, m_v, K, V)
                n_gss = tl.load(gss + i_x * K * V + o_kv, mask=m_kv, other=0.0)
                b_acc = b_ds + b_gss.to(tl.float32)
                tl.store(dss + i_c * K * V + o_kv, b_ds, mask=m_kv)
                b_acc -= _state_bwd_step(b_kb, b_w, b_gu, b_ds, dub, i_c * C + o_s, o_v, m_v, V, PRECISION)
                b_ds = b_acc
                b_kb, b_w, b_gu, b_gss = n_kb, n_w, n_gu, n_gss
        else:
            for j in range(NC):
                i_c = i_bh * NC + NC - 1 - j
                b_acc = b_ds + tl.load(gss + i_c * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)
                tl.store(dss + i_c * K * V + o_kv, b_ds, mask=m_kv)  # after the load: dss may be gss
                for i_s in tl.static_range(C // BS):
                    o_t = i_c * C + i_s * BS + o_s  # [BS]
                    b_kb, b_w, b_gu = _state_bwd_rows(kb, w, gu, o_t, o_k, m_k, o_v, m_v, K, V)
                    b_acc -= _state_bwd_step(b_kb, b_w, b_gu, b_ds, dub, o_t, o_v, m_v, V, PRECISION)
                b_ds = b_acc
        if ds0 is not None:
            tl.store(ds0 + i_bh * K * V + o_kv, b_ds, mask=m_kv)


def _block_sizes(K: int, V: int, C: int) -> tuple[int, int, int]:
    """BK covers K; BV and the row slice BS shrink as K grows so tiles fit in registers.

    The scans are sequential over chunks, so the kernels launch with num_stages=1: software
    pipelining buys little there and its buffers overflow shared memory (seen on an H100).
    """
    BK = block_width(K)
    BV = 64 if BK <= 64 else 32
    BS = min(C, 64 if BK <= 64 else 32 if BK <= 128 else 16)
    return BK, block_width(V, BV), BS


class PrecondScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, u, dm, p, gc, d0):
        B, H, NC, C, K = y.shape
        y, u, dm, p, gc = (x.contiguous() for x in (y, u, dm, p, gc))
        d0 = contiguous_or_none(d0)  # None: d_0 = 1
        es = y.new_empty(B, H, NC, K)
        df = y.new_empty(B, H, K)
        BK, _, BS = _block_sizes(K, K, C)
        enqueue(
            precond_scan_fwd_kernel, (B * H,),
            y, u, dm, p, gc, d0, es, df, None, None, NC,
            K=K, C=C, BK=BK, BS=BS, num_stages=1,
        )  # fmt: skip
        ctx.save_for_backward(y, u, dm, p, gc, es)
        ctx.has_d0 = d0 is not None
        return es, df

    @staticmethod
    def backward(ctx, ges, gdf):
        y, u, dm, p, gc, es = ctx.saved_tensors
        B, H, NC, C, K = y.shape
        ges = torch.zeros_like(es) if ges is None else ges.contiguous()
        gdf = contiguous_or_none(gdf)  # d = 1 + e: e's gradient; None reads as zeros
        dy, du, ddm, dp, dgc = (torch.empty_like(x) for x in (y, u, dm, p, gc))
        dd0 = es.new_empty(B, H, K) if ctx.has_d0 else None
        BK, _, BS = _block_sizes(K, K, C)
        enqueue(
            precond_scan_bwd_kernel, (B * H,),
            y, u, dm, p, gc, es, ges, gdf, dy, du, ddm, dp, dgc, dd0, NC,
            K=K, C=C, BK=BK, BS=BS, num_stages=1,
        )  # fmt: skip
        return dy, du, ddm, dp, dgc, dd0


class StateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kb, w, ub, s0, precision):
        B, H, NC, C, K = kb.shape
        V = ub.shape[-1]
        kb, w, ub = (x.contiguous() for x in (kb, w, ub))
        s0 = contiguous_or_none(s0)  # None: S_0 = 0
        uo = torch.empty_like(ub)
        ss = kb.new_empty(B, H, NC, K, V)
        sf = kb.new_empty(B, H, K, V)
        BK, BV, BS = _block_sizes(K, V, C)
        grid = (B * H, cdiv(V, BV))
        enqueue(
            state_scan_fwd_kernel, grid,
            kb, w, ub, s0, uo, ss, sf, NC,
            K=K, V=V, C=C, BK=BK, BV=BV, BS=BS, PRECISION=precision, num_stages=1,
        )  # fmt: skip
        ctx.save_for_backward(kb, w, uo, ss)
        ctx.precision, ctx.has_s0 = precision, s0 is not None
        return uo, ss, sf

    @staticmethod
    def backward(ctx, gu, gss, gsf):
        kb, w, uo, ss = ctx.saved_tensors
        B, H, NC, C, K = kb.shape
        V = uo.shape[-1]
        BK, BV, BS = _block_sizes(K, V, C)
        gu = torch.zeros_like(uo) if gu is None else gu.contiguous()
        gss = torch.zeros_like(ss) if gss is None else gss.contiguous()
        gsf = contiguous_or_none(gsf)  # None reads as zeros
        dub, dss = torch.empty_like(uo), torch.empty_like(ss)
        ds0 = kb.new_empty(B, H, K, V) if ctx.has_s0 else None
        enqueue(
            state_scan_bwd_kernel, (B * H, cdiv(V, BV)),
            kb, w, gu, gss, gsf, dub, dss, ds0, NC, K=K, V=V, C=C, BK=BK, BV=BV, BS=max(BS // 2, 16),
            PRECISION=ctx.precision, num_stages=1,
        )  # fmt: skip
        return -dub @ ss.transpose(-1, -2), uo @ dss.transpose(-1, -2), dub, ds0, None


def precond_scan_torch(y, u, dm, p, gc, d0):
    """Torch twin of `PrecondScan` (a loop over chunks, differentiated by autograd)."""
    es, e = [], y.new_zeros(y.shape[:2] + y.shape[-1:]) if d0 is None else d0 - 1
    for n in range(y.shape[2]):
        es.append(e)
        r = p[:, :, n] * (dm[:, :, n] - (y[:, :, n] @ e[..., None])[..., 0])  # (B, H, C)
        e = gc[:, :, n, None] * e + (r[..., None] * u[:, :, n]).sum(-2)
    return torch.stack(es, dim=2), 1 + e


def state_scan_torch(kb, w, ub, s0):
    """Torch twin of `StateScan`."""
    us, ss, s = [], [], kb.new_zeros(*kb.shape[:2], kb.shape[-1], ub.shape[-1]) if s0 is None else s0
    for n in range(kb.shape[2]):
        ss.append(s)
        u_n = ub[:, :, n] - kb[:, :, n] @ s  # (B, H, C, V)
        us.append(u_n)
        s = s + w[:, :, n].transpose(-1, -2) @ u_n
    return torch.stack(us, dim=2), torch.stack(ss, dim=2), s

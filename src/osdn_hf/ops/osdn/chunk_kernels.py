"""Triton helpers that phase 1's and phase 2's per-chunk kernels share (`chunk_precond.py`,
`chunk_delta.py`), and the relayouts between the op's layout and the chunked one.

- `_invert` (`_unit_lower_inverse`, `_unit_lower_inverse_blocked`; alone in `inverse_kernel`):
  `(I + A)^{-1}` of a strictly lower triangular `[C, C]` block, kept in registers and stored for
  the backward; its diagonal blocks by forward substitution or the doubling product
  (`tuning.INVERSE`).
- `to_chunks_kernel` / `from_chunks_kernel`: `[B, T, H, D]` -> `[B, H, NC, C, D]` and back
  (zero-padded; L2-normalising rows on the way with NORM), and `gates_to_chunks_kernel` /
  `gates_from_chunks_kernel` for beta, eta and lam (`chunk_fused.ToChunks`, `GatesToChunks`).
  `_bthd_rows` addresses a chunk's rows in `[B, T, H, D]`.
- `_walk_k_blocks`: a block function on every K block of one chunk, unrolled or as a loop
  Triton pipelines.
"""

from __future__ import annotations

from .chunk_scan import HAS_TRITON

if HAS_TRITON:  # the kernels exist only with Triton; without it chunk.py never calls this module
    import triton
    import triton.language as tl

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

"""Fused Triton path of `chunk_osdn`: both phases, forward and backward, launched from here.

The chunked algebra of `chunk.py` (README.md has the derivation), with every intra-chunk
step done per chunk in one program that keeps its `C x C` matrices in registers, so no
`[B, H, NC, C, C]` temporary, mask or exp ever reaches memory except the inverse that the
backward pass reuses. The per-chunk kernels are phase 1's in `chunk_precond.py` and phase 2's in
`chunk_delta.py`, with what both share (the inverse, the relayouts) in `chunk_kernels.py`; the two
chunk-to-chunk recurrences are the scans of `chunk_scan.py`. This module holds the autograd
functions that launch them and the rules that pick each launch from the tables of `tuning.py`.

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

import functools

import torch

from .chunk_scan import HAS_TRITON, _block_sizes
from .launch import block_width, cdiv, contiguous_or_none, enqueue
from .tuning import CHUNK_LAUNCH, GRAD_STORAGE, IEEE_LAUNCH, INVERSE, PHASE1, SCAN_TUNING, TF32_LAUNCH

if HAS_TRITON:  # the kernels exist only with Triton; without it chunk.py never calls this module
    from .chunk_delta import (
        kb_kernel,
        out_bwd_kernel,
        out_fwd_kernel,
        state_grads_kernel,
        wy_bwd_kernel,
        wy_fwd_kernel,
    )
    from .chunk_kernels import from_chunks_kernel, gates_from_chunks_kernel, gates_to_chunks_kernel, to_chunks_kernel
    from .chunk_precond import (
        pre_intra_bwd_kernel,
        pre_intra_fwd_kernel,
        pre_out_bwd_kernel,
        pre_out_fwd_kernel,
        pre_y_kernel,
        precond_bwd_overlap_kernel,
        precond_fwd_overlap_kernel,
    )
    from .chunk_scan import (
        precond_group_maps_kernel,
        precond_group_starts_kernel,
        precond_scan_bwd_de_kernel,
        precond_scan_bwd_kernel,
        precond_scan_fwd_kernel,
        state_scan_bwd_kernel,
        state_scan_fwd_kernel,
    )


def _doubling(precision: str) -> bool:
    """Whether the inverses' diagonal blocks are inverted by the doubling product (`INVERSE`)."""
    return INVERSE["doubling"] and precision != "ieee"


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

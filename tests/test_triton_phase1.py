"""Phase 1's Triton paths on CPU through Triton's interpreter: the preconditioner scans reading
the inverse, side by side with the chunks' making (overlapped), in chunks of 32 and in groups, and
the rules that pick each; against the torch chunk path or the plain launches, bit for bit where
the sums are the same."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, interpreted_triton

triton = interpreted_triton()

import test_triton  # noqa: E402  (its tests called with other settings; `from` would collect them twice)
from test_triton import _assert_fused_matches_torch_chunk_path, _core_args  # noqa: E402

from osdn_hf.ops.osdn import (  # noqa: E402
    chunk_delta,
    chunk_fused,
    chunk_kernels,
    chunk_precond,
    chunk_scan,
    tuning,
)
from osdn_hf.ops.osdn.chunk import _chunk_osdn_core  # noqa: E402
from osdn_hf.ops.osdn.utils import dot_precision, float32_tf32  # noqa: E402


def _precond_forward(B, H, NC, C, K, dtype, g, read_inverse=True):
    """Phase 1's forward on random chunked inputs, by its two kernels one after the other: k
    (unit rows, in `dtype`), beta, eta, lam, d0, and the kernels' outputs [y, r, dm, p, gc, tinv,
    es, df, dl]. pre_intra_fwd writes both Y and r; the scan reads the inverse and r, as the op's
    does, or with `read_inverse` off Y."""
    k = torch.nn.functional.normalize(torch.randn(B, H, NC, C, K, generator=g), dim=-1).to(dtype)
    beta, eta, lam = (0.5 + 0.5 * torch.rand(B, H, NC, C, generator=g) for _ in range(3))
    d0 = 1 + 0.1 * torch.randn(B, H, K, generator=g)
    y, dm, p, gc = torch.empty_like(k), torch.empty_like(beta), torch.empty_like(beta), beta.new_empty(B, H, NC)
    tinv, es, df = beta.new_empty(B, H, NC, C, C), beta.new_empty(B, H, NC, K), beta.new_empty(B, H, K)
    dl, r = torch.empty_like(dm), torch.empty_like(dm)
    chunk_precond.pre_intra_fwd_kernel[(B * H * NC,)](
        k, beta, eta, lam, y, r, dm, p, gc, tinv, K=K, C=C, BK=32, PRECISION="ieee"
    )
    chunk_scan.precond_scan_fwd_kernel[(B * H,)](
        tinv if read_inverse else y, k, dm, p, gc, d0, es, df, dl, r if read_inverse else None, NC,
        K=K, C=C, BK=triton.next_power_of_2(K), BS=C, SQUARE=True, PREFETCH=True,
    )  # fmt: skip
    assert not torch.equal(df, d0)  # the scan moved
    return k, beta, eta, lam, d0, [y, r, dm, p, gc, tinv, es, df, dl]


@pytest.mark.parametrize("K, dtype", [(48, torch.float32), (128, torch.float16)])
def test_precond_scan_reading_the_inverse_matches_reading_y(K, dtype):
    """Phase 1's forward scan reading each chunk's inverse and r (Y e_n = (I + L)^{-1} (r * (U
    e_n)), as the op runs it) gives what the scan reading Y's rows gives, to Y's rounding in
    `dtype`; Y is what pre_intra_fwd wrote, and r its factors: Y = (I + L)^{-1} diag(r) U."""
    B, H, NC, C = 2, 2, 3, 64
    out = {}
    for read_inverse in (True, False):
        k, beta, eta, lam, d0, out[read_inverse] = _precond_forward(
            B, H, NC, C, K, dtype, torch.Generator().manual_seed(4), read_inverse
        )
    y, r, tinv = out[True][0], out[True][1], out[True][5]
    y_ref = tinv @ (r[..., None] * k.float() ** 2)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-4)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-4)
    for name, i in (("es", 6), ("df", 7), ("dl", 8)):
        torch.testing.assert_close(out[True][i], out[False][i], **tol, msg=name)
    assert not torch.equal(out[True][8], out[True][2])  # delta moved off dm


@pytest.mark.parametrize("K, dtype, NC", [(48, torch.float32, 3), (128, torch.float16, 3), (48, torch.float32, 1)])
def test_overlapped_precond_forward_gives_the_same_bits(K, dtype, NC):
    """Phase 1's forward scans run beside the workers that make their chunks, in one launch
    (`precond_fwd_overlap_kernel`): every output equals the two kernels run one after the other,
    bit for bit, with one worker or several, the scans reading the flags one chunk at a time or a
    run at a time (RUN), and the flags end raised, the tickets all taken."""
    B, H, C = 2, 2, 64
    k, beta, eta, lam, d0, ref = _precond_forward(B, H, NC, C, K, dtype, torch.Generator().manual_seed(0))
    ref_y = _precond_forward(B, H, NC, C, K, dtype, torch.Generator().manual_seed(0), read_inverse=False)[-1]
    for workers, run, read_inverse in ((1, 1, True), (3, 1, True), (1, 2, True), (3, 4, True), (3, 4, False)):
        got = [torch.empty_like(x) for x in ref]
        y, r, dm, p, gc, tinv, es, df, dl = got
        ready = torch.zeros(B * H * NC + 1, dtype=torch.int32)
        chunk_precond.precond_fwd_overlap_kernel[(workers + B * H,)](
            k, beta, eta, lam, y, r if read_inverse else None, dm, p, gc, tinv, d0, es, df, dl, ready, NC, B * H,
            workers, K=K, C=C, BK=32, SBK=triton.next_power_of_2(K), PRECISION="ieee", RUN=run,
        )  # fmt: skip
        for name, a, b in zip(
            ("y", "r", "dm", "p", "gc", "tinv", "es", "df", "dl"), got, ref if read_inverse else ref_y
        ):
            if name != "r" or read_inverse:
                assert torch.equal(a, b), (name, workers, run, read_inverse)
        assert ready[:-1].eq(1).all() and ready[-1] == workers + B * H


@pytest.mark.parametrize(
    "K, dtype, NC, fold", [(48, torch.float32, 3, False), (128, torch.float16, 3, True), (48, torch.float32, 1, True)]
)
def test_overlapped_precond_backward_gives_the_same_bits(K, dtype, NC, fold):
    """Phase 1's backward scans of e's gradient run beside the workers that make what they read
    (Y by `pre_y`, then `pre_out_bwd`'s outputs, the last chunks first), in one launch
    (`precond_bwd_overlap_kernel`): every output equals the three kernels run one after the other,
    bit for bit, with one worker or several, the scans reading the flags one chunk at a time or a
    run at a time (RUN), and the flags end raised, the tickets all taken. With `fold` (du None, as
    the split backward runs it) pre_out_bwd adds its dU to dK as 2 k dU instead of writing it."""
    B, H, C = 2, 2, 64
    g = torch.Generator().manual_seed(1)
    # dl: delta = dm - Y e_n, as the forward's scan wrote it
    k, beta, eta, lam, _, (y, _, dm, p, gc, tinv, es, df, dl) = _precond_forward(B, H, NC, C, K, dtype, g)
    prec, BK = "ieee", triton.next_power_of_2(K)
    dw, gef = torch.randn(B, H, NC, C, K, generator=g).to(dtype), torch.randn(B, H, K, generator=g)
    names = ("y", "dk", "ddm", "du", "dg", "dgp", "ges", "des", "de0")

    def outputs(fold=fold):
        rows = lambda: torch.empty(B, H, NC, C, K)  # noqa: E731
        return dict(
            y=torch.empty_like(k), dk=rows(), ddm=torch.empty_like(dm), du=None if fold else rows(),
            dg=torch.empty_like(dm), dgp=torch.empty_like(dm), ges=torch.empty_like(es), des=torch.empty_like(es),
            de0=torch.empty_like(df),
        )  # fmt: skip

    walk = dict(UNROLL=False, STAGES=3)  # as the launch table walks both kernels' blocks
    ref = outputs()
    chunk_precond.pre_y_kernel[(B * H * NC,)](
        k, beta, eta, lam, tinv, ref["y"], K=K, C=C, BK=32, PRECISION=prec, **walk
    )
    chunk_precond.pre_out_bwd_kernel[(B * H * NC,)](
        k, lam, dl, es, dw, *(ref[n] for n in names[1:7]), K=K, C=C, BK=32, PRECISION=prec, **walk
    )
    chunk_scan.precond_scan_bwd_de_kernel[(B * H,)](
        ref["y"], k, p, gc, ref["ges"], ref["ddm"], gef, ref["des"], ref["de0"], NC, K=K, C=C, BK=BK, BS=C,
        SQUARE=True, PREFETCH=True,
    )  # fmt: skip
    assert not torch.equal(ref["de0"], gef)  # the scan moved
    if fold:  # dK as the unfolded kernel's two outputs make it
        apart = outputs(fold=False)
        chunk_precond.pre_out_bwd_kernel[(B * H * NC,)](
            k, lam, dl, es, dw, *(apart[n] for n in names[1:7]), K=K, C=C, BK=32, PRECISION=prec, **walk
        )
        torch.testing.assert_close(ref["dk"], apart["dk"] + 2 * k.float() * apart["du"], rtol=1e-5, atol=1e-6)
        assert not torch.equal(ref["dk"], apart["dk"])
    for workers, run in ((1, 1), (3, 1), (1, 2), (3, 4)):
        got = outputs()
        ready = torch.zeros(B * H * NC + 1, dtype=torch.int32)
        chunk_precond.precond_bwd_overlap_kernel[(workers + B * H,)](
            k, beta, eta, lam, tinv, got["y"], dl, es, dw, *(got[n] for n in names[1:7]), p, gc, gef,
            got["des"], got["de0"], ready, NC, B * H, workers, K=K, C=C, BK=32, SBK=BK, PRECISION=prec,
            Y_BK=32, Y_UNROLL=False, Y_STAGES=3, RUN=run, **walk,
        )  # fmt: skip
        for name in names:
            assert (got[name] is None and fold) or torch.equal(got[name], ref[name]), (name, workers, run)
        assert ready[:-1].eq(1).all() and ready[-1] == workers + B * H


def test_phase1_takes_chunks_of_32_where_its_scans_run_alone(monkeypatch):
    """`_phase1_chunk`: phase 1 splits phase 2's chunks of 64 in two from `min_scans` (batch,
    head) scans up, except where its scans run beside their chunks' making (on a GPU,
    `_overlap_workers`) or 32 does not divide phase 2's chunk."""
    assert (tuning.PHASE1["chunk"], tuning.PHASE1["min_scans"]) == (32, 34)
    assert chunk_fused._phase1_chunk(64, 34, "cpu") == 32
    assert chunk_fused._phase1_chunk(64, 33, "cpu") == 64
    assert chunk_fused._phase1_chunk(48, 64, "cpu") == 48
    monkeypatch.setitem(tuning.PHASE1, "min_scans", 1)
    assert chunk_fused._phase1_chunk(64, 2, "cpu") == 32
    monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: 132)
    assert chunk_fused._phase1_chunk(64, 16, "cuda") == 64  # the scans overlapped, one worker an SM
    assert chunk_fused._phase1_chunk(64, 33, "cuda") == 64  # two an SM
    assert chunk_fused._phase1_chunk(64, 34, "cuda") == 32  # alone
    # float32 storage: chunks of 32 at any number of scans (`IEEE_LAUNCH["phase1_split"]`)
    monkeypatch.setitem(tuning.PHASE1, "min_scans", 34)
    assert chunk_fused._phase1_chunk(64, 16, "cuda", float32=True) == 32
    assert chunk_fused._phase1_chunk(64, 1, "cpu", float32=True) == 32
    assert chunk_fused._phase1_chunk(48, 1, "cpu", float32=True) == 48
    monkeypatch.setitem(tuning.IEEE_LAUNCH, "phase1_split", False)
    assert chunk_fused._phase1_chunk(64, 16, "cuda", float32=True) == 64
    monkeypatch.setitem(tuning.PHASE1, "chunk", 64)
    assert chunk_fused._phase1_chunk(64, 34, "cuda") == 64


def _record_phase1_and_launches(monkeypatch) -> tuple[list, dict]:
    """Records phase 1's chunk size at each call of `Precondition` and each kernel's launch keywords
    (the last launch of each, by kernel name): `(chunks, launches)`, filled as the op runs."""
    chunks, launches = [], {}
    precondition, enqueue = chunk_fused.Precondition.apply, chunk_fused.enqueue
    monkeypatch.setattr(
        chunk_fused.Precondition, "apply", lambda k, *a: chunks.append(k.shape[-2]) or precondition(k, *a)
    )

    def recorded(kernel, grid, *args, **kw):
        launches[kernel.__name__] = kw
        return enqueue(kernel, grid, *args, **kw)

    monkeypatch.setattr(chunk_fused, "enqueue", recorded)
    return chunks, launches


@pytest.mark.parametrize(
    "K, V, tile, prefetch, split, unrolled, sms, ieee",
    [
        (48, 80, None, True, True, False, None, False),
        (128, 64, None, False, True, True, None, False),
        (256, 256, None, False, True, False, None, False),
        (48, 80, 16, True, True, False, 3, False),  # state scans launched as on a GPU of 3 SMs
        (128, 64, None, True, True, False, 3, True),  # float32's own launches over PHASE1's
    ],
)
def test_phase1_in_chunks_of_32_matches_torch_chunk_path(K, V, tile, prefetch, split, unrolled, sms, ieee, monkeypatch):
    """`test_fused_chunk_kernels_match_torch_chunk_path` with phase 1 in chunks of 32 (`PHASE1`'s
    `min_scans` lowered to the test's two scans): three chunks of 64, six of phase 1's, the last
    one partly padding."""
    monkeypatch.setitem(tuning.PHASE1, "min_scans", 1)
    chunks, _ = _record_phase1_and_launches(monkeypatch)
    test_triton.test_fused_chunk_kernels_match_torch_chunk_path(
        K, V, tile, prefetch, split, unrolled, sms, ieee, monkeypatch
    )
    assert chunks == [32], chunks


@pytest.mark.parametrize("split", [True, False])
def test_float32_phase1_runs_in_chunks_of_32_never_overlapped(split, monkeypatch):
    """Float32 inputs at head dims up to 128, on a GPU of 16 SMs, where 16-bit inputs' phase 1 would
    keep chunks of 64 and run its scans beside their chunks' making: phase 1 in chunks of 32, its
    scans after the kernels that make their chunks (no overlapped launch), and pre_intra_fwd,
    pre_out_bwd, pre_intra_bwd and the split backward scan at `IEEE_LAUNCH`'s warps and tiles
    (`PHASE1["launch"]`'s are bf16's); with `phase1_split` off,
    chunks of 64, overlapped. Outputs and all gradients match the torch chunked path either way."""
    chunks, launches = _record_phase1_and_launches(monkeypatch)
    monkeypatch.setitem(tuning.IEEE_LAUNCH, "phase1_split", split)
    test_triton.test_fused_chunk_kernels_match_torch_chunk_path(48, 80, None, True, True, False, 16, True, monkeypatch)
    overlapped = {"precond_fwd_overlap_kernel", "precond_bwd_overlap_kernel"}
    ieee = tuning.IEEE_LAUNCH["chunk"]
    if split:
        assert chunks == [32] and not overlapped & set(launches), (chunks, sorted(launches))
        assert {"precond_scan_fwd_kernel", "precond_scan_bwd_de_kernel"} <= set(launches), sorted(launches)
        for name in ("pre_intra_fwd", "pre_out_bwd", "pre_intra_bwd"):
            kw = launches[f"{name}_kernel"]
            want = (ieee[name]["num_warps"], chunk_fused.block_width(48, ieee[name]["tile"]))
            assert (kw["num_warps"], kw["BK"]) == want, (name, kw)
        split_warps = tuning.IEEE_LAUNCH["precond_bwd"]["split_num_warps"]
        assert split_warps == 4 and launches["precond_scan_bwd_de_kernel"]["num_warps"] == split_warps, launches
    else:
        assert chunks == [64] and overlapped <= set(launches), (chunks, sorted(launches))


@pytest.fixture
def matmul_tf32():
    """Torch's float32 matmuls in TF32 for the test, as before after (`check_kernels.float32_matmul`;
    monkeypatch cannot restore `torch.backends.cuda.matmul.fp32_precision`: cuBLASModule has no
    attribute to delete)."""
    import check_kernels

    with check_kernels.float32_matmul(True):
        yield


def test_float32_inputs_under_tf32_run_tf32_products_at_their_own_scan_launches(monkeypatch, matmul_tf32):
    """Float32 inputs where torch runs float32 matmuls in TF32 (`utils.float32_tf32`): tf32
    products (`dot_precision`), phase 1 in chunks of 32 as float32 storage has it, phase 2's
    per-chunk kernels and the state scans at `TF32_LAUNCH`'s, not float32's exact ones
    (in tf32 the scans' BV 16 at 8 warps computed wrong gradients or faulted on an H200:
    benchmarks/results/scans_check_tf32_h16_811156d.json, sweep32_51eaeae.json); outputs and all
    gradients match the torch chunked path (`test_fused_chunk_kernels_match_torch_chunk_path`,
    which picks the products as the op does). As on a GPU of 132 SMs, where float32's exact
    products take BV 16 at 16 (batch, head) pairs."""
    monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: 132)
    assert float32_tf32() and dot_precision(torch.zeros(1)) == "tf32"
    ieee = chunk_fused._scan_launch("state_bwd", 128, 128, 64, 16, "cuda", True, "ieee")
    assert (ieee["BV"], ieee["num_warps"]) == (16, 8)  # exact products: correct, measured fastest
    for name in ("state_fwd", "state_bwd"):
        for heads in (16, 32, 64, 128, 512):
            tf32 = chunk_fused._scan_launch(name, 128, 128, 64, heads, "cuda", True, "tf32")
            assert tf32["num_warps"] == 4 and not tf32["PREFETCH"], (name, heads, tf32)  # TF32_LAUNCH'
    chunks, launches = _record_phase1_and_launches(monkeypatch)
    test_triton.test_fused_chunk_kernels_match_torch_chunk_path(48, 80, None, True, True, False, 132, True, monkeypatch)
    precisions = {kw.get("PRECISION") for kw in launches.values()}
    assert precisions - {None} == {"tf32"} and chunks == [32], (precisions, chunks)
    own, wy_bwd = chunk_fused._chunk_launch("wy_bwd", 48, 80, "tf32", float32=True), launches["wy_bwd_kernel"]
    assert (wy_bwd["num_warps"], wy_bwd["BK"], wy_bwd["BV"]) == (own["num_warps"], 32, 32), launches  # TF32_LAUNCH's
    split_warps = tuning.IEEE_LAUNCH["precond_bwd"]["split_num_warps"]
    assert launches["precond_scan_bwd_de_kernel"]["num_warps"] == split_warps, launches


@pytest.mark.parametrize(
    "K, V, c1, sms", [(128, 64, 32, None), (48, 80, 64, None), (128, 64, 64, 8), (256, 256, 64, None)]
)
def test_phase1_reading_the_inverse_matches_torch_chunk_path(K, V, c1, sms, monkeypatch):
    """`test_fused_chunk_kernels_match_torch_chunk_path` with phase 1's forward scan reading each
    chunk's inverse and r instead of Y (`SCAN_TUNING["precond_fwd"]["read_inverse"]` lowered to the
    test's two scans), in phase 1's chunks of 32 and 64, and beside the workers making its chunks
    (`sms` 8): pre_intra_fwd then makes no Y. At K = 256 the scan does not prefetch, and reads Y."""
    entry = tuning.SCAN_TUNING["precond_fwd"]
    assert entry["read_inverse"] == 128  # as measured (benchmarks/results/sweep20_*.json)
    monkeypatch.setitem(tuning.SCAN_TUNING, "precond_fwd", dict(entry, read_inverse=2))
    monkeypatch.setitem(tuning.PHASE1, "min_scans", 1 if c1 == 32 else 1 << 30)
    ys, enqueue = [], chunk_fused.enqueue

    def recorded(kernel, grid, *args, **kw):
        if kernel.__name__ in ("pre_intra_fwd_kernel", "precond_fwd_overlap_kernel"):
            ys.append(args[4])  # y: None where the scan reads the inverse
        return enqueue(kernel, grid, *args, **kw)

    monkeypatch.setattr(chunk_fused, "enqueue", recorded)
    test_triton.test_fused_chunk_kernels_match_torch_chunk_path(K, V, None, True, True, False, sms, False, monkeypatch)
    assert ys and all((y is None) == (K <= 128) for y in ys), [type(y) for y in ys]


@pytest.mark.parametrize(
    "K, V, T, length, default_states, inverse, precision, unit_keys",
    [
        (48, 80, 256, 2, False, True, "ieee", False),
        (128, 64, 150, 1, False, False, "ieee", False),
        (32, 32, 256, 4, True, True, "ieee", False),
        (128, 64, 150, 2, False, False, "ieee", False),
        (48, 80, 256, 2, False, True, "tf32", True),
        (128, 64, 150, 2, True, False, "tf32", True),
        (128, 64, 150, 2, False, True, "tf32", False),
    ],
)
def test_phase1_scanned_in_groups_matches_torch_chunk_path(
    K, V, T, length, default_states, inverse, precision, unit_keys, monkeypatch
):
    """`test_fused_chunk_kernels_match_torch_chunk_path` where phase 1's scans are grouped: a
    forward with gradients to follow, its scans few enough to run beside their chunks' making (on
    16 SMs, `_overlap_workers`). Phase 1 then runs in chunks of 32 (here 6 or 8), in groups of
    `length` (`SCAN_TUNING["precond_fwd"]["groups"]` lowered to the test's chunks): each group's
    map, the groups' starts, the groups scanned again, reading each chunk's inverse or Y; the
    backward's scans in the same groups, with the forward's maps transposed. Outputs, final states
    and every gradient against the torch chunked path, with and without initial states; the grouped
    kernels ran, and without gradients (`torch.no_grad`) they do not: the overlapped launch runs.
    With tf32 products and keys normalised in the op (`unit_keys`), the maps multiply float16 roundings
    of their operands (DOT16), which reach the outputs within float32's tolerance here
    (`test_group_maps_are_the_products_of_their_chunks_maps` checks the maps themselves); with
    ieee products (float32) or keys the op does not normalise they never do."""
    monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: 16)
    entry = tuning.SCAN_TUNING["precond_fwd"]
    groups = dict(entry["groups"], length=length, long_from=1 << 30, min_groups=2, BJ=32, read_inverse=inverse)
    monkeypatch.setitem(tuning.SCAN_TUNING, "precond_fwd", dict(entry, groups=groups))
    monkeypatch.setitem(tuning.IEEE_LAUNCH, "max_head_dim", 0)
    ran, enqueue = [], chunk_fused.enqueue

    def recorded(kernel, grid, *args, **kw):
        maps = kernel.__name__ == "precond_group_maps_kernel"
        ran.append((kernel.__name__, grid, maps and args[7] is not None, maps and kw["DOT16"]))
        return enqueue(kernel, grid, *args, **kw)

    monkeypatch.setattr(chunk_fused, "enqueue", recorded)
    args = _core_args(1, T, 2, K, V)
    if default_states:
        args[-2:] = [None, None]
    dot16 = precision == "tf32" and unit_keys
    leaves = _assert_fused_matches_torch_chunk_path(args, precision, unit_keys)
    G = -(-T // 64) * 2 // length
    assert ("precond_group_maps_kernel", (2 * G, -(-K // 32) + 1), inverse, dot16) in ran, ran
    assert ("precond_scan_fwd_kernel", (2 * G,), False, False) in ran, ran
    # the backward's scans in the same groups, with the forward's maps: from zero ends, then the real ones
    assert ran.count(("precond_scan_bwd_de_kernel", (2 * G,), False, False)) == 2, ran
    assert ran.count(("precond_group_starts_kernel", (2,), False, False)) == 2, ran
    ran.clear()
    with torch.no_grad():
        _chunk_osdn_core(*leaves, use_triton=True, precision=dot_precision(leaves[0]))
    names = {name for name, *_ in ran}
    assert "precond_fwd_overlap_kernel" in names and "precond_group_maps_kernel" not in names, ran


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dot16", [False, True])
def test_group_maps_are_the_products_of_their_chunks_maps(inverse, dot16):
    """`precond_group_maps_kernel` against its definition in float64: each group's map
    `e -> M_g e + c_g` is the composition of its chunks' `e -> Gc_n e + U_n^T (p_n * (dm_n - Y_n e))`
    (u = k * k; Y read as rows, or as `(I + L)^{-1} diag(r) U` from each chunk's inverse), at K = 48
    in column blocks of 32 (masked), groups of 3 chunks of 32, float32 products (ieee) or, with
    `dot16`, products of the operands' float16 roundings (DOT16; 2e-5 and 1e-4 of the maps' norm
    here, allowed 1e-3). Unlike the op-level tests, where a map's error is damped by the group
    starts it feeds, this checks every entry of every map."""
    G, L, C, K = 2, 3, 32, 48
    g = torch.Generator().manual_seed(5)
    k = torch.randn(G, L, C, K, generator=g) / K**0.5
    y = torch.randn(G, L, C, K, generator=g) / K**0.5
    dm, p = torch.randn(G, L, C, generator=g), torch.rand(G, L, C, generator=g)
    gc, r = 0.5 + 0.5 * torch.rand(G, L, generator=g), torch.rand(G, L, C, generator=g)
    ti = torch.linalg.inv(torch.eye(C) + torch.randn(G, L, C, C, generator=g).tril(-1) / C).contiguous()
    u = (k * k).double()
    rows = (ti.double() @ (r.double()[..., None] * u)) if inverse else y.double()
    maps, offsets = torch.eye(K, dtype=torch.float64).repeat(G, 1, 1), torch.zeros(G, K, dtype=torch.float64)
    for n in range(L):
        ut_p = u[:, n].transpose(-1, -2) * p.double()[:, n, None, :]  # U_n^T diag(p_n), [G, K, C]
        step = gc.double()[:, n, None, None] * torch.eye(K, dtype=torch.float64) - ut_p @ rows[:, n]
        maps = step @ maps
        offsets = (step @ offsets[..., None])[..., 0] + (ut_p @ dm.double()[:, n, :, None])[..., 0]
    mg, cg = torch.empty(G, K, K), torch.empty(G, K)
    chunk_fused.enqueue(
        chunk_scan.precond_group_maps_kernel, (G, 3),
        ti if inverse else y, k, dm, p, gc, mg, cg, r if inverse else None, L,
        K=K, C=C, BK=64, BJ=32, PRECISION="ieee", SQUARE=True, DOT16=dot16,
    )  # fmt: skip
    assert (maps - torch.eye(K, dtype=torch.float64)).abs().max() > 0.1  # the chunks' maps are far from identities
    assert_close("M_g", mg, maps, rtol=1e-3 if dot16 else None)
    assert_close("c_g", cg, offsets)


def test_phase1_groups_where_training_few_long_scans(monkeypatch):
    """Which calls group phase 1's scans (`chunk_fused._precond_groups`), on a GPU of 132 SMs (an
    H100 or H200) at K = 128 under phase 2's chunks of 64: training at up to 33 (batch, head)
    scans (the overlapped launch's), in groups of 16 chunks of 32 below 512 chunks and of 32 from
    there, at least 8 groups; never without a backward to follow, above 33 scans, at head dims
    above 128, or where the groups would be too few."""
    monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: 132)
    groups = lambda T, heads, training=True, K=128: chunk_fused._precond_groups(64, T // 64, K, heads, "cuda", training)  # noqa: E731
    assert groups(16384, 16) == 32 and groups(32768, 16) == 32  # 512 and 1024 chunks of 32
    assert groups(8192, 32) == 16 and groups(8192, 16) == 16 and groups(4096, 32) == 16
    assert groups(4096, 16) == 16  # 128 chunks: 8 groups
    assert groups(2048, 16) is None  # 4 groups
    assert groups(16384, 16, training=False) is None
    assert groups(4096, 64) is None and groups(16384, 34) is None  # no overlapped launch there
    assert groups(16384, 16, K=256) is None
    assert groups(64 * 70, 16) == 14  # 140 chunks: groups of 14, the largest divisor up to 16 (at least 8)
    assert groups(64 * 67, 16) is None  # 134 = 2 x 67 chunks: no divisor from 8 to 16


@pytest.mark.parametrize("c1", [32, 64])
def test_phase1_in_chunks_of_32_launches_with_its_own_settings(c1, monkeypatch):
    """Phase 1's kernels in chunks of 32 launch with `PHASE1["launch"]`'s warps and tiles (measured
    at 32), its split backward scan with that entry's warps; in chunks of 64 with the tables'. Its
    output step takes one of its own chunks a program either way. (The inputs are float32, whose
    own launches, `IEEE_LAUNCH`, are turned off here; `test_float32_products_launch_with_their_own_
    settings_up_to_head_dim_128` checks them.)"""
    monkeypatch.setitem(tuning.PHASE1, "min_scans", 1 if c1 == 32 else 1 << 30)
    monkeypatch.setitem(tuning.IEEE_LAUNCH, "max_head_dim", 0)
    launches, grids = {}, {}
    enqueue = chunk_fused.enqueue

    def recorded(kernel, grid, *args, **kw):
        launches[kernel.__name__] = (kw["num_warps"], kw.get("BK"))
        grids[kernel.__name__] = grid
        return enqueue(kernel, grid, *args, **kw)

    monkeypatch.setattr(chunk_fused, "enqueue", recorded)
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in _core_args(1, 70, 2, 128, 16)]
    _chunk_osdn_core(*leaves, use_triton=True)[0].sum().backward()
    # (num_warps, BK) of each kernel: chunks of 32, and the tables' (CHUNK_LAUNCH, SCAN_TUNING) at 64
    expected = dict(
        pre_intra_fwd_kernel=((1, 64), (4, 64)),
        pre_y_kernel=((2, 128), (2, 32)),
        pre_out_fwd_kernel=((1, 64), (4, 32)),
        pre_out_bwd_kernel=((1, 16), (4, 32)),
        pre_intra_bwd_kernel=((1, 32), (2, 32)),
        precond_scan_bwd_de_kernel=((2, 128), (4, 128)),
    )
    for name, (small, table) in expected.items():
        assert launches[name] == (small if c1 == 32 else table), name
    assert launches["wy_fwd_kernel"] == (2, 64)  # phase 2's stand
    # T = 70 in two chunks of 64, four of 32; two heads
    for name in ("pre_intra_fwd_kernel", "pre_out_fwd_kernel", "pre_out_bwd_kernel", "pre_intra_bwd_kernel"):
        assert grids[name] == (2 * 128 // c1,), (name, grids[name])


def test_overlap_runs_with_few_scans_per_sm(monkeypatch):
    """`_overlap_workers`: a worker on every SM the scans leave where they take at most one SM in
    `overlap_alone`, two where at most one in `overlap_shared`; none off CUDA, with more scans, or
    with the settings off. Phase 1's backward scans take the same tiers from their own entry."""
    monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: 132)
    entry = tuning.SCAN_TUNING["precond_fwd"]
    assert (entry["overlap_alone"], entry["overlap_shared"]) == (8, 4)
    bwd = tuning.SCAN_TUNING["precond_bwd"]
    assert (bwd["overlap_alone"], bwd["overlap_shared"]) == (8, 4)
    assert (entry["flag_run"], bwd["flag_run"]) == (4, 1)  # chunks' flags read a run at a time (measured)
    assert chunk_fused._overlap_workers(16, "cuda", "precond_bwd") == 116
    assert chunk_fused._overlap_workers(32, "cuda", "precond_bwd") == 2 * 100
    assert chunk_fused._overlap_workers(64, "cuda", "precond_bwd") is None
    monkeypatch.setitem(tuning.SCAN_TUNING, "precond_bwd", dict(bwd, overlap_alone=None))
    assert chunk_fused._overlap_workers(16, "cuda", "precond_bwd") == 2 * 116
    assert chunk_fused._overlap_workers(16, "cuda") == 116  # the forward's own tiers stand
    assert chunk_fused._overlap_workers(1, "cuda") == 131
    assert chunk_fused._overlap_workers(17, "cuda") == 2 * 115
    assert chunk_fused._overlap_workers(33, "cuda") == 2 * 99
    assert chunk_fused._overlap_workers(34, "cuda") is None
    monkeypatch.setitem(tuning.SCAN_TUNING, "precond_fwd", dict(entry, overlap_alone=None))
    assert chunk_fused._overlap_workers(16, "cuda") == 2 * 116
    monkeypatch.setitem(tuning.SCAN_TUNING, "precond_fwd", dict(entry, overlap_alone=None, overlap_shared=None))
    assert chunk_fused._overlap_workers(16, "cuda") is None
    monkeypatch.undo()
    assert chunk_fused._overlap_workers(1, "cpu") is None


def test_profile_groups_every_kernel_of_the_op():
    """`profile_kernels.py` groups each of the op's kernels by phase: none falls into 'other'."""
    import profile_kernels

    modules = (chunk_kernels, chunk_delta, chunk_precond, chunk_scan)
    kernels = [n for m in modules for n in dir(m) if n.endswith("_kernel") and n != "inverse_kernel"]
    assert {"precond_fwd_overlap_kernel", "precond_bwd_overlap_kernel"} <= set(kernels)
    times = profile_kernels.grouped({n: 1.0 for n in kernels})
    assert times["other"] == 0 and times["phase 1: preconditioner"] > 0, times

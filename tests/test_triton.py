"""The Triton kernels against their torch twins, on CPU through Triton's interpreter."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, interpreted_triton, make_inputs

triton = interpreted_triton()

from osdn_hf.ops import chunk_osdn, fused_recurrent_osdn  # noqa: E402
from osdn_hf.ops.osdn import (  # noqa: E402
    chunk_fused,
    chunk_scan,
    fused_recurrent,
    tuning,
)
from osdn_hf.ops.osdn.chunk import _chunk_osdn_core  # noqa: E402
from osdn_hf.ops.osdn.utils import FORCE_TRITON_ENV, dot_precision  # noqa: E402


def _scan_inputs(B, H, NC, C, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    prec = dict(
        y=r(B, H, NC, C, K) * 0.1,
        u=r(B, H, NC, C, K).abs() * 0.1,
        dm=r(B, H, NC, C),
        p=torch.rand(B, H, NC, C, generator=g),
        gc=torch.rand(B, H, NC, generator=g),
        d0=1 + r(B, H, K),
    )
    state = dict(kb=r(B, H, NC, C, K) * 0.1, w=r(B, H, NC, C, K) * 0.1, ub=r(B, H, NC, C, V), s0=r(B, H, K, V))
    leaf = lambda d: {n: x.requires_grad_() for n, x in d.items()}  # noqa: E731
    return leaf(prec), leaf(state)


def _grads(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g) for o in outputs]
    return torch.autograd.grad(outputs, list(inputs.values()), cot)


@pytest.mark.parametrize("K, V", [(32, 32), (64, 48), (100, 128), (128, 64), (256, 256)])
def test_scans_match_torch_twins(K, V):
    """Forward and hand-written backward of both scans, head dims 32 to 256, odd sizes masked."""
    prec, state = _scan_inputs(2, 2, 3, 64, K, V)
    ref = chunk_scan.precond_scan_torch(**prec)
    got = chunk_scan.PrecondScan.apply(*prec.values())
    for name, a, b in zip(("e_starts", "e_final"), got, ref):
        assert_close(name, a, b)
    for name, a, b in zip(prec, _grads(got, prec), _grads(ref, prec)):
        assert_close(f"d{name}", a, b)

    ref = chunk_scan.state_scan_torch(**state)
    got = chunk_scan.StateScan.apply(*state.values(), "ieee")
    for name, a, b in zip(("U", "S_starts", "S_final"), got, ref):
        assert_close(name, a, b)
    for name, a, b in zip(state, _grads(got, state), _grads(ref, state)):
        assert_close(f"d{name}", a, b)


def test_scans_take_the_chunk_count_unspecialized():
    """On a GPU, Triton would compile NC == 1 (T <= 64) as a constant and unroll the loop over
    chunks, and Triton 3.6 got that code wrong in 16-bit (benchmarks/results/kernels_scan_nc1.json).
    Every kernel that loops over chunks takes NC as a runtime integer. Checked on the compiled
    kernel objects (not the interpreter's, which keep no such flag), which need no GPU to define."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    code = (
        "import json; from osdn_hf.ops.osdn import chunk_scan as cs; print(json.dumps({n: [p.name for p in f.params"
        " if p.do_not_specialize] for n, f in vars(cs).items() if n.endswith('_kernel') and 'NC' in f.arg_names}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    got = json.loads(out)
    scans = ("precond_scan_fwd", "precond_scan_bwd", "precond_scan_bwd_de", "state_scan_fwd", "state_scan_bwd")
    assert set(got) == {f"{n}_kernel" for n in scans}, got
    assert all(names == ["NC"] for names in got.values()), got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_state_scan_recompute_rebuilds_the_same_states(dtype):
    """RECOMPUTE (the phase-2 backward's rebuild of the per-chunk states from W and the scan's own
    U) gives the forward scan's per-chunk states bit for bit, without reading Kb or Ub, and does
    not write a final state (the backward has no use for it)."""
    _, state = _scan_inputs(2, 2, 3, 64, 48, 80)
    kb, w, ub = (state[n].detach().to(dtype) for n in ("kb", "w", "ub"))
    s0 = state["s0"].detach()
    B, H, NC, C, K = kb.shape
    V = ub.shape[-1]
    launch = chunk_fused._scan_launch("state_fwd", K, V, C)
    grid = (B * H, triton.cdiv(V, launch["BV"]))
    uo, ss, sf = torch.empty_like(ub), kb.new_empty(B, H, NC, K, V), s0.new_empty(B, H, K, V)
    chunk_scan.state_scan_fwd_kernel[grid](kb, w, ub, s0, uo, ss, sf, NC, K=K, V=V, C=C, PRECISION="ieee", **launch)
    ss2, sf2 = torch.full_like(ss, float("nan")), torch.full_like(sf, float("nan"))
    nan = torch.full_like(kb, float("nan"))  # Kb and Ub must not be read
    chunk_scan.state_scan_fwd_kernel[grid](
        nan, w, nan, s0, uo, ss2, sf2, NC, K=K, V=V, C=C, PRECISION="ieee", RECOMPUTE=True, **launch
    )
    assert torch.equal(ss2, ss) and sf2.isnan().all() and not sf.isnan().any()
    assert ss.abs().sum() > 0 and not torch.equal(ss[:, :, 1], ss[:, :, 2])  # states that move


@pytest.mark.parametrize("K, dtype", [(48, torch.float32), (128, torch.float16)])
def test_precond_scans_prefetching_give_the_same_bits(K, dtype):
    """PREFETCH (the next chunk loaded while this one is reduced) changes when rows are read, not
    the sums: forward and backward scans, with and without ACC and DY, equal the whole-chunk
    (BS = C) scans bit for bit, and the buffers they add to are read at the right chunk."""
    prec, _ = _scan_inputs(2, 2, 3, 64, K, 32)
    y, u = (prec[n].detach().to(dtype) for n in ("y", "u"))
    dm, p, gc, d0 = (prec[n].detach() for n in ("dm", "p", "gc", "d0"))
    B, H, NC, C, _ = y.shape
    launch = dict(K=K, C=C, BK=triton.next_power_of_2(K), BS=C, SQUARE=True)

    def fwd(prefetch):
        es, df = y.new_empty(B, H, NC, K, dtype=torch.float32), d0.new_empty(B, H, K)
        dl = torch.empty_like(dm)
        chunk_scan.precond_scan_fwd_kernel[(B * H,)](
            y, u, dm, p, gc, d0, es, df, dl, None, NC, PREFETCH=prefetch, **launch
        )
        return es, df, dl

    (es, df, dl), (es2, df2, dl2) = fwd(False), fwd(True)
    assert torch.equal(es, es2) and torch.equal(df, df2) and torch.equal(dl, dl2)
    # delta = dm - Y e_n per chunk, as the scan wrote it
    ref_dl = dm - (y.float() * es[:, :, :, None, :]).sum(-1)
    torch.testing.assert_close(dl, ref_dl, rtol=1e-5, atol=1e-5)
    assert not torch.equal(dl, dm)
    assert not torch.equal(es[:, :, 1], es[:, :, 2])
    g = torch.Generator().manual_seed(3)
    ges, gef = torch.randn(es.shape, generator=g), torch.randn(df.shape, generator=g)
    acc = [torch.randn(x.shape, generator=g) for x in (y, u, dm)]  # what dy, du, ddm hold before

    def bwd(prefetch, ACC, DY, YDDM=False):
        dy, du, ddm = (a.clone() for a in acc)
        dp, dgc, de0 = torch.empty_like(p), torch.empty_like(gc), torch.empty_like(gef)
        chunk_scan.precond_scan_bwd_kernel[(B * H,)](
            y, u, dm, p, gc, es, ges, gef, dy, du, ddm, dp, dgc, de0, NC, ACC=ACC, DY=DY, PREFETCH=prefetch,
            YDDM=YDDM, **launch,
        )  # fmt: skip
        return dy, du, ddm, dp, dgc, de0

    for ACC, DY, YDDM in ((False, True, False), (True, True, False), (True, False, False), (True, False, True)):
        ref, got = bwd(False, ACC, DY, YDDM), bwd(True, ACC, DY, YDDM)
        for name, a, b in zip(("dy", "du", "ddm", "dp", "dgc", "de0"), got, ref):
            assert torch.equal(a, b), (name, ACC, DY, YDDM)
        if ACC:
            assert not torch.equal(ref[1], bwd(False, False, DY)[1])  # the added buffers count
        if YDDM:  # e's gradient also lost Y^T ddm, ddm as the buffer held it
            assert not torch.equal(ref[5], bwd(False, ACC, DY)[5])


def _scanned_precond(K, dtype):
    """What the backward scans' tests start from: phase 1's scan inputs (`_scan_inputs`, y and u
    in `dtype`) and the forward scan's chunk-start and final e."""
    prec, _ = _scan_inputs(2, 2, 3, 64, K, 32)
    y, u = (prec[n].detach().to(dtype) for n in ("y", "u"))
    dm, p, gc, d0 = (prec[n].detach() for n in ("dm", "p", "gc", "d0"))
    B, H, NC, C, _ = y.shape
    es, df = y.new_empty(B, H, NC, K, dtype=torch.float32), d0.new_empty(B, H, K)
    chunk_scan.precond_scan_fwd_kernel[(B * H,)](
        y, u, dm, p, gc, d0, es, df, None, None, NC,
        K=K, C=C, BK=triton.next_power_of_2(K), BS=C, SQUARE=True,
    )  # fmt: skip
    return y, u, dm, p, gc, es, df


@pytest.mark.parametrize("K, dtype", [(48, torch.float32), (128, torch.float16)])
def test_split_precond_backward_scan_matches_the_one_kernel_scan(K, dtype):
    """The scan of e's gradient alone (the split backward's sequential half) ends where the
    one-kernel backward scan ends, bit for bit, with and without prefetching, in row slices or
    whole chunks, reading ddm where the one kernel has YDDM; and the rows' gradients formed from
    the gradient of e it writes per chunk (as `pre_intra_bwd_kernel` forms them, here in torch)
    are what the one kernel adds and writes (ACC, no dY: as the fused backward calls it), to
    float32 rounding."""
    y, u, dm, p, gc, es, df = _scanned_precond(K, dtype)
    B, H, NC, C, _ = y.shape
    BK = triton.next_power_of_2(K)
    g = torch.Generator().manual_seed(5)
    ges, gef = torch.randn(es.shape, generator=g), torch.randn(df.shape, generator=g)
    acc_du, acc_ddm = (torch.randn(x.shape, generator=g) for x in (u, dm))  # what du, ddm hold before
    uu, res = u.float() ** 2, dm - torch.einsum("bhnck,bhnk->bhnc", y.float(), es)
    for YDDM, (prefetch, BS) in itertools.product((False, True), ((False, 32), (True, C))):
        du, ddm, dp, dgc, de0 = acc_du.clone(), acc_ddm.clone(), torch.empty_like(p), torch.empty_like(gc), df.clone()
        chunk_scan.precond_scan_bwd_kernel[(B * H,)](
            y, u, dm, p, gc, es, ges, gef, None, du, ddm, dp, dgc, de0, NC, K=K, C=C, BK=BK, BS=BS, ACC=True,
            DY=False, SQUARE=True, PREFETCH=prefetch, YDDM=YDDM,
        )  # fmt: skip
        des, de0_split = torch.full_like(es, float("nan")), torch.empty_like(gef)
        chunk_scan.precond_scan_bwd_de_kernel[(B * H,)](
            y, u, p, gc, ges, acc_ddm if YDDM else None, gef, des, de0_split, NC, K=K, C=C, BK=BK, BS=BS,
            SQUARE=True, PREFETCH=prefetch,
        )  # fmt: skip
        assert torch.equal(de0_split, de0), (YDDM, prefetch)
        q = torch.einsum("bhnck,bhnk->bhnc", uu, des)
        rows = dict(
            du=(acc_du + (p * res)[..., None] * des[..., None, :], du),
            ddm=(acc_ddm + p * q, ddm),
            dp=(res * q, dp),
            dgc=((es * des).sum(-1), dgc),
        )
        for name, (want, got) in rows.items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} {YDDM} {prefetch}")
    assert not torch.equal(des[:, :, 0], des[:, :, 1]) and torch.equal(des[:, :, -1], gef)


@pytest.mark.parametrize("K, dtype", [(48, torch.float32), (128, torch.float16)])
def test_precond_backward_reads_the_saved_delta(K, dtype):
    """With DELTA the one-kernel backward scan's rows read delta = dm - Y e_n as given (the fused
    forward saves it) instead of forming it from Y, as the fused backward calls it (ACC, no dY,
    e's gradient losing Y^T ddm): the same gradients as the scan that forms delta itself, to
    float32 rounding."""
    y, u, dm, p, gc, es, df = _scanned_precond(K, dtype)
    B, H, NC, C, _ = y.shape
    delta = dm - torch.einsum("bhnck,bhnk->bhnc", y.float(), es)
    g = torch.Generator().manual_seed(7)
    ges, gef = torch.randn(es.shape, generator=g), torch.randn(df.shape, generator=g)
    acc = [torch.randn(x.shape, generator=g) for x in (u, dm)]  # what du, ddm hold before

    def run(DELTA):
        du, ddm = (a.clone() for a in acc)
        dp, dgc, de0 = torch.empty_like(p), torch.empty_like(gc), torch.empty_like(gef)
        chunk_scan.precond_scan_bwd_kernel[(B * H,)](
            y, u, delta if DELTA else dm, p, gc, es, ges, gef, None, du, ddm, dp, dgc, de0, NC,
            K=K, C=C, BK=triton.next_power_of_2(K), BS=C, ACC=True, DY=False, SQUARE=True, PREFETCH=True,
            YDDM=True, DELTA=DELTA,
        )  # fmt: skip
        return dict(du=du, ddm=ddm, dp=dp, dgc=dgc, de0=de0)

    formed, given = run(False), run(True)
    for name in formed:
        torch.testing.assert_close(given[name], formed[name], rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.equal(given["de0"], gef)  # the scan moved


@pytest.mark.parametrize("K, V, dtype", [(48, 80, torch.float32), (128, 64, torch.float16)])
def test_state_scans_prefetching_give_the_same_bits(K, V, dtype):
    """PREFETCH in phase 2's scans: forward (writing U, and rebuilding the states from it), and
    backward with the gradient of the states read from and written to one buffer, as the fused
    backward calls it, equal the whole-chunk (BS = C) scans bit for bit."""
    _, state = _scan_inputs(2, 2, 3, 64, K, V)
    kb, w, ub = (state[n].detach().to(dtype) for n in ("kb", "w", "ub"))
    s0 = state["s0"].detach()
    B, H, NC, C, _ = kb.shape
    BV = min(32, triton.next_power_of_2(V))
    launch = dict(K=K, V=V, C=C, BK=triton.next_power_of_2(K), BV=BV, BS=C, PRECISION="ieee")
    grid = (B * H, triton.cdiv(V, BV))

    def fwd(prefetch, uo=None):
        recompute = uo is not None
        uo = torch.empty_like(ub) if uo is None else uo
        ss, sf = kb.new_empty(B, H, NC, K, V), s0.new_empty(B, H, K, V)
        chunk_scan.state_scan_fwd_kernel[grid](
            kb, w, ub, s0, uo, ss, sf, NC, RECOMPUTE=recompute, PREFETCH=prefetch, **launch
        )
        return uo, ss, sf

    ref, got = fwd(False), fwd(True)
    for name, a, b in zip(("u", "ss", "sf"), got, ref):
        assert torch.equal(a, b), name
    assert not torch.equal(ref[1][:, :, 1], ref[1][:, :, 2])
    rebuilt = fwd(True, uo=ref[0].clone())
    assert torch.equal(rebuilt[1], ref[1])  # the rebuild writes no final state (tested above)
    g = torch.Generator().manual_seed(4)
    gu, gss = torch.randn(ub.shape, generator=g).to(dtype), torch.randn(ref[1].shape, generator=g).to(dtype)
    gsf = torch.randn(ref[2].shape, generator=g)

    def bwd(prefetch):
        dub, dss, ds0 = torch.empty_like(ub), gss.clone(), torch.empty_like(gsf)  # dss overwrites gss
        chunk_scan.state_scan_bwd_kernel[grid](kb, w, gu, dss, gsf, dub, dss, ds0, NC, PREFETCH=prefetch, **launch)
        return dub, dss, ds0

    ref, got = bwd(False), bwd(True)
    for name, a, b in zip(("dub", "dss", "ds0"), got, ref):
        assert torch.equal(a, b), name
    assert not torch.equal(ref[1], gss)  # the buffer was overwritten with the states' gradients


def test_forced_triton_path_runs_the_kernels(monkeypatch):
    """The switch reaches the kernels (the op tests' 'triton' runs are not the torch path again)."""
    calls = []
    for name in ("Precondition", "DeltaRuleAsym"):
        cls = getattr(chunk_fused, name)
        monkeypatch.setattr(cls, "apply", (lambda f, n: lambda *a: calls.append(n) or f(*a))(cls.apply, name))
    launch = fused_recurrent.fused_recurrent_osdn_fwd  # the decoding kernel's launch, with or without autograd
    monkeypatch.setattr(
        fused_recurrent, "fused_recurrent_osdn_fwd", lambda *a, **kw: calls.append("decoding") or launch(*a, **kw)
    )
    inputs = {n: (x.detach() if x is not None else None) for n, x in make_inputs(1, 70, 2, 32, 32).items()}
    chunk_osdn(**inputs)
    fused_recurrent_osdn(**inputs)
    assert calls == []  # CPU tensors take the torch path by default
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    chunk_osdn(**inputs)
    fused_recurrent_osdn(**inputs)
    assert calls == ["Precondition", "DeltaRuleAsym", "decoding"]


def _core_args(B, T, H, K, V, seed=0):
    """Arguments of `_chunk_osdn_core`: q, unit-norm k, v, beta, eta, lam in (0.5, 1), scale, and
    a non-trivial S0 and d0."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, T, H, K, generator=g),
        torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1),
        torch.randn(B, T, H, V, generator=g),
        torch.rand(B, T, H, generator=g),
        torch.rand(B, T, H, generator=g),
        0.5 + 0.5 * torch.rand(B, T, H, generator=g),
        K**-0.5,
        torch.randn(B, H, K, V, generator=g),
        1 + 0.1 * torch.randn(B, H, K, generator=g),
    ]


def _assert_fused_matches_torch_chunk_path(args, precision=None, l2norm_qk=False):
    """`_chunk_osdn_core` on the fused kernels against the torch chunked path, differentiated by
    autograd, for `args` (`_core_args`'s; None for a default initial state): outputs, final states
    and the gradient of every tensor argument; the fused kernels' products in `precision` (the
    inputs' own by default), q and k L2-normalised inside the op with `l2norm_qk`. Returns the
    arguments, tensors requiring grad."""
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    named = zip(("q", "k", "v", "beta", "eta", "lam", "initial_state", "initial_precond"), leaves[:6] + leaves[7:])
    inputs = {n: a for n, a in named if a is not None}
    results = {}
    for use_triton in (False, True):
        outs = _chunk_osdn_core(
            *leaves, use_triton=use_triton, precision=precision or dot_precision(leaves[0]), l2norm_qk=l2norm_qk
        )
        outs = [o for o in outs if o is not None]
        results[use_triton] = (outs, _grads(outs, inputs))
    (ref, ref_grads), (got, got_grads) = results[False], results[True]
    for name, a, b in zip(("o", "S", "d"), got, ref):
        assert_close(name, a, b)
    for name, a, b in zip(inputs, got_grads, ref_grads):
        assert_close(f"d{name}", a, b)
    return leaves


@pytest.mark.parametrize(
    "K, V, tile, prefetch, split, unrolled, sms, ieee",
    [
        (48, 80, None, False, False, False, None, False),
        (128, 64, None, False, False, False, None, False),
        (256, 256, None, False, False, False, None, False),
        (48, 80, 16, False, False, False, None, False),
        (48, 80, None, True, False, False, None, False),
        (128, 64, None, True, True, False, None, False),
        (256, 256, None, False, True, False, None, False),
        (48, 80, None, False, False, True, None, False),
        # state scans at BV 16 (5 V blocks), the forward's pipelined; phase 1's forward scans beside
        # 12 workers, two on each SM they leave
        (48, 80, None, True, False, False, 8, False),
        (128, 64, None, True, False, False, 3, False),  # at BV 32, the forward's in 32-row slices
        (48, 80, None, True, False, False, 16, False),  # phase 1's forward scans beside 14 workers, one an SM
        # phase 1's backward scans (split) beside the workers making their rows too: 14, one an SM,
        # and 12, two an SM
        (48, 80, None, True, True, False, 16, False),
        (128, 64, None, True, True, False, 8, False),
        # float32's own launches (IEEE_LAUNCH): per-chunk tiles, phase 1 in chunks of 32 at any
        # number of scans, never overlapped, and with sms the state scans' (BV 32: 3 V blocks at
        # V = 80, the forward in 16-row slices, the backward prefetching at 8 warps; with 16 SMs
        # BV 16, 5 V blocks)
        (48, 80, None, True, False, False, None, True),
        (48, 80, None, True, False, False, 8, True),
        (48, 80, None, True, False, False, 16, True),
        (128, 64, None, True, True, False, 3, True),
    ],
)
def test_fused_chunk_kernels_match_torch_chunk_path(K, V, tile, prefetch, split, unrolled, sms, ieee, monkeypatch):
    """Both phases' fused kernels (forward and hand-written backward) against the torch chunked
    path, differentiated by autograd: head dims that span several tiles (the launch table's 32-
    and 64-wide ones, or 16-wide everywhere) or leave a masked remainder, three chunks, a
    non-trivial d0 and S0; with all four scans loading a chunk ahead, or none; with phase 1's
    backward scan split from its rows' gradients. At (256, 256) in float32 the kernels' loops over
    blocks stay plain loops (`chunk_fused._unrolled`); elsewhere the kernels with a loop switch walk
    them as the launch table says, or, with `unrolled`, unroll them all (`stages` None). With `sms`
    the state scans launch as on a GPU with that many SMs (`chunk_fused._scan_launch`), and with 8
    and 16 phase 1's forward scans (and, split, its backward scans) run beside the workers making
    their chunks (`_overlap_workers`). The inputs are float32, whose own launches
    (`tuning.IEEE_LAUNCH`) replace the tables' only in the `ieee` cases, so that the others
    run the tables' settings, as 16-bit inputs do."""
    if sms is not None:
        monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: sms)
    if not ieee:
        monkeypatch.setitem(tuning.IEEE_LAUNCH, "max_head_dim", 0)
    for name, launch in tuning.CHUNK_LAUNCH.items():
        if tile is not None:
            monkeypatch.setitem(tuning.CHUNK_LAUNCH, name, launch := dict(launch, tile=tile))
        if unrolled and "stages" in launch:
            monkeypatch.setitem(tuning.CHUNK_LAUNCH, name, dict(launch, stages=None))
    for name, entry in tuning.SCAN_TUNING.items():
        monkeypatch.setitem(tuning.SCAN_TUNING, name, dict(entry, prefetch=prefetch))
    monkeypatch.setitem(
        tuning.SCAN_TUNING,
        "precond_bwd",
        dict(tuning.SCAN_TUNING["precond_bwd"], split_below=1 << 30 if split else 0),
    )
    _assert_fused_matches_torch_chunk_path(_core_args(1, 150, 2, K, V))


@pytest.mark.parametrize("prefetch, split, sms", [(True, True, None), (False, False, None), (True, True, 8)])
def test_fused_kernels_start_from_default_states_never_made(prefetch, split, sms, monkeypatch):
    """Without initial states the op hands the kernels None, and the scans start from d_0 = 1 and
    S_0 = 0 themselves (no fill of either, and no `d_0 - 1` or `1 + e` on the host side); without a
    use of the final states their gradients are None too, read as zeros, and no gradient of an
    initial state is written, but for the overlapped backward launch, which is given both in memory
    (it ran slower with None: `chunk_fused.Precondition.backward`). Outputs, final states and the
    gradients of q, k, v, beta, eta and lam equal, bit for bit, those of the same call with the
    default states made in memory: with the scans prefetching or not, phase 1's backward scan
    split or in one kernel, and its scans beside the workers making their chunks (`sms` 8).
    Float32 inputs at the 16-bit tables' launches, as `test_fused_chunk_kernels_match_torch_chunk_path`
    runs them."""
    if sms is not None:
        monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: sms)
    monkeypatch.setitem(tuning.IEEE_LAUNCH, "max_head_dim", 0)
    for name, entry in tuning.SCAN_TUNING.items():
        monkeypatch.setitem(tuning.SCAN_TUNING, name, dict(entry, prefetch=prefetch))
    bwd = dict(tuning.SCAN_TUNING["precond_bwd"], split_below=1 << 30 if split else 0)
    monkeypatch.setitem(tuning.SCAN_TUNING, "precond_bwd", bwd)
    launches, enqueue = {}, chunk_fused.enqueue

    def recorded(kernel, grid, *args, **kw):
        launches[kernel.__name__] = dict(zip(kernel.arg_names, args))
        return enqueue(kernel, grid, *args, **kw)

    monkeypatch.setattr(chunk_fused, "enqueue", recorded)
    *args, _, _ = _core_args(1, 150, 2, 48, 80)
    B, _, H, K = args[0].shape
    V = args[2].shape[-1]
    made = (torch.zeros(B, H, K, V), torch.ones(B, H, K))
    names = ("q", "k", "v", "beta", "eta", "lam")
    results = {}
    for states in (made, (None, None)):
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        o, S, d = _chunk_osdn_core(*leaves, *states, use_triton=True, precision="ieee")
        results[states[0] is None] = (o, S, d), _grads([o], dict(zip(names, leaves)))  # S and d unused
    (ref, ref_grads), (got, got_grads) = results[False], results[True]
    for name, a, b in zip(("o", "S", "d"), got, ref):
        assert torch.equal(a, b), name
    for name, a, b in zip(names, got_grads, ref_grads):
        assert torch.equal(a, b), f"d{name}"
    assert not torch.equal(ref[2], made[1]) and not torch.equal(ref[1], made[0])  # the states moved
    overlapped = "precond_fwd_overlap_kernel" in launches
    assert overlapped == (sms is not None), sorted(launches)
    assert launches["state_scan_fwd_kernel"]["s0"] is None and launches["state_scan_bwd_kernel"]["ds0"] is None
    scan = "precond_fwd_overlap_kernel" if overlapped else "precond_scan_fwd_kernel"
    assert launches[scan]["d0"] is None, launches[scan]
    if overlapped:  # with both in memory (a zero gradient, a scratch buffer)
        bwd = launches["precond_bwd_overlap_kernel"]
        assert bwd["gef"].eq(0).all() and bwd["de0"] is not None, bwd
    else:
        bwd = launches["precond_scan_bwd_de_kernel" if split else "precond_scan_bwd_kernel"]
        assert bwd["gef"] is None and bwd["de0"] is None, bwd


@pytest.mark.parametrize("K, V, dtype", [(48, 80, torch.float32), (128, 64, torch.float16)])
def test_scans_read_none_as_the_default_states(K, V, dtype):
    """Each scan kernel reads an initial state of None as the default one (d_0 = 1, so e_0 = 0;
    S_0 = 0) and a final state's gradient of None as zeros, and with no initial state's gradient
    to write (None) writes none: every output equals, bit for bit, that of the same launch with
    those states in memory; prefetching and not. Also through the scans' autograd wrappers, against
    their torch twins."""
    prec, state = _scan_inputs(2, 2, 3, 64, K, V)
    y, u = (prec[n].detach().to(dtype) for n in ("y", "u"))
    dm, p, gc, d0 = (prec[n].detach() for n in ("dm", "p", "gc", "d0"))
    B, H, NC, C, _ = y.shape
    BK = triton.next_power_of_2(K)
    ones, zeros_e = torch.ones_like(d0), torch.zeros_like(d0)
    g = torch.Generator().manual_seed(11)
    ges = torch.randn(B, H, NC, K, generator=g)
    for prefetch, BS in ((False, 32), (True, C)):
        launch = dict(K=K, C=C, BK=BK, BS=BS, SQUARE=True, PREFETCH=prefetch)
        fwd = {}
        for start in (ones, None):
            es, df, dl = y.new_empty(B, H, NC, K, dtype=torch.float32), d0.new_empty(B, H, K), torch.empty_like(dm)
            chunk_scan.precond_scan_fwd_kernel[(B * H,)](y, u, dm, p, gc, start, es, df, dl, None, NC, **launch)
            fwd[start is None] = (es, df, dl)
        assert all(torch.equal(a, b) for a, b in zip(fwd[True], fwd[False])), prefetch
        assert torch.equal(fwd[True][0][:, :, 0], zeros_e) and not torch.equal(fwd[True][1], ones)
        es = fwd[True][0]
        bwd = {}
        for gef in (zeros_e, None):
            du, ddm, dp, dgc = torch.empty_like(u), torch.empty_like(dm), torch.empty_like(p), torch.empty_like(gc)
            de0 = None if gef is None else torch.empty_like(d0)
            chunk_scan.precond_scan_bwd_kernel[(B * H,)](
                y, u, dm, p, gc, es, ges, gef, None, du, ddm, dp, dgc, de0, NC, DY=False, **launch
            )
            des = torch.empty_like(es)
            chunk_scan.precond_scan_bwd_de_kernel[(B * H,)](y, u, p, gc, ges, None, gef, des, de0, NC, **launch)
            bwd[gef is None] = (du, ddm, dp, dgc, des)
        assert all(torch.equal(a, b) for a, b in zip(bwd[True], bwd[False])), prefetch
        assert torch.equal(bwd[True][-1][:, :, -1], zeros_e) and bwd[True][-1].abs().sum() > 0

    kb, w, ub = (state[n].detach().to(dtype) for n in ("kb", "w", "ub"))
    s0 = torch.zeros(B, H, K, V)
    BV = min(32, triton.next_power_of_2(V))
    grid = (B * H, triton.cdiv(V, BV))
    for prefetch, BS in ((False, 32), (True, C)):
        launch = dict(K=K, V=V, C=C, BK=BK, BV=BV, BS=BS, PRECISION="ieee", PREFETCH=prefetch)
        outs = {}
        for start in (s0, None):
            uo, ss, sf = torch.empty_like(ub), kb.new_empty(B, H, NC, K, V), s0.new_empty(B, H, K, V)
            chunk_scan.state_scan_fwd_kernel[grid](kb, w, ub, start, uo, ss, sf, NC, **launch)
            gu, gss = torch.randn(uo.shape, generator=torch.Generator().manual_seed(2)).to(dtype), ss.clone()
            dub, ds0 = torch.empty_like(gu), None if start is None else torch.empty_like(s0)
            chunk_scan.state_scan_bwd_kernel[grid](
                kb, w, gu, gss, None if start is None else s0, dub, gss, ds0, NC, **launch
            )
            outs[start is None] = (uo, ss, sf, dub, gss)
        assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False])), prefetch
        assert torch.equal(outs[True][1][:, :, 0].float(), s0) and outs[True][2].abs().sum() > 0

    prec = {n: x if n != "d0" else None for n, x in prec.items()}
    state = {n: x if n != "s0" else None for n, x in state.items()}
    for scan, twin, inputs, extra in (
        (chunk_scan.PrecondScan, chunk_scan.precond_scan_torch, prec, ()),
        (chunk_scan.StateScan, chunk_scan.state_scan_torch, state, ("ieee",)),
    ):
        got, ref = scan.apply(*inputs.values(), *extra), twin(**inputs)
        leaves = {n: x for n, x in inputs.items() if x is not None}
        for a, b in zip(got, ref):
            assert_close("out", a, b)
        for name, a, b in zip(leaves, _grads(got[:1], leaves), _grads(ref[:1], leaves)):
            assert_close(f"d{name}", a, b)  # the final state unused: its gradient None


def test_state_scans_launch_by_how_many_programs_the_sms_take(monkeypatch):
    """Without a CUDA device the table's settings. On one, with 16-bit storage: BV from 64, halved
    while the programs fill less than 3/4 of the SMs, whole chunks, the forward pipelined by Triton
    (3 deep at one program per SM, else 2), the backward prefetching (8 warps at a [128, 64] state
    tile) at one per SM, else pipelined 2 deep, however many programs there are. With float32
    storage BV halves from 32 while the programs leave SMs idle, and the forward scan is pipelined
    in row slices while its programs are at most two per SM, unless float32's own launches
    (`IEEE_LAUNCH`, heads up to 128 wide) apply: BV from 32, halved while the programs fill less
    than 3/4 of the SMs, the forward pipelined 2 deep in 16-row slices, the backward prefetching
    at 8 warps, however many programs there are; with tf32 products, `TF32_LAUNCH`: BV from 64 as for
    16-bit storage, 4 warps, the forward pipelined 3 deep in slices of 1024 elements, the backward
    2 deep in whole chunks. Heads wider than 128 keep the table's settings."""
    table = chunk_fused._scan_launch("state_fwd", 128, 128, 64)
    assert table == chunk_fused._scan_launch("state_fwd", 128, 128, 64, 16, torch.device("cpu"))
    assert table["PREFETCH"] and table["BV"] == 32 and table["num_stages"] == 1
    monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: 132)  # an H100's or H200's
    # (B * H, float32 storage): (forward (BV, BS, num_stages, PREFETCH), backward (BV, BS, num_stages, PREFETCH, warps))
    cases = {
        (16, False, "tf32"): ((16, 64, 3, False), (16, 64, 1, True, 4)),  # 128 programs at BV 16 (not TF32_LAUNCH')
        (32, False): ((32, 64, 3, False), (32, 64, 1, True, 4)),  # 128 at BV 32
        (64, False): ((64, 64, 3, False), (64, 64, 1, True, 8)),  # 128 at BV 64
        (128, False): ((64, 64, 2, False), (64, 64, 2, False, 4)),  # 256 at BV 64
        (132, False): ((64, 64, 2, False), (64, 64, 2, False, 4)),  # 264: two per SM
        (133, False): ((64, 64, 2, False), (64, 64, 2, False, 4)),  # 266: in waves (the table's until 66b7eb4)
        (512, False): ((64, 64, 2, False), (64, 64, 2, False, 4)),  # 1024 at BV 64
        (16, True): ((16, 16, 2, False), (16, 64, 1, True, 8)),  # float32 storage: IEEE_LAUNCH's (64 at BV 32)
        (32, True): ((32, 16, 2, False), (32, 64, 1, True, 8)),  # 128 at BV 32
        (64, True): ((32, 16, 2, False), (32, 64, 1, True, 8)),
        (512, True): ((32, 16, 2, False), (32, 64, 1, True, 8)),
        (16, True, "tf32"): ((16, 64, 3, False), (16, 64, 2, False, 4)),  # TF32_LAUNCH: 128 programs at BV 16
        (32, True, "tf32"): ((32, 32, 3, False), (32, 64, 2, False, 4)),  # 128 at BV 32
        (64, True, "tf32"): ((64, 16, 3, False), (64, 64, 2, False, 4)),  # 128 at BV 64
        (512, True, "tf32"): ((64, 16, 3, False), (64, 64, 2, False, 4)),
    }

    def launches(heads, float32, precision="ieee"):
        f = chunk_fused._scan_launch("state_fwd", 128, 128, 64, heads, "cuda", float32, precision)
        b = chunk_fused._scan_launch("state_bwd", 128, 128, 64, heads, "cuda", float32, precision)
        return (f["BV"], f["BS"], f["num_stages"], f.get("PREFETCH", False)), (
            (b["BV"], b["BS"], b["num_stages"], b.get("PREFETCH", False), b["num_warps"])
        )

    for case, expected in cases.items():
        assert launches(*case) == expected, case
    wide = chunk_fused._scan_launch("state_fwd", 256, 256, 64, 16, "cuda")
    assert wide == chunk_fused._scan_launch("state_fwd", 256, 256, 64)
    for precision in ("ieee", "tf32"):
        assert chunk_fused._scan_launch("state_fwd", 256, 256, 64, 16, "cuda", True, precision) == wide
    # without IEEE_LAUNCH and TF32_LAUNCH, float32 storage: the table's BV 32 halved to fill the
    # SMs, the forward pipelined in row slices at most two programs an SM, else both prefetching
    monkeypatch.setitem(tuning.IEEE_LAUNCH, "max_head_dim", 0)
    cases = {
        16: ((16, 64, 3, False), (16, 64, 1, True, 4)),
        64: ((32, 32, 3, False), (32, 64, 1, True, 4)),
        128: ((32, 64, 1, True), (32, 64, 1, True, 4)),
    }
    for heads, expected in cases.items():
        for precision in ("ieee", "tf32"):
            assert launches(heads, True, precision) == expected, (heads, precision)
    assert chunk_fused._scan_launch("precond_fwd", 128, 128, 64, 16, "cuda") == chunk_fused._scan_launch(
        "precond_fwd", 128, 128, 64
    )


@pytest.mark.parametrize(
    "K, heads, sms",
    [
        (128, 2, 2),  # one program per SM at BV 64: the forward 3 deep, the backward prefetching at 8 warps
        (64, 2, 1),  # two per SM: both pipelined 2 deep, whole chunks
        (64, 5, 1),  # five per SM: the same, in waves
        (128, 4, 16),  # BV 32 (16 programs fill 3/4 of 16 SMs)
    ],
)
def test_state_scans_at_the_fitted_launches(K, heads, sms, monkeypatch):
    """Both state scans at the launches `_scan_launch` fits for 16-bit storage (as on a GPU with
    `sms` SMs), float16 under the interpreter: U, the per-chunk and final states and every gradient
    against the float32 loop (`scripts/check_scans.py`'s case), the rebuilt states the same bits."""
    import check_scans  # scripts/, on the path through conftest.py

    monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: sms)
    launches = check_scans.launches_for(K, K, None, heads=heads, device="cpu")
    assert launches["state_fwd"]["BS"] == 64 and not launches["state_fwd"].get("PREFETCH"), launches
    result = check_scans.check_case(K, K, 3, torch.float16, launches, heads=heads, device="cpu")
    assert max(result["errors"].values()) <= check_scans.RTOL["float16"] and result["rebuilt_same_bits"], result


@pytest.mark.parametrize("grad_storage, c1", [("storage", 32), ("float32", 32), ("storage", 64)])
def test_fused_kernels_store_16bit_inputs_in_16_bits(grad_storage, c1, monkeypatch):
    """float16 q, k, v: the fused path saves its chunked intermediates and phase 2's C x C inverse
    in float16 (phase 1's inverse and the per-token vectors stay float32), passes the backward's
    gradient pieces between kernels in float16 or float32 as `GRAD_STORAGE` says, hands autograd
    each gradient in its input's dtype (so autograd casts none), and its outputs and all gradients
    still match the torch chunked path run on the same values in float32. Phase 1 in chunks of
    `c1` (`PHASE1`)."""
    monkeypatch.setitem(tuning.PHASE1, "min_scans", 1 if c1 == 32 else 1 << 30)
    monkeypatch.setitem(tuning.GRAD_STORAGE, "phase1", grad_storage)
    monkeypatch.setitem(tuning.GRAD_STORAGE, "phase2", grad_storage)
    pieces = []  # (phase, dtype) of each gradient piece the backward passes between kernels
    grad_buffer = chunk_fused._grad_buffer

    def recorded(x, phase):
        pieces.append((phase, (g := grad_buffer(x, phase)).dtype))
        return g

    monkeypatch.setattr(chunk_fused, "_grad_buffer", recorded)
    handed = []  # (function, input dtypes, gradient dtypes) of each hand-written backward
    for cls in (chunk_fused.Precondition, chunk_fused.DeltaRuleAsym):
        forward, backward = cls.forward, cls.backward

        def fwd(ctx, *a, _f=forward):
            ctx.in_dtypes = [x.dtype if isinstance(x, torch.Tensor) else None for x in a]
            return _f(ctx, *a)

        def bwd(ctx, *g, _b=backward, _n=cls.__name__):
            grads = _b(ctx, *g)
            handed.append((_n, ctx.in_dtypes, [x.dtype if isinstance(x, torch.Tensor) else None for x in grads]))
            return grads

        monkeypatch.setattr(cls, "forward", staticmethod(fwd))
        monkeypatch.setattr(cls, "backward", staticmethod(bwd))
    K, V = 40, 48  # neither is a chunk size (64, phase 1's 32), so shapes tell tensors apart
    assert chunk_fused._phase1_chunk(64, 2, "cpu") == c1
    args = _core_args(1, 150, 2, K, V)
    half, rest = [x.half() for x in args[:3]], args[3:]
    names = ("q", "k", "v", "beta", "eta", "lam", "initial_state", "initial_precond")

    def run(use_triton):
        qkv = [(x if use_triton else x.float()).clone().requires_grad_() for x in half]
        others = [x.clone().requires_grad_() if isinstance(x, torch.Tensor) else x for x in rest]
        saved = []  # (shape, dtype) of what autograd saves for the backward
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t
        ):
            outs = _chunk_osdn_core(*qkv, *others, use_triton=use_triton, l2norm_qk=True)
        inputs = dict(zip(names, [*qkv, *[x for x in others if isinstance(x, torch.Tensor)]]))
        return outs, _grads(outs, inputs), saved

    (ref, ref_grads, _), (got, got_grads, saved) = run(False), run(True)
    assert got[0].dtype == torch.float16 and got[1].dtype == got[2].dtype == torch.float32
    assert sorted(n for n, _, _ in handed) == ["DeltaRuleAsym", "Precondition"], handed
    assert all(ins == grads for _, ins, grads in handed), handed
    assert all(torch.float16 in ins for _, ins, _ in handed), handed
    # [B, H, NC, C, K or V] and the per-chunk states [B, H, NC, K, V]; not the [.., C, C] inverses
    chunked = [(s, dt) for s, dt in saved if len(s) == 5 and s[-1] in (K, V) and s[-2] in (64, c1, K)]
    # q, k (twice: the op's input and phase 1's), w, U; Y and Kb are rebuilt in the backward
    assert len(chunked) == 5, saved
    # the per-chunk states [B, H, NC, K, V] are rebuilt in the backward, not kept
    assert not [s for s, _ in chunked if s[-2:] == (K, V)], chunked
    assert all(dt == torch.float16 for _, dt in chunked), chunked
    # v is read where it lies, [B, T, H, V], not copied into the chunked layout: U is the one
    # chunked tensor of width V saved
    assert [s for s, _ in chunked if s[-2:] == (64, V)] == [(1, 2, 3, 64, V)], chunked
    assert (tuple(half[2].shape), torch.float16) in saved, saved
    # phase 2's inverse [.., 64, 64] in float16, phase 1's [.., c1, c1] in float32
    inverses = sorted(str(dt) for s, dt in saved if s[-2:] in ((64, 64), (c1, c1)))
    assert inverses == ["torch.float16", "torch.float32"], saved
    # phase 1: dK's direct part, with dU's share in it (the split backward, as tuned: no dU
    # buffer); phase 2: dKb and dW
    piece_dtype = torch.float16 if grad_storage == "storage" else torch.float32
    assert sorted(pieces) == [("phase1", piece_dtype)] + [("phase2", piece_dtype)] * 2, pieces
    for name, a, b in zip(("o", "S", "d"), got, ref):
        assert_close(name, a, b, torch.float16)
    for name, a, b in zip(names, got_grads, ref_grads):
        assert_close(f"d{name}", a, b, torch.float16)


def test_grad_storage_names_a_dtype_or_is_refused(monkeypatch):
    """`GRAD_STORAGE` takes "storage" or "float32"; anything else is refused by name, not read as
    one of them."""
    x = torch.zeros(1, 1, 1, 64, 8, dtype=torch.float16)
    monkeypatch.setitem(tuning.GRAD_STORAGE, "phase1", "float32")
    monkeypatch.setitem(tuning.GRAD_STORAGE, "phase2", "bfloat16")
    assert chunk_fused._grad_buffer(x, "phase1").dtype == torch.float32
    with pytest.raises(
        ValueError, match=r"GRAD_STORAGE\['phase2'\] must be one of \['float32', 'storage'\], got 'bfloat16'"
    ):
        chunk_fused._grad_buffer(x, "phase2")


@pytest.mark.parametrize("doubling", [False, True])
def test_unit_lower_inverse_matches_float64(doubling):
    """`_invert` (64 x 64, in 16 x 16 blocks), by either way of inverting the diagonal blocks,
    against float64, on matrices like phase 2's (`bench_inverse.make_a`). Substitution stays near
    float32's rounding everywhere; the doubling product too, except where one key repeats (entries
    near 1), where it loses up to ~1e-4: still under the tf32 and 16-bit roundings of the products
    that use the inverse when the inputs are 16-bit, the only case it is used for (`INVERSE`)."""
    from bench_inverse import KEYS, invert, make_a, worst_error

    for seed, keys in enumerate(KEYS):
        a = make_a(3, keys, "cpu", seed=seed)
        assert a.abs().max() > {"random": 0.05, "correlated": 0.3, "repeated": 0.9}[keys]  # not near zero
        tol = 2e-4 if doubling and keys == "repeated" else 2e-6
        assert worst_error(invert(a, doubling), a) < tol, keys
    with pytest.raises(ValueError, match="keys must be one of"):
        make_a(1, "equal", "cpu")


def test_doubling_inverse_serves_16bit_inputs_only(monkeypatch):
    """The doubling product inverts for 16-bit inputs (tf32 products), never for float32 ones
    ("ieee"); float16 outputs and gradients with it match those by substitution to well under
    float16's tolerance."""
    assert chunk_fused._doubling("tf32") and not chunk_fused._doubling("ieee")
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    launched = []  # (kernel, DOUBLING) of every launch of the two kernels that invert

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]
            return lambda *a, **kw: launched.append((self.name, kw["DOUBLING"])) or launch(*a, **kw)

    for name in ("wy_fwd_kernel", "pre_intra_fwd_kernel"):
        monkeypatch.setattr(chunk_fused, name, Spy(name, getattr(chunk_fused, name)))
    chunk_osdn(**make_inputs(1, 70, 2, 32, 32))  # float32
    assert launched == [("pre_intra_fwd_kernel", False), ("wy_fwd_kernel", False)]
    results = {}
    for doubling in (False, True):
        monkeypatch.setitem(tuning.INVERSE, "doubling", doubling)
        launched.clear()
        assert chunk_fused._doubling("tf32") == doubling
        inputs = make_inputs(1, 150, 2, 32, 48, dtype=torch.float16, with_states=True)
        outs = chunk_osdn(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
        results[doubling] = (outs, _grads(outs, {n: x for n, x in inputs.items() if x is not None}))
        assert launched == [("pre_intra_fwd_kernel", doubling), ("wy_fwd_kernel", doubling)]
    (ref, ref_grads), (got, got_grads) = results[False], results[True]
    for name, a, b in zip(("o", "S", "d", *(f"g{i}" for i in range(8))), (*got, *got_grads), (*ref, *ref_grads)):
        assert (a.float() - b.float()).norm() <= 2e-3 * b.float().norm(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gates_reach_chunks_in_one_kernel_each_way(dtype):
    """GatesToChunks: the three gates cast and laid out as _to_chunks does one by one (lam padded
    with ones), gradients back in each gate's own dtype, a gate without gradient taken as zero."""
    from osdn_hf.ops.osdn.chunk import _to_chunks

    g = torch.Generator().manual_seed(0)
    gates = [torch.rand(2, 100, 3, generator=g).to(dtype).requires_grad_() for _ in range(3)]
    gates[2] = gates[2].detach().float().requires_grad_()  # lam in another dtype than beta's
    fused = chunk_fused.GatesToChunks.apply(*gates, 64)
    twins = [_to_chunks(x, 64, fill=f) for x, f in zip(gates, (0.0, 0.0, 1.0))]
    for a, b in zip(fused, twins):
        assert a.dtype == torch.float32 and a.shape == (2, 3, 2, 64)
        assert torch.equal(a, b)
    weights = [torch.randn(2, 3, 2, 64, generator=g) for _ in range(3)]
    for outs in (fused, twins):
        loss = outs[0].mul(weights[0]).sum() + outs[2].mul(weights[2]).sum()
        grads = torch.autograd.grad(loss, gates, allow_unused=True, materialize_grads=True)
        if outs is fused:
            fused_grads = grads
    for a, b, x in zip(fused_grads, grads, gates):
        assert a.dtype == x.dtype and torch.equal(a, b)
    assert not fused_grads[1].any()


def test_host_grid_arithmetic_matches_triton():
    """The ops work out grids and tiles with plain integers (Triton's own helpers are constexpr
    functions, microseconds a call on the host); the same numbers as Triton's."""
    from osdn_hf.ops.osdn.launch import cdiv, next_power_of_2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in range(1, 70))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(5000))


def test_block_width_covers_the_dimension_from_16_up_to_the_widest():
    """`launch.block_width`, the one rule for a kernel's block over a dimension: a power of 2
    covering it, at least 16, at most `widest` (then the kernel walks the dimension in blocks)."""
    from osdn_hf.ops.osdn.launch import block_width

    assert [block_width(D) for D in (1, 16, 17, 48, 100, 128, 129, 256)] == [16, 16, 32, 64, 128, 128, 256, 256]
    assert [block_width(D, 32) for D in (8, 32, 100, 256)] == [16, 32, 32, 32]
    assert block_width(100, 16) == 16


def test_decode_tile_is_32_columns_wide_at_most():
    tile = fused_recurrent.decode_tile
    assert tile(128, 128) == (128, 32, 4, 4)
    assert tile(100, 48) == (128, 32, 4, 2)
    assert tile(256, 256) == (256, 32, 4, 8)
    assert tile(16, 8) == (16, 16, 4, 1)


def test_fused_recurrent_skips_autograd_when_nothing_needs_a_gradient(monkeypatch):
    """Without gradients to track, the decoding op launches its kernel without an autograd
    Function, with the same results as the tracked call."""
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    inputs = make_inputs(2, 3, 2, 16, 16, with_states=True)
    tracked = fused_recurrent_osdn(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert tracked[0].grad_fn is not None
    applied = []
    monkeypatch.setattr(
        fused_recurrent.FusedRecurrentOSDNFunction, "apply", lambda *a: applied.append(a) or pytest.fail("applied")
    )
    with torch.no_grad():
        plain = fused_recurrent_osdn(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    detached = {n: x.detach() if x is not None else None for n, x in inputs.items()}
    again = fused_recurrent_osdn(**detached, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert not applied
    for a, b, c in zip(tracked, plain, again):
        assert torch.equal(a.detach(), b) and torch.equal(b, c)


@pytest.mark.parametrize("blocks", [1, 4])
def test_fused_recurrent_inplace_writes_d_from_one_or_several_v_blocks(blocks, monkeypatch):
    """In place, the final d goes into the initial one from the kernel, written by the head's
    one program or by the last of its V blocks (counted in the stream's ticket buffer, which
    the kernel leaves zero); no copy after it, and the out-of-place call's bits."""
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    K, V = 16, 128
    monkeypatch.setattr(fused_recurrent, "DECODE_BV", V // blocks)
    monkeypatch.setattr(fused_recurrent, "_tickets", {})
    inputs = make_inputs(1, 5, 3, K, V, with_states=True, N=3)
    inputs = {n: (x.detach() if x is not None else None) for n, x in inputs.items()}
    cu = torch.tensor([0, 2, 2, 5])  # one sequence empty: its blocks still count themselves
    ref = fused_recurrent_osdn(**inputs, output_final_state=True, cu_seqlens=cu)
    S0, d0 = inputs["initial_state"].clone(), inputs["initial_precond"].clone()
    copied, copy_ = [], torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **kw: copied.append(1) or copy_(self, *a, **kw))
    with torch.no_grad():
        got = fused_recurrent_osdn(
            **{**inputs, "initial_state": S0, "initial_precond": d0}, cu_seqlens=cu, inplace_final_state=True
        )
    assert got[1] is S0 and got[2] is d0 and copied == []
    for name, a, b in zip(("o", "S", "d"), got, ref):
        assert torch.equal(a, b), name
    assert torch.equal(d0[1], inputs["initial_precond"][1])
    tickets = list(fused_recurrent._tickets.values())
    assert (len(tickets) == 1) == (blocks > 1) and all(not t.any() for t in tickets)

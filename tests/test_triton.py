"""The Triton kernels against their torch twins, on CPU through Triton's interpreter."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close, make_inputs

triton = pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
if torch.cuda.is_available():
    pytest.skip(
        "CPU tensors reach Triton only through the interpreter, which conftest.py enables on machines "
        "without a GPU; on a GPU run scripts/check_kernels.py",
        allow_module_level=True,
    )

from osdn_hf.ops import chunk_osdn, fused_recurrent_osdn  # noqa: E402
from osdn_hf.ops.osdn import (  # noqa: E402
    chunk_delta,
    chunk_fused,
    chunk_kernels,
    chunk_precond,
    chunk_scan,
    fused_recurrent,
    tuning,
)
from osdn_hf.ops.osdn.chunk import _chunk_osdn_core  # noqa: E402
from osdn_hf.ops.osdn.utils import FORCE_TRITON_ENV, dot_precision, float32_tf32  # noqa: E402


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
    test_fused_chunk_kernels_match_torch_chunk_path(K, V, tile, prefetch, split, unrolled, sms, ieee, monkeypatch)
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
    test_fused_chunk_kernels_match_torch_chunk_path(48, 80, None, True, True, False, 16, True, monkeypatch)
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
    test_fused_chunk_kernels_match_torch_chunk_path(48, 80, None, True, True, False, 132, True, monkeypatch)
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
    test_fused_chunk_kernels_match_torch_chunk_path(K, V, None, True, True, False, sms, False, monkeypatch)
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


def test_check_scans_script_checks_launches_on_cpu(tmp_path):
    """scripts/check_scans.py under the interpreter: the package's launch and a given tile, at one
    and two chunks, in float32 and float16, every case within tolerance with the rebuilt states
    the same bits; a tile that cannot run on the pair (prefetching part of a chunk) is skipped."""
    out = tmp_path / "scans.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script's children set it
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    tile, unfit = {"BV": 16, "BS": 32, "PREFETCH": False}, {"BS": 32, "PREFETCH": True}
    script = Path(__file__).parents[1] / "scripts" / "check_scans.py"
    cmd = [sys.executable, str(script), "--pairs", "32x32", "--chunks", "1", "2", "--dtypes", "float32", "float16"]
    cmd += ["--tile", json.dumps(tile), "--tile", json.dumps(unfit), "--jobs", "2", "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["failures"] == 0 and len(rows) == 8, rows  # 2 dtypes x (package, tile) x 2 chunk counts
    assert all(r["ok"] and r["rebuilt_same_bits"] for r in rows), rows
    assert [r["tile"] for r in rows if r["dtype"] == "float16"] == [None, None, tile, tile]
    assert {r["launches"]["state_fwd"]["BV"] for r in rows if r["tile"]} == {16}
    assert result["device"] and result["commit"] == "unknown" and "state_fwd" in result["launch"]["scans"]


def test_check_scans_under_tf32_checks_the_launches_the_op_takes(monkeypatch):
    """`check_scans.py --tf32` checks the state scans at the launches float32 inputs under TF32
    take (`TF32_LAUNCH`), not exact float32's: until 3003624 it passed no precision and checked
    IEEE_LAUNCH's BV 16 at 8 warps, which the op does not run in tf32 (its failures on an H200 were
    that launch's: benchmarks/results/scans_check_tf32_h16_3003624.json). As on a GPU of 132 SMs,
    one group in this process, under the interpreter."""
    import argparse

    import check_scans  # scripts/, on the path through conftest.py

    monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: 132)
    args = argparse.Namespace(tile=[], heads=2, device="cpu", chunks=[2], tf32=True)
    rows = check_scans.run_group("32x32", "float32", args)
    tf32 = {n: chunk_fused._scan_launch(n, 32, 32, 64, 2, "cpu", True, "tf32") for n in ("state_fwd", "state_bwd")}
    ieee = {n: chunk_fused._scan_launch(n, 32, 32, 64, 2, "cpu", True, "ieee") for n in ("state_fwd", "state_bwd")}
    assert tf32 != ieee and (ieee["state_bwd"]["BV"], ieee["state_bwd"]["num_warps"]) == (16, 8), ieee
    assert [r["launches"] for r in rows] == [tf32] and rows[0]["ok"], rows


def test_check_scans_finds_a_wrong_gradient(monkeypatch):
    """The scan check can fail: a reverse scan 2% off in dUb is caught, beyond float16's tolerance."""
    import check_scans  # scripts/, on the path through conftest.py

    launches = check_scans.launches_for(32, 32, None, heads=2, device="cpu")
    good = check_scans.check_case(32, 32, 2, torch.float16, launches, heads=2, device="cpu")
    assert max(good["errors"].values()) <= check_scans.RTOL["float16"] and good["rebuilt_same_bits"], good
    scan_bwd = chunk_fused._state_scan_bwd
    monkeypatch.setattr(chunk_fused, "_state_scan_bwd", lambda *a: (lambda d: (d[0] * 1.02, *d[1:]))(scan_bwd(*a)))
    bad = check_scans.check_case(32, 32, 2, torch.float16, launches, heads=2, device="cpu")
    assert bad["errors"]["dUb"] > check_scans.RTOL["float16"], bad


def test_bench_inverse_script_checks_on_cpu(tmp_path):
    """scripts/bench_inverse.py under the interpreter: both methods' errors, no timings."""
    out = tmp_path / "inverse.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    script = Path(__file__).parents[1] / "scripts" / "bench_inverse.py"
    subprocess.run([sys.executable, str(script), "--chunks", "2", "--out", str(out)], env=env, check=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["keys"] for r in rows] == ["random", "correlated", "repeated"]
    assert all(r["substitution_rel_err"] < 2e-6 and r["doubling_rel_err"] < 2e-4 for r in rows), rows
    assert not any("_us" in key for r in rows for key in r), rows  # no timings off a GPU


def test_phase_two_gradient_of_k_is_added_inside_phase_one(monkeypatch):
    """Both phases read the chunked k. Phase 1 passes k on to phase 2, so phase 2's gradient of
    it reaches phase 1's backward, which adds it in a kernel: autograd adds no [B, H, NC, C, *]
    gradients (the per-token gates' [B, H, NC, C] ones are all it sums)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    inputs = make_inputs(1, 150, 2, 32, 48, dtype=torch.float16)
    o = chunk_osdn(**inputs, use_qk_l2norm_in_kernel=True)[0]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        o.backward(torch.ones_like(o))
    adds = [
        e.input_shapes for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::add", "aten::add_")
    ]
    assert adds, "the profiler recorded no adds at all, so it saw nothing"  # beta's, at least
    assert not [s for s in adds if any(len(shape) == 5 for shape in s)], adds


def test_compile_times_script_compiles_the_ops_kernels_for_hopper(tmp_path):
    """scripts/compile_times.py records the op's launches through the interpreter and compiles
    them for sm_90 with the wheel's own ptxas (no GPU): a kernel's row says how long it took, and
    which pointers it was compiled as 16-byte aligned (as Triton's runtime specializes them)."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script's child sets it
    script = Path(__file__).parents[1] / "scripts" / "compile_times.py"
    cmd = [sys.executable, str(script), "--dtype", "float32", "--head-dim", "32", "--only", "kb_kernel", "--out", out]
    subprocess.run([str(c) for c in [*cmd, "--num-warps", "8"]], env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["target"] == "sm_90" and [r["kernel"] for r in result["rows"]] == ["kb_kernel"]
    row = result["rows"][0]
    assert row["seconds"] > 0 and row["constexprs"]["PRECISION"] == "ieee" and row["constexprs"]["K"] == 32
    assert 0 < row["registers"] <= 255 and row["stack_bytes"] >= 0  # cuobjdump's report, parsed
    assert row["options"]["num_warps"] == 8 and result["num_warps"] == 8  # the override, not the launch's 4
    assert {"k", "tinv", "kb"} <= set(row["aligned"])  # fresh tensors' data


def test_launch_settings_are_a_copy_that_results_can_record():
    """What bench/check/profile write beside their figures: the scan and per-chunk tables, as a
    JSON-able copy that later changes to the tables do not reach."""
    settings = chunk_fused.launch_settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["scans"]["precond_bwd"]["split_below"] == tuning.SCAN_TUNING["precond_bwd"]["split_below"]
    settings["scans"]["state_fwd"]["prefetch"] = not settings["scans"]["state_fwd"]["prefetch"]
    assert settings["scans"]["state_fwd"]["prefetch"] != tuning.SCAN_TUNING["state_fwd"]["prefetch"]
    assert settings["grad_storage"] == tuning.GRAD_STORAGE
    assert settings["phase1"] == tuning.PHASE1 and settings["phase1"] is not tuning.PHASE1


def test_grid_profile_runs_each_setting_alone_and_records_a_fault(tmp_path, capsys):
    """`profile_kernels.py --grid` profiles every (warps, tile) setting in its own process: one that
    fails is recorded with its error (here the real child, which finds no GPU), the others keep
    their times, and the fastest setting of each kernel comes from the ones that ran."""
    import argparse

    import profile_kernels

    args = argparse.Namespace(B=1, T=64, H=1, D=32, out=str(tmp_path / "grid.json"))
    times, err = profile_kernels.grid_setting((8, 16), args)  # a real child process, on a machine without CUDA
    assert times == {} and err.startswith("exit ") and "CUDA" in err

    def fake(setting, args):  # 8 warps at 16-wide tiles faults; elsewhere wider tiles are faster
        warps, tile = setting
        if setting == (8, 16):
            return {}, "exit 1: illegal memory access"
        return {f"{name}_kernel": 1000.0 / tile + warps for name in tuning.CHUNK_LAUNCH}, None

    result = profile_kernels.grid(args, {"commit": "abc"}, measure=fake)
    failed = [r for r in result["rows"] if r["error"]]
    assert {(r["num_warps"], r["tile"]) for r in failed} == {(8, 16)} and all(r["us"] is None for r in failed)
    assert len(result["rows"]) == len(profile_kernels.GRID) * len(tuning.CHUNK_LAUNCH)
    assert result["fastest"]["wy_fwd"] == dict(num_warps=4, tile=64, us=1000.0 / 64 + 4)
    assert json.loads((tmp_path / "grid.json").read_text())["rows"] == result["rows"]  # written as it went

    # --gpus 2: two settings at a time, each on a GPU no other setting holds meanwhile; same rows
    import threading
    import time

    held, lock = set(), threading.Lock()

    def fake_on(setting, args, gpu):
        with lock:
            assert gpu in (0, 1) and gpu not in held
            held.add(gpu)
        time.sleep(0.01)
        with lock:
            held.discard(gpu)
        return fake(setting, args)

    args.gpus = 2
    assert profile_kernels.grid(args, {"commit": "abc"}, measure=fake_on)["rows"] == result["rows"]

    for bad, name in ((["--grid", "--gpus", "0"], "--gpus"), (["--peer", "--narrow-v", "64", "0"], "--narrow-v")):
        with pytest.raises(SystemExit):
            profile_kernels.main(bad)
        assert f"error: {name}" in capsys.readouterr().err  # refused, naming what was wrong

    # its heat map: drawn from the rows, the faulted setting marked
    png = tmp_path / "grid.png"
    profile_kernels.plot_grid(dict(result, device="test"), str(png))
    assert png.stat().st_size > 10_000


def test_relayout_warps_come_from_the_launch_table(monkeypatch):
    """The relayouts' warps: by size unless `CHUNK_LAUNCH` names them (as `--grid` does)."""
    assert chunk_fused._relayout_launch("from_chunks", 64, 64)["num_warps"] == 4  # 4096 elements a chunk
    assert chunk_fused._relayout_launch("from_chunks", 128, 64)["num_warps"] == 8  # 8192
    monkeypatch.setitem(tuning.CHUNK_LAUNCH, "from_chunks", dict(num_warps=4, tile=None))
    assert chunk_fused._relayout_launch("from_chunks", 128, 64)["num_warps"] == 4
    assert chunk_fused._relayout_launch("to_chunks", 128, 64)["num_warps"] == 8


def test_grid_setting_runs_every_block_at_its_tile(monkeypatch, capsys):
    """A `--grid` child (`--grid-one warps,tile`) runs every kernel at that one setting, its V
    blocks too: out_fwd's `tile_v` does not survive into it."""

    import profile_kernels

    for name, entry in tuning.CHUNK_LAUNCH.items():  # profile_kernels changes the entries in place
        monkeypatch.setitem(tuning.CHUNK_LAUNCH, name, dict(entry))
    assert "tile_v" in tuning.CHUNK_LAUNCH["out_fwd"]
    seen = {}
    monkeypatch.setattr(profile_kernels, "_step", lambda *a: None)
    monkeypatch.setattr(
        profile_kernels,
        "kernel_times",
        lambda step: seen.update(out_fwd=chunk_fused._chunk_launch("out_fwd", 128, 128, "tf32")) or {},
    )
    profile_kernels.main(["--grid-one", "2,32"])
    assert seen["out_fwd"] == dict(BK=32, BV=32, num_warps=2)
    assert all((t["num_warps"], t["tile"]) == (2, 32) and "tile_v" not in t for t in tuning.CHUNK_LAUNCH.values())
    assert profile_kernels.GRID_MARK in capsys.readouterr().out


def test_ncu_csv_becomes_json_per_launch(tmp_path):
    """`profile_kernels.py --ncu-json`: ncu's details CSV (after its own '==PROF==' lines) as one
    entry per launch, in launch order, each metric under its section with its unit."""
    import profile_kernels

    head = '"ID","Kernel Name","Block Size","Grid Size","Section Name","Metric Name","Metric Unit","Metric Value"'
    rows = [
        '"0","wy_fwd_kernel","(128, 1, 1)","(4096, 1, 1)","GPU Speed Of Light Throughput","Duration","us","378.5"',
        '"0","wy_fwd_kernel","(128, 1, 1)","(4096, 1, 1)","Launch Statistics","Registers Per Thread","reg","255"',
        '"1","out_fwd_kernel","(128, 1, 1)","(2, 4096, 1)","GPU Speed Of Light Throughput","Duration","us","110.2"',
    ]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(["==PROF== Connected to process 1", head, *rows]) + "\n")
    result = profile_kernels.ncu_json(str(path), {"commit": "abc"})
    assert [x["kernel"] for x in result["launches"]] == ["wy_fwd_kernel", "out_fwd_kernel"]
    wy = result["launches"][0]
    assert wy["sections"]["Launch Statistics"]["Registers Per Thread"] == ["255", "reg"]
    assert wy["sections"]["GPU Speed Of Light Throughput"]["Duration"] == ["378.5", "us"]
    assert wy["grid"] == "(4096, 1, 1)" and result["commit"] == "abc"


def test_loops_stay_plain_loops_for_float32_above_head_dim_128(monkeypatch):
    """`UNROLL` off, not pipelined (STAGES 1), wherever unrolled code took many minutes to compile:
    float32 ("ieee") products at head dims above 128. Elsewhere a kernel with the switch walks its blocks
    as the launch table says: unrolled (`stages` None) or as a loop pipelined `stages` deep. The
    (256, 256) float32 case of `test_fused_chunk_kernels_match_torch_chunk_path` runs plain loops;
    its other cases run the table's."""
    assert not chunk_fused._unrolled("ieee", 256, 256) and not chunk_fused._unrolled("ieee", 64, 160)
    assert chunk_fused._unrolled("ieee", 128, 128) and chunk_fused._unrolled("ieee", 128)
    assert chunk_fused._unrolled("tf32", 256, 256)
    monkeypatch.setitem(tuning.CHUNK_LAUNCH, "wy_bwd", dict(num_warps=4, tile=64, stages=3))
    assert chunk_fused._chunk_launch("wy_bwd", 256, 256, "ieee") == dict(
        BK=64, BV=64, num_warps=4, UNROLL=False, STAGES=1
    )
    for precision in ("ieee", "tf32"):
        launch = chunk_fused._chunk_launch("wy_bwd", 128, 128, precision)
        assert (launch["UNROLL"], launch["STAGES"]) == (False, 3)
    monkeypatch.setitem(tuning.CHUNK_LAUNCH, "wy_bwd", dict(num_warps=4, tile=64, stages=None))
    launch = chunk_fused._chunk_launch("wy_bwd", 256, 256, "tf32")
    assert (launch["UNROLL"], launch["STAGES"]) == (True, 1)
    assert "UNROLL" not in chunk_fused._chunk_launch("out_fwd", 128, 128, "tf32")  # no loop switch


def test_float32_products_launch_with_their_own_settings_up_to_head_dim_128():
    """`IEEE_LAUNCH`'s tiles and warps replace the tables' for float32 products ("ieee") at head
    dims up to 128, after phase 1's own (`small`); 16-bit products (tf32) and wider heads keep the
    tables'; a kernel's loop switch still comes from the table. Tf32 products on float32 storage
    take `TF32_LAUNCH`'s for the phase-2 kernels it names."""
    ieee = tuning.IEEE_LAUNCH["chunk"]
    assert chunk_fused._chunk_launch("out_fwd", 128, 128, "ieee") == dict(
        BK=ieee["out_fwd"]["tile"], BV=ieee["out_fwd"]["tile"], num_warps=ieee["out_fwd"]["num_warps"]
    )
    table = tuning.CHUNK_LAUNCH["out_fwd"]
    for args in ((128, 128, "tf32"), (256, 256, "ieee"), (128, 256, "ieee")):
        launch = chunk_fused._chunk_launch("out_fwd", *args)
        assert launch["num_warps"] == table["num_warps"] and launch["BK"] == min(args[0], table["tile"]), args
    # out_fwd's V block: V whole up to `tile_v` (128) for 16-bit storage (of43_a0c78d4.json), else
    # `tile`, as for float32's
    assert (table["tile"], table["tile_v"]) == (64, 128)
    for args, BV in (
        ((128, 128, "tf32"), 128),
        ((32, 100, "tf32"), 128),
        ((128, 48, "tf32"), 64),
        ((256, 256, "tf32"), 64),
    ):
        assert chunk_fused._chunk_launch("out_fwd", *args)["BV"] == BV, args
    for args in ((256, 256, "tf32", False, True), (256, 256, "ieee", False, True), (128, 128, "tf32", False, True)):
        assert chunk_fused._chunk_launch("out_fwd", *args)["BV"] == 64, args
    pre_y = chunk_fused._chunk_launch("pre_y", 128, precision="ieee", small=True)
    assert (pre_y["BK"], pre_y["num_warps"]) == (ieee["pre_y"]["tile"], ieee["pre_y"]["num_warps"])
    assert chunk_fused._chunk_launch("pre_y", 128, precision="tf32", small=True)["BK"] == 128  # PHASE1's
    for name in ("pre_intra_fwd", "pre_out_bwd", "pre_intra_bwd"):  # 2 warps, tile 32 (sweep27_736557f.json)
        launch = chunk_fused._chunk_launch(name, 128, precision="ieee", small=True)
        assert (launch["BK"], launch["num_warps"]) == (32, 2), (name, launch)
    wy_bwd = chunk_fused._chunk_launch("wy_bwd", 128, 128, "ieee")
    assert (wy_bwd["BK"], wy_bwd["BV"], wy_bwd["num_warps"]) == (16, 16, ieee["wy_bwd"]["num_warps"])
    assert wy_bwd["STAGES"] == tuning.CHUNK_LAUNCH["wy_bwd"]["stages"]
    # tf32 products on float32 storage (float32 inputs under TF32): `TF32_LAUNCH`'s for phase 2's
    # kernels it names (sweep33_737c347.json), the tables' for the rest, for 16-bit storage and at
    # head dims above 128
    tf32 = tuning.TF32_LAUNCH["chunk"]
    for name in ("wy_fwd", "out_bwd", "state_grads", "wy_bwd", "out_fwd", "kb"):
        launch = chunk_fused._chunk_launch(name, 128, 128, "tf32", float32=True)
        want = dict(tuning.CHUNK_LAUNCH[name], **tf32.get(name, {}))
        assert (launch["BK"], launch["num_warps"]) == (want["tile"], want["num_warps"]), (name, launch)
        for args in ((128, 128, "tf32"), (256, 256, "tf32", False, True)):
            got, plain = chunk_fused._chunk_launch(name, *args), chunk_fused._chunk_launch(name, *args[:3])
            if name == "out_fwd":  # its `tile_v` is 16-bit storage's alone (above)
                got.pop("BV"), plain.pop("BV")
            assert got == plain, name
    assert (tf32["wy_bwd"]["tile"], tf32["out_bwd"]["tile"]) == (32, 32)
    assert chunk_fused._chunk_launch("wy_bwd", 128, 128, "tf32", float32=True) != chunk_fused._chunk_launch(
        "wy_bwd", 128, 128, "tf32"
    )
    pre_y = chunk_fused._chunk_launch("pre_y", 128, precision="tf32", small=True, float32=True)
    assert pre_y == chunk_fused._chunk_launch("pre_y", 128, precision="tf32", small=True)  # phase 1: PHASE1's


def test_launch_key_follows_what_triton_specializes_on():
    """One key per specialization Triton would compile: dtypes, 16-byte alignment (no key for an
    unaligned pointer), integers by 1 / multiple of 16 / width, None, floats and bools."""
    from osdn_hf.ops.osdn.launch import launch_key

    x, h = torch.zeros(8), torch.zeros(8, dtype=torch.float16)
    base = launch_key((x, 5, 0.5, None, True))
    assert base == launch_key((torch.ones(8), 7, 0.25, None, True))  # same specialization, other values
    others = [
        (h, 5, 0.5, None, True),
        (x, 1, 0.5, None, True),
        (x, 32, 0.5, None, True),
        (x, 2**40, 0.5, None, True),
        (x, 2**63, 0.5, None, True),
        (x, 5, 1, None, True),
        (x, 5, 0.5, x, True),
        (x, 5, 0.5, None, False),
    ]
    keys = [launch_key(a) for a in others]
    assert base not in keys and len(set(keys)) == len(keys)
    assert launch_key((x[1:], 5)) is None  # 4 bytes past an aligned address
    with pytest.raises(TypeError, match="str"):
        launch_key((x, "5"))


class _FakeCompiled:
    """Stands for Triton's CompiledKernel: `compiled[grid](*args)` records the launch."""

    packed_metadata = None

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        assert len(grid) == 3, "a compiled kernel's runner reads grid[0], grid[1] and grid[2]"
        return lambda *args: self.log.append(("compiled", grid, args))


class _FakeKernel:
    """Stands for a JITFunction `f(a, n, C: constexpr, D: constexpr = 9)`: `kernel[grid](...)`
    records the launch and returns a compiled kernel, or None as Triton's interpreter does."""

    params = [
        SimpleNamespace(name="a", is_constexpr=False, default=inspect.Parameter.empty),
        SimpleNamespace(name="n", is_constexpr=False, default=inspect.Parameter.empty),
        SimpleNamespace(name="C", is_constexpr=True, default=inspect.Parameter.empty),
        SimpleNamespace(name="D", is_constexpr=True, default=9),
    ]

    def __init__(self, interpreted=False):
        self.log, self.interpreted = [], interpreted

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return None if self.interpreted else _FakeCompiled(self.log)

        return run


def test_kernel_launcher_relaunches_the_compiled_kernel_per_key():
    from osdn_hf.ops.osdn.launch import KernelLauncher

    kernel = _FakeKernel()
    launch = KernelLauncher(kernel)
    x, y = torch.zeros(8), torch.ones(8)
    meta = dict(D=2, C=3, num_warps=4)  # constexprs in any order, options too
    launch((2,), (x, 5), meta)
    launch((3,), (y, 7), meta)  # same key: straight to the compiled kernel, constexprs in order
    launch((3,), (y, 16), meta)  # a multiple of 16: Triton compiles another kernel
    launch((3,), (y, 7), dict(meta, C=4))  # another constexpr
    launch((3,), (x[1:], 7), meta)  # unaligned: no key, Triton's own launch every time
    launch((3,), (x[1:], 7), meta)
    assert [e[0] for e in kernel.log] == ["jit", "compiled", "jit", "jit", "jit", "jit"]
    assert kernel.log[1] == ("compiled", (3, 1, 1), (y, 7, 3, 2))
    assert kernel.log[2][2:] == ((y, 16), meta)
    assert len(launch.compiled) == 3

    interpreted = _FakeKernel(interpreted=True)
    launch = KernelLauncher(interpreted)
    for _ in range(2):
        launch((1,), (x, 5), meta)
    assert [e[0] for e in interpreted.log] == ["jit", "jit"] and not launch.compiled


def test_kernel_launcher_fills_defaults_and_keeps_no_runtime_argument():
    """A constexpr left to its default is passed with that default; a runtime argument given by
    name or a constexpr given by position is never kept (the key would not hold its value), so
    it goes through Triton."""
    from osdn_hf.ops.osdn.launch import KernelLauncher, enqueue

    kernel = _FakeKernel()
    launcher = KernelLauncher(kernel)
    x = torch.zeros(8)
    for _ in range(2):
        launcher((2,), (x, 5), dict(C=3))
    assert kernel.log[1] == ("compiled", (2, 1, 1), (x, 5, 3, 9))
    kernel = _FakeKernel()
    launcher = KernelLauncher(kernel)
    for n in (5, 7):
        launcher((2,), (x,), dict(n=n, C=3))
    assert [e[0] for e in kernel.log] == ["jit", "jit"] and not launcher.compiled
    assert kernel.log[1][3] == dict(n=7, C=3)
    kernel = _FakeKernel()
    launcher = KernelLauncher(kernel)
    for c in (3, 5):  # a constexpr passed by position
        launcher((2,), (x, 7, c), {})
    assert [e[0] for e in kernel.log] == ["jit", "jit"] and not launcher.compiled

    kernel = _FakeKernel()  # `enqueue` keeps one launcher per kernel
    for n in (5, 7):
        enqueue(kernel, (4, 2), x, n, C=3, num_warps=4)
    assert kernel.log[1] == ("compiled", (4, 2, 1), (x, 7, 3, 9))


class _FakeRunCompiled(_FakeCompiled):
    """A compiled kernel with what its runner passes to the kernel's launcher (`run`, `function`,
    `packed_metadata`), as Triton's own have."""

    function, packed_metadata = "fn", "meta"

    def run(self, *args):
        self.log.append(("run", args))


def test_kernel_launcher_calls_the_launcher_directly_unless_a_launch_hook_is_registered(monkeypatch):
    """A kept kernel is launched as its runner would launch it (grid, the current stream, its
    function and metadata, no launch metadata or hooks, then the arguments and constexprs); with
    a launch hook registered (a profiler's), through the runner, which calls the hooks."""
    from triton import knobs

    from osdn_hf.ops.osdn import launch as launch_mod

    kernel = _FakeKernel()  # its first launch (compiling) hands back the stand-in below, unlogged
    monkeypatch.setattr(_FakeKernel, "__getitem__", lambda self, grid: lambda *a, **m: _FakeRunCompiled(self.log))
    monkeypatch.setattr(launch_mod, "_current_stream", lambda: 77)
    launcher = launch_mod.KernelLauncher(kernel)
    x = torch.zeros(8)
    launcher((2, 3), (x, 5), dict(C=3))  # compiles (here: keeps the stand-in)
    launcher((2, 3), (x, 5), dict(C=3))
    assert kernel.log == [("run", (2, 3, 1, 77, "fn", "meta", None, None, None, x, 5, 3, 9))]
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launcher((2, 3), (x, 5), dict(C=3))
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert kernel.log[-1] == ("compiled", (2, 3, 1), (x, 5, 3, 9))
    launcher((2, 3), (x, 5), dict(C=3))
    assert kernel.log[-1][0] == "run"


def test_direct_launch_only_where_the_runner_calls_the_launcher_so(monkeypatch):
    """The installed Triton's compiled-kernel runner calls the kernel's launcher as the direct
    launch does (a Triton that changes that fails here first). A runner that passes the arguments
    otherwise (here, dropping None ones) or whose source cannot be read keeps kept kernels
    launching through the runner."""
    from osdn_hf.ops.osdn import launch as launch_mod

    check = launch_mod._runner_calls_launcher_as_kept
    check.cache_clear()
    assert check()
    compiled = _FakeRunCompiled([])
    assert launch_mod._direct_launch(compiled) == (compiled.run, "fn", "meta")
    dropping = """
    def __getitem__(self, grid):
        def runner(*args, stream=None):
            launch_metadata = self.launch_metadata(grid, stream, *args)
            filtered_args = tuple(arg for arg in args if arg is not None)
            self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, launch_metadata,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *filtered_args)
        return runner
"""

    def unreadable(obj):
        raise OSError("could not get source code")

    try:
        for source in (lambda obj: dropping, unreadable):
            check.cache_clear()
            monkeypatch.setattr(launch_mod.inspect, "getsource", source)
            assert not check() and launch_mod._direct_launch(compiled) is None
            kernel = _FakeKernel()
            monkeypatch.setattr(
                _FakeKernel, "__getitem__", lambda self, grid: lambda *a, **m: _FakeRunCompiled(self.log)
            )
            launcher = launch_mod.KernelLauncher(kernel)
            for _ in range(2):
                launcher((2, 3), (torch.zeros(8), 5), dict(C=3))
            assert [e[0] for e in kernel.log] == ["compiled"]  # the kept kernel, through its runner
    finally:
        monkeypatch.undo()
        check.cache_clear()


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

"""The three OSDN ops against a float64 loop of SPEC section 2, against each other, and fla."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, make_inputs, reference_osdn_f64

from osdn_hf.ops import chunk_osdn, fused_recurrent_osdn, naive_recurrent_osdn
from osdn_hf.ops.osdn.utils import FORCE_TRITON_ENV, dot_precision, float32_tf32, l2norm

OPS = {"naive": naive_recurrent_osdn, "chunk": chunk_osdn, "fused_recurrent": fused_recurrent_osdn}
ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True, params=["torch", "triton"])
def backend(request, monkeypatch):
    """Every test runs on both paths: the pure-torch one and the Triton kernels through Triton's
    interpreter (conftest.py sets TRITON_INTERPRET=1 without a GPU). The naive op ignores it."""
    if request.param == "triton" and ON_GPU:
        pytest.skip(
            "these tests use CPU tensors, which reach Triton only through the interpreter (no-GPU "
            "machines); on a GPU, scripts/check_kernels.py tests the kernels on CUDA tensors"
        )
    if request.param == "triton":
        pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
        monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    return request.param


GRAD_NAMES = ("q", "k", "v", "beta", "eta", "lam", "initial_state", "initial_precond")


def run_with_grads(fn, inputs: dict, cotangents: tuple, **kwargs):
    """Run `fn`, backpropagate fixed random cotangents of (o, S, d); return outputs and grads."""
    for x in inputs.values():
        if x is not None:
            x.grad = None
    o, S, d = fn(**inputs, output_final_state=True, **kwargs)
    loss = (o.double() * cotangents[0]).sum() + (S.double() * cotangents[1]).sum() + (d.double() * cotangents[2]).sum()
    loss.backward()
    # an input the result does not depend on (an empty sequence's tokens) has zero gradient
    grads = {
        n: torch.zeros_like(inputs[n]) if inputs[n].grad is None else inputs[n].grad.clone()
        for n in GRAD_NAMES
        if inputs.get(n) is not None
    }
    return (o, S, d), grads


def reference(inputs: dict, **kwargs):
    return reference_osdn_f64(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["beta"],
        inputs["eta"],
        inputs["lam"],
        S0=inputs["initial_state"],
        d0=inputs["initial_precond"],
        **kwargs,
    )


@pytest.mark.parametrize("with_states", [False, True])
@pytest.mark.parametrize("T", [1, 63, 64, 100, 300])
@pytest.mark.parametrize("op", list(OPS))
def test_op_matches_float64_loop(op, T, with_states):
    B, H, K, V = 2, 2, 16, 8
    inputs = make_inputs(B, T, H, K, V, with_states=with_states, seed=T)
    g = torch.Generator().manual_seed(1)
    cot = (
        torch.randn(B, T, H, V, generator=g).double(),
        torch.randn(B, H, K, V, generator=g).double(),
        torch.randn(B, H, K, generator=g).double(),
    )
    (o, S, d), grads = run_with_grads(OPS[op], inputs, cot)
    ref_inputs = {n: (x.detach().double().requires_grad_() if x is not None else None) for n, x in inputs.items()}
    (ro, rS, rd), ref_grads = run_with_grads(lambda output_final_state, **kw: reference(kw), ref_inputs, cot)
    assert o.dtype == torch.float32 and S.dtype == torch.float32 and d.dtype == torch.float32
    assert_close(f"{op} o", o, ro)
    assert_close(f"{op} final_state", S, rS)
    assert_close(f"{op} final_precond", d, rd)
    for name, grad in ref_grads.items():
        assert_close(f"{op} d{name}", grads[name], grad)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("given", ["initial_state", "initial_precond", None])
@pytest.mark.parametrize("op", list(OPS))
def test_op_with_default_initial_states_and_the_final_states_unused(op, given, packed):
    """One initial state given and the other the default, or both the default (on the Triton path
    the kernels read None as them), and a loss on the output alone (so the final states'
    gradients are None, which the Triton path's backward scans read as zeros); in one batch, or
    packed sequences (`cu_seqlens`, one of them empty): outputs and every gradient, a given
    state's included, match the float64 loop."""
    lengths = [37, 0, 64, 1, 130] if packed else None
    B, T, H, K, V = (1, sum(lengths), 2, 16, 8) if packed else (2, 100, 2, 16, 8)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]) if packed else None
    inputs = make_inputs(B, T, H, K, V, with_states=True, N=len(lengths) if packed else None, seed=5)
    for name in ("initial_state", "initial_precond"):
        if name != given:
            inputs[name] = None
    cot = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(6)).double()
    ref_inputs = {n: (x.detach().double().requires_grad_() if x is not None else None) for n, x in inputs.items()}
    o = OPS[op](**inputs, cu_seqlens=cu)[0]
    if packed:  # the float64 loop sequence by sequence (the empty one has no tokens to run)

        def segment(name, x, n, a, b):
            if x is None:
                return None
            return x[n : n + 1] if name in ("initial_state", "initial_precond") else x[:, a:b]

        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        runs = [reference({name: segment(name, x, n, a, b) for name, x in ref_inputs.items()})[0]
                for n, (a, b) in enumerate(bounds) if b > a]  # fmt: skip
        ro = torch.cat(runs, dim=1)
    else:
        ro = reference(ref_inputs)[0]
    leaves = [n for n in GRAD_NAMES if inputs.get(n) is not None]
    grads = torch.autograd.grad((o.double() * cot).sum(), [inputs[n] for n in leaves])
    ref_grads = torch.autograd.grad((ro * cot).sum(), [ref_inputs[n] for n in leaves])
    assert_close(f"{op} o", o, ro)
    for name, a, b in zip(leaves, grads, ref_grads):
        assert_close(f"{op} d{name}", a, b)
    assert given is None or grads[leaves.index(given)].abs().sum() > 0


def test_preconditioner_moves_and_deltanet_limit():
    """eta > 0 moves d away from 1 (the test above is not vacuous); eta = 0, lam = 1 keeps d = 1."""
    inputs = make_inputs(1, 50, 2, 16, 16)
    inputs["lam"] = torch.ones_like(inputs["lam"])  # no APF pulling d back to 1
    _, _, d = chunk_osdn(**inputs, output_final_state=True)
    assert (d - 1).abs().max() > 0.05
    inputs["eta"] = torch.zeros_like(inputs["eta"])
    inputs["lam"] = torch.ones_like(inputs["lam"])
    _, _, d = chunk_osdn(**inputs, output_final_state=True)
    assert torch.equal(d, torch.ones_like(d))


@pytest.mark.parametrize("op", list(OPS))
def test_packed_sequences_equal_separate_runs(op):
    """cu_seqlens: states reset at boundaries, exactly as if each sequence ran alone (grads too)."""
    lengths = [37, 0, 64, 1, 130]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    T, N, H, K, V = sum(lengths), len(lengths), 2, 16, 8
    inputs = make_inputs(1, T, H, K, V, with_states=True, N=N, seed=3)
    g = torch.Generator().manual_seed(2)
    cot = (
        torch.randn(1, T, H, V, generator=g).double(),
        torch.randn(N, H, K, V, generator=g).double(),
        torch.randn(N, H, K, generator=g).double(),
    )
    (o, S, d), grads = run_with_grads(OPS[op], inputs, cot, cu_seqlens=offsets)

    for n in range(N):
        s, e = offsets[n].item(), offsets[n + 1].item()
        seg = {
            name: inputs[name].detach()[:, s:e].clone().requires_grad_()
            for name in ("q", "k", "v", "beta", "eta", "lam")
        }
        seg["initial_state"] = inputs["initial_state"].detach()[n : n + 1].clone().requires_grad_()
        seg["initial_precond"] = inputs["initial_precond"].detach()[n : n + 1].clone().requires_grad_()
        seg_cot = (cot[0][:, s:e], cot[1][n : n + 1], cot[2][n : n + 1])
        (o_n, S_n, d_n), g_n = run_with_grads(OPS[op], seg, seg_cot)
        assert_close(f"S[{n}]", S[n : n + 1], S_n)
        assert_close(f"d[{n}]", d[n : n + 1], d_n)
        if e > s:
            assert_close(f"o[{n}]", o[:, s:e], o_n)
            for name in ("q", "k", "v", "beta", "eta", "lam"):
                assert_close(f"d{name}[{n}]", grads[name][:, s:e], g_n[name])
        assert_close(f"dS0[{n}]", grads["initial_state"][n : n + 1], g_n["initial_state"])
        assert_close(f"dd0[{n}]", grads["initial_precond"][n : n + 1], g_n["initial_precond"])
    if lengths[1] == 0:  # an empty sequence hands its initial state through unchanged
        assert torch.equal(S[1], inputs["initial_state"][1].detach())


@pytest.mark.parametrize("op", list(OPS))
def test_qk_l2norm_in_kernel_and_scale(op):
    inputs = make_inputs(2, 20, 2, 16, 8)
    raw_k = inputs["k"].detach() * 3.0 + 0.1
    raw_q = inputs["q"].detach() * 2.0
    got = OPS[op](
        **{**inputs, "q": raw_q, "k": raw_k}, scale=0.3, use_qk_l2norm_in_kernel=True, output_final_state=True
    )
    qn = torch.nn.functional.normalize(raw_q, dim=-1, eps=1e-6)
    kn = torch.nn.functional.normalize(raw_k, dim=-1, eps=1e-6)
    ro, rS, rd = reference_osdn_f64(qn, kn, inputs["v"], inputs["beta"], inputs["eta"], inputs["lam"], scale=0.3)
    assert_close("o", got[0], ro)
    assert_close("S", got[1], rS)
    assert_close("d", got[2], rd)


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_qk_l2norm_in_kernel_gradients(op):
    """The in-kernel L2 norm (on the Triton path fused into the chunk relayout) backpropagates
    like normalising first: all gradients, at a length that leaves a partial chunk, with states."""
    inputs = make_inputs(1, 100, 2, 16, 8, with_states=True)
    cot = tuple(torch.randn(s, dtype=torch.float64) for s in ((1, 100, 2, 8), (1, 2, 16, 8), (1, 2, 16)))
    raw = {
        **inputs,
        "q": (inputs["q"].detach() * 2.0).requires_grad_(),
        "k": (inputs["k"].detach() * 3.0 + 0.1).requires_grad_(),
    }
    got, got_grads = run_with_grads(OPS[op], raw, cot, use_qk_l2norm_in_kernel=True)

    def normalised_first(q, k, **rest):
        return OPS[op](q=l2norm(q), k=l2norm(k), **rest)

    ref, ref_grads = run_with_grads(normalised_first, raw, cot)
    for name, a, b in zip(("o", "S", "d"), got, ref):
        assert_close(name, a, b)
    for name in GRAD_NAMES:
        assert_close(f"d{name}", got_grads[name], ref_grads[name])


@pytest.mark.parametrize("packed", [False, True])
def test_fused_recurrent_inplace_final_state(packed):
    """`inplace_final_state` writes the final states into the initial ones and returns them;
    results equal the out-of-place call, also for packed sequences (one of them empty)."""
    inputs = {
        n: (x.detach() if x is not None else None)
        for n, x in make_inputs(1, 9, 2, 16, 8, with_states=True, N=3).items()
    }
    cu = torch.tensor([0, 4, 4, 9]) if packed else None
    if not packed:
        inputs = {n: (x[:1] if n in ("initial_state", "initial_precond") else x) for n, x in inputs.items()}
    ref = fused_recurrent_osdn(**inputs, output_final_state=True, cu_seqlens=cu)
    S0, d0 = inputs["initial_state"].clone(), inputs["initial_precond"].clone()
    with torch.no_grad():
        o, S, d = fused_recurrent_osdn(
            **{**inputs, "initial_state": S0, "initial_precond": d0}, cu_seqlens=cu, inplace_final_state=True
        )
    assert S is S0 and d is d0
    for name, a, b in zip(("o", "S", "d"), (o, S, d), ref):
        assert_close(name, a, b)
    if packed:  # the empty sequence keeps its state
        assert torch.equal(S0[1], inputs["initial_state"][1])


def test_fused_recurrent_inplace_final_state_bad_input():
    inputs = make_inputs(1, 3, 2, 16, 8, with_states=True)
    with pytest.raises(ValueError, match="autograd"):
        fused_recurrent_osdn(**inputs, inplace_final_state=True)
    plain = {n: (x.detach() if x is not None else None) for n, x in inputs.items()}
    with pytest.raises(ValueError, match="needs `initial_precond`"):
        fused_recurrent_osdn(**{**plain, "initial_precond": None}, inplace_final_state=True)
    with pytest.raises(ValueError, match="contiguous float32 `initial_state`"):
        fused_recurrent_osdn(**{**plain, "initial_state": plain["initial_state"].double()}, inplace_final_state=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_half_precision_inputs(op, dtype, backend):
    """16-bit q, k, v: output in that dtype, states in float32, error at the dtype's rounding."""
    if dtype == torch.bfloat16 and backend == "triton":
        pytest.skip("Triton's interpreter computes bfloat16 wrongly; bf16 kernels are checked on the GPU")
    inputs = make_inputs(2, 100, 2, 32, 32, dtype=dtype, with_states=True)
    o, S, d = OPS[op](**inputs, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32 and d.dtype == torch.float32
    ro, rS, rd = reference(inputs)
    assert_close("o", o, ro, dtype)
    assert_close("S", S, rS, dtype)


def test_deltanet_limit_matches_fla_reference():
    """eta = 0, lam = 1: OSDN is DeltaNet, checked against flash-linear-attention's own loop."""
    naive = pytest.importorskip(
        "fla.ops.delta_rule.naive", reason="flash-linear-attention (the test extra) is not installed"
    )
    B, T, H, K, V = 2, 100, 3, 32, 16
    inputs = make_inputs(B, T, H, K, V, with_states=True)
    inputs = {n: (x.detach() if x is not None else None) for n, x in inputs.items()}
    inputs["eta"] = torch.zeros(B, T, H)
    inputs["lam"] = torch.ones(B, T, H)
    inputs["initial_precond"] = None
    to_bhtd = lambda x: x.transpose(1, 2).contiguous()  # fla's naive loop is [B, H, T, *]
    fo, fS = naive.delta_rule_recurrence(
        to_bhtd(inputs["q"]),
        to_bhtd(inputs["k"]),
        to_bhtd(inputs["v"]),
        inputs["beta"].transpose(1, 2).contiguous(),
        initial_state=inputs["initial_state"].clone(),
        output_final_state=True,
    )
    for name, op in OPS.items():
        o, S, d = op(**inputs, output_final_state=True)
        assert_close(f"{name} o vs fla", o, fo.transpose(1, 2))
        assert_close(f"{name} S vs fla", S, fS)
        assert torch.equal(d, torch.ones_like(d))


BAD_INPUTS = {
    "q rank": (lambda a: {**a, "q": a["q"][0]}, "`q` must have 4 dimensions"),
    "k shape": (lambda a: {**a, "k": a["k"][:, :, :, :8]}, "`k` must have the shape of `q`"),
    "v shape": (lambda a: {**a, "v": a["v"][:, :5]}, "`v` must be"),
    "beta shape": (lambda a: {**a, "beta": a["beta"][:, :, :1]}, "`beta` must be"),
    "dtype": (lambda a: {**a, "v": a["v"].double()}, "share one dtype"),
    "state shape": (lambda a: {**a, "initial_state": torch.zeros(2, 2, 16, 7)}, "`initial_state` must be"),
    "precond shape": (lambda a: {**a, "initial_precond": torch.ones(3, 2, 16)}, "`initial_precond` must be"),
    "cu_seqlens with B > 1": (lambda a: {**a, "cu_seqlens": torch.tensor([0, 10])}, "B = 1"),
    "head dim": (lambda a: {**a, "q": torch.zeros(2, 10, 2, 300), "k": torch.zeros(2, 10, 2, 300)}, "head dims"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("op", list(OPS))
def test_bad_inputs_raise_value_error(op, case):
    inputs = {n: (x.detach() if x is not None else None) for n, x in make_inputs(2, 10, 2, 16, 8).items()}
    change, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        OPS[op](**change(inputs))


def test_quick_input_check_passes_only_what_the_full_checks_pass(monkeypatch):
    """`check_inputs` lets well-formed unpacked inputs through one quick test (`_well_formed`), for
    decoding's sake; it must pass exactly what the full checks pass: on every bad input above and
    others (wrong types, ranks, dtypes, devices, scales, states), and on good ones."""
    from osdn_hf.ops.osdn import utils

    a = {n: (x.detach() if x is not None else None) for n, x in make_inputs(2, 10, 2, 16, 8, with_states=True).items()}
    variants = {name: change(a) for name, (change, _) in BAD_INPUTS.items() if "cu_seqlens" not in name}
    variants.update(
        good=a,
        good_no_states={**a, "initial_state": None, "initial_precond": None},
        good_fp16={**a, **{n: a[n].half() for n in ("q", "k", "v")}},
        q_not_tensor={**a, "q": a["q"].tolist()},
        lam_not_tensor={**a, "lam": 0.5},
        int_q={**a, **{n: a[n].long() for n in ("q", "k", "v")}},
        int_beta={**a, "beta": a["beta"].long()},
        beta_rank={**a, "beta": a["beta"][..., None]},
        eta_shape={**a, "eta": a["eta"][:1]},
        v_rank={**a, "v": a["v"][0]},
        v_wide={**a, "v": torch.zeros(2, 10, 2, 300)},
        meta_device={**a, "eta": a["eta"].to("meta")},
        scale_zero={**a, "scale": 0.0},
        scale_nan={**a, "scale": float("nan")},
        scale_good={**a, "scale": 0.5},
        state_int={**a, "initial_state": a["initial_state"].long()},
        precond_int={**a, "initial_precond": a["initial_precond"].long()},
        precond_rank={**a, "initial_precond": a["initial_precond"][0]},
    )
    names = ("q", "k", "v", "beta", "eta", "lam", "scale", "initial_state", "initial_precond")

    def full(args):
        monkeypatch.setattr(utils, "_well_formed", lambda *x: False)
        try:
            utils.check_inputs(*args, None)
            return True
        except ValueError:
            return False
        finally:
            monkeypatch.undo()

    for name, v in variants.items():
        args = [v.get(n) for n in names]
        quick = utils._well_formed(*args)
        assert quick == full(args), name
        assert quick == (name.startswith("good") or name == "scale_good"), name
        if not quick:
            with pytest.raises(ValueError):
                utils.check_inputs(*args, None)


def test_bad_cu_seqlens_raise_value_error():
    inputs = {n: (x.detach() if x is not None else None) for n, x in make_inputs(1, 10, 2, 16, 8).items()}
    with pytest.raises(ValueError, match="rise from 0 to T"):
        chunk_osdn(**inputs, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="1-D int64"):
        chunk_osdn(**inputs, cu_seqlens=torch.tensor([0.0, 10.0]))


def test_varlen_index_is_worked_out_once_per_cu_seqlens_tensor():
    """Every layer of a model reads the same `cu_seqlens` (host copies are GPU waits): the same
    tensor gives the same index; a changed or new tensor is read afresh."""
    from osdn_hf.ops.osdn.utils import varlen_index, varlen_offsets

    cu = torch.tensor([0, 3, 3, 7])
    dest, L = varlen_index(cu)
    assert dest.tolist() == [0, 1, 2, 8, 9, 10, 11] and L == 4  # an empty sequence in the middle
    assert varlen_index(cu)[0] is dest and varlen_offsets(cu) == [0, 3, 3, 7]
    cu[3] = 8  # in place: its version counter moves
    assert varlen_offsets(cu) == [0, 3, 3, 8] and varlen_index(cu)[0].tolist() == [0, 1, 2, 10, 11, 12, 13, 14]
    other = torch.tensor([0, 2])
    assert varlen_index(other)[0].tolist() == [0, 1] and varlen_index(torch.tensor([0, 0]))[1] == 1


def test_float32_products_follow_torchs_tf32_setting():
    """`dot_precision`: tf32 for 16-bit inputs; for float32 inputs exact ("ieee") unless torch runs
    float32 matmuls in TF32, set for cuBLAS's matmuls or globally (`torch.backends.fp32_precision`,
    which they follow while theirs is "none")."""
    matmul, backends = torch.backends.cuda.matmul, torch.backends
    x32, x16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    before = matmul.fp32_precision, backends.fp32_precision
    try:
        matmul.fp32_precision, backends.fp32_precision = "none", "none"
        assert (dot_precision(x32), dot_precision(x16)) == ("ieee", "tf32") and not float32_tf32()
        matmul.fp32_precision = "tf32"
        assert dot_precision(x32) == "tf32" and float32_tf32()
        matmul.fp32_precision, backends.fp32_precision = "none", "tf32"
        assert dot_precision(x32) == "tf32"
        matmul.fp32_precision = "ieee"  # its own setting over the global one
        assert dot_precision(x32) == "ieee"
    finally:
        backends.fp32_precision = before[1]
        matmul.fp32_precision = before[0]
    assert (matmul.fp32_precision, backends.fp32_precision) == before

"""Layer pieces: the short convolution, RMSNorm, and the one-kernel steps that run a cached
decoding step's convolutions, gates, projections and MLP (interpreted here, CUDA on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import LOGITS_ATOL, tiny_config, tiny_model

from osdn_hf.layers.modules import RMSNorm, ShortConvolution
from osdn_hf.ops.osdn import utils


def test_short_convolution_packed_and_cached_equal_full():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4)
    x = torch.randn(2, 11, 6)
    full, _ = conv(x)
    first, cache = conv(x[:, :5])
    rest, _ = conv(x[:, 5:], cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full)
    packed, caches = conv(torch.cat([x[:1], x[1:, :7]], 1), cu_seqlens=torch.tensor([0, 11, 18]))
    torch.testing.assert_close(packed[:, :11], full[:1])
    torch.testing.assert_close(packed[:, 11:], conv(x[1:, :7])[0])
    torch.testing.assert_close(caches[1], x[1, 4:7].T)


@pytest.mark.parametrize(
    "dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float64, False), (torch.float32, True)]
)
def test_short_convolution_decoding_step_matches_conv1d(dtype, autocast):
    """A one-token step (`_one_step`: a multiply and a sum, not `F.conv1d`) gives what
    `F.conv1d` gives, in the dtype it gives: the input's, or autocast's where autocast is on."""
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4, bias=True).to(torch.float32 if autocast else dtype)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, 1, 6, dtype=dtype)
    cache = torch.randn(3, 6, 3, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, new_cache = conv(x, cache)
        xcat = torch.cat([cache.transpose(1, 2), x], 1)
        ref = F.silu(F.conv1d(xcat.transpose(1, 2), conv.weight, conv.bias, groups=6).transpose(1, 2))
    assert y.dtype == ref.dtype == (torch.bfloat16 if autocast else dtype)
    tol = {torch.float64: dict(rtol=0, atol=1e-12), torch.float32: dict(rtol=0, atol=1e-6)}.get(
        y.dtype, dict(rtol=1.6e-2, atol=1e-2)
    )
    torch.testing.assert_close(y, ref, **tol)
    assert not torch.equal(y, torch.zeros_like(y))
    torch.testing.assert_close(new_cache, xcat[:, 1:].transpose(1, 2))
    first, _ = conv(x)  # no cache: zeros before the first token
    torch.testing.assert_close(first, F.silu(conv._one_step(torch.cat([x.new_zeros(3, 3, 6), x], 1))))


class _Subclass(torch.Tensor):
    """A tensor subclass, as a quantized (torchao) or distributed (DTensor) weight is one: the
    one-kernel steps leave such weights to PyTorch."""


def _step_kernels(monkeypatch, module) -> tuple[str, list]:
    """For the one-kernel decoding steps: the device they run on here (CUDA, else Triton's
    interpreter on the CPU, forced), and a list that records every kernel `module` launches."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv(utils.FORCE_TRITON_ENV, "1")
    launched, real_enqueue = [], module.enqueue
    monkeypatch.setattr(module, "enqueue", lambda *a, **k: launched.append(a[0]) or real_enqueue(*a, **k))
    return device, launched


STEP_CASES = [(torch.float32, False), (torch.float16, False), (torch.float32, True)]
if torch.cuda.is_available():  # Triton's interpreter is wrong for bf16; a GPU is not
    STEP_CASES.append((torch.bfloat16, False))


@pytest.mark.parametrize("dtype, autocast", STEP_CASES)
@pytest.mark.parametrize("W, bias", [(4, False), (4, True), (2, False), (5, True)])
def test_short_convolution_step_kernel_matches_torch(monkeypatch, dtype, autocast, W, bias):
    """The one-kernel decoding step (`short_conv_step`; Triton's interpreter here, CUDA on a
    GPU) gives the PyTorch step's outputs, in its dtype (fp16 autocast's where on), and shifts
    the cache in place exactly; 48 channels leave part of a block unused."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    from osdn_hf.ops import short_conv

    device, launched = _step_kernels(monkeypatch, short_conv)
    torch.manual_seed(0)
    conv = ShortConvolution(48, W, bias=bias).to(device, torch.float32 if autocast else dtype)
    with torch.no_grad():
        if bias:
            conv.bias.normal_()
    x = torch.randn(3, 1, 48, dtype=dtype, device=device)
    cache = torch.randn(3, 48, W - 1, dtype=dtype, device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=autocast):
        ref, ref_cache = conv(x, cache.clone())  # not in place: PyTorch
        held = cache
        y, new_cache = conv(x, cache, inplace=True)
    assert launched == [short_conv.short_conv_step_kernel]
    assert new_cache is held and y.dtype == ref.dtype == (torch.float16 if autocast else dtype)
    torch.testing.assert_close(new_cache, ref_cache, rtol=0, atol=0)
    tol = dict(rtol=0, atol=2e-6) if y.dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(y, ref, **tol)
    assert not torch.equal(y, torch.zeros_like(y))
    conv.weight = torch.nn.Parameter(conv.weight.detach().as_subclass(_Subclass), requires_grad=False)
    with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=autocast):
        conv(x, cache, inplace=True)  # a subclass weight: PyTorch's step
    assert launched == [short_conv.short_conv_step_kernel]


@pytest.mark.parametrize("dtype, autocast", STEP_CASES)
@pytest.mark.parametrize("conv_bias", [False, True])
def test_layer_convolves_q_k_v_in_one_step_kernel(monkeypatch, dtype, autocast, conv_bias):
    """A layer's one-token step in place convolves q, k and v in one launch of the step kernel
    (Triton's interpreter here, CUDA on a GPU; v twice as wide as q and k, in two blocks of 256
    channels, so q's and k's second blocks have no channels): each output as each convolution's PyTorch step gives it,
    each cache shifted in place exactly. A cache that is not contiguous, or packed tokens, leave each
    convolution to itself."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    from osdn_hf.layers.osdn_attention import OSDNAttention
    from osdn_hf.ops import short_conv

    device, launched = _step_kernels(monkeypatch, short_conv)
    torch.manual_seed(0)
    config = tiny_config(hidden_size=160, num_heads=2, expand_v=2, conv_bias=conv_bias)
    attn = OSDNAttention(config, 0).to(device, torch.float32 if autocast else dtype)
    if conv_bias:
        with torch.no_grad():
            for conv in (attn.q_conv1d, attn.k_conv1d, attn.v_conv1d):
                conv.bias.normal_()
    x = torch.randn(3, 1, 160, dtype=dtype, device=device)
    cache_dtype = torch.float16 if autocast else dtype  # the projections' outputs', as a prompt leaves them
    caches = tuple(torch.randn(3, D, 3, dtype=cache_dtype, device=device) for D in (160, 160, 320))
    with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=autocast):
        ref = attn.project(x, tuple(c.clone() for c in caches))  # not in place: PyTorch
        assert not launched
        out = attn.project(x, caches, inplace=True)
        assert launched == [short_conv.short_conv_step_kernel]
        for a, b in zip(out[:3], ref[:3], strict=True):
            tol = dict(rtol=0, atol=2e-6) if a.dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
            torch.testing.assert_close(a, b, **tol)
            assert a.dtype == (torch.float16 if autocast else dtype) and not torch.equal(a, torch.zeros_like(a))
        assert all(a is b for a, b in zip(out[-1], caches, strict=True))
        torch.testing.assert_close(out[-1], ref[-1], rtol=0, atol=0)
        launched.clear()
        strided = (caches[0], caches[1], caches[2].transpose(0, 1).contiguous().transpose(0, 1))
        attn.project(x, strided, inplace=True)
        assert launched == [short_conv.short_conv_step_kernel] * 2  # q and k; v in PyTorch
        launched.clear()
        packed = torch.tensor([0, 1, 2, 3], device=device)
        attn.project(x.view(1, 3, 160), tuple(c.clone() for c in caches), packed, True)
        assert not launched


GATE_CASES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", GATE_CASES)
@pytest.mark.parametrize(
    "hidden, heads, overrides",
    [
        (80, 5, {}),  # 80 columns leave part of a block unused
        (1040, 5, {}),  # two blocks of columns (1024 a block)
        (72, 18, dict(eta_max=0.7, precond_eta_init=0.3)),
        (80, 5, dict(use_apf=False)),  # lam 1
        (80, 5, dict(preconditioner="none")),  # eta 0, lam 1
    ],
)
def test_gates_step_kernel_matches_torch(monkeypatch, dtype, hidden, heads, overrides):
    """The decoding step's gates in one kernel (`gates_step`; Triton's interpreter here, CUDA on
    a GPU) give the layer's PyTorch gates for one token a sequence and for packed tokens: float32
    to the products' round-off, 16-bit within twice what an ulp of the projection's output moves a
    gate. More rows than `MAX_ROWS`, autocast, or gradients enabled keep the PyTorch gates."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    from osdn_hf.layers.osdn_attention import OSDNAttention
    from osdn_hf.ops import gates

    device, launched = _step_kernels(monkeypatch, gates)
    torch.manual_seed(0)
    attn = OSDNAttention(tiny_config(hidden_size=hidden, num_heads=heads, **overrides), 0).to(device, dtype)
    projections = (attn.b_proj, getattr(attn, "eta_proj", None), getattr(attn, "apf_proj", None))
    with torch.no_grad():
        for proj in projections:
            if proj is not None:
                proj.weight.normal_(0, 0.3)
                if proj.bias is not None:
                    proj.bias.normal_()
    for shape in ((3, 1, hidden), (1, 7, hidden)):
        x = torch.randn(*shape, device=device, dtype=dtype)
        ref = attn.gates(x)
        assert not launched
        with torch.no_grad():
            out = attn.gates(x, step=True)
        assert launched == [gates.gates_step_kernel]
        launched.clear()
        for a, b, proj, scale in zip(out, ref, projections, (1.0, attn.eta_max, 1.0), strict=True):
            assert a.dtype == torch.float32 and a.shape == (*shape[:2], heads)
            if proj is None:  # no such projection (OSDNAttention makes none it does not use)
                assert torch.equal(a, b)  # the constant 0 or 1
            else:
                # The sigmoid's slope is at most 1/4; the logits differ by at most eps times a
                # size, from each path (bound: twice that). In float32 each path sums the products
                # in its own order (PyTorch's depends on the CPU), within eps of their magnitudes'
                # sum; in 16 bits each rounds the projection once, an ulp of it.
                w, bias = proj.weight.float(), None if proj.bias is None else proj.bias.float()
                if dtype == torch.float32:
                    size = F.linear(x.float().abs(), w.abs(), None if bias is None else bias.abs())
                else:
                    size = F.linear(x.float(), w, bias).abs().clamp_min(1.0)
                bound = scale * 0.25 * 2 * torch.finfo(dtype).eps * size
                assert ((a - b).abs() <= bound).all(), ((a - b).abs() / bound).max()
        assert ref[0].std() > 0.05 and (ref[1].std() > 0.05) == attn.use_precond
        assert (ref[2].std() > 0.05) == attn.use_apf
    many = torch.randn(1, gates.MAX_ROWS + 1, hidden, device=device, dtype=dtype)
    with torch.no_grad():
        attn.gates(many, step=True)
        with torch.autocast(device, dtype=torch.float16):
            attn.gates(x, step=True)
    attn.gates(x, step=True)  # gradients enabled
    # a weight that is a tensor subclass (quantized, distributed): its storage is not its dtype's
    attn.b_proj.weight = torch.nn.Parameter(attn.b_proj.weight.detach().as_subclass(_Subclass), requires_grad=False)
    with torch.no_grad():
        attn.gates(x, step=True)
    assert not launched


def test_gates_step_kernel_in_cached_decoding(monkeypatch):
    """Cached decoding takes the gates' kernel in each layer's step (Triton's interpreter here,
    CUDA on a GPU), and its logits are those of the same decoding with the PyTorch gates and of
    one full forward (SPEC section 7, float32, 1e-4): on a GPU, the kernels' decoding path."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    from osdn_hf.layers import osdn_attention
    from osdn_hf.ops import gates

    device, launched = _step_kernels(monkeypatch, gates)
    model = tiny_model().to(device)
    ids = torch.randint(1, 97, (2, 4), device=device)

    def decode():
        with torch.no_grad():
            out = model(ids[:, :3], use_cache=True)
            return model(ids[:, 3:], past_key_values=out.past_key_values, use_cache=True).logits

    logits = decode()
    assert launched == [gates.gates_step_kernel] * model.config.num_hidden_layers
    with torch.no_grad():
        full = model(ids).logits[:, 3:]
    torch.testing.assert_close(logits, full, atol=LOGITS_ATOL, rtol=0)
    monkeypatch.setattr(osdn_attention, "gates_step_applies", lambda *a: False)
    torch.testing.assert_close(logits, decode(), atol=LOGITS_ATOL, rtol=0)
    assert len(launched) == model.config.num_hidden_layers


@pytest.mark.parametrize("dtype", GATE_CASES)
def test_silu_mul_kernel_matches_torch(monkeypatch, dtype):
    """The MLP's `silu(gate) * up` in one kernel (`silu_mul`; Triton's interpreter here, CUDA on a
    GPU) gives `F.silu(gate) * up`: on a GPU the same bits (libdevice's expf, a rounded division);
    interpreted, exp is numpy's, not PyTorch's, and an ulp of it and the two roundings after it
    leave the product within 3 eps (relative; 2.6 eps seen in float32, 1.1 in float16). 1500 elements
    leave part of the second block unused; gradients wanted, float64, mixed dtypes and
    broadcasting stay in PyTorch."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    from osdn_hf.ops import swiglu

    device, launched = _step_kernels(monkeypatch, swiglu)
    torch.manual_seed(0)
    for shape in ((3, 1, 64), (2, 3, 250), (0, 1, 64)):
        gate = (4 * torch.randn(*shape, device=device)).to(dtype)
        up = torch.randn(*shape, device=device, dtype=dtype)
        assert swiglu.silu_mul_applies(gate, up)
        y = swiglu.silu_mul(gate, up)
        ref = F.silu(gate) * up
        assert launched == ([swiglu.silu_mul_kernel] if gate.numel() else []) and y.dtype == dtype
        launched.clear()
        if device == "cuda":
            assert torch.equal(y, ref)
        else:
            eps = torch.finfo(dtype).eps
            assert ((y.float() - ref.float()).abs() <= 3 * eps * ref.float().abs()).all()
            assert (y != 0).sum() >= gate.numel() - 2
    gate = torch.randn(2, 5, 8, device=device, requires_grad=True)
    up = torch.randn(2, 5, 8, device=device)
    assert not swiglu.silu_mul_applies(gate, up)  # gradients wanted
    with torch.no_grad():
        assert swiglu.silu_mul_applies(gate, up)
        assert not swiglu.silu_mul_applies(gate.double(), up.double())
        assert not swiglu.silu_mul_applies(gate, up.half())
        assert not swiglu.silu_mul_applies(gate, up[:, :1])  # broadcast
        assert not swiglu.silu_mul_applies(gate.transpose(1, 2), up.transpose(1, 2))  # not contiguous


def test_silu_mul_kernel_in_the_model(monkeypatch):
    """Without gradients every layer's MLP takes the kernel for a prompt of more rows than
    `linear_step` takes (Triton's interpreter here, CUDA on a GPU), and `swiglu_step` for a
    cached step's few; the logits are those of the PyTorch MLP (a forward with gradients) within
    SPEC section 7's float32 1e-4."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    from osdn_hf.ops import linear_step, swiglu

    device, launched = _step_kernels(monkeypatch, swiglu)
    model = tiny_model().to(device)
    layers = model.config.num_hidden_layers
    T = linear_step.MAX_ROWS // 2 + 1  # two sequences: more rows than MAX_ROWS
    ids = torch.randint(1, 97, (2, T + 1), device=device)
    with torch.no_grad():
        out = model(ids[:, :T], use_cache=True)
        assert launched == [swiglu.silu_mul_kernel] * layers
        step = model(ids[:, T:], past_key_values=out.past_key_values, use_cache=True).logits
    assert launched == [swiglu.silu_mul_kernel] * layers  # the step's MLPs: swiglu_step
    full = model(ids).logits  # gradients enabled: the PyTorch MLP
    assert len(launched) == layers and full.requires_grad
    torch.testing.assert_close(out.logits, full[:, :T], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(step, full[:, T:], atol=LOGITS_ATOL, rtol=0)


def _products_bound(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far two float32 sums of `x w^T` in other orders, each rounded once to dtype, may
    part: an ulp of the result (16-bit) plus twice eps32 times the products' magnitudes."""
    xf, wf = x.float(), w.float()
    rounding = torch.finfo(dtype).eps * F.linear(xf, wf).abs() if dtype != torch.float32 else 0.0
    return rounding + 2 * torch.finfo(torch.float32).eps * F.linear(xf.abs(), wf.abs())


@pytest.mark.parametrize("dtype", GATE_CASES)
def test_linear_step_kernels_match_torch(monkeypatch, dtype):
    """A few rows through up to three weights in one launch (`linear_step`) and the MLP's gate
    and up projections with `silu(gate) * up` in one (`swiglu_step`) give the modules' results
    (Triton's interpreter here, CUDA on a GPU): each product within what its float32 sums in
    another order and its rounding allow, the SwiGLU within what those move it by its slopes.
    300 columns and 40 or 100 features leave blocks part-used; weights of three widths share a
    launch. More rows, gradients wanted, a bias, a hook, a subclass, autocast or another dtype
    stay with the modules."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    from osdn_hf.ops import linear_step as ls

    device, launched = _step_kernels(monkeypatch, ls)
    torch.manual_seed(0)
    K = 300
    linears = [torch.nn.Linear(K, N, bias=False).to(device, dtype) for N in (40, 100, 72)]
    for rows in ((1, 1), (3, 1), (2, 8)):
        x = torch.randn(*rows, K, device=device, dtype=dtype)
        with torch.no_grad():
            assert ls.linear_step_applies(x, linears)
            ys = ls.linear_step(x, linears)
            for y, m in zip(ys, linears, strict=True):
                ref = m(x)
                assert y.shape == ref.shape and y.dtype == dtype
                assert ((y.float() - ref.float()).abs() <= _products_bound(x, m.weight, dtype)).all()
            gate, up = linears[1], torch.nn.Linear(K, 100, bias=False).to(device, dtype)
            y = ls.swiglu_step(x, gate, up)
            g, u = gate(x).float(), up(x).float()
            ref = F.silu(gate(x)) * up(x)
            # each of g and u may part by its bound; silu's slope is sigmoid(g)(1 + g(1 - sigmoid(g)))
            sg = torch.sigmoid(g)
            slope = (sg * (1 + g * (1 - sg))).abs()
            bound = slope * _products_bound(x, gate.weight, dtype) * u.abs() + F.silu(g).abs() * _products_bound(
                x, up.weight, dtype
            )
            bound = 1.01 * bound + 3 * torch.finfo(dtype).eps * ref.float().abs()
            assert y.shape == ref.shape and ((y.float() - ref.float()).abs() <= bound).all()
            assert not torch.equal(y, torch.zeros_like(y))
        assert launched == [ls.linear_step_kernel, ls.swiglu_step_kernel]
        launched.clear()
    x = torch.randn(2, 8, K, device=device, dtype=dtype)
    assert not ls.linear_step_applies(x, linears)  # gradients wanted
    with torch.no_grad():
        assert not ls.linear_step_applies(torch.randn(17, K, device=device, dtype=dtype), linears)
        assert not ls.linear_step_applies(x.double(), linears)  # x and the weights' dtypes differ
        float64 = torch.nn.Linear(K, 8, bias=False, device=device, dtype=torch.float64)
        assert not ls.linear_step_applies(x.double(), [float64])
        with_bias = torch.nn.Linear(K, 8).to(device, dtype)
        assert not ls.linear_step_applies(x, [with_bias])

        class Sub(torch.nn.Linear):
            pass

        assert not ls.linear_step_applies(x, [Sub(K, 8, bias=False).to(device, dtype)])
        quantized = torch.nn.Linear(K, 8, bias=False).to(device, dtype)  # a weight that is a tensor subclass
        quantized.weight = torch.nn.Parameter(quantized.weight.detach().as_subclass(_Subclass), requires_grad=False)
        assert not ls.linear_step_applies(x, [quantized])
        handle = linears[0].register_forward_hook(lambda *a: None)
        assert not ls.linear_step_applies(x, linears)
        handle.remove()
        assert ls.linear_step_applies(x, linears)
        with torch.autocast(device, dtype=torch.float16):
            assert not ls.linear_step_applies(x, linears)


@pytest.mark.parametrize("dtype", GATE_CASES)
def test_norm_linear_step_kernel_matches_torch(monkeypatch, dtype):
    """A layer's per-head output norm and output projection in one launch (`norm_linear_step`;
    Triton's interpreter here, CUDA on a GPU) give `o_proj(F.rms_norm(x, (G,), g).flatten(-2))`:
    within what the projection's float32 sums in another order allow, plus an ulp (16-bit; a few
    float32 eps in float32) of each normalised input, where the two root mean squares' sums part.
    Heads of 32 and 64 wide, 40 features (a part-used block), steps of whole heads whose last is
    part-used (3 heads in a step of 4; 20 in two of 16); a norm weight not in x's dtype,
    a width that is not a power of 2, more rows or gradients wanted stay with the modules."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    from osdn_hf.ops import linear_step as ls

    device, launched = _step_kernels(monkeypatch, ls)
    torch.manual_seed(0)
    for rows, H, G in (((1, 1), 3, 32), ((3, 1), 2, 64), ((2, 8), 4, 32), ((1, 1), 20, 32)):
        x = 3 * torch.randn(*rows, H, G, device=device, dtype=dtype)
        g = (1 + 0.5 * torch.randn(G, device=device)).to(dtype)
        proj = torch.nn.Linear(H * G, 40, bias=False).to(device, dtype)
        with torch.no_grad():
            assert ls.norm_linear_step_applies(x, g, proj)
            y = ls.norm_linear_step(x, g, 1e-6, proj)
            xn = F.rms_norm(x, (G,), g, 1e-6).flatten(-2)
            ref = proj(xn)
            eps = torch.finfo(dtype).eps if dtype != torch.float32 else 4 * torch.finfo(dtype).eps
            bound = _products_bound(xn, proj.weight, dtype) + eps * F.linear(
                xn.float().abs(), proj.weight.float().abs()
            )
            assert y.shape == ref.shape and y.dtype == dtype
            assert ((y.float() - ref.float()).abs() <= bound).all()
            assert not torch.equal(y, torch.zeros_like(y))
        assert launched == [ls.norm_linear_step_kernel]
        launched.clear()
    x = torch.randn(2, 1, 2, 32, device=device, dtype=dtype)
    g = torch.ones(32, device=device, dtype=dtype, requires_grad=True)
    proj = torch.nn.Linear(64, 8, bias=False).to(device, dtype)
    assert not ls.norm_linear_step_applies(x, g, proj)  # gradients wanted
    with torch.no_grad():
        assert ls.norm_linear_step_applies(x, g, proj)
        assert not ls.norm_linear_step_applies(x, g.double(), proj)
        assert not ls.norm_linear_step_applies(x.view(2, 1, 4, 16), g, proj)  # the norm is 32 wide
        wide = torch.nn.Linear(72, 8, bias=False).to(device, dtype)
        assert not ls.norm_linear_step_applies(torch.randn(2, 1, 3, 24, device=device, dtype=dtype), g[:24], wide)
        assert not ls.norm_linear_step_applies(torch.randn(17, 1, 2, 32, device=device, dtype=dtype), g, proj)


def test_linear_step_kernels_in_the_model(monkeypatch):
    """Without gradients, a prompt of a few tokens and each cached step project q, k and v in one
    launch a layer, normalise and project its output in one and run the MLP's gate, up and SiLU in
    one (Triton's interpreter here, CUDA on a GPU); the logits are those of the modules (a forward
    with gradients) within SPEC section 7's float32 1e-4. A LoRA-like wrapper on q_proj (a hook)
    leaves that layer's q, k and v to the modules."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    from osdn_hf.ops import linear_step as ls

    device, launched = _step_kernels(monkeypatch, ls)
    model = tiny_model().to(device)
    layers = model.config.num_hidden_layers
    ids = torch.randint(1, 97, (2, 5), device=device)
    with torch.no_grad():
        out = model(ids[:, :3], use_cache=True)
        step = model(ids[:, 3:4], past_key_values=out.past_key_values, use_cache=True).logits
    layer = [ls.linear_step_kernel, ls.norm_linear_step_kernel, ls.swiglu_step_kernel]
    assert launched == layer * (2 * layers)
    launched.clear()
    full = model(ids[:, :4]).logits  # gradients enabled: the modules
    assert not launched and full.requires_grad
    torch.testing.assert_close(out.logits, full[:, :3], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(step, full[:, 3:], atol=LOGITS_ATOL, rtol=0)
    model.model.layers[0].attn.q_proj.register_forward_hook(lambda *a: None)
    with torch.no_grad():
        model(ids[:, :3])
    assert launched == layer[1:] + layer * (layers - 1)


def _cached_step_against_modules(model, device):
    """A cached one-token step without gradients (the step kernels where they apply) and the
    same token in a forward with gradients (every module's own forward), as logits."""
    ids = torch.randint(1, 97, (2, 5), device=device)
    with torch.no_grad():
        out = model(ids[:, :4], use_cache=True)
        step = model(ids[:, 4:], past_key_values=out.past_key_values, use_cache=True).logits
    return step, model(ids).logits[:, 4:]


def test_step_kernels_leave_adapters_and_hooks_to_the_modules(monkeypatch):
    """A decoding step's kernels read weights directly, so they must not stand in for a module
    that computes more than its weight: a PEFT LoRA on every linear layer ("all-linear": the
    gates' projections too) and forward hooks that change a short convolution's and the output
    norm's results. The cached step still gives the modules' logits (Triton's interpreter here,
    CUDA on a GPU), within SPEC section 7's float32 1e-4."""
    pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    peft = pytest.importorskip("peft", reason="PEFT is in the test extra; install osdn-hf[test]")
    from osdn_hf.ops import gates

    device, launched = _step_kernels(monkeypatch, gates)
    base = tiny_model().to(device)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    adapted = [n for n, _ in model.named_parameters() if "lora_B" in n]
    assert all(any(f"attn.{g}.lora_B" in n for n in adapted) for g in ("b_proj", "eta_proj", "apf_proj"))
    step, full = _cached_step_against_modules(model, device)
    torch.testing.assert_close(step, full, atol=LOGITS_ATOL, rtol=0)
    assert not launched  # every layer's gates are adapted
    plain = tiny_model().to(device)
    attn = plain.model.layers[0].attn
    attn.k_conv1d.register_forward_hook(lambda m, args, out: (2 * out[0], out[1]))
    attn.o_norm.register_forward_hook(lambda m, args, out: -out)
    step, full = _cached_step_against_modules(plain, device)
    torch.testing.assert_close(step, full, atol=LOGITS_ATOL, rtol=0)
    assert launched == [gates.gates_step_kernel] * plain.config.num_hidden_layers  # the gates are plain


def test_rms_norm_is_its_formula():
    """`RMSNorm` (`F.rms_norm` where x and the weight share a dtype, the float32 formula where
    they do not) gives the formula's values and gradients, in x's dtype."""
    torch.manual_seed(0)
    for x_dtype, w_dtype in [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ]:
        norm = RMSNorm(16, eps=1e-5).to(w_dtype)
        with torch.no_grad():
            norm.weight.normal_()
        x = torch.randn(3, 5, 16, dtype=x_dtype, requires_grad=True)
        y = norm(x)
        xf = x.float()
        ref = (norm.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))).to(x_dtype)
        assert y.dtype == x_dtype
        tol = dict(rtol=0, atol=1e-6) if x_dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(y, ref, **tol)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
        rx, rw = torch.autograd.grad(ref, (x, norm.weight), g)
        torch.testing.assert_close(gx, rx, **tol)
        torch.testing.assert_close(gw, rw, **(tol if w_dtype == torch.float32 else dict(rtol=1.6e-2, atol=5e-2)))

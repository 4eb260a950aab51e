"""Layer and model: padding, packing, cached decoding, generation, config validation, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DataCollatorWithFlattening

from osdn_hf import OSDNCache, OSDNConfig, OSDNForCausalLM, OSDNModel
from osdn_hf.layers.modules import RMSNorm, ShortConvolution
from osdn_hf.modeling_osdn import CACHE_FIELD, output_cache
from osdn_hf.ops.osdn import utils

REPO = Path(__file__).resolve().parents[1]
# SPEC section 7: cached decoding equals one full forward within float32 1e-4.
LOGITS_ATOL = 1e-4


def tiny_config(**overrides) -> OSDNConfig:
    kwargs = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, pad_token_id=0)
    kwargs.update(overrides)
    return OSDNConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> OSDNForCausalLM:
    torch.manual_seed(seed)
    model = OSDNForCausalLM(tiny_config(**overrides)).eval()
    # Trained-like gates: random biases so beta, eta and lam vary per head and token.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in ("eta_proj", "apf_proj"):
                if hasattr(layer.attn, proj):
                    getattr(layer.attn, proj).weight.normal_(0, 0.3)
            layer.attn.b_proj.weight.normal_(0, 0.3)
    return model


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("osdn", vocab_size=50, hidden_size=32, num_hidden_layers=1, num_heads=2)
    assert isinstance(config, OSDNConfig)
    assert isinstance(AutoModel.from_config(config), OSDNModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), OSDNForCausalLM)


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


@pytest.mark.parametrize("preconditioner", ["osdn", "none"])
@pytest.mark.parametrize("prefill", [1, 7, 70])
def test_cached_decoding_equals_full_forward(prefill, preconditioner):
    """Prefill (chunked op when > 64 tokens, recurrent otherwise), then token by token."""
    model = tiny_model(preconditioner=preconditioner)
    ids = torch.randint(1, 97, (3, prefill + 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        assert isinstance(cache, OSDNCache) and cache.get_seq_length() == prefill
        prefilled = cache.get_layer_state(0)
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=LOGITS_ATOL, rtol=0)
    state = cache.get_layer_state(0)
    # decoding without autograd updated the prefill's state tensors in place
    assert state["recurrent_state"] is prefilled["recurrent_state"]
    assert state["precond_state"] is prefilled["precond_state"]
    assert all(a is b for a, b in zip(state["conv_state"], prefilled["conv_state"], strict=True))
    assert state["recurrent_state"].shape == (3, 2, 16, 16) and state["recurrent_state"].dtype == torch.float32
    assert state["precond_state"].shape == (3, 2, 16)
    assert [c.shape for c in state["conv_state"]] == [(3, 32, 3)] * 3


def test_left_padding_equals_unpadded_runs():
    model = tiny_model()
    prompts = [torch.randint(1, 97, (n,)) for n in (9, 4, 1)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            alone = model(p[None]).logits
            torch.testing.assert_close(padded[i, width - len(p) :], alone[0], atol=LOGITS_ATOL, rtol=0)


def test_model_packs_padding_once_for_all_layers(monkeypatch):
    """The model drops a mask of ones and packs a padded batch once: every layer gets the same
    `cu_seqlens` tensor and no mask (each layer used to ask the GPU whether the mask pads, and
    pack again). Real tokens get the unpadded logits; padding comes out as zeros."""
    model = tiny_model()
    seen = []
    for layer in model.model.layers:
        layer.attn.register_forward_pre_hook(
            lambda m, a, kw: seen.append((kw.get("attention_mask"), kw.get("cu_seqlens"), a[0].shape)),
            with_kwargs=True,
        )
    host_copies, original = [], utils._Varlen.__init__
    monkeypatch.setattr(utils._Varlen, "__init__", lambda self, cu: host_copies.append(cu) or original(self, cu))
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        plain = model(ids).logits
        ones = model(ids, attention_mask=torch.ones(2, 6, dtype=torch.long)).logits
        assert seen == [(None, None, (2, 6, 32))] * 4
        seen.clear()
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, :2] = 0
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert len(seen) == 2 and all(m is None and shape == (1, 10, 32) for m, _, shape in seen)
    assert seen[0][1] is seen[1][1] and seen[0][1].tolist() == [0, 6, 10]
    assert len(host_copies) == 1  # three convolutions and the op in each of two layers: one copy
    torch.testing.assert_close(ones, plain, atol=0, rtol=0)
    torch.testing.assert_close(out.logits[0], plain[0], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.logits[1, 2:], model(ids[1:, 2:]).logits[0], atol=LOGITS_ATOL, rtol=0)
    assert len(out.hidden_states) == 3 and not out.logits[1, :2].any()
    for h in out.hidden_states:
        assert h.shape == (2, 6, 32) and not h[1, :2].any() and h[1, 2:].abs().sum(-1).min() > 0
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids[:1], attention_mask=mask[1:], cu_seqlens=torch.tensor([0, 3, 6]))


def test_padding_does_not_write_state():
    """Pads anywhere (not only on the left) neither read nor write the recurrent state."""
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 3:6] = 0
    with torch.no_grad():
        holes = model(ids, attention_mask=mask, use_cache=True)
        real = ids[:, mask[0].bool()]
        dense = model(real, use_cache=True)
    torch.testing.assert_close(holes.logits[:, mask[0].bool()], dense.logits, atol=LOGITS_ATOL, rtol=0)
    for layer in range(2):
        a, b = holes.past_key_values.get_layer_state(layer), dense.past_key_values.get_layer_state(layer)
        torch.testing.assert_close(a["recurrent_state"], b["recurrent_state"])
        torch.testing.assert_close(a["precond_state"], b["precond_state"])


def test_packed_cu_seqlens_equal_separate_sequences():
    model = tiny_model()
    a, b = torch.randint(1, 97, (1, 13)), torch.randint(1, 97, (1, 70))
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 13, 83])).logits
        torch.testing.assert_close(packed[:, :13], model(a).logits, atol=LOGITS_ATOL, rtol=0)
        torch.testing.assert_close(packed[:, 13:], model(b).logits, atol=LOGITS_ATOL, rtol=0)


def test_packed_labels_do_not_cross_sequences():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 20))
    cu = torch.tensor([0, 8, 20])
    loss = model(ids, labels=ids, cu_seqlens=cu).loss
    logits = model(ids, cu_seqlens=cu).logits
    targets = torch.cat([ids[0, 1:8], ids[0, 9:20]])
    expected = torch.nn.functional.cross_entropy(torch.cat([logits[0, :7], logits[0, 8:19]]), targets)
    torch.testing.assert_close(loss, expected)


def test_generate_greedy_sampling_and_beam_search():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    no_cache = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0
    )
    assert torch.equal(greedy, no_cache)
    # Greedy decoding by hand, one full forward per token.
    seq = ids
    for _ in range(8):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(greedy, seq)

    torch.manual_seed(1)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(1)
    again = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (2, 14) and torch.equal(sampled, again)

    beams = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    beams_no_cache = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False, pad_token_id=0
    )
    assert torch.equal(beams, beams_no_cache)


def test_decoding_with_autograd_makes_new_states():
    """With autograd on, a decoding step leaves the states it read as they were (autograd may
    need them) and returns new ones."""
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).past_key_values
    before = {k: v if k != "conv_state" else tuple(v) for k, v in cache.get_layer_state(0).items()}
    saved = {k: v.clone() if k != "conv_state" else tuple(c.clone() for c in v) for k, v in before.items()}
    model(ids[:, 4:], past_key_values=cache, use_cache=True)
    after = cache.get_layer_state(0)
    assert after["recurrent_state"] is not before["recurrent_state"]
    assert all(a is not b for a, b in zip(after["conv_state"], before["conv_state"]))
    torch.testing.assert_close(before["recurrent_state"], saved["recurrent_state"], rtol=0, atol=0)
    for a, b in zip(before["conv_state"], saved["conv_state"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(after["conv_state"][0], saved["conv_state"][0])


def _greedy(model, ids, cache=None, steps=6):
    """Greedy decoding by hand from `cache` (or a prefill of `ids`): the tokens and every step's logits."""
    with torch.no_grad():
        if cache is None:
            out = model(ids, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        else:
            tok = ids[:, -1:]
        tokens, logits = [], []
        for _ in range(steps):
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(tok)
            logits.append(out.logits)
    return torch.cat(tokens, 1), torch.cat(logits, 1), cache


def test_cuda_graph_decoding_off_the_gpu_changes_nothing():
    """`cuda_graph_decoding` only acts on CUDA inputs: here decoding is eager, gives the same
    logits and captures nothing; the setting is saved with the config."""
    from osdn_hf.modeling_osdn import _DECODE_GRAPHS

    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    tokens, logits, _ = _greedy(model, ids)
    model.config.cuda_graph_decoding = True
    tokens_g, logits_g, _ = _greedy(model, ids)
    assert torch.equal(tokens, tokens_g) and torch.equal(logits, logits_g)
    assert model not in _DECODE_GRAPHS
    assert OSDNConfig.from_dict(model.config.to_dict()).cuda_graph_decoding is True
    assert OSDNConfig().cuda_graph_decoding is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (this machine has none)")
def test_cuda_graph_decoding_equals_eager_decoding():
    """On a GPU, steps replayed from CUDA graphs give eager decoding's logits and states, bit for
    bit: for generate, for two caches decoded in turn, at two batch sizes, and again after a
    module is swapped (the graphs are captured anew)."""
    from osdn_hf.modeling_osdn import _DECODE_GRAPHS

    model = tiny_model().cuda()
    ids = torch.randint(1, 97, (3, 5), device="cuda")
    eager = [_greedy(model, ids[:n]) for n in (3, 1)]
    model.config.cuda_graph_decoding = True
    graphed = [_greedy(model, ids[:n]) for n in (3, 1)]
    assert len(_DECODE_GRAPHS[model].graphs) == 2
    for (tok, lg, cache), (tok_g, lg_g, cache_g) in zip(eager, graphed):
        assert torch.equal(tok, tok_g) and torch.equal(lg, lg_g)
        for layer, layer_g in zip(cache.layers, cache_g.layers):
            assert torch.equal(layer.recurrent_state, layer_g.recurrent_state)
            assert torch.equal(layer.precond_state, layer_g.precond_state)
            assert all(torch.equal(a, b) for a, b in zip(layer.conv_state, layer_g.conv_state))
    # two caches in turn: each goes on from its own state
    _, _, a = _greedy(model, ids[:1], steps=1)
    _, _, b = _greedy(model, ids[1:2], steps=1)
    turns = [_greedy(model, ids[i : i + 1, :1], cache=c, steps=2)[1] for i, c in ((0, a), (1, b), (0, a))]
    model.config.cuda_graph_decoding = False
    _, _, a2 = _greedy(model, ids[:1], steps=1)
    _, _, b2 = _greedy(model, ids[1:2], steps=1)
    eager_turns = [_greedy(model, ids[i : i + 1, :1], cache=c, steps=2)[1] for i, c in ((0, a2), (1, b2), (0, a2))]
    assert all(torch.equal(x, y) for x, y in zip(turns, eager_turns))
    # the same two caches on two streams at once: each stream replays graphs of its own
    model.config.cuda_graph_decoding = True
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    on_streams = []
    for i, (c, s) in enumerate(zip((a, b), streams)):
        with torch.cuda.stream(s):
            on_streams.append(_greedy(model, ids[i : i + 1, :1], cache=c, steps=3)[1])
    torch.cuda.synchronize()
    model.config.cuda_graph_decoding = False
    alone = [_greedy(model, ids[i : i + 1, :1], cache=c, steps=3)[1] for i, c in ((0, a2), (1, b2))]
    assert all(torch.equal(x, y) for x, y in zip(on_streams, alone))
    # generate: greedy, beam search (the cache reordered between steps) and sampling
    for extra in (dict(do_sample=False), dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=20)):
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, pad_token_id=0, attention_mask=torch.ones_like(ids), **extra)
        outs = []
        for flag in (True, False):
            model.config.cuda_graph_decoding = flag
            torch.manual_seed(3)
            outs.append(model.generate(ids, **kwargs))
        assert torch.equal(*outs), extra

    # float64 convolution inputs in a cache: a step cannot update them in place, so that layout
    # decodes eagerly (the next, in float32, from a graph); the same logits as eager decoding
    def doubled():
        _, _, c = _greedy(model, ids[:2], steps=1)
        for layer in c.layers:
            layer.conv_state = tuple(x.double() for x in layer.conv_state)
        return c

    model.config.cuda_graph_decoding = True
    lg_g = _greedy(model, ids[:2], cache=doubled(), steps=3)[1]
    assert None in _DECODE_GRAPHS[model].graphs.values()
    model.config.cuda_graph_decoding = False
    assert torch.equal(lg_g, _greedy(model, ids[:2], cache=doubled(), steps=3)[1])
    # a new output head: captured again, and its logits are the new head's
    model.lm_head = torch.nn.Linear(32, 97, bias=False, device="cuda")
    tok, lg, _ = _greedy(model, ids)
    model.config.cuda_graph_decoding = True
    tok_g, lg_g, _ = _greedy(model, ids)
    assert torch.equal(tok, tok_g) and torch.equal(lg, lg_g)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = tiny_model()
    prompts = [torch.randint(1, 97, (n,)) for n in (7, 3)]
    ids = torch.stack([torch.cat([torch.zeros(7 - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (ids != 0).long()
    # min_new_tokens keeps EOS out, so every row runs all 10 steps
    batch = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0
    )
    for i, p in enumerate(prompts):
        alone = model.generate(
            p[None],
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
        assert torch.equal(batch[i, 7:], alone[0, len(p) :])


def test_logits_to_keep_and_hidden_states():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, out.logits[:, -1:])
    assert len(out.hidden_states) == 3


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_model().train()
    ids = torch.randint(1, 97, (2, 20))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # transformers 5.23 renamed the method; 5.17 has only the old name
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)
    # every parameter, the preconditioner's included, gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_tied_embeddings():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()


def test_deltanet_variant_has_no_preconditioner_parameters():
    names = [n for n, _ in tiny_model(preconditioner="none").named_parameters()]
    assert not any("eta_proj" in n or "apf_proj" in n for n in names)
    no_apf = [n for n, _ in tiny_model(use_apf=False).named_parameters()]
    assert any("eta_proj" in n for n in no_apf) and not any("apf_proj" in n for n in no_apf)


def test_gate_initialisation_follows_config():
    model = tiny_model(precond_eta_init=0.3, eta_max=0.6, apf_init=0.9)
    attn = model.model.layers[0].attn
    x = torch.zeros(1, 1, 32)
    _, eta, lam = attn.gates(x)
    torch.testing.assert_close(eta, torch.full_like(eta, 0.3))
    torch.testing.assert_close(lam, torch.full_like(lam, 0.9))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_heads", 3, "divisible by num_heads"),
        ("hidden_size", 0, "`hidden_size` must be a positive integer"),
        ("preconditioner", "adam", "`preconditioner` must be one of"),
        ("precond_eta_init", 2.5, "`precond_eta_init` must lie in"),
        ("apf_init", 1.0, "`apf_init` must lie in"),
        ("eta_max", -1.0, "`eta_max` must be positive"),
        ("conv_size", 0, "`conv_size` must be a positive integer"),
        ("norm_eps", 0.0, "`norm_eps` must be positive"),
        ("expand_k", 0.3, "`expand_k`"),
    ],
)
def test_config_rejects_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_config_rejects_head_dim_beyond_kernels():
    with pytest.raises(ValueError, match="head_k_dim = 512"):
        OSDNConfig(hidden_size=1024, num_heads=2)


def test_generate_continues_from_its_own_cache():
    """A second turn: generate again on the first turn's output plus new tokens, handing back the
    cache the first generate returned (under this transformers' name); the tokens equal a fresh
    generate over the whole text, which the cache spares re-reading."""
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 6))
    first = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = output_cache(first)
    assert isinstance(cache, OSDNCache) and cache.get_seq_length() == first.sequences.shape[1] - 1
    more = torch.cat([first.sequences, torch.randint(1, 97, (1, 3))], 1)
    continued = model.generate(more, max_new_tokens=4, do_sample=False, pad_token_id=0, **{CACHE_FIELD: cache})
    assert torch.equal(continued, model.generate(more, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_bad_model_inputs_raise_value_error():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    with pytest.raises(ValueError, match="exactly one of"):
        model(ids, inputs_embeds=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="padding mask"):
        model(ids, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="OSDNCache"):
        model(ids, past_key_values=((torch.zeros(1),),), use_cache=True)
    cache = output_cache(model(ids, use_cache=True))
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=cache, past_key_values=cache)
    with pytest.raises(ValueError, match="`cu_seqlens` is on meta"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 2, 5], device="meta"))


def test_malformed_inputs_are_named_before_any_layer_runs():
    """Inputs of the wrong rank, width or length, masks or `position_ids` that do not cover the
    input, `cu_seqlens` that does not pack it and a cache of another batch each raise a
    `ValueError` that names them, where torch's own errors (from the embedding, a norm, the
    convolution's padding, an index copy) said nothing of which input was wrong, or a mask of
    ones was silently dropped. The cache is left as it was."""
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    cache = output_cache(model(ids, use_cache=True))
    before = [cache.get_layer_state(i)["recurrent_state"].clone() for i in range(2)]
    cases = [
        (dict(input_ids=ids[0]), r"`input_ids` must be integer token ids \[batch, seq_len\], got shape \(5,\)"),
        (dict(input_ids=ids.float()), r"got shape \(2, 5\) and dtype torch.float32"),
        (dict(inputs_embeds=torch.zeros(2, 5, 16)), r"hidden_size = 32\], got shape \(2, 5, 16\)"),
        (dict(input_ids=ids[:, :0]), r"no tokens: shape \(2, 0\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long)), r"got shape \(2, 4\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(3, 5, dtype=torch.long)), r"batch = 2 .* got shape \(3, 5\)"),
        (dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 2, 4])), r"rise from 0 to T = 5, got \[0, 2, 4\]"),
        (dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 3, 2, 5])), r"rise from 0 to T = 5"),
        (dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0.0, 5.0])), r"1-D int64 .* dtype torch.float32"),
        (dict(input_ids=ids, cu_seqlens=torch.tensor([0, 2, 5])), r"B = 1, got input_ids of shape \(2, 5\)"),
        (dict(input_ids=ids[:1, :1], cache=cache, use_cache=True), r"states of 2 sequences, but the input has 1"),
        (dict(input_ids=ids[:1], cache=cache, cu_seqlens=torch.tensor([0, 5])), r"states of 2 sequences, .* has 1"),
        (dict(input_ids=ids[:1], position_ids=torch.arange(4)[None]), r"\(1, 5\) for this input, got shape \(1, 4\)"),
        (dict(input_ids=ids[0], position_ids=torch.arange(5)[None]), r"`input_ids` must be integer token ids"),
        (dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 5]), cu_seq_lens_q=torch.tensor([0, 5])), "not both"),
    ]
    with torch.no_grad():
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=message):
                model(**kwargs)
    assert all(torch.equal(cache.get_layer_state(i)["recurrent_state"], before[i]) for i in range(2))
    # A layer called alone checks what it is given too.
    attn = model.model.layers[0].attn
    with pytest.raises(ValueError, match=r"B = 1, got hidden_states of shape \(2, 5, 32\)"):
        attn(torch.zeros(2, 5, 32), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="states of 2 sequences, but the input has 3"):
        attn(torch.zeros(3, 1, 32), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_padding_free_collator_packs_sequences(flash_kwargs):
    """transformers' `DataCollatorWithFlattening` packs a batch into one row and marks where each
    sequence begins by restarting `position_ids` (and, when asked, with the flash-attention
    offsets `cu_seq_lens_q`): the state resets there, so logits, loss and gradients are those of
    each sequence alone, on the Triton kernels where a GPU is present. (Before, the model read
    neither and carried the state across.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model().to(device)
    seqs = [torch.randint(1, 97, (n,)).tolist() for n in (5, 9, 3)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(
        [{"input_ids": s, "labels": s} for s in seqs]
    )
    assert ("cu_seq_lens_q" in batch) == flash_kwargs and "position_ids" in batch
    packed = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    packed.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = [model(torch.tensor([s], device=device), labels=torch.tensor([s], device=device)) for s in seqs]
    torch.testing.assert_close(packed.logits[0], torch.cat([a.logits[0] for a in alone]), atol=1e-5, rtol=1e-5)
    counted = [len(s) - 1 for s in seqs]  # each sequence's first token predicts nothing before it
    loss = sum(a.loss * n for a, n in zip(alone, counted)) / sum(counted)
    torch.testing.assert_close(packed.loss, loss)
    loss.backward()
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4)


def test_position_ids_beside_a_padding_mask_pack_nothing():
    """A one-row batch with left padding and the position ids transformers derives from its mask
    (0 at the pads, then 0, 1, ...): the mask says where the tokens are, so the position ids, which
    restart there, are not read as packed sequences; the logits are those without them."""
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions).logits, plain)


def test_cache_under_either_name():
    """The cache goes in as `cache` (transformers >= 5.24, what generate passes there) or as
    `past_key_values` (before), and comes back under the installed version's output field."""
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        steps = {}
        for name in ("cache", "past_key_values"):
            cache = output_cache(model(ids[:, :8], use_cache=True))
            assert isinstance(cache, OSDNCache) and cache.get_seq_length() == 8
            steps[name] = model(ids[:, 8:], use_cache=True, **{name: cache}).logits[:, -1]
            assert cache.get_seq_length() == 9
    for name, logits in steps.items():
        torch.testing.assert_close(logits, full, atol=LOGITS_ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("name, fla_millions", [("osdn-340m", 374.4), ("osdn-1.3b", 1365.7)])
def test_published_sizes_parameter_count(name, fla_millions):
    """SPEC section 6: fla DeltaNet's count plus the preconditioner projections."""
    config = AutoConfig.from_pretrained(REPO / "configs" / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    L, H, D = config.num_hidden_layers, config.num_heads, config.hidden_size
    precond = L * 2 * (H * D + H)  # eta_proj and apf_proj, weights and biases
    assert round((total - precond) / 1e6, 1) == fla_millions
    assert precond / 1e6 == pytest.approx({"osdn-340m": 0.4, "osdn-1.3b": 1.6}[name], abs=0.05)


def test_published_sizes_match_fla_deltanet_exactly():
    """fla's DeltaNet of each published size has our weights' names and shapes, less the
    preconditioner's; so does the peer the benchmarks build (`fla_deltanet_kwargs`)."""
    from osdn_hf.throughput import fla_deltanet_kwargs

    fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention (the test extra) is not installed")
    for name in ("osdn-340m", "osdn-1.3b"):
        config = AutoConfig.from_pretrained(REPO / "configs" / name)
        fla_config = fla_models.DeltaNetConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_heads=config.num_heads,
            vocab_size=config.vocab_size,
            intermediate_size=config.intermediate_size,
            tie_word_embeddings=False,
        )
        with torch.device("meta"):
            ours = AutoModelForCausalLM.from_config(config).state_dict()
            theirs = fla_models.DeltaNetForCausalLM(fla_config).state_dict()
            peer = fla_models.DeltaNetForCausalLM(fla_models.DeltaNetConfig(**fla_deltanet_kwargs(config))).state_dict()
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items() if k in theirs}
        assert {k: v.shape for k, v in peer.items()} == {k: v.shape for k, v in theirs.items()}
        assert all("eta_proj" in k or "apf_proj" in k for k in ours if k not in theirs)


def test_tiny_config_is_the_demo_default():
    from osdn_hf.demo import DEMO_CONFIG

    saved = json.loads((REPO / "configs" / "osdn-tiny" / "config.json").read_text())
    assert {k: saved[k] for k in DEMO_CONFIG} == DEMO_CONFIG
    assert OSDNConfig(**{k: v for k, v in saved.items() if k not in ("architectures", "model_type")}).head_k_dim == 64


def test_bench_decode_conv_times_both_ways_and_restores_the_step(tmp_path):
    """scripts/bench_decode_conv.py: both ways of the step at each width, generation with each
    (the same tokens: the two ways agree), the JSON written, and `_one_step` put back after."""
    from bench_decode_conv import main

    original = ShortConvolution._one_step
    out = tmp_path / "decode_conv.json"
    result = main(
        ["--out", str(out), "--widths", "8", "--layers", "2", "--tokens", "3", "--rounds", "2", "--calls", "2"]
    )
    assert ShortConvolution._one_step is original
    assert json.loads(out.read_text()) == result
    assert set(result["step_us"]["8"]) == {"one_step", "conv1d"}
    assert all(len(x["rounds"]) == 2 and x["median"] > 0 for x in result["step_us"]["8"].values())
    assert result["generate"]["same_tokens"] and result["generate"]["layers"] == 2
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--rounds", "0"])


def test_bench_generate_times_each_way_and_plots(tmp_path):
    """scripts/bench_generate.py on the CPU: our eager generation timed per round, the GPU-only
    ways recorded as not run with the reason, the JSON and the plot written; bad counts refused."""
    from bench_generate import main

    out = tmp_path / "generate.json"
    argv = ["--config", str(REPO / "configs/osdn-tiny"), "--batch-sizes", "1", "2", "--new-tokens", "2"]
    result = main([*argv, "--rounds", "2", "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert out.with_suffix(".png").stat().st_size > 0
    assert [r["B"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert set(row["ms_per_token"]) == {"osdn_eager"}
        assert len(row["ms_per_token"]["osdn_eager"]["rounds"]) == 2 and row["ms_per_token"]["osdn_eager"]["median"] > 0
    assert set(result["skipped"]) == {"osdn_cuda_graphs", "fla_deltanet"}
    assert result["command"].startswith("python scripts/bench_generate.py")
    with pytest.raises(SystemExit):
        main([*argv, "--rounds", "0", "--out", str(out)])

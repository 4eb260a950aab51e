"""Run flash-linear-attention's DeltaNetForCausalLM on a CPU without a GPU.

fla's kernels autotune over several configs, which Triton cannot do without a GPU. This
context manager swaps each kernel fla's DeltaNet model calls for its plain-PyTorch definition
(fla's own `delta_rule_recurrence` for the delta rule); the model code around them (which
weight goes where, the order of convolutions, norms and gates) stays fla's.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _delta_rule(
    q,
    k,
    v,
    beta,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    use_qk_l2norm_in_kernel=False,
    **unused,
):
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    if cu_seqlens is not None:
        raise NotImplementedError("the CPU stand-in covers unpacked batches only")
    if use_qk_l2norm_in_kernel:
        q, k = (x * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + 1e-6).to(x) for x in (q, k))
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731  fla's loop is [B, H, T, *]
    o, S = delta_rule_recurrence(
        t(q),
        t(k),
        t(v),
        beta.transpose(1, 2).contiguous(),
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    return o.transpose(1, 2), S


def _short_conv(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **unused):
    if cache is not None or cu_seqlens is not None or mask is not None:
        raise NotImplementedError("the CPU stand-in covers a plain forward only")
    W = self.kernel_size[0]
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), self.weight, self.bias, groups=self.hidden_size).transpose(1, 2)
    return (F.silu(y) if self.activation is not None else y), None


def _rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None:
        raise NotImplementedError("the CPU stand-in covers unfused norms only")
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    if self.weight is not None:
        y = y * self.weight.float()
    if getattr(self, "bias", None) is not None:
        y = y + self.bias.float()
    return y.to(x.dtype)


@contextlib.contextmanager
def fla_on_cpu():
    import fla.layers.delta_net as layer
    import fla.modules.mlp as mlp
    from fla.modules import RMSNorm, ShortConvolution

    saved = (
        layer.chunk_delta_rule,
        layer.fused_recurrent_delta_rule,
        mlp.swiglu,
        ShortConvolution.forward,
        RMSNorm.forward,
    )
    layer.chunk_delta_rule = layer.fused_recurrent_delta_rule = _delta_rule
    mlp.swiglu = lambda x, y: F.silu(x.float()).to(x.dtype) * y
    ShortConvolution.forward = _short_conv
    RMSNorm.forward = _rms_norm
    try:
        yield
    finally:
        (
            layer.chunk_delta_rule,
            layer.fused_recurrent_delta_rule,
            mlp.swiglu,
            ShortConvolution.forward,
            RMSNorm.forward,
        ) = saved

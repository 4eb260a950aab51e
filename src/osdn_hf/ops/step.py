"""What the one-kernel decoding steps (`gates`, `linear_step`, `short_conv`, `swiglu`) take, in one
place: their dtypes, a step's rows on Triton's device, and weights a kernel may read directly.
Each step's launching function is `torch.compiler.disable`d, as the OSDN ops' kernel paths are:
under `torch.compile` the kernels run as they are, outside the graph."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

from .osdn.utils import use_triton

STEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 stays in PyTorch


def plain_tensor(t: torch.Tensor) -> bool:
    """Whether a kernel may read t's storage as its dtype says: a `torch.Tensor` or a parameter of
    one, not a subclass (a quantized weight such as torchao's, or FSDP2's DTensor), whose dtype
    need not describe its storage."""
    return type(t.data) is torch.Tensor


def few_rows_apply(x: torch.Tensor, max_rows: int) -> bool:
    """Whether x `[..., D]` (D > 0) is a step's few rows for a kernel: Triton's device (CUDA, or
    its interpreter when forced), at most `max_rows` rows, a 16- or 32-bit float dtype, no
    autocast."""
    D = x.shape[-1]
    if not use_triton(x) or D == 0 or x.numel() // D > max_rows:
        return False
    return x.dtype in STEP_DTYPES and not torch.is_autocast_enabled(x.device.type)


def weights_apply(x: torch.Tensor, tensors: Iterable[torch.Tensor]) -> bool:
    """Whether a kernel may read each of `tensors` beside x: in x's dtype, contiguous, on x's
    device, and plain (`plain_tensor`)."""
    return all(t.dtype == x.dtype and t.is_contiguous() and t.device == x.device and plain_tensor(t) for t in tensors)


def plain_module(m: nn.Module, cls: type) -> bool:
    """Whether a kernel may stand in for m's forward: m is a `cls` (not a subclass or a wrapper,
    such as a PEFT or quantized layer, which may compute more than its weight says), without hooks
    (its own or global) or a replaced `forward` (accelerate's hooks replace it)."""
    if type(m) is not cls or m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
        return False
    return not (_module._global_forward_hooks or _module._global_forward_pre_hooks)

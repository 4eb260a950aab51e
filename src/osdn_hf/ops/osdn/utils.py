"""Input validation and variable-length packing shared by the OSDN ops.

Layout everywhere: inputs `[B, T, H, K]` / `[B, T, H, V]` / `[B, T, H]`, states
`[N, H, K, V]` and `[N, H, K]`, where `N = B`, or `N = len(cu_seqlens) - 1` for packed input.
"""

from __future__ import annotations

import os
import weakref

import torch

from .chunk_scan import HAS_TRITON

# The Triton kernels (issue 3) keep a K x V state tile in SRAM; 256 is the largest head
# dimension they tile, so the torch path enforces the same limit to keep the API identical.
MAX_HEAD_DIM = 256


def _shape(x: torch.Tensor | None) -> str:
    return "None" if x is None else str(tuple(x.shape))


def _well_formed(q, k, v, beta, eta, lam, scale, initial_state, initial_precond) -> bool:
    """Whether unpacked inputs pass every check of `check_inputs`, tested at once: True only if
    they do (any doubt, such as an argument that is not a tensor, gives False, and the full
    checks then run)."""
    tensor = torch.Tensor
    if not (isinstance(q, tensor) and isinstance(k, tensor) and isinstance(v, tensor)):
        return False
    if not (isinstance(beta, tensor) and isinstance(eta, tensor) and isinstance(lam, tensor)):
        return False
    try:
        shape = q.shape
        bth, K, v_shape = shape[:3], shape[-1], v.shape
        V = v_shape[-1]
        return (
            len(shape) == 4
            and k.shape == shape
            and len(v_shape) == 4
            and v_shape[:3] == bth
            and beta.shape == bth
            and eta.shape == bth
            and lam.shape == bth
            and q.dtype == k.dtype == v.dtype
            and q.is_floating_point()
            and beta.is_floating_point()
            and eta.is_floating_point()
            and lam.is_floating_point()
            and 1 <= K <= MAX_HEAD_DIM
            and 1 <= V <= MAX_HEAD_DIM
            and q.device == k.device == v.device == beta.device == eta.device == lam.device
            and (scale is None or scale > 0)
            and (
                initial_state is None
                or (initial_state.shape == (shape[0], shape[2], K, V) and initial_state.is_floating_point())
            )
            and (
                initial_precond is None
                or (initial_precond.shape == (shape[0], shape[2], K) and initial_precond.is_floating_point())
            )
        )
    except (AttributeError, TypeError, IndexError):
        return False


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    eta: torch.Tensor,
    lam: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    initial_precond: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> int:
    """Validate the arguments of an OSDN op and return `N`, the number of sequences.

    Raises `ValueError` naming the offending argument and the shapes involved.
    """
    # A decoding step runs these checks once a layer and token: well-formed unpacked inputs pass
    # `_well_formed` (one expression, about half the host time of the checks below); anything
    # else, or anything wrong, goes through the checks that name what is wrong.
    if cu_seqlens is None and _well_formed(q, k, v, beta, eta, lam, scale, initial_state, initial_precond):
        return q.shape[0]
    for name, x, rank in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("beta", beta, 3), ("eta", eta, 3), ("lam", lam, 3)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != rank:
            raise ValueError(f"`{name}` must have {rank} dimensions, got shape {_shape(x)}")
        if not x.is_floating_point():
            raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    shape, v_shape = q.shape, v.shape
    B, T, H, K = shape
    BTH, V = shape[:3], v_shape[3]
    if k.shape != shape:
        raise ValueError(f"`k` must have the shape of `q` [B, T, H, K] = {_shape(q)}, got {_shape(k)}")
    if v_shape[:3] != BTH:
        raise ValueError(f"`v` must be [B, T, H, V] with B, T, H = {tuple(BTH)}, got {_shape(v)}")
    for name, x in (("beta", beta), ("eta", eta), ("lam", lam)):
        if x.shape != BTH:
            raise ValueError(f"`{name}` must be [B, T, H] = {tuple(BTH)}, got {_shape(x)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM or K < 1 or V < 1:
        raise ValueError(
            f"head dims must be in [1, {MAX_HEAD_DIM}], got K={K} (q {_shape(q)}) and V={V} (v {_shape(v)})"
        )
    device = q.device
    for name, x in (("k", k), ("v", v), ("beta", beta), ("eta", eta), ("lam", lam)):
        if x.device != device:
            raise ValueError(f"`{name}` is on {x.device} but `q` is on {device}")
    if scale is not None and not scale > 0:
        raise ValueError(f"`scale` must be positive, got {scale}")

    N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q, "q")
    for name, x, want in (
        ("initial_state", initial_state, (N, H, K, V)),
        ("initial_precond", initial_precond, (N, H, K)),
    ):
        if x is None:
            continue
        if x.shape != want:
            raise ValueError(f"`{name}` must be [N, H, ...] = {want}, got {_shape(x)}")
        if not x.is_floating_point():
            raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    return N


def check_cu_seqlens(cu_seqlens: torch.Tensor, x: torch.Tensor, name: str) -> int:
    """The number of sequences `cu_seqlens` packs into `x` `[1, T, ...]` (called `name` in the
    messages), after checking that it is a 1-D int32 or int64 tensor rising from 0 to T. Raises
    `ValueError` naming what is wrong. One host copy and one pass over the offsets per tensor
    (`_Varlen`), which the ops and the short convolution read anyway."""
    B, T = x.shape[:2]
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"`cu_seqlens` must be a 1-D int64 tensor [N+1], "
            f"got shape {_shape(cu_seqlens)} and dtype {cu_seqlens.dtype}"
        )
    if B != 1:
        raise ValueError(f"`cu_seqlens` needs packed input with B = 1, got {name} of shape {_shape(x)}")
    info = _Varlen.of(cu_seqlens)
    if info.rises_to != T:
        raise ValueError(f"`cu_seqlens` must rise from 0 to T = {T}, got {info.offsets}")
    return len(info.offsets) - 1


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension (computed in float32, returned in `x.dtype`)."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


class _Varlen:
    """What the ops and the short convolution read of one `cu_seqlens` tensor, worked out once.

    A model hands every layer the same tensor, and each layer reads it four times (three
    convolutions and the op); every host copy of a GPU tensor is a wait for the GPU. The last
    tensor asked about is remembered by a weak reference and its version counter, so an in-place
    change or a new tensor at the same address is asked about afresh.
    """

    last = None  # (weak reference to cu_seqlens, its _version, _Varlen)

    def __init__(self, cu_seqlens: torch.Tensor):
        self.offsets: list[int] = cu_seqlens.tolist()
        self.index: tuple[torch.Tensor, int] | None = None
        # The T the offsets pack (they rise from 0 to it), or None: checked once, not by every layer.
        rising = (
            bool(self.offsets) and self.offsets[0] == 0 and all(b >= a for a, b in zip(self.offsets, self.offsets[1:]))
        )
        self.rises_to: int | None = self.offsets[-1] if rising else None

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor) -> _Varlen:
        last = cls.last
        if last is not None and last[0]() is cu_seqlens and last[1] == cu_seqlens._version:
            return last[2]
        info = cls(cu_seqlens)
        cls.last = (weakref.ref(cu_seqlens), cu_seqlens._version, info)
        return info


def varlen_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    """`cu_seqlens` as a list (copied to the host once per tensor, `_Varlen`)."""
    return _Varlen.of(cu_seqlens).offsets


def varlen_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map every packed token to its row in a padded `[N * L, ...]` layout.

    Returns (`dest`, `L`): `dest[i]` is `n * L + t` for packed token `i`, the `t`-th token of
    sequence `n`, and `L` is the longest sequence (at least 1). Worked out once per tensor.
    """
    info = _Varlen.of(cu_seqlens)
    if info.index is None:
        offsets, device = info.offsets, cu_seqlens.device
        L = max(max(b - a for a, b in zip(offsets, offsets[1:])), 1)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=offsets[-1])
        pos = torch.arange(offsets[-1], device=device) - cu_seqlens[:-1][seq]
        info.index = (seq * L + pos, L)
    return info.index


def pad_varlen(x: torch.Tensor, dest: torch.Tensor, N: int, L: int, fill: float = 0.0) -> torch.Tensor:
    """`[1, total, ...]` packed -> `[N, L, ...]` padded at the end with `fill` (differentiable)."""
    out = x.new_full((N * L, *x.shape[2:]), fill)
    return out.index_copy(0, dest, x[0]).view(N, L, *x.shape[2:])


def unpad_varlen(x: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """`[N, L, ...]` padded -> `[1, total, ...]` packed (differentiable)."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, dest).unsqueeze(0)


def run_padded(
    core,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    eta: torch.Tensor,
    lam: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    initial_precond: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    cast_inputs: bool = True,
    default_states: bool = True,
):
    """Validate, normalise and pack the op's arguments, run `core`, and unpack its result.

    `core(q, k, v, beta, eta, lam, scale, S0, d0) -> (o, S, d)` receives float32 tensors of
    one batch of equal-length sequences (`[N, L, H, *]`); with `cast_inputs=False`, q, k, v and
    the gates keep their dtype and the core casts them (in the same copy as its own relayout).
    The states it receives are float32 either way; with `default_states=False`, an initial state
    not given reaches it as None (the core starts from `S_0 = 0`, `d_0 = 1` without them).
    Packed sequences are padded at the end with neutral tokens (`k = v = beta = eta = 0`,
    `lam = 1`), which change neither `S` nor `d`, so the state after the padding is the state
    at each sequence's end.
    """
    N = check_inputs(q, k, v, beta, eta, lam, scale, initial_state, initial_precond, cu_seqlens)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    dtype = q.dtype
    scale = K**-0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if cast_inputs:
        q, k, v = q.float(), k.float(), v.float()
        beta, eta, lam = beta.float(), eta.float(), lam.float()
    S0 = None if initial_state is None else initial_state.float()
    d0 = None if initial_precond is None else initial_precond.float()
    if default_states:
        S0 = q.new_zeros(N, H, K, V, dtype=torch.float32) if S0 is None else S0
        d0 = q.new_ones(N, H, K, dtype=torch.float32) if d0 is None else d0
    if cu_seqlens is None:
        o, S, d = core(q, k, v, beta, eta, lam, scale, S0, d0)
    else:
        dest, L = varlen_index(cu_seqlens)
        padded = [pad_varlen(x, dest, N, L) for x in (q, k, v, beta, eta)]
        o, S, d = core(*padded, pad_varlen(lam, dest, N, L, fill=1.0), scale, S0, d0)
        o = unpad_varlen(o, dest)
    if not output_final_state:
        S = d = None
    return o.to(dtype), S, d


# CI has no GPU: with OSDN_FORCE_TRITON=1 (and TRITON_INTERPRET=1 set before import) the
# Triton kernels run on CPU tensors through Triton's interpreter, so tests exercise them.
FORCE_TRITON_ENV = "OSDN_FORCE_TRITON"


def use_triton(x: torch.Tensor) -> bool:
    """The one place that picks the Triton kernels (CUDA tensors) or the pure-torch path."""
    return HAS_TRITON and (x.is_cuda or os.environ.get(FORCE_TRITON_ENV) == "1")


def float32_tf32() -> bool:
    """Whether torch lets float32 matmuls on CUDA run in TF32: `torch.backends.cuda.matmul.
    fp32_precision` (or the global `torch.backends.fp32_precision` it follows) is "tf32", as
    `torch.set_float32_matmul_precision("high")` and the HF Trainer's `tf32=True` set it; on torch
    before 2.9, `torch.backends.cuda.matmul.allow_tf32`."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        return getattr(torch.backends, "fp32_precision", "none") == "tf32"
    return precision == "tf32"


def dot_precision(x: torch.Tensor) -> str:
    """Matrix-product precision inside the kernels: tf32 for 16-bit inputs, and for float32 inputs
    where torch runs float32 matmuls in TF32 (`float32_tf32`); else exact ("ieee")."""
    return "ieee" if x.dtype == torch.float32 and not float32_tf32() else "tf32"

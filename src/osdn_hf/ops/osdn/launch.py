"""Launching a Triton kernel again without Triton's per-call argument handling.

`kernel[grid](*args)` binds every argument, works out how to specialize the kernel for it and
looks the compiled kernel up, on every call. For the decoding kernel (24 arguments, a few
microseconds on the GPU) that was most of a call's host time on an H200's host: 35 us a launch,
against 16 us for an empty kernel of one argument (`benchmarks/results/decode_host_c8e7df5.json`).
`KernelLauncher` does that work once per specialization and then launches the compiled kernel
directly; `enqueue(kernel, grid, *args, **meta)` is how the ops call every kernel through it.
"""

from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    """`triton.cdiv` for host code: plain integers (Triton's is a constexpr function, several
    microseconds a call on the host, and a forward works out a dozen grids)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """`triton.next_power_of_2` for host code (see `cdiv`): the least power of 2 >= n, 0 for 0."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def launch_key(args: tuple) -> tuple | None:
    """What Triton specializes a kernel on for its runtime arguments `args`, as a hashable key,
    or None where this key would not tell all cases apart (a pointer not 16-byte aligned).

    Triton's rules (the `triton.jit` docs; `specialize_impl` in triton/runtime/jit.py): a tensor
    by its dtype and whether its address is a multiple of 16 bytes; an integer by its being 1,
    a multiple of 16, and its type (i32, i64 or u64, by its range); None, floats and bools by
    their type (a bool by its value too, which costs nothing to add). Only keys where every
    address is aligned are made, so one flag stands for all of them. The device of the first
    tensor goes in: a compiled kernel is loaded on one device.
    """
    ptrs, device, spec = 0, None, []
    for x in args:
        if isinstance(x, torch.Tensor):
            ptrs |= x.data_ptr()
            device = x.get_device() if device is None else device
            spec.append(x.dtype)
        elif x.__class__ is int:
            spec.append((x == 1, x % 16 == 0, -(2**31) <= x < 2**31, x >= 2**63))
        elif x.__class__ is bool:
            spec.append(x)
        elif x is None or x.__class__ is float:
            spec.append(x.__class__)
        else:
            raise TypeError(f"no launch key for a kernel argument of type {type(x).__name__}")
    return None if ptrs % 16 else (device, *spec)


class KernelLauncher:
    """`launcher(grid, args, meta)` does what `kernel[grid](*args, **meta)` does.

    `args` are the kernel's runtime arguments in order and `meta` names constexprs after them
    (the rest take their defaults) and any launch options (`num_warps`). The first call for a key
    (`launch_key(args)` and `meta`) launches through Triton, compiling if it must, and keeps the
    compiled kernel; later calls with that key launch it directly, on the grid padded to three
    dimensions and with the constexprs after `args` in the signature's order, as Triton passes
    them itself. Calls without a key (a pointer not 16-byte aligned), calls that name a runtime
    argument in `meta` (its value would be kept) or pass a constexpr in `args` (the key holds only
    its specialization), and calls under Triton's interpreter, which compiles nothing to keep,
    always go through `kernel[grid]`.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict[tuple, tuple] = {}

    def __call__(self, grid: tuple[int, ...], args: tuple, meta: dict):
        spec = launch_key(args)
        key = None if spec is None else (spec, *meta.items())
        hit = self.compiled.get(key) if key is not None else None
        if hit is not None:
            compiled, constexprs = hit
            return compiled[(*grid, 1, 1)[:3]](*args, *constexprs)  # a compiled kernel takes all three
        compiled = self.kernel[grid](*args, **meta)
        if key is not None and hasattr(compiled, "packed_metadata"):
            params = self.kernel.params
            # the key tells runtime arguments apart by their specialization, constexprs by value
            if not any(p.is_constexpr for p in params[: len(args)]) and all(
                p.is_constexpr for p in params[len(args) :]
            ):
                rest = params[len(args) :]
                self.compiled[key] = (compiled, tuple(meta[p.name] if p.name in meta else p.default for p in rest))
        return compiled


_LAUNCHERS: dict = {}


def enqueue(kernel, grid: tuple[int, ...], *args, **meta):
    """`kernel[grid](*args, **meta)` through the kernel's one `KernelLauncher`: runtime arguments
    positional, constexprs and launch options by name."""
    launcher = _LAUNCHERS.get(kernel)
    if launcher is None:
        launcher = _LAUNCHERS[kernel] = KernelLauncher(kernel)
    return launcher(grid, args, meta)

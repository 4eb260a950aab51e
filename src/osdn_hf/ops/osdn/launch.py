"""Launching a Triton kernel again without Triton's per-call argument handling.

`kernel[grid](*args)` binds every argument, works out how to specialize the kernel for it and
looks the compiled kernel up, on every call. For the decoding kernel (24 arguments, a few
microseconds on the GPU) that was most of a call's host time on an H200's host: 35 us a launch,
against 16 us for an empty kernel of one argument (`benchmarks/results/decode_host_c8e7df5.json`).
`KernelLauncher` does that work once per specialization and then launches the compiled kernel
directly; `enqueue(kernel, grid, *args, **meta)` is how the ops call every kernel through it.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch

try:
    from triton import knobs as _knobs
except ImportError:  # no Triton, or one without knobs: compiled kernels launch through their runner
    _knobs = None


def cdiv(a: int, b: int) -> int:
    """`triton.cdiv` for host code: plain integers (Triton's is a constexpr function, several
    microseconds a call on the host, and a forward works out a dozen grids)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """`triton.next_power_of_2` for host code (see `cdiv`): the least power of 2 >= n, 0 for 0."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def block_width(D: int, widest: int | None = None) -> int:
    """The width of a kernel's block over a dimension of D: the least power of 2 >= D, at least
    16 (`tl.dot`'s least), at most `widest` where given (a kernel then walks D in blocks)."""
    width = max(next_power_of_2(D), 16)
    return width if widest is None else min(width, widest)


def contiguous_or_none(x: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor argument made contiguous for a kernel, or None as it is: an optional pointer the
    kernel tests with `is not None` (a default state, a gradient nothing made)."""
    return None if x is None else x.contiguous()


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
    add, tensor = spec.append, torch.Tensor
    for x in args:
        if isinstance(x, tensor):
            ptrs |= x.data_ptr()
            if device is None:
                device = x.get_device()
            add(x.dtype)
        elif x is None:
            add(None)
        elif x.__class__ is int:
            add((x == 1, x % 16 == 0, -(2**31) <= x < 2**31, x >= 2**63))
        elif x.__class__ is bool:
            add(x)
        elif x.__class__ is float:
            add(float)
        else:
            raise TypeError(f"no launch key for a kernel argument of type {type(x).__name__}")
    return None if ptrs % 16 else (device, *spec)


def _current_stream() -> int:
    """The current CUDA stream of the current device, as Triton's runner finds it."""
    return torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())


def _no_launch_hooks() -> bool:
    """Whether no launch hook is registered with Triton (`knobs.runtime.launch_enter_hook` and
    `launch_exit_hook`, empty hook chains by default; a profiler such as proton adds to them)."""
    if _knobs is None:
        return False
    runtime = _knobs.runtime
    return not getattr(runtime.launch_enter_hook, "calls", True) and not getattr(
        runtime.launch_exit_hook, "calls", True
    )


# How Triton's compiled-kernel runner (`CompiledKernel.__getitem__`) calls the kernel's launcher,
# whitespace taken out: the grid, stream, function, packed metadata, launch metadata, the two
# hooks (read from `knobs`, or in older Triton from `CompiledKernel`), then every argument as given.
_RUNNER_CALL = re.compile(
    r"self\.run\(grid\[0\],grid\[1\],grid\[2\],stream,self\.function,self\.packed_metadata,"
    r"launch_metadata,[\w.]*launch_enter_hook,[\w.]*launch_exit_hook,\*args\)"
)


@functools.cache
def _runner_calls_launcher_as_kept() -> bool:
    """Whether this Triton's compiled-kernel runner calls the kernel's launcher as
    `KernelLauncher`'s direct launch does (`_RUNNER_CALL`), read from the runner's source once a
    process. Where it does not (another Triton, or one whose runner changes the arguments on the
    way, as one that drops None arguments would), kept kernels launch through the runner."""
    try:
        from triton.compiler.compiler import CompiledKernel

        source = inspect.getsource(CompiledKernel.__getitem__)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return _RUNNER_CALL.search("".join(source.split())) is not None


def _direct_launch(compiled) -> tuple | None:
    """What a compiled kernel's runner (`compiled[grid](*args)`) passes to the kernel's launcher
    besides the grid, stream and arguments: `(run, function, packed_metadata)`; None where this
    Triton's compiled kernels lack them or its runner calls the launcher otherwise
    (`_runner_calls_launcher_as_kept`). The runner also builds the launch metadata for the launch
    hooks on every call, which `KernelLauncher` skips while no hook is registered."""
    if not _runner_calls_launcher_as_kept():
        return None
    try:
        return compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None


class KernelLauncher:
    """`launcher(grid, args, meta)` does what `kernel[grid](*args, **meta)` does.

    `args` are the kernel's runtime arguments in order and `meta` names constexprs after them
    (the rest take their defaults) and any launch options (`num_warps`). The first call for a key
    (`launch_key(args)` and `meta`) launches through Triton, compiling if it must, and keeps the
    compiled kernel; later calls with that key launch it directly, on the grid padded to three
    dimensions and with the constexprs after `args` in the signature's order, as Triton passes
    them itself; while no launch hook is registered, they call the kernel's launcher as the
    compiled kernel's runner would (`_direct_launch`), without the runner's per-call metadata for
    the hooks. Calls without a key (a pointer not 16-byte aligned), calls that name a runtime
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
            compiled, constexprs, direct = hit
            g = (*grid, 1, 1)[:3]  # a compiled kernel takes all three
            if direct is not None and _no_launch_hooks():
                run, function, metadata = direct
                return run(*g, _current_stream(), function, metadata, None, None, None, *args, *constexprs)
            return compiled[g](*args, *constexprs)
        compiled = self.kernel[grid](*args, **meta)
        if key is not None and hasattr(compiled, "packed_metadata"):
            params = self.kernel.params
            # the key tells runtime arguments apart by their specialization, constexprs by value
            if not any(p.is_constexpr for p in params[: len(args)]) and all(
                p.is_constexpr for p in params[len(args) :]
            ):
                rest = params[len(args) :]
                constexprs = tuple(meta[p.name] if p.name in meta else p.default for p in rest)
                self.compiled[key] = (compiled, constexprs, _direct_launch(compiled))
        return compiled


_LAUNCHERS: dict = {}


def enqueue(kernel, grid: tuple[int, ...], *args, **meta):
    """`kernel[grid](*args, **meta)` through the kernel's one `KernelLauncher`: runtime arguments
    positional, constexprs and launch options by name."""
    launcher = _LAUNCHERS.get(kernel)
    if launcher is None:
        launcher = _LAUNCHERS[kernel] = KernelLauncher(kernel)
    return launcher(grid, args, meta)

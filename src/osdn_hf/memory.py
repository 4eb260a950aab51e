"""Peak tensor memory of a piece of code, counted on any device (what `scripts/op_memory.py` reports).

`torch.cuda.max_memory_allocated` needs a GPU. `LiveBytes` counts the same thing from the
tensors themselves: every tensor an operator returns inside the `with` block is followed until
the last tensor on its storage is gone, and the sum of live storages' bytes is tracked. Tensors
made before the block (inputs, parameters) are not counted, as `max_memory_allocated() - base`
leaves them out. The CUDA caching allocator rounds each block up to 512 bytes, so on the GPU the
peak is the same up to that rounding.

Example:
    >>> x = torch.ones(1024)
    >>> with LiveBytes() as mem:
    ...     y = x * 2          # 4 KiB live
    ...     z = y + 1          # 8 KiB live
    ...     del y, z           # 0 live, the peak stays
    >>> mem.peak, mem.now
    (8192, 0)
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """`now`: bytes of storages made inside the block and still alive; `peak`: the most `now` was."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._refs: dict[int, int] = {}  # storage address -> tensors on it
        self._bytes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results alias an input: they allocate nothing
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._follow(t, aliases)
        return out

    def _follow(self, t: torch.Tensor, aliases: bool) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:  # empty
            return
        if key not in self._refs:
            if aliases:
                return  # a storage made before the block
            self._refs[key], self._bytes[key] = 0, storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.now -= self._bytes.pop(key)

"""Peak transient memory of one experts call.

- CUDA: the caching allocator's peak during the call, minus what was allocated before it (weights and inputs).
- CPU: torch keeps no allocator statistics there, so the peak is tracked through a `TorchDispatchMode`: every tensor
  an operator returns adds its storage's bytes while that storage is alive (views and `out=` results of existing
  storages add nothing). It counts what operators allocate, not kernels' internal scratch space or the allocator's
  slack, so it is an estimate from below; it tracks the gathered weight copies of `batched_mm` exactly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..device import synchronize


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of storages created inside the mode and still referenced, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, live tensor count]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        pointer, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        entry = self.live.get(pointer)
        if entry is None:
            if pointer in inputs:  # a view of (or `out=` into) a storage that existed before the mode
                return
            entry = self.live[pointer] = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, pointer)

    def _release(self, pointer: int) -> None:
        entry = self.live.get(pointer)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[pointer]
            self.current -= entry[0]


def peak_call_bytes(call: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Runs `call()` once and returns its transient peak memory in bytes (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = call()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del output
        return int(peak)
    tracker = _LiveTensorBytes()
    with tracker:
        output = call()
    del output
    return int(tracker.peak)

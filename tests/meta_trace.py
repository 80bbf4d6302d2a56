"""Count the memory a forward pass allocates, on the meta device (shapes only, no compute).

:class:`PeakTracker` is a torch dispatch mode that sees every tensor an operator returns,
counts its storage once while it is alive (a weak reference tells when it is freed) and
keeps the largest sum: the peak a caching-free allocator would see, exactly, without a
GPU and in a fraction of a second for a full-size model. Storages alive before the mode
(weights, inputs) are not counted. :func:`kernel_sdpa` stands in for a memory-efficient
attention kernel (it allocates only the output), as CUDA's SDPA behaves.

The memory estimate's tests compare its formulas with this count.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class PeakTracker(TorchDispatchMode):
    """The peak bytes of storages created while the mode is active."""

    def __init__(self, *known: Any) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._known = {t.untyped_storage()._cdata for t in _tensors(list(known))}

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self._known:
            return
        size = storage.nbytes()
        self.live[key] = size
        self.current += size

        def freed(key: int = key, size: int = size) -> None:
            if self.live.pop(key, None) is not None:
                self.current -= size

        weakref.finalize(storage, freed)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        self.peak = max(self.peak, self.current)
        return out


@contextlib.contextmanager
def kernel_sdpa() -> Iterator[None]:
    """Make SDPA allocate only its output, as a memory-efficient kernel does."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def kernel(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *a: Any, **k: Any
    ) -> torch.Tensor:
        shape = (*query.shape[:-1], value.shape[-1])
        return torch.empty(shape, dtype=query.dtype, device=query.device)

    functional.scaled_dot_product_attention = kernel  # type: ignore[assignment]
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def traced_peak(fn: Callable[[], Any], *known: Any, kernel: bool = True) -> int:
    """Return the peak bytes ``fn()`` allocates (``known`` tensors and modules not counted)."""
    with torch.no_grad(), kernel_sdpa() if kernel else contextlib.nullcontext():
        tracker = PeakTracker(*known)
        with tracker:
            fn()
    return tracker.peak

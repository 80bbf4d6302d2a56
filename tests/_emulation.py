"""CPU emulations of mps failures, for tests: the attention element limit, float64, float8.

(``tests/_emulations.py`` holds the emulations of the known problems that the device
self-tests detect; the two may be merged into one module later.)

Each is a context manager that makes the CPU fail as mps does, so that a test can show a
pipeline failing without mps_helpers and running with it:

- :func:`sdpa_element_limit`: SDPA raises (or silently returns wrong values) past N score
  elements, as mps kernels do past 2**31 (pytorch #84039, #179352, #197636); it also records
  the score elements of every call it sees (a counting spy).
- :func:`no_float64`: creating a float64 tensor on the device raises mps' TypeError.
- :func:`no_float8`: any torch function that computes with a float8 tensor raises
  (conversions out of float8 are allowed: on a Mac they happen on the CPU, before the move).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mps_helpers._bounded import score_elements

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["MPS_FLOAT8", "MPS_FLOAT64", "no_float8", "no_float64", "sdpa_element_limit"]

#: mps' own messages.
MPS_FLOAT64 = (
    "Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
    "float64. Please use float32 instead."
)
MPS_FLOAT8 = (
    "Trying to convert Float8_e4m3fn to the MPS backend but it does not have support for "
    "that dtype."
)
LIMIT_ERROR = "MPSGraph does not support tensor dims larger than INT_MAX"


@contextlib.contextmanager
def sdpa_element_limit(limit: int, *, corrupt: bool = False) -> Iterator[list[int]]:
    """Make SDPA fail past ``limit`` score elements; yield the list of every call's elements.

    ``corrupt=True`` returns a wrong (but finite) result past the limit instead of raising.
    """
    original = F.scaled_dot_product_attention
    sizes: list[int] = []

    def limited(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        elements = score_elements(query, key)
        sizes.append(elements)
        if elements > limit:
            if not corrupt:
                raise RuntimeError(f"{LIMIT_ERROR} ({elements} score elements)")
            return original(query, key, value, *args, **kwargs) + 1.0
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = limited  # type: ignore[assignment]
    try:
        yield sizes
    finally:
        F.scaled_dot_product_attention = original


class _NoFloat64(TorchDispatchMode):
    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("lift_fresh"):
            # torch.from_numpy / torch.tensor(data): made on the CPU, where mps code makes
            # them too (a float64 array becomes a CPU tensor before any move).
            return out
        for value in tree_flatten(out)[0]:
            if (
                isinstance(value, torch.Tensor)
                and value.dtype == torch.float64
                and value.device.type == self.device
            ):
                raise TypeError(MPS_FLOAT64)
        return out


def no_float64(device: str = "cpu") -> Any:
    """Return a mode in which a float64 tensor made on ``device`` raises mps' TypeError."""
    return _NoFloat64(device)


_FLOAT8 = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
#: Functions that convert or describe a tensor without computing with its values.
_HARMLESS = frozenset(
    {
        "to", "type", "float", "half", "bfloat16", "double", "copy_", "clone", "detach",
        "__get__", "__set__", "size", "dim", "numel", "stride", "is_floating_point",
        "element_size", "data_ptr", "requires_grad_", "is_contiguous", "untyped_storage",
        "storage_offset", "_has_compatible_shallow_copy_type", "__reduce_ex__", "__deepcopy__",
    }
)  # fmt: skip


class _NoFloat8(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name not in _HARMLESS:
            seen = [*tree_flatten(args)[0], *tree_flatten(kwargs or {})[0]]
            if any(isinstance(v, torch.Tensor) and v.dtype in _FLOAT8 for v in seen):
                raise TypeError(f"{MPS_FLOAT8} ({name})")
        return func(*args, **(kwargs or {}))


def no_float8() -> Any:
    """Return a mode in which computing with float8 tensors raises (as mps)."""
    return _NoFloat8()

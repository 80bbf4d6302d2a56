"""CPU emulations of known mps bugs, for the self-test probes to catch.

Each emulation patches one torch function to behave as the bug report says the mps kernel
does, for the computation only: float64 calls (the probes' CPU references) go to the real
function, as on a Mac the reference runs on the CPU while the bug is on the GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@dataclass(frozen=True)
class Emulation:
    """A bug to emulate: the known problem (or a half-precision failure), its probe, how."""

    name: str
    probe: str
    module: Any
    attribute: str
    make: Callable[[Any], Any]


def _device_side(*tensors: torch.Tensor) -> bool:
    return all(t.dtype != torch.float64 for t in tensors)


def _as_if_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Read a transposed (B, H, L, D) view's memory as if it were laid out (B, H, L, D)."""
    return t if t.is_contiguous() else t.transpose(1, 2).reshape(t.shape)


def _baddbmm_propagates_nan(real: Any) -> Any:
    # pytorch #187521: beta * input is computed even when beta == 0, so 0 * NaN = NaN.
    def fake(input: Any, batch1: Any, batch2: Any, *, beta: Any = 1, alpha: Any = 1) -> Any:
        if not _device_side(input):
            return real(input, batch1, batch2, beta=beta, alpha=alpha)
        return beta * input + alpha * torch.bmm(batch1, batch2)

    return fake


def _sdpa_query_strides(real: Any) -> Any:
    # pytorch #163597: the fast kernels (query length <= 8, head dim 64/96/128) assume a
    # contiguous query.
    def fake(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        if _device_side(q) and q.shape[-2] <= 8 and q.shape[-1] in (64, 96, 128):
            q = _as_if_contiguous(q)
        return real(q, k, v, *args, **kwargs)

    return fake


def _sdpa_permuted_batch(real: Any) -> Any:
    # pytorch #181133: with batch > 1, permuted q/k/v are read with the wrong strides.
    def fake(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        if _device_side(q) and q.shape[0] > 1 and q.shape[-1] >= 64:
            q, k, v = _as_if_contiguous(q), _as_if_contiguous(k), _as_if_contiguous(v)
        return real(q, k, v, *args, **kwargs)

    return fake


#: Score elements past which the emulated SDPA and bmm go wrong (2**32 on a Mac; smaller here
#: so that the probes reach it).
EMULATED_LIMIT = 2**25
BMM_EMULATED_LIMIT = 2**23


def _sdpa_large(real: Any) -> Any:
    # pytorch #179352: corrupted output once batch x heads x queries x keys passes a limit.
    def fake(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(q, k, v, *args, **kwargs)
        scores = q.shape[:-1].numel() * k.shape[-2]
        if _device_side(q) and scores > EMULATED_LIMIT:
            return out * 0.5
        return out

    return fake


def _bmm_large(real: Any) -> Any:
    # pytorch #197636: wrong past a size when an input is non-contiguous.
    def fake(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(a, b, *args, **kwargs)
        big = a.shape[0] * a.shape[1] * b.shape[2] > BMM_EMULATED_LIMIT
        if _device_side(a) and big and not (a.is_contiguous() and b.is_contiguous()):
            out = out.clone()
            out[out.shape[0] // 2 :] = 0
        return out

    return fake


def _conv3d_ncdhw(real: Any) -> Any:
    # pytorch #197114: contiguous (NCDHW) inputs give unrelated values.
    def fake(x: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
        if _device_side(x) and x.is_contiguous():
            weight = weight.flip(-1)
        return real(x, weight, *args, **kwargs)

    return fake


def _conv3d_channels_last(real: Any) -> Any:
    # pytorch #141471: channels_last_3d inputs give wrong output.
    def fake(x: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
        if _device_side(x) and x.is_contiguous(memory_format=torch.channels_last_3d):
            weight = weight.flip(-2)
        return real(x, weight, *args, **kwargs)

    return fake


def _conv2d_weight_strides(real: Any) -> Any:
    # pytorch #192212: a non-contiguous weight is read as if contiguous.
    def fake(x: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
        if _device_side(x) and not weight.is_contiguous():
            strides = torch.empty(weight.shape).stride()
            weight = torch.as_strided(weight, weight.shape, strides, weight.storage_offset())
        return real(x, weight, *args, **kwargs)

    return fake


def _group_norm_half(real: Any) -> Any:
    # A float16 group norm that drops its affine parameters.
    def fake(x: Any, groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
        if x.dtype == torch.float16:
            return real(x, groups, None, None, eps)
        return real(x, groups, weight, bias, eps)

    return fake


def _upsample_half(real: Any) -> Any:
    # pytorch #88183-like: interpolate of a permuted float16 input returns zeros.
    def fake(x: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(x, *args, **kwargs)
        if x.dtype == torch.float16 and not x.is_contiguous():
            return torch.zeros_like(out)
        return out

    return fake


def _softmax_half(real: Any) -> Any:
    # A float16 softmax that does not subtract the row maximum: exp overflows float16.
    def fake(x: Any, dim: int, *args: Any, **kwargs: Any) -> Any:
        if x.dtype == torch.float16:
            e = x.exp()
            return e / e.sum(dim=dim, keepdim=True)
        return real(x, dim, *args, **kwargs)

    return fake


EMULATIONS: dict[str, Emulation] = {
    e.name: e
    for e in (
        Emulation("baddbmm-beta0-nan", "baddbmm_beta0", torch, "baddbmm", _baddbmm_propagates_nan),
        Emulation(
            "sdpa-noncontiguous-query",
            "sdpa_noncontiguous",
            F,
            "scaled_dot_product_attention",
            _sdpa_query_strides,
        ),
        Emulation(
            "sdpa-permuted-batch",
            "sdpa_permuted",
            F,
            "scaled_dot_product_attention",
            _sdpa_permuted_batch,
        ),
        Emulation("sdpa-large-scores", "sdpa_long", F, "scaled_dot_product_attention", _sdpa_large),
        Emulation("bmm-large-output", "bmm_large", torch, "bmm", _bmm_large),
        Emulation("conv3d-ncdhw-macos26", "conv3d", F, "conv3d", _conv3d_ncdhw),
        Emulation("conv3d-channels-last", "conv3d", F, "conv3d", _conv3d_channels_last),
        Emulation(
            "conv2d-noncontiguous-weight",
            "conv2d_noncontiguous_weight",
            F,
            "conv2d",
            _conv2d_weight_strides,
        ),
        Emulation("group-norm-half", "group_norm_half", F, "group_norm", _group_norm_half),
        Emulation("upsample-half", "upsample_half", F, "interpolate", _upsample_half),
        Emulation("softmax-half", "softmax_half", torch, "softmax", _softmax_half),
    )
}


@contextlib.contextmanager
def emulate(name: str) -> Iterator[Emulation]:
    """Patch torch to have the bug ``name`` inside the block."""
    emulation = EMULATIONS[name]
    real = getattr(emulation.module, emulation.attribute)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(emulation.module, emulation.attribute, emulation.make(real))
        yield emulation

"""Bounded attention for every attention call of a prepared call: SDPA, chunked past a bound.

Every attention a diffusers pipeline computes ends in one function,
``torch.nn.functional.scaled_dot_product_attention``: the classic processors of
``models/attention_processor.py`` (UNets, SD3's joint attention, PixArt, the VAEs' mid-block)
call it directly, the transformer processors (Flux, Wan, LTX, HunyuanVideo, Qwen-Image, ...)
through ``models/attention_dispatch.py``, whose default ("native") backend calls it too, and
so do the transformers text encoders. Each of those modules looks the function up on
``torch.nn.functional`` when it calls it, so replacing that one attribute for the length of a
call bounds them all: :func:`bounded_attention` does that.

The replacement computes the score elements of the call it receives (batch x heads x query
rows x keys). When they fit the bound, it calls the original function with the caller's own
arguments, unchanged: that is the common case, and it costs one multiplication. Past the bound
it splits the work over batch items, heads and query rows (the safe processor's shape rule,
:func:`mps_helpers._attention.chunk_rows`) and calls the original on each block, so no score block
it asks for has more elements than the bound. Masks (boolean or additive, broadcast or full),
``is_causal`` (turned into the block's part of the causal mask), ``scale``, ``enable_gqa``
(grouped key/value heads) and ``dropout_p`` (0 at inference) keep their meaning.

The bound is a context variable: other threads, and code outside a prepared call, see the
original function through one extra Python call.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch

__all__ = ["bounded_attention", "bounded_sdpa", "score_elements"]


@dataclass(frozen=True)
class _Bound:
    elements: int
    device: str | None
    upcast_from: int | None


_ACTIVE: contextvars.ContextVar[_Bound | None] = contextvars.ContextVar(
    "mps_helpers_attention_bound", default=None
)
_LOCK = threading.Lock()
_state: dict[str, Any] = {"installs": 0, "original": None}


def score_elements(query: torch.Tensor, key: torch.Tensor) -> int:
    """Return the elements of the score matrix SDPA would form: batch x heads x rows x keys."""
    count = key.shape[-2]
    for size in query.shape[:-1]:
        count *= size
    return int(count)


def _check_bound(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}"
        )


@contextlib.contextmanager
def bounded_attention(
    chunk_elements: int, *, device: str | None = None, upcast_from: int | None = None
) -> Iterator[None]:
    """Bound every SDPA call inside the ``with`` block to ``chunk_elements`` score elements.

    Inside the block, ``torch.nn.functional.scaled_dot_product_attention`` keeps its
    signature and results (within float rounding) but never forms a score block of more than
    ``chunk_elements`` elements; calls that fit run the native kernel unchanged. Blocks nest
    (the innermost bound wins) and are thread-safe: the bound belongs to the thread (context)
    that entered the block.

    Args:
        chunk_elements: the most elements one score block may have (batch x heads x query
            rows x keys). A block holds whole query rows, so a row longer than this is a
            block of its own.
        device: act only on attention whose query is on this device type ("mps"); None acts
            on every device.
        upcast_from: compute attention in float32 (and cast back) when a half-precision
            call has at least this many keys; None never upcasts.

    Raises:
        ValueError: ``chunk_elements`` or ``upcast_from`` is not a positive integer.

    .. versionadded:: 0.2
    """
    _check_bound("chunk_elements", chunk_elements)
    _check_bound("upcast_from", upcast_from, allow_none=True)
    token = _ACTIVE.set(_Bound(chunk_elements, device, upcast_from))
    _install()
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _uninstall()


def _install() -> None:
    import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

    with _LOCK:
        if not hasattr(F, "scaled_dot_product_attention"):
            # torch 1.13: no SDPA to bound; attention there is diffusers' classic processor
            # (or the safe one, whose matmul path honours its own bound).
            _state["installs"] += 1
            return
        if _state["installs"] == 0 and F.scaled_dot_product_attention is not _bounded_entry:
            _state["original"] = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _bounded_entry
        _state["installs"] += 1


def _uninstall() -> None:
    import torch.nn.functional as F  # noqa: N812

    with _LOCK:
        _state["installs"] -= 1
        # Leave a later patch by someone else in place: it wraps ours, which then passes
        # every call through (no bound is active).
        if _state["installs"] == 0 and getattr(F, "scaled_dot_product_attention", None) is (
            _bounded_entry
        ):
            F.scaled_dot_product_attention = _state["original"]


def _original() -> Callable[..., torch.Tensor]:
    original = _state["original"]
    if original is None:  # pragma: no cover - only reachable while installed
        import torch.nn.functional as F  # noqa: N812

        return F.scaled_dot_product_attention
    fn: Callable[..., torch.Tensor] = original
    return fn


_NAMES = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _bounded_entry(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
    """Stand-in for ``scaled_dot_product_attention`` while a bound is active."""
    original = _original()
    bound = _ACTIVE.get()
    if bound is None or len(args) > len(_NAMES) or not _plain(query, key, value):
        return original(query, key, value, *args, **kwargs)
    if bound.device is not None and query.device.type != bound.device:
        return original(query, key, value, *args, **kwargs)
    upcast = (
        bound.upcast_from is not None
        and key.shape[-2] >= bound.upcast_from
        and query.dtype.is_floating_point
        and query.element_size() < 4
    )
    if not upcast and score_elements(query, key) <= bound.elements:
        return original(query, key, value, *args, **kwargs)
    given = dict(zip(_NAMES, args, strict=False))
    if set(given) & set(kwargs) or set(kwargs) - set(_NAMES):
        return original(query, key, value, *args, **kwargs)  # let SDPA raise its TypeError
    given.update(kwargs)
    if given.get("attn_mask") is not None and given.get("is_causal"):
        return original(query, key, value, *args, **kwargs)  # SDPA's own error
    return bounded_sdpa(
        query,
        key,
        value,
        given.get("attn_mask"),
        dropout_p=float(given.get("dropout_p", 0.0)),
        is_causal=bool(given.get("is_causal", False)),
        scale=given.get("scale"),
        enable_gqa=bool(given.get("enable_gqa", False)),
        chunk_elements=bound.elements,
        upcast=upcast,
        sdpa=original,
    )


def _plain(*tensors: Any) -> bool:
    """Return whether every argument is an ordinary strided tensor of 3 or more dims."""
    import torch

    return all(
        isinstance(t, torch.Tensor)
        and not t.is_nested
        and t.layout == torch.strided
        and t.ndim >= 3
        for t in tensors
    )


def bounded_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    chunk_elements: int,
    upcast: bool = False,
    sdpa: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return ``scaled_dot_product_attention(...)`` with no score block over ``chunk_elements``.

    Arguments as SDPA's; ``sdpa`` is the function each block goes to (default: torch's).
    ``upcast`` computes in float32 and returns the query's dtype.
    """
    import torch

    if sdpa is None:
        import torch.nn.functional as F  # noqa: N812

        sdpa = (
            _original()
            if F.scaled_dot_product_attention is _bounded_entry
            else F.scaled_dot_product_attention
        )
    dtype = query.dtype
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.float()
    lead = query.shape[:-3]
    q4, k4, v4 = (_as_4d(t) for t in (query, key, value))
    mask4 = None if attn_mask is None else _mask_4d(attn_mask, query, key)
    out = _blocks(
        q4,
        k4,
        v4,
        mask4,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        gqa=enable_gqa,
        chunk_elements=chunk_elements,
        sdpa=sdpa,
    )
    if query.ndim == 3:
        out = out[0]
    elif query.ndim > 4:
        out = out.reshape(*lead, *out.shape[1:])
    return out.to(dtype) if upcast else out


def _as_4d(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim == 3:
        return tensor.unsqueeze(0)
    if tensor.ndim > 4:
        return tensor.reshape(-1, *tensor.shape[-3:])
    return tensor


def _mask_4d(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as 4-D, broadcastable to the 4-D view of the scores."""
    while mask.ndim < max(query.ndim, 4):
        mask = mask.unsqueeze(0)
    if mask.ndim > 4:
        mask = mask.expand(*query.shape[:-2], *mask.shape[-2:])
        mask = mask.reshape(-1, *mask.shape[-3:])
    return mask


def _pick(tensor: torch.Tensor, dim: int, part: slice) -> torch.Tensor:
    """Return ``tensor``'s ``part`` along ``dim``, or all of it where that dim broadcasts (1)."""
    if tensor.shape[dim] == 1:
        return tensor
    index: list[slice] = [slice(None)] * tensor.ndim
    index[dim] = part
    return tensor[tuple(index)]


def _blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    gqa: bool,
    chunk_elements: int,
    sdpa: Callable[..., torch.Tensor],
) -> torch.Tensor:
    import torch

    from mps_helpers._attention import _chunk_shape

    batch, heads, query_len, _ = query.shape
    key_len = key.shape[-2]
    kv_heads = key.shape[-3]
    group = heads // kv_heads if gqa and kv_heads != heads else 1
    extra: dict[str, Any] = {"dropout_p": dropout_p}
    if scale is not None:
        extra["scale"] = scale

    # A block holds whole query rows: a row longer than the bound is one block.
    limit = max(chunk_elements, key_len)
    if batch * heads * query_len * key_len <= limit:
        batch_step, head_step, row_step = batch, heads, query_len
    else:
        batch_step, head_step, row_step = _chunk_shape(batch, heads, query_len, key_len, limit)
    layout_blhd = query.transpose(1, 2).is_contiguous()
    shape = (
        (batch, query_len, heads, value.shape[-1])
        if layout_blhd
        else (batch, heads, query_len, value.shape[-1])
    )
    out = torch.empty(shape, dtype=query.dtype, device=query.device)
    view = out.transpose(1, 2) if layout_blhd else out
    for b in range(0, batch, batch_step):
        bs = slice(b, b + batch_step)
        for h in range(0, heads, head_step):
            hs = slice(h, min(h + head_step, heads))
            k_block, v_block, block_gqa = _kv_heads(
                _pick(key, 0, bs), _pick(value, 0, bs), hs, group
            )
            for r in range(0, query_len, row_step):
                rs = slice(r, min(r + row_step, query_len))
                block_mask = None
                if mask is not None:
                    block_mask = _pick(_pick(_pick(mask, 0, bs), 1, hs), 2, rs)
                elif is_causal:
                    rows = rs.stop - rs.start
                    block_mask = torch.ones(
                        rows, key_len, dtype=torch.bool, device=query.device
                    ).tril(diagonal=r)
                kwargs = dict(extra)
                if block_gqa:
                    kwargs["enable_gqa"] = True
                block = sdpa(query[bs, hs, rs], k_block, v_block, block_mask, **kwargs)
                view[bs, hs, rs] = block
    return view


def _kv_heads(
    key: torch.Tensor, value: torch.Tensor, heads: slice, group: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Return the key/value heads that query ``heads`` read, and whether SDPA must group them."""
    start, stop = heads.start, heads.stop
    if group == 1:
        return _pick(key, 1, heads), _pick(value, 1, heads), False
    low, high = start // group, -(-stop // group)
    k, v = key[:, low:high], value[:, low:high]
    if start % group == 0 and stop % group == 0:
        return k, v, True
    offset = slice(start - low * group, stop - low * group)
    return (
        k.repeat_interleave(group, dim=1)[:, offset],
        v.repeat_interleave(group, dim=1)[:, offset],
        False,
    )

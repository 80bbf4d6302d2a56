"""A memory-bounded attention processor that is safe on mps: chunked scaled dot-product attention.

diffusers' ``SlicedAttnProcessor`` computes scores with ``torch.baddbmm(torch.empty(...), q, k,
beta=0)``. On mps ``baddbmm`` does not ignore its uninitialised input when ``beta=0`` (pytorch
#187521, #194442; diffusers #11229, #14438), so images come out NaN or black. The processor
here bounds the size of every attention score block the same way slicing does, but computes
each block with ``torch.nn.functional.scaled_dot_product_attention`` (or, on a torch without it,
with plain ``matmul``), so no uninitialised memory ever reaches a matmul.

Everything but the chunking mirrors diffusers' ``AttnProcessor2_0`` (0.42.1): spatial and group
norms, 4-D inputs, cross-attention norm, attention-mask preparation, ``norm_q``/``norm_k``, the
output projection and dropout, the residual connection and ``rescale_output_factor``. The one
deliberate difference: ``attn.scale`` is passed to SDPA as ``scale=``. For the modules that
diffusers gives ``AttnProcessor2_0`` (``scale_qk=True``) that is the same value SDPA uses by
default; for the others (``scale_qk=False``, where diffusers falls back to the classic
``AttnProcessor``) it is the scale that processor uses.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from mps_helpers._util import release

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "MAX_CHUNK_ELEMENTS",
    "MIN_CHUNK_ROWS",
    "SafeSlicedAttnProcessor",
    "chunk_rows",
]

#: Default bound on the elements of one attention score block (2**26 = 67M elements, 256 MiB in
#: float32, 128 MiB in float16). Measured on CPU with an SD-1.5-sized UNet: at this size the
#: chunked forward costs no measurable time over one SDPA call (docs/explanation/attention.md).
DEFAULT_CHUNK_ELEMENTS = 2**26

#: Largest accepted bound: 2**29 elements keeps one block a quarter of the 2**31-element limit
#: and, in float32, half of the 2**32-byte limit where mps kernels fail (pytorch #179352,
#: #149261, #197636), with room for the softmax's second block of the same size.
MAX_CHUNK_ELEMENTS = 2**29


#: Devices on which each block goes to SDPA as contiguous copies: mps's SDPA kernels have
#: misread permuted / non-contiguous q/k/v (pytorch #163597, #181133; the known problems
#: sdpa-noncontiguous-query and sdpa-permuted-batch). The copies are of q/k/v blocks, small
#: beside the score blocks. Elsewhere the strided views go as they are (no copy).
CONTIGUOUS_DEVICES: frozenset[str] = frozenset({"mps"})


#: Query rows a chunk keeps when the bound allows (1024, or the whole sequence if shorter).
#: Fewer rows per SDPA call make kernels work in smaller tiles: on CPU, torch's flash kernel
#: tiles queries by 256 only from 768 rows up (by 64 or 32 below), and chunks of a few hundred
#: rows took 1.3-2x SDPA's time; 1024-row chunks took about SDPA's (attention.md).
MIN_CHUNK_ROWS = 1024


def chunk_rows(
    batch_heads: int, query_len: int, key_len: int, chunk_elements: int
) -> tuple[int, int]:
    """Return ``(heads_per_chunk, rows_per_chunk)`` so that one score block has <= chunk_elements.

    The attention of ``batch_heads`` (batch x heads) independent heads, each with ``query_len``
    query rows against ``key_len`` keys, materialises at most
    ``heads_per_chunk * rows_per_chunk * key_len`` score elements per chunk. A chunk keeps
    :data:`MIN_CHUNK_ROWS` query rows (or all, if fewer) and as many heads as then fit; rows are
    cut below that only when one head's rows alone exceed the bound. Chunks are balanced: a
    split into ``n`` pieces uses pieces of ``ceil(total / n)``, not full pieces and a remnant.

    Raises:
        ValueError: when an argument is not a positive integer, or when ``chunk_elements`` is
            smaller than one query row (``key_len``): a block always holds whole rows.
    """
    for name, value in (
        ("batch_heads", batch_heads),
        ("query_len", query_len),
        ("key_len", key_len),
        ("chunk_elements", chunk_elements),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if key_len > chunk_elements:
        raise ValueError(
            f"chunk_elements={chunk_elements} is smaller than one query row of {key_len} keys; "
            f"use chunk_elements >= {key_len}"
        )
    heads = _balanced(batch_heads, _heads_that_fit(query_len, key_len, chunk_elements))
    return heads, _balanced(query_len, chunk_elements // (heads * key_len))


def _heads_that_fit(query_len: int, key_len: int, chunk_elements: int) -> int:
    """Return how many heads of MIN_CHUNK_ROWS rows (or all rows, if fewer) fit; at least 1."""
    return max(1, chunk_elements // (min(query_len, MIN_CHUNK_ROWS) * key_len))


def _balanced(total: int, most: int) -> int:
    """Return the piece size that splits ``total`` into as few, as equal pieces <= ``most``."""
    most = min(most, total)
    pieces = -(-total // most)
    return -(-total // pieces)


def _chunk_shape(
    batch: int, heads: int, query_len: int, key_len: int, chunk_elements: int
) -> tuple[int, int, int]:
    """Return ``(batch_per_chunk, heads_per_chunk, rows_per_chunk)`` for 4-D (B, H, L, D) inputs.

    As :func:`chunk_rows`, but a chunk never takes part of one batch item and part of the next
    (a group of heads covers whole batch items or part of one), so that slicing a (B, H, L, D)
    view along B, H and L keeps SDPA's inputs 4-D strided views: no copy, and the 4-D layout
    that CPU's flash kernel wants.
    """
    fit = _heads_that_fit(query_len, key_len, chunk_elements)
    if fit >= batch * heads:
        batch_step, head_step = batch, heads
    elif fit >= heads:
        batch_step, head_step = _balanced(batch, fit // heads), heads
    else:
        batch_step, head_step = 1, _balanced(heads, fit)
    _, rows = chunk_rows(batch_step * head_step, query_len, key_len, chunk_elements)
    return batch_step, head_step, rows


@functools.cache
def _sdpa_accepts_scale() -> bool:
    """Return whether this torch has ``scaled_dot_product_attention`` with ``scale=`` (2.1+)."""
    import torch

    return hasattr(torch.nn.functional, "scaled_dot_product_attention") and release(
        torch.__version__
    ) >= (2, 1)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Return softmax(q k^T * scale + mask) v for one block, through SDPA where torch allows."""
    import torch
    import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

    if query.device.type in CONTIGUOUS_DEVICES:
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    if _sdpa_accepts_scale():
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale
        )
    if hasattr(F, "scaled_dot_product_attention") and scale == query.shape[-1] ** -0.5:
        # torch 2.0: SDPA without ``scale=``, whose built-in scale is this one.
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )
    # torch 1.13, or 2.0 with another scale: plain matmuls into fresh tensors (never baddbmm).
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)


def _mask_block(mask: torch.Tensor, *index: slice) -> torch.Tensor:
    """Return the part of a 4-D mask for one block; its size-1 dims are kept to broadcast."""
    return mask[
        tuple(
            part if size != 1 else slice(None)
            for part, size in zip(index, mask.shape[:3], strict=True)
        )
    ]


def _chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    chunk_elements: int,
) -> torch.Tensor:
    """Return attention of (B, H, L, D) inputs, no score block over ``chunk_elements``.

    ``mask`` is None or 4-D, broadcastable to (B, H, L, S): each of its first three dims is either
    1 or full size. The result is (B, H, L, Dv); when chunked it is a transposed view of a
    (B, L, H, Dv) buffer, so the caller's ``transpose(1, 2).reshape(...)`` costs no copy.
    """
    import torch

    batch, heads, query_len, _ = query.shape
    key_len = key.shape[-2]
    if batch * heads * query_len * key_len <= chunk_elements:
        return _attend(query, key, value, mask, scale)

    # A block holds whole query rows: with fewer elements than one row allows, use one row
    # (key_len elements, far under 2**31 for any image) rather than fail mid-generation.
    chunk_elements = max(chunk_elements, key_len)
    batch_step, head_step, row_step = _chunk_shape(batch, heads, query_len, key_len, chunk_elements)
    # Every element is written below before anything reads it; it never feeds a matmul.
    out = torch.empty(
        (batch, query_len, heads, value.shape[-1]), dtype=query.dtype, device=query.device
    )
    for b in range(0, batch, batch_step):
        bs = slice(b, b + batch_step)
        for h in range(0, heads, head_step):
            hs = slice(h, h + head_step)
            for r in range(0, query_len, row_step):
                rs = slice(r, r + row_step)
                block_mask = None if mask is None else _mask_block(mask, bs, hs, rs)
                block = _attend(query[bs, hs, rs], key[bs, hs], value[bs, hs], block_mask, scale)
                out[bs, rs, hs] = block.transpose(1, 2)
    return out.transpose(1, 2)


class SafeSlicedAttnProcessor:
    """Attention processor for diffusers' ``Attention`` that bounds score memory, safe on mps.

    Install it with ``unet.set_attn_processor(SafeSlicedAttnProcessor())``. It computes the
    same result as diffusers' ``AttnProcessor2_0`` (within float rounding), but splits the work
    over batch, heads and query rows so that no score block it asks SDPA for has more than
    ``chunk_elements`` elements; when the whole attention fits, it makes the one SDPA call
    ``AttnProcessor2_0`` makes. Unlike diffusers' ``SlicedAttnProcessor`` it never passes
    uninitialised memory to ``baddbmm`` (NaN / black images on mps).

    Args:
        chunk_elements: the most elements of one (batch x heads x query rows x keys) score block;
            None for :data:`DEFAULT_CHUNK_ELEMENTS`. At most :data:`MAX_CHUNK_ELEMENTS`. A block
            holds whole query rows, so where one row has more keys than this, blocks are one
            row each.

    Raises:
        ValueError: when ``chunk_elements`` is not an integer in [1, MAX_CHUNK_ELEMENTS].

    Note:
        diffusers' ``unet.set_default_attn_processor()`` only recognises its own processor
        classes and raises ValueError while this one is installed; use
        ``unet.set_attn_processor(AttnProcessor2_0())`` or ``pipe.disable_attention_slicing()``
        to go back.
    """

    __slots__ = ("_chunk_elements",)

    def __init__(self, chunk_elements: int | None = None) -> None:
        if chunk_elements is None:
            chunk_elements = DEFAULT_CHUNK_ELEMENTS
        if (
            isinstance(chunk_elements, bool)
            or not isinstance(chunk_elements, int)
            or not 1 <= chunk_elements <= MAX_CHUNK_ELEMENTS
        ):
            raise ValueError(
                f"chunk_elements must be None or an integer from 1 to {MAX_CHUNK_ELEMENTS} "
                f"(2**29), got {chunk_elements!r}"
            )
        self._chunk_elements = chunk_elements

    @property
    def chunk_elements(self) -> int:
        """The most elements one attention score block may have."""
        return self._chunk_elements

    def __repr__(self) -> str:
        return f"{type(self).__name__}(chunk_elements={self._chunk_elements})"

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Return the attention module's output for ``hidden_states``, as ``AttnProcessor2_0``.

        ``attn`` is the ``diffusers.models.attention_processor.Attention`` module that calls
        this processor; the other arguments are those it passes on.
        """
        if len(args) > 0 or kwargs.get("scale") is not None:
            from diffusers.utils.deprecation_utils import deprecate

            deprecate(
                "scale",
                "1.0.0",
                "The `scale` argument is deprecated and will be ignored. Please remove it, as "
                "passing it will raise an error in the future. `scale` should directly be "
                "passed while calling the underlying pipeline component i.e., via "
                "`cross_attention_kwargs`.",
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            # (batch * heads, 1 or query_len, key_len) -> (batch, heads, 1 or query_len, key_len)
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = _chunked_attention(
            query,
            key,
            value,
            attention_mask,
            scale=attn.scale,
            chunk_elements=self._chunk_elements,
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        result: torch.Tensor = hidden_states / attn.rescale_output_factor
        return result

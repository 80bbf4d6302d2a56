"""Pure helpers of the batch-to-loop adapter: bind a call, count its prompts, split, merge.

Nothing here touches a pipeline or a device. :func:`split_batch` turns the keyword arguments
of one batched pipeline call into one set per prompt, and :func:`merge_outputs` turns the
per-prompt results back into what the batched call would have returned.

Which arguments are per-prompt is decided by name (see :data:`PROMPT_KEYS`,
:data:`EMBEDDING_KEYS`, :data:`IMAGE_KEYS`), never by "is a list of the right length":
``timesteps`` and ``sigmas`` are lists too, and belong to every prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "EMBEDDING_KEYS",
    "IMAGE_KEYS",
    "PROMPT_KEYS",
    "BoundCall",
    "batch_size",
    "bind_call",
    "call_signature",
    "merge_outputs",
    "merge_values",
    "split_batch",
]

PROMPT_KEYS: tuple[str, ...] = (
    "prompt",
    "prompt_2",
    "prompt_3",
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_3",
)
"""Text arguments: a list holds one string per prompt; a single string applies to all."""

EMBEDDING_KEYS: tuple[str, ...] = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_attention_mask",
)
"""Precomputed text conditioning: one row per prompt along the first (batch) dimension."""

IMAGE_KEYS: tuple[str, ...] = (
    "image",
    "mask_image",
    "control_image",
    "masked_image_latents",
    "depth_map",
)
"""Image inputs of img2img / inpaint / ControlNet / depth pipelines: one per prompt, or one
for all (a single image, a one-item list, or a batch dimension of 1)."""

# Masks may come as (batch, height, width) tensors: diffusers' mask processor reads a 3-D
# mask as a batch of grayscale masks, while a 3-D image is a single (channels, h, w) image.
_BATCHED_NDIM = {"mask_image": 3}


@dataclasses.dataclass(frozen=True)
class BoundCall:
    """The keyword arguments of one call, with the defaults the split needs.

    Attributes:
        kwargs: every argument the caller gave, by name (positional ones bound to their
            names, the contents of ``**kwargs`` flattened in).
        num_images_per_prompt: the value in effect (the signature's default when not given).
    """

    kwargs: dict[str, Any]
    num_images_per_prompt: int


@functools.cache
def _signature_of(func: Callable[..., Any], skip: int) -> inspect.Signature:
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())[skip:]
    return signature.replace(parameters=parameters)


def call_signature(call: Callable[..., Any]) -> inspect.Signature:
    """Return the signature of ``call``, cached per underlying function.

    A ``functools.partial(Class.__call__, pipe)`` (the form the prepared call receives) is
    looked up by ``Class.__call__``, so the cost of :func:`inspect.signature` is paid once per
    pipeline class, not once per call.
    """
    if isinstance(call, functools.partial) and not call.keywords:
        return _signature_of(call.func, len(call.args))
    return inspect.signature(call)


def bind_call(
    call: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> BoundCall | None:
    """Return ``args`` and ``kwargs`` bound to the names of ``call``'s parameters.

    Returns None when the arguments cannot be turned into keywords (they do not bind, or the
    signature takes ``*args``): the caller then makes the call unchanged and lets the
    pipeline report the problem in its own words.
    """
    signature = call_signature(call)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None
    flat: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            flat[name] = value
    # Video pipelines name it num_videos_per_prompt: one prompt, that many clips.
    name = next((n for n in _PER_PROMPT if n in flat or n in signature.parameters), _PER_PROMPT[0])
    per_prompt = flat.get(name)
    if per_prompt is None:
        parameter = signature.parameters.get(name)
        default = None if parameter is None else parameter.default
        per_prompt = default if isinstance(default, int) else 1
    return BoundCall(kwargs=flat, num_images_per_prompt=int(per_prompt))


_PER_PROMPT = ("num_images_per_prompt", "num_videos_per_prompt")


def _rows(value: object) -> int | None:
    """Return the length of the first dimension of an array or tensor, else None."""
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) == 0:
        return None
    return int(shape[0])


def batch_size(kwargs: Mapping[str, Any]) -> int:
    """Return how many prompts a call carries: a list ``prompt``'s length, else the batch
    dimension of ``prompt_embeds``, else 1."""
    prompt = kwargs.get("prompt")
    if isinstance(prompt, list):
        return len(prompt)
    if prompt is None:
        rows = _rows(kwargs.get("prompt_embeds"))
        if rows is not None:
            return rows
    return 1


def _mismatch(name: str, got: int, want: int, what: str) -> ValueError:
    return ValueError(f"{name} has {got} items but the batch has {want} {what}: {_fix(name)}")


def _fix(name: str) -> str:
    if name == "generator":
        return "pass one generator per image (prompts x num_images_per_prompt), or a single one"
    if name == "latents":
        return "pass one latent per image (prompts x num_images_per_prompt), or none"
    if name in IMAGE_KEYS:
        return "pass one image per prompt, or a single image for all prompts"
    if name in EMBEDDING_KEYS:
        return "pass one row per prompt"
    return "pass one per prompt, or a single string for all prompts"


def _image_count(name: str, value: object) -> int | None:
    """Return how many images ``value`` holds along its batch, or None for a single image."""
    if isinstance(value, (list, tuple)):
        return len(value)
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) >= _BATCHED_NDIM.get(name, 4):
        return int(shape[0])
    return None


def _split_image(name: str, value: Any, prompts: int) -> list[Any] | None:
    """Return ``value`` cut into one image per prompt, or None to give it to every prompt."""
    count = _image_count(name, value)
    if count is None or count == 1:
        return None
    if count != prompts:
        raise _mismatch(name, count, prompts, "prompts")
    return [value[i : i + 1] for i in range(prompts)]


def split_batch(
    kwargs: Mapping[str, Any],
    prompts: int,
    *,
    num_images_per_prompt: int = 1,
    multi_control: bool = False,
) -> list[dict[str, Any]]:
    """Return one keyword-argument dict per prompt, for a batch of ``prompts`` prompts.

    Per-prompt arguments are cut along with the prompts: lists of strings
    (:data:`PROMPT_KEYS`), the batch dimension of embeddings (:data:`EMBEDDING_KEYS`) and of
    images (:data:`IMAGE_KEYS`, which also accept one image for all prompts), and per-image
    arguments (``latents`` and a list ``generator``), whose length is
    ``prompts * num_images_per_prompt`` and which are cut into consecutive runs of
    ``num_images_per_prompt``. Each slice keeps its container type (a one-item list, a
    one-row tensor). Everything else is given to every prompt unchanged (the same object).

    With ``multi_control`` (a pipeline with several ControlNets), ``image`` and
    ``control_image`` are lists with one entry per ControlNet, and each entry is split.

    Raises:
        ValueError: a per-prompt argument's length is neither the batch's nor, where that
            is allowed, 1; the message names both lengths. Nothing is called before this.
    """
    if prompts < 1:
        raise ValueError(f"a batch needs at least one prompt, got {prompts}")
    per_image = prompts * num_images_per_prompt
    cuts: dict[str, list[Any]] = {}
    for name, value in kwargs.items():
        if value is None:
            continue
        if name in PROMPT_KEYS:
            if isinstance(value, list):
                if len(value) != prompts:
                    raise _mismatch(name, len(value), prompts, "prompts")
                cuts[name] = [value[i : i + 1] for i in range(prompts)]
        elif name in EMBEDDING_KEYS:
            rows = _rows(value)
            if rows is not None:
                if rows != prompts:
                    raise _mismatch(name, rows, prompts, "prompts")
                cuts[name] = [value[i : i + 1] for i in range(prompts)]
        elif name == "latents" or (name == "generator" and isinstance(value, list)):
            rows = len(value) if isinstance(value, list) else _rows(value)
            if rows is not None:
                if rows != per_image:
                    what = f"images ({prompts} prompts x {num_images_per_prompt} per prompt)"
                    raise _mismatch(name, rows, per_image, what)
                k = num_images_per_prompt
                cuts[name] = [value[i * k : (i + 1) * k] for i in range(prompts)]
        elif name in IMAGE_KEYS:
            if multi_control and name in ("image", "control_image") and isinstance(value, list):
                per_net = [_split_image(name, entry, prompts) for entry in value]
                if any(parts is not None for parts in per_net):
                    cuts[name] = [
                        [
                            entry if parts is None else parts[i]
                            for entry, parts in zip(value, per_net, strict=True)
                        ]
                        for i in range(prompts)
                    ]
            else:
                parts = _split_image(name, value, prompts)
                if parts is not None:
                    cuts[name] = parts
    items = []
    for i in range(prompts):
        item = dict(kwargs)
        for name, parts in cuts.items():
            item[name] = parts[i]
        items.append(item)
    return items


def merge_values(values: Sequence[Any]) -> Any:
    """Return per-prompt values of one output field joined as the batched call has them.

    Lists and tuples are concatenated, arrays and tensors joined along their first
    dimension; all-None stays None; equal scalars stay one scalar, unequal ones become a list.
    """
    first = values[0]
    if all(value is None for value in values):
        return None
    if isinstance(first, list) and all(isinstance(value, list) for value in values):
        return [item for value in values for item in value]
    if isinstance(first, tuple) and all(isinstance(value, tuple) for value in values):
        return tuple(item for value in values for item in value)
    module = type(first).__module__
    if module.startswith("numpy") and getattr(first, "ndim", 0) > 0:
        import numpy as np

        return np.concatenate(list(values), axis=0)
    if module.startswith("torch") and getattr(first, "ndim", 0) > 0:
        import torch

        return torch.cat(list(values), dim=0)
    if all(value == first for value in values[1:]):
        return first
    return list(values)


def merge_outputs(outputs: Sequence[Any]) -> Any:
    """Return the per-prompt results of a looped batch merged into one batched result.

    A pipeline output (a dataclass such as ``StableDiffusionPipelineOutput``) is rebuilt as
    the same class with each field merged by :func:`merge_values`; a tuple
    (``return_dict=False``) stays a tuple of merged entries.

    Raises:
        ValueError: ``outputs`` is empty.
    """
    if not outputs:
        raise ValueError("no outputs to merge")
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, tuple) and not dataclasses.is_dataclass(first):
        return tuple(merge_values([output[j] for output in outputs]) for j in range(len(first)))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = {
            field.name: merge_values([getattr(output, field.name) for output in outputs])
            for field in dataclasses.fields(first)
            if field.init
        }
        return type(first)(**fields)
    if isinstance(first, dict):
        merged = {key: merge_values([output[key] for output in outputs]) for key in first}
        return merged if type(first) is dict else type(first)(merged)
    return merge_values(outputs)
